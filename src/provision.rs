//! Provisioning: registering claimed devices with their tenant's backend before they are sent
//! there, and removing what was registered when a device is unclaimed or migrated.
//!
//! Driven by stored state, not called from the claims service: claims in `registering` are the
//! registration queue, registrations marked `removing` the clean-up queue. The service only
//! nudges the worker ([`Provisioner::enqueue`]); a restart re-reads both queues, so work left
//! half-done is resumed. Every backend call is idempotent, so a resumed job never duplicates.
//!
//! The AWS SDK lives in [`aws_iot`] alone, behind [`IotApi`], so the worker is tested with a
//! fake.

pub mod aws_iot;
pub mod worker;

use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::claims::model::AwsIotBackend;
use crate::edge::identity::{self, DeviceId};

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

/// A registered certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertRef {
    pub id: String,
    pub arn: String,
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

    /// The job's name among the nodes sharing a store (its lease key).
    pub fn key(&self) -> String {
        match self {
            Job::Register(id) => format!("register:{id}"),
            Job::Remove(id, tenant) => format!("remove:{id}:{tenant}"),
        }
    }
}

/// The service's handle on the worker: a nudge, never the work itself.
#[derive(Debug, Clone)]
pub struct Provisioner {
    tx: mpsc::UnboundedSender<Job>,
}

impl Provisioner {
    /// A handle and the queue the worker drains.
    pub fn channel() -> (Self, mpsc::UnboundedReceiver<Job>) {
        // Unbounded on purpose: jobs are tiny, deduplicated by the worker, and bounded by the
        // number of claims; blocking the claims service on a full queue would be worse.
        let (tx, rx) = mpsc::unbounded_channel();
        (Self { tx }, rx)
    }

    /// Asks the worker to look at this job (it re-reads the stored state first).
    pub fn enqueue(&self, job: Job) {
        let _ = self.tx.send(job);
    }
}

/// The AWS thing name for device `id` whose own thing name ([`identity::thing_name_for`] of
/// its CN) is `base`: the tenant's template with `{cn}` (or `{thing_name}`) and `{device_id}`
/// filled in ([`identity::fill_template`]), `base` itself without a template. A result that is
/// not a usable thing name (too long, say) is the device id. Unique in the tenant only once the
/// claims service has accepted it ([`crate::claims::service::ClaimsService::reserve_thing_name`]).
pub fn thing_name(template: Option<&str>, base: &str, device_id: &DeviceId) -> String {
    let filled = match template {
        Some(t) if !t.is_empty() => identity::fill_template(t, base, device_id),
        _ => base.to_owned(),
    };
    if identity::usable_thing_name(&filled, device_id) {
        filled
    } else {
        device_id.to_hex()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
