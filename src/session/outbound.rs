//! What a session writes: CONNACK, DISCONNECT, PUBACK and the lobby's own publishes (status,
//! redirect, the AWS device-lobby compat message). Packets are encoded into the session's write
//! buffer; `Session::flush` sends them.

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};

use super::Session;
use crate::model::ClaimState;
use crate::mqtt::codec::{self, Packet, Protocol, QoS};
use crate::mqtt::reason;
use crate::route::{self, Redirect};

impl<S> Session<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    /// Encodes `packet` into the write buffer, unless it exceeds the device's Maximum Packet
    /// Size (v5), in which case MQTT says it must not be sent.
    pub(super) fn send(&mut self, packet: &Packet) {
        let start = self.wbuf.len();
        if codec::encode(packet, self.protocol, &mut self.wbuf).is_err() {
            self.wbuf.truncate(start);
            return;
        }
        if let Some(max) = self.client_max_packet {
            if self.wbuf.len() - start > max as usize {
                self.wbuf.truncate(start);
            }
        }
    }

    /// CONNACK with `code`; a redirect adds Server Reference and the user properties of SPEC §4.
    pub(super) fn send_connack(
        &mut self,
        code: u8,
        redirect: Option<&Redirect>,
        assigned_client_id: Option<String>,
    ) {
        let code = reason::connack(self.protocol, code);
        let mut props = codec::ConnAckProperties::default();
        if self.protocol == Protocol::V5 {
            if code == reason::SUCCESS {
                props.maximum_qos = Some(1);
                props.retain_available = Some(false);
                props.maximum_packet_size = u32::try_from(self.limits.max_packet_size).ok();
                props.shared_subscription_available = Some(false);
                props.subscription_identifiers_available = Some(false);
                props.wildcard_subscription_available = Some(true);
                props.assigned_client_identifier = assigned_client_id;
                if self.bridge.is_some() {
                    props.receive_maximum = Some(self.limits.max_inflight);
                }
            }
            if let Some(r) = redirect {
                props.server_reference = Some(r.server_reference());
                props.user_properties = vec![
                    ("tenant".into(), r.tenant.to_string()),
                    ("thing_name".into(), r.thing_name.clone()),
                    ("redirect_id".into(), r.redirect_id.clone()),
                ];
            }
        }
        self.send(&Packet::ConnAck(codec::ConnAck {
            session_present: false,
            code,
            properties: props,
        }));
    }

    /// v5: DISCONNECT with a reason (and Server Reference); v3.1.1 has no server DISCONNECT,
    /// the caller just closes.
    pub(super) fn send_disconnect(&mut self, code: u8, server_reference: Option<String>) {
        if self.protocol != Protocol::V5 {
            return;
        }
        let mut d = codec::Disconnect {
            reason: code,
            ..Default::default()
        };
        d.properties.server_reference = server_reference;
        self.send(&Packet::Disconnect(d));
    }

    pub(super) fn send_puback(&mut self, pkid: u16, code: u8) {
        self.send(&Packet::PubAck(codec::PubAck {
            pkid,
            reason: code,
            properties: Default::default(),
        }));
    }

    /// The status message, if the device follows its status topic.
    pub(super) fn publish_status(&mut self, state: ClaimState, tenant: Option<&str>) {
        let topic = self.acl.topic("status");
        if let Some(qos) = self.subs.granted(&topic) {
            let payload = route::status_payload(&self.identity.device_id, state, tenant);
            self.publish(topic, qos, payload);
        }
    }

    /// The redirect message to `…/redirect` and, in compat mode, `lobby/<CN>`, where subscribed.
    /// Returns whether anything was sent.
    pub(super) fn publish_redirect(&mut self, r: &Redirect) -> bool {
        let mut sent = false;
        let topic = self.acl.topic("redirect");
        if let Some(qos) = self.subs.granted(&topic) {
            let payload = route::redirect_payload(&self.identity.device_id, r);
            let pkid = self.publish(topic, qos, payload);
            self.redirect_pkid = pkid.or(self.redirect_pkid);
            sent = true;
        }
        if let Some(topic) = self.acl.compat_topic().map(str::to_owned) {
            if let Some(qos) = self.subs.granted(&topic) {
                let payload = serde_json::to_vec(&serde_json::json!({
                    "iotep": r.endpoint,
                    "config": { "port": r.port, "thing_name": r.thing_name, "tenant": &*r.tenant },
                }))
                .unwrap_or_default();
                self.publish(topic, qos, payload);
                sent = true;
            }
        }
        if sent {
            self.redirected(r, "publish");
        }
        sent
    }

    /// Publishes at `qos`; returns the packet id for QoS 1.
    pub(super) fn publish(&mut self, topic: String, qos: QoS, payload: Vec<u8>) -> Option<u16> {
        let pkid = match qos {
            QoS::AtMostOnce => 0,
            _ => {
                self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
                self.next_pkid
            }
        };
        self.send(&Packet::Publish(codec::Publish {
            dup: false,
            qos,
            retain: false,
            topic,
            pkid,
            payload: Bytes::from(payload),
            properties: Default::default(),
        }));
        (pkid != 0).then_some(pkid)
    }
}
