//! Provisioning: registering claimed devices with their tenant's backend before they are sent
//! there, and removing what was registered when a device is unclaimed or migrated.
//!
//! Driven by stored state, not called from the claims service: claims in `registering` are the
//! registration queue, registrations marked `removing` the clean-up queue. The service only
//! nudges the worker (a [`ClaimEvent`]); a restart re-reads both queues, so work left
//! half-done is resumed. Every backend call is idempotent, so a resumed job never duplicates.
//!
//! The AWS SDK lives in [`aws_iot`] alone, behind [`IotApi`], so the worker is tested with a
//! fake.

pub mod aws_iot;
pub mod worker;

use std::sync::Arc;

use async_trait::async_trait;

use crate::claims::events::ClaimEvent;
use crate::device::{self, DeviceId};
use crate::model::{AwsIotBackend, CertRef};

/// How a backend call failed, as the worker needs to know it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IotError {
    /// Throttling, 5xx, timeouts, network: try again later.
    #[error("{code}: {message}")]
    Retryable { code: String, message: String },
    /// The resource exists already (with its id and ARN when the service says them).
    #[error("already exists")]
    AlreadyExists {
        id: Option<String>,
        arn: Option<String>,
    },
    /// The resource is not there: fine when removing, permanent when registering (a missing
    /// policy, say), where the message says what is missing.
    #[error("ResourceNotFoundException: {message}")]
    NotFound { message: String },
    /// AccessDenied and everything else that a retry will not fix.
    #[error("{code}: {message}")]
    Permanent { code: String, message: String },
}

impl IotError {
    /// The error as the tenant reads it (the device's `error`): the AWS error code and
    /// message, with every ARN outside `account` (the tenant's, from its role) replaced — the
    /// lobby's own principal appears in AccessDenied messages — and failures of the lobby's own
    /// credential chain reduced to a sentence. The full text is the operator's, in the log.
    pub fn tenant_facing(&self, account: Option<&str>) -> String {
        match self {
            Self::Permanent { code, .. } if code == CREDENTIALS_FAILED => format!(
                "{code}: the lobby could not assume the tenant role with its own AWS \
                 credentials; the operator's log has the details"
            ),
            Self::Retryable { code, .. } if code == STORE_FAILED => format!(
                "{code}: the lobby's store could not be reached; the registration is retried"
            ),
            other => redact_arns(&other.to_string(), account),
        }
    }
}

/// The code of a failed AssumeRole that STS itself did not answer (the lobby's credential
/// chain, or the network to STS).
pub const CREDENTIALS_FAILED: &str = "AssumeRoleFailed";

/// The code of a retryable failure of the lobby's own store during a registration (its
/// details, such as the database's address, are the operator's).
pub const STORE_FAILED: &str = "StoreError";
/// The error code of a registration the lobby's own control plane refused (not the AWS
/// account's): a retry would meet the same answer.
pub const LOBBY_REFUSED: &str = "LobbyRefused";

/// The account field of an ARN (`arn:partition:service:region:account:resource`), empty when
/// the ARN has none.
pub fn arn_account(arn: &str) -> &str {
    arn.split(':').nth(4).unwrap_or("")
}

/// `text` with each ARN whose account is not `account` replaced by a placeholder. An ARN runs
/// from `arn:` to the next space, quote, comma or bracket.
fn redact_arns(text: &str, account: Option<&str>) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("arn:") {
        out.push_str(&rest[..at]);
        let arn_len = rest[at..]
            .find(|c: char| c.is_whitespace() || "\"',()[]{}<>".contains(c))
            .unwrap_or(rest.len() - at);
        let arn = &rest[at..at + arn_len];
        let of = arn_account(arn);
        let kept = of.is_empty() || of == "aws" || account.is_some_and(|a| a == of);
        out.push_str(if kept { arn } else { "<the lobby's principal>" });
        rest = &rest[at + arn_len..];
    }
    out.push_str(rest);
    out
}

