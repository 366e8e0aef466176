//! TLS for the device edge: the server certificate, the manufacturing CAs devices must chain
//! to, optional CRLs, and a client verifier that also refuses revoked devices.
//!
//! Crypto is aws-lc-rs, rustls' default provider and the one the AWS SDK brings anyway, so the
//! binary carries one implementation; it is as fast as ring for P-256. The provider is always
//! named explicitly: with ring also in the graph (test clients) `ServerConfig::builder()` would
//! panic.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::aws_lc_rs;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig,
    SignatureScheme,
};

use crate::claims::cache::ClaimsCache;
use crate::config::TlsConfig;
use crate::device::{DeviceId, Identity};
use crate::pem::{self, PemError};

/// Errors building the TLS configuration; each names the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls: cannot read {path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("tls: {0}")]
    Config(String),
}

impl From<PemError> for TlsError {
    fn from(e: PemError) -> Self {
        TlsError::File {
            path: e.path,
            message: e.message,
        }
    }
}

fn file_err(path: &Path, e: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.to_owned(),
        message: e.to_string(),
    }
}

/// What the edge trusts now: the TLS configuration new connections get, and the verifier that
/// re-checks live connections after a reload (SIGHUP).
#[derive(Debug)]
pub struct Trust {
    pub server_config: Arc<ServerConfig>,
    pub verifier: Arc<dyn ClientCertVerifier>,
    /// Bumped on every reload, so a session re-checks its certificate once per change.
    pub generation: u64,
}

impl Trust {
    /// Is a device still trusted: its leaf chained (through the intermediates it presented, or
    /// those configured) to a configured CA, every certificate of the path in its validity
    /// period and not on a CRL, and the device not revoked through the API?
    pub fn still_trusts(&self, identity: &Identity) -> bool {
        let leaf = CertificateDer::from(identity.cert_der.as_slice());
        self.verifier
            .verify_client_cert(&leaf, &identity.intermediates, UnixTime::now())
            .is_ok()
    }
}

/// Builds the edge's trust from `[tls]`; `generation` numbers successive reloads.
pub fn trust(tls: &TlsConfig, cache: ClaimsCache, generation: u64) -> Result<Trust, TlsError> {
    let (server_config, verifier) = server_config(tls, cache)?;
    Ok(Trust {
        server_config,
        verifier,
        generation,
    })
}

/// aws-lc with the SHA-256 suites first (the server's order decides, see `server_config`).
/// Device certificates are P-256, 128-bit security; AES-256 with SHA-384 adds none over that,
/// and costs more: aws-lc has SHA-256 in hardware (SHA-NI) on x86 but runs SHA-512 in scalar
/// code on AMD CPUs, 12% of a full connect's CPU under an OpenSSL client (which asks for
/// AES-256 first) by `perf`. Every suite of the default provider stays offered.
pub fn device_provider() -> rustls::crypto::CryptoProvider {
    let mut provider = aws_lc_rs::default_provider();
    // Stable: TLS 1.3 before 1.2 as before, and within each, SHA-256 suites before SHA-384.
    provider.cipher_suites.sort_by_key(|s| {
        let (tls12, hash) = match s {
            rustls::SupportedCipherSuite::Tls12(t) => (true, t.common.hash_provider.algorithm()),
            rustls::SupportedCipherSuite::Tls13(t) => (false, t.common.hash_provider.algorithm()),
        };
        (tls12, hash != rustls::crypto::hash::HashAlgorithm::SHA256)
    });
    provider
}

