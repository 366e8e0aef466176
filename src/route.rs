//! The route decision: given a device's claim and its tenant, what happens to the device now.
//! Pure (no I/O, no clock), so it is unit-tested and benched on its own; the session acts on it.
//! Also builds the device-facing payloads of SPEC §4.

use std::sync::Arc;

use serde::Serialize;

use crate::device::DeviceId;
use crate::model::{rfc3339, Claim, ClaimState, Mode, Tenant};

/// Where the device should be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Stay connected and wait; `state` is what the status topic says.
    Wait {
        state: ClaimState,
        tenant: Option<Arc<str>>,
    },
    /// Go to the tenant's endpoint.
    Redirect(Redirect),
    /// Stay and have traffic relayed to the tenant (bridge mode), on the tenant's topics filled
    /// in with `thing_name`, the claim's (unique in the tenant).
    Bridge {
        tenant: Arc<str>,
        thing_name: String,
    },
    /// Revoked: close.
    Refuse,
}

/// A due redirect: everything the redirect payload and a v5 Server Reference need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redirect {
    pub redirect_id: String,
    pub tenant: Arc<str>,
    pub endpoint: String,
    pub port: u16,
    pub region: Option<String>,
    pub thing_name: String,
    /// Unix ms when the claim became ready.
    pub issued_at: i64,
}

impl Redirect {
    /// The v5 Server Reference property value: `endpoint:port`.
    pub fn server_reference(&self) -> String {
        if self.endpoint.contains(':') && !self.endpoint.starts_with('[') {
            format!("[{}]:{}", self.endpoint, self.port) // a bare IPv6 address
        } else {
            format!("{}:{}", self.endpoint, self.port)
        }
    }
}

/// What the route decision needs of a claim: all the claims map holds of one (the rest of a
/// claim is read from the store where the API shows it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimView {
    pub device_id: DeviceId,
    pub state: ClaimState,
    pub tenant: Option<Arc<str>>,
    pub thing_name: ThingName,
    pub redirect_id: Option<RedirectId>,
    /// The redirect's `issued_at`: the claim's `ready_at`, else `claimed_at`, else 0.
    pub issued_at: i64,
}

/// A claim's thing name as the map holds it: almost always the device's own name or its id,
/// which the map does not spell out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ThingName {
    /// Unnamed.
    None,
    /// The device's own name (`device::thing_name_for` of its certificate's CN).
    Own,
    /// The device id in hex.
    DeviceId,
    /// Any other name.
    Text(Arc<str>),
    /// Named, but the map does not know the name: loaded from the store before the device was
    /// seen. Settled when the device connects (its certificate tells whether it is its own).
    Unknown,
}

/// A redirect id as the map holds it: `r-` and 24 lowercase hex digits as their 12 bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedirectId {
    Raw([u8; 12]),
    /// Any other spelling (never made by this lobby, kept as stored).
    Text(Arc<str>),
}

impl RedirectId {
    /// The compact form of `id` when it has the lobby's own shape.
    pub fn of(id: &str) -> Self {
        let mut raw = [0u8; 12];
        match id.strip_prefix("r-") {
            Some(h)
                if h.len() == 24
                    && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
                    && hex::decode_to_slice(h, &mut raw).is_ok() =>
            {
                Self::Raw(raw)
            }
            _ => Self::Text(Arc::from(id)),
        }
    }
}

impl std::fmt::Display for RedirectId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Raw(raw) => write!(f, "r-{}", hex::encode(raw)),
            Self::Text(t) => f.write_str(t),
        }
    }
}

impl ClaimView {
    /// The view of a full claim (its name as text, or the device id).
    pub fn of(c: &Claim) -> Self {
        Self {
            device_id: c.device_id,
            state: c.state,
            tenant: c.tenant.clone(),
            thing_name: match c.thing_name.as_deref() {
                None => ThingName::None,
                Some(n) if is_hex_of(n, &c.device_id) => ThingName::DeviceId,
                Some(n) => ThingName::Text(Arc::from(n)),
            },
            redirect_id: c.redirect_id.as_deref().map(RedirectId::of),
            issued_at: c.ready_at.or(c.claimed_at).unwrap_or(0),
        }
    }

    /// The tenant id as a plain `&str`.
    pub fn tenant_id(&self) -> Option<&str> {
        self.tenant.as_deref()
    }

    /// Claimed (and not revoked) without a thing name yet ([`Claim::unnamed`]).
    pub fn unnamed(&self) -> bool {
        self.thing_name == ThingName::None
            && self.tenant.is_some()
            && self.state != ClaimState::Revoked
    }

    /// The thing name spelled out, `own` standing for the device's own; `None` when unnamed
    /// or unknown.
    fn name(&self, own: &str) -> Option<String> {
        match &self.thing_name {
            ThingName::None | ThingName::Unknown => None,
            ThingName::Own => Some(own.to_owned()),
            ThingName::DeviceId => Some(self.device_id.to_hex()),
            ThingName::Text(t) => Some(t.to_string()),
        }
    }
}