/// The control-plane calls the lobby makes in a tenant's IoT account.
#[async_trait]
pub trait IotApi: Send + Sync {
    /// RegisterCertificateWithoutCA, status ACTIVE.
    async fn register_certificate(&self, cert_pem: &str) -> Result<CertRef, IotError>;
    /// UpdateCertificate ACTIVE (a certificate the lobby had begun to remove is wanted again).
    async fn activate_certificate(&self, cert_id: &str) -> Result<(), IotError>;
    async fn create_thing(&self, thing_name: &str) -> Result<(), IotError>;
    async fn attach_thing_principal(
        &self,
        thing_name: &str,
        cert_arn: &str,
    ) -> Result<(), IotError>;
    async fn attach_policy(&self, policy_name: &str, cert_arn: &str) -> Result<(), IotError>;
    /// DescribeEndpoint `iot:Data-ATS`.
    async fn describe_endpoint(&self) -> Result<String, IotError>;
    /// UpdateCertificate INACTIVE.
    async fn deactivate_certificate(&self, cert_id: &str) -> Result<(), IotError>;
    async fn detach_thing_principal(
        &self,
        thing_name: &str,
        cert_arn: &str,
    ) -> Result<(), IotError>;
    async fn detach_policy(&self, policy_name: &str, cert_arn: &str) -> Result<(), IotError>;
    async fn delete_certificate(&self, cert_id: &str) -> Result<(), IotError>;
    async fn delete_thing(&self, thing_name: &str) -> Result<(), IotError>;
}

/// Gives the [`IotApi`] of a tenant's account (assuming its role; cached per tenant).
#[async_trait]
pub trait IotApiFactory: Send + Sync {
    async fn client(
        &self,
        tenant: &str,
        backend: &AwsIotBackend,
    ) -> Result<Arc<dyn IotApi>, IotError>;

    /// The lobby's own AWS principal (what its credentials are), as a tenant's trust policy
    /// names it ([`principal_of`]).
    async fn lobby_principal(&self) -> Result<String, IotError> {
        Err(IotError::Permanent {
            code: "NoAwsIdentity".into(),
            message: "this lobby has no AWS identity".into(),
        })
    }
}

/// The principal a trust policy names for the identity `arn` (STS GetCallerIdentity's
/// answer): an assumed role's session is its role (`arn:…:iam::<account>:role/<name>`, without
/// the role's path, which a session ARN does not carry), a user or the account root is itself
/// in IAM's form.
pub fn principal_of(arn: &str) -> String {
    let parts: Vec<&str> = arn.splitn(6, ':').collect();
    if let ["arn", partition, _, "", account, resource] = parts[..] {
        if let Some(rest) = resource.strip_prefix("assumed-role/") {
            let role = rest.split('/').next().unwrap_or(rest);
            return format!("arn:{partition}:iam::{account}:role/{role}");
        }
        if resource.starts_with("user/") || resource.starts_with("role/") || resource == "root" {
            return format!("arn:{partition}:iam::{account}:{resource}");
        }
    }
    arn.to_owned()
}

/// Work for the provisioning worker.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Job {
    /// Register a device whose claim is `registering`.
    Register(DeviceId),
    /// Remove the registration of a device with a tenant.
    Remove(DeviceId, String),
}

impl Job {
    /// The device the job is about.
    pub fn device(&self) -> DeviceId {
        match self {
            Job::Register(id) | Job::Remove(id, _) => *id,
        }
    }

    /// The job's lease key among the nodes sharing a store: the device's, whatever the job,
    /// so a registration and a clean-up of one device never run at once on two nodes (the
    /// clean-up waits; the node that registered queues it when it finds the claim gone, and
    /// every node's sweep finds it too).
    pub fn key(&self) -> String {
        format!("device:{}", self.device())
    }
}

impl From<ClaimEvent> for Job {
    fn from(e: ClaimEvent) -> Self {
        match e {
            ClaimEvent::Registering(id) => Job::Register(id),
            ClaimEvent::Retiring(id, tenant) => Job::Remove(id, tenant),
        }
    }
}

