//! A session's redirect state: the due redirect, v3.1.1's grace to take it, and recording a
//! delivered one.

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;

use super::Session;
use crate::mqtt::codec::Protocol;
use crate::route::Redirect;

impl<S> Session<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    /// v3.1.1: the device has `limits.redirect_grace` to take a due redirect; a new redirect
    /// (migration) starts a new grace, a re-subscribe does not extend it.
    pub(super) fn arm_redirect_grace(&mut self) {
        if self.protocol == Protocol::V311 && self.redirect_deadline.is_none() {
            self.redirect_deadline = Some(Instant::now() + self.limits.redirect_grace);
        }
    }

    /// Nothing is due any more (unclaimed again, or waiting on a registration).
    pub(super) fn withdraw_redirect(&mut self) {
        self.due_redirect = None;
        self.redirect_sent = None;
        self.redirect_pkid = None;
        self.redirect_deadline = None;
    }

    /// Records a delivered redirect: metrics and the claim's `redirected_at`.
    pub(super) fn redirected(&mut self, r: &Redirect, kind: &'static str) {
        crate::metrics::redirect(kind);
        if self.redirect_sent.as_deref() == Some(r.redirect_id.as_str()) && kind == "disconnect" {
            return; // the publish already counted this redirect
        }
        self.redirect_sent = Some(r.redirect_id.clone());
        let now = crate::model::now_ms();
        let waited = (now - r.issued_at).max(0) as f64 / 1000.0;
        metrics::histogram!(crate::metrics::CLAIM_TO_REDIRECT_SECONDS).record(waited);
        let _ = self
            .ctx
            .activity
            .try_send(crate::waiting::Activity::Redirected {
                device_id: self.identity.device_id,
                redirect_id: r.redirect_id.clone(),
                at: now,
            });
    }
}
