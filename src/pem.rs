//! PEM files, read one way for every TLS configuration the lobby makes: the device listener's
//! certificate, key, client CAs and CRLs (`edge::tls`), and a bridge tenant's upstream client
//! (`client_config`, also used to check a tenant's files when it is created).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};

/// A file that could not be read as what it should hold.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}: {message}", path.display())]
pub struct PemError {
    pub path: PathBuf,
    pub message: String,
}

impl PemError {
    pub fn new(path: &Path, e: impl std::fmt::Display) -> Self {
        Self {
            path: path.to_owned(),
            message: e.to_string(),
        }
    }
}

/// Every CERTIFICATE in the file, in order; an error when there is none.
pub fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| PemError::new(path, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| PemError::new(path, e))?;
    if certs.is_empty() {
        return Err(PemError::new(path, "no CERTIFICATE in file"));
    }
    Ok(certs)
}

/// The file's private key (PKCS#8, PKCS#1 or SEC1).
pub fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, PemError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| PemError::new(path, e))
}

/// Every X509 CRL in a PEM file.
pub fn crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, PemError> {
    CertificateRevocationListDer::pem_file_iter(path)
        .map_err(|e| PemError::new(path, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| PemError::new(path, e))
}

/// Which of a client configuration's three files failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientFile {
    Ca,
    Cert,
    Key,
}

impl ClientFile {
    /// The settings field that names the file (`ca`, `cert`, `key`).
    pub fn field(self) -> &'static str {
        match self {
            Self::Ca => "ca",
            Self::Cert => "cert",
            Self::Key => "key",
        }
    }
}

/// A client configuration's file that failed: `<field> <path>: <message>`.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{} {error}", file.field())]
pub struct ClientConfigError {
    pub file: ClientFile,
    pub error: PemError,
}

/// The CA certificates of `path` as a root store (what a TLS client trusts).
pub fn roots(path: &Path) -> Result<rustls::RootCertStore, PemError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(path)? {
        roots.add(c).map_err(|e| PemError::new(path, e))?;
    }
    Ok(roots)
}

/// A TLS client that trusts the CAs of `ca` and authenticates with the chain of `cert` and
/// the key of `key` (which must match it).
pub fn client_config(
    ca: &Path,
    cert: &Path,
    key: &Path,
) -> Result<Arc<rustls::ClientConfig>, ClientConfigError> {
    client_config_files(ca, cert, key).map_err(|(file, error)| ClientConfigError { file, error })
}

fn client_config_files(
    ca: &Path,
    cert: &Path,
    key: &Path,
) -> Result<Arc<rustls::ClientConfig>, (ClientFile, PemError)> {
    let roots = roots(ca).map_err(|e| (ClientFile::Ca, e))?;
    let chain = certs(cert).map_err(|e| (ClientFile::Cert, e))?;
    let private = private_key(key).map_err(|e| (ClientFile::Key, e))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| (ClientFile::Key, PemError::new(key, e)))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, private)
        .map_err(|e| (ClientFile::Key, PemError::new(key, e)))?;
    Ok(Arc::new(config))
}
