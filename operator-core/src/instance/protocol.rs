//! The instance manager's HTTP API: paths, authentication and the status
//! document. Pure types shared by the server (instance side) and the client
//! (operator side).
//!
//! Authentication: every `/v1/*` request carries `Authorization: Bearer
//! <token>`, where the token is the cluster's instance-API token (a key of
//! the generated credentials Secret on Kubernetes, `secrets/api-token` in the
//! local state directory). `/healthz`, `/readyz` and `/metrics` are open,
//! as kubelet probes and Prometheus scrapes need them. Mutating requests are
//! `POST /v1/actions/<action>`; TLS (mutual) is layered on the same scheme
//! later without changing the paths.

use serde::{Deserialize, Serialize};

/// Liveness: the manager runs (200 even while the database starts).
pub const PATH_HEALTHZ: &str = "/healthz";
/// Readiness: the database serves (200) or not (503).
pub const PATH_READYZ: &str = "/readyz";
/// Prometheus metrics.
pub const PATH_METRICS: &str = "/metrics";
/// The [`MemberStatus`] document (authenticated).
pub const PATH_STATUS: &str = "/v1/status";
/// Prefix of mutating actions (authenticated, POST).
pub const PATH_ACTIONS: &str = "/v1/actions/";
/// Key of the API bearer token in every engine's credentials Secret (and
/// file name in the secrets directory).
pub const SECRET_KEY_API_TOKEN: &str = "api-token";
/// Header carrying the cluster identity, checked by the manager so that an
/// operator never drives an instance of another cluster by mistake.
pub const HEADER_CLUSTER_ID: &str = "x-stratum-cluster-id";

/// Role of a member.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Takes writes (PostgreSQL primary, MongoDB PRIMARY).
    Primary,
    /// Follows a primary (PostgreSQL standby, MongoDB SECONDARY).
    Replica,
    /// Member of a multi-writer group (Galera, when Synced).
    Member,
    /// Votes but holds no data (MongoDB arbiter).
    Arbiter,
    /// Deliberately kept from serving.
    Fenced,
    /// Not known (down, starting, unreachable).
    #[default]
    Unknown,
}

impl Role {
    /// Lower-case name, as used in labels and status.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Primary => "primary",
            Self::Replica => "replica",
            Self::Member => "member",
            Self::Arbiter => "arbiter",
            Self::Fenced => "fenced",
            Self::Unknown => "unknown",
        }
    }
}

/// State of the supervised database process.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ProcessState {
    /// Preparing the data directory (initdb, clone, restore).
    #[default]
    Preparing,
    /// Started, not yet accepting connections.
    Starting,
    /// Accepting connections.
    Running,
    /// Exited; the manager restarts it.
    Exited,
    /// Stopping on request.
    Stopping,
    /// Kept down by a fence.
    Fenced,
}

/// Replication position, per engine.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum Position {
    /// Unknown (down, starting).
    #[default]
    None,
    /// PostgreSQL WAL positions (byte offsets).
    #[serde(rename_all = "camelCase")]
    Wal {
        /// Timeline.
        timeline: u32,
        /// Primary: current write LSN; replica: last received LSN.
        received_lsn: Option<u64>,
        /// Replica: last replayed LSN; primary: same as `received_lsn`.
        replayed_lsn: Option<u64>,
    },
    /// Galera position.
    #[serde(rename_all = "camelCase")]
    Galera {
        /// `wsrep_cluster_state_uuid`.
        cluster_uuid: String,
        /// Last committed seqno (-1 unknown).
        seqno: i64,
        /// `wsrep_local_state_comment`.
        state: String,
    },
    /// MongoDB oplog position.
    #[serde(rename_all = "camelCase")]
    Oplog {
        /// Election term.
        term: i64,
        /// Optime seconds.
        seconds: u32,
        /// Optime increment.
        increment: u32,
    },
}

