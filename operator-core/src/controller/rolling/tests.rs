//! Table tests of the rolling-update plan (pure).

use super::*;
use crate::instance::protocol::{MemberStatus, ProcessState};

const PG: [&str; 3] = ["roll-pg-0", "roll-pg-1", "roll-pg-2"];
const GA: [&str; 3] = ["roll-gx-0", "roll-gx-1", "roll-gx-2"];
const OLD: &str = "rev-old";
const NEW: &str = "rev-new";

fn names(n: [&str; 3]) -> Vec<String> {
    n.map(String::from).to_vec()
}

fn pod(name: &str, rev: &str) -> RollPod {
    RollPod {
        name: name.into(),
        uid: Some(format!("uid-{name}-{rev}")),
        revision: Some(rev.into()),
        ready: true,
        deleting: false,
    }
}

/// A PostgreSQL member, ready; the primary reports `streaming` replicas.
fn pg(name: &str, role: Role, lsn: u64, streaming: &[&str]) -> ObservedMember {
    let replicas: Vec<serde_json::Value> = streaming
        .iter()
        .map(|n| json!({"name": n, "state": "streaming", "syncState": "quorum"}))
        .collect();
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
            details: json!({ "replicas": replicas }),
            ..Default::default()
        }),
        error: None,
    }
}

/// A healthy three-member PostgreSQL cluster, `roll-pg-0` primary.
fn pg_members() -> Vec<ObservedMember> {
    vec![
        pg(PG[0], Role::Primary, 100, &[PG[1], PG[2]]),
        pg(PG[1], Role::Replica, 90, &[]),
        pg(PG[2], Role::Replica, 95, &[]),
    ]
}

fn galera(name: &str, state: &str, size: i64) -> ObservedMember {
    ObservedMember {
        name: name.into(),
        status: Some(MemberStatus {
            name: name.into(),
            role: Role::Member,
            ready: state == "Synced",
            process: ProcessState::Running,
            position: Position::Galera {
                cluster_uuid: "6f0f2b9e-1111-11ee-8000-000000000001".into(),
                seqno: 7,
                state: state.into(),
            },
            details: json!({"wsrepClusterSize": size, "wsrepClusterStatus": "Primary"}),
            ..Default::default()
        }),
        error: None,
    }
}

fn with(mut m: ObservedMember, f: impl FnOnce(&mut MemberStatus)) -> ObservedMember {
    f(m.status.as_mut().unwrap());
    m
}

struct Case {
    instances: Vec<String>,
    pods: Vec<RollPod>,
    members: Vec<ObservedMember>,
    model: ReplicationModel,
    primary: Option<&'static str>,
    method: PrimaryUpdateMethod,
    supervised: bool,
    changing: Option<&'static str>,
    keep: Option<usize>,
    in_flight: Option<InFlight>,
}

fn pg_case(revs: [&str; 3]) -> Case {
    Case {
        instances: names(PG),
        pods: PG.iter().zip(revs).map(|(n, r)| pod(n, r)).collect(),
        members: pg_members(),
        model: ReplicationModel::PrimaryReplica,
        primary: Some(PG[0]),
        method: PrimaryUpdateMethod::Switchover,
        supervised: false,
        changing: None,
        keep: None,
        in_flight: None,
    }
}

fn galera_case(revs: [&str; 3]) -> Case {
    Case {
        instances: names(GA),
        pods: GA.iter().zip(revs).map(|(n, r)| pod(n, r)).collect(),
        members: GA.iter().map(|n| galera(n, "Synced", 3)).collect(),
        model: ReplicationModel::MultiWriter,
        primary: Some(GA[0]),
        ..pg_case([NEW; 3])
    }
}

fn run(c: &Case) -> RollPlan {
    plan(&RollView {
        instances: &c.instances,
        pods: &c.pods,
        update_revision: Some(NEW),
        members: &c.members,
        model: c.model,
        primary: c.primary,
        method: c.method,
        supervised: c.supervised,
        changing: c.changing,
        keep: c.keep,
        in_flight: c.in_flight.as_ref(),
    })
}

fn delete(name: &str, rev: &str, role: &'static str) -> RollAction {
    RollAction::DeletePod {
        instance: name.into(),
        uid: Some(format!("uid-{name}-{rev}")),
        role,
    }
}

