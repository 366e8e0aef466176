//! The body of `POST /v1/tenants` and `PATCH /v1/tenants/{id}`, and its validation.

use serde::Deserialize;

use super::model::{Backend, BridgeSettings, Mode, Tenant};
use super::service::ServiceError;

/// Every tenant field, all optional: create requires `name`; PATCH changes what it names.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantInput {
    pub id: Option<String>,
    pub name: Option<String>,
    pub mode: Option<Mode>,
    #[serde(default, deserialize_with = "nullable")]
    pub endpoint: Option<Option<String>>,
    pub port: Option<u16>,
    #[serde(default, deserialize_with = "nullable")]
    pub region: Option<Option<String>>,
    pub backend: Option<Backend>,
    #[serde(default, deserialize_with = "nullable")]
    pub bridge: Option<Option<BridgeSettings>>,
    #[serde(default, deserialize_with = "nullable")]
    pub max_devices: Option<Option<u64>>,
}

fn invalid(msg: impl Into<String>) -> ServiceError {
    ServiceError::Invalid(msg.into())
}

/// Tenant ids appear in URLs, topics and metric labels: keep them plain.
pub fn valid_tenant_id(id: &str) -> bool {
    let b = id.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-' || *c == b'_')
}

/// A DNS name, an IPv4 address, or an IPv6 address (bare or in brackets) — never `host:port`,
/// the port is its own field.
fn valid_host(h: &str) -> bool {
    if h.is_empty() || h.len() > 253 {
        return false;
    }
    let inner = h.strip_prefix('[').and_then(|r| r.strip_suffix(']'));
    match inner {
        Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
        None if h.contains(':') => h.parse::<std::net::Ipv6Addr>().is_ok(),
        None => h
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b'_')),
    }
}

/// For PATCH: a field that is absent stays, `null` clears it, a value sets it.
fn nullable<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

impl TenantInput {
    /// A new tenant with id `id` (given or generated).
    pub fn into_tenant(self, id: String) -> Result<Tenant, ServiceError> {
        if !valid_tenant_id(&id) {
            return Err(invalid(
                "id: 1-63 characters of a-z, 0-9, '-' and '_', starting with a letter or digit",
            ));
        }
        let name = self
            .name
            .clone()
            .ok_or_else(|| invalid("name is required"))?;
        let base = Tenant {
            id,
            name,
            mode: Mode::Redirect,
            endpoint: None,
            port: 8883,
            region: None,
            backend: Backend::None,
            bridge: None,
            max_devices: None,
        };
        self.apply_to(base)
    }

    /// `tenant` with this input's fields applied, validated.
    pub fn apply_to(self, mut t: Tenant) -> Result<Tenant, ServiceError> {
        if let Some(id) = self.id {
            if id != t.id {
                return Err(invalid("id cannot be changed"));
            }
        }
        if let Some(v) = self.name {
            t.name = v;
        }
        if let Some(v) = self.mode {
            t.mode = v;
        }
        if let Some(v) = self.endpoint {
            t.endpoint = v;
        }
        if let Some(v) = self.port {
            t.port = v;
        }
        if let Some(v) = self.region {
            t.region = v;
        }
        if let Some(v) = self.backend {
            t.backend = v;
        }
        if let Some(v) = self.bridge {
            t.bridge = v;
        }
        if let Some(v) = self.max_devices {
            t.max_devices = v;
        }
        validate(&t)?;
        Ok(t)
    }
}

fn validate(t: &Tenant) -> Result<(), ServiceError> {
    if t.name.trim().is_empty() || t.name.len() > 200 {
        return Err(invalid("name: 1-200 characters"));
    }
    if t.port == 0 {
        return Err(invalid("port: 1-65535"));
    }
    match t.endpoint.as_deref() {
        Some(e) if !valid_host(e) => Err(invalid("endpoint: a host name or address")),
        None if t.mode == Mode::Redirect && t.backend == Backend::None => Err(invalid(
            "endpoint is required for a redirect-mode tenant without a backend to look it up",
        )),
        _ => Ok(()),
    }?;
    if t.mode == Mode::Bridge && (t.bridge.is_none() || t.endpoint.is_none()) {
        return Err(invalid(
            "bridge settings and an endpoint are required for mode \"bridge\"",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(json: &str) -> TenantInput {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn create_and_patch() {
        let t = input(r#"{"name":"Acme","endpoint":"iot.acme.example"}"#)
            .into_tenant("acme".into())
            .unwrap();
        assert_eq!(t.port, 8883);
        let t = input(r#"{"endpoint":"eu.acme.example","port":443}"#)
            .apply_to(t)
            .unwrap();
        assert_eq!(t.endpoint.as_deref(), Some("eu.acme.example"));
        assert_eq!(t.port, 443);
        let t = input(r#"{"max_devices":5}"#).apply_to(t).unwrap();
        assert_eq!(t.max_devices, Some(5));
        let t = input(r#"{"max_devices":null}"#).apply_to(t).unwrap();
        assert_eq!(t.max_devices, None);
        assert_eq!(t.endpoint.as_deref(), Some("eu.acme.example"));
    }

    #[test]
    fn endpoint_is_a_host_never_host_port() {
        for ok in [
            "iot.example.com",
            "10.0.0.1",
            "::1",
            "[2001:db8::1]",
            "a_b-c",
        ] {
            assert!(valid_host(ok), "{ok}");
        }
        for bad in [
            "iot.example.com:8883",
            "a b",
            "",
            "[nope]",
            "1.2.3.4:1",
            "ex/ample",
        ] {
            assert!(!valid_host(bad), "{bad}");
        }
    }

    #[test]
    fn rejects_bad_input() {
        assert!(input(r#"{"name":"x"}"#).into_tenant("acme".into()).is_err());
        assert!(input(r#"{"name":"x","endpoint":"a b"}"#)
            .into_tenant("acme".into())
            .is_err());
        assert!(input(r#"{"name":"x","endpoint":"a"}"#)
            .into_tenant("Bad Id".into())
            .is_err());
        assert!(serde_json::from_str::<TenantInput>(r#"{"nmae":"x"}"#).is_err());
        assert!(valid_tenant_id("t-1_a"));
        assert!(!valid_tenant_id("-a"));
        assert!(!valid_tenant_id(""));
    }
}
