//! Failsafe lease extension: the rules, written once for the instance side
//! (the primary's manager asks, the replicas' managers answer) and the
//! operator side (the controller and the local runtime revoke and wait
//! before a failover). Pure functions and types, plus the replica's
//! record on its data volume (filesystem IO in [`ReplicaRecord::load`] and
//! [`ReplicaRecord::save`] only). The safety argument is in
//! `docs/failover.md` ("Failsafe").
//!
//! - A primary whose lease has less than [`ask_below`] left without a
//!   renewal asks every replica of its lease's list for an
//!   acknowledgement ([`FailsafeRequest`]); only if all of them ack does
//!   it extend its lease to *the time it sent the requests* + TTL.
//! - A replica acks only a primary it streams from, while not fenced and
//!   not revoked for that term ([`ack_refusal`]), and remembers the ack
//!   until *the time it received the request* + TTL, so the primary's
//!   extension never outlives the replica's record of it.
//! - Before promoting in place of a primary whose manager does not answer,
//!   the operator revokes the replicas (they stop acking that term) and
//!   waits until every revoked replica's last ack has run out
//!   ([`RevokeOutcome`]); it promotes only a revoked replica that was in
//!   every list the old primary may hold ([`SentLists`]).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::config::PeerEndpoint;
use super::protocol::{FailsafeRequest, RevokeReply};

/// Name of the replica's failsafe record on its data volume (beside the
/// lease marker): it must outlive the run directory (an `emptyDir` on
/// Kubernetes), as the operator relies on it after the pod is recreated.
pub const FAILSAFE_FILE: &str = "stratum-failsafe.json";

/// The failsafe list of `holder`: every other member not in `fenced` (the
/// replicas whose acknowledgements it needs). Pure; the one rule for the
/// controller and the local runtime.
pub fn list(
    endpoints: &[PeerEndpoint],
    fenced: &BTreeSet<String>,
    holder: &str,
) -> Vec<PeerEndpoint> {
    endpoints
        .iter()
        .filter(|e| e.name != holder && !fenced.contains(&e.name))
        .cloned()
        .collect()
}

/// A primary asks its replicas when its lease has less than this left
/// (half the TTL: the operator renews every TTL/4, so a lease that low
/// missed at least one renewal).
pub fn ask_below(ttl: Duration) -> Duration {
    ttl / 2
}

/// Whether a primary should ask for acknowledgements now. Pure.
pub fn should_ask(remaining: Duration, ttl: Duration) -> bool {
    !ttl.is_zero() && remaining < ask_below(ttl)
}

/// The lease end after every replica acked requests sent at `sent`: the
/// later of the current end and `sent + ttl`. Pure.
pub fn extended(current: Option<Instant>, sent: Instant, ttl: Duration) -> Instant {
    let candidate = sent + ttl;
    current.map_or(candidate, |c| c.max(candidate))
}

/// A replica's failsafe record (persisted in [`FAILSAFE_FILE`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaRecord {
    /// Primaries of this term or older get no acknowledgement (revoked by
    /// the operator; term 0 is a term too: the local runtime's first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_term: Option<u64>,
    /// The primary acked last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub granted_to: Option<String>,
    /// Its term.
    #[serde(default)]
    pub granted_term: u64,
    /// Until when (wall clock, ms since the epoch) the last ack counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub granted_until_unix_ms: Option<i64>,
}

