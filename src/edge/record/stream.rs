//! [`TlsStream`]: a device's TLS connection after its handshake, records protected here.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use aws_lc_rs::aead::{Aad, Nonce};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::keys::{tls12_aad, Cipher, Keys, Version};
use super::update::TrafficSecret;
use super::*;

/// A device's TLS connection after its handshake.
pub struct TlsStream {
    tcp: TcpStream,
    /// TLS 1.3: the application traffic secrets (device's, lobby's), for KeyUpdate; `None`
    /// for TLS 1.2 and for a handshake the key log could not tell apart (see `update`).
    traffic_secrets: Option<Box<(TrafficSecret, TrafficSecret)>>,
    version: Version,
    confidentiality_limit: u64,
    rx: Keys,
    tx: Keys,
    /// Received bytes not yet a whole record.
    incoming: Vec<u8>,
    /// Decrypted application data not yet read, from `plaintext_read` on.
    plaintext: Vec<u8>,
    plaintext_read: usize,
    /// Encrypted records not yet written, from `outgoing_written` on.
    outgoing: Vec<u8>,
    outgoing_written: usize,
    /// The device sent close_notify.
    read_closed: bool,
    /// The lobby sent close_notify.
    write_closed: bool,
}

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream")
            .field("version", &self.version)
            .field("cipher", &self.rx.cipher)
            .finish_non_exhaustive()
    }
}

impl TlsStream {
    /// The connection as the handshake left it: `incoming` may hold the start of the next
    /// record, `plaintext` data that came with the handshake, `outgoing` the session ticket.
    pub(super) fn new(
        tcp: TcpStream,
        suite: rustls::SupportedCipherSuite,
        secrets: rustls::ExtractedSecrets,
        traffic_secrets: Option<(TrafficSecret, TrafficSecret)>,
        incoming: Vec<u8>,
        plaintext: Vec<u8>,
        outgoing: Vec<u8>,
    ) -> io::Result<Self> {
        let confidentiality_limit = match suite {
            rustls::SupportedCipherSuite::Tls12(s) => s.common.confidentiality_limit,
            rustls::SupportedCipherSuite::Tls13(s) => s.common.confidentiality_limit,
        };
        Ok(TlsStream {
            tcp,
            version: match suite {
                rustls::SupportedCipherSuite::Tls13(_) => Version::Tls13,
                rustls::SupportedCipherSuite::Tls12(_) => Version::Tls12,
            },
            confidentiality_limit,
            traffic_secrets: traffic_secrets.map(Box::new),
            rx: Keys::new(secrets.rx)?,
            tx: Keys::new(secrets.tx)?,
            incoming: shrink(incoming),
            plaintext: shrink(plaintext),
            plaintext_read: 0,
            outgoing: shrink(outgoing),
            outgoing_written: 0,
            read_closed: false,
            write_closed: false,
        })
    }

    /// Holds no buffer and no AEAD context (what a quiet connection should cost).
    #[cfg(test)]
    pub(super) fn is_quiet(&self) -> bool {
        self.incoming.capacity() == 0
            && self.plaintext.capacity() == 0
            && self.outgoing.capacity() == 0
            && !self.rx.is_live()
            && !self.tx.is_live()
    }

    /// The lobby's record sequence number (0 again after each update of its key).
    #[cfg(test)]
    pub(super) fn tx_seq(&self) -> u64 {
        self.tx.seq
    }

    /// Decrypted bytes waiting to be read (without reading from the socket).
    pub fn buffered(&self) -> &[u8] {
        &self.plaintext[self.plaintext_read..]
    }

    /// Waits until at least one decrypted byte is buffered; false at the end of the stream.
    pub async fn fill(&mut self) -> io::Result<bool> {
        std::future::poll_fn(|cx| self.poll_plaintext(cx)).await
    }

