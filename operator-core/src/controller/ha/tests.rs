//! Table tests of the controller's failover decisions (pure).

use super::*;
use crate::instance::protocol::MemberStatus;

const NAMES: [&str; 3] = ["simple-pg-0", "simple-pg-1", "simple-pg-2"];

fn names() -> Vec<String> {
    NAMES.map(String::from).to_vec()
}

fn t0() -> chrono::DateTime<Utc> {
    chrono::DateTime::from_timestamp(1_000, 0).unwrap()
}

/// A member reporting `role`, ready, running, at `lsn` (received and
/// replayed) on timeline 1.
fn at(name: &str, role: Role, lsn: u64) -> ObservedMember {
    ObservedMember {
        name: name.into(),
        status: Some(MemberStatus {
            name: name.into(),
            role,
            ready: true,
            process: ProcessState::Running,
            position: Position::Wal {
                timeline: 1,
                received_lsn: Some(lsn),
                replayed_lsn: Some(lsn),
            },
            ..Default::default()
        }),
        error: None,
    }
}

fn unreachable(name: &str) -> ObservedMember {
    ObservedMember {
        name: name.into(),
        status: None,
        error: Some("connection refused".into()),
    }
}

fn with(mut m: ObservedMember, f: impl FnOnce(&mut MemberStatus)) -> ObservedMember {
    f(m.status.as_mut().unwrap());
    m
}

fn fenced_stopped(name: &str) -> ObservedMember {
    with(at(name, Role::Unknown, 0), |s| {
        s.fenced = true;
        s.ready = false;
        s.process = ProcessState::Fenced;
        s.position = Position::None;
    })
}

/// The PostgreSQL rule in miniature (the engine's own `elect` is tested
/// in engines/postgres): keep the one ready primary; else the running
/// replica with the highest received, then replayed LSN, ties by name.
fn elect(members: &[ObservedMember]) -> Election {
    let primaries: Vec<_> = members
        .iter()
        .filter(|m| m.role() == Role::Primary)
        .collect();
    if let [p] = primaries.as_slice() {
        return if p.ready() {
            Election::Keep {
                primary: p.name.clone(),
            }
        } else {
            Election::Wait {
                reason: "primary not ready".into(),
                retry_after: Duration::from_secs(1),
            }
        };
    }
    let mut c: Vec<_> = members
        .iter()
        .filter(|m| m.role() == Role::Replica)
        .filter_map(|m| match m.status.as_ref()?.position {
            Position::Wal {
                received_lsn,
                replayed_lsn,
                ..
            } => Some((m.name.clone(), received_lsn?, replayed_lsn?)),
            _ => None,
        })
        .collect();
    c.sort_by(|a, b| b.1.cmp(&a.1).then(b.2.cmp(&a.2)).then(a.0.cmp(&b.0)));
    match c.first() {
        Some((name, ..)) => Election::Promote {
            candidate: name.clone(),
            reason: "most advanced".into(),
        },
        None => Election::NoCandidate {
            reason: "no running replica".into(),
        },
    }
}

/// The parts of a view a row changes.
struct Row {
    members: Vec<ObservedMember>,
    current: Option<&'static str>,
    target: Option<&'static str>,
    change: Option<PrimaryChange>,
    fenced: &'static [&'static str],
    delay: u64,
    down_ms: u64,
    crashed: bool,
    lease_expired: bool,
    pod_deleted: bool,
    detached: bool,
    sync: &'static [&'static str],
    /// Failsafe: the replicas were revoked (true by default, so that the
    /// rows about the later steps need not say it).
    revoked: bool,
    /// Failsafe: who may be promoted (`None`: anyone).
    promotable: Option<&'static [&'static str]>,
}

impl Default for Row {
    fn default() -> Self {
        Self {
            members: vec![],
            current: Some("simple-pg-0"),
            target: Some("simple-pg-0"),
            change: None,
            fenced: &[],
            delay: 0,
            down_ms: 0,
            crashed: false,
            lease_expired: false,
            pod_deleted: false,
            detached: false,
            sync: &[],
            revoked: true,
            promotable: None,
        }
    }
}

fn failover_from(from: &str) -> Option<PrimaryChange> {
    Some(PrimaryChange {
        reason: PrimaryChangeReason::Failover,
        from: from.into(),
        started_at: t0(),
    })
}

