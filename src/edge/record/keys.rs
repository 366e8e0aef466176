//! Traffic keys of one direction of a device's TLS connection, and the record nonces and
//! additional data of TLS 1.3 and 1.2.

use std::io;

use aws_lc_rs::aead::{self, LessSafeKey, UnboundKey};
use rustls::ConnectionTrafficSecrets;
use zeroize::Zeroize;

use super::record_error;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Version {
    Tls12,
    Tls13,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Cipher {
    Aes128Gcm,
    Aes256Gcm,
    ChaCha20Poly1305,
}

impl Cipher {
    pub(super) fn algorithm(self) -> &'static aead::Algorithm {
        match self {
            Self::Aes128Gcm => &aead::AES_128_GCM,
            Self::Aes256Gcm => &aead::AES_256_GCM,
            Self::ChaCha20Poly1305 => &aead::CHACHA20_POLY1305,
        }
    }
}

/// One direction's traffic keys and record sequence number. The AEAD context is made on first
/// use and dropped when the connection goes quiet ([`Keys::rest`]).
pub(super) struct Keys {
    pub(super) cipher: Cipher,
    key: [u8; 32],
    pub(super) iv: [u8; 12],
    pub(super) seq: u64,
    live: Option<LessSafeKey>,
}

impl Keys {
    pub(super) fn new((seq, secrets): (u64, ConnectionTrafficSecrets)) -> io::Result<Self> {
        let (cipher, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (Cipher::Aes128Gcm, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (Cipher::Aes256Gcm, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (Cipher::ChaCha20Poly1305, key, iv)
            }
            _ => return Err(record_error("unsupported cipher suite")),
        };
        Self::from_raw(cipher, key.as_ref(), iv.as_ref(), seq)
            .ok_or_else(|| record_error("unexpected key length"))
    }

    /// Keys from their bytes; `None` when the lengths do not fit the cipher.
    pub(super) fn from_raw(cipher: Cipher, key: &[u8], iv: &[u8], seq: u64) -> Option<Self> {
        if key.len() != cipher.algorithm().key_len() || iv.len() != 12 {
            return None;
        }
        let mut keys = Keys {
            cipher,
            key: [0; 32],
            iv: [0; 12],
            seq,
            live: None,
        };
        keys.key[..key.len()].copy_from_slice(key);
        keys.iv.copy_from_slice(iv);
        Some(keys)
    }

    pub(super) fn aead(&mut self) -> io::Result<&LessSafeKey> {
        if self.live.is_none() {
            let algorithm = self.cipher.algorithm();
            let key = UnboundKey::new(algorithm, &self.key[..algorithm.key_len()])
                .map_err(|_| record_error("bad key"))?;
            self.live = Some(LessSafeKey::new(key));
        }
        Ok(self.live.as_ref().expect("made above"))
    }

    /// The per-record nonce: the IV XOR the sequence number (TLS 1.3, TLS 1.2 ChaCha20, and
    /// the lobby's own TLS 1.2 GCM nonces, as rustls makes them).
    pub(super) fn nonce(&self) -> [u8; 12] {
        use rustls::crypto::cipher::{Iv, Nonce};
        Nonce::new(&Iv::new(self.iv), self.seq).0
    }

    pub(super) fn next_seq(&mut self) -> io::Result<u64> {
        let seq = self.seq;
        self.seq = seq
            .checked_add(1)
            .ok_or_else(|| record_error("sequence number exhausted"))?;
        Ok(seq)
    }

    #[cfg(test)]
    pub(super) fn is_live(&self) -> bool {
        self.live.is_some()
    }

    /// The connection is quiet: keep only the raw keys.
    pub(super) fn rest(&mut self) {
        self.live = None;
    }
}

impl Drop for Keys {
    fn drop(&mut self) {
        self.key.zeroize();
        self.iv.zeroize();
    }
}

/// TLS 1.2's additional data: sequence number, type, version, plaintext length (rustls'
/// construction).
pub(super) fn tls12_aad(seq: u64, typ: u8, len: usize) -> [u8; 13] {
    rustls::crypto::cipher::make_tls12_aad(
        seq,
        rustls::ContentType::from(typ),
        rustls::ProtocolVersion::TLSv1_2,
        len,
    )
}
