//! The lobby's HTTP API as the claim and bridge scenarios use it (SPEC §6, §12): create a
//! tenant, claim devices one at a time or in batches.

use std::path::Path;

use anyhow::{bail, Context, Result};
use reqwest::{Client, StatusCode};
use serde::Deserialize;
use serde_json::json;

use crate::stats::Failure;

/// A client for one lobby API base URL.
pub struct Api {
    client: Client,
    base: String,
}

#[derive(Deserialize)]
struct TenantCreated {
    tenant: TenantId,
    token: String,
}

#[derive(Deserialize)]
struct TenantId {
    id: serde_json::Value,
}

/// A token given as itself, or as `@path` to read it from a file.
pub fn read_token(arg: &str) -> Result<String> {
    match arg.strip_prefix('@') {
        Some(path) => Ok(std::fs::read_to_string(Path::new(path))
            .with_context(|| format!("reading token file {path}"))?
            .trim()
            .to_owned()),
        None => Ok(arg.to_owned()),
    }
}

impl Api {
    /// A client for `base` (e.g. `http://127.0.0.1:8080`).
    pub fn new(base: &str) -> Result<Self> {
        // reqwest's TLS setup asks for the process's rustls provider when reqwest is built
        // with rustls (the lobby's tests turn that on in workspace builds): aws-lc-rs.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let client = Client::builder()
            // Above the largest --claim-concurrency in use, so that every request in flight
            // keeps its connection (a smaller pool closes the surplus after each answer and
            // the next request pays a new TCP connect); the lobby's api.max_connections is 1024.
            .pool_max_idle_per_host(1024)
            .build()
            .context("building HTTP client")?;
        Ok(Self {
            client,
            base: base.trim_end_matches('/').to_owned(),
        })
    }

    /// Creates a redirect-mode tenant named `loadtest-<random>` with backend `none`; returns its
    /// id (as text) and token.
    pub async fn create_tenant(&self, admin_token: &str) -> Result<(String, String)> {
        let body = json!({
            "name": format!("loadtest-{:08x}", rand::random::<u32>()),
            "mode": "redirect",
            "endpoint": "tenant.example.com",
            "port": 8883,
            "backend": {"kind": "none"},
        });
        self.create_tenant_from(admin_token, &body).await
    }

    /// Creates the tenant described by `body` (`POST /v1/tenants`, expects 201); returns its id
    /// (as text) and token.
    pub async fn create_tenant_from(
        &self,
        admin_token: &str,
        body: &serde_json::Value,
    ) -> Result<(String, String)> {
        let url = format!("{}/v1/tenants", self.base);
        let response = self
            .client
            .post(&url)
            .bearer_auth(admin_token)
            .json(body)
            .send()
            .await
            .with_context(|| format!("creating tenant: cannot reach POST {url}"))?;
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        if status != StatusCode::CREATED {
            let shown: String = text.chars().take(400).collect(); // an HTML page says little more
            bail!("creating tenant: POST {url} answered {status} (expected 201 Created): {shown}");
        }
        let created: TenantCreated = serde_json::from_str(&text).with_context(|| {
            format!("creating tenant: POST {url} answered 201 with an unexpected body: {text}")
        })?;
        let id = match created.tenant.id {
            serde_json::Value::String(s) => s,
            other => other.to_string(),
        };
        Ok((id, created.token))
    }

    /// Claims one device with a tenant token (`POST /v1/claims`); 201 (claimed) and 200
    /// (already this tenant's) count as success, anything else is a failure named by its
    /// status and error code.
    pub async fn claim(&self, tenant_token: &str, code: &str) -> Result<(), Failure> {
        let response = self
            .client
            .post(format!("{}/v1/claims", self.base))
            .bearer_auth(tenant_token)
            .json(&json!({ "code": code }))
            .send()
            .await
            .map_err(|e| Failure::new("claim", e))?;
        match response.status() {
            StatusCode::CREATED | StatusCode::OK => Ok(()),
            status => {
                let body = response.text().await.unwrap_or_default();
                let error = error_code(&body);
                Err(Failure::new("claim", http_failure(status.as_u16(), &error)))
            }
        }
    }

    /// Claims up to [`MAX_BATCH`] devices in one `POST /v1/claims:batch` (SPEC §12); returns one
    /// outcome per code, in request order. A request that fails as a whole (transport, non-200,
    /// a body that is not the SPEC's shape) fails every code with the same failure.
    pub async fn claim_batch(&self, tenant_token: &str, codes: &[String]) -> Vec<ClaimOutcome> {
        match self.claim_batch_request(tenant_token, codes).await {
            Ok(results) => batch_outcomes(codes.len(), results),
            Err(detail) => codes
                .iter()
                .map(|_| Err(Failure::new("claim", &detail)))
                .collect(),
        }
    }

    async fn claim_batch_request(
        &self,
        tenant_token: &str,
        codes: &[String],
    ) -> Result<Vec<BatchResult>, String> {
        let claims: Vec<_> = codes.iter().map(|code| json!({ "code": code })).collect();
        let response = self
            .client
            .post(format!("{}/v1/claims:batch", self.base))
            .bearer_auth(tenant_token)
            .json(&json!({ "claims": claims }))
            .send()
            .await
            .map_err(|e| format!("batch: {e}"))?;
        let status = response.status();
        let body = response.text().await.map_err(|e| format!("batch: {e}"))?;
        if status != StatusCode::OK {
            let error = error_code(&body);
            return Err(format!("batch {}", http_failure(status.as_u16(), &error)));
        }
        serde_json::from_str::<BatchAnswer>(&body)
            .map(|a| a.results)
            .map_err(|_| "batch: HTTP 200 with an unexpected body".to_owned())
    }
}