fn switchover_from(from: &str) -> Option<PrimaryChange> {
    Some(PrimaryChange {
        reason: PrimaryChangeReason::Switchover,
        from: from.into(),
        started_at: t0(),
    })
}

fn run(row: &Row) -> HaDecision {
    let names = names();
    let fenced: BTreeSet<String> = row.fenced.iter().map(|s| s.to_string()).collect();
    let sync: Vec<String> = row.sync.iter().map(|s| s.to_string()).collect();
    let promotable: Option<BTreeSet<String>> = row
        .promotable
        .map(|p| p.iter().map(|s| s.to_string()).collect());
    let view = HaView {
        instances: &names,
        members: &row.members,
        pods: &[],
        current_primary: row.current,
        target_primary: row.target,
        change: row.change.as_ref(),
        fenced: &fenced,
        failover_delay: Duration::from_secs(row.delay),
        primary_down_for: Duration::from_millis(row.down_ms),
        primary_crashed: row.crashed,
        lease_expired: row.lease_expired,
        pod_deleted: row.pod_deleted,
        detached: row.detached,
        sync_standbys: &sync,
        revoked: row.revoked,
        promotable: promotable.as_ref(),
    };
    decide(&view, &elect)
}

fn healthy() -> Vec<ObservedMember> {
    vec![
        at("simple-pg-0", Role::Primary, 300),
        at("simple-pg-1", Role::Replica, 300),
        at("simple-pg-2", Role::Replica, 290),
    ]
}

fn promote(candidate: &str, from: &str) -> HaDecision {
    HaDecision::Promote {
        candidate: candidate.into(),
        from: from.into(),
        reason: "most advanced".into(),
        catch_up: false,
    }
}

fn is_wait(d: &HaDecision, needle: &str) -> bool {
    matches!(d, HaDecision::Wait { reason, .. } if reason.contains(needle))
}

#[test]
fn a_fit_primary_is_kept() {
    let d = run(&Row {
        members: healthy(),
        ..Default::default()
    });
    assert_eq!(
        d,
        HaDecision::Keep {
            primary: "simple-pg-0".into()
        }
    );
}

#[test]
fn a_new_cluster_adopts_its_primary_or_the_member_awaiting_its_lease() {
    let d = run(&Row {
        members: healthy(),
        current: None,
        target: None,
        ..Default::default()
    });
    assert_eq!(
        d,
        HaDecision::Adopt {
            primary: "simple-pg-0".into()
        }
    );
    // Just initialised, kept down until the operator grants a lease.
    let awaiting = with(at("simple-pg-0", Role::Unknown, 0), |s| {
        s.awaiting_lease = true;
        s.ready = false;
        s.process = ProcessState::Preparing;
    });
    let d = run(&Row {
        members: vec![
            awaiting,
            unreachable("simple-pg-1"),
            unreachable("simple-pg-2"),
        ],
        current: None,
        target: None,
        ..Default::default()
    });
    assert_eq!(
        d,
        HaDecision::Adopt {
            primary: "simple-pg-0".into()
        }
    );
    // Nobody: wait.
    let d = run(&Row {
        members: NAMES.iter().map(|n| unreachable(n)).collect(),
        current: None,
        target: None,
        ..Default::default()
    });
    assert!(is_wait(&d, "no primary yet"), "{d:?}");
}

#[test]
fn failover_waits_for_the_grace_of_how_the_primary_failed() {
    // (primary's report, ms seen down, failoverDelay s, crashed, expected start)
    let exited = with(at("simple-pg-0", Role::Unknown, 0), |s| {
        s.process = ProcessState::Exited;
        s.ready = false;
    });
    let not_ready = with(at("simple-pg-0", Role::Primary, 300), |s| s.ready = false);
    let awaiting = with(at("simple-pg-0", Role::Unknown, 0), |s| {
        s.awaiting_lease = true;
        s.ready = false;
    });
    let rows: Vec<(ObservedMember, u64, u64, bool, bool)> = vec![
        (exited.clone(), 0, 0, false, true),
        (exited.clone(), 0, 2, false, false),
        (exited, 2_000, 2, false, true),
        (unreachable("simple-pg-0"), 4_999, 0, false, false),
        (unreachable("simple-pg-0"), 5_000, 0, false, true),
        (not_ready.clone(), 2_999, 0, false, false),
        (not_ready.clone(), 3_000, 0, false, true),
        (awaiting.clone(), 9_999, 0, false, false),
        (awaiting, 10_000, 0, false, true),
        // Its server crashed and the manager already restarted it.
        (at("simple-pg-0", Role::Primary, 300), 0, 0, true, true),
    ];
    for (i, (primary, down_ms, delay, crashed, starts)) in rows.into_iter().enumerate() {
        let mut members = healthy();
        members[0] = primary;
        let d = run(&Row {
            members,
            down_ms,
            delay,
            crashed,
            ..Default::default()
        });
        assert_eq!(
            matches!(d, HaDecision::StartFailover { ref from, .. } if from == "simple-pg-0"),
            starts,
            "row {i}: {d:?}"
        );
        if !starts {
            assert!(is_wait(&d, "failing over after"), "row {i}: {d:?}");
        }
    }
}

