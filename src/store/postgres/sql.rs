//! The statements the PostgreSQL store runs, with what each relies on.

/// Takes a slot of the call bucket `$1`, calls `$2` seconds apart: the bucket's row holds
/// the next free slot, never earlier than a second minus one interval ago (the unused calls
/// of a quiet second may be spent at once). The row lock orders nodes racing for slots; the
/// database's clock is the fleet's, so node clocks do not matter. Answers the time from now
/// to the slot's end, in microseconds (the slot itself is one interval before).
pub(super) const PACE_SLOT: &str = "WITH t AS (SELECT clock_timestamp() AS now), \
     r AS (INSERT INTO lobby_pace AS p (key, next_at) \
     SELECT $1, t.now - interval '1 second' + 2 * make_interval(secs => $2) FROM t \
     ON CONFLICT (key) DO UPDATE \
     SET next_at = GREATEST(p.next_at + make_interval(secs => $2), EXCLUDED.next_at) \
     RETURNING next_at) \
     SELECT (EXTRACT(EPOCH FROM (r.next_at - t.now)) * 1000000)::bigint FROM r, t";

/// The unique index that keeps thing names unique per tenant.
pub(super) const THING_NAME_INDEX: &str = "claims_tenant_thing_unique";

/// A node that has not reported for this long is taken for gone: its devices show as not
/// connected. Nodes report at least every [`crate::presence::HEARTBEAT`].
pub(super) const NODE_GONE_AFTER_SECS: f64 = 15.0;

/// The notification channel of the change log.
pub(super) const CHANNEL: &str = "lobby_changes";
/// Appends to the change log inside the writing transaction; the entry's number. The other
/// nodes are told after the commit ([`Notifier`]): a NOTIFY inside the transaction would take
/// the database's notification lock until the commit is flushed, one writer at a time.
pub(super) const LOG_CHANGE: &str =
    "INSERT INTO lobby_changes (kind, key, origin) VALUES ($1, $2, $3) RETURNING seq";
/// The changes at or after a cursor, with the next cursor: the oldest transaction still in
/// progress (`pg_snapshot_xmin`). Every transaction older than it has ended, so its entries
/// are all visible now; a younger one may still commit entries with smaller `seq`s, and is
/// read next time. One statement, one snapshot.
pub(super) const CHANGES_AFTER: &str = "SELECT h.x::text::bigint, c.seq, c.kind, c.key, c.origin \
     FROM (SELECT pg_snapshot_xmin(pg_current_snapshot()) AS x) h \
     LEFT JOIN lobby_changes c ON c.xid >= $1::text::xid8 ORDER BY c.xid, c.seq";
/// The tenant a claim binds to, locked against deletion (not against body updates), and its
/// `max_devices`.
pub(super) const TENANT_ROOM: &str = "SELECT (body::jsonb ->> 'max_devices')::bigint FROM tenants \
     WHERE id = $1 FOR KEY SHARE";
/// Serialises the claims of one tenant that has `max_devices`, so the count is exact.
pub(super) const TENANT_QUOTA_LOCK: &str =
    "SELECT pg_advisory_xact_lock(hashtextextended($1, 1819239010))";
pub(super) const TENANT_COUNT: &str =
    "SELECT count(*) FROM claims WHERE tenant = $1 AND device_id <> $2";
pub(super) const CLAIM_INSERT: &str = "INSERT INTO claims (device_id, tenant, state, thing_name, \
     redirect_id, claimed_at, ready_at, redirected_at, error, cert_pem, attempts, \
     next_attempt_at, version) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)";
pub(super) const CLAIM_UPSERT_SET: &str =
    " ON CONFLICT (device_id) DO UPDATE SET tenant = EXCLUDED.tenant, \
     state = EXCLUDED.state, thing_name = EXCLUDED.thing_name, \
     redirect_id = EXCLUDED.redirect_id, claimed_at = EXCLUDED.claimed_at, \
     ready_at = EXCLUDED.ready_at, redirected_at = EXCLUDED.redirected_at, \
     error = EXCLUDED.error, cert_pem = COALESCE(EXCLUDED.cert_pem, claims.cert_pem), \
     attempts = EXCLUDED.attempts, next_attempt_at = EXCLUDED.next_attempt_at, \
     version = EXCLUDED.version";
pub(super) const CLAIM_UPDATE: &str =
    "UPDATE claims SET tenant = $2, state = $3, thing_name = $4, \
     redirect_id = $5, claimed_at = $6, ready_at = $7, redirected_at = $8, error = $9, \
     cert_pem = COALESCE($10, cert_pem), attempts = $11, next_attempt_at = $12, version = $13 \
     WHERE device_id = $1 AND version = $14";
/// Marks the device's registrations but `$2`'s (`NULL`: all) for removal.
pub(super) const RETIRE: &str = "UPDATE registrations SET removing = TRUE WHERE device_id = $1 \
     AND ($2::text IS NULL OR tenant <> $2) RETURNING tenant";

/// Beats for a node (`$1`).
pub(super) const NODE_BEAT: &str = "INSERT INTO lobby_nodes (name, heartbeat) VALUES ($1, now()) \
     ON CONFLICT (name) DO UPDATE SET heartbeat = EXCLUDED.heartbeat";
/// What a presence read selects (conditions appended): a device whose node stopped its
/// heartbeat shows as not connected.
pub(super) fn presence_select() -> String {
    format!(
        "SELECT p.device_id, p.node, p.thing_name, p.protocol, p.connected AND \
         COALESCE(n.heartbeat > now() - make_interval(secs => {NODE_GONE_AFTER_SECS}), false), \
         p.last_seen, p.stamp FROM lobby_presence p LEFT JOIN lobby_nodes n ON n.name = p.node"
    )
}

/// Writes a presence batch from node `$6` (origin `$8`). A disconnect reported by one node
/// never hides a connection on another, and a connect from another node replaces the row only
/// when it is newer (stamp, then origin): the connection that the takeover keeps, even when
/// written late.
pub(super) const PRESENCE_UPSERT: &str = "INSERT INTO lobby_presence \
     (device_id, node, thing_name, protocol, connected, last_seen, stamp, origin) \
     SELECT u.d, $6, u.t, u.p, u.c, u.l, u.s, $8 FROM UNNEST($1::text[], $2::text[], \
     $3::text[], $4::bool[], $5::bigint[], $7::bigint[]) AS u(d, t, p, c, l, s) \
     ON CONFLICT (device_id) DO UPDATE SET node = EXCLUDED.node, \
     thing_name = EXCLUDED.thing_name, protocol = EXCLUDED.protocol, \
     connected = EXCLUDED.connected, last_seen = EXCLUDED.last_seen, \
     stamp = EXCLUDED.stamp, origin = EXCLUDED.origin \
     WHERE lobby_presence.node = EXCLUDED.node \
     OR NOT (EXCLUDED.connected OR lobby_presence.connected) \
     OR (EXCLUDED.connected AND (EXCLUDED.stamp > lobby_presence.stamp \
     OR (EXCLUDED.stamp = lobby_presence.stamp AND EXCLUDED.origin > lobby_presence.origin)))";
/// Announces connects (`<device_id> <stamp> <origin>` each) to every node's watch, at commit.
pub(super) const ANNOUNCE: &str =
    "SELECT pg_notify('lobby_takeover', a) FROM UNNEST($1::text[]) AS a";

pub(super) const CLAIM_COLUMNS: &str =
    concat!("SELECT ", crate::store::claim_columns!(), " FROM claims");
pub(super) const REGISTRATION_COLUMNS: &str =
    "SELECT device_id, tenant, body, removing FROM registrations";
