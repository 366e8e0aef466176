//! Device identity derived from a client certificate.
//!
//! Contract: a device's id is the lowercase hex SHA-256 of its leaf
//! certificate's DER encoding; its thing name is the certificate subject's
//! common name when that is a usable AWS IoT thing name, or the device id otherwise
//! (no CN, or one that is not: SPEC §2's fallback, extended).
//!
//! The CN is attacker text: any trusted factory CA can sign any subject, so it may hold `+`,
//! `#`, `/`, `$`, NUL, control or right-to-left characters, be kilobytes long, or equal another
//! device's CN. [`thing_name_for`] is the one place a CN becomes a name; everything that puts a
//! name into a topic, a thing name or a database column takes it from there (or from
//! [`fill_template`], which only ever inserts such names).

use std::fmt;
use std::hash::{BuildHasher, Hasher};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

/// Errors raised while converting certificate encodings.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The text held no parsable `CERTIFICATE` PEM block.
    #[error("no certificate found in PEM input: {0}")]
    Pem(#[from] rustls_pki_types::pem::Error),
}

/// A device id: the SHA-256 of the device's leaf certificate DER.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(pub [u8; 32]);

impl DeviceId {
    /// Hashes the certificate DER; the bytes are not parsed.
    pub fn from_cert_der(der: &[u8]) -> Self {
        // aws-lc's SHA-256 (SHA-NI where the CPU has it): sha2's took ~26k instructions per
        // connect, the largest cost of the connect path outside TLS (callgrind).
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der);
        DeviceId(digest.as_ref().try_into().expect("SHA-256 is 32 bytes"))
    }

    /// Parses exactly 64 hex characters (either case); anything else is `None`.
    pub fn parse_hex(s: &str) -> Option<Self> {
        if s.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(DeviceId(out))
    }

    /// The id as 64 lowercase hex characters.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceId({}…)", hex::encode(&self.0[..4]))
    }
}

/// The subject common name of a DER certificate, or `None` when the
/// certificate cannot be parsed or has no non-empty CN.
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    cn_of(&cert)
}

fn cn_of(cert: &x509_parser::certificate::X509Certificate<'_>) -> Option<String> {
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?;
    (!cn.is_empty()).then(|| cn.to_owned())
}

/// Longest thing name AWS IoT accepts.
pub const MAX_THING_NAME: usize = 128;

/// Is `name` a valid AWS IoT thing name: 1 to 128 characters of `[a-zA-Z0-9:_-]`? Such a name
/// can never be or introduce an MQTT wildcard, a level separator, a `$` topic or a NUL.
pub fn is_valid_thing_name(name: &str) -> bool {
    (1..=MAX_THING_NAME).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b':' | b'_' | b'-'))
}

/// Is `name` shaped like a device id (64 lowercase hex characters)?
fn looks_like_device_id(name: &str) -> bool {
    name.len() == 64 && name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// May device `id` be called `name`? A valid thing name that is not another device's id:
/// device ids are every device's fallback name, so a CN (or template result) that spells
/// someone else's id is refused and the fallback stays unique.
pub fn usable_thing_name(name: &str, id: &DeviceId) -> bool {
    is_valid_thing_name(name) && (!looks_like_device_id(name) || name == id.to_hex())
}

/// The thing name of device `id` whose certificate CN is `cn`: the CN when it is usable
/// ([`usable_thing_name`]), otherwise the device id in hex.
pub fn thing_name_for(cn: Option<&str>, id: &DeviceId) -> String {
    match cn {
        Some(cn) if usable_thing_name(cn, id) => cn.to_owned(),
        _ => id.to_hex(),
    }
}

/// A CN as display text for logs: escaped (`\0`, `\u{202e}`, quotes), at most 64 characters
/// of the original, then `…`. Never a name, never stored.
pub fn display_cn(cn: &str) -> String {
    const SHOWN: usize = 64;
    let mut out: String = cn
        .chars()
        .take(SHOWN)
        .flat_map(char::escape_debug)
        .collect();
    if cn.chars().nth(SHOWN).is_some() {
        out.push('…');
    }
    out
}

/// Fills a tenant's template (a bridge topic, an AWS thing-name template): `{thing_name}` and
/// `{cn}` become `thing_name`, `{device_id}` the id in hex, in one pass (an inserted value is
/// never read again as a placeholder). A `thing_name` that is not usable is replaced by the
/// device id first, so what is inserted is always `[a-zA-Z0-9:_-]+`: one literal topic level
/// (or part of one) per placeholder, never `+`, `#`, `/`, `$` or NUL.
pub fn fill_template(template: &str, thing_name: &str, id: &DeviceId) -> String {
    let hex = id.to_hex();
    let name = if usable_thing_name(thing_name, id) {
        thing_name
    } else {
        &hex
    };
    let mut out = String::with_capacity(template.len() + name.len());
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let tail = &rest[open..];
        let (value, len) = PLACEHOLDERS
            .into_iter()
            .find(|p| tail.starts_with(p))
            .map_or(("{", 1), |p| {
                let value = if p == "{device_id}" {
                    hex.as_str()
                } else {
                    name
                };
                (value, p.len())
            });
        out.push_str(value);
        rest = &tail[len..];
    }
    out.push_str(rest);
    out
}

