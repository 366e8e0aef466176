//! A minimal MQTT client over the lobby's TLS built on the lobby's codec ([`RawClient`]), for
//! what rumqttc hides, and the connect / close expectations built on it.

use bytes::BytesMut;
use lobby::mqtt::codec::{self, Packet, Protocol};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::{client_tls, Device, TestLobby, WAIT};

/// A minimal MQTT client over TLS built on the lobby's codec: send packets, read packets.
pub struct RawClient {
    pub stream: TlsStream<TcpStream>,
    pub protocol: Protocol,
    buf: BytesMut,
}

impl RawClient {
    /// TLS to the lobby as `device`; no CONNECT yet.
    pub async fn connect(lobby: &TestLobby, device: &Device, protocol: Protocol) -> Self {
        let connector = TlsConnector::from(client_tls(lobby, device));
        Self::with_connector(lobby, &connector, protocol)
            .await
            .unwrap()
    }

    /// TLS to the lobby with a caller's `connector` (its config, its session cache). The TCP
    /// connection must succeed; the handshake's error is the caller's to judge.
    pub async fn with_connector(
        lobby: &TestLobby,
        connector: &TlsConnector,
        protocol: Protocol,
    ) -> std::io::Result<Self> {
        let tcp = TcpStream::connect(lobby.mqtt_addr()).await.unwrap();
        let stream = connector
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await?;
        Ok(Self {
            stream,
            protocol,
            buf: BytesMut::new(),
        })
    }

    /// A client over a TLS stream the caller opened (e.g. after its own bytes on the TCP).
    pub fn from_stream(stream: TlsStream<TcpStream>, protocol: Protocol) -> Self {
        Self {
            stream,
            protocol,
            buf: BytesMut::new(),
        }
    }

    pub async fn send(&mut self, packet: Packet) {
        self.try_send(packet).await.unwrap();
    }

    /// Sends `packet`; the write's error is the caller's to judge.
    pub async fn try_send(&mut self, packet: Packet) -> std::io::Result<()> {
        let mut out = BytesMut::new();
        codec::encode(&packet, self.protocol, &mut out).unwrap();
        self.stream.write_all(&out).await?;
        self.stream.flush().await
    }

    /// CONNECT with `client_id` and keep-alive 30 s.
    pub async fn send_connect(&mut self, client_id: &str) {
        self.try_send_connect(client_id).await.unwrap();
    }

    /// [`RawClient::send_connect`] whose write error is the caller's to judge.
    pub async fn try_send_connect(&mut self, client_id: &str) -> std::io::Result<()> {
        let connect = codec::Connect {
            protocol: self.protocol,
            client_id: client_id.into(),
            keep_alive: 30,
            clean_start: true,
            ..Default::default()
        };
        self.try_send(Packet::Connect(connect)).await
    }