impl ReplicaRecord {
    /// Read the record from `data_dir`. A missing file is an empty record;
    /// an unreadable one counts as revoked for every term with an ack
    /// valid for `ttl_guard` from now (the operator then waits that long),
    /// since what it said cannot be known.
    pub fn load(data_dir: &Path, now_unix_ms: i64, ttl_guard: Duration) -> Self {
        match std::fs::read_to_string(data_dir.join(FAILSAFE_FILE)) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Self::default(),
            Ok(text) => serde_json::from_str(&text)
                .unwrap_or_else(|_| Self::unknown(now_unix_ms, ttl_guard)),
            Err(_) => Self::unknown(now_unix_ms, ttl_guard),
        }
    }

    fn unknown(now_unix_ms: i64, ttl_guard: Duration) -> Self {
        Self {
            revoked_term: Some(u64::MAX),
            granted_to: None,
            granted_term: 0,
            granted_until_unix_ms: Some(now_unix_ms + ttl_guard.as_millis() as i64),
        }
    }

    /// Write the record to `data_dir` (through a temporary file and a
    /// rename, so a crash leaves the old or the new record).
    pub fn save(&self, data_dir: &Path) -> std::io::Result<()> {
        let path = data_dir.join(FAILSAFE_FILE);
        let tmp = data_dir.join(format!(".{FAILSAFE_FILE}.tmp"));
        std::fs::write(&tmp, serde_json::to_vec(self).unwrap_or_default())?;
        std::fs::rename(&tmp, &path)
    }

    /// Milliseconds left on the last ack (negative: past), if any. Pure.
    pub fn granted_ms(&self, now_unix_ms: i64) -> Option<i64> {
        self.granted_until_unix_ms.map(|u| u - now_unix_ms)
    }

    /// Record an ack of `req` received at `now_unix_ms`. Pure. The record
    /// never moves backwards: a shorter ack keeps the later end.
    pub fn grant(&mut self, req: &FailsafeRequest, now_unix_ms: i64) {
        let until = now_unix_ms + req.ttl_ms as i64;
        self.granted_to = Some(req.primary.clone());
        self.granted_term = req.term;
        self.granted_until_unix_ms =
            Some(self.granted_until_unix_ms.map_or(until, |u| u.max(until)));
    }

    /// Revoke `term` and older. Pure.
    pub fn revoke(&mut self, term: u64) {
        self.revoked_term = Some(self.revoked_term.map_or(term, |t| t.max(term)));
    }
}

/// Why a replica refuses to ack `req`, or `None` when it acks. Pure.
/// `me`: the replica; `following`: the primary it streams from as a
/// standby (none: not a standby, detached, promoted, rewinding); `fenced`:
/// the operator fenced it.
pub fn ack_refusal(
    req: &FailsafeRequest,
    me: &str,
    following: Option<&str>,
    fenced: bool,
    record: &ReplicaRecord,
) -> Option<String> {
    if req.primary == me {
        return Some(format!("{me} cannot acknowledge itself"));
    }
    if fenced {
        return Some(format!("{me} is fenced"));
    }
    if let Some(revoked) = record.revoked_term.filter(|r| req.term <= *r) {
        return Some(format!(
            "{me} was revoked for term {revoked} (request of {} for term {})",
            req.primary, req.term
        ));
    }
    match following {
        Some(p) if p == req.primary => None,
        Some(p) => Some(format!("{me} follows {p}, not {}", req.primary)),
        None => Some(format!("{me} follows no primary")),
    }
}

/// The operator's revocation of the replicas before a failover from an
/// unreachable primary: which replicas answered, and until when (on the
/// operator's clock) the last ack any of them gave may count.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RevokeOutcome {
    /// The failed primary's term that was revoked.
    pub term: u64,
    /// The replicas that confirmed the revocation.
    pub revoked: BTreeSet<String>,
    /// The latest end of their last acks (reply time + remaining ms),
    /// `None` when none had a valid one.
    pub granted_until: Option<Instant>,
}

impl RevokeOutcome {
    /// From the replies (by replica; errors are replicas not revoked),
    /// received by `now`. Pure.
    pub fn from_replies<E>(
        term: u64,
        replies: &[(String, Result<RevokeReply, E>)],
        now: Instant,
    ) -> Self {
        let mut revoked = BTreeSet::new();
        let mut until: Option<Instant> = None;
        for (name, reply) in replies {
            let Ok(reply) = reply else { continue };
            if reply.revoked_term < term {
                continue;
            }
            revoked.insert(name.clone());
            if let Some(ms) = reply.failsafe_granted_ms.filter(|ms| *ms > 0) {
                let end = now + Duration::from_millis(ms as u64);
                until = Some(until.map_or(end, |u| u.max(end)));
            }
        }
        Self {
            term,
            revoked,
            granted_until: until,
        }
    }

