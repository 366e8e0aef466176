//! Development PKI: a manufacturing CA, a broker server certificate, device
//! certificates, the claim key and the admin token, all ECDSA P-256 via rcgen.
//!
//! This is for development and tests; production CAs live elsewhere.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, DnValue,
    ExtendedKeyUsagePurpose, IsCa, KeyIdMethod, KeyPair, KeyUsagePurpose, SerialNumber,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use time::{Duration, OffsetDateTime};
use x509_parser::extensions::ParsedExtension;

use crate::claims::codes::ClaimKey;

mod crl;

/// Common name of the development manufacturing CA.
pub const CA_COMMON_NAME: &str = "Lobby Dev Manufacturing CA";

/// Errors raised while creating or using the development PKI.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// `init` found an existing CA key and will not replace it.
    #[error("{0} already exists; refusing to replace an existing CA")]
    CaExists(PathBuf),
    /// A file that would be written already exists.
    #[error("{0} already exists; refusing to overwrite it")]
    FileExists(PathBuf),
    /// The device name is not `[A-Za-z0-9._-]{{1,64}}`.
    #[error("invalid device name {0:?}: use 1-64 characters from A-Z a-z 0-9 . _ -")]
    InvalidName(String),
    /// The CA certificate could not be parsed or used.
    #[error("invalid CA certificate: {0}")]
    InvalidCaCert(String),
    /// The CA private key does not belong to the CA certificate.
    #[error("CA private key does not match the CA certificate")]
    KeyMismatch,
    /// rcgen failed to generate a key or certificate.
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What `init` creates.
#[derive(Clone, Debug)]
pub struct InitOptions {
    /// Directory to create the files in (created if missing).
    pub dir: PathBuf,
    /// Number of device certificates to issue (`device-0001` ...).
    pub devices: usize,
}

/// The files `init` wrote, in the order written.
#[derive(Clone, Debug, Default)]
pub struct InitReport {
    /// Every path written.
    pub files: Vec<PathBuf>,
    /// The device certificate PEM paths among them.
    pub device_certs: Vec<PathBuf>,
}

/// A freshly issued certificate and its private key.
#[derive(Clone)]
pub struct IssuedCert {
    /// Certificate, DER encoded.
    pub cert_der: Vec<u8>,
    /// Certificate, PEM encoded.
    pub cert_pem: String,
    /// PKCS#8 private key, PEM encoded.
    pub key_pem: String,
}

impl fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.cert_der.len();
        write!(f, "IssuedCert({n} DER bytes, key redacted)")
    }
}

/// A CA loaded in memory for signing device certificates (`Debug` omits the key).
#[derive(Debug)]
pub struct Ca {
    cert_pem: String,
    issuer: rcgen::Issuer<'static, KeyPair>,
}

/// A random positive 16-byte serial number.
fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

fn new_key() -> Result<KeyPair, PkiError> {
    Ok(KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?)
}

fn dn_with_cn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

/// Validity from one hour ago until `days` from now.
fn validity(days: i64) -> (OffsetDateTime, OffsetDateTime) {
    let now = OffsetDateTime::now_utc();
    (now - Duration::hours(1), now + Duration::days(days))
}

/// Leaf parameters shared by device and server certificates.
fn leaf_params(
    cn: &str,
    sans: Vec<String>,
    eku: ExtendedKeyUsagePurpose,
    (not_before, not_after): (OffsetDateTime, OffsetDateTime),
) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::new(sans)?;
    params.distinguished_name = dn_with_cn(cn);
    params.is_ca = IsCa::NoCa;
    params.serial_number = Some(random_serial());
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![eku];
    params.use_authority_key_identifier_extension = true;
    params.not_before = not_before;
    params.not_after = not_after;
    Ok(params)
}

/// CA parameters: CN `cn`, certificate and CRL signing, valid `years`.
fn ca_params(cn: &str, years: i64) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = dn_with_cn(cn);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.serial_number = Some(random_serial());
    (params.not_before, params.not_after) = validity(365 * years);
    params.key_identifier_method = KeyIdMethod::Sha256;
    Ok(params)
}

