//! TLS 1.3 key updates without rustls' connection: the application traffic secrets, and the
//! next ones (RFC 8446 §7.2: `HKDF-Expand-Label(secret, "traffic upd", "", Hash.length)`).
//!
//! rustls hands its secrets out through its key log only (`ExtractedSecrets` carry the key and
//! IV, not the secret they come from; `KernelConnection` keeps them, with the peer's
//! certificate chain and ~1.3 KB in all per connection). The edge's key log ([`key_log`])
//! keeps the two `*_TRAFFIC_SECRET_0`s of the handshakes the edge registered (by client
//! random, read from the ClientHello before rustls sees it) until the handshake takes them.
//! Two handshakes that share a client random (only a replaying or broken client sends that)
//! get neither: a KeyUpdate then ends their connection.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

use aws_lc_rs::hkdf;
use rustls::crypto::hash::HashAlgorithm;
use rustls::KeyLog;
use zeroize::Zeroize;

use super::keys::{Cipher, Keys};

const CLIENT: &str = "CLIENT_TRAFFIC_SECRET_0";
const SERVER: &str = "SERVER_TRAFFIC_SECRET_0";

/// A traffic secret (SHA-256 or SHA-384 long).
#[derive(Clone)]
pub(super) struct Secret {
    bytes: [u8; 48],
    len: u8,
}

impl Secret {
    fn new(secret: &[u8]) -> Option<Self> {
        let mut bytes = [0; 48];
        bytes.get_mut(..secret.len())?.copy_from_slice(secret);
        Some(Secret {
            bytes,
            len: secret.len() as u8,
        })
    }

    fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        self.bytes.zeroize();
    }
}

/// One direction's application traffic secret and the suite's hash.
pub(super) struct TrafficSecret {
    secret: Secret,
    hash: hkdf::Algorithm,
}

impl TrafficSecret {
    /// Moves to the next secret of this direction; the keys it gives (sequence number 0).
    pub(super) fn next_keys(&mut self, cipher: Cipher) -> Option<Keys> {
        let len = usize::from(self.secret.len);
        let next = expand_label(self.hash, self.secret.as_bytes(), b"traffic upd", len)?;
        self.secret = Secret::new(&next)?;
        let key_len = cipher.algorithm().key_len();
        let mut key = expand_label(self.hash, self.secret.as_bytes(), b"key", key_len)?;
        let mut iv = expand_label(self.hash, self.secret.as_bytes(), b"iv", 12)?;
        let keys = Keys::from_raw(cipher, &key, &iv, 0);
        key.zeroize();
        iv.zeroize();
        keys
    }
}

/// RFC 8446 §7.1 `HKDF-Expand-Label(secret, label, "", len)`.
fn expand_label(hash: hkdf::Algorithm, secret: &[u8], label: &[u8], len: usize) -> Option<Vec<u8>> {
    struct Len(usize);
    impl hkdf::KeyType for Len {
        fn len(&self) -> usize {
            self.0
        }
    }
    let length = (len as u16).to_be_bytes();
    let label_len = [6 + label.len() as u8];
    let info: [&[u8]; 5] = [&length, &label_len, b"tls13 ", label, &[0]];
    let prk = hkdf::Prk::new_less_safe(hash, secret);
    let mut out = vec![0; len];
    prk.expand(&info, Len(len)).ok()?.fill(&mut out).ok()?;
    Some(out)
}

#[derive(Default)]
struct Logged {
    /// Handshakes registered under this client random (more than one: used by none).
    handshakes: u8,
    client: Option<Secret>,
    server: Option<Secret>,
}

/// The edge's key log: the traffic secrets of registered handshakes, by client random.
#[derive(Default)]
pub struct SecretLog {
    logged: parking_lot::Mutex<HashMap<[u8; 32], Logged>>,
}

impl std::fmt::Debug for SecretLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretLog")
            .field("handshakes", &self.logged.lock().len())
            .finish()
    }
}

static LOG: LazyLock<Arc<SecretLog>> = LazyLock::new(Arc::default);

/// The key log every device `ServerConfig` gets (`ServerConfig::key_log`).
pub fn key_log() -> Arc<dyn KeyLog> {
    LOG.clone()
}

impl KeyLog for SecretLog {
    fn will_log(&self, label: &str) -> bool {
        label == CLIENT || label == SERVER
    }

    fn log(&self, label: &str, client_random: &[u8], secret: &[u8]) {
        let Ok(random) = <[u8; 32]>::try_from(client_random) else {
            return;
        };
        let mut logged = self.logged.lock();
        // Only handshakes the edge registered: nothing else can grow the map.
        let Some(entry) = logged.get_mut(&random) else {
            return;
        };
        let slot = if label == CLIENT {
            &mut entry.client
        } else {
            &mut entry.server
        };
        *slot = Secret::new(secret);
    }
}

/// A handshake's place in the key log, from its ClientHello to its end (or its cancellation:
/// dropping it removes what was logged).
pub(super) struct Registration {
    random: [u8; 32],
}