    /// This revocation and a later one of the same term together: every
    /// replica revoked by either, the later end of their acks. Pure.
    pub fn merged(mut self, later: RevokeOutcome) -> Self {
        self.revoked.extend(later.revoked);
        self.granted_until = match (self.granted_until, later.granted_until) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        self
    }

    /// Whether every failsafe ack of the revoked replicas has run out at
    /// `now`, with `margin` (the lease margin: clock rates, the
    /// watchdog's period, stopping the server). Pure.
    pub fn grants_expired(&self, now: Instant, margin: Duration) -> bool {
        self.granted_until.is_none_or(|u| now > u + margin)
    }

    /// The longest wait this revocation adds beyond `lease_end`, for
    /// events. Pure.
    pub fn extra_wait(&self, lease_end: Instant) -> Duration {
        self.granted_until
            .map_or(Duration::ZERO, |u| u.saturating_duration_since(lease_end))
    }
}

/// Who may be promoted in place of a primary that may still run on
/// failsafe: a replica that was revoked and that is in every list the
/// primary may hold (`possible`; `None`: unknown, see [`SentLists`]).
/// Because the primary needs *every* replica of its list to ack, one
/// revoked replica of its list stops its extensions; requiring the
/// candidate itself to be that replica also covers a replica added after
/// the last list reached the primary. Pure.
pub fn may_promote(
    candidate: &str,
    revoke: &RevokeOutcome,
    possible: Option<&BTreeSet<String>>,
) -> bool {
    revoke.revoked.contains(candidate) && possible.is_none_or(|p| p.contains(candidate))
}

/// The member lists the operator sent to one lease holder (by holder and
/// term), to know which lists the holder may hold: the last one it
/// confirmed and any sent after it (a request that failed may still have
/// arrived). Kept in memory by the operator process.
#[derive(Clone, Debug, Default)]
pub struct SentLists {
    by_holder: BTreeMap<(String, u64), Vec<BTreeSet<String>>>,
}

impl SentLists {
    /// A list is about to be sent to `holder` for `term`.
    pub fn sent(&mut self, holder: &str, term: u64, list: &[PeerEndpoint]) {
        let names: BTreeSet<String> = list.iter().map(|p| p.name.clone()).collect();
        let lists = self
            .by_holder
            .entry((holder.to_string(), term))
            .or_default();
        if lists.last() != Some(&names) {
            lists.push(names);
        }
        // Bounded: only the tail after a confirmation matters.
        if lists.len() > 16 {
            lists.remove(0);
        }
    }

    /// `holder` confirmed the grant carrying `list`: from now on it holds
    /// that list or a later one.
    pub fn confirmed(&mut self, holder: &str, term: u64, list: &[PeerEndpoint]) {
        let names: BTreeSet<String> = list.iter().map(|p| p.name.clone()).collect();
        self.by_holder
            .insert((holder.to_string(), term), vec![names]);
    }

