//! The body of `POST /v1/tenants` and `PATCH /v1/tenants/{id}`, and its validation.

use serde::Deserialize;

use super::error::ServiceError;
use crate::device::{self, DeviceId};
use crate::model::{Backend, BridgeSettings, Mode, Tenant};
use crate::mqtt::topic::valid_topic_filter;

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
            t.backend = with_external_id(v, &t.backend);
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
    if let Some(b) = &t.bridge {
        validate_bridge_topics(&b.topics)?;
    }
    if let Backend::AwsIot(aws) = &t.backend {
        validate_thing_template(aws.thing_name.as_deref().unwrap_or(""))?;
        if !valid_role_arn(&aws.role_arn) {
            return Err(invalid(
                "backend.role_arn: an IAM role ARN, arn:aws:iam::<12-digit account>:role/<name>",
            ));
        }
        if !valid_external_id(&aws.external_id) {
            return Err(invalid(
                "backend.external_id: 2-1224 characters of letters, digits and +=,.@:/_- \
                 (leave it out and the lobby makes one)",
            ));
        }
    }
    Ok(())
}

/// An aws-iot backend without an `external_id` keeps the one it had (a PATCH that restates the
/// backend), or gets a new one: 160 random bits, so no other tenant of any lobby can guess it.
fn with_external_id(new: Backend, old: &Backend) -> Backend {
    let Backend::AwsIot(mut aws) = new else {
        return new;
    };
    if aws.external_id.is_empty() {
        aws.external_id = match old {
            Backend::AwsIot(was) if !was.external_id.is_empty() => was.external_id.clone(),
            _ => {
                let mut bytes = [0u8; 20];
                rand::RngCore::fill_bytes(&mut rand::rng(), &mut bytes);
                format!("lobby-{}", hex::encode(bytes))
            }
        };
    }
    Backend::AwsIot(aws)
}

/// `arn:<partition>:iam::<account>:role/<path><name>` as IAM makes them: a 12-digit account,
/// a path of printable ASCII, a name of 1-64 of `[A-Za-z0-9+=,.@_-]`.
pub fn valid_role_arn(arn: &str) -> bool {
    let mut parts = arn.splitn(6, ':');
    let (Some("arn"), Some(partition), Some("iam"), Some(""), Some(account), Some(resource)) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return false;
    };
    let partition_ok = partition == "aws"
        || partition.strip_prefix("aws-").is_some_and(|p| {
            !p.is_empty() && p.bytes().all(|c| c.is_ascii_lowercase() || c == b'-')
        });
    let account_ok = account.len() == 12 && account.bytes().all(|c| c.is_ascii_digit());
    let Some(path_and_name) = resource.strip_prefix("role/") else {
        return false;
    };
    let (path, name) = match path_and_name.rsplit_once('/') {
        Some((path, name)) => (path, name),
        None => ("", path_and_name),
    };
    let name_char = |c: u8| c.is_ascii_alphanumeric() || b"+=,.@_-".contains(&c);
    // IAM allows any printable ASCII in a path.
    let path_ok = path.len() <= 510 && path.bytes().all(|c| (0x21..=0x7e).contains(&c));
    partition_ok
        && account_ok
        && path_ok
        && (1..=64).contains(&name.len())
        && name.bytes().all(name_char)
        && arn.len() <= 2048
}

/// STS's rule for `ExternalId`: 2-1224 characters of `[\w+=,.@:/-]`.
fn valid_external_id(id: &str) -> bool {
    (2..=1224).contains(&id.len())
        && id
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"+=,.@:/_-".contains(&c))
}

/// Most `bridge.topics` a tenant may list (each is checked on every device publish).
const MAX_BRIDGE_TOPICS: usize = 32;
/// Longest `bridge.topics` entry, before its placeholders are filled in.
const MAX_BRIDGE_TOPIC_LEN: usize = 512;

/// Does `template` use only the placeholders `fill_template` knows (and no other brace)?
fn known_placeholders(template: &str) -> bool {
    let mut rest = template;
    while let Some(i) = rest.find(['{', '}']) {
        let tail = &rest[i..];
        match device::PLACEHOLDERS.iter().find(|p| tail.starts_with(**p)) {
            Some(p) => rest = &tail[p.len()..],
            None => return false,
        }
    }
    true
}

/// `bridge.topics`: MQTT filters, placeholders only where a name fits. Checked filled in
/// with a sample name: what a device gets is that with its own name, which is one literal
/// level's worth of `[a-zA-Z0-9:_-]` ([`device::fill_template`]).
fn validate_bridge_topics(topics: &[String]) -> Result<(), ServiceError> {
    if topics.len() > MAX_BRIDGE_TOPICS {
        return Err(invalid(format!(
            "bridge.topics: at most {MAX_BRIDGE_TOPICS} patterns"
        )));
    }
    let sample = DeviceId([0; 32]);
    for t in topics {
        let filled = device::fill_template(t, "sample", &sample);
        if t.is_empty()
            || t.len() > MAX_BRIDGE_TOPIC_LEN
            || !known_placeholders(t)
            || !valid_topic_filter(&filled)
        {
            return Err(invalid(format!(
                "bridge.topics: {t:?} is not an MQTT topic filter of at most \
                 {MAX_BRIDGE_TOPIC_LEN} bytes using only {{thing_name}}, {{cn}} and {{device_id}}"
            )));
        }
    }
    Ok(())
}