#[test]
fn a_reachable_failed_primary_is_fenced_before_anything_is_promoted() {
    let mut members = healthy();
    members[0] = with(at("simple-pg-0", Role::Unknown, 0), |s| {
        s.process = ProcessState::Exited;
        s.ready = false;
    });
    let d = run(&Row {
        members: members.clone(),
        change: failover_from("simple-pg-0"),
        target: None,
        ..Default::default()
    });
    assert_eq!(
        d,
        HaDecision::Fence {
            instance: "simple-pg-0".into()
        }
    );
    // Fenced and stopped: the most advanced replica.
    members[0] = fenced_stopped("simple-pg-0");
    let d = run(&Row {
        members,
        change: failover_from("simple-pg-0"),
        target: None,
        ..Default::default()
    });
    assert_eq!(d, promote("simple-pg-1", "simple-pg-0"));
}

#[test]
fn an_unreachable_primary_waits_for_its_lease_then_its_pod_is_deleted_and_replicas_detached() {
    let mut members = healthy();
    members[0] = unreachable("simple-pg-0");
    let row = |lease_expired, pod_deleted, detached| Row {
        members: members.clone(),
        change: failover_from("simple-pg-0"),
        target: None,
        lease_expired,
        pod_deleted,
        detached,
        ..Default::default()
    };
    // A primary still holding its lease: it may be running, cut off.
    let d = run(&row(false, false, false));
    assert!(
        is_wait(&d, "write lease of unreachable simple-pg-0"),
        "{d:?}"
    );
    assert_eq!(
        run(&row(true, false, false)),
        HaDecision::DeletePod {
            instance: "simple-pg-0".into()
        }
    );
    assert_eq!(
        run(&row(true, true, false)),
        HaDecision::Detach {
            from: "simple-pg-0".into()
        }
    );
    assert_eq!(
        run(&row(true, true, true)),
        promote("simple-pg-1", "simple-pg-0")
    );
}

#[test]
fn elections_pick_the_most_advanced_then_the_first_name_and_skip_fenced_and_non_sync() {
    let base = || Row {
        change: failover_from("simple-pg-0"),
        target: None,
        ..Default::default()
    };
    // (replica 1 lsn, replica 2 lsn, fenced, sync standbys, winner)
    type Row5 = (
        u64,
        u64,
        &'static [&'static str],
        &'static [&'static str],
        &'static str,
    );
    let rows: [Row5; 5] = [
        // A lagging replica loses.
        (300, 290, &[], &[], "simple-pg-1"),
        (290, 300, &[], &[], "simple-pg-2"),
        // Ties go to the first name.
        (300, 300, &[], &[], "simple-pg-1"),
        // A fenced instance is never elected, however advanced.
        (400, 300, &["simple-pg-1"], &[], "simple-pg-2"),
        // Only the failed primary's synchronous standbys are compared.
        (400, 300, &[], &["simple-pg-2"], "simple-pg-2"),
    ];
    for (i, (l1, l2, fenced, sync, winner)) in rows.into_iter().enumerate() {
        let d = run(&Row {
            members: vec![
                fenced_stopped("simple-pg-0"),
                at("simple-pg-1", Role::Replica, l1),
                at("simple-pg-2", Role::Replica, l2),
            ],
            fenced,
            sync,
            ..base()
        });
        assert_eq!(d, promote(winner, "simple-pg-0"), "row {i}");
    }
    // Nobody to elect: wait, do not promote.
    let d = run(&Row {
        members: vec![
            fenced_stopped("simple-pg-0"),
            unreachable("simple-pg-1"),
            unreachable("simple-pg-2"),
        ],
        ..base()
    });
    assert!(is_wait(&d, "failover from simple-pg-0"), "{d:?}");
}

