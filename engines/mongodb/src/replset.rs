//! Replica set decisions from observed members: where clients go and the
//! rolling-update order. Pure functions, no IO; MongoDB elects its primary
//! itself, so there is no election here.

use operator_core::engine::{ObservedMember, Routing};
use operator_core::instance::protocol::{Position, Role};

pub use operator_core::topology::{ordinal, update_order};

fn term(m: &ObservedMember) -> i64 {
    match m.status.as_ref().map(|s| &s.position) {
        Some(Position::Oplog { term, .. }) => *term,
        _ => -1,
    }
}

/// Writes to the ready primary, reads to the ready secondaries (arbiters
/// hold no data and get nothing). When two members claim to be primary
/// (a stale one not yet stepped down), the one with the highest election
/// term wins, ties to the lowest ordinal.
pub fn route(members: &[ObservedMember]) -> Routing {
    let rw = members
        .iter()
        .filter(|m| m.ready() && m.role() == Role::Primary)
        .max_by(|a, b| {
            term(a)
                .cmp(&term(b))
                .then(ordinal(&b.name).cmp(&ordinal(&a.name)))
                .then(b.name.cmp(&a.name))
        })
        .map(|m| m.name.clone());
    let mut ro: Vec<&ObservedMember> = members
        .iter()
        .filter(|m| m.ready() && m.role() == Role::Replica)
        .collect();
    ro.sort_by_key(|m| (ordinal(&m.name), m.name.as_str()));
    Routing {
        rw,
        ro: ro.into_iter().map(|m| m.name.clone()).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use operator_core::instance::protocol::MemberStatus;

    fn m(name: &str, role: Role, ready: bool, term: i64) -> ObservedMember {
        ObservedMember {
            name: name.into(),
            status: Some(MemberStatus {
                name: name.into(),
                role,
                ready,
                position: Position::Oplog {
                    term,
                    seconds: 1_700_000_000,
                    increment: 1,
                },
                ..Default::default()
            }),
            error: None,
        }
    }
    fn down(name: &str) -> ObservedMember {
        ObservedMember {
            name: name.into(),
            status: None,
            error: Some("timeout".into()),
        }
    }

    #[test]
    fn routing_table() {
        use Role::*;
        let cases: Vec<(Vec<ObservedMember>, Option<&str>, Vec<&str>)> = vec![
            (
                vec![
                    m("rs-0", Replica, true, 3),
                    m("rs-1", Primary, true, 3),
                    m("rs-2", Replica, true, 3),
                ],
                Some("rs-1"),
                vec!["rs-0", "rs-2"],
            ),
            // Not ready, arbiters and unreachable members get nothing.
            (
                vec![
                    m("rs-0", Primary, false, 3),
                    m("rs-1", Replica, false, 3),
                    m("rs-2", Arbiter, true, 3),
                    down("rs-3"),
                ],
                None,
                vec![],
            ),
            // A stale primary from an older term loses.
            (
                vec![
                    m("rs-0", Primary, true, 2),
                    m("rs-1", Primary, true, 3),
                    m("rs-10", Replica, true, 3),
                    m("rs-9", Replica, true, 3),
                ],
                Some("rs-1"),
                vec!["rs-9", "rs-10"],
            ),
            // Same term (should not happen): lowest ordinal.
            (
                vec![m("rs-2", Primary, true, 4), m("rs-1", Primary, true, 4)],
                Some("rs-1"),
                vec![],
            ),
            (vec![], None, vec![]),
        ];
        for (members, rw, ro) in cases {
            let r = route(&members);
            assert_eq!(r.rw.as_deref(), rw, "{members:?}");
            assert_eq!(r.ro, ro, "{members:?}");
        }
    }

    #[test]
    fn update_order_primary_last() {
        let names: Vec<String> = (0..3).map(|i| format!("rs-{i}")).collect();
        assert_eq!(update_order(&names, Some("rs-2")), ["rs-1", "rs-0", "rs-2"]);
        assert_eq!(update_order(&names, None), ["rs-2", "rs-1", "rs-0"]);
    }
}
