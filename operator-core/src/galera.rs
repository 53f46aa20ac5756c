//! Multi-writer (Galera) decisions shared by both runtimes — the local
//! decision loop (`local::galera`) and the controller's bootstrap step
//! (`controller::galera`): a member report's wsrep facts, whether a member
//! is (or may be) in a primary component, and what to do about a bootstrap
//! this round given the election and the persisted decision. Pure, no IO
//! (the clock is an argument).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::api::status::WsrepStatus;
use crate::engine::{Election, ObservedMember};
use crate::instance::protocol::{MemberStatus, Position, ProcessState};

/// The instance action that makes a member bootstrap a new primary
/// component (`--wsrep-new-cluster` at its next start, or `pc.bootstrap`
/// on a running non-Primary member).
pub const ACTION_BOOTSTRAP: &str = "bootstrap";

/// How long a member whose server runs without saying whether it is in a
/// primary component holds a bootstrap decision back, when it was not seen
/// in a primary component since its server started (a server blocked in
/// its start-up). One seen in a primary component holds it back until it
/// answers or stops.
pub const UNKNOWN_COMPONENT_GRACE: Duration = Duration::from_secs(30);

/// How long a new bootstrap decision waits for members whose instance
/// manager does not answer, when the others (a majority) reported: the
/// missing one may hold the most advanced position (a write acknowledged
/// by it alone may not be committed on the others yet), and after a full
/// crash the members' managers come back within seconds of each other.
pub const STRAGGLER_GRACE: Duration = Duration::from_secs(15);

/// How long a member's server may run outside every group without trying
/// to join (see [`stuck_outside_group`]) before the operator restarts it.
pub const STUCK_GRACE: Duration = Duration::from_secs(30);

/// Whether `m`'s server runs but sits outside every group without trying
/// to join: `wsrep_local_state_comment` Initialized and
/// `wsrep_cluster_status` Disconnected. Seen after an IST that "didn't
/// contain all write sets … node restart required": mariadbd then stays
/// up in that state instead of exiting, and its manager (which restarts
/// servers that exit) never restarts it. Its manager reports such a server
/// as `Starting` when it never was ready since it started (the IST of a
/// member coming back after a full crash: seen stuck for 4 minutes in a
/// test run while only `Running` counted), `Running` otherwise.
pub fn stuck_outside_group(m: &ObservedMember) -> bool {
    let Some(s) = &m.status else { return false };
    matches!(s.process, ProcessState::Running | ProcessState::Starting)
        && wsrep_status(s).is_some_and(|w| {
            w.state.eq_ignore_ascii_case("initialized")
                && w.cluster_status.as_deref() == Some("Disconnected")
        })
}

/// Which members to restart because they are stuck outside the group.
#[derive(Debug, Default)]
pub struct StuckWatch {
    since: BTreeMap<String, Instant>,
}

impl StuckWatch {
    /// The members stuck outside the group (see [`stuck_outside_group`])
    /// for [`STUCK_GRACE`] while another member runs in a primary
    /// component (without one, a member waiting outside is the full-crash
    /// path's business). Each one's clock starts again when it is named,
    /// so a restart is asked for at most once per grace period.
    pub fn due(&mut self, members: &[ObservedMember], now: Instant) -> Vec<String> {
        let group_up = members.iter().any(in_primary);
        let mut out = Vec::new();
        for m in members {
            if !group_up || !stuck_outside_group(m) {
                self.since.remove(&m.name);
                continue;
            }
            let since = *self.since.entry(m.name.clone()).or_insert(now);
            if now.duration_since(since) >= STUCK_GRACE {
                out.push(m.name.clone());
                self.since.insert(m.name.clone(), now);
            }
        }
        out
    }
}