/// Format an LSN as PostgreSQL prints it (`0/3000060`).
pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// Parse a PostgreSQL LSN (`0/3000060`).
pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.trim().split_once('/')?;
    let hi = u64::from_str_radix(hi, 16).ok()?;
    let lo = u64::from_str_radix(lo, 16).ok()?;
    if hi > 0xFFFF_FFFF || lo > 0xFFFF_FFFF {
        return None;
    }
    Some((hi << 32) | lo)
}

impl Position {
    /// Short human form for status.
    pub fn describe(&self) -> Option<String> {
        match self {
            Self::None => None,
            Self::Wal {
                timeline,
                received_lsn,
                replayed_lsn,
            } => {
                let f = |l: &Option<u64>| l.map(format_lsn).unwrap_or_else(|| "-".into());
                Some(format!(
                    "tl {timeline} received {} replayed {}",
                    f(received_lsn),
                    f(replayed_lsn)
                ))
            }
            Self::Galera {
                cluster_uuid,
                seqno,
                state,
            } => Some(format!("{state} {cluster_uuid}:{seqno}")),
            Self::Oplog {
                term,
                seconds,
                increment,
            } => Some(format!("term {term} optime {seconds}:{increment}")),
        }
    }
}

/// What `GET /v1/status` returns.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MemberStatus {
    /// Instance name.
    pub name: String,
    /// Cluster identity the manager serves.
    pub cluster_id: String,
    /// Role.
    pub role: Role,
    /// Process state.
    pub process: ProcessState,
    /// Whether it serves traffic.
    pub ready: bool,
    /// Replication position.
    pub position: Position,
    /// Server version string, when up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_version: Option<String>,
    /// Why it is not ready, or the last error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Engine extras (lag, sync state, WAL receiver, wsrep variables).
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub details: serde_json::Value,
    /// Address clients use for this instance (`host:port`).
    pub address: String,
    /// Fenced by the operator: the server is kept down until `unfence`
    /// (or an action that makes it safe, such as `follow`).
    #[serde(default)]
    pub fenced: bool,
    /// The server would accept writes and the manager holds no valid write
    /// lease, so it keeps the server down until the operator grants one.
    #[serde(default)]
    pub awaiting_lease: bool,
    /// Milliseconds left on the write lease (negative: expired), when this
    /// instance ever held one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_remaining_ms: Option<i64>,
    /// The server runs with older settings than the manager was given and
    /// must restart to take them all (PostgreSQL `pending_restart`, or a
    /// `reconfigure` that needed a restart). The operator restarts such
    /// members in update order (replicas first, the primary or writer last).
    #[serde(default)]
    pub pending_restart: bool,
    /// The pending restart lowers a setting that standbys need at least as
    /// high as their primary (PostgreSQL's hot-standby parameters, e.g.
    /// `max_connections`): this member, the primary, must restart first
    /// and in place, before any other member takes the new settings (a
    /// switchover would make primary a member still running the higher
    /// value, which this one could not follow with the lower). Reported
    /// by a primary only; the controller reconfigures the other members
    /// once this one restarted.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub restart_primary_first: bool,
    /// [`settings_hash`] of the engine block the manager runs with: the
    /// instance config's, or the last one a `reconfigure` handed it. The
    /// controller compares it with the hash of the block it wants and
    /// sends `reconfigure` when they differ. `None` from managers that
    /// predate it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_hash: Option<String>,
    /// A replica: milliseconds left on the last failsafe acknowledgement
    /// it gave a primary (negative: past), when it ever gave one
    /// ([`ACTION_FAILSAFE`]). A primary that got it may write until then
    /// at the latest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failsafe_granted_ms: Option<i64>,
    /// A primary: it runs on a lease it extended itself with its
    /// replicas' acknowledgements (failsafe), the operator's last grant
    /// having expired.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub on_failsafe: bool,
    /// A primary: how long (ms) it has kept writes on failsafe in the
    /// current episode (since the operator's last grant expired), or in
    /// the last one when it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failsafe_kept_ms: Option<u64>,
}

