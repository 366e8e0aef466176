//! The claims service's side of device activity ([`Activity`], reported by sessions through
//! the waiting room): delivered redirects recorded, certificates of registering or unnamed
//! devices kept.

use super::*;

impl ClaimsService {
    /// Applies device-path activity until the channel closes or `cancel` fires (then what is
    /// already queued). Each activity is applied in its own task, up to [`ACTIVITY_IN_FLIGHT`]
    /// at once: a burst of redirects is written together, not one commit after another.
    pub async fn run_activity(
        self,
        mut rx: mpsc::Receiver<Activity>,
        cancel: tokio_util::sync::CancellationToken,
    ) {
        let slots = Arc::new(tokio::sync::Semaphore::new(ACTIVITY_IN_FLIGHT));
        let mut tasks = tokio::task::JoinSet::new();
        loop {
            let activity = tokio::select! {
                a = rx.recv() => a,
                // Stopping: what is queued still gets stored, then the task ends (the edge's
                // sender lives as long as the lobby, so the channel would never close).
                () = cancel.cancelled() => rx.try_recv().ok(),
            };
            let Some(activity) = activity else {
                break;
            };
            while tasks.try_join_next().is_some() {}
            let Ok(slot) = slots.clone().acquire_owned().await else {
                break;
            };
            let svc = self.clone();
            tasks.spawn(async move {
                svc.apply_activity(activity).await;
                drop(slot);
            });
        }
        while tasks.join_next().await.is_some() {}
    }

    async fn apply_activity(&self, activity: Activity) {
        match activity {
            Activity::Redirected {
                device_id,
                redirect_id,
                at,
            } => {
                let recorded = self
                    .change_claim(&device_id, None, false, |current, _| {
                        // Superseded by a migration or unclaim meanwhile, or already recorded:
                        // a v3.1.1 device that reconnects before leaving is redirected again,
                        // but one store write per redirect is enough.
                        let Some(c) = current.filter(|c| {
                            c.redirect_id.as_deref() == Some(&redirect_id)
                                && c.redirected_at.is_none()
                        }) else {
                            return Ok(None);
                        };
                        Ok(Some(Plan {
                            claim: Some(Claim {
                                redirected_at: Some(at),
                                ..(**c).clone()
                            }),
                            bind: Bind::No,
                            retire: Retiring::Nothing,
                        }))
                    })
                    .await;
                if let Err(e) = recorded {
                    tracing::warn!(error = %e, "recording a redirect failed");
                }
            }
            Activity::CertSeen {
                device_id,
                cert_der,
                named,
            } => {
                if let Err(e) = self.name_claim(&device_id, &cert_der).await {
                    tracing::warn!(error = %e, "naming a claim failed");
                }
                if let Err(e) = self.settle_name(&device_id, &cert_der).await {
                    tracing::warn!(error = %e, "reading a claim's thing name failed");
                }
                if let Some(named) = named {
                    let _ = named.send(());
                }
                if let Err(e) = self.cert_seen(&device_id, &cert_der).await {
                    tracing::warn!(error = %e, "storing a device certificate failed");
                }
            }
        }
    }
}
