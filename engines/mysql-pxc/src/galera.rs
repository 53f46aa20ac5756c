//! Galera decisions from observed members: who takes writes, who
//! bootstraps the group after a full crash, and the rolling-update order.
//! Pure functions, no IO; tested with tables of members.

use std::collections::BTreeMap;
use std::time::Duration;

use operator_core::engine::{Election, ObservedMember, Routing};
use operator_core::instance::protocol::{Position, Role};

/// How long to wait before looking again when the election has to wait.
pub const RETRY_AFTER: Duration = Duration::from_secs(5);

/// The UUID a member reports before it ever joined a group (empty data
/// directory, or `grastate.dat` without state).
pub const NIL_UUID: &str = "00000000-0000-0000-0000-000000000000";

/// Coarse class of `wsrep_local_state_comment`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateClass {
    /// `Synced`: a full member of the primary component.
    Synced,
    /// In a primary component but not synced yet (`Joining`, `Waiting for
    /// SST`, `Joined`, `Donor/Desynced`).
    InComponent,
    /// Not in a primary component (`Initialized`, down, recovered, …).
    Outside,
}

/// Classify a `wsrep_local_state_comment` (case-insensitive).
pub fn classify_state(state: &str) -> StateClass {
    let s = state.trim().to_ascii_lowercase();
    if s == "synced" {
        StateClass::Synced
    } else if s.starts_with("join")
        || s.starts_with("donor")
        || s.starts_with("desync")
        || s.starts_with("waiting")
    {
        StateClass::InComponent
    } else {
        StateClass::Outside
    }
}

pub use operator_core::topology::{ordinal, update_order};

fn by_ordinal(mut names: Vec<&str>) -> Vec<&str> {
    names.sort_by_key(|n| (ordinal(n), *n));
    names
}

/// The member's Galera position, if it reported one.
fn galera(m: &ObservedMember) -> Option<(&str, i64, &str)> {
    match m.status.as_ref().map(|s| &s.position) {
        Some(Position::Galera {
            cluster_uuid,
            seqno,
            state,
        }) => Some((cluster_uuid.as_str(), *seqno, state.as_str())),
        _ => None,
    }
}

fn is_nil_uuid(uuid: &str) -> bool {
    uuid.is_empty() || uuid == NIL_UUID
}

/// A Synced member of the group: role `Member` and state `Synced`.
fn is_synced(m: &ObservedMember) -> bool {
    m.role() == Role::Member
        && galera(m).is_some_and(|(_, _, state)| classify_state(state) == StateClass::Synced)
}

