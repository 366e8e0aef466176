//! Device identities: certificates made in memory from the dev CA (in parallel, before the run)
//! or loaded from `*.pem` + `*.key` pairs, plus the device id and claim code of SPEC §2–§3.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use hmac::{Hmac, Mac};
use rcgen::{
    CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256,
};
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};

/// One simulated device: its MQTT client id, its identity and its TLS client credentials.
pub struct Device {
    /// MQTT client id: `lt-<index>` or the file stem of its certificate.
    pub name: String,
    /// SHA-256 of the leaf certificate DER (SPEC §2).
    pub device_id: [u8; 32],
    /// Leaf certificate chain and signing key, ready for rustls.
    pub key: Arc<CertifiedKey>,
}

impl Device {
    /// The device id as 64 lowercase hex characters.
    pub fn id_hex(&self) -> String {
        hex::encode(self.device_id)
    }
}

fn device_from(
    name: String,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    provider: &CryptoProvider,
) -> Result<Device> {
    let leaf = chain
        .first()
        .context("certificate file holds no certificate")?;
    let device_id: [u8; 32] = Sha256::digest(leaf.as_ref()).into();
    let signing = provider
        .key_provider
        .load_private_key(key)
        .with_context(|| format!("device {name}: unusable private key"))?;
    Ok(Device {
        name,
        device_id,
        key: Arc::new(CertifiedKey::new(chain, signing)),
    })
}

fn make_one(
    index: usize,
    issuer: &Issuer<'_, KeyPair>,
    provider: &CryptoProvider,
) -> Result<Device> {
    let name = format!("lt-{index}");
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, name.as_str());
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, issuer)?;
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    device_from(name, vec![cert.der().clone()], der, provider)
}

/// Makes `count` device certificates (ECDSA P-256, CN `lt-<index>`) signed by the CA, on all
/// cores, and reports the time taken on stderr.
pub fn generate(
    ca_pem: &Path,
    ca_key: &Path,
    count: usize,
    provider: &CryptoProvider,
) -> Result<Vec<Device>> {
    let ca_der = CertificateDer::from_pem_file(ca_pem)
        .with_context(|| format!("reading CA certificate {}", ca_pem.display()))?;
    let key_der = PrivateKeyDer::from_pem_file(ca_key)
        .with_context(|| format!("reading CA key {}", ca_key.display()))?;
    let ca_key = KeyPair::try_from(&key_der).context("CA key: unsupported key type")?;
    let issuer = Issuer::from_ca_cert_der(&ca_der, ca_key).context("parsing CA certificate")?;

    let started = Instant::now();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = count.div_ceil(threads).max(1);
    let parts: Vec<Result<Vec<Device>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..count)
            .step_by(chunk)
            .map(|start| {
                let issuer = &issuer;
                scope.spawn(move || {
                    (start..(start + chunk).min(count))
                        .map(|i| make_one(i, issuer, provider))
                        .collect()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| bail!("generator thread panicked"))
            })
            .collect()
    });
    let mut devices = Vec::with_capacity(count);
    for part in parts {
        devices.extend(part?);
    }
    eprintln!(
        "generated {count} device certificates in {:.2?} on {threads} threads",
        started.elapsed()
    );
    Ok(devices)
}

/// Loads up to `limit` devices from `*.pem` + `*.key` pairs in `dir` (sorted by name; `ca` and
/// `server` pairs are skipped so that `certs/dev` itself can be given).
pub fn load_dir(
    dir: &Path,
    limit: Option<usize>,
    provider: &CryptoProvider,
) -> Result<Vec<Device>> {
    let mut stems: Vec<String> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|entry| {
            let path = entry.ok()?.path();
            let stem = path.file_stem()?.to_str()?.to_owned();
            let is_pair = path.extension()? == "pem" && path.with_extension("key").exists();
            (is_pair && stem != "ca" && stem != "server").then_some(stem)
        })
        .collect();
    stems.sort();
    if let Some(limit) = limit {
        if stems.len() < limit {
            bail!(
                "--devices {limit} but {} has only {} certificate/key pairs",
                dir.display(),
                stems.len()
            );
        }
        stems.truncate(limit);
    }
    stems
        .into_iter()
        .map(|stem| {
            let (pem, key) = (
                dir.join(format!("{stem}.pem")),
                dir.join(format!("{stem}.key")),
            );
            load_pair(stem, &pem, &key, provider)
        })
        .collect()
}

/// Loads one identity from a certificate chain file and its key file (both PEM).
pub fn load_pair(
    name: String,
    pem: &Path,
    key_path: &Path,
    provider: &CryptoProvider,
) -> Result<Device> {
    let chain = CertificateDer::pem_file_iter(pem)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("reading {}", pem.display()))?;
    let key = PrivateKeyDer::from_pem_file(key_path)
        .with_context(|| format!("reading {}", key_path.display()))?;
    device_from(name, chain, key, provider)
}

/// Reads a claim key file: 64 hex characters (surrounding whitespace ignored) = 32 bytes.
pub fn read_claim_key(path: &Path) -> Result<[u8; 32]> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading claim key {}", path.display()))?;
    let mut key = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut key)
        .with_context(|| format!("{}: expected 64 hex characters", path.display()))?;
    Ok(key)
}

/// The claim code `LOBBY1:<device_id>:<secret>` of SPEC §3.
pub fn claim_code(key: &[u8; 32], device_id: &[u8; 32]) -> String {
    // HMAC accepts keys of any length, so this cannot fail; fall back to an empty code anyway.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
        return String::new();
    };
    mac.update(device_id);
    let tag = mac.finalize().into_bytes();
    let secret = data_encoding::BASE32_NOPAD.encode(&tag[..16]);
    format!("LOBBY1:{}:{secret}", hex::encode(device_id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claim_code_shape() {
        let code = claim_code(&[7u8; 32], &[1u8; 32]);
        let parts: Vec<&str> = code.split(':').collect();
        assert_eq!(parts[0], "LOBBY1");
        assert_eq!(parts[1], "01".repeat(32));
        assert_eq!(parts[2].len(), 26); // 16 bytes in unpadded base32
        assert!(parts[2]
            .chars()
            .all(|c| c.is_ascii_uppercase() || ('2'..='7').contains(&c)));
    }
}
