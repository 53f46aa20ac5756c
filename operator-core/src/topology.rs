//! Helpers every engine's topology uses: ordinals of `<cluster>-<ordinal>`
//! instance names, the rolling-update order, the replicas a primary
//! reports streaming from it and when to tell it (shared by the local
//! runtime's decision loop and the controller's `ha` step). Pure.

use std::time::Duration;

use crate::instance::protocol::MemberStatus;

/// How long a primary this process (the controller or the local decision
/// loop) promoted keeps the synchronous standbys it started with while
/// none of its replicas streams yet ([`sync_standbys_due`]).
pub const SYNC_SETTLE: Duration = Duration::from_secs(5);

/// Ordinal from a `<cluster>-<ordinal>` name; names without one sort last.
pub fn ordinal(name: &str) -> u32 {
    name.rsplit_once('-')
        .and_then(|(_, o)| o.parse().ok())
        .unwrap_or(u32::MAX)
}

/// Rolling-update order: every instance but `last` from the highest
/// ordinal down, then `last` (the primary or writer) when it is one of
/// `names`.
pub fn update_order(names: &[String], last: Option<&str>) -> Vec<String> {
    let mut order: Vec<String> = names
        .iter()
        .filter(|n| Some(n.as_str()) != last)
        .cloned()
        .collect();
    order.sort_by_key(|n| std::cmp::Reverse((ordinal(n), n.clone())));
    if let Some(l) = last.filter(|l| names.iter().any(|n| n == l)) {
        order.push(l.to_string());
    }
    order
}

/// The members a primary reports as synchronous standbys: its status
/// `details.replicas[]` entries with `syncState` `sync` or `quorum` (the
/// PostgreSQL driver reports `pg_stat_replication` so; engines without
/// the notion report none).
pub fn sync_standbys(s: &MemberStatus) -> Vec<String> {
    s.details
        .get("replicas")
        .and_then(|r| r.as_array())
        .into_iter()
        .flatten()
        .filter(|r| {
            matches!(
                r.get("syncState").and_then(|v| v.as_str()),
                Some("sync" | "quorum")
            )
        })
        .filter_map(|r| r.get("name").and_then(|n| n.as_str()).map(str::to_string))
        .collect()
}

/// The members a primary reports as streaming from it (its status
/// `details.replicas[]` entries in state `streaming`), sorted.
pub fn streaming_replicas(s: &MemberStatus) -> Vec<String> {
    let mut names: Vec<String> = s
        .details
        .get("replicas")
        .and_then(|r| r.as_array())
        .into_iter()
        .flatten()
        .filter(|r| r.get("state").and_then(|v| v.as_str()) == Some("streaming"))
        .filter_map(|r| r.get("name").and_then(|n| n.as_str()).map(str::to_string))
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Whether to tell `primary` now which replicas stream from it (the
/// `syncStandbys` action), given what it was last told and, when this
/// process promoted it, how long ago. Pure.
///
/// - Not when it was told this very set already.
/// - Not while none streams yet, for [`SYNC_SETTLE`] after a promotion
///   and until it was told anything: the engine would have to guess whom
///   commits wait for (PostgreSQL: the first replicas in instance order,
///   after a switchover often the old primary, still restarting as a
///   standby), while a promoted primary runs with the cluster's full list
///   (every instance), which the first replica to stream satisfies. A
///   guess cost up to ten seconds: PostgreSQL re-checks a waiting commit
///   only when a named standby sends its next reply, and the replica that
///   streamed first had already confirmed the commit before it was named.
/// - Otherwise, when the set changed (none streaming included: the
///   engine then decides, e.g. asynchronous with `minSyncReplicas: 0`).
pub fn sync_standbys_due(
    told: Option<&(String, Vec<String>)>,
    primary: &str,
    streaming: &[String],
    promoted_for: Option<Duration>,
) -> bool {
    if told.is_some_and(|(p, s)| p == primary && s == streaming) {
        return false;
    }
    let told_this_primary = told.is_some_and(|(p, _)| p == primary);
    let settling = promoted_for.is_some_and(|d| d < SYNC_SETTLE);
    !(streaming.is_empty() && settling && !told_this_primary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinals_and_order() {
        assert_eq!(ordinal("simple-pg-10"), 10);
        assert_eq!(ordinal("nonumber"), u32::MAX);
        let names: Vec<String> = ["c-0", "c-1", "c-2", "c-10"].map(String::from).into();
        assert_eq!(
            update_order(&names, Some("c-1")),
            ["c-10", "c-2", "c-0", "c-1"]
        );
        assert_eq!(update_order(&names, None), ["c-10", "c-2", "c-1", "c-0"]);
        assert_eq!(
            update_order(&names, Some("gone")),
            ["c-10", "c-2", "c-1", "c-0"]
        );
    }
}
