//! The control plane's nouns: tenants (SPEC §5) and claims (a device bound to a tenant).
//!
//! These types are what the store persists, what the API shows and what the claims map holds.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::device::DeviceId;

/// How a tenant's claimed devices reach it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Send the device to the tenant's endpoint (redirect message / v5 Server Reference).
    #[default]
    Redirect,
    /// Keep the device on the lobby and relay its traffic to the tenant's broker (`bridge`).
    Bridge,
}

/// Where a tenant's devices are registered before they are sent on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Backend {
    /// Nothing to register: a claim is `ready` at once.
    #[default]
    None,
    /// The tenant's own AWS IoT Core account (SPEC §5).
    AwsIot(AwsIotBackend),
}

/// `backend.kind = "aws-iot"` settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AwsIotBackend {
    pub region: String,
    pub role_arn: String,
    /// The `sts:ExternalId` the tenant's role requires. Left out (or empty) when the tenant is
    /// created, the lobby makes one (160 random bits, `claims::tenant_input`).
    #[serde(default)]
    pub external_id: String,
    pub policy_name: String,
    /// Template with `{cn}` and `{device_id}`; default: the device's thing name (its CN when
    /// that is a valid thing name, else its device id; `provision::thing_name`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thing_name: Option<String>,
    /// Calls per second the lobby makes in this account and region, across the fleet and
    /// every tenant in it (an extension; default 10, under AWS IoT's control-plane limits of
    /// about 10–15 TPS for these APIs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<u32>,
}

impl AwsIotBackend {
    /// Calls per second in this account.
    pub fn rate(&self) -> u32 {
        self.rate_limit.unwrap_or(10).max(1)
    }
}

/// `bridge` settings of a bridge-mode tenant (SPEC §5).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BridgeSettings {
    pub ca: String,
    pub cert: String,
    pub key: String,
    #[serde(default)]
    pub topics: Vec<String>,
    #[serde(default = "default_pool_size")]
    pub pool_size: u16,
}

fn default_pool_size() -> u16 {
    4
}

fn default_port() -> u16 {
    8883
}

/// A tenant as the API shows it and the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tenant {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub mode: Mode,
    /// The tenant's MQTT endpoint host; devices are sent here.
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default = "default_port")]
    pub port: u16,
    #[serde(default)]
    pub region: Option<String>,
    #[serde(default)]
    pub backend: Backend,
    #[serde(default)]
    pub bridge: Option<BridgeSettings>,
    /// Most devices this tenant may claim; none: no limit.
    #[serde(default)]
    pub max_devices: Option<u64>,
}

/// Where a device stands (SPEC §4 `state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClaimState {
    Unclaimed,
    Registering,
    Ready,
    Failed,
    Revoked,
}

impl ClaimState {
    /// The wire and store name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unclaimed => "unclaimed",
            Self::Registering => "registering",
            Self::Ready => "ready",
            Self::Failed => "failed",
            Self::Revoked => "revoked",
        }
    }

    /// Parses a store or query value.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "unclaimed" => Self::Unclaimed,
            "registering" => Self::Registering,
            "ready" => Self::Ready,
            "failed" => Self::Failed,
            "revoked" => Self::Revoked,
            _ => return None,
        })
    }
}