/// Builds a self-signed CA; returns it and its key PEM.
fn new_ca(cn: &str, years: i64) -> Result<(Ca, String), PkiError> {
    let key = new_key()?;
    let params = ca_params(cn, years)?;
    let cert_pem = params.self_signed(&key)?.pem();
    let key_pem = key.serialize_pem();
    let issuer = rcgen::Issuer::new(params, key);
    Ok((Ca { cert_pem, issuer }, key_pem))
}

/// Rebuilds the subject DN of a parsed certificate, keeping each value's
/// string type so issued certificates' issuer field matches byte for byte.
fn dn_from_x509(name: &x509_parser::x509::X509Name<'_>) -> Result<DistinguishedName, PkiError> {
    use x509_parser::der_parser::asn1_rs::Tag;
    let bad = |what: &str| PkiError::InvalidCaCert(format!("unsupported subject: {what}"));
    let mut dn = DistinguishedName::new();
    for attr in name.iter_attributes() {
        let oid: Vec<u64> = attr
            .attr_type()
            .iter()
            .ok_or_else(|| bad("attribute OID"))?
            .collect();
        let data = attr.attr_value().data;
        let text = std::str::from_utf8(data).map_err(|_| bad("non-UTF-8 value"))?;
        let value = match attr.attr_value().header.tag() {
            Tag::PrintableString => DnValue::PrintableString(text.try_into()?),
            Tag::Ia5String => DnValue::Ia5String(text.try_into()?),
            Tag::T61String => DnValue::TeletexString(text.try_into()?),
            Tag::Utf8String => DnValue::Utf8String(text.to_owned()),
            _ => return Err(bad("attribute string type")),
        };
        dn.push(DnType::from_oid(&oid), value);
    }
    Ok(dn)
}

impl Ca {
    /// Loads a CA from a certificate PEM file and a private key PEM file.
    pub fn load(cert_pem_path: &Path, key_pem_path: &Path) -> Result<Self, PkiError> {
        let cert_pem = std::fs::read_to_string(cert_pem_path).map_err(io_err(cert_pem_path))?;
        let key_pem = std::fs::read_to_string(key_pem_path).map_err(io_err(key_pem_path))?;
        Self::from_pem(&cert_pem, &key_pem)
    }

    /// Builds a CA from its certificate PEM and PKCS#8 private key PEM.
    ///
    /// Fails if the key does not match the certificate's public key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| PkiError::InvalidCaCert(e.to_string()))?;
        let (_, x509) = x509_parser::parse_x509_certificate(der.as_ref())
            .map_err(|e| PkiError::InvalidCaCert(e.to_string()))?;
        let key = KeyPair::from_pem(key_pem)?;
        if rcgen::PublicKeyData::subject_public_key_info(&key) != x509.public_key().raw {
            return Err(PkiError::KeyMismatch);
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = dn_from_x509(x509.subject())?;
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        // Issued certificates' AKI must equal the CA's SKI, whatever its method.
        params.key_identifier_method = x509
            .iter_extensions()
            .find_map(|ext| match ext.parsed_extension() {
                ParsedExtension::SubjectKeyIdentifier(ki) => Some(ki.0.to_vec()),
                _ => None,
            })
            .map_or(KeyIdMethod::Sha256, KeyIdMethod::PreSpecified);
        let issuer = rcgen::Issuer::new(params, key);
        let cert_pem = cert_pem.to_owned();
        Ok(Ca { cert_pem, issuer })
    }

    /// The CA certificate as PEM (as loaded or generated).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A device certificate with CN `name` (clientAuth), valid from one hour
    /// ago for ten years. `name` is used as-is as the CN.
    pub fn issue_device(&self, name: &str) -> Result<IssuedCert, PkiError> {
        let (not_before, not_after) = validity(365 * 10);
        self.issue_device_with_validity(name, not_before, not_after)
    }

