//! Topic rules of SPEC §4: a device may subscribe and publish only under its own prefix
//! `$lobby/devices/<device_id>/` (plus the AWS device-lobby sample topics in compat mode), and
//! the subscriptions a session holds, to decide what it is sent.

use crate::mqtt::codec::QoS;
use crate::mqtt::topic::{filter_matches, valid_topic_filter, valid_topic_name};

/// The AWS device-lobby sample firmware publishes its heartbeats here.
pub const AWS_LOBBY_HEARTBEAT: &str = "$aws/rules/lobby";

/// What one device may touch.
#[derive(Debug, Clone)]
pub struct Acl {
    /// `$lobby/devices/<device_id>/`
    prefix: String,
    /// `lobby/<CN>` when `compat.aws_device_lobby` is on.
    compat_topic: Option<String>,
}

/// Why a filter or topic was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not valid MQTT syntax.
    Invalid,
    /// Valid, but not this device's.
    NotAuthorized,
}

impl Acl {
    /// Rules for the device with topic prefix `prefix`.
    pub fn new(prefix: String, compat_topic: Option<String>) -> Self {
        Self {
            prefix,
            compat_topic,
        }
    }

    /// `…/status`, `…/redirect`, `…/ack` of this device.
    pub fn topic(&self, leaf: &str) -> String {
        format!("{}{leaf}", self.prefix)
    }

    /// The compat topic `lobby/<CN>`, when enabled.
    pub fn compat_topic(&self) -> Option<&str> {
        self.compat_topic.as_deref()
    }

    /// May the device subscribe to `filter`? Wildcards are fine inside the prefix
    /// (`…/#`, `…/+`); a filter that could match anything outside it is refused.
    pub fn check_subscribe(&self, filter: &str) -> Result<(), Refusal> {
        if !valid_topic_filter(filter) {
            return Err(Refusal::Invalid);
        }
        if self.compat_topic.as_deref() == Some(filter) {
            return Ok(());
        }
        match filter.strip_prefix(self.prefix.as_str()) {
            Some(rest) if !rest.is_empty() => Ok(()),
            _ => Err(Refusal::NotAuthorized),
        }
    }

    /// May the device publish to `topic`?
    pub fn check_publish(&self, topic: &str) -> Result<(), Refusal> {
        if !valid_topic_name(topic) {
            return Err(Refusal::Invalid);
        }
        if self.compat_topic.is_some() && topic == AWS_LOBBY_HEARTBEAT {
            return Ok(());
        }
        match topic.strip_prefix(self.prefix.as_str()) {
            Some(rest) if !rest.is_empty() => Ok(()),
            _ => Err(Refusal::NotAuthorized),
        }
    }
}

/// The filters a session holds, with their granted QoS.
#[derive(Debug, Default, Clone)]
pub struct Subscriptions {
    filters: Vec<(String, QoS)>,
}

impl Subscriptions {
    /// Adds or replaces `filter`; false when the session already holds `max`
    /// (`limits.max_subscriptions`).
    pub fn add(&mut self, filter: &str, qos: QoS, max: usize) -> bool {
        if let Some(entry) = self.filters.iter_mut().find(|(f, _)| f == filter) {
            entry.1 = qos;
            return true;
        }
        if self.filters.len() >= max {
            return false;
        }
        self.filters.push((filter.to_owned(), qos));
        true
    }

    /// Removes `filter`; true if it was held.
    pub fn remove(&mut self, filter: &str) -> bool {
        let before = self.filters.len();
        self.filters.retain(|(f, _)| f != filter);
        self.filters.len() != before
    }

    /// The QoS to deliver `topic` at (the highest of the matching filters), if subscribed.
    pub fn granted(&self, topic: &str) -> Option<QoS> {
        self.filters
            .iter()
            .filter(|(f, _)| filter_matches(f, topic))
            .map(|(_, q)| *q)
            .max()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl() -> Acl {
        Acl::new("$lobby/devices/ab/".into(), Some("lobby/dev-1".into()))
    }

    #[test]
    fn subscribe_rules() {
        let a = acl();
        for ok in [
            "$lobby/devices/ab/status",
            "$lobby/devices/ab/#",
            "$lobby/devices/ab/+",
            "lobby/dev-1",
        ] {
            assert_eq!(a.check_subscribe(ok), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("#", Refusal::NotAuthorized),
            ("$lobby/devices/+/status", Refusal::NotAuthorized),
            ("$lobby/devices/ab", Refusal::NotAuthorized),
            ("$lobby/devices/ab/", Refusal::NotAuthorized),
            ("$lobby/devices/abc/status", Refusal::NotAuthorized),
            ("$lobby/devices/cd/#", Refusal::NotAuthorized),
            ("lobby/dev-2", Refusal::NotAuthorized),
            ("$lobby/devices/ab/st#", Refusal::Invalid),
            ("", Refusal::Invalid),
        ] {
            assert_eq!(a.check_subscribe(bad), Err(why), "{bad}");
        }
    }

    #[test]
    fn publish_rules() {
        let a = acl();
        assert_eq!(a.check_publish("$lobby/devices/ab/ack"), Ok(()));
        assert_eq!(a.check_publish(AWS_LOBBY_HEARTBEAT), Ok(()));
        assert_eq!(
            a.check_publish("$lobby/devices/cd/ack"),
            Err(Refusal::NotAuthorized)
        );
        assert_eq!(
            a.check_publish("$lobby/devices/ab/+"),
            Err(Refusal::Invalid)
        );
        let plain = Acl::new("$lobby/devices/ab/".into(), None);
        assert_eq!(
            plain.check_publish(AWS_LOBBY_HEARTBEAT),
            Err(Refusal::NotAuthorized)
        );
    }

    #[test]
    fn granted_is_highest_match() {
        let mut s = Subscriptions::default();
        assert!(s.add("$lobby/devices/ab/#", QoS::AtMostOnce, 2));
        assert!(s.add("$lobby/devices/ab/redirect", QoS::AtLeastOnce, 2));
        assert!(
            !s.add("$lobby/devices/ab/status", QoS::AtLeastOnce, 2),
            "at the maximum"
        );
        assert!(
            s.add("$lobby/devices/ab/#", QoS::AtLeastOnce, 2),
            "a replacement is not new"
        );
        assert!(s.add("$lobby/devices/ab/#", QoS::AtMostOnce, 2));
        assert_eq!(
            s.granted("$lobby/devices/ab/redirect"),
            Some(QoS::AtLeastOnce)
        );
        assert_eq!(s.granted("$lobby/devices/ab/status"), Some(QoS::AtMostOnce));
        assert!(s.remove("$lobby/devices/ab/#"));
        assert_eq!(s.granted("$lobby/devices/ab/status"), None);
    }
}
