//! Claim codes: the short secret printed for a device so its owner can claim it.
//!
//! Text form: `LOBBY1:<device_id hex>:<secret>`, where `secret` is the first
//! 16 bytes of HMAC-SHA256(claim key, device id bytes), base32 encoded
//! (RFC 4648 alphabet, no padding, upper case).

use std::fmt;
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::device::DeviceId;

/// Prefix (and format version) of every claim code.
pub const CODE_PREFIX: &str = "LOBBY1";
/// Bytes of HMAC output kept as the code's secret.
pub const SECRET_LEN: usize = 16;
/// Minimum accepted claim key length, in bytes.
pub const MIN_KEY_LEN: usize = 16;
/// Longest input `verify` looks at; a real code is 6 + 1 + 64 + 1 + 26 chars.
const MAX_CODE_LEN: usize = 256;

/// Errors raised while loading a claim key.
#[derive(Debug, thiserror::Error)]
pub enum CodeError {
    /// The key file could not be read.
    #[error("cannot read claim key file {path}: {source}")]
    Io {
        /// The key file.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// The key file's contents are not an acceptable key.
    #[error("invalid claim key file {path}: {reason}")]
    Invalid {
        /// The key file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

/// The server-side secret from which claim codes are derived.
///
/// Its `Debug` output never shows the key.
#[derive(Clone)]
pub struct ClaimKey(Vec<u8>);

impl fmt::Debug for ClaimKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClaimKey(<{} bytes redacted>)", self.0.len())
    }
}

impl ClaimKey {
    /// Loads a key file: hex (64 chars for a 32-byte key) plus an optional
    /// trailing newline. Keys shorter than 16 bytes are rejected.
    pub fn load(path: &Path) -> Result<Self, CodeError> {
        let text = std::fs::read_to_string(path).map_err(|source| CodeError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let invalid = |reason: String| CodeError::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        let bytes = hex::decode(text.trim())
            .map_err(|e| invalid(format!("expected hex-encoded key ({e})")))?;
        if bytes.len() < MIN_KEY_LEN {
            return Err(invalid(format!(
                "key is {} bytes, at least {MIN_KEY_LEN} required",
                bytes.len()
            )));
        }
        Ok(ClaimKey(bytes))
    }

    /// Wraps raw key bytes (no length check; `load` enforces the minimum).
    pub fn from_bytes(b: &[u8]) -> Self {
        ClaimKey(b.to_vec())
    }

    /// A fresh random 32-byte key.
    pub fn generate() -> Self {
        let bytes: [u8; 32] = rand::random();
        ClaimKey(bytes.to_vec())
    }

    /// The key file contents: lowercase hex and a newline.
    pub fn to_file_text(&self) -> String {
        format!("{}\n", hex::encode(&self.0))
    }

    /// The secret part of a device's code.
    ///
    /// The HMAC input is the 32 raw SHA-256 bytes of the device id, not its
    /// hex text: the raw bytes are the canonical form, hex is only display.
    fn secret(&self, id: &DeviceId) -> [u8; SECRET_LEN] {
        // HMAC takes keys of any length, so this cannot fail.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0)
            .expect("HMAC-SHA256 accepts keys of any length");
        mac.update(&id.0);
        let full = mac.finalize().into_bytes();
        let mut out = [0u8; SECRET_LEN];
        out.copy_from_slice(&full[..SECRET_LEN]);
        out
    }

    /// The claim code for a device: `LOBBY1:<hex id>:<base32 secret>`.
    pub fn code_for(&self, id: &DeviceId) -> String {
        let secret = data_encoding::BASE32_NOPAD.encode(&self.secret(id));
        format!("{CODE_PREFIX}:{}:{secret}", id.to_hex())
    }

    /// Checks a typed code and returns the device it claims.
    ///
    /// `Some(id)` only if the code is well formed and its secret matches
    /// (compared in constant time). Surrounding whitespace, lowercase base32,
    /// uppercase hex and a lowercase prefix are accepted. Any malformed or
    /// wrong code gives `None`; this never panics.
    pub fn verify(&self, code: &str) -> Option<DeviceId> {
        let code = code.trim();
        if code.len() > MAX_CODE_LEN {
            return None;
        }
        let mut parts = code.split(':');
        let (prefix, id_hex, secret) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || !prefix.eq_ignore_ascii_case(CODE_PREFIX) {
            return None;
        }
        let id = DeviceId::parse_hex(id_hex)?;
        let given = data_encoding::BASE32_NOPAD
            .decode(secret.to_ascii_uppercase().as_bytes())
            .ok()?;
        if given.len() != SECRET_LEN {
            return None;
        }
        let expected = self.secret(&id);
        if bool::from(expected.ct_eq(given.as_slice())) {
            Some(id)
        } else {
            None
        }
    }
}

/// The claim key in use and the retired keys whose printed labels are still honoured
/// (`claims.previous_code_keys`): rotating the key never invalidates a label in the field.
#[derive(Clone, Debug)]
pub struct ClaimKeys {
    /// Makes new codes (`lobby claim-code`) and verifies.
    pub current: ClaimKey,
    /// Only verify.
    pub previous: Vec<ClaimKey>,
}

impl From<ClaimKey> for ClaimKeys {
    fn from(current: ClaimKey) -> Self {
        Self {
            current,
            previous: Vec::new(),
        }
    }
}

impl ClaimKeys {
    /// The device a code claims, under the current key or any retired one.
    pub fn verify(&self, code: &str) -> Option<DeviceId> {
        std::iter::once(&self.current)
            .chain(&self.previous)
            .find_map(|k| k.verify(code))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn key() -> ClaimKey {
        ClaimKey::from_bytes(&(0u8..32).collect::<Vec<_>>())
    }

    fn abc_id() -> DeviceId {
        DeviceId::from_cert_der(b"abc")
    }

    /// Produced by an independent implementation (Python stdlib):
    /// `key=bytes(range(32)); did=hashlib.sha256(b"abc").digest();
    ///  base64.b32encode(hmac.new(key,did,hashlib.sha256).digest()[:16]).rstrip(b"=")`
    const PINNED: &str = "LOBBY1:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad:SEHMGOHWJCJN7QBIRY2DCYXJSY";

    #[test]
    fn pinned_vector_from_python() {
        assert_eq!(key().code_for(&abc_id()), PINNED);
        assert_eq!(key().verify(PINNED), Some(abc_id()));
    }

    #[test]
    fn round_trip_random_key() {
        let k = ClaimKey::generate();
        let id = DeviceId::from_cert_der(b"some cert");
        let code = k.code_for(&id);
        assert_eq!(code.len(), 6 + 1 + 64 + 1 + 26);
        assert_eq!(k.verify(&code), Some(id));
    }

    #[test]
    fn lowercase_and_whitespace_accepted() {
        let typed = format!("  \t{}\n", PINNED.to_lowercase());
        assert_eq!(key().verify(&typed), Some(abc_id()));
        let upper_hex = PINNED.replace("ba7816bf", "BA7816BF");
        assert_eq!(key().verify(&upper_hex), Some(abc_id()));
    }

    #[test]
    fn wrong_secret_or_other_device_rejected() {
        let k = key();
        // Same format, different key.
        let other_key = ClaimKey::from_bytes(&[7u8; 32]);
        assert_eq!(k.verify(&other_key.code_for(&abc_id())), None);
        // Another device's secret under this device's id.
        let other = DeviceId::from_cert_der(b"other");
        let other_code = k.code_for(&other);
        let other_secret = other_code.rsplit(':').next().unwrap();
        let forged = format!("LOBBY1:{}:{other_secret}", abc_id().to_hex());
        assert_eq!(k.verify(&forged), None);
        // One flipped character.
        let mut flipped = PINNED.to_string();
        flipped.pop();
        flipped.push('A');
        assert_eq!(k.verify(&flipped), None);
    }

    #[test]
    fn malformed_codes_rejected_without_panic() {
        let k = key();
        let id = abc_id().to_hex();
        let secret = PINNED.rsplit(':').next().unwrap();
        let cases = vec![
            String::new(),
            "   ".into(),
            "LOBBY1".into(),
            "LOBBY1:".into(),
            "LOBBY1::".into(),
            format!("LOBBY1:{id}"),
            format!("LOBBY1:{id}:"),
            format!("LOBBY2:{id}:{secret}"),
            format!(":{id}:{secret}"),
            format!("LOBBY1:{}:{secret}", &id[..62]),
            format!("LOBBY1:{}zz:{secret}", &id[..62]),
            format!("LOBBY1:{id}:{secret}:extra"),
            format!("LOBBY1:{id}:{secret}AAAAAAAA"),
            format!("LOBBY1:{id}:{}", &secret[..25]),
            format!("LOBBY1:{id}:{secret}="),
            format!("LOBBY1:{id}:{}", "A".repeat(10_000)),
            format!("LOBBY1:{id}:{}é", &secret[..25]),
            format!("LOBBY1:{}:{secret}", "é".repeat(32)),
            "LOBBY1:🦀:🦀".into(),
            "\u{0}\u{ffff}".into(),
        ];
        for c in cases {
            assert_eq!(k.verify(&c), None, "accepted {c:?}");
        }
    }

    #[test]
    fn load_key_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("claim.key");
        let k = ClaimKey::generate();
        std::fs::write(&path, k.to_file_text()).unwrap();
        let loaded = ClaimKey::load(&path).unwrap();
        let id = abc_id();
        assert_eq!(loaded.code_for(&id), k.code_for(&id));

        let mut f = std::fs::File::create(&path).unwrap();
        write!(f, "{}", "ab".repeat(15)).unwrap();
        let err = ClaimKey::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("claim.key") && err.contains("at least 16"),
            "{err}"
        );

        std::fs::write(&path, "not hex\n").unwrap();
        assert!(ClaimKey::load(&path).is_err());
        let missing = dir.path().join("nope.key");
        let err = ClaimKey::load(&missing).unwrap_err().to_string();
        assert!(err.contains("nope.key"), "{err}");
    }

    #[test]
    fn debug_hides_key() {
        let dbg = format!("{:?}", key());
        assert!(!dbg.contains("000102"), "{dbg}");
        assert!(!dbg.contains("[0, 1"), "{dbg}");
    }
}