    /// The replicas in every list `holder` may hold for `term`, or `None`
    /// when this process sent it none (restarted since: the operator then
    /// takes the current replica set, see docs/failover.md).
    pub fn in_every_list(&self, holder: &str, term: u64) -> Option<BTreeSet<String>> {
        let lists = self.by_holder.get(&(holder.to_string(), term))?;
        let mut iter = lists.iter();
        let first = iter.next()?.clone();
        Some(iter.fold(first, |acc, l| acc.intersection(l).cloned().collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(primary: &str, term: u64) -> FailsafeRequest {
        FailsafeRequest {
            primary: primary.into(),
            term,
            ttl_ms: 5000,
        }
    }

    #[test]
    fn ask_only_when_renewals_were_missed() {
        let ttl = Duration::from_secs(5);
        assert!(
            !should_ask(Duration::from_millis(3750), ttl),
            "one renewal period in"
        );
        assert!(!should_ask(Duration::from_millis(2500), ttl));
        assert!(should_ask(Duration::from_millis(2499), ttl));
        assert!(should_ask(Duration::ZERO, ttl));
        assert!(!should_ask(Duration::ZERO, Duration::ZERO));
    }

    #[test]
    fn the_extension_counts_from_the_sending_and_never_shortens() {
        let now = Instant::now();
        let ttl = Duration::from_secs(5);
        let sent = now - Duration::from_millis(300);
        assert_eq!(extended(None, sent, ttl), sent + ttl);
        assert_eq!(extended(Some(now), sent, ttl), sent + ttl);
        let later = now + Duration::from_secs(10);
        assert_eq!(extended(Some(later), sent, ttl), later);
    }

    #[test]
    fn ack_table() {
        let clean = ReplicaRecord::default();
        let mut revoked = ReplicaRecord::default();
        revoked.revoke(3);
        type Case<'a> = (
            &'a str,
            FailsafeRequest,
            Option<&'a str>,
            bool,
            &'a ReplicaRecord,
            bool,
        );
        let cases: [Case; 8] = [
            (
                "follows it",
                req("pg-0", 3),
                Some("pg-0"),
                false,
                &clean,
                true,
            ),
            (
                "follows another",
                req("pg-0", 3),
                Some("pg-2"),
                false,
                &clean,
                false,
            ),
            (
                "follows nobody (detached, promoted)",
                req("pg-0", 3),
                None,
                false,
                &clean,
                false,
            ),
            ("fenced", req("pg-0", 3), Some("pg-0"), true, &clean, false),
            (
                "revoked for this term",
                req("pg-0", 3),
                Some("pg-0"),
                false,
                &revoked,
                false,
            ),
            (
                "revoked for a newer term",
                req("pg-0", 2),
                Some("pg-0"),
                false,
                &revoked,
                false,
            ),
            (
                "a newer term after a revocation",
                req("pg-0", 4),
                Some("pg-0"),
                false,
                &revoked,
                true,
            ),
            ("itself", req("pg-1", 3), Some("pg-1"), false, &clean, false),
        ];
        for (what, r, following, fenced, record, acks) in cases {
            let got = ack_refusal(&r, "pg-1", following, fenced, record);
            assert_eq!(got.is_none(), acks, "{what}: {got:?}");
        }
    }

    #[test]
    fn the_record_keeps_the_latest_end_and_the_highest_revoked_term() {
        let mut r = ReplicaRecord::default();
        assert_eq!(r.granted_ms(1000), None);
        r.grant(&req("pg-0", 2), 1000);
        assert_eq!(r.granted_ms(1000), Some(5000));
        r.grant(
            &FailsafeRequest {
                ttl_ms: 100,
                ..req("pg-0", 2)
            },
            2000,
        );
        assert_eq!(r.granted_until_unix_ms, Some(6000), "never moves back");
        r.revoke(2);
        r.revoke(1);
        assert_eq!(r.revoked_term, Some(2));
        let mut zero = ReplicaRecord::default();
        zero.revoke(0);
        assert!(
            ack_refusal(&req("pg-0", 0), "pg-1", Some("pg-0"), false, &zero).is_some(),
            "term 0 revoked too"
        );
        assert_eq!(r.granted_ms(7000), Some(-1000));
    }

    #[test]
    fn the_record_survives_on_disk_and_an_unreadable_one_refuses_everything() {
        let dir = tempfile::tempdir().unwrap();
        let guard = Duration::from_secs(5);
        assert_eq!(
            ReplicaRecord::load(dir.path(), 0, guard),
            ReplicaRecord::default()
        );
        let mut r = ReplicaRecord::default();
        r.grant(&req("pg-0", 2), 1000);
        r.revoke(2);
        r.save(dir.path()).unwrap();
        assert_eq!(ReplicaRecord::load(dir.path(), 0, guard), r);
        std::fs::write(dir.path().join(FAILSAFE_FILE), "{not json").unwrap();
        let unknown = ReplicaRecord::load(dir.path(), 1000, guard);
        assert!(ack_refusal(&req("pg-0", 99), "pg-1", Some("pg-0"), false, &unknown).is_some());
        assert_eq!(unknown.granted_ms(1000), Some(5000));
    }

    #[test]
    fn revoke_outcome_waits_for_the_latest_ack_of_a_revoked_replica() {
        let now = Instant::now();
        let reply = |name: &str, term: u64, ms: Option<i64>| {
            (
                name.to_string(),
                Ok::<_, String>(RevokeReply {
                    replica: name.into(),
                    revoked_term: term,
                    failsafe_granted_ms: ms,
                }),
            )
        };
        let replies = vec![
            reply("pg-1", 3, Some(1200)),
            reply("pg-2", 3, Some(-500)),
            ("pg-3".to_string(), Err("unreachable".to_string())),
            reply("pg-4", 2, Some(9000)),
        ];
        let out = RevokeOutcome::from_replies(3, &replies, now);
        assert_eq!(out.revoked, BTreeSet::from(["pg-1".into(), "pg-2".into()]));
        assert_eq!(out.granted_until, Some(now + Duration::from_millis(1200)));
        let margin = Duration::from_secs(1);
        assert!(!out.grants_expired(now + Duration::from_millis(2000), margin));
        assert!(out.grants_expired(now + Duration::from_millis(2201), margin));
        assert_eq!(
            out.extra_wait(now + Duration::from_millis(200)),
            Duration::from_millis(1000)
        );
        assert_eq!(out.extra_wait(now + Duration::from_secs(5)), Duration::ZERO);

        let never = RevokeOutcome::from_replies(3, &[reply("pg-1", 3, None)], now);
        assert!(never.grants_expired(now, margin));
    }

    #[test]
    fn only_a_revoked_replica_in_every_possible_list_is_promoted() {
        let ep = |n: &str| PeerEndpoint {
            name: n.into(),
            ..Default::default()
        };
        let mut lists = SentLists::default();
        assert_eq!(lists.in_every_list("pg-0", 1), None);
        lists.confirmed("pg-0", 1, &[ep("pg-1"), ep("pg-2")]);
        // A scale-up: pg-3 sent but not confirmed.
        lists.sent("pg-0", 1, &[ep("pg-1"), ep("pg-2"), ep("pg-3")]);
        let possible = lists.in_every_list("pg-0", 1).unwrap();
        assert_eq!(possible, BTreeSet::from(["pg-1".into(), "pg-2".into()]));
        let revoke = RevokeOutcome {
            term: 1,
            revoked: BTreeSet::from(["pg-2".into(), "pg-3".into()]),
            granted_until: None,
        };
        assert!(may_promote("pg-2", &revoke, Some(&possible)));
        assert!(
            !may_promote("pg-3", &revoke, Some(&possible)),
            "not in the list it may hold"
        );
        assert!(
            !may_promote("pg-1", &revoke, Some(&possible)),
            "not revoked"
        );
        // Confirmed: pg-3 is in the list it holds now.
        lists.confirmed("pg-0", 1, &[ep("pg-1"), ep("pg-2"), ep("pg-3")]);
        assert!(may_promote(
            "pg-3",
            &revoke,
            lists.in_every_list("pg-0", 1).as_ref()
        ));
        // Another term is another list.
        assert_eq!(lists.in_every_list("pg-0", 2), None);
        // Unknown (a restarted operator): any revoked replica.
        assert!(may_promote("pg-3", &revoke, None));
    }
}