/// The Galera facts of a member report, when it has a Galera position.
pub fn wsrep_status(s: &MemberStatus) -> Option<WsrepStatus> {
    let Position::Galera {
        cluster_uuid,
        seqno,
        state,
    } = &s.position
    else {
        return None;
    };
    let d = &s.details;
    let int = |k: &str| {
        d.get(k)
            .and_then(|v| v.as_i64().or_else(|| v.as_str()?.parse().ok()))
    };
    let text = |k: &str| d.get(k).and_then(|v| v.as_str()).map(str::to_string);
    Some(WsrepStatus {
        state: state.clone(),
        cluster_uuid: cluster_uuid.clone(),
        seqno: *seqno,
        cluster_size: int("wsrepClusterSize"),
        cluster_status: text("wsrepClusterStatus"),
        flow_control_paused: d
            .get("wsrepFlowControlPaused")
            .and_then(|v| v.as_f64().or_else(|| v.as_str()?.parse().ok()))
            // A NaN would make two equal statuses compare unequal.
            .filter(|f| f.is_finite()),
        last_state_transfer: text("lastStateTransfer"),
        safe_to_bootstrap: d.get("safeToBootstrap").and_then(|v| {
            v.as_bool()
                .or_else(|| v.as_i64().map(|i| i != 0))
                .or_else(|| v.as_str().map(|s| s == "1" || s == "true"))
        }),
    })
}

/// Whether `m`'s server process is up but its report does not say whether
/// it is in a primary component (no `wsrepClusterStatus`: the server did
/// not answer the manager's query, e.g. a donor busy with a state
/// transfer). Such a member may well be in a primary component, so no
/// bootstrap may be decided while it is.
pub fn component_unknown(m: &ObservedMember) -> bool {
    let Some(s) = &m.status else { return false };
    matches!(
        s.process,
        ProcessState::Starting | ProcessState::Running | ProcessState::Stopping
    ) && wsrep_status(s).is_none_or(|w| w.cluster_status.is_none())
}

/// Whether `m` reports itself in a primary component.
pub fn in_primary(m: &ObservedMember) -> bool {
    m.status
        .as_ref()
        .and_then(wsrep_status)
        .is_some_and(|w| w.cluster_status.as_deref() == Some("Primary"))
}

/// Whether a member with these facts belongs to the group: `Some(true)`
/// when it is Synced or in a Primary component (a donor or joiner stays
/// in it), `Some(false)` when it is outside (down, recovered, non-Primary,
/// or its manager gave no facts), `None` when its server runs but did not
/// say (a busy donor: no news is not a leave).
pub fn in_group(w: Option<&WsrepStatus>) -> Option<bool> {
    let Some(w) = w else { return Some(false) };
    if w.state.eq_ignore_ascii_case("synced") || w.cluster_status.as_deref() == Some("Primary") {
        return Some(true);
    }
    if w.cluster_status.is_none() && w.state.eq_ignore_ascii_case("starting") {
        return None;
    }
    Some(false)
}

/// What to do about a bootstrap this round.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BootstrapStep {
    /// Nothing (the group runs, or the election waits).
    None,
    /// A member is Synced: the pending bootstrap is complete.
    Completed(String),
    /// Record this decision (then order it).
    Decide {
        /// The member.
        member: String,
        /// Why.
        reason: String,
    },
    /// Send (again) the order to the decided member.
    Order(String),
}

/// The bootstrap step from the election and the persisted decision
/// (`pending`: the member decided before and not yet seen complete): a
/// pending decision is only ever ordered to its own member, whatever the
/// election says now. `order_due` says whether an order may be sent now.
pub fn bootstrap_step(
    election: &Election,
    pending: Option<&str>,
    order_due: bool,
) -> BootstrapStep {
    match (election, pending) {
        (Election::Keep { .. }, Some(p)) => BootstrapStep::Completed(p.to_string()),
        (Election::Keep { .. }, None) => BootstrapStep::None,
        (Election::Promote { candidate, reason }, None) => BootstrapStep::Decide {
            member: candidate.clone(),
            reason: reason.clone(),
        },
        // Decided before (maybe by a previous process): the same member,
        // or nobody. Also when the election now waits: the members'
        // positions have not changed since nobody runs.
        (
            Election::Promote { .. } | Election::Wait { .. } | Election::NoCandidate { .. },
            Some(p),
        ) if order_due => BootstrapStep::Order(p.to_string()),
        _ => BootstrapStep::None,
    }
}

