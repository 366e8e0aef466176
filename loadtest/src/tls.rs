//! TLS client configuration: one base `ClientConfig` (roots, versions, resumption policy) and a
//! cheap per-device copy that presents that device's own certificate.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use rustls::client::{ResolvesClientCert, Resumption};
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};

/// Which TLS versions the client offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Versions {
    /// TLS 1.3 and 1.2 (rustls' safe defaults).
    Both,
    /// TLS 1.3 only.
    Tls13,
    /// TLS 1.2 only.
    Tls12,
}

/// The aws-lc-rs provider; never rustls' process default (ring is also in the graph).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Presents exactly one device's certificate.
#[derive(Debug)]
struct DeviceCert(Arc<CertifiedKey>);

impl ResolvesClientCert for DeviceCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Shared TLS settings; [`TlsClient::for_device`] makes a device's config from them.
pub struct TlsClient {
    base: ClientConfig,
    resume: bool,
    /// Name checked against the server certificate (and sent as SNI).
    pub server_name: ServerName<'static>,
}

impl TlsClient {
    /// Builds the base config trusting the CA certificates in `server_ca`.
    pub fn new(
        provider: Arc<CryptoProvider>,
        server_ca: &Path,
        server_name: &str,
        versions: Versions,
        resume: bool,
    ) -> Result<Self> {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(server_ca)
            .with_context(|| format!("reading {}", server_ca.display()))?
        {
            roots
                .add(cert.with_context(|| format!("parsing {}", server_ca.display()))?)
                .context("adding server CA")?;
        }
        let builder = ClientConfig::builder_with_provider(provider);
        let builder = match versions {
            Versions::Both => builder.with_safe_default_protocol_versions(),
            Versions::Tls13 => builder.with_protocol_versions(&[&rustls::version::TLS13]),
            Versions::Tls12 => builder.with_protocol_versions(&[&rustls::version::TLS12]),
        }
        .context("TLS versions not supported by the provider")?;
        let mut base = builder.with_root_certificates(roots).with_no_client_auth();
        base.resumption = Resumption::disabled();
        let server_name = ServerName::try_from(server_name.to_owned())
            .with_context(|| format!("invalid --server-name {server_name}"))?;
        Ok(Self {
            base,
            resume,
            server_name,
        })
    }

    /// Whether devices may resume TLS sessions (`--resume`).
    pub fn resumes(&self) -> bool {
        self.resume
    }

    /// A config presenting `key`. With resumption on, each device gets its own one-entry session
    /// cache: a shared cache would let one device resume as another.
    pub fn for_device(&self, key: &Arc<CertifiedKey>) -> Arc<ClientConfig> {
        let mut config = self.base.clone();
        config.client_auth_cert_resolver = Arc::new(DeviceCert(key.clone()));
        if self.resume {
            config.resumption = Resumption::in_memory_sessions(1);
        }
        Arc::new(config)
    }
}
