//! The AWS IoT backend: the only module that imports the AWS SDK.
//!
//! The lobby's own credentials come from the standard chain (environment, profile,
//! container/instance metadata), never from the config. For each tenant it assumes the tenant's
//! `role_arn` with its `external_id`; the IoT client built on that provider caches the assumed
//! credentials and refreshes them before they expire (the SDK's lazy identity cache), and one
//! client per tenant is kept. `aws.endpoint_url` overrides the STS and IoT endpoints.

use std::collections::HashMap;
use std::error::Error as _;
use std::sync::Arc;

use parking_lot::Mutex;

use async_trait::async_trait;
use aws_config::sts::AssumeRoleProvider;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_iot::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_iot::operation::register_certificate_without_ca::RegisterCertificateWithoutCAError;
use aws_sdk_iot::types::CertificateStatus;
use aws_sdk_sts::operation::assume_role::AssumeRoleError;
use aws_smithy_runtime_api::http::Response as HttpResponse;
use aws_smithy_types::error::display::DisplayErrorContext;

use super::{CertRef, IotApi, IotApiFactory, IotError};
use crate::model::AwsIotBackend;

/// Builds and caches one IoT client per tenant.
pub struct AwsIotFactory {
    endpoint_url: String,
    /// Loaded on first use: resolving the chain may probe instance metadata, which a lobby
    /// whose tenants all use `backend.kind = "none"` should never wait for.
    base: tokio::sync::OnceCell<SdkConfig>,
    session_name: String,
    clients: Mutex<HashMap<String, (AwsIotBackend, Arc<AwsIot>)>>,
    /// The lobby's own principal, once read (GetCallerIdentity).
    principal: tokio::sync::OnceCell<String>,
}

impl std::fmt::Debug for AwsIotFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsIotFactory").finish_non_exhaustive()
    }
}

impl AwsIotFactory {
    /// A factory using the standard credential chain and, when set, `aws.endpoint_url`.
    pub fn new(endpoint_url: &str, session_name: &str) -> Self {
        Self {
            endpoint_url: endpoint_url.to_owned(),
            base: tokio::sync::OnceCell::new(),
            session_name: session_name.to_owned(),
            clients: Mutex::new(HashMap::new()),
            principal: tokio::sync::OnceCell::new(),
        }
    }

    async fn base(&self) -> &SdkConfig {
        self.base
            .get_or_init(|| async {
                let mut loader = aws_config::defaults(BehaviorVersion::latest());
                if !self.endpoint_url.is_empty() {
                    loader = loader.endpoint_url(&self.endpoint_url);
                }
                loader.load().await
            })
            .await
    }

    fn cached(&self, tenant: &str, backend: &AwsIotBackend) -> Option<Arc<AwsIot>> {
        let clients = self.clients.lock();
        match clients.get(tenant) {
            Some((b, c)) if b == backend => Some(c.clone()),
            _ => None,
        }
    }
}

#[async_trait]
impl IotApiFactory for AwsIotFactory {
    async fn client(
        &self,
        tenant: &str,
        backend: &AwsIotBackend,
    ) -> Result<Arc<dyn IotApi>, IotError> {
        if let Some(c) = self.cached(tenant, backend) {
            return Ok(c);
        }
        let base = self.base().await;
        let region = Region::new(backend.region.clone());
        let provider = AssumeRoleProvider::builder(backend.role_arn.clone())
            .external_id(backend.external_id.clone())
            .session_name(self.session_name.clone())
            .region(region.clone())
            .configure(base)
            .build()
            .await;
        // Assume once now, so a role the tenant got wrong fails with STS's own error code
        // rather than somewhere inside the first IoT call.
        if let Err(e) =
            aws_credential_types::provider::ProvideCredentials::provide_credentials(&provider).await
        {
            return Err(credentials_error(&e));
        }
        let conf = aws_sdk_iot::config::Builder::from(base)
            .region(region)
            .credentials_provider(provider)
            .build();
        let client = Arc::new(AwsIot {
            client: aws_sdk_iot::Client::from_conf(conf),
        });
        let mut clients = self.clients.lock();
        clients.insert(tenant.to_owned(), (backend.clone(), client.clone()));
        Ok(client)
    }

