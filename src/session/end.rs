//! How a session ends, as `lobby_connections_total` counts it.

/// Why a session ended (the `outcome` label of `lobby_connections_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    Closed,
    Redirected,
    TakenOver,
    Revoked,
    KeepAliveTimeout,
    ConnectTimeout,
    ProtocolError,
    Forbidden,
    Shutdown,
    /// Bridge mode: more un-acknowledged publishes than the device may have in flight.
    QuotaExceeded,
    /// Bridge mode: the tenant's upstream queue is full.
    ServerBusy,
    /// Bridge mode, v3.1.1: a publish the tenant's broker never took (it closed the
    /// connection on each of `limits.bridge_max_redeliveries` re-sends).
    BridgeRejected,
    /// The device reconnects faster than `limits.reconnect_*` allow.
    RateLimited,
    /// Nothing received for `limits.max_idle`.
    IdleTimeout,
    Io,
}

impl End {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            End::Closed => "closed",
            End::Redirected => "redirected",
            End::TakenOver => "taken_over",
            End::Revoked => "revoked",
            End::KeepAliveTimeout => "keepalive_timeout",
            End::ConnectTimeout => "connect_timeout",
            End::ProtocolError => "protocol_error",
            End::Forbidden => "forbidden",
            End::Shutdown => "shutdown",
            End::QuotaExceeded => "quota_exceeded",
            End::ServerBusy => "server_busy",
            End::BridgeRejected => "bridge_rejected",
            End::RateLimited => "rate_limited",
            End::IdleTimeout => "idle_timeout",
            End::Io => "io_error",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::End::{self, *};

    /// `lobby_connections_total` starts with every outcome at zero: the list it is zeroed from
    /// names each `End` (the match breaks when a variant is added).
    #[test]
    fn every_outcome_is_zeroed_at_start() {
        let all = [
            Closed,
            Redirected,
            TakenOver,
            Revoked,
            KeepAliveTimeout,
            ConnectTimeout,
            ProtocolError,
            Forbidden,
            Shutdown,
            QuotaExceeded,
            ServerBusy,
            BridgeRejected,
            RateLimited,
            IdleTimeout,
            Io,
        ];
        for e in all {
            match e {
                Closed | Redirected | TakenOver | Revoked | KeepAliveTimeout | ConnectTimeout
                | ProtocolError | Forbidden | Shutdown | QuotaExceeded | ServerBusy
                | BridgeRejected | RateLimited | IdleTimeout | Io => {}
            }
            let label = End::label(e);
            assert!(
                crate::metrics::CONNECTION_OUTCOMES.contains(&label),
                "{label}"
            );
        }
        assert_eq!(all.len(), crate::metrics::CONNECTION_OUTCOMES.len());
    }
}