fn waits_for(p: &RollPlan, text: &str) {
    match &p.action {
        RollAction::Wait { reason } => assert!(reason.contains(text), "{reason:?} lacks {text:?}"),
        other => panic!("expected a wait for {text:?}, got {other:?}"),
    }
}

#[test]
fn nothing_outdated_is_done() {
    let p = run(&pg_case([NEW; 3]));
    assert_eq!(p.action, RollAction::Done);
    assert_eq!((p.updated, p.total), (3, 3));
    assert_eq!(p.message(), None);
    // Without a known update revision, templates are not compared.
    let c = pg_case([OLD; 3]);
    let p = plan(&RollView {
        update_revision: None,
        instances: &c.instances,
        pods: &c.pods,
        members: &c.members,
        model: c.model,
        primary: c.primary,
        method: c.method,
        supervised: false,
        changing: None,
        keep: None,
        in_flight: None,
    });
    assert_eq!(p.action, RollAction::Done);
}

#[test]
fn replicas_first_highest_ordinal_first_then_switchover_then_old_primary() {
    // (pod revisions, expected action)
    let table: [([&str; 3], RollAction); 3] = [
        ([OLD, OLD, OLD], delete(PG[2], OLD, "replica")),
        ([OLD, OLD, NEW], delete(PG[1], OLD, "replica")),
        (
            [OLD, NEW, NEW],
            // The most advanced updated replica (roll-pg-2 received 95).
            RollAction::Switchover {
                from: PG[0].into(),
                to: PG[2].into(),
                why: SwitchoverFor::Update,
            },
        ),
    ];
    for (revs, want) in table {
        let p = run(&pg_case(revs));
        assert_eq!(p.action, want, "{revs:?}");
        assert_eq!(
            p.updated,
            revs.iter().filter(|r| **r == NEW).count(),
            "{revs:?}"
        );
    }
    // After the switchover, roll-pg-0 is a replica: updated last.
    let mut c = pg_case([OLD, NEW, NEW]);
    c.primary = Some(PG[2]);
    c.members = vec![
        pg(PG[0], Role::Replica, 120, &[]),
        pg(PG[1], Role::Replica, 120, &[]),
        pg(PG[2], Role::Primary, 120, &[PG[0], PG[1]]),
    ];
    assert_eq!(run(&c).action, delete(PG[0], OLD, "replica"));
    let msg = run(&c).message().unwrap();
    assert!(
        msg.starts_with("Rolling update: 2 of 3 instances updated"),
        "{msg}"
    );
}

#[test]
fn one_at_a_time_each_back_and_in_sync_before_the_next() {
    // roll-pg-2 was deleted: its old pod still shows (cache lag).
    let mut c = pg_case([OLD, OLD, OLD]);
    c.in_flight = Some(InFlight {
        instance: PG[2].into(),
        deleted_uid: Some(format!("uid-{}-{OLD}", PG[2])),
        age: Duration::from_millis(50),
    });
    waits_for(&run(&c), "waiting for roll-pg-2 to be back ready");
    // Being deleted, then gone, then recreated but not ready, then ready
    // but not streaming yet: wait each time.
    c.pods[2].deleting = true;
    waits_for(&run(&c), "roll-pg-2");
    c.pods.pop();
    waits_for(&run(&c), "waiting for roll-pg-2 to be recreated");
    c.pods.push(RollPod {
        ready: false,
        ..pod(PG[2], NEW)
    });
    waits_for(&run(&c), "waiting for roll-pg-2 to be back ready");
    // Up again, not streaming yet: still not back.
    c.pods[2].ready = true;
    c.members[0] = pg(PG[0], Role::Primary, 100, &[PG[1]]);
    let p = run(&c);
    waits_for(&p, "waiting for roll-pg-2 to be streaming");
    assert_eq!(
        p.message().unwrap(),
        "Rolling update: 1 of 3 instances updated, waiting for roll-pg-2 to be streaming"
    );
    // Streaming again: the next one.
    c.members[0] = pg(PG[0], Role::Primary, 100, &[PG[1], PG[2]]);
    assert_eq!(run(&c).action, delete(PG[1], OLD, "replica"));
}