    async fn lobby_principal(&self) -> Result<String, IotError> {
        let principal = self
            .principal
            .get_or_try_init(|| async {
                let base = self.base().await;
                // STS is global: any region does when the chain names none.
                let region = base
                    .region()
                    .cloned()
                    .unwrap_or_else(|| Region::new("us-east-1"));
                let conf = aws_sdk_sts::config::Builder::from(base)
                    .region(region)
                    .build();
                let who = aws_sdk_sts::Client::from_conf(conf)
                    .get_caller_identity()
                    .send()
                    .await
                    .map_err(|e| IotError::Retryable {
                        code: "GetCallerIdentity".into(),
                        message: DisplayErrorContext(&e).to_string(),
                    })?;
                who.arn()
                    .map(super::principal_of)
                    .ok_or_else(|| IotError::Permanent {
                        code: "GetCallerIdentity".into(),
                        message: "the answer names no ARN".into(),
                    })
            })
            .await?;
        Ok(principal.clone())
    }
}

/// Classifies a failed AssumeRole by the STS error code found in the error chain.
fn credentials_error(e: &aws_credential_types::provider::error::CredentialsError) -> IotError {
    use aws_credential_types::provider::error::CredentialsError;
    if matches!(e, CredentialsError::ProviderTimedOut(_)) {
        return IotError::Retryable {
            code: "CredentialsTimeout".into(),
            message: "assuming the tenant role timed out".into(),
        };
    }
    let mut source = e.source();
    while let Some(s) = source {
        if let Some(sdk) = s.downcast_ref::<SdkError<AssumeRoleError>>() {
            return map_sdk_error(sdk);
        }
        source = s.source();
    }
    IotError::Permanent {
        code: super::CREDENTIALS_FAILED.into(),
        message: DisplayErrorContext(e).to_string(),
    }
}

/// One tenant's IoT client.
#[derive(Debug)]
pub struct AwsIot {
    client: aws_sdk_iot::Client,
}

/// Sorts an error code and HTTP status into what the worker does next.
pub fn classify(code: &str, status: u16, message: String) -> IotError {
    match code {
        "ResourceAlreadyExistsException" => IotError::AlreadyExists {
            id: None,
            arn: None,
        },
        "ResourceNotFoundException" => IotError::NotFound { message },
        "ThrottlingException"
        | "Throttling"
        | "ServiceUnavailableException"
        | "InternalFailureException"
        | "InternalServerException"
        | "RequestTimeout"
        | "RequestLimitExceeded"
        | "TooManyRequestsException" => IotError::Retryable {
            code: code.to_owned(),
            message,
        },
        _ if status >= 500 || status == 429 => IotError::Retryable {
            code: code.to_owned(),
            message,
        },
        _ => IotError::Permanent {
            code: code.to_owned(),
            message,
        },
    }
}

fn map_sdk_error<E>(e: &SdkError<E, HttpResponse>) -> IotError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    match e {
        SdkError::ServiceError(se) => {
            let err = se.err();
            let status = se.raw().status().as_u16();
            classify(
                err.code().unwrap_or("Unknown"),
                status,
                err.message().unwrap_or_default().to_owned(),
            )
        }
        SdkError::ConstructionFailure(_) => IotError::Permanent {
            code: "ConstructionFailure".into(),
            message: DisplayErrorContext(e).to_string(),
        },
        _ => IotError::Retryable {
            code: "NetworkError".into(),
            message: DisplayErrorContext(e).to_string(),
        },
    }
}

/// A result whose not-found is fine (removing what may be gone already).
fn gone_ok(r: Result<(), IotError>) -> Result<(), IotError> {
    match r {
        Err(IotError::NotFound { .. }) => Ok(()),
        other => other,
    }
}

#[async_trait]
impl IotApi for AwsIot {
    async fn register_certificate(&self, cert_pem: &str) -> Result<CertRef, IotError> {
        let out = self
            .client
            .register_certificate_without_ca()
            .certificate_pem(cert_pem)
            .status(CertificateStatus::Active)
            .send()
            .await;
        match out {
            Ok(o) => match (o.certificate_id(), o.certificate_arn()) {
                (Some(id), Some(arn)) => Ok(CertRef {
                    id: id.to_owned(),
                    arn: arn.to_owned(),
                }),
                _ => Err(IotError::Permanent {
                    code: "MissingCertificateId".into(),
                    message: "RegisterCertificateWithoutCA returned no id".into(),
                }),
            },
            Err(e) => match e.as_service_error() {
                Some(RegisterCertificateWithoutCAError::ResourceAlreadyExistsException(x)) => {
                    Err(IotError::AlreadyExists {
                        id: x.resource_id().map(str::to_owned),
                        arn: x.resource_arn().map(str::to_owned),
                    })
                }
                _ => Err(map_sdk_error(&e)),
            },
        }
    }