#[test]
fn a_restarted_operator_promotes_the_recorded_target_and_no_other() {
    // targetPrimary was recorded before the promotion; the election would
    // now prefer simple-pg-2.
    let d = run(&Row {
        members: vec![
            unreachable("simple-pg-0"),
            at("simple-pg-1", Role::Replica, 290),
            at("simple-pg-2", Role::Replica, 300),
        ],
        change: failover_from("simple-pg-0"),
        target: Some("simple-pg-1"),
        ..Default::default()
    });
    assert_eq!(
        d,
        HaDecision::Promote {
            candidate: "simple-pg-1".into(),
            from: "simple-pg-0".into(),
            reason: "chosen before".into(),
            catch_up: false,
        }
    );
}

#[test]
fn no_failover_when_no_other_manager_answers() {
    // The operator may be the one cut off: fencing the primary or
    // deleting its pod would only stop the writes.
    let d = run(&Row {
        members: NAMES.iter().map(|n| unreachable(n)).collect(),
        down_ms: 60_000,
        ..Default::default()
    });
    assert!(is_wait(&d, "no other instance manager answers"), "{d:?}");
}

#[test]
fn a_second_writer_is_fenced() {
    let mut members = healthy();
    members[2] = at("simple-pg-2", Role::Primary, 500);
    assert_eq!(
        run(&Row {
            members,
            ..Default::default()
        }),
        HaDecision::FenceIntruder {
            instance: "simple-pg-2".into(),
            primary: "simple-pg-0".into()
        }
    );
}

#[test]
fn fencing_by_the_user() {
    // The primary fenced: fail over at once to a replica that is not.
    let mut members = healthy();
    members[0] = fenced_stopped("simple-pg-0");
    let d = run(&Row {
        members: members.clone(),
        fenced: &["simple-pg-0"],
        ..Default::default()
    });
    assert!(matches!(d, HaDecision::StartFailover { .. }), "{d:?}");
    // Every instance fenced: nothing is promoted.
    let d = run(&Row {
        members,
        fenced: &["simple-pg-0", "simple-pg-1", "simple-pg-2"],
        ..Default::default()
    });
    assert!(is_wait(&d, "every instance is fenced"), "{d:?}");
    // A fenced replica is no switchover target.
    let d = run(&Row {
        members: healthy(),
        target: Some("simple-pg-1"),
        fenced: &["simple-pg-1"],
        ..Default::default()
    });
    assert!(
        matches!(&d, HaDecision::RefuseSwitchover { why, .. } if why.contains("is fenced")),
        "{d:?}"
    );
}

#[test]
fn switchover_requests_are_checked_then_carried_out() {
    let d = run(&Row {
        members: healthy(),
        target: Some("simple-pg-2"),
        ..Default::default()
    });
    assert_eq!(
        d,
        HaDecision::StartSwitchover {
            from: "simple-pg-0".into(),
            to: "simple-pg-2".into()
        }
    );
    // Refusals: no such instance, not a ready replica, primary unfit.
    let mut not_ready = healthy();
    not_ready[1] = with(at("simple-pg-1", Role::Replica, 300), |s| s.ready = false);
    let mut primary_down = healthy();
    primary_down[0] = unreachable("simple-pg-0");
    let rows: [(Vec<ObservedMember>, &str, &str); 3] = [
        (
            healthy(),
            "simple-pg-9",
            "there is no instance \"simple-pg-9\"",
        ),
        (
            not_ready,
            "simple-pg-1",
            "simple-pg-1 is not a ready replica",
        ),
        (
            primary_down,
            "simple-pg-1",
            "the primary simple-pg-0 is not ready",
        ),
    ];
    for (members, target, want) in rows {
        let d = run(&Row {
            members,
            target: Some(target),
            ..Default::default()
        });
        assert!(
            matches!(&d, HaDecision::RefuseSwitchover { target: t, why } if t == target && why.contains(want)),
            "{target}: {d:?}"
        );
    }
    // In progress: the primary is stopped cleanly first, then the target
    // is promoted after catching up.
    let d = run(&Row {
        members: healthy(),
        target: Some("simple-pg-2"),
        change: switchover_from("simple-pg-0"),
        ..Default::default()
    });
    assert_eq!(
        d,
        HaDecision::Fence {
            instance: "simple-pg-0".into()
        }
    );
    let mut stopped = healthy();
    stopped[0] = fenced_stopped("simple-pg-0");
    let d = run(&Row {
        members: stopped,
        target: Some("simple-pg-2"),
        change: switchover_from("simple-pg-0"),
        ..Default::default()
    });
    assert_eq!(
        d,
        HaDecision::Promote {
            candidate: "simple-pg-2".into(),
            from: "simple-pg-0".into(),
            reason: "switchover".into(),
            catch_up: true,
        }
    );
    // The primary stopped answering meanwhile: a failover now.
    let mut gone = healthy();
    gone[0] = unreachable("simple-pg-0");
    let d = run(&Row {
        members: gone,
        target: Some("simple-pg-2"),
        change: switchover_from("simple-pg-0"),
        ..Default::default()
    });
    assert!(matches!(d, HaDecision::AbortSwitchover { .. }), "{d:?}");
}

