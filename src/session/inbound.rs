//! What a device sends, after CONNECT: PUBLISH (its own topics, the redirect ack, bridged
//! topics), SUBSCRIBE and UNSUBSCRIBE, each checked against the topic rules of SPEC §4.

use tokio::io::{AsyncRead, AsyncWrite};

use super::acl::Refusal;
use super::{codec_topic_match, End, Session, Step};
use crate::mqtt::codec::{self, Packet, Protocol, Publish, QoS};
use crate::mqtt::reason;
use crate::route::Route;

impl<S> Session<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    pub(super) async fn on_publish(&mut self, p: Publish) -> Step {
        if p.properties.topic_alias.is_some() {
            // CONNACK announced Topic Alias Maximum 0.
            return self.refuse_hard(reason::TOPIC_ALIAS_INVALID).await;
        }
        if p.qos == QoS::ExactlyOnce {
            return self.refuse_hard(reason::QOS_NOT_SUPPORTED).await;
        }
        match self.acl.check_publish(&p.topic) {
            Ok(()) => {}
            Err(Refusal::Invalid) => return self.refuse_hard(reason::TOPIC_NAME_INVALID).await,
            Err(Refusal::NotAuthorized)
                if self
                    .bridge
                    .as_ref()
                    .is_some_and(|b| b.allows_publish(&p.topic)) =>
            {
                return self.bridge_publish(p).await;
            }
            Err(Refusal::NotAuthorized) => {
                if self.protocol == Protocol::V5 && p.qos == QoS::AtLeastOnce {
                    self.send_puback(p.pkid, reason::NOT_AUTHORIZED);
                    return Ok(());
                }
                self.send_disconnect(reason::NOT_AUTHORIZED, None);
                let _ = self.flush().await;
                return Err(End::Forbidden);
            }
        }
        if p.qos == QoS::AtLeastOnce {
            self.send_puback(p.pkid, reason::SUCCESS);
        }
        if p.topic == self.acl.topic("ack") && self.is_ack_of_sent_redirect(&p.payload) {
            self.flush().await?;
            return Err(End::Redirected);
        }
        Ok(())
    }

    /// Charges a PUBLISH to the device's publish rates; past one, the session pauses reading
    /// (backpressure: QoS 1 stays safe, nothing is dropped) until the debt is repaid.
    pub(super) fn pace_publish(&mut self, p: &Publish) {
        let bytes = (p.topic.len() + p.payload.len()) as f64;
        let until = [
            self.publish_pace.as_mut().and_then(|b| b.spend(1.0)),
            self.publish_bytes_pace
                .as_mut()
                .and_then(|b| b.spend(bytes)),
        ]
        .into_iter()
        .flatten()
        .max();
        if until.is_some() {
            self.paused_until = until;
        }
    }

    /// `{"redirect_id": …}` naming the redirect this session delivered.
    pub(super) fn is_ack_of_sent_redirect(&self, payload: &[u8]) -> bool {
        #[derive(serde::Deserialize)]
        struct Ack {
            redirect_id: String,
        }
        match (serde_json::from_slice::<Ack>(payload), &self.redirect_sent) {
            (Ok(ack), Some(sent)) => &ack.redirect_id == sent,
            _ => false,
        }
    }

    /// Closes the connection for a protocol violation (v5 with a DISCONNECT reason first).
    pub(super) async fn refuse_hard(&mut self, code: u8) -> Step {
        self.send_disconnect(code, None);
        let _ = self.flush().await;
        Err(End::ProtocolError)
    }

    pub(super) fn on_subscribe(&mut self, sub: codec::Subscribe) -> Step {
        let mut codes = Vec::with_capacity(sub.filters.len());
        let mut added = Vec::new();
        for f in &sub.filters {
            // The lobby serves QoS 0 and 1: a QoS 2 request is granted 1.
            let qos = f.qos.min(QoS::AtLeastOnce);
            let code = match self.acl.check_subscribe(&f.filter) {
                Ok(()) => {
                    if self.subs.add(&f.filter, qos, self.limits.max_subscriptions) {
                        added.push(f.filter.clone());
                        qos as u8
                    } else {
                        self.refusal_code(reason::QUOTA_EXCEEDED)
                    }
                }
                Err(Refusal::Invalid) => self.refusal_code(reason::TOPIC_FILTER_INVALID),
                Err(Refusal::NotAuthorized)
                    if self
                        .bridge
                        .as_ref()
                        .is_some_and(|b| b.allows_subscribe(&f.filter)) =>
                {
                    if self.subs.add(&f.filter, qos, self.limits.max_subscriptions)
                        && self.bridge_subscribe(&f.filter)
                    {
                        qos as u8
                    } else {
                        self.refusal_code(reason::QUOTA_EXCEEDED)
                    }
                }
                Err(Refusal::NotAuthorized) => self.refusal_code(reason::NOT_AUTHORIZED),
            };
            codes.push(code);
        }
        self.send(&Packet::SubAck(codec::SubAck {
            pkid: sub.pkid,
            codes,
            properties: Default::default(),
        }));
        if !added.is_empty() {
            self.deliver_on_subscribe(&added);
        }
        Ok(())
    }

    /// A SUBACK refusal: v5 says why, 3.1.1 has one failure code.
    pub(super) fn refusal_code(&self, v5: u8) -> u8 {
        reason::suback(self.protocol, v5)
    }

    pub(super) fn on_unsubscribe(&mut self, unsub: codec::Unsubscribe) {
        let codes = unsub
            .filters
            .iter()
            .map(|f| {
                self.bridge_unsubscribe(f);
                if self.subs.remove(f) {
                    reason::SUCCESS
                } else {
                    reason::NO_SUBSCRIPTION_EXISTED
                }
            })
            .collect();
        let codes = match self.protocol {
            Protocol::V311 => Vec::new(),
            Protocol::V5 => codes,
        };
        self.send(&Packet::UnsubAck(codec::UnsubAck {
            pkid: unsub.pkid,
            codes,
            properties: Default::default(),
        }));
    }

    /// After a SUBSCRIBE: the current status, and a due redirect, to the new filters' topics.
    pub(super) fn deliver_on_subscribe(&mut self, added: &[String]) {
        let route = self.route();
        let matches = |topic: &str| added.iter().any(|f| codec_topic_match(f, topic));
        if matches(&self.acl.topic("status")) {
            let (state, tenant) = route.status();
            self.publish_status(state, tenant.map(str::to_owned).as_deref());
        }
        if let Route::Redirect(r) = &route {
            let to_redirect = matches(&self.acl.topic("redirect"));
            let to_compat = self.acl.compat_topic().is_some_and(matches);
            if to_redirect || to_compat {
                self.publish_redirect(r);
                if self.protocol == Protocol::V311 {
                    self.due_redirect = Some(r.redirect_id.clone());
                    self.arm_redirect_grace();
                }
                // v5: a redirect that became due since CONNACK has a wake-up pending, and
                // `reevaluate` follows with DISCONNECT 0x9D.
            }
        }
    }
}
