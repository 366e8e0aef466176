//! Certificate revocation lists from a development CA (tests, and operators trying `crl_dir`).

use rcgen::{CertificateRevocationListParams, KeyIdMethod, RevokedCertParams, SerialNumber};
use time::{Duration, OffsetDateTime};

use super::{Ca, PkiError};

impl Ca {
    /// A PEM CRL signed by this CA that revokes the given certificates (DER), valid for a day.
    pub fn crl_pem(&self, revoked: &[&[u8]]) -> Result<String, PkiError> {
        let now = OffsetDateTime::now_utc();
        let mut revoked_certs = Vec::with_capacity(revoked.len());
        for der in revoked {
            let (_, cert) = x509_parser::parse_x509_certificate(der)
                .map_err(|e| PkiError::InvalidCaCert(format!("revoked certificate: {e}")))?;
            revoked_certs.push(RevokedCertParams {
                serial_number: SerialNumber::from_slice(cert.tbs_certificate.raw_serial()),
                revocation_time: now - Duration::minutes(1),
                reason_code: None,
                invalidity_date: None,
            });
        }
        let params = CertificateRevocationListParams {
            this_update: now - Duration::minutes(1),
            next_update: now + Duration::days(1),
            crl_number: SerialNumber::from(now.unix_timestamp().unsigned_abs()),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let crl = params.signed_by(&self.issuer)?;
        crl.pem().map_err(PkiError::Rcgen)
    }
}