/// Builds the edge's `ServerConfig` from `[tls]`. Revocation via the API is read from `cache`.
fn server_config(
    tls: &TlsConfig,
    cache: ClaimsCache,
) -> Result<(Arc<ServerConfig>, Arc<dyn ClientCertVerifier>), TlsError> {
    let provider = Arc::new(device_provider());
    let chain = pem::certs(&tls.cert)?;
    let key = pem::private_key(&tls.key)?;

    let cas = ClientCas::load(&tls.client_cas)?;
    let mut roots = RootCertStore::empty();
    for (cert, path) in &cas.anchors {
        roots.add(cert.clone()).map_err(|e| file_err(path, e))?;
    }
    let crls = load_crls(&tls.crl_dir)?;
    let webpki = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .with_crls(crls)
        // A CRL revokes what it lists, at every level of the chain (a root's CRL revoking an
        // intermediate refuses every device under it); a CA without a CRL in `crl_dir` is not
        // refused for that (several factories, not all of them publishing CRLs).
        .allow_unknown_revocation_status()
        .build()
        .map_err(|e| TlsError::Config(format!("client verifier: {e}")))?;
    let verifier: Arc<dyn ClientCertVerifier> = Arc::new(DeviceVerifier {
        hints: cas.hints(webpki.root_hint_subjects()),
        inner: webpki,
        intermediates: cas.intermediates,
        cache,
    });
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier.clone())
        .with_single_cert(chain, key)
        .map_err(|e| file_err(&tls.key, format!("certificate and key do not match: {e}")))?;
    // The lobby's suite order, not the device's (`device_provider`).
    config.ignore_client_order = true;
    // The device record layer (`edge::record`) takes the traffic keys over after the handshake.
    config.enable_secret_extraction = true;
    config.key_log = super::record::key_log();
    // No server-side session cache: resumption, when on, is by stateless tickets only.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    if tls.resumption {
        // A resumed session skips certificate verification. What keeps SPEC §2 true:
        // - every trust build (start, SIGHUP) makes a new ticket key, so a ticket from before
        //   a CA or CRL change does not decrypt and the device gets a full handshake;
        // - the edge checks revocation and the certificate's validity period again for a
        //   resumed session (`edge::listener`), and the claim state is read per connect anyway.
        config.ticketer = aws_lc_rs::Ticketer::new()
            .map_err(|e| TlsError::Config(format!("session tickets: {e}")))?;
        // One ticket per full handshake: a device reconnects from one place at a time.
        config.send_tls13_tickets = 1;
    } else {
        config.send_tls13_tickets = 0;
    }
    // MQTT's ALPN names (`x-amzn-mqtt-ca` is what the AWS IoT Device SDKs offer on 443) and
    // `http/1.1` for MQTT over WebSockets. A client that offers none is served too (MQTT or
    // WebSocket, by its first bytes); one that offers only others is refused.
    config.alpn_protocols = MQTT_ALPN.iter().map(|p| p.to_vec()).collect();
    Ok((Arc::new(config), verifier))
}

/// The ALPN protocols the MQTT listeners select, in the server's order of preference.
pub const MQTT_ALPN: [&[u8]; 3] = [b"x-amzn-mqtt-ca", b"mqtt", b"http/1.1"];

/// The certificates of `tls.client_cas`, sorted by the part they play in path building.
///
/// A factory's root may be configured with its intermediates, or (root kept offline) the
/// intermediates alone. A configured certificate whose issuer is also configured is an
/// *intermediate*: it completes the chain of devices that send only their leaf, but is not
/// trusted on its own, so the CRL of the CA above it still applies to it. Every other one
/// (a self-signed root, or an intermediate whose issuer is not configured) is a trust anchor.
struct ClientCas {
    anchors: Vec<(CertificateDer<'static>, PathBuf)>,
    intermediates: Vec<CertificateDer<'static>>,
}

impl ClientCas {
    fn load(paths: &[PathBuf]) -> Result<Self, TlsError> {
        // (certificate, its file, subject DER, issuer DER)
        let mut all = Vec::new();
        for path in paths {
            for cert in pem::certs(path)? {
                let (_, x509) = x509_parser::parse_x509_certificate(cert.as_ref())
                    .map_err(|e| file_err(path, format!("not an X.509 certificate: {e}")))?;
                let subject = x509.subject().as_raw().to_vec();
                let issuer = x509.issuer().as_raw().to_vec();
                all.push((cert, path.clone(), subject, issuer));
            }
        }
        let issued_by_configured = |subject: &[u8], issuer: &[u8]| {
            subject != issuer && all.iter().any(|(_, _, s, _)| s.as_slice() == issuer)
        };
        let mut cas = ClientCas {
            anchors: Vec::new(),
            intermediates: Vec::new(),
        };
        for (cert, path, subject, issuer) in &all {
            if issued_by_configured(subject, issuer) {
                cas.intermediates.push(cert.clone());
            } else {
                cas.anchors.push((cert.clone(), path.clone()));
            }
        }
        Ok(cas)
    }