/// Who should bootstrap or keep the group.
///
/// - Any member Synced (role `Member`, state `Synced`): `Keep` the current
///   writer, the Synced member with the lowest ordinal.
/// - Otherwise, with `force_bootstrap_from` set and no member in a
///   component: `Promote` it (the user's override).
/// - Otherwise, after a full crash, `Promote` (bootstrap from) the member
///   with the highest recovered seqno, ties to the lowest ordinal, when
///   no member is in a component, every reachable member reported a
///   recovered position, a majority of `instances` reported, and the
///   candidate's cluster UUID is the one most members share (members with
///   another UUID are ignored and named in the reason). When no member has
///   any Galera state, this bootstraps a new cluster from the lowest
///   ordinal.
/// - Otherwise `Wait` (a member is joining, or positions are missing), or
///   `NoCandidate` when members split evenly between cluster UUIDs.
pub fn elect(
    instances: i32,
    force_bootstrap_from: Option<&str>,
    members: &[ObservedMember],
) -> Election {
    let synced = by_ordinal(
        members
            .iter()
            .filter(|m| is_synced(m))
            .map(|m| m.name.as_str())
            .collect(),
    );
    if let Some(writer) = synced.first() {
        return Election::Keep {
            primary: writer.to_string(),
        };
    }

    // A member already in a primary component (donor, joiner) means the
    // group is alive: bootstrapping another would split it.
    let in_component: Vec<String> = members
        .iter()
        .filter_map(|m| match galera(m) {
            Some((_, _, state)) if classify_state(state) != StateClass::Outside => {
                Some(format!("{} is {state}", m.name))
            }
            _ if m.role() == Role::Member => Some(format!("{} is a member", m.name)),
            _ => None,
        })
        .collect();
    if !in_component.is_empty() {
        return wait(format!(
            "no member is Synced yet; {}; waiting for it to sync",
            in_component.join(", ")
        ));
    }

    if let Some(forced) = force_bootstrap_from {
        return Election::Promote {
            candidate: forced.to_string(),
            reason: format!(
                "no member is running in the group; bootstrapping from {forced} as spec.bootstrap.forceBootstrapFrom says"
            ),
        };
    }

    // Full crash: every reachable member must have reported where it
    // stopped, or the most advanced one could be missed.
    let mut recovered: Vec<(&str, &str, i64)> = Vec::new();
    let mut pending = Vec::new();
    let mut unreachable = Vec::new();
    for m in members {
        match galera(m) {
            _ if m.status.is_none() => unreachable.push(m.name.as_str()),
            Some((uuid, seqno, _)) if is_nil_uuid(uuid) || seqno >= 0 => {
                recovered.push((m.name.as_str(), uuid, seqno))
            }
            _ => pending.push(m.name.as_str()),
        }
    }
    if !pending.is_empty() {
        return wait(format!(
            "no member is running; waiting for {} to report a recovered position",
            by_ordinal(pending).join(", ")
        ));
    }
    let majority = instances.max(1) as usize / 2 + 1;
    if recovered.len() < majority {
        let mut reason = format!(
            "no member is running; {} of {instances} members reported a recovered position, need {majority} before choosing one to bootstrap from",
            recovered.len()
        );
        if !unreachable.is_empty() {
            reason.push_str(&format!(
                "; unreachable: {}",
                by_ordinal(unreachable).join(", ")
            ));
        }
        reason.push_str("; set spec.bootstrap.forceBootstrapFrom to choose one");
        return wait(reason);
    }

    // Group the members that have state by cluster UUID; members with an
    // empty state will receive a full copy when they join.
    let mut groups: BTreeMap<&str, Vec<(&str, i64)>> = BTreeMap::new();
    for (name, uuid, seqno) in &recovered {
        if !is_nil_uuid(uuid) {
            groups.entry(uuid).or_default().push((name, *seqno));
        }
    }
    if groups.is_empty() {
        let first = by_ordinal(recovered.iter().map(|r| r.0).collect())[0];
        return Election::Promote {
            candidate: first.to_string(),
            reason: format!("no member has Galera state: bootstrapping a new cluster from {first}"),
        };
    }
    let largest = groups.values().map(Vec::len).max().unwrap_or(0);
    let leaders: Vec<&str> = groups
        .iter()
        .filter(|(_, g)| g.len() == largest)
        .map(|(u, _)| *u)
        .collect();
    if leaders.len() > 1 {
        let split = groups
            .iter()
            .map(|(u, g)| {
                let names: Vec<&str> = g.iter().map(|(n, _)| *n).collect();
                format!("{u}: {}", by_ordinal(names).join(", "))
            })
            .collect::<Vec<_>>()
            .join("; ");
        return Election::NoCandidate {
            reason: format!(
                "members disagree on the cluster UUID and no UUID has the most members ({split}); set spec.bootstrap.forceBootstrapFrom to the instance to bootstrap from"
            ),
        };
    }
    let uuid = leaders[0];
    let (candidate, seqno) = groups[uuid]
        .iter()
        .copied()
        .max_by(|a, b| {
            a.1.cmp(&b.1)
                .then(ordinal(b.0).cmp(&ordinal(a.0)))
                .then(b.0.cmp(a.0))
        })
        .unwrap_or(("", -1));
    let mut reason = format!(
        "full crash: {candidate} has the highest recovered seqno {seqno} of cluster {uuid}; bootstrapping from it"
    );
    let ignored: Vec<String> = groups
        .iter()
        .filter(|(u, _)| **u != uuid)
        .flat_map(|(u, g)| g.iter().map(move |(n, _)| format!("{n} ({u})")))
        .collect();
    if !ignored.is_empty() {
        reason.push_str(&format!(
            "; ignored members of another cluster UUID: {}",
            ignored.join(", ")
        ));
    }
    Election::Promote {
        candidate: candidate.to_string(),
        reason,
    }
}

fn wait(reason: String) -> Election {
    Election::Wait {
        reason,
        retry_after: RETRY_AFTER,
    }
}