    /// Like [`Ca::issue_device`] with explicit validity (e.g. expired certs).
    pub fn issue_device_with_validity(
        &self,
        name: &str,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<IssuedCert, PkiError> {
        let eku = ExtendedKeyUsagePurpose::ClientAuth;
        self.sign(&leaf_params(name, vec![], eku, (not_before, not_after))?)
    }

    /// An intermediate CA with CN `cn` signed by this CA (valid five years), as factories run
    /// them: the root stays offline and devices are issued by the intermediate. The returned
    /// `Ca` issues devices and CRLs; the `IssuedCert` is the intermediate's own certificate,
    /// which devices send after their leaf and this CA's CRL can revoke.
    pub fn issue_intermediate(&self, cn: &str) -> Result<(Ca, IssuedCert), PkiError> {
        let key = new_key()?;
        let params = ca_params(cn, 5)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        let issued = IssuedCert {
            cert_der: cert.der().to_vec(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        };
        let ca = Ca {
            cert_pem: issued.cert_pem.clone(),
            issuer: rcgen::Issuer::new(params, key),
        };
        Ok((ca, issued))
    }

    /// The broker's server certificate for localhost, valid for two years.
    pub fn issue_server(&self) -> Result<IssuedCert, PkiError> {
        let sans = ["localhost", "127.0.0.1", "::1"].map(String::from).to_vec();
        let eku = ExtendedKeyUsagePurpose::ServerAuth;
        self.sign(&leaf_params("localhost", sans, eku, validity(365 * 2))?)
    }

    fn sign(&self, params: &CertificateParams) -> Result<IssuedCert, PkiError> {
        let key = new_key()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedCert {
            cert_der: cert.der().to_vec(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// A stand-alone self-signed CA (valid ten years) for "untrusted
/// certificate" tests; issue devices from it with [`Ca::issue_device`].
pub fn throwaway_ca(cn: &str) -> Result<Ca, PkiError> {
    Ok(new_ca(cn, 10)?.0)
}

/// Writes a new file, failing if it exists; `secret` files get mode 0600 on unix.
fn write_new(path: &Path, contents: &str, secret: bool) -> Result<(), PkiError> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, if secret { 0o600 } else { 0o644 });
    #[cfg(not(unix))]
    let _ = secret;
    let mut file = opts.open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => PkiError::FileExists(path.to_path_buf()),
        _ => io_err(path)(e),
    })?;
    file.write_all(contents.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(io_err(path))
}

/// Writes `<dir>/<name>.pem` and `.key`; returns both paths.
fn write_pair(dir: &Path, name: &str, cert: &IssuedCert) -> Result<[PathBuf; 2], PkiError> {
    let pem = dir.join(format!("{name}.pem"));
    let key = dir.join(format!("{name}.key"));
    if let Some(p) = [&pem, &key].into_iter().find(|p| p.exists()) {
        return Err(PkiError::FileExists(p.clone()));
    }
    write_new(&key, &cert.key_pem, true)?;
    write_new(&pem, &cert.cert_pem, false)?;
    Ok([pem, key])
}

/// Creates `dir` with: `ca.pem`, `ca.key` (manufacturing CA, CN "Lobby Dev
/// Manufacturing CA", 10y); `server.pem`/`server.key` (CN localhost, SANs
/// DNS localhost + IP 127.0.0.1 + IP ::1, serverAuth, signed by the CA, 2y); `api.pem`/`api.key`
/// (the same, for `api.tls_cert`);
/// `devices/device-0001.pem` + `.key` ... (CN = device name, clientAuth,
/// signed by the CA, 10y); `claim.key`; `admin.token` (32 random bytes hex).
///
/// Private key and secret files are written with mode 0600 on unix. Refuses
/// to run if `ca.key` exists, and never overwrites any existing file.
pub fn init(opts: &InitOptions) -> Result<InitReport, PkiError> {
    let dir = opts.dir.as_path();
    let ca_key_path = dir.join("ca.key");
    if ca_key_path.exists() {
        return Err(PkiError::CaExists(ca_key_path));
    }
    let devices_dir = dir.join("devices");
    std::fs::create_dir_all(&devices_dir).map_err(io_err(&devices_dir))?;
    let mut report = InitReport::default();

    let (ca, ca_key_pem) = new_ca(CA_COMMON_NAME, 10)?;
    write_new(&ca_key_path, &ca_key_pem, true)?;
    report.files.push(ca_key_path);
    let ca_pem_path = dir.join("ca.pem");
    write_new(&ca_pem_path, ca.cert_pem(), false)?;
    report.files.push(ca_pem_path);
    let server = ca.issue_server()?;
    report.files.extend(write_pair(dir, "server", &server)?);
    // The API's and console's HTTPS certificate (`api.tls_cert`), for the same names.
    let api = ca.issue_server()?;
    report.files.extend(write_pair(dir, "api", &api)?);

    for i in 1..=opts.devices {
        let name = format!("device-{i:04}");
        let [pem, key] = write_pair(&devices_dir, &name, &ca.issue_device(&name)?)?;
        report.device_certs.push(pem.clone());
        report.files.extend([pem, key]);
    }
    let claim_path = dir.join("claim.key");
    write_new(&claim_path, &ClaimKey::generate().to_file_text(), true)?;
    report.files.push(claim_path);
    let token_path = dir.join("admin.token");
    let token: [u8; 32] = rand::random();
    write_new(&token_path, &format!("{}\n", hex::encode(token)), true)?;
    report.files.push(token_path);
    Ok(report)
}

/// Whether `name` matches `[A-Za-z0-9._-]{1,64}`.
pub fn valid_device_name(name: &str) -> bool {
    let allowed = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-');
    (1..=64).contains(&name.len()) && name.bytes().all(allowed)
}

/// Issues one more device signed by `dir/ca.pem` + `dir/ca.key`, writing
/// `dir/devices/<name>.pem` and `.key`; fails if either exists. `name` must
/// match `[A-Za-z0-9._-]{1,64}`. Returns the certificate path.
pub fn issue_device(dir: &Path, name: &str) -> Result<PathBuf, PkiError> {
    if !valid_device_name(name) {
        return Err(PkiError::InvalidName(name.to_owned()));
    }
    let ca = Ca::load(&dir.join("ca.pem"), &dir.join("ca.key"))?;
    let devices_dir = dir.join("devices");
    std::fs::create_dir_all(&devices_dir).map_err(io_err(&devices_dir))?;
    let [pem, _key] = write_pair(&devices_dir, name, &ca.issue_device(name)?)?;
    Ok(pem)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// Runs `openssl verify -CAfile <ca> [extra...] <cert>`; true on success.
    fn verify(ca: &Path, cert: &Path, extra: &str) -> bool {
        let mut cmd = Command::new("openssl");
        cmd.args(["verify", "-CAfile"])
            .arg(ca)
            .args(extra.split_whitespace());
        let out = cmd.arg(cert).output().expect("openssl is installed");
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains(": OK")
    }

    fn init_dir(devices: usize) -> (tempfile::TempDir, PathBuf, InitReport) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("pki");
        let opts = InitOptions {
            dir: dir.clone(),
            devices,
        };
        let report = init(&opts).unwrap();
        (tmp, dir, report)
    }

    #[test]
    fn init_creates_everything_and_certs_verify() {
        let (_tmp, dir, report) = init_dir(2);
        let secrets = "ca.key server.key api.key claim.key admin.token devices/device-0001.key";
        let public = "ca.pem server.pem api.pem devices/device-0001.pem devices/device-0002.pem";
        let names = format!("{secrets} {public} devices/device-0002.key");
        for n in names.split_whitespace() {
            assert!(dir.join(n).is_file(), "{n} missing");
            assert!(report.files.contains(&dir.join(n)), "{n} not reported");
        }
        assert_eq!(report.files.len(), names.split_whitespace().count());
        assert_eq!(report.device_certs.len(), 2);
        #[cfg(unix)]
        for n in secrets.split_whitespace() {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.join(n)).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{n}");
        }
        let ok = |cert: &str, extra: &str| verify(&dir.join("ca.pem"), &dir.join(cert), extra);
        assert!(ok("devices/device-0001.pem", "-purpose sslclient"));
        assert!(ok("devices/device-0002.pem", "-purpose sslclient"));
        assert!(ok(
            "server.pem",
            "-purpose sslserver -verify_hostname localhost"
        ));
        assert!(ok("server.pem", "-verify_ip 127.0.0.1"));
        assert!(ok("server.pem", "-verify_ip ::1"));
        assert!(!ok("server.pem", "-verify_hostname example.com"));

        let pem = std::fs::read_to_string(dir.join("devices/device-0001.pem")).unwrap();
        let der = crate::device::cert_pem_to_der(&pem).unwrap();
        let cn = crate::device::common_name(&der);
        assert_eq!(cn.as_deref(), Some("device-0001"));
        ClaimKey::load(&dir.join("claim.key")).unwrap();
        let token = std::fs::read_to_string(dir.join("admin.token")).unwrap();
        assert_eq!(token.trim_end().len(), 64);
    }

    #[test]
    fn init_refuses_to_run_twice() {
        let (_tmp, dir, _) = init_dir(0);
        let ca_before = std::fs::read(dir.join("ca.key")).unwrap();
        let err = init(&InitOptions {
            dir: dir.clone(),
            devices: 1,
        })
        .unwrap_err();
        assert!(matches!(err, PkiError::CaExists(_)), "{err}");
        assert_eq!(std::fs::read(dir.join("ca.key")).unwrap(), ca_before);
    }

    #[test]
    fn issue_device_writes_and_validates_names() {
        let (_tmp, dir, _) = init_dir(0);
        let pem = issue_device(&dir, "sensor_7.a-b").unwrap();
        assert_eq!(pem, dir.join("devices/sensor_7.a-b.pem"));
        assert!(dir.join("devices/sensor_7.a-b.key").is_file());
        assert!(verify(&dir.join("ca.pem"), &pem, "-purpose sslclient"));
        let dup = issue_device(&dir, "sensor_7.a-b").unwrap_err();
        assert!(matches!(dup, PkiError::FileExists(_)), "{dup}");
        let long = "x".repeat(65);
        for bad in ["", "a/b", "../x", "a b", "dévice", "a:b", long.as_str()] {
            let err = issue_device(&dir, bad).unwrap_err();
            assert!(matches!(err, PkiError::InvalidName(_)), "{bad}: {err}");
        }
        assert!(issue_device(&dir, &"x".repeat(64)).is_ok());
    }

    #[test]
    fn explicit_validity_and_loaded_ca_chain() {
        let (_tmp, dir, _) = init_dir(0);
        let ca = Ca::load(&dir.join("ca.pem"), &dir.join("ca.key")).unwrap();
        let (nb, na) = (
            rcgen::date_time_ymd(2020, 1, 1),
            rcgen::date_time_ymd(2021, 1, 1),
        );
        let cert = ca.issue_device_with_validity("old", nb, na).unwrap();
        let (_, x) = x509_parser::parse_x509_certificate(&cert.cert_der).unwrap();
        assert_eq!(x.validity().not_before.to_datetime(), nb);
        assert_eq!(x.validity().not_after.to_datetime(), na);
        let path = dir.join("old.pem");
        std::fs::write(&path, &cert.cert_pem).unwrap();
        assert!(!verify(&dir.join("ca.pem"), &path, ""));
        assert!(verify(&dir.join("ca.pem"), &path, "-no_check_time"));
        assert!(cert.key_pem.contains("BEGIN PRIVATE KEY"));
        assert!(!format!("{cert:?}").contains("PRIVATE"));
    }

    #[test]
    fn throwaway_ca_is_not_trusted_and_keys_must_match() {
        let (_tmp, dir, _) = init_dir(0);
        let other = throwaway_ca("Evil CA").unwrap();
        let cert = other.issue_device("intruder").unwrap();
        let path = dir.join("intruder.pem");
        std::fs::write(&path, &cert.cert_pem).unwrap();
        assert!(!verify(&dir.join("ca.pem"), &path, ""));
        let other_ca = dir.join("other-ca.pem");
        std::fs::write(&other_ca, other.cert_pem()).unwrap();
        assert!(verify(&other_ca, &path, ""));

        let real_pem = std::fs::read_to_string(dir.join("ca.pem")).unwrap();
        let wrong_key = std::fs::read_to_string(dir.join("server.key")).unwrap();
        let err = Ca::from_pem(&real_pem, &wrong_key).unwrap_err();
        assert!(matches!(err, PkiError::KeyMismatch), "{err}");
        assert!(Ca::from_pem("nope", &wrong_key).is_err());
    }
}
