//! The lobby's HTTP API as the claim and bridge scenarios use it (SPEC §6): create a tenant, claim devices.

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
        let client = Client::builder()
            .pool_max_idle_per_host(64)
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

    /// Claims one device with a tenant token; only 201 counts as success.
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
            StatusCode::CREATED => Ok(()),
            status => Err(Failure::new("claim", format!("HTTP {status}"))),
        }
    }
}