/// The most codes one `POST /v1/claims:batch` may carry (SPEC §12).
pub const MAX_BATCH: usize = 1000;

/// One code's outcome: claimed (or already this tenant's), or why not.
pub type ClaimOutcome = Result<(), Failure>;

/// An error body (SPEC §6): `{"error","message"}`.
#[derive(Deserialize)]
struct ApiError {
    error: String,
}

/// `POST /v1/claims:batch`'s 200 body.
#[derive(Deserialize)]
struct BatchAnswer {
    results: Vec<BatchResult>,
}

/// One entry of `results`: `{"status":201|200,…}` or `{"status":4xx,"error","message"}`.
#[derive(Deserialize)]
struct BatchResult {
    status: u16,
    #[serde(default)]
    error: String,
}

/// The SPEC §6 error code of an error body ("" when it is not one).
fn error_code(body: &str) -> String {
    serde_json::from_str::<ApiError>(body)
        .map(|e| e.error)
        .unwrap_or_default()
}

/// A low-cardinality failure text: `HTTP 409 already_claimed` (or just the status).
fn http_failure(status: u16, error: &str) -> String {
    match error {
        "" => format!("HTTP {status}"),
        code => format!("HTTP {status} {code}"),
    }
}

/// Pairs `results` with the `count` codes sent; a missing result is a failure of its code.
fn batch_outcomes(count: usize, results: Vec<BatchResult>) -> Vec<ClaimOutcome> {
    let mut results = results.into_iter();
    (0..count)
        .map(|_| match results.next() {
            Some(BatchResult {
                status: 200 | 201, ..
            }) => Ok(()),
            Some(r) => Err(Failure::new("claim", http_failure(r.status, &r.error))),
            None => Err(Failure::new("claim", "batch: no result for this code")),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// A one-request HTTP server answering `status` with `body`; yields the request it read.
    async fn stub(status: &str, body: &str) -> (String, tokio::task::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let answer = format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
             connection: close\r\n\r\n{body}",
            body.len()
        );
        let served = tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut request = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                let n = sock.read(&mut buf).await.unwrap();
                request.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&request);
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let len: usize = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse().unwrap())
                        })
                        .unwrap_or(0);
                    if body.len() >= len {
                        break;
                    }
                }
            }
            sock.write_all(answer.as_bytes()).await.unwrap();
            String::from_utf8(request).unwrap()
        });
        (base, served)
    }

    fn details(outcomes: &[ClaimOutcome]) -> Vec<String> {
        outcomes
            .iter()
            .map(|o| match o {
                Ok(()) => "ok".to_owned(),
                Err(f) => f.detail.clone(),
            })
            .collect()
    }

    #[tokio::test]
    async fn batch_results_pair_with_codes_in_order() {
        let body = r#"{"results":[{"status":201,"device_id":"a","tenant":"t","state":"ready"},
            {"status":409,"error":"already_claimed","message":"m"},
            {"status":200,"device_id":"c","tenant":"t","state":"ready"}]}"#;
        let (base, served) = stub("200 OK", body).await;
        let api = Api::new(&base).unwrap();
        let codes: Vec<String> = ["A", "B", "C", "D"].map(String::from).into();
        let outcomes = api.claim_batch("tok", &codes).await;
        let expected = [
            "ok",
            "HTTP 409 already_claimed",
            "ok",
            "batch: no result for this code",
        ];
        assert_eq!(details(&outcomes), expected);
        let request = served.await.unwrap();
        assert!(
            request.starts_with("POST /v1/claims:batch HTTP/1.1\r\n"),
            "{request}"
        );
        assert!(
            request.contains("authorization: Bearer tok\r\n"),
            "{request}"
        );
        let body = request.split_once("\r\n\r\n").unwrap().1;
        let sent: serde_json::Value = serde_json::from_str(body).unwrap();
        let want = json!({"claims":[{"code":"A"},{"code":"B"},{"code":"C"},{"code":"D"}]});
        assert_eq!(sent, want);
    }

    #[tokio::test]
    async fn a_server_without_batches_fails_every_code() {
        let body = r#"{"error":"not_found","message":"no such route"}"#;
        let (base, _served) = stub("404 Not Found", body).await;
        let api = Api::new(&base).unwrap();
        let codes: Vec<String> = ["A", "B"].map(String::from).into();
        let outcomes = api.claim_batch("tok", &codes).await;
        assert_eq!(details(&outcomes), ["batch HTTP 404 not_found"; 2]);
    }

    #[tokio::test]
    async fn a_single_claim_of_the_same_tenant_again_is_ok() {
        let body = r#"{"device_id":"a","tenant":"t","state":"ready"}"#;
        let (base, _served) = stub("200 OK", body).await;
        assert!(Api::new(&base).unwrap().claim("tok", "A").await.is_ok());
        let body = r#"{"error":"invalid_code","message":"m"}"#;
        let (base, _served) = stub("403 Forbidden", body).await;
        let failure = Api::new(&base)
            .unwrap()
            .claim("tok", "A")
            .await
            .unwrap_err();
        assert_eq!(failure.detail, "HTTP 403 invalid_code");
    }
}