/// The placeholders [`fill_template`] knows: the first two are the thing name, the last the
/// device id.
pub const PLACEHOLDERS: [&str; 3] = ["{thing_name}", "{cn}", "{device_id}"];

/// A device's identity as seen by the broker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// SHA-256 of `cert_der`.
    pub device_id: DeviceId,
    /// [`thing_name_for`] of the subject CN: the CN when it is a usable thing name, else the
    /// device id in hex. Not unique: a claim's stored thing name is (see the claims service).
    pub thing_name: String,
    /// The leaf certificate, DER encoded.
    pub cert_der: Vec<u8>,
    /// The certificates the device sent after its leaf (its factory's intermediates), kept so
    /// the re-check after a trust reload builds the same path the handshake did.
    pub intermediates: Vec<CertificateDer<'static>>,
    /// The certificate's validity period in Unix seconds (`not_before`, `not_after`); empty
    /// (`0, -1`) when it does not parse. A full handshake checked it already; a resumed one
    /// did not, so the edge checks it again.
    pub valid: (i64, i64),
}

impl Identity {
    /// Builds the identity of the device that presented `chain` (leaf first, as TLS sends
    /// it); `None` for an empty chain.
    pub fn from_chain(chain: &[CertificateDer<'static>]) -> Option<Self> {
        let (leaf, intermediates) = chain.split_first()?;
        let mut identity = Self::from_cert_der(leaf.as_ref());
        identity.intermediates = intermediates.to_vec();
        Some(identity)
    }

    /// Builds the identity of the device presenting this leaf certificate.
    pub fn from_cert_der(der: &[u8]) -> Self {
        let device_id = DeviceId::from_cert_der(der);
        let parsed = x509_parser::parse_x509_certificate(der).ok();
        let (cn, valid) = match &parsed {
            Some((_, cert)) => (
                cn_of(cert),
                (
                    cert.validity().not_before.timestamp(),
                    cert.validity().not_after.timestamp(),
                ),
            ),
            None => (None, (0, -1)),
        };
        let thing_name = thing_name_for(cn.as_deref(), &device_id);
        if let Some(cn) = cn.as_deref().filter(|cn| *cn != thing_name) {
            tracing::debug!(%device_id, cn = %display_cn(cn), "certificate CN is not a usable thing name; the device id stands in");
        }
        Identity {
            thing_name,
            device_id,
            cert_der: der.to_vec(),
            intermediates: Vec::new(),
            valid,
        }
    }

    /// Is the certificate inside its validity period at `unix_secs`?
    pub fn valid_at(&self, unix_secs: i64) -> bool {
        (self.valid.0..=self.valid.1).contains(&unix_secs)
    }
}

/// The DER bytes of the first `CERTIFICATE` block in `pem`.
pub fn cert_pem_to_der(pem: &str) -> Result<Vec<u8>, IdentityError> {
    let cert = CertificateDer::from_pem_slice(pem.as_bytes())?;
    Ok(cert.as_ref().to_vec())
}

/// Encodes DER as a `CERTIFICATE` PEM block with 64-column base64 lines.
pub fn der_to_pem(der: &[u8]) -> String {
    let b64 = data_encoding::BASE64.encode(der);
    let mut out = String::with_capacity(b64.len() + b64.len() / 64 + 60);
    out.push_str("-----BEGIN CERTIFICATE-----\n");
    // Base64 output is ASCII, so byte chunks are valid str slices.
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// Hasher for [`DeviceId`] keys: the first 8 bytes of the digest. Device ids are SHA-256
/// digests already, so this replaces SipHash in every map keyed by them: an attacker cannot
/// choose a device id without a certificate signed by a trusted CA.
#[derive(Default, Clone, Copy, Debug)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // `[u8; 32]` hashes as one `write` of its bytes (no length prefix for arrays).
        for chunk in bytes.chunks(8).take(1) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.0 ^= u64::from_le_bytes(b);
        }
    }
    fn write_usize(&mut self, n: usize) {
        self.0 ^= n as u64;
    }
}