#[test]
fn replicas_follow_the_primary_when_they_do_not_stream_from_it() {
    let now = Instant::now();
    let mut primary = at("simple-pg-0", Role::Primary, 300);
    primary.status.as_mut().unwrap().details = json!({ "replicas": [
        { "name": "simple-pg-1", "state": "streaming" },
    ]});
    let members = vec![
        primary,
        at("simple-pg-1", Role::Replica, 300),
        at("simple-pg-2", Role::Replica, 200),
    ];
    let fenced = BTreeSet::new();
    let mut since = BTreeMap::new();
    // First seen not streaming: not yet.
    assert!(followers("simple-pg-0", &members, &fenced, &mut since, now).is_empty());
    let later = now + NOT_STREAMING_GRACE;
    assert_eq!(
        followers("simple-pg-0", &members, &fenced, &mut since, later),
        [("simple-pg-2".to_string(), false)]
    );
    let much_later = now + REWIND_AFTER;
    assert_eq!(
        followers("simple-pg-0", &members, &fenced, &mut since, much_later),
        [("simple-pg-2".to_string(), true)]
    );
    // The fenced old primary and a diverged member at once; user-fenced
    // ones never.
    let mut members = members;
    members[1] = fenced_stopped("simple-pg-1");
    members[2] = with(at("simple-pg-2", Role::Replica, 200), |s| {
        s.details = json!({ "diverged": "… is not a child of this server's history" });
    });
    let mut since = BTreeMap::new();
    assert_eq!(
        followers("simple-pg-0", &members, &fenced, &mut since, now),
        [
            ("simple-pg-1".to_string(), false),
            ("simple-pg-2".to_string(), true)
        ]
    );
    let user: BTreeSet<String> = ["simple-pg-1".to_string()].into();
    assert_eq!(
        followers("simple-pg-0", &members, &user, &mut since, now),
        [("simple-pg-2".to_string(), true)]
    );
}

/// Last told, primary, streaming now, promoted by this process for, due.
type SyncRow<'a> = (
    Option<&'a (String, Vec<String>)>,
    &'a str,
    &'a [&'a str],
    Option<Duration>,
    bool,
);