/// The AWS thing name for device `id` whose own thing name ([`device::thing_name_for`] of
/// its CN) is `base`: the tenant's template with `{cn}` (or `{thing_name}`) and `{device_id}`
/// filled in ([`device::fill_template`]), `base` itself without a template. A result that is
/// not a usable thing name (too long, say) is the device id. Unique in the tenant only once the
/// claims service has accepted it ([`crate::claims::service::ClaimsService::reserve_thing_name`]).
pub fn thing_name(template: Option<&str>, base: &str, device_id: &DeviceId) -> String {
    let filled = match template {
        Some(t) if !t.is_empty() => device::fill_template(t, base, device_id),
        _ => base.to_owned(),
    };
    if device::usable_thing_name(&filled, device_id) {
        filled
    } else {
        device_id.to_hex()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn tenant_facing_errors_keep_the_tenants_arns_only() {
        let denied = IotError::Permanent {
            code: "AccessDenied".into(),
            message: "User: arn:aws:sts::999988887777:assumed-role/lobby-node/i-0abc is not \
                      authorized to perform: sts:AssumeRole on resource: \
                      arn:aws:iam::111122223333:role/lobby (policy arn:aws:iam::aws:policy/X)"
                .into(),
        };
        let shown = denied.tenant_facing(Some("111122223333"));
        assert!(
            shown.starts_with("AccessDenied: User: <the lobby's principal> is not"),
            "{shown}"
        );
        assert!(
            shown.contains("arn:aws:iam::111122223333:role/lobby ("),
            "{shown}"
        );
        assert!(shown.contains("arn:aws:iam::aws:policy/X)"), "{shown}");
        assert!(
            !shown.contains("999988887777") && !shown.contains("lobby-node"),
            "{shown}"
        );
        let chain = IotError::Permanent {
            code: CREDENTIALS_FAILED.into(),
            message: "no providers in chain: profile file /root/.aws/credentials: not found".into(),
        };
        let shown = chain.tenant_facing(Some("111122223333"));
        assert!(
            shown.starts_with("AssumeRoleFailed: the lobby could not"),
            "{shown}"
        );
        assert!(!shown.contains("/root"), "{shown}");
        assert_eq!(
            redact_arns("arn:", None),
            "arn:",
            "no account: nothing to hide"
        );
        assert_eq!(redact_arns("no arn here", None), "no arn here");
    }

    use super::*;

    #[test]
    fn a_trust_policy_names_the_role_behind_a_session() {
        assert_eq!(
            principal_of("arn:aws:sts::111122223333:assumed-role/lobby-prod/i-0abc"),
            "arn:aws:iam::111122223333:role/lobby-prod"
        );
        assert_eq!(
            principal_of("arn:aws-cn:sts::111122223333:assumed-role/lobby/s"),
            "arn:aws-cn:iam::111122223333:role/lobby"
        );
        assert_eq!(
            principal_of("arn:aws:iam::111122223333:user/ops/lobby"),
            "arn:aws:iam::111122223333:user/ops/lobby"
        );
        // moto answers a user's identity under sts.
        assert_eq!(
            principal_of("arn:aws:sts::123456789012:user/moto"),
            "arn:aws:iam::123456789012:user/moto"
        );
        assert_eq!(
            principal_of("arn:aws:iam::111122223333:root"),
            "arn:aws:iam::111122223333:root"
        );
        assert_eq!(principal_of("not an arn"), "not an arn");
    }

    #[test]
    fn thing_name_template() {
        let id = DeviceId([0xab; 32]);
        assert_eq!(thing_name(None, "dev-1", &id), "dev-1");
        assert_eq!(thing_name(Some(""), "dev-1", &id), "dev-1");
        assert_eq!(
            thing_name(Some("acme-{cn}"), "dev-1", &id),
            "acme-dev-1".to_string()
        );
        assert!(thing_name(Some("{device_id}"), "dev-1", &id).starts_with("abab"));
    }

    #[test]
    fn a_template_never_makes_an_invalid_thing_name() {
        let id = DeviceId([0xab; 32]);
        let hex = id.to_hex();
        // Hostile bases are replaced before they are inserted.
        for base in ["+", "#", "a/b", "$SYS", "a\0b", "\u{202e}x", ""] {
            assert_eq!(
                thing_name(Some("acme-{cn}"), base, &id),
                format!("acme-{hex}")
            );
            assert_eq!(thing_name(None, base, &id), hex);
        }
        // A result AWS would refuse (too long, or a character the template brought) is the id.
        let long = "a".repeat(128);
        assert_eq!(thing_name(Some("x-{cn}"), &long, &id), hex);
        assert_eq!(thing_name(Some("a b {cn}"), "dev", &id), hex);
        // Another device's id is not this device's name.
        let other = DeviceId([0xcd; 32]).to_hex();
        assert_eq!(thing_name(Some(&other), "dev", &id), hex);
        assert_eq!(thing_name(None, &other, &id), hex);
    }
}