/// Builds [`IdHasher`]s.
#[derive(Default, Clone, Copy, Debug)]
pub struct IdHashBuilder;

impl BuildHasher for IdHashBuilder {
    type Hasher = IdHasher;
    fn build_hasher(&self) -> IdHasher {
        IdHasher(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    #[test]
    fn id_hasher_uses_digest_prefix() {
        let a = IdHashBuilder.hash_one(DeviceId([1; 32]));
        let b = IdHashBuilder.hash_one(DeviceId([2; 32]));
        assert_ne!(a, b);
        assert_eq!(a, IdHashBuilder.hash_one(DeviceId([1; 32])));
    }
    use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};

    fn cert_with_cn(cn: Option<&str>) -> Vec<u8> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        let mut dn = DistinguishedName::new();
        if let Some(cn) = cn {
            dn.push(DnType::CommonName, cn);
        } else {
            dn.push(DnType::OrganizationName, "Lobby Tests");
        }
        params.distinguished_name = dn;
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn device_id_matches_known_sha256_vector() {
        // FIPS 180-2 test vector: SHA-256("abc").
        let id = DeviceId::from_cert_der(b"abc");
        let expected = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(id.to_hex(), expected);
        assert_eq!(id.to_string(), expected);
        assert_eq!(format!("{id:?}"), "DeviceId(ba7816bf…)");
        // SHA-256 of the empty input.
        assert_eq!(
            DeviceId::from_cert_der(b"").to_hex(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn device_id_of_cert_is_sha256_of_der() {
        let der = cert_with_cn(Some("dev-1"));
        let expected: [u8; 32] = Sha256::digest(&der).into();
        assert_eq!(DeviceId::from_cert_der(&der).0, expected);
    }

    #[test]
    fn parse_hex_edge_cases() {
        let lower = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        let id = DeviceId::parse_hex(lower).unwrap();
        assert_eq!(DeviceId::parse_hex(&lower.to_uppercase()), Some(id));
        assert_eq!(id.to_hex(), lower);
        assert_eq!(DeviceId::parse_hex(""), None);
        assert_eq!(DeviceId::parse_hex(&lower[..63]), None);
        assert_eq!(DeviceId::parse_hex(&format!("{lower}0")), None);
        assert_eq!(DeviceId::parse_hex(&format!("{}g", &lower[..63])), None);
        assert_eq!(DeviceId::parse_hex(&format!(" {}", &lower[..63])), None);
        // 64 bytes but multi-byte chars: must not panic.
        assert_eq!(DeviceId::parse_hex(&"é".repeat(32)), None);
    }

    #[test]
    fn common_name_and_fallback() {
        let der = cert_with_cn(Some("thing-42"));
        assert_eq!(common_name(&der).as_deref(), Some("thing-42"));
        let ident = Identity::from_cert_der(&der);
        assert_eq!(ident.thing_name, "thing-42");
        assert_eq!(ident.cert_der, der);

        let der = cert_with_cn(None);
        assert_eq!(common_name(&der), None);
        let ident = Identity::from_cert_der(&der);
        assert_eq!(ident.thing_name, ident.device_id.to_hex());

        assert_eq!(common_name(b"not a certificate"), None);
        let junk = Identity::from_cert_der(b"not a certificate");
        assert!(!junk.valid_at(0) && !junk.valid_at(1_800_000_000));
    }

    #[test]
    fn thing_name_rule() {
        let id = DeviceId([0xab; 32]);
        let hex = id.to_hex();
        for ok in ["thing-42", "a", "A:b_c-9", &"x".repeat(128), &hex] {
            assert_eq!(thing_name_for(Some(ok), &id), ok, "{ok:?}");
        }
        let long = "x".repeat(129);
        let other = DeviceId([0xcd; 32]).to_hex();
        let ten_kb = "a".repeat(10 * 1024);
        for bad in [
            "+",
            "#",
            "a/b",
            "$SYS",
            "a\0b",
            "",
            "é",
            "\u{202e}abc",
            "a b",
            "a.b",
            &long,
            &ten_kb,
            &other,
        ] {
            assert_eq!(thing_name_for(Some(bad), &id), hex, "{bad:?}");
        }
        assert_eq!(thing_name_for(None, &id), hex);
        // A CN spelling another device's id in upper case is a distinct, valid name.
        assert_eq!(
            thing_name_for(Some(&other.to_uppercase()), &id),
            other.to_uppercase()
        );
    }

    #[test]
    fn templates_fill_one_pass_with_safe_values() {
        let id = DeviceId([0xab; 32]);
        let hex = id.to_hex();
        assert_eq!(
            fill_template("t/{thing_name}/{cn}/{device_id}/#", "dev", &id),
            format!("t/dev/dev/{hex}/#")
        );
        // Unknown or broken placeholders stay literal; inserted text is not re-read.
        assert_eq!(fill_template("{x}{cn", "d", &id), "{x}{cn");
        assert_eq!(fill_template("a{{cn}}", "d", &id), "a{d}");
        for bad in ["+", "#", "a/b", "$SYS", "a\0b", "{device_id}", ""] {
            assert_eq!(
                fill_template("t/{cn}", bad, &id),
                format!("t/{hex}"),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn display_cn_is_escaped_and_bounded() {
        assert_eq!(display_cn("a\0b\u{202e}"), "a\\0b\\u{202e}");
        let shown = display_cn(&"x".repeat(10_000));
        assert_eq!(shown.chars().count(), 65);
        assert!(shown.ends_with('…'));
    }

    #[test]
    fn hostile_cns_in_certificates() {
        for cn in ["+", "a/b", "a\0b", "\u{202e}evil", &"a".repeat(10 * 1024)] {
            let der = cert_with_cn(Some(cn));
            assert_eq!(common_name(&der).as_deref(), Some(cn), "{cn:?}");
            let ident = Identity::from_cert_der(&der);
            assert_eq!(ident.thing_name, ident.device_id.to_hex(), "{cn:?}");
        }
    }

    #[test]
    fn validity_period() {
        let ident = Identity::from_cert_der(&cert_with_cn(Some("v")));
        // rcgen's default validity: 1975-01-01 to 4096-01-01.
        assert!(ident.valid_at(1_800_000_000));
        assert!(!ident.valid_at(100_000_000));
    }

    #[test]
    fn pem_round_trip() {
        let der = cert_with_cn(Some("pem"));
        let pem = der_to_pem(&der);
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----\n"));
        assert!(pem.lines().all(|l| l.len() <= 64));
        assert_eq!(cert_pem_to_der(&pem).unwrap(), der);
        let with_key =
            format!("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n{pem}");
        assert_eq!(cert_pem_to_der(&with_key).unwrap(), der);
        assert!(cert_pem_to_der("garbage").is_err());
    }
}