/// One device's binding. Present in the store and the map for every claimed or revoked device;
/// an unclaimed, unrevoked device has no claim at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub device_id: DeviceId,
    /// The owning tenant; `None` only for a device revoked while unclaimed.
    pub tenant: Option<Arc<str>>,
    pub state: ClaimState,
    /// The device's thing name in its tenant, when known (from the claim's `cert_pem`, the
    /// handshake, or the AWS registration): never a raw CN, unique in the tenant (see
    /// `claims::service::names`).
    pub thing_name: Option<String>,
    /// Identifies the current redirect; new for every claim and migration.
    pub redirect_id: Option<String>,
    /// Unix milliseconds.
    pub claimed_at: Option<i64>,
    /// When the claim became `ready` (the redirect's `issued_at`).
    pub ready_at: Option<i64>,
    /// When the current redirect first reached the device.
    pub redirected_at: Option<i64>,
    /// Why registration failed, or (while `registering`) why its last attempt did.
    pub error: Option<String>,
    /// Registration attempts made so far for this claim (0 until the first one ends).
    pub attempts: u32,
    /// When a registration that failed for a retryable reason is tried next (Unix ms).
    pub next_attempt_at: Option<i64>,
    /// The store's version of this claim: set by every write, compared by the next one, so two
    /// writers (tasks or nodes) never both change the same claim unseen (0: never stored).
    pub version: i64,
}

impl Claim {
    /// A device revoked while unclaimed: refused at the handshake, bound to no tenant.
    pub fn revoked(device_id: DeviceId) -> Self {
        Claim {
            device_id,
            tenant: None,
            state: ClaimState::Revoked,
            thing_name: None,
            redirect_id: None,
            claimed_at: None,
            ready_at: None,
            redirected_at: None,
            error: None,
            attempts: 0,
            next_attempt_at: None,
            version: 0,
        }
    }

    /// The tenant id as a plain `&str`.
    pub fn tenant_id(&self) -> Option<&str> {
        self.tenant.as_deref()
    }

    /// Registering with `tenant` (the provisioner's verdicts and name reservations apply to
    /// this claim only while it is).
    pub fn registering_with(&self, tenant: &str) -> bool {
        self.state == ClaimState::Registering && self.tenant_id() == Some(tenant)
    }

    /// Claimed (and not revoked) without a thing name yet: claimed before its device was ever
    /// seen, without its certificate. The device's first connection names it.
    pub fn unnamed(&self) -> bool {
        self.thing_name.is_none() && self.tenant.is_some() && self.state != ClaimState::Revoked
    }
}

/// A registered certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertRef {
    pub id: String,
    pub arn: String,
}

/// What the lobby created in a tenant's account for one device: enough to remove it later,
/// even after the tenant changed its settings or was deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub device_id: DeviceId,
    pub tenant: String,
    /// The backend settings the registration was made with.
    pub backend: AwsIotBackend,
    pub thing_name: String,
    /// Set once RegisterCertificateWithoutCA answered.
    pub cert: Option<CertRef>,
    /// Set when the device was unclaimed or moved away: the clean-up queue.
    pub removing: bool,
}

/// Milliseconds since the Unix epoch, the store's time unit.
pub fn now_ms() -> i64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// RFC 3339 (UTC, millisecond precision) for API and device payloads.
pub fn rfc3339(ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let t = t
        .replace_nanosecond(t.millisecond() as u32 * 1_000_000)
        .unwrap_or(t);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_json_defaults_and_backend_tag() {
        let t: Tenant = serde_json::from_str(
            r#"{"id":"acme","name":"Acme","endpoint":"a.example.com","backend":{"kind":"none"}}"#,
        )
        .unwrap();
        assert_eq!(t.port, 8883);
        assert_eq!(t.mode, Mode::Redirect);
        assert_eq!(t.backend, Backend::None);
        let aws: Backend = serde_json::from_str(
            r#"{"kind":"aws-iot","region":"eu-west-1","role_arn":"arn:aws:iam::1:role/r","external_id":"x","policy_name":"p"}"#,
        )
        .unwrap();
        assert!(matches!(aws, Backend::AwsIot(_)));
    }

    #[test]
    fn states_round_trip() {
        for s in [
            ClaimState::Unclaimed,
            ClaimState::Registering,
            ClaimState::Ready,
            ClaimState::Failed,
            ClaimState::Revoked,
        ] {
            assert_eq!(ClaimState::parse(s.as_str()), Some(s));
        }
    }

    #[test]
    fn rfc3339_format() {
        assert_eq!(rfc3339(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
    }
}