impl Registration {
    /// Registers the handshake whose first bytes are `incoming`, once they hold the client
    /// random (a ClientHello whose first record is too short to hold it is not registered).
    pub(super) fn from_client_hello(incoming: &[u8]) -> Option<Self> {
        // Record header (5), handshake type 1 (ClientHello) and length (3), version (2),
        // then the 32 random bytes.
        if incoming.first() != Some(&22) || incoming.get(5) != Some(&1) {
            return None;
        }
        let record_len = usize::from(u16::from_be_bytes([*incoming.get(3)?, *incoming.get(4)?]));
        if record_len < 4 + 2 + 32 {
            return None;
        }
        let random: [u8; 32] = incoming.get(11..43)?.try_into().ok()?;
        LOG.logged.lock().entry(random).or_default().handshakes += 1;
        Some(Registration { random })
    }

    /// Both application traffic secrets (client's, server's), once the handshake has made
    /// them and no other handshake shares the client random.
    pub(super) fn take(&self, hash: HashAlgorithm) -> Option<(TrafficSecret, TrafficSecret)> {
        let hash = match hash {
            HashAlgorithm::SHA256 => hkdf::HKDF_SHA256,
            HashAlgorithm::SHA384 => hkdf::HKDF_SHA384,
            _ => return None,
        };
        let mut logged = LOG.logged.lock();
        let entry = logged.get_mut(&self.random)?;
        if entry.handshakes != 1 {
            return None;
        }
        let (client, server) = (entry.client.take()?, entry.server.take()?);
        Some((
            TrafficSecret {
                secret: client,
                hash,
            },
            TrafficSecret {
                secret: server,
                hash,
            },
        ))
    }
}

/// Whether the key log holds an entry for this client random (tests).
#[cfg(test)]
pub(super) fn is_registered(random: &[u8; 32]) -> bool {
    LOG.logged.lock().contains_key(random)
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut logged = LOG.logged.lock();
        if let Some(entry) = logged.get_mut(&self.random) {
            entry.handshakes -= 1;
            if entry.handshakes == 0 {
                logged.remove(&self.random);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(random: [u8; 32]) -> Vec<u8> {
        let mut h = vec![22, 3, 1, 0, 200, 1, 0, 0, 196, 3, 3];
        h.extend_from_slice(&random);
        h
    }

    fn held(random: &[u8; 32]) -> bool {
        LOG.logged.lock().contains_key(random)
    }

    #[test]
    fn secrets_are_kept_for_registered_handshakes_only_and_dropped_with_them() {
        let log = key_log();
        let random = [0xA5; 32];
        log.log(CLIENT, &random, &[1; 32]);
        assert!(!held(&random), "an unregistered handshake grows nothing");
        let reg = Registration::from_client_hello(&hello(random)).unwrap();
        log.log(CLIENT, &random, &[1; 32]);
        log.log(SERVER, &random, &[2; 32]);
        let (client, server) = reg.take(HashAlgorithm::SHA256).unwrap();
        assert_eq!(client.secret.as_bytes(), &[1; 32]);
        assert_eq!(server.secret.as_bytes(), &[2; 32]);
        drop(reg);
        assert!(!held(&random));
    }

    #[test]
    fn handshakes_sharing_a_client_random_get_no_secrets() {
        let log = key_log();
        let random = [0x5A; 32];
        let a = Registration::from_client_hello(&hello(random)).unwrap();
        let b = Registration::from_client_hello(&hello(random)).unwrap();
        log.log(CLIENT, &random, &[1; 48]);
        log.log(SERVER, &random, &[2; 48]);
        assert!(a.take(HashAlgorithm::SHA384).is_none());
        drop(a);
        drop(b);
        assert!(!held(&random));
    }

    #[test]
    fn a_hello_too_short_or_not_a_hello_is_not_registered() {
        let random = [0x33; 32];
        let full = hello(random);
        assert!(Registration::from_client_hello(&full[..40]).is_none());
        let mut alert = full.clone();
        alert[0] = 21;
        assert!(Registration::from_client_hello(&alert).is_none());
        let mut tiny = full;
        tiny[3..5].copy_from_slice(&20u16.to_be_bytes());
        assert!(Registration::from_client_hello(&tiny).is_none());
        assert!(!held(&random));
    }

    /// RFC 8448 §3 (simple 1-RTT): the server's application traffic secret gives the
    /// record key and IV listed there (`next_keys` first steps to the next secret, so the
    /// check runs one derivation by hand).
    #[test]
    fn expand_label_matches_rfc_8448() {
        let secret =
            hex::decode("a11af9f05531f856ad47116b45a950328204b4f44bfb6b3a4b4f1f3fcb631643")
                .unwrap();
        let key = expand_label(hkdf::HKDF_SHA256, &secret, b"key", 16).unwrap();
        let iv = expand_label(hkdf::HKDF_SHA256, &secret, b"iv", 12).unwrap();
        assert_eq!(hex::encode(key), "9f02283b6c9c07efc26bb9f2ac92e356");
        assert_eq!(hex::encode(iv), "cf782b88dd83549aadf1e984");
    }
}