/// `name` is the lowercase hex of `id`.
pub fn is_hex_of(name: &str, id: &DeviceId) -> bool {
    let mut raw = [0u8; 32];
    name.len() == 64
        && !name.bytes().any(|b| b.is_ascii_uppercase())
        && hex::decode_to_slice(name, &mut raw).is_ok()
        && raw == id.0
}

/// Decides the route. `thing_name` is the device's own name (`device::thing_name_for` of its
/// CN), put in a redirect when the claim has none. A bridged device needs the claim's name (its
/// topics must be its own in the tenant): without one it waits, `ready`, until it is named.
/// A claim whose name the map does not know yet ([`ThingName::Unknown`]) waits, `ready`, too:
/// the device's connection settles it and wakes the session.
pub fn decide(claim: Option<&ClaimView>, tenant: Option<&Tenant>, thing_name: &str) -> Route {
    let Some(claim) = claim else {
        return Route::Wait {
            state: ClaimState::Unclaimed,
            tenant: None,
        };
    };
    let wait = || Route::Wait {
        state: claim.state,
        tenant: claim.tenant.clone(),
    };
    match claim.state {
        ClaimState::Revoked => Route::Refuse,
        ClaimState::Unclaimed | ClaimState::Registering | ClaimState::Failed => wait(),
        ClaimState::Ready => {
            let (Some(tenant), Some(tenant_id)) = (tenant, claim.tenant.clone()) else {
                return wait();
            };
            if tenant.mode == Mode::Bridge {
                return match claim.name(thing_name) {
                    Some(name) => Route::Bridge {
                        tenant: tenant_id,
                        thing_name: name,
                    },
                    None => wait(),
                };
            }
            if claim.thing_name == ThingName::Unknown {
                return wait();
            }
            match (&tenant.endpoint, &claim.redirect_id) {
                (Some(endpoint), Some(redirect_id)) if !endpoint.is_empty() => {
                    Route::Redirect(Redirect {
                        redirect_id: redirect_id.to_string(),
                        tenant: tenant_id,
                        endpoint: endpoint.clone(),
                        port: tenant.port,
                        region: tenant.region.clone(),
                        thing_name: claim
                            .name(thing_name)
                            .unwrap_or_else(|| thing_name.to_owned()),
                        issued_at: claim.issued_at,
                    })
                }
                _ => wait(),
            }
        }
    }
}

impl Route {
    /// The state the status topic reports for this route.
    pub fn status(&self) -> (ClaimState, Option<&str>) {
        match self {
            Route::Wait { state, tenant } => (*state, tenant.as_deref()),
            Route::Redirect(r) => (ClaimState::Ready, Some(&r.tenant)),
            Route::Bridge { tenant, .. } => (ClaimState::Ready, Some(tenant)),
            Route::Refuse => (ClaimState::Revoked, None),
        }
    }
}

#[derive(Serialize)]
struct StatusPayload<'a> {
    v: u8,
    device_id: &'a str,
    state: ClaimState,
    tenant: Option<&'a str>,
}

#[derive(Serialize)]
struct RedirectPayload<'a> {
    v: u8,
    redirect_id: &'a str,
    device_id: &'a str,
    tenant: &'a str,
    endpoint: &'a str,
    port: u16,
    region: Option<&'a str>,
    thing_name: &'a str,
    issued_at: String,
}

/// `{"v":1,"device_id","state","tenant"}` for `…/status`.
pub fn status_payload(id: &DeviceId, state: ClaimState, tenant: Option<&str>) -> Vec<u8> {
    let device_id = id.to_hex();
    serde_json::to_vec(&StatusPayload {
        v: 1,
        device_id: &device_id,
        state,
        tenant,
    })
    .unwrap_or_default()
}

/// The `…/redirect` payload.
pub fn redirect_payload(id: &DeviceId, r: &Redirect) -> Vec<u8> {
    let device_id = id.to_hex();
    serde_json::to_vec(&RedirectPayload {
        v: 1,
        redirect_id: &r.redirect_id,
        device_id: &device_id,
        tenant: &r.tenant,
        endpoint: &r.endpoint,
        port: r.port,
        region: r.region.as_deref(),
        thing_name: &r.thing_name,
        issued_at: rfc3339(r.issued_at),
    })
    .unwrap_or_default()
}