/// A stable hash of an engine block (`Engine::instance_settings`'s
/// output): SHA-256 of its canonical JSON (object keys sorted at every
/// level, no whitespace), hex, prefixed `sha256:`. The same block gives the
/// same hash on both sides of the API whatever order its keys came in.
/// Pure.
pub fn settings_hash(engine: &serde_json::Value) -> String {
    use sha2::{Digest, Sha256};
    let text = serde_json::to_vec(&canonical(engine)).unwrap_or_default();
    format!("sha256:{}", hex::encode(Sha256::digest(&text)))
}

/// `value` with every object's keys in sorted order. Pure.
fn canonical(value: &serde_json::Value) -> serde_json::Value {
    match value {
        serde_json::Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            serde_json::Value::Object(
                entries
                    .into_iter()
                    .map(|(k, v)| (k.clone(), canonical(v)))
                    .collect(),
            )
        }
        serde_json::Value::Array(items) => {
            serde_json::Value::Array(items.iter().map(canonical).collect())
        }
        other => other.clone(),
    }
}

/// Built-in action: stop the server and keep it down (persisted) until
/// `unfence`.
pub const ACTION_FENCE: &str = "fence";
/// Built-in action: lift a fence.
pub const ACTION_UNFENCE: &str = "unfence";
/// Built-in action: grant or renew the write lease ([`LeaseGrant`]).
pub const ACTION_LEASE: &str = "lease";
/// Engine action: become the primary (body may carry `lease`).
pub const ACTION_PROMOTE: &str = "promote";
/// Engine action: run as a replica of `{"primary": NAME}`.
pub const ACTION_FOLLOW: &str = "follow";
/// Engine action: the same as `follow`, sent to a primary.
pub const ACTION_DEMOTE: &str = "demote";
/// Engine action: the replication slots a primary keeps
/// (`{"replicas": [NAME, …]}`).
pub const ACTION_SLOTS: &str = "slots";
/// Tell a primary which replicas stream from it now
/// (`{"available": [NAME]}`), so that it chooses its synchronous standbys
/// among them (engines with synchronous replication).
pub const ACTION_SYNC_STANDBYS: &str = "syncStandbys";
/// Engine action: take a changed engine block (`{"engine": …}`, as
/// `Engine::instance_settings` renders it) without a restart where the
/// engine can (a configuration reload, MariaDB's `SET GLOBAL`). The reply
/// says `{"restart": bool}` (the server must restart to take all of it)
/// and `{"primaryFirst": bool}` (the primary must restart before the
/// replicas, e.g. a lowered PostgreSQL hot-standby parameter). From then
/// on the manager reports the block's [`settings_hash`] as
/// [`MemberStatus::config_hash`], `pending_restart` until the server runs
/// with all of it, and a `restart` action starts the server with it.
/// Idempotent. An engine without the action is restarted instead.
pub const ACTION_RECONFIGURE: &str = "reconfigure";
/// Built-in action, sent by a primary's manager to each replica's manager
/// of its lease's member list when its lease is about to run out without
/// a renewal ([`FailsafeRequest`]): "do you still follow me?". The replica
/// acknowledges (200, [`FailsafeAck`]) only when it runs as a standby of
/// that primary, is not fenced and has not been revoked for that term;
/// otherwise 409. It remembers the acknowledgement on its data volume.
pub const ACTION_FAILSAFE: &str = "failsafe";
/// Built-in action, sent by the operator to replicas before a failover
/// whose old primary's manager does not answer ([`RevokeRequest`]): no
/// more failsafe acknowledgements for primaries of that term or older
/// (persisted on the data volume). The reply ([`RevokeReply`]) carries
/// the last acknowledgement's remaining validity, which the operator
/// waits out before it promotes.
pub const ACTION_REVOKE: &str = "revoke";
/// Key of a [`LeaseGrant`] in any action body: the manager applies it
/// before the action (a promotion is granted its lease atomically).
pub const BODY_LEASE: &str = "lease";