#[test]
fn never_while_a_member_is_unready_or_the_primary_changes() {
    let mut c = pg_case([OLD, OLD, OLD]);
    c.members[1] = with(c.members[1].clone(), |s| s.ready = false);
    waits_for(&run(&c), "waiting for roll-pg-1 to be ready");

    let mut c = pg_case([OLD, OLD, OLD]);
    c.members[1] = ObservedMember {
        name: PG[1].into(),
        status: None,
        error: Some("connection refused".into()),
    };
    waits_for(&run(&c), "roll-pg-1");

    let mut c = pg_case([OLD, OLD, OLD]);
    c.changing = Some("waiting for the failover from roll-pg-0 to finish");
    waits_for(&run(&c), "failover from roll-pg-0");

    let mut c = pg_case([OLD, OLD, OLD]);
    c.primary = None;
    waits_for(&run(&c), "primary");
}

#[test]
fn primary_update_method_and_strategy() {
    // restart: the primary's pod in place, no switchover.
    let mut c = pg_case([OLD, NEW, NEW]);
    c.method = PrimaryUpdateMethod::Restart;
    assert_eq!(run(&c).action, delete(PG[0], OLD, "primary"));

    // supervised: stop before the primary, say so.
    let mut c = pg_case([OLD, NEW, NEW]);
    c.supervised = true;
    let p = run(&c);
    assert_eq!(
        p.action,
        RollAction::AwaitUser {
            primary: PG[0].into()
        }
    );
    assert!(
        p.message()
            .unwrap()
            .contains("waiting for the user to request a switchover of the primary roll-pg-0"),
        "{:?}",
        p.message()
    );
    // supervised still rolls the replicas by itself.
    let mut c = pg_case([OLD, OLD, NEW]);
    c.supervised = true;
    assert_eq!(run(&c).action, delete(PG[1], OLD, "replica"));

    // A single instance: nothing to switch over to, so in place.
    let c = Case {
        instances: vec![PG[0].into()],
        pods: vec![pod(PG[0], OLD)],
        members: vec![pg(PG[0], Role::Primary, 1, &[])],
        ..pg_case([NEW; 3])
    };
    assert_eq!(run(&c).action, delete(PG[0], OLD, "primary"));
}

#[test]
fn a_pending_restart_is_a_restart_in_place_in_the_same_order() {
    let mut c = pg_case([NEW; 3]);
    for m in &mut c.members {
        m.status.as_mut().unwrap().pending_restart = true;
    }
    assert_eq!(
        run(&c).action,
        RollAction::Restart {
            instance: PG[2].into(),
            role: "replica"
        }
    );
    // Restarting: wait until it reports no pending restart…
    c.in_flight = Some(InFlight {
        instance: PG[2].into(),
        deleted_uid: None,
        age: Duration::from_secs(3),
    });
    waits_for(&run(&c), "waiting for roll-pg-2 to restart");
    // … and stop, saying so, when it never does.
    c.in_flight.as_mut().unwrap().age = RESTART_TIMEOUT;
    waits_for(&run(&c), "rolling update stopped");
    // Back: the next replica; an outdated pod is recreated, not restarted.
    c.in_flight = None;
    c.members[2].status.as_mut().unwrap().pending_restart = false;
    c.pods[1] = pod(PG[1], OLD);
    assert_eq!(run(&c).action, delete(PG[1], OLD, "replica"));
}

#[test]
fn a_lowered_hot_standby_parameter_restarts_the_primary_first_in_place() {
    let mut c = pg_case([NEW; 3]);
    // Only the primary has the new settings (the replicas are reconfigured
    // after it restarted) and must restart before them.
    let primary = c.members[0].status.as_mut().unwrap();
    primary.pending_restart = true;
    primary.restart_primary_first = true;
    assert_eq!(
        run(&c).action,
        RollAction::Restart {
            instance: PG[0].into(),
            role: "primary"
        }
    );
    // Without the flag the primary is last, by switchover.
    c.members[0].status.as_mut().unwrap().restart_primary_first = false;
    assert!(
        matches!(run(&c).action, RollAction::Switchover { .. }),
        "{:?}",
        run(&c).action
    );
}