#[test]
fn synchronous_standbys_are_not_guessed_right_after_a_promotion() {
    let told = |p: &str, s: &[&str]| (p.to_string(), s.iter().map(|n| n.to_string()).collect());
    let list = |s: &[&str]| s.iter().map(|n| n.to_string()).collect::<Vec<String>>();
    let just = Some(Duration::from_millis(200));
    let settled = Some(SYNC_SETTLE);
    let pg0 = told("simple-pg-0", &["simple-pg-2"]);
    let pg1_none = told("simple-pg-1", &[]);
    let pg1_two = told("simple-pg-1", &["simple-pg-2"]);
    let rows: [SyncRow<'_>; 10] = [
        // Just promoted, nobody streams yet: keep the full list it runs
        // with (the old primary may be the engine's first guess).
        (Some(&pg0), "simple-pg-1", &[], just, false),
        (None, "simple-pg-1", &[], just, false),
        // The first replica streams: tell it at once.
        (Some(&pg0), "simple-pg-1", &["simple-pg-2"], just, true),
        // Still nobody after the settling time: the engine decides
        // (asynchronous with minSyncReplicas 0).
        (Some(&pg0), "simple-pg-1", &[], settled, true),
        // Not promoted by this process (adopted, a restarted operator).
        (None, "simple-pg-1", &[], None, true),
        // Told already: the same set is not sent again...
        (Some(&pg1_two), "simple-pg-1", &["simple-pg-2"], just, false),
        (Some(&pg1_none), "simple-pg-1", &[], settled, false),
        // ... a changed one is, losing every streaming replica included.
        (
            Some(&pg1_two),
            "simple-pg-1",
            &["simple-pg-0", "simple-pg-2"],
            settled,
            true,
        ),
        (Some(&pg1_two), "simple-pg-1", &[], just, true),
        (Some(&pg1_two), "simple-pg-1", &[], None, true),
    ];
    for (last, primary, streaming, promoted_for, due) in rows {
        assert_eq!(
            sync_standbys_due(last, primary, &list(streaming), promoted_for),
            due,
            "told {last:?}, primary {primary}, streaming {streaming:?}, promoted for {promoted_for:?}"
        );
    }
}

#[test]
fn writes_go_only_to_the_recorded_primary_outside_a_change() {
    let engine = || Routing {
        rw: Some("simple-pg-1".into()),
        ro: vec!["simple-pg-0".into(), "simple-pg-2".into()],
    };
    let none = BTreeSet::new();
    let r = restrict_routing(engine(), Some("simple-pg-1"), false, &none);
    assert_eq!(r.rw.as_deref(), Some("simple-pg-1"));
    // Another member claims to be primary: no writes to it.
    let r = restrict_routing(engine(), Some("simple-pg-0"), false, &none);
    assert_eq!(r.rw, None);
    // During a change: no writes.
    let r = restrict_routing(engine(), Some("simple-pg-1"), true, &none);
    assert_eq!(r.rw, None);
    // Fenced by the user: neither writes nor reads.
    let fenced: BTreeSet<String> = ["simple-pg-2".to_string()].into();
    let r = restrict_routing(engine(), Some("simple-pg-1"), false, &fenced);
    assert_eq!(r.ro, ["simple-pg-0"]);
}

#[test]
fn outcome_fields_land_in_status() {
    let out = HaOutcome {
        current_primary: Some("simple-pg-0".into()),
        target_primary: Some("simple-pg-1".into()),
        lease_term: 4,
        primary_change: switchover_from("simple-pg-0"),
        timeline: Some(3),
        switchover: Some((false, "SwitchoverRefused", "no".into())),
        ..Default::default()
    };
    let previous = ClusterStatus {
        current_primary: Some("simple-pg-0".into()),
        current_primary_timestamp: Some(t0()),
        ..Default::default()
    };
    let mut s = previous.clone();
    out.apply(Some(&previous), &mut s);
    assert_eq!(s.phase, Some(Phase::Switchover));
    assert_eq!(s.lease_term, 4);
    assert_eq!(s.timeline, Some(3));
    assert_eq!(s.target_primary.as_deref(), Some("simple-pg-1"));
    assert_eq!(s.current_primary_timestamp, Some(t0()), "primary unchanged");
    let c = crate::api::status::get_condition(&s.conditions, "Switchover").unwrap();
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("False", "SwitchoverRefused")
    );
    // Nothing recorded (no manager answered yet): the routed writer the
    // status writer put there stands.
    let mut routed = ClusterStatus {
        current_primary: Some("simple-pg-0".into()),
        ..Default::default()
    };
    HaOutcome::default().apply(None, &mut routed);
    assert_eq!(routed.current_primary.as_deref(), Some("simple-pg-0"));
    let v = serde_json::to_value(&s).unwrap();
    assert_eq!(v["primaryChange"]["reason"], "Switchover");
    assert_eq!(v["primaryChange"]["from"], "simple-pg-0");
    assert_eq!(v["leaseTerm"], 4);
}