    fn poll_plaintext(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        loop {
            if self.plaintext_read < self.plaintext.len() {
                return Poll::Ready(Ok(true));
            }
            if self.read_closed {
                return Poll::Ready(Ok(false));
            }
            if let Some(len) = self.whole_record()? {
                self.open(len)?;
                continue;
            }
            // A KeyUpdate answer (or anything else queued) goes out while we wait to read.
            if self.outgoing_written < self.outgoing.len() {
                if let Poll::Ready(Err(e)) = self.poll_write_out(cx) {
                    return Poll::Ready(Err(e));
                }
            }
            let want = match self.incoming.get(3..HEADER) {
                Some(len) => HEADER + usize::from(u16::from_be_bytes([len[0], len[1]])),
                None => HEADER,
            };
            self.incoming
                .reserve(want.saturating_sub(self.incoming.len()).max(READ_CHUNK));
            match self.poll_read_tcp(cx) {
                Poll::Pending => {
                    if self.incoming.is_empty() {
                        self.incoming = Vec::new();
                        self.rx.rest();
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Ok(0)) if self.incoming.is_empty() => {
                    // The TCP stream ended between records: an end, whether or not the device
                    // said close_notify first (MQTT packets carry their own lengths).
                    self.read_closed = true;
                }
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into())),
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            }
        }
    }

    fn poll_read_tcp(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.tcp.poll_read_ready(cx))?;
            match self.tcp.try_read_buf(&mut self.incoming) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                other => return Poll::Ready(other),
            }
        }
    }

    /// The length of the whole record at the front of `incoming`, once it is all there.
    fn whole_record(&self) -> io::Result<Option<usize>> {
        let Some(header) = self.incoming.get(..HEADER) else {
            return Ok(None);
        };
        if !(CHANGE_CIPHER_SPEC..=APPLICATION_DATA).contains(&header[0]) || header[1] != 3 {
            return Err(record_error("not a TLS record"));
        }
        let body = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if body > MAX_BODY {
            return Err(record_error("record too long"));
        }
        Ok((self.incoming.len() >= HEADER + body).then_some(HEADER + body))
    }

    /// Decrypts the record of `len` bytes at the front of `incoming` and acts on it.
    fn open(&mut self, len: usize) -> io::Result<()> {
        let outer = self.incoming[0];
        let nonce = Nonce::assume_unique_for_key(self.rx.nonce());
        let seq = self.rx.next_seq()?;
        let (header, rest) = self.incoming.split_at_mut(HEADER);
        let body = &mut rest[..len - HEADER];
        let version = self.version;
        let cipher = self.rx.cipher;
        let open_err = |_| record_error("decryption failed");
        let (typ, start, end) = match (version, cipher) {
            (Version::Tls13, _) => {
                if outer != APPLICATION_DATA {
                    return Err(record_error("unexpected record type after the handshake"));
                }
                let aad = Aad::from(<[u8; HEADER]>::try_from(&*header).expect("header"));
                let plain = self
                    .rx
                    .aead()?
                    .open_in_place(nonce, aad, body)
                    .map_err(open_err)?;
                // The content type is the last non-zero byte; zeros after it are padding.
                let end = plain
                    .iter()
                    .rposition(|&b| b != 0)
                    .ok_or_else(|| record_error("no content type"))?;
                (plain[end], HEADER, HEADER + end)
            }
            (Version::Tls12, Cipher::ChaCha20Poly1305) => {
                let n = body
                    .len()
                    .checked_sub(TAG)
                    .ok_or_else(|| record_error("record too short"))?;
                let aad = Aad::from(tls12_aad(seq, outer, n));
                self.rx
                    .aead()?
                    .open_in_place(nonce, aad, body)
                    .map_err(open_err)?;
                (outer, HEADER, HEADER + n)
            }
            (Version::Tls12, _) => {
                let n = body
                    .len()
                    .checked_sub(EXPLICIT_NONCE + TAG)
                    .ok_or_else(|| record_error("record too short"))?;
                let mut nonce = self.rx.iv;
                nonce[4..].copy_from_slice(&body[..EXPLICIT_NONCE]);
                let aad = Aad::from(tls12_aad(seq, outer, n));
                self.rx
                    .aead()?
                    .open_in_place(
                        Nonce::assume_unique_for_key(nonce),
                        aad,
                        &mut body[EXPLICIT_NONCE..],
                    )
                    .map_err(open_err)?;
                (outer, HEADER + EXPLICIT_NONCE, HEADER + EXPLICIT_NONCE + n)
            }
        };
        let result = match typ {
            APPLICATION_DATA => {
                self.plaintext.extend_from_slice(&self.incoming[start..end]);
                Ok(())
            }
            ALERT => match self.incoming[start..end] {
                [_, CLOSE_NOTIFY] => {
                    self.read_closed = true;
                    Ok(())
                }
                [_, description] => Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    format!("TLS alert {description} from the device"),
                )),
                _ => Err(record_error("malformed alert")),
            },
            HANDSHAKE if version == Version::Tls13 => {
                let messages = self.incoming[start..end].to_vec();
                self.on_handshake(&messages)
            }
            HANDSHAKE => Err(record_error("renegotiation is not supported")),
            _ => Err(record_error("unexpected content type")),
        };
        self.incoming.drain(..len);
        result
    }

    /// TLS 1.3 post-handshake messages from the device: only KeyUpdate is expected.
    fn on_handshake(&mut self, mut messages: &[u8]) -> io::Result<()> {
        while !messages.is_empty() {
            let [KEY_UPDATE, 0, 0, 1, request, ..] = *messages else {
                return Err(record_error("unexpected handshake message"));
            };
            let cipher = self.rx.cipher;
            self.rx = self
                .traffic_secrets
                .as_mut()
                .and_then(|s| s.0.next_keys(cipher))
                .ok_or_else(|| record_error("KeyUpdate without the traffic secret"))?;
            match request {
                0 => {}
                // update_requested: answer with our own update, before any more data.
                1 => self.update_tx_key()?,
                _ => return Err(record_error("malformed KeyUpdate")),
            }
            messages = &messages[5..];
        }
        Ok(())
    }

    /// Sends KeyUpdate(update_not_requested) under the current key, then switches to the next.
    fn update_tx_key(&mut self) -> io::Result<()> {
        let cipher = self.tx.cipher;
        let next = self
            .traffic_secrets
            .as_mut()
            .and_then(|s| s.1.next_keys(cipher))
            .ok_or_else(|| record_error("key update without the traffic secret"))?;
        self.seal(HANDSHAKE, &[KEY_UPDATE, 0, 0, 1, 0])?;
        self.tx = next;
        Ok(())
    }

    /// Encrypts `data` (≤ 2^14 bytes) as one record of `typ` onto `outgoing`.
    fn seal(&mut self, typ: u8, data: &[u8]) -> io::Result<()> {
        let start = self.outgoing.len();
        let nonce = self.tx.nonce();
        let seq = self.tx.next_seq()?;
        let (outer, prefix, aad_typ) = match self.version {
            Version::Tls13 => (APPLICATION_DATA, 0, None),
            Version::Tls12 if self.tx.cipher == Cipher::ChaCha20Poly1305 => (typ, 0, Some(typ)),
            Version::Tls12 => (typ, EXPLICIT_NONCE, Some(typ)),
        };
        let inner = usize::from(self.version == Version::Tls13);
        let body = prefix + data.len() + inner + TAG;
        self.outgoing.reserve(HEADER + body);
        self.outgoing.push(outer);
        self.outgoing.extend_from_slice(&[3, 3]);
        self.outgoing
            .extend_from_slice(&(body as u16).to_be_bytes());
        self.outgoing.extend_from_slice(&nonce[12 - prefix..]);
        self.outgoing.extend_from_slice(data);
        if inner == 1 {
            self.outgoing.push(typ);
        }
        let mut aad = [0; 13];
        let aad_len = match aad_typ {
            None => {
                aad[..HEADER].copy_from_slice(&self.outgoing[start..start + HEADER]);
                HEADER
            }
            Some(t) => {
                aad = tls12_aad(seq, t, data.len());
                aad.len()
            }
        };
        let sealed = start + HEADER + prefix;
        let tag = self
            .tx
            .aead()?
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&aad[..aad_len]),
                &mut self.outgoing[sealed..],
            )
            .map_err(|_| record_error("encryption failed"))?;
        self.outgoing.extend_from_slice(tag.as_ref());
        Ok(())
    }

    /// Application data onto `outgoing`, keeping the lobby's key within its limit.
    fn seal_data(&mut self, data: &[u8]) -> io::Result<()> {
        if self.tx.seq >= self.confidentiality_limit.saturating_sub(2) {
            if self.version != Version::Tls13 {
                return Err(record_error("confidentiality limit reached"));
            }
            self.update_tx_key()?;
        }
        self.seal(APPLICATION_DATA, data)
    }

    /// Writes `outgoing` out; then the buffer and the AEAD context are let go.
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.outgoing_written < self.outgoing.len() {
            let pending = &self.outgoing[self.outgoing_written..];
            let n = ready!(Pin::new(&mut self.tcp).poll_write(cx, pending))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.outgoing_written += n;
        }
        self.outgoing = Vec::new();
        self.outgoing_written = 0;
        self.tx.rest();
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for TlsStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !ready!(this.poll_plaintext(cx))? {
            return Poll::Ready(Ok(()));
        }
        let available = &this.plaintext[this.plaintext_read..];
        let n = available.len().min(buf.remaining());
        buf.put_slice(&available[..n]);
        this.plaintext_read += n;
        if this.plaintext_read == this.plaintext.len() {
            this.plaintext = Vec::new();
            this.plaintext_read = 0;
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.write_closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        if this.outgoing.len() - this.outgoing_written >= WRITE_BUFFER {
            ready!(this.poll_write_out(cx))?;
        }
        let n = buf.len().min(MAX_PLAINTEXT);
        this.seal_data(&buf[..n])?;
        // Out at once when the socket takes it; otherwise on flush.
        if let Poll::Ready(Err(e)) = this.poll_write_out(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_write_out(cx))?;
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.write_closed {
            this.write_closed = true;
            this.seal(ALERT, &[1, CLOSE_NOTIFY])?;
        }
        ready!(this.poll_write_out(cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}