/// Writes to one ready Synced member (the lowest ordinal, so the choice is
/// stable), reads to the other ready Synced members of the same group.
pub fn route(members: &[ObservedMember]) -> Routing {
    let mut ready: Vec<&ObservedMember> = members
        .iter()
        .filter(|m| m.ready() && is_synced(m))
        .collect();
    ready.sort_by_key(|m| (ordinal(&m.name), m.name.as_str()));
    let Some(writer) = ready.first() else {
        return Routing::default();
    };
    let uuid = galera(writer).map(|g| g.0);
    Routing {
        rw: Some(writer.name.clone()),
        ro: ready[1..]
            .iter()
            .filter(|m| galera(m).map(|g| g.0) == uuid)
            .map(|m| m.name.clone())
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use operator_core::instance::protocol::{MemberStatus, ProcessState};

    const U1: &str = "6f0f2b9e-1111-11ee-8000-000000000001";
    const U2: &str = "6f0f2b9e-2222-11ee-8000-000000000002";

    /// A member row: name, Galera state, uuid, seqno, ready.
    fn m(
        name: &str,
        role: Role,
        state: &str,
        uuid: &str,
        seqno: i64,
        ready: bool,
    ) -> ObservedMember {
        ObservedMember {
            name: name.into(),
            status: Some(MemberStatus {
                name: name.into(),
                role,
                ready,
                process: if ready {
                    ProcessState::Running
                } else {
                    ProcessState::Exited
                },
                position: Position::Galera {
                    cluster_uuid: uuid.into(),
                    seqno,
                    state: state.into(),
                },
                ..Default::default()
            }),
            error: None,
        }
    }
    fn synced(name: &str) -> ObservedMember {
        m(name, Role::Member, "Synced", U1, 100, true)
    }
    fn crashed(name: &str, uuid: &str, seqno: i64) -> ObservedMember {
        m(name, Role::Unknown, "Recovered", uuid, seqno, false)
    }
    fn down(name: &str) -> ObservedMember {
        ObservedMember {
            name: name.into(),
            status: None,
            error: Some("connection refused".into()),
        }
    }
    fn promoted(e: &Election) -> &str {
        match e {
            Election::Promote { candidate, .. } => candidate,
            other => panic!("expected Promote, got {other:?}"),
        }
    }
    fn waiting(e: &Election) -> &str {
        match e {
            Election::Wait { reason, .. } => reason,
            other => panic!("expected Wait, got {other:?}"),
        }
    }

    #[test]
    fn keeps_lowest_synced_member() {
        let all = [synced("db-2"), synced("db-10"), synced("db-1")];
        assert_eq!(
            elect(3, None, &all),
            Election::Keep {
                primary: "db-1".into()
            }
        );
        // One synced member is enough, even with others crashed; a force
        // flag is ignored while the group runs.
        let one = [crashed("db-0", U1, 50), synced("db-2"), down("db-1")];
        assert_eq!(
            elect(3, Some("db-0"), &one),
            Election::Keep {
                primary: "db-2".into()
            }
        );
        // Synced state without the Member role is not a writer, but the
        // group is alive: wait rather than bootstrap a second one.
        let not_member = [
            m("db-0", Role::Unknown, "Synced", U1, 1, false),
            crashed("db-1", U1, 1),
            crashed("db-2", U1, 1),
        ];
        assert!(waiting(&elect(3, None, &not_member)).contains("db-0 is Synced"));
    }

    #[test]
    fn full_crash_bootstraps_highest_seqno() {
        let members = [
            crashed("db-0", U1, 90),
            crashed("db-1", U1, 120),
            crashed("db-2", U1, 100),
        ];
        let e = elect(3, None, &members);
        assert_eq!(promoted(&e), "db-1");
        let Election::Promote { reason, .. } = e else {
            unreachable!()
        };
        assert!(reason.contains("seqno 120"), "{reason}");
    }

    #[test]
    fn seqno_ties_go_to_lowest_ordinal() {
        let members = [
            crashed("db-2", U1, 120),
            crashed("db-10", U1, 120),
            crashed("db-1", U1, 120),
        ];
        assert_eq!(promoted(&elect(3, None, &members)), "db-1");
    }

    #[test]
    fn ignores_members_of_another_cluster_uuid() {
        let members = [
            crashed("db-0", U2, 500),
            crashed("db-1", U1, 120),
            crashed("db-2", U1, 100),
        ];
        let e = elect(3, None, &members);
        assert_eq!(promoted(&e), "db-1");
        let Election::Promote { reason, .. } = e else {
            unreachable!()
        };
        assert!(
            reason.contains(&format!(
                "ignored members of another cluster UUID: db-0 ({U2})"
            )),
            "{reason}"
        );
    }

    #[test]
    fn even_uuid_split_has_no_candidate() {
        let members = [
            crashed("db-0", U2, 500),
            crashed("db-1", U1, 120),
            crashed("db-2", NIL_UUID, -1),
        ];
        let e = elect(3, None, &members);
        let Election::NoCandidate { reason } = e else {
            panic!("{e:?}")
        };
        assert!(reason.contains("forceBootstrapFrom"), "{reason}");
    }

    #[test]
    fn empty_members_never_win_over_data() {
        // Two members lost their volumes; the one with data bootstraps and
        // the empty ones will receive a full copy.
        let members = [
            crashed("db-0", NIL_UUID, -1),
            crashed("db-1", "", -1),
            crashed("db-2", U1, 7),
        ];
        assert_eq!(promoted(&elect(3, None, &members)), "db-2");
    }

    #[test]
    fn new_cluster_bootstraps_lowest_ordinal() {
        let members = [
            crashed("db-1", NIL_UUID, -1),
            crashed("db-0", NIL_UUID, -1),
            down("db-2"),
        ];
        let e = elect(3, None, &members);
        assert_eq!(promoted(&e), "db-0");
        let Election::Promote { reason, .. } = e else {
            unreachable!()
        };
        assert!(reason.contains("new cluster"), "{reason}");
    }

    #[test]
    fn minority_reporting_waits() {
        let members = [crashed("db-0", U1, 90), down("db-1"), down("db-2")];
        let reason = waiting(&elect(3, None, &members)).to_string();
        assert!(reason.contains("1 of 3"), "{reason}");
        assert!(reason.contains("unreachable: db-1, db-2"), "{reason}");
        // 2 of 4 is not a majority either.
        let members = [
            crashed("db-0", U1, 90),
            crashed("db-1", U1, 95),
            down("db-2"),
            down("db-3"),
        ];
        waiting(&elect(4, None, &members));
        // 2 of 3 is.
        let members = [
            crashed("db-0", U1, 90),
            crashed("db-1", U1, 95),
            down("db-2"),
        ];
        assert_eq!(promoted(&elect(3, None, &members)), "db-1");
    }

    #[test]
    fn reachable_member_still_recovering_waits() {
        let starting = ObservedMember {
            name: "db-2".into(),
            status: Some(MemberStatus {
                name: "db-2".into(),
                ..Default::default()
            }),
            error: None,
        };
        let members = [crashed("db-0", U1, 90), crashed("db-1", U1, -1), starting];
        let reason = waiting(&elect(3, None, &members)).to_string();
        assert!(reason.contains("waiting for db-1, db-2"), "{reason}");
    }

    #[test]
    fn joining_member_waits_instead_of_bootstrapping() {
        let members = [
            m("db-0", Role::Unknown, "Donor/Desynced", U1, 90, false),
            m("db-1", Role::Unknown, "Joining", U1, -1, false),
            crashed("db-2", U1, 95),
        ];
        let reason = waiting(&elect(3, Some("db-2"), &members)).to_string();
        assert!(reason.contains("db-0 is Donor/Desynced"), "{reason}");
    }

    #[test]
    fn force_bootstrap_overrides_positions() {
        let members = [
            crashed("db-0", U1, 90),
            crashed("db-1", U1, 120),
            down("db-2"),
        ];
        assert_eq!(promoted(&elect(3, Some("db-0"), &members)), "db-0");
        // Even when too few members report.
        let members = [down("db-0"), down("db-1"), down("db-2")];
        let e = elect(3, Some("db-2"), &members);
        assert_eq!(promoted(&e), "db-2");
        let Election::Promote { reason, .. } = e else {
            unreachable!()
        };
        assert!(reason.contains("forceBootstrapFrom"), "{reason}");
    }

    #[test]
    fn routing_table() {
        let mut donor = m("db-0", Role::Unknown, "Donor/Desynced", U1, 100, false);
        donor.status.as_mut().unwrap().ready = true;
        let not_ready = m("db-1", Role::Member, "Synced", U1, 100, false);
        let cases: Vec<(Vec<ObservedMember>, Option<&str>, Vec<&str>)> = vec![
            (
                vec![synced("db-2"), synced("db-0"), synced("db-1")],
                Some("db-0"),
                vec!["db-1", "db-2"],
            ),
            (
                vec![donor.clone(), not_ready.clone(), synced("db-2")],
                Some("db-2"),
                vec![],
            ),
            (
                vec![down("db-0"), synced("db-10"), synced("db-9")],
                Some("db-9"),
                vec!["db-10"],
            ),
            (
                vec![
                    synced("db-0"),
                    m("db-1", Role::Member, "Synced", U2, 5, true),
                ],
                Some("db-0"),
                vec![],
            ),
            (vec![donor, not_ready, down("db-2")], None, vec![]),
        ];
        for (members, rw, ro) in cases {
            let r = route(&members);
            assert_eq!(r.rw.as_deref(), rw, "{members:?}");
            assert_eq!(r.ro, ro, "{members:?}");
        }
    }

    #[test]
    fn update_order_writer_last() {
        let names: Vec<String> = (0..3).map(|i| format!("db-{i}")).collect();
        assert_eq!(update_order(&names, Some("db-1")), ["db-2", "db-0", "db-1"]);
        assert_eq!(update_order(&names, None), ["db-2", "db-1", "db-0"]);
        assert_eq!(
            update_order(&names, Some("gone-7")),
            ["db-2", "db-1", "db-0"]
        );
    }

    #[test]
    fn state_classes() {
        assert_eq!(classify_state("Synced"), StateClass::Synced);
        for s in [
            "Joining",
            "Joining: receiving State Transfer",
            "Joined",
            "Donor/Desynced",
            "Waiting for SST",
        ] {
            assert_eq!(classify_state(s), StateClass::InComponent, "{s}");
        }
        for s in ["Initialized", "", "Recovered"] {
            assert_eq!(classify_state(s), StateClass::Outside, "{s}");
        }
    }
}