/// A stand-in instance manager answering `lease` with a restart count
/// the test moves; counts the renewals.
async fn fake_manager(
    restarts: Arc<std::sync::atomic::AtomicU64>,
    renewals: Arc<std::sync::atomic::AtomicU64>,
) -> u16 {
    use std::sync::atomic::Ordering;
    let app = axum::Router::new().route(
        "/v1/actions/lease",
        axum::routing::post(move || {
            let (restarts, renewals) = (restarts.clone(), renewals.clone());
            async move {
                renewals.fetch_add(1, Ordering::SeqCst);
                axum::Json(json!({
                    "lease": true,
                    "process": "running",
                    "restarts": restarts.load(Ordering::SeqCst),
                }))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    port
}

#[tokio::test]
async fn the_lease_task_renews_notices_a_crash_and_stops_when_dropped() {
    use std::sync::atomic::{AtomicU64, Ordering};
    let (restarts, renewals) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let port = fake_manager(restarts.clone(), renewals.clone()).await;
    let client = InstanceClient::new(
        "token".into(),
        "uid".into(),
        vec![PeerEndpoint {
            name: "simple-pg-0".into(),
            host: "127.0.0.1".into(),
            db_port: 5432,
            api_port: port,
            ports: Default::default(),
        }],
        Duration::from_secs(1),
    );
    let woken = Arc::new(AtomicU64::new(0));
    let w = woken.clone();
    let task = LeaseTask::start(move || {
        w.fetch_add(1, Ordering::SeqCst);
    });
    assert!(task.expired("simple-pg-0", Instant::now() + LEASE_TTL + LEASE_MARGIN * 2));
    task.set(Some(("simple-pg-0".into(), 1, client)));
    // Renewed at once, then every TTL/4.
    tokio::time::sleep(LEASE_TTL / 4 + Duration::from_millis(300)).await;
    assert!(renewals.load(Ordering::SeqCst) >= 2, "{renewals:?}");
    assert!(!task.expired("simple-pg-0", Instant::now()));
    assert_eq!(woken.load(Ordering::SeqCst), 0);
    // The server restarted behind the manager's back: a crash, and the
    // cluster's reconcile is woken.
    restarts.store(1, Ordering::SeqCst);
    tokio::time::sleep(LEASE_TTL / 4 + Duration::from_millis(300)).await;
    assert!(task.crashed("simple-pg-0"));
    assert!(woken.load(Ordering::SeqCst) >= 1);
    task.clear_crash();
    assert!(!task.crashed("simple-pg-0"));
    // No holder: no renewals; dropped: none either.
    task.set(None);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let before = renewals.load(Ordering::SeqCst);
    tokio::time::sleep(LEASE_TTL / 4 + Duration::from_millis(200)).await;
    assert_eq!(renewals.load(Ordering::SeqCst), before);
    drop(task);
}

#[tokio::test]
async fn a_deleted_cluster_loses_its_lease_task() {
    let (tx, _rx) = futures::channel::mpsc::unbounded();
    let registry = HaRegistry::new(tx);
    let object = |n: &str| {
        ObjectRef::new_with(
            n,
            kube::api::ApiResource::erase::<k8s_openapi::api::core::v1::ConfigMap>(&()),
        )
        .within("ns")
    };
    registry.get("ns", "simple-pg", object("simple-pg"));
    registry.get("ns", "other-pg", object("other-pg"));
    assert_eq!(registry.len(), 2);
    registry.retain(|_, name| name != "simple-pg");
    assert_eq!(registry.len(), 1);
}

#[test]
fn a_stopped_switchover_primary_leads_to_the_promotion_decide_would_choose() {
    // The step goes on from the fence's reply without looking again only
    // when that reply says what a new observation would: stopped.
    let mut stopped = healthy();
    stopped[0] = fenced_stopped("simple-pg-0");
    let decided = run(&Row {
        members: stopped,
        target: Some("simple-pg-2"),
        change: switchover_from("simple-pg-0"),
        ..Default::default()
    });
    let reply = serde_json::json!({ "fenced": true, "stopped": true });
    assert_eq!(
        after_switchover_fence("simple-pg-0", "simple-pg-2", &reply),
        Some(decided)
    );
    // Still stopping (202), or an odd reply: look again.
    for reply in [
        serde_json::json!({ "fenced": true, "stopped": false }),
        serde_json::json!({}),
    ] {
        assert_eq!(
            after_switchover_fence("simple-pg-0", "simple-pg-2", &reply),
            None,
            "{reply}"
        );
    }
}

/// A replica on `timeline`, its WAL receiver running or not.
fn replica_on(name: &str, lsn: u64, timeline: u32, receiving: bool) -> ObservedMember {
    with(at(name, Role::Replica, lsn), |s| {
        s.position = Position::Wal {
            timeline,
            received_lsn: Some(lsn),
            replayed_lsn: Some(lsn),
        };
        s.details = serde_json::json!({ "walReceiver": { "running": receiving } });
    })
}

fn timeline_of(m: &ObservedMember) -> u32 {
    match m.status.as_ref().unwrap().position {
        Position::Wal { timeline, .. } => timeline,
        _ => 0,
    }
}

#[test]
fn replicas_keep_the_timeline_they_streamed_on_when_their_primary_is_gone() {
    let mut known = BTreeMap::new();
    // After a switchover to timeline 2, both replicas stream on it.
    note_timelines(
        &[
            at("simple-pg-0", Role::Primary, 500),
            replica_on("simple-pg-1", 500, 2, true),
            replica_on("simple-pg-2", 500, 2, true),
        ],
        &mut known,
    );
    // The primary is killed: no WAL receiver, the control file's (stale)
    // timeline 1 is reported; one replica had a restartpoint since.
    let failed = [
        unreachable("simple-pg-0"),
        replica_on("simple-pg-1", 600, 1, false),
        replica_on("simple-pg-2", 550, 2, false),
    ];
    note_timelines(&failed, &mut known);
    assert_eq!(known.get("simple-pg-1"), Some(&2), "{known:?}");
    let seen = with_known_timelines(&failed, &known);
    let rows: [(&str, u32); 2] = [("simple-pg-1", 2), ("simple-pg-2", 2)];
    for (name, want) in rows {
        let m = seen.iter().find(|m| m.name == name).unwrap();
        assert_eq!(timeline_of(m), want, "{name}");
    }
    // Never lowered; members never seen streaming keep what they report;
    // a primary's own timeline is left alone.
    let rows: [(ObservedMember, u32); 3] = [
        (replica_on("simple-pg-1", 700, 3, false), 3),
        (replica_on("simple-pg-9", 700, 1, false), 1),
        (
            with(at("simple-pg-2", Role::Primary, 700), |s| {
                s.position = Position::Wal {
                    timeline: 1,
                    received_lsn: Some(700),
                    replayed_lsn: Some(700),
                }
            }),
            1,
        ),
    ];
    for (m, want) in rows {
        let name = m.name.clone();
        let seen = with_known_timelines(&[m], &known);
        assert_eq!(timeline_of(&seen[0]), want, "{name}");
    }
}

#[test]
fn an_unreachable_primary_has_its_replicas_revoked_first_and_only_a_revoked_candidate_is_promoted()
{
    let mut members = healthy();
    members[0] = unreachable("simple-pg-0");
    let row = |revoked, lease_expired, promotable| Row {
        members: members.clone(),
        change: failover_from("simple-pg-0"),
        target: None,
        revoked,
        lease_expired,
        pod_deleted: true,
        detached: true,
        promotable,
        ..Default::default()
    };
    // Revoked before anything else, even with the lease long expired: the
    // old primary may run on failsafe.
    assert_eq!(
        run(&row(false, true, None)),
        HaDecision::Revoke {
            from: "simple-pg-0".into()
        }
    );
    // Revoked, the lease or an acknowledgement still valid: wait.
    let d = run(&row(true, false, Some(&["simple-pg-1", "simple-pg-2"])));
    assert!(is_wait(&d, "failsafe acknowledgements to expire"), "{d:?}");
    // The most advanced replica (simple-pg-1) was not revoked, or not in
    // every list the old primary may hold: revoke again, never promote
    // the less advanced one (it may lack acknowledged commits).
    assert_eq!(
        run(&row(true, true, Some(&["simple-pg-2"]))),
        HaDecision::Revoke {
            from: "simple-pg-0".into()
        }
    );
    assert_eq!(
        run(&row(true, true, Some(&["simple-pg-1"]))),
        promote("simple-pg-1", "simple-pg-0")
    );
    // A primary fenced through its manager: no revocation needed.
    let d = run(&Row {
        members: vec![
            fenced_stopped("simple-pg-0"),
            at("simple-pg-1", Role::Replica, 300),
            at("simple-pg-2", Role::Replica, 290),
        ],
        change: failover_from("simple-pg-0"),
        target: None,
        revoked: false,
        ..Default::default()
    });
    assert_eq!(d, promote("simple-pg-1", "simple-pg-0"));
}