    /// The next packet, which must be a CONNACK (of any code).
    pub async fn expect_connack(&mut self) -> codec::ConnAck {
        match self.expect().await {
            Packet::ConnAck(a) => a,
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    /// The next packet; `None` when the lobby closed the connection (or after `WAIT`).
    pub async fn recv(&mut self) -> Option<Packet> {
        tokio::time::timeout(WAIT, async {
            loop {
                if let Some(p) = codec::decode(&mut self.buf, Some(self.protocol), 1 << 20).unwrap()
                {
                    return Some(p);
                }
                match self.stream.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        })
        .await
        .unwrap_or(None)
    }

    /// The next packet, which must exist.
    pub async fn expect(&mut self) -> Packet {
        self.recv()
            .await
            .expect("a packet before the connection closed")
    }

    /// SUBSCRIBE to `filter` at QoS 1; returns the SUBACK codes.
    pub async fn subscribe(&mut self, pkid: u16, filter: &str) -> Vec<u8> {
        self.subscribe_qos(pkid, filter, codec::QoS::AtLeastOnce)
            .await
    }

    /// SUBSCRIBE to `filter` at `qos`; returns the SUBACK codes. Publishes the lobby sends after
    /// the SUBACK (status) are left in the stream.
    pub async fn subscribe_qos(&mut self, pkid: u16, filter: &str, qos: codec::QoS) -> Vec<u8> {
        self.send(subscribe_packet(pkid, &[filter], qos)).await;
        // Publishes may arrive right after SUBACK, never before it.
        match self.expect().await {
            Packet::SubAck(a) => {
                assert_eq!(a.pkid, pkid);
                a.codes
            }
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }

    /// The next packet, or `None` when the lobby closed the connection; panics if the
    /// connection stayed open and silent for `WAIT`.
    pub async fn next_or_close(&mut self) -> Option<Packet> {
        let t = Instant::now();
        let p = self.recv().await;
        if p.is_none() {
            assert!(
                t.elapsed() < WAIT,
                "the connection stayed open for {WAIT:?}"
            );
        }
        p
    }

    /// Reads until the lobby closes the connection; returns what came before.
    pub async fn expect_closed(&mut self) -> Vec<Packet> {
        let mut got = Vec::new();
        while let Some(p) = self.next_or_close().await {
            got.push(p);
            assert!(got.len() < 16, "too many packets before close: {got:?}");
        }
        got
    }

    /// Expects exactly one DISCONNECT with `reason`, then the close; returns the DISCONNECT.
    pub async fn expect_disconnect(&mut self, reason: u8) -> codec::Disconnect {
        match self.expect_closed().await.as_slice() {
            [Packet::Disconnect(d)] => {
                assert_eq!(d.reason, reason, "{d:?}");
                d.clone()
            }
            other => panic!("expected DISCONNECT {reason:#04x} then close, got {other:?}"),
        }
    }

    /// The next packet, which must be a PUBLISH.
    pub async fn expect_publish(&mut self) -> codec::Publish {
        match self.expect().await {
            Packet::Publish(p) => p,
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }

    /// PINGREQ answered by PINGRESP: the connection is alive.
    pub async fn ping_ok(&mut self) {
        self.send(Packet::PingReq).await;
        match self.expect().await {
            Packet::PingResp => {}
            other => panic!("expected PINGRESP, got {other:?}"),
        }
    }
}

/// A raw client that sent CONNECT with `client_id`, and the CONNACK it got (of any code).
pub async fn connack(
    lobby: &TestLobby,
    dev: &Device,
    protocol: Protocol,
    client_id: &str,
) -> (RawClient, codec::ConnAck) {
    let mut c = RawClient::connect(lobby, dev, protocol).await;
    c.send_connect(client_id).await;
    let ack = c.expect_connack().await;
    (c, ack)
}

/// A raw client that connected as `dev` (client id: its name) with CONNACK 0.
pub async fn connected(lobby: &TestLobby, dev: &Device, protocol: Protocol) -> RawClient {
    let (c, ack) = connack(lobby, dev, protocol, &dev.name).await;
    assert_eq!(ack.code, 0, "{ack:?}");
    c
}

/// Asserts a CONNACK that sends the device on: 0x9D (Use another server) naming `reference`.
pub fn assert_sent_on(ack: &codec::ConnAck, reference: &str) {
    assert_eq!(ack.code, 0x9D);
    assert_eq!(ack.properties.server_reference.as_deref(), Some(reference));
}

/// The first read on `stream` must find it closed (EOF or an error) within `WAIT`, without a
/// byte; `what` names the case in the panic messages.
pub async fn expect_closed_without_bytes<S: AsyncRead + Unpin>(stream: &mut S, what: &str) {
    let mut buf = [0u8; 256];
    match timeout(WAIT, stream.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => {}
        Ok(Ok(n)) => panic!("{what}: unexpected {n} bytes"),
        Err(_) => panic!("{what}: the connection stayed open for {WAIT:?}"),
    }
}

/// A PUBLISH of `payload` on `topic`.
pub fn publish(topic: &str, qos: codec::QoS, pkid: u16, payload: &[u8]) -> Packet {
    Packet::Publish(codec::Publish {
        qos,
        topic: topic.into(),
        pkid,
        payload: bytes::Bytes::copy_from_slice(payload),
        ..Default::default()
    })
}

/// One SUBSCRIBE to every filter of `filters`, each at `qos`.
pub fn subscribe_packet(pkid: u16, filters: &[&str], qos: codec::QoS) -> Packet {
    Packet::Subscribe(codec::Subscribe {
        pkid,
        filters: filters
            .iter()
            .map(|f| codec::SubscribeFilter {
                filter: (*f).into(),
                qos,
                ..Default::default()
            })
            .collect(),
        properties: Default::default(),
    })
}