    /// The CA names a device is told it may chain to: the anchors' and the intermediates'
    /// (a client choosing among several certificates may look for its issuer's name).
    fn hints(&self, anchors: &[DistinguishedName]) -> Vec<DistinguishedName> {
        let mut hints = anchors.to_vec();
        for cert in &self.intermediates {
            if let Ok((_, x509)) = x509_parser::parse_x509_certificate(cert.as_ref()) {
                hints.push(DistinguishedName::from(x509.subject().as_raw().to_vec()));
            }
        }
        hints
    }
}

/// Reads every `*.pem`, `*.crl` and `*.der` file of `dir` (none when `dir` is empty).
fn load_crls(dir: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    if dir.as_os_str().is_empty() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| file_err(dir, e))?;
    for entry in entries {
        let path = entry.map_err(|e| file_err(dir, e))?.path();
        match path.extension().and_then(|e| e.to_str()) {
            Some("pem") => out.extend(pem::crls(&path)?),
            Some("crl" | "der") => {
                let der = std::fs::read(&path).map_err(|e| file_err(&path, e))?;
                out.push(CertificateRevocationListDer::from(der));
            }
            _ => {}
        }
    }
    Ok(out)
}

/// WebPKI verification against the manufacturing CAs, then the lobby's own revocation list
/// (devices revoked through the API), so a revoked device fails at the handshake.
#[derive(Debug)]
struct DeviceVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    /// Configured intermediates (see [`ClientCas`]), offered to path building after the ones
    /// the device sent.
    intermediates: Vec<CertificateDer<'static>>,
    hints: Vec<DistinguishedName>,
    cache: ClaimsCache,
}

impl ClientCertVerifier for DeviceVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = if self.intermediates.is_empty() {
            self.inner
                .verify_client_cert(end_entity, intermediates, now)?
        } else {
            let mut all: Vec<CertificateDer<'_>> = intermediates.to_vec();
            all.extend(self.intermediates.iter().cloned());
            self.inner.verify_client_cert(end_entity, &all, now)?
        };
        if self.cache.is_revoked(&DeviceId::from_cert_der(end_entity)) {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A metric label for a failed handshake.
pub fn failure_reason(e: &std::io::Error) -> &'static str {
    let Some(tls) = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    else {
        return "io";
    };
    match tls {
        rustls::Error::InvalidCertificate(CertificateError::Revoked) => "revoked",
        rustls::Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        ) => "expired",
        rustls::Error::InvalidCertificate(_) => "bad_certificate",
        rustls::Error::NoCertificatesPresented => "no_certificate",
        _ => "protocol",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sha256_suites_come_first_and_every_default_suite_stays() {
        let suites: Vec<_> = device_provider()
            .cipher_suites
            .iter()
            .map(|s| s.suite())
            .collect();
        let mut default: Vec<_> = aws_lc_rs::default_provider()
            .cipher_suites
            .iter()
            .map(|s| s.suite())
            .collect();
        assert_eq!(suites[0], rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
        let tls13_sha384 = suites
            .iter()
            .position(|s| *s == rustls::CipherSuite::TLS13_AES_256_GCM_SHA384)
            .unwrap();
        let chacha = suites
            .iter()
            .position(|s| *s == rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256)
            .unwrap();
        assert!(chacha < tls13_sha384);
        let mut sorted = suites.clone();
        sorted.sort_by_key(|s| u16::from(*s));
        default.sort_by_key(|s| u16::from(*s));
        assert_eq!(sorted, default);
    }
}