/// The cluster UUID and seqno `member` reports (its recovered position
/// after a crash), when it reports a Galera position.
pub fn position_of(members: &[ObservedMember], member: &str) -> Option<(String, i64)> {
    let s = members.iter().find(|m| m.name == member)?.status.as_ref()?;
    match &s.position {
        Position::Galera {
            cluster_uuid,
            seqno,
            ..
        } => Some((cluster_uuid.clone(), *seqno)),
        _ => None,
    }
}

/// Remembers, across rounds, which members hold a bootstrap decision back
/// because their server runs without saying whether it is in a primary
/// component (see [`component_unknown`]).
#[derive(Clone, Debug, Default)]
pub struct ComponentWatch {
    /// Members seen in a primary component since their server started.
    seen_primary: BTreeMap<String, bool>,
    /// Since when each member's component has been unknown.
    unknown_since: BTreeMap<String, Instant>,
    /// Since when the election has named a member to bootstrap while
    /// some member did not answer.
    promote_since: Option<Instant>,
}

impl ComponentWatch {
    /// The members that hold a bootstrap decision back now, each with why:
    /// a member of unknown component that was in a primary component
    /// since its server started, or has been unknown for less than
    /// [`UNKNOWN_COMPONENT_GRACE`].
    pub fn blockers(&mut self, members: &[ObservedMember], now: Instant) -> Vec<String> {
        let mut out = Vec::new();
        for m in members {
            let s = m.status.as_ref();
            if in_primary(m) {
                self.seen_primary.insert(m.name.clone(), true);
            } else if s.is_some_and(|s| {
                matches!(
                    s.process,
                    ProcessState::Preparing | ProcessState::Exited | ProcessState::Fenced
                )
            }) {
                // Its server is down: a later start is a new one.
                self.seen_primary.insert(m.name.clone(), false);
            }
            if !component_unknown(m) {
                self.unknown_since.remove(&m.name);
                continue;
            }
            let since = *self.unknown_since.entry(m.name.clone()).or_insert(now);
            let was_primary = self.seen_primary.get(&m.name).copied().unwrap_or(false);
            if was_primary || now.duration_since(since) < UNKNOWN_COMPONENT_GRACE {
                out.push(format!(
                    "{}'s server runs but did not say whether it is in a primary component{}",
                    m.name,
                    if was_primary { " (it was in one)" } else { "" }
                ));
            }
        }
        out
    }