/// `backend.thing_name`: empty (the device's own name), or a template that names each device
/// apart (it has `{cn}`, `{thing_name}` or `{device_id}`) and otherwise holds only thing-name
/// characters. A device whose filled-in name would still be invalid (too long) is named by its
/// device id.
fn validate_thing_template(template: &str) -> Result<(), ServiceError> {
    if template.is_empty() {
        return Ok(());
    }
    let filled = device::fill_template(template, "x", &DeviceId([0; 32]));
    let names_apart = device::PLACEHOLDERS.iter().any(|p| template.contains(p));
    if !known_placeholders(template) || !names_apart || !device::is_valid_thing_name(&filled) {
        return Err(invalid(
            "backend.thing_name: a template of a-z, A-Z, 0-9, ':', '_', '-' with {cn} or \
             {device_id}, at most 128 characters filled in",
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

    #[test]
    fn bridge_topic_templates() {
        for ok in [
            "things/{thing_name}/#",
            "ids/{device_id}/up",
            "c/{cn}",
            "fleet/#",
            "$aws/things/{thing_name}/shadow/#",
            "dev-{thing_name}/+",
        ] {
            assert!(validate_bridge_topics(&[ok.into()]).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "things/#/x",
            "things/{thing}/#",
            "things/{thing_name/#",
            "a}b",
            "a+/b",
            "nul\0",
        ] {
            assert!(validate_bridge_topics(&[bad.into()]).is_err(), "{bad:?}");
        }
        assert!(validate_bridge_topics(&vec!["a".to_string(); 33]).is_err());
        assert!(validate_bridge_topics(&["a".repeat(513)]).is_err());
    }

    #[test]
    fn thing_name_templates() {
        for ok in [
            "",
            "{cn}",
            "acme-{cn}",
            "acme:{device_id}",
            "{thing_name}_x",
        ] {
            assert!(validate_thing_template(ok).is_ok(), "{ok}");
        }
        for bad in [
            "fixed",
            "a/{cn}",
            "a b{cn}",
            "{nope}",
            "+{cn}",
            &"a".repeat(128),
        ] {
            assert!(validate_thing_template(bad).is_err(), "{bad:?}");
        }
    }

    fn aws(extra: &str) -> String {
        format!(
            r#"{{"name":"Acme","backend":{{"kind":"aws-iot","region":"eu-west-1",
               "role_arn":"arn:aws:iam::111122223333:role/lobby","policy_name":"p"{extra}}}}}"#
        )
    }

    fn external_id(t: &Tenant) -> &str {
        match &t.backend {
            Backend::AwsIot(a) => &a.external_id,
            Backend::None => panic!("no aws backend"),
        }
    }

    #[test]
    fn a_left_out_external_id_is_made_random_and_kept_on_patch() {
        let a = input(&aws("")).into_tenant("a".into()).unwrap();
        let b = input(&aws("")).into_tenant("b".into()).unwrap();
        let id = external_id(&a).to_owned();
        assert!(id.starts_with("lobby-") && id.len() == 6 + 40, "{id}");
        assert!(valid_external_id(&id));
        assert_ne!(id, external_id(&b), "each tenant its own");
        // A PATCH restating the backend without it keeps it; one that names one sets it.
        let a = input(&aws("").replace(r#""name":"Acme","#, ""))
            .apply_to(a)
            .unwrap();
        assert_eq!(external_id(&a), id);
        let a = input(&aws(r#","external_id":"mine-1""#).replace(r#""name":"Acme","#, ""))
            .apply_to(a)
            .unwrap();
        assert_eq!(external_id(&a), "mine-1");
        let given = input(&aws(r#","external_id":"ext-42""#))
            .into_tenant("c".into())
            .unwrap();
        assert_eq!(external_id(&given), "ext-42");
    }

    #[test]
    fn external_ids_follow_sts_rules() {
        for bad in ["x", "has space", "nul\\u0000", &"a".repeat(1225), "é-é"] {
            let body = aws(&format!(r#","external_id":"{bad}""#));
            let err = input(&body).into_tenant("t".into()).unwrap_err();
            assert!(err.to_string().contains("external_id"), "{bad:?}: {err}");
        }
        for ok in ["x1", "a+b=c,d.e@f:g/h_i-j", &"a".repeat(1224)] {
            let body = aws(&format!(r#","external_id":"{ok}""#));
            assert!(input(&body).into_tenant("t".into()).is_ok(), "{ok:?}");
        }
    }

    #[test]
    fn role_arns_are_iam_role_arns() {
        for ok in [
            "arn:aws:iam::111122223333:role/lobby",
            "arn:aws:iam::111122223333:role/service-role/lobby-tenant",
            "arn:aws:iam::111122223333:role/a/b/c/name+=,.@_-",
            "arn:aws-cn:iam::111122223333:role/lobby",
            "arn:aws-us-gov:iam::111122223333:role/lobby",
        ] {
            assert!(valid_role_arn(ok), "{ok}");
        }
        for bad in [
            "",
            "lobby",
            "arn:aws:iam::111122223333:user/lobby",
            "arn:aws:iam::111122223333:role/",
            "arn:aws:iam::11112222333:role/lobby",
            "arn:aws:iam::1111222233334:role/lobby",
            "arn:aws:iam:eu-west-1:111122223333:role/lobby",
            "arn:aws:sts::111122223333:assumed-role/lobby/s",
            "arn:aws:iam::111122223333:role/has space",
            "arn:aws:iam::111122223333:role/*",
            "arn:azure:iam::111122223333:role/lobby",
            "arn:aws:iam::111122223333:role/pa th/lobby",
        ] {
            assert!(!valid_role_arn(bad), "{bad}");
            let body = aws("").replace("arn:aws:iam::111122223333:role/lobby", bad);
            let err = input(&body).into_tenant("t".into()).unwrap_err();
            assert!(err.to_string().contains("role_arn"), "{bad}: {err}");
        }
        let long = format!("arn:aws:iam::111122223333:role/{}/n", "p".repeat(2100));
        assert!(!valid_role_arn(&long));
    }
}