/// The topic prefix a device owns: `$lobby/devices/<device_id>/`.
pub fn device_prefix(id: &DeviceId) -> String {
    format!("$lobby/devices/{}/", id.to_hex())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(state: ClaimState) -> Claim {
        Claim {
            device_id: DeviceId([1; 32]),
            tenant: Some("acme".into()),
            state,
            thing_name: None,
            redirect_id: Some("r-1".into()),
            claimed_at: Some(1),
            ready_at: Some(2),
            redirected_at: None,
            error: None,
            attempts: 0,
            next_attempt_at: None,
            version: 0,
        }
    }

    fn view(state: ClaimState) -> ClaimView {
        ClaimView::of(&claim(state))
    }

    fn tenant() -> Tenant {
        serde_json::from_str(
            r#"{"id":"acme","name":"Acme","endpoint":"iot.acme.example","port":8884,"region":"eu-west-1"}"#,
        )
        .unwrap()
    }

    #[test]
    fn unclaimed_waits() {
        let r = decide(None, None, "cn");
        assert_eq!(r.status(), (ClaimState::Unclaimed, None));
    }

    #[test]
    fn ready_redirects_with_server_reference() {
        let Route::Redirect(r) = decide(Some(&view(ClaimState::Ready)), Some(&tenant()), "cn")
        else {
            panic!("expected a redirect")
        };
        assert_eq!(r.server_reference(), "iot.acme.example:8884");
        assert_eq!(r.thing_name, "cn");
        assert_eq!(r.issued_at, 2);
        let p: serde_json::Value =
            serde_json::from_slice(&redirect_payload(&DeviceId([1; 32]), &r)).unwrap();
        assert_eq!(p["redirect_id"], "r-1");
        assert_eq!(p["port"], 8884);
        assert_eq!(p["region"], "eu-west-1");
        assert_eq!(p["v"], 1);
    }

    #[test]
    fn registering_failed_revoked_and_missing_tenant() {
        let t = tenant();
        for s in [ClaimState::Registering, ClaimState::Failed] {
            assert_eq!(decide(Some(&view(s)), Some(&t), "cn").status().0, s);
        }
        assert_eq!(
            decide(Some(&view(ClaimState::Revoked)), Some(&t), "cn"),
            Route::Refuse
        );
        // A ready claim whose tenant vanished waits rather than redirecting nowhere.
        assert!(matches!(
            decide(Some(&view(ClaimState::Ready)), None, "cn"),
            Route::Wait { .. }
        ));
    }

    #[test]
    fn bridge_tenant_stays() {
        let mut t = tenant();
        t.mode = Mode::Bridge;
        let mut c = claim(ClaimState::Ready);
        // Not named yet: it waits, ready, and never bridges under its certificate's name.
        assert_eq!(
            decide(Some(&ClaimView::of(&c)), Some(&t), "cn"),
            Route::Wait {
                state: ClaimState::Ready,
                tenant: Some("acme".into())
            }
        );
        c.thing_name = Some("dev-1".into());
        assert_eq!(
            decide(Some(&ClaimView::of(&c)), Some(&t), "cn"),
            Route::Bridge {
                tenant: "acme".into(),
                thing_name: "dev-1".into()
            }
        );
    }

    #[test]
    fn names_and_redirect_ids_as_the_map_holds_them() {
        let t = tenant();
        let mut v = view(ClaimState::Ready);
        v.redirect_id = Some(RedirectId::of("r-00112233445566778899aabb"));
        assert!(matches!(v.redirect_id, Some(RedirectId::Raw(_))));
        for (name, expected) in [
            (ThingName::Own, Some("cn".to_owned())),
            (ThingName::DeviceId, Some(DeviceId([1; 32]).to_hex())),
            (ThingName::Text("dev-7".into()), Some("dev-7".to_owned())),
            (ThingName::None, Some("cn".to_owned())),
            (ThingName::Unknown, None),
        ] {
            v.thing_name = name;
            match decide(Some(&v), Some(&t), "cn") {
                Route::Redirect(r) => {
                    assert_eq!(Some(r.thing_name), expected);
                    assert_eq!(r.redirect_id, "r-00112233445566778899aabb");
                }
                other => assert_eq!(expected, None, "{other:?}"),
            }
        }
        // Other spellings stay text, as stored.
        for odd in [
            "r-1",
            "r-00112233445566778899AABB",
            "x-00112233445566778899aabb",
        ] {
            assert_eq!(RedirectId::of(odd).to_string(), odd);
            assert!(matches!(RedirectId::of(odd), RedirectId::Text(_)));
        }
        let hex = DeviceId([0xab; 32]).to_hex();
        assert!(is_hex_of(&hex, &DeviceId([0xab; 32])));
        assert!(!is_hex_of(&hex.to_uppercase(), &DeviceId([0xab; 32])));
        assert!(!is_hex_of(&hex, &DeviceId([1; 32])));
    }

    #[test]
    fn status_json_shape() {
        let p: serde_json::Value = serde_json::from_slice(&status_payload(
            &DeviceId([1; 32]),
            ClaimState::Unclaimed,
            None,
        ))
        .unwrap();
        assert_eq!(p["state"], "unclaimed");
        assert!(p["tenant"].is_null());
        assert_eq!(p["device_id"].as_str().unwrap().len(), 64);
    }
}