    /// The members a new decision waits for, each with why: while the
    /// election names a member to bootstrap and some members' managers do
    /// not answer, for up to [`STRAGGLER_GRACE`] from the first such round.
    pub fn stragglers(
        &mut self,
        election: &Election,
        members: &[ObservedMember],
        now: Instant,
    ) -> Vec<String> {
        let missing: Vec<&ObservedMember> = members.iter().filter(|m| m.status.is_none()).collect();
        if !matches!(election, Election::Promote { .. }) || missing.is_empty() {
            self.promote_since = None;
            return Vec::new();
        }
        let since = *self.promote_since.get_or_insert(now);
        let left = STRAGGLER_GRACE.saturating_sub(now.duration_since(since));
        if left.is_zero() {
            return Vec::new();
        }
        missing
            .iter()
            .map(|m| {
                format!(
                    "waiting up to {}s more for {} to report its position too ({})",
                    left.as_secs().max(1),
                    m.name,
                    m.error
                        .as_deref()
                        .unwrap_or("its instance manager does not answer")
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_member_stuck_outside_the_group_is_restarted_after_the_grace() {
        let member = |name: &str, state: &str, cluster_status: &str| ObservedMember {
            name: name.into(),
            status: Some(MemberStatus {
                // Never ready since its server started: its manager says
                // Starting (Running counts the same).
                process: if state == "Initialized" {
                    ProcessState::Starting
                } else {
                    ProcessState::Running
                },
                position: Position::Galera {
                    cluster_uuid: "6f0f2b9e-1111-11ee-8000-000000000001".into(),
                    seqno: 7,
                    state: state.into(),
                },
                details: json!({"wsrepClusterStatus": cluster_status}),
                ..Default::default()
            }),
            error: None,
        };
        let t0 = Instant::now();
        let stuck = [
            member("g-0", "Synced", "Primary"),
            member("g-1", "Initialized", "Disconnected"),
            member("g-2", "Joining", "Primary"),
        ];
        let mut watch = StuckWatch::default();
        assert!(watch.due(&stuck, t0).is_empty());
        assert!(watch.due(&stuck, t0 + STUCK_GRACE / 2).is_empty());
        assert_eq!(watch.due(&stuck, t0 + STUCK_GRACE), ["g-1"]);
        // Asked once per grace period.
        assert!(
            watch
                .due(&stuck, t0 + STUCK_GRACE + STUCK_GRACE / 2)
                .is_empty()
        );
        // Without a primary component it is not this rule's business.
        let alone = [
            member("g-0", "Initialized", "Disconnected"),
            member("g-1", "Initialized", "Disconnected"),
        ];
        let mut watch = StuckWatch::default();
        assert!(watch.due(&alone, t0).is_empty());
        assert!(watch.due(&alone, t0 + STUCK_GRACE * 2).is_empty());
        // A member that moves on is forgotten.
        let mut watch = StuckWatch::default();
        watch.due(&stuck, t0);
        let joined = [
            member("g-0", "Synced", "Primary"),
            member("g-1", "Joiner", "Primary"),
        ];
        assert!(watch.due(&joined, t0 + STUCK_GRACE).is_empty());
        assert!(watch.due(&stuck, t0 + STUCK_GRACE * 2).is_empty());
        // A server that exited or is being prepared is not stuck: its
        // manager restarts or prepares it.
        for process in [ProcessState::Exited, ProcessState::Preparing] {
            let mut m = member("g-1", "Initialized", "Disconnected");
            m.status.as_mut().unwrap().process = process;
            assert!(!stuck_outside_group(&m));
        }
    }

    #[test]
    fn bootstrap_is_decided_once_and_only_ordered_to_that_member() {
        let promote = |c: &str| Election::Promote {
            candidate: c.into(),
            reason: "highest seqno".into(),
        };
        let keep = Election::Keep {
            primary: "db-2".into(),
        };
        let wait = Election::Wait {
            reason: "positions missing".into(),
            retry_after: Duration::from_secs(5),
        };
        let none = Election::NoCandidate {
            reason: "split".into(),
        };
        let cases: &[(&Election, Option<&str>, bool, BootstrapStep)] = &[
            (
                &promote("db-1"),
                None,
                true,
                BootstrapStep::Decide {
                    member: "db-1".into(),
                    reason: "highest seqno".into(),
                },
            ),
            // A decision is taken whether or not an order is due.
            (
                &promote("db-1"),
                None,
                false,
                BootstrapStep::Decide {
                    member: "db-1".into(),
                    reason: "highest seqno".into(),
                },
            ),
            // A pending decision wins over what the election says now.
            (
                &promote("db-2"),
                Some("db-1"),
                true,
                BootstrapStep::Order("db-1".into()),
            ),
            (
                &wait,
                Some("db-1"),
                true,
                BootstrapStep::Order("db-1".into()),
            ),
            (
                &none,
                Some("db-1"),
                true,
                BootstrapStep::Order("db-1".into()),
            ),
            (&promote("db-2"), Some("db-1"), false, BootstrapStep::None),
            // Waiting without a decision: nothing.
            (&wait, None, true, BootstrapStep::None),
            (&none, None, true, BootstrapStep::None),
            // The group runs: the decision is complete.
            (
                &keep,
                Some("db-1"),
                false,
                BootstrapStep::Completed("db-1".into()),
            ),
            (&keep, None, true, BootstrapStep::None),
        ];
        for (election, pending, due, want) in cases {
            assert_eq!(
                &bootstrap_step(election, *pending, *due),
                want,
                "{election:?} pending {pending:?} due {due}"
            );
        }
    }

    fn galera_member(
        name: &str,
        process: ProcessState,
        details: serde_json::Value,
    ) -> ObservedMember {
        ObservedMember {
            name: name.into(),
            status: Some(MemberStatus {
                process,
                position: Position::Galera {
                    cluster_uuid: "u".into(),
                    seqno: 2,
                    state: "Starting".into(),
                },
                details,
                ..Default::default()
            }),
            error: None,
        }
    }

    #[test]
    fn wsrep_facts_from_a_report() {
        let s = MemberStatus {
            position: Position::Galera {
                cluster_uuid: "u".into(),
                seqno: 42,
                state: "Synced".into(),
            },
            details: json!({
                "wsrepClusterSize": "3",
                "wsrepClusterStatus": "Primary",
                "wsrepFlowControlPaused": 0.25,
                "lastStateTransfer": "ist",
                "safeToBootstrap": false,
            }),
            ..Default::default()
        };
        let w = wsrep_status(&s).unwrap();
        assert_eq!(w.cluster_size, Some(3));
        assert_eq!(w.cluster_status.as_deref(), Some("Primary"));
        assert_eq!(w.flow_control_paused, Some(0.25));
        assert_eq!(w.last_state_transfer.as_deref(), Some("ist"));
        assert_eq!(w.safe_to_bootstrap, Some(false));
        assert_eq!(w.seqno, 42);
        assert!(wsrep_status(&MemberStatus::default()).is_none());
        let v = serde_json::to_value(&w).unwrap();
        assert_eq!(v["clusterSize"], 3);
        assert_eq!(v["flowControlPaused"], 0.25);
        assert_eq!(v["state"], "Synced");
        let nan = MemberStatus {
            details: json!({"wsrepFlowControlPaused": "NaN"}),
            ..s
        };
        assert_eq!(wsrep_status(&nan).unwrap().flow_control_paused, None);
    }

    #[test]
    fn a_running_server_of_unknown_component_blocks_bootstrap() {
        // A donor whose server did not answer: it may be in a component.
        assert!(component_unknown(&galera_member(
            "db-0",
            ProcessState::Starting,
            json!({})
        )));
        assert!(component_unknown(&galera_member(
            "db-0",
            ProcessState::Running,
            json!({})
        )));
        // Answered non-Primary (quorum lost), or not running: known.
        assert!(!component_unknown(&galera_member(
            "db-0",
            ProcessState::Starting,
            json!({"wsrepClusterStatus": "non-Primary"})
        )));
        assert!(!component_unknown(&galera_member(
            "db-0",
            ProcessState::Preparing,
            json!({})
        )));
        assert!(!component_unknown(&galera_member(
            "db-0",
            ProcessState::Exited,
            json!({})
        )));
        let unreachable = ObservedMember {
            name: "db-1".into(),
            status: None,
            error: Some("timeout".into()),
        };
        assert!(!component_unknown(&unreachable));
        assert!(in_primary(&galera_member(
            "db-0",
            ProcessState::Running,
            json!({"wsrepClusterStatus": "Primary"})
        )));
    }

    #[test]
    fn unknown_components_block_for_a_grace_unless_seen_primary() {
        let t0 = Instant::now();
        let mut watch = ComponentWatch::default();
        let busy = [galera_member("db-0", ProcessState::Running, json!({}))];
        assert_eq!(watch.blockers(&busy, t0).len(), 1);
        assert_eq!(watch.blockers(&busy, t0 + Duration::from_secs(29)).len(), 1);
        // Blocked in its start-up for longer than the grace: no longer.
        assert!(
            watch
                .blockers(&busy, t0 + UNKNOWN_COMPONENT_GRACE)
                .is_empty()
        );
        // One seen in a primary component blocks until it answers or stops.
        let mut watch = ComponentWatch::default();
        let primary = [galera_member(
            "db-0",
            ProcessState::Running,
            json!({"wsrepClusterStatus": "Primary"}),
        )];
        assert!(watch.blockers(&primary, t0).is_empty());
        let later = t0 + Duration::from_secs(600);
        let why = watch.blockers(&busy, later);
        assert_eq!(why.len(), 1);
        assert!(why[0].contains("it was in one"), "{why:?}");
        assert_eq!(
            watch
                .blockers(&busy, later + Duration::from_secs(600))
                .len(),
            1
        );
        // Its server stopped: a new start is a new one.
        let down = [galera_member("db-0", ProcessState::Exited, json!({}))];
        assert!(watch.blockers(&down, later).is_empty());
        let t1 = later + Duration::from_secs(1);
        assert_eq!(watch.blockers(&busy, t1).len(), 1);
        assert!(
            watch
                .blockers(&busy, t1 + UNKNOWN_COMPONENT_GRACE)
                .is_empty()
        );
    }

    #[test]
    fn a_new_decision_waits_a_while_for_members_that_do_not_answer() {
        let t0 = Instant::now();
        let promote = Election::Promote {
            candidate: "db-1".into(),
            reason: "highest seqno".into(),
        };
        let down = ObservedMember {
            name: "db-2".into(),
            status: None,
            error: Some("connection refused".into()),
        };
        let up = galera_member("db-1", ProcessState::Preparing, json!({}));
        let mut watch = ComponentWatch::default();
        let why = watch.stragglers(&promote, &[up.clone(), down.clone()], t0);
        assert_eq!(why.len(), 1);
        assert!(
            why[0].contains("db-2") && why[0].contains("connection refused"),
            "{why:?}"
        );
        let later = t0 + STRAGGLER_GRACE - Duration::from_secs(1);
        assert_eq!(
            watch
                .stragglers(&promote, &[up.clone(), down.clone()], later)
                .len(),
            1
        );
        // The grace is over: a majority suffices.
        let over = t0 + STRAGGLER_GRACE;
        assert!(
            watch
                .stragglers(&promote, &[up.clone(), down.clone()], over)
                .is_empty()
        );
        // Everyone answers, or the election does not promote: no wait, and
        // the grace starts again next time.
        assert!(
            watch
                .stragglers(&promote, std::slice::from_ref(&up), over)
                .is_empty()
        );
        let wait = Election::Wait {
            reason: "r".into(),
            retry_after: Duration::ZERO,
        };
        assert!(
            watch
                .stragglers(&wait, &[up.clone(), down.clone()], over)
                .is_empty()
        );
        assert_eq!(watch.stragglers(&promote, &[up, down], over).len(), 1);
    }

    #[test]
    fn group_membership_from_wsrep_facts() {
        let w = |state: &str, cs: Option<&str>| WsrepStatus {
            state: state.into(),
            cluster_status: cs.map(str::to_string),
            ..Default::default()
        };
        assert_eq!(in_group(Some(&w("Synced", Some("Primary")))), Some(true));
        assert_eq!(
            in_group(Some(&w("Donor/Desynced", Some("Primary")))),
            Some(true)
        );
        assert_eq!(
            in_group(Some(&w("Initialized", Some("non-Primary")))),
            Some(false)
        );
        assert_eq!(in_group(Some(&w("Recovered", None))), Some(false));
        assert_eq!(in_group(Some(&w("Starting", None))), None);
        assert_eq!(in_group(None), Some(false));
    }

    #[test]
    fn position_of_a_member() {
        let members = [galera_member("db-0", ProcessState::Exited, json!({}))];
        assert_eq!(position_of(&members, "db-0"), Some(("u".into(), 2)));
        assert_eq!(position_of(&members, "db-9"), None);
    }
}
