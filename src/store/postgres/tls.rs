//! TLS to PostgreSQL with rustls, as libpq's `sslmode` and `sslrootcert` ask for it.
//!
//! tokio-postgres knows `disable`, `prefer` and `require` and no certificate checks, so this
//! store takes both keys out of the URL itself and hands tokio-postgres a connector that
//! verifies what the mode says:
//!
//! | `sslmode` | TLS | the server's certificate |
//! |---|---|---|
//! | `disable` | never | — |
//! | `prefer` (default, as in libpq) | when the server offers it | not checked (as libpq), or as `verify-ca` with `sslrootcert` |
//! | `require` | always | not checked (as libpq), or as `verify-ca` with `sslrootcert` |
//! | `verify-ca` | always | chains to `sslrootcert` |
//! | `verify-full` | always | chains to `sslrootcert` and names the host of the URL |
//!
//! Only `verify-full` proves which server answered; managed databases (RDS, Aurora, Cloud SQL)
//! publish the CA bundle to give as `sslrootcert`. The handshake's own signature is checked in
//! every mode.

use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::config::SslMode;
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};

use crate::store::StoreError;

/// libpq's `sslmode` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl Mode {
    fn parse(value: &str) -> Result<Self, StoreError> {
        Ok(match value {
            "disable" => Self::Disable,
            "allow" | "prefer" => Self::Prefer,
            "require" => Self::Require,
            "verify-ca" => Self::VerifyCa,
            "verify-full" => Self::VerifyFull,
            other => {
                return Err(StoreError::Backend(format!(
                    "store.url: sslmode={other:?} is not one of disable, prefer, require, \
                     verify-ca, verify-full"
                )))
            }
        })
    }

    /// What tokio-postgres is told: whether TLS is tried and whether it is required.
    pub fn ssl_mode(self) -> SslMode {
        match self {
            Self::Disable => SslMode::Disable,
            Self::Prefer => SslMode::Prefer,
            Self::Require | Self::VerifyCa | Self::VerifyFull => SslMode::Require,
        }
    }
}

/// What the URL asks of TLS, with the URL as tokio-postgres may read it (both keys taken out).
#[derive(Debug)]
pub struct Ask {
    pub mode: Mode,
    pub rootcert: Option<PathBuf>,
    pub url: String,
}

/// Takes `sslmode` and `sslrootcert` out of `url`'s query string.
pub fn split_url(url: &str) -> Result<Ask, StoreError> {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let (mut mode, mut rootcert) = (Mode::Prefer, None);
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("sslmode", v)) => mode = Mode::parse(v)?,
            Some(("sslrootcert", v)) => rootcert = Some(PathBuf::from(percent_decoded(v))),
            _ => kept.push(pair),
        }
    }
    let url = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok(Ask {
        mode,
        rootcert,
        url,
    })
}

/// `%2F` and friends in a path given in a URL.
fn percent_decoded(v: &str) -> String {
    let bytes = v.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        match (bytes[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The connector for `ask`: rustls with the verifier its mode needs.
pub fn connector(ask: &Ask) -> Result<RustlsConnect, StoreError> {
    if ask.mode == Mode::Disable {
        return Ok(RustlsConnect { config: None });
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let roots =
        match (&ask.rootcert, ask.mode) {
            (Some(path), _) => Some(crate::pem::roots(path).map_err(|e| {
                StoreError::Backend(format!("store.url sslrootcert {}: {e}", path.display()))
            })?),
            (None, Mode::VerifyCa | Mode::VerifyFull) => {
                return Err(StoreError::Backend(format!(
                "store.url: sslmode={} needs sslrootcert=<file> (the CA bundle that signed the \
                 server's certificate)",
                if ask.mode == Mode::VerifyCa { "verify-ca" } else { "verify-full" }
            )))
            }
            (None, _) => None,
        };
    let verifier: Arc<dyn ServerCertVerifier> = match roots {
        None => Arc::new(Unverified(provider.clone())),
        Some(roots) => {
            let webpki =
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(|e| StoreError::Backend(format!("store.url sslrootcert: {e}")))?;
            if ask.mode == Mode::VerifyFull {
                webpki
            } else {
                Arc::new(AnyName(webpki))
            }
        }
    };
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| StoreError::Backend(format!("postgres TLS: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(RustlsConnect {
        config: Some(Arc::new(config)),
    })
}

/// `verify-ca`: the chain is checked, the name is not (libpq's meaning).
#[derive(Debug)]
struct AnyName(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `prefer`/`require` without `sslrootcert`: encrypted, the certificate taken as it comes (as
/// libpq does); the handshake signature is still checked against it.
#[derive(Debug)]
struct Unverified(Arc<CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// tokio-postgres' TLS connector over rustls (`None`: `sslmode=disable`, never asked).
#[derive(Clone, Debug)]
pub struct RustlsConnect {
    config: Option<Arc<ClientConfig>>,
}

impl<S> MakeTlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = Stream<S>;
    type TlsConnect = Connect;
    type Error = io::Error;

    /// Asked for every connection, TLS or not (`sslmode=disable` never uses the answer).
    fn make_tls_connect(&mut self, host: &str) -> Result<Connect, io::Error> {
        let config = self.config.clone();
        let name = ServerName::try_from(host.to_owned()).map_err(|e| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("host {host:?}: {e}"))
        })?;
        Ok(Connect { config, name })
    }
}

/// One connection's TLS handshake.
pub struct Connect {
    config: Option<Arc<ClientConfig>>,
    name: ServerName<'static>,
}

impl<S> TlsConnect<S> for Connect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = Stream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Stream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let config = self
                .config
                .ok_or_else(|| io::Error::other("TLS asked for with sslmode=disable"))?;
            let connector = tokio_rustls::TlsConnector::from(config);
            Ok(Stream(connector.connect(self.name, stream).await?))
        })
    }
}

/// A TLS stream to PostgreSQL.
pub struct Stream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Stream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Stream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for Stream<S> {
    /// No channel binding: SCRAM then runs without `-PLUS` (the server's signature hash would
    /// have to be matched per certificate to bind correctly).
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn the_ssl_keys_are_taken_out_of_the_url() {
        let ask =
            split_url("postgres://u@h:5433/db?sslmode=verify-full&application_name=x&sslrootcert=%2Fetc%2Fca.pem")
                .unwrap();
        assert_eq!(ask.mode, Mode::VerifyFull);
        assert_eq!(ask.rootcert.as_deref(), Some(Path::new("/etc/ca.pem")));
        assert_eq!(ask.url, "postgres://u@h:5433/db?application_name=x");
        let plain = split_url("postgres://u@h/db").unwrap();
        assert_eq!(
            (plain.mode, plain.url.as_str()),
            (Mode::Prefer, "postgres://u@h/db")
        );
        let err = split_url("postgres://u@h/db?sslmode=sometimes")
            .unwrap_err()
            .to_string();
        assert!(err.contains("sslmode=\"sometimes\""), "{err}");
    }

    #[test]
    fn verifying_modes_need_a_root_certificate() {
        for mode in ["verify-ca", "verify-full"] {
            let ask = split_url(&format!("postgres://u@h/db?sslmode={mode}")).unwrap();
            let err = connector(&ask).err().unwrap().to_string();
            assert!(err.contains("needs sslrootcert"), "{err}");
        }
    }
}