    async fn activate_certificate(&self, cert_id: &str) -> Result<(), IotError> {
        self.client
            .update_certificate()
            .certificate_id(cert_id)
            .new_status(CertificateStatus::Active)
            .send()
            .await
            .map(drop)
            .map_err(|e| map_sdk_error(&e))
    }

    async fn create_thing(&self, thing_name: &str) -> Result<(), IotError> {
        let r = self
            .client
            .create_thing()
            .thing_name(thing_name)
            .send()
            .await;
        match r.map(drop).map_err(|e| map_sdk_error(&e)) {
            // Same name, same (no) attributes: the thing is ours from an earlier attempt.
            Err(IotError::AlreadyExists { .. }) => Ok(()),
            other => other,
        }
    }

    async fn attach_thing_principal(
        &self,
        thing_name: &str,
        cert_arn: &str,
    ) -> Result<(), IotError> {
        self.client
            .attach_thing_principal()
            .thing_name(thing_name)
            .principal(cert_arn)
            .send()
            .await
            .map(drop)
            .map_err(|e| map_sdk_error(&e))
    }

    async fn attach_policy(&self, policy_name: &str, cert_arn: &str) -> Result<(), IotError> {
        self.client
            .attach_policy()
            .policy_name(policy_name)
            .target(cert_arn)
            .send()
            .await
            .map(drop)
            .map_err(|e| map_sdk_error(&e))
    }

    async fn describe_endpoint(&self) -> Result<String, IotError> {
        let out = self
            .client
            .describe_endpoint()
            .endpoint_type("iot:Data-ATS")
            .send()
            .await
            .map_err(|e| map_sdk_error(&e))?;
        out.endpoint_address()
            .map(str::to_owned)
            .ok_or_else(|| IotError::Permanent {
                code: "MissingEndpoint".into(),
                message: "DescribeEndpoint returned no address".into(),
            })
    }

    async fn deactivate_certificate(&self, cert_id: &str) -> Result<(), IotError> {
        gone_ok(
            self.client
                .update_certificate()
                .certificate_id(cert_id)
                .new_status(CertificateStatus::Inactive)
                .send()
                .await
                .map(drop)
                .map_err(|e| map_sdk_error(&e)),
        )
    }

    async fn detach_thing_principal(
        &self,
        thing_name: &str,
        cert_arn: &str,
    ) -> Result<(), IotError> {
        gone_ok(
            self.client
                .detach_thing_principal()
                .thing_name(thing_name)
                .principal(cert_arn)
                .send()
                .await
                .map(drop)
                .map_err(|e| map_sdk_error(&e)),
        )
    }

    async fn detach_policy(&self, policy_name: &str, cert_arn: &str) -> Result<(), IotError> {
        gone_ok(
            self.client
                .detach_policy()
                .policy_name(policy_name)
                .target(cert_arn)
                .send()
                .await
                .map(drop)
                .map_err(|e| map_sdk_error(&e)),
        )
    }

    async fn delete_certificate(&self, cert_id: &str) -> Result<(), IotError> {
        gone_ok(
            self.client
                .delete_certificate()
                .certificate_id(cert_id)
                .send()
                .await
                .map(drop)
                .map_err(|e| map_sdk_error(&e)),
        )
    }

    async fn delete_thing(&self, thing_name: &str) -> Result<(), IotError> {
        gone_ok(
            self.client
                .delete_thing()
                .thing_name(thing_name)
                .send()
                .await
                .map(drop)
                .map_err(|e| map_sdk_error(&e)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        assert!(matches!(
            classify("ThrottlingException", 400, String::new()),
            IotError::Retryable { .. }
        ));
        assert!(matches!(
            classify("Whatever", 503, String::new()),
            IotError::Retryable { .. }
        ));
        assert!(matches!(
            classify("AccessDeniedException", 403, String::new()),
            IotError::Permanent { code, .. } if code == "AccessDeniedException"
        ));
        assert_eq!(
            classify("ResourceNotFoundException", 404, "no policy p".into()),
            IotError::NotFound {
                message: "no policy p".into()
            }
        );
    }
}