/// A write lease: while it is valid the instance may run as a writer; when
/// it expires the manager stops the server. Granted and renewed by the
/// operator on the current primary only.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LeaseGrant {
    /// The instance the lease is for; a manager refuses a lease for
    /// another instance.
    pub holder: String,
    /// The operator's term (incremented at each promotion); a lease of an
    /// older term than one already seen is refused.
    pub term: u64,
    /// Validity from the moment the manager receives it.
    pub ttl_ms: u64,
    /// The replicas (name and manager endpoint) the holder must all reach
    /// to extend its lease by itself while the operator does not renew it
    /// (failsafe, see [`ACTION_FAILSAFE`]). `None`: no failsafe (an
    /// operator that does not send it). `Some([])`: a single instance,
    /// which extends on its own (nothing can be promoted in its place).
    /// The holder keeps the list of the latest grant of its term.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<Vec<super::config::PeerEndpoint>>,
}

/// The body of [`ACTION_FAILSAFE`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FailsafeRequest {
    /// The primary asking (the lease holder).
    pub primary: String,
    /// Its lease term.
    pub term: u64,
    /// How long the acknowledgement counts (the lease TTL): the replica
    /// remembers it until it receives the request plus this.
    pub ttl_ms: u64,
}

/// The reply to an acknowledged [`ACTION_FAILSAFE`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FailsafeAck {
    /// Always true (a refusal is a 409).
    pub ack: bool,
    /// The replica that acknowledged.
    pub replica: String,
}

/// The body of [`ACTION_REVOKE`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RevokeRequest {
    /// The failed primary's term: primaries of this term or older get no
    /// acknowledgement from now on.
    pub term: u64,
}

/// The reply to [`ACTION_REVOKE`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RevokeReply {
    /// The replica revoked.
    pub replica: String,
    /// The highest term revoked on it now.
    pub revoked_term: u64,
    /// Milliseconds left on the last acknowledgement it gave (negative:
    /// past); `None`: it never gave one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failsafe_granted_ms: Option<i64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_round_trip() {
        for (s, v) in [
            ("0/0", 0u64),
            ("0/3000060", 0x3000060),
            ("1A/FF", (0x1A << 32) | 0xFF),
        ] {
            assert_eq!(parse_lsn(s), Some(v));
            assert_eq!(format_lsn(v), s);
        }
        assert_eq!(parse_lsn("zz"), None);
        assert_eq!(parse_lsn("0/1FFFFFFFF"), None);
    }

    #[test]
    fn status_document_is_camel_case_and_tagged() {
        let s = MemberStatus {
            name: "simple-pg-0".into(),
            position: Position::Wal {
                timeline: 1,
                received_lsn: Some(1),
                replayed_lsn: None,
            },
            ..Default::default()
        };
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["position"]["type"], "wal");
        assert_eq!(v["position"]["receivedLsn"], 1);
        assert_eq!(v["clusterId"], "");
        let back: MemberStatus = serde_json::from_value(v).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn settings_hash_ignores_key_order_and_sees_values() {
        let a: serde_json::Value =
            serde_json::from_str(r#"{"version":15,"parameters":{"work_mem":"4MB","a":"1"}}"#)
                .unwrap();
        let b: serde_json::Value =
            serde_json::from_str(r#"{"parameters":{"a":"1","work_mem":"4MB"},"version":15}"#)
                .unwrap();
        assert_eq!(settings_hash(&a), settings_hash(&b));
        assert!(settings_hash(&a).starts_with("sha256:"));
        assert_eq!(settings_hash(&a).len(), "sha256:".len() + 64);
        let c = serde_json::json!({"version": 15, "parameters": {"work_mem": "8MB", "a": "1"}});
        assert_ne!(settings_hash(&a), settings_hash(&c));
        // The pretty-printed ConfigMap JSON read back hashes the same.
        let pretty = serde_json::to_string_pretty(&a).unwrap();
        let back: serde_json::Value = serde_json::from_str(&pretty).unwrap();
        assert_eq!(settings_hash(&back), settings_hash(&a));
    }
}