#[test]
fn galera_members_first_writer_last_each_synced_never_below_quorum() {
    assert_eq!(
        run(&galera_case([OLD; 3])).action,
        delete(GA[2], OLD, "member")
    );
    // A member back but still joining (cluster size 2, Joined): wait.
    let mut c = galera_case([OLD, OLD, NEW]);
    c.members[2] = galera(GA[2], "Joined", 3);
    c.members[2].status.as_mut().unwrap().ready = true;
    waits_for(&run(&c), "waiting for roll-gx-2 to be Synced");
    let mut c = galera_case([OLD, OLD, NEW]);
    for m in &mut c.members {
        *m =
            with(
                m.clone(),
                |s| s.details = json!({"wsrepClusterSize": 2, "wsrepClusterStatus": "Primary"}),
            );
    }
    waits_for(&run(&c), "cluster size to be back at 3");
    // Synced again: the next member, then the writer.
    assert_eq!(
        run(&galera_case([OLD, OLD, NEW])).action,
        delete(GA[1], OLD, "member")
    );
    assert_eq!(
        run(&galera_case([OLD, NEW, NEW])).action,
        delete(GA[0], OLD, "writer")
    );
    // A non-Primary component never rolls.
    let mut c = galera_case([OLD; 3]);
    c.members[0] =
        with(
            c.members[0].clone(),
            |s| s.details = json!({"wsrepClusterSize": 1, "wsrepClusterStatus": "non-Primary"}),
        );
    waits_for(&run(&c), "roll-gx-0");
    // A bootstrap in progress: wait.
    let mut c = galera_case([OLD; 3]);
    c.changing = Some("waiting for the bootstrap of the group from roll-gx-1 to finish");
    waits_for(&run(&c), "bootstrap");
}

#[test]
fn scale_down_moves_the_primary_to_a_kept_replica_first() {
    // 3 → 2 with the primary at ordinal 2: switch over to a kept replica
    // (roll-pg-1, streaming), whatever the templates.
    let mut c = pg_case([NEW; 3]);
    c.primary = Some(PG[2]);
    c.keep = Some(2);
    c.members = vec![
        pg(PG[0], Role::Replica, 80, &[]),
        pg(PG[1], Role::Replica, 90, &[]),
        pg(PG[2], Role::Primary, 100, &[PG[0], PG[1]]),
    ];
    assert_eq!(
        run(&c).action,
        RollAction::Switchover {
            from: PG[2].into(),
            to: PG[1].into(),
            why: SwitchoverFor::ScaleDown
        }
    );
    // A replica not streaming: wait, saying why.
    c.members[2] = pg(PG[2], Role::Primary, 100, &[PG[1]]);
    let p = run(&c);
    waits_for(&p, "waiting for roll-pg-0 to be streaming");
    assert_eq!(
        p.message().unwrap(),
        "Scaling down: 2 instances remove the primary roll-pg-2; waiting for roll-pg-0 to be streaming"
    );
    // A primary among the kept ordinals: nothing to do.
    let mut c = pg_case([NEW; 3]);
    c.keep = Some(2);
    assert_eq!(run(&c).action, RollAction::Done);
}

#[test]
fn hold_scale_down_keeps_the_primary_ordinal() {
    let mut cluster = ValidatedCluster {
        meta: crate::engine::ClusterMeta {
            name: "roll-pg".into(),
            namespace: "ns".into(),
            ..Default::default()
        },
        common: serde_json::from_value(json!({"instances": 2, "storage": {"size": "1Gi"}}))
            .unwrap(),
        image: "img".into(),
        spec: json!({"instances": 2}),
    };
    let status = ClusterStatus {
        current_primary: Some("roll-pg-2".into()),
        lease_term: 3,
        ..Default::default()
    };
    let model = ReplicationModel::PrimaryReplica;
    assert_eq!(
        hold_scale_down(&mut cluster, model, true, Some(&status)),
        Some(2)
    );
    assert_eq!(cluster.common.instances, 3);
    assert_eq!(cluster.spec["instances"], 3);
    // Primary kept, another engine, or no primary recorded: untouched.
    cluster.common.instances = 2;
    let kept = ClusterStatus {
        current_primary: Some("roll-pg-1".into()),
        ..status.clone()
    };
    assert_eq!(
        hold_scale_down(&mut cluster, model, true, Some(&kept)),
        None
    );
    let galera = ReplicationModel::MultiWriter;
    assert_eq!(
        hold_scale_down(&mut cluster, galera, false, Some(&status)),
        None
    );
    let unrecorded = ClusterStatus {
        lease_term: 0,
        ..status
    };
    assert_eq!(
        hold_scale_down(&mut cluster, model, true, Some(&unrecorded)),
        None
    );
    assert_eq!(cluster.common.instances, 2);
}
