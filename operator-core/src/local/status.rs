//! Status of a local cluster: the snapshot `up` writes every tick, its
//! phase, and how `stratum local status` prints it. Pure, except
//! [`run`], which reads the state directory and prints to stdout.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::ports::PortPlan;
use super::state::{self, LocalState, StateDir};
use super::{OutputFormat, StatusArgs};
use crate::engine::{Election, ObservedMember, Routing};
use crate::instance::protocol::Role;

/// Phase of a local cluster.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// This `up` has not yet seen every instance ready (first boot, a
    /// restart, or instances being added).
    #[default]
    Creating,
    /// Every instance is ready and `rw` routes to the writer.
    Healthy,
    /// Every instance was ready during this `up`, and some no longer is.
    Degraded,
    /// No `up` is running on the state directory.
    Stopped,
}

/// The phase from the observed members: Healthy needs every instance ready
/// and the `rw` endpoint routed to a writer. `seen_all_ready` says whether
/// this `up` has already been Healthy once.
pub fn compute_phase(
    members: &[ObservedMember],
    writer_routed: bool,
    seen_all_ready: bool,
) -> Phase {
    if writer_routed && !members.is_empty() && members.iter().all(ObservedMember::ready) {
        Phase::Healthy
    } else if seen_all_ready {
        Phase::Degraded
    } else {
        Phase::Creating
    }
}

/// The client endpoints, `host:port`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoints {
    /// Writes (and reads) go to the primary/writer.
    pub rw: String,
    /// Reads, spread over replicas (the primary when there are none).
    pub ro: String,
}

/// One instance in the status.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InstanceStatus {
    /// Instance name.
    pub name: String,
    /// Role reported by its manager (`unknown` when unreachable).
    pub role: Role,
    /// Database address, `host:port`.
    pub address: String,
    /// Whether it serves traffic.
    pub ready: bool,
    /// Why it is not ready, or the manager's last error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Replication position, in the engine's words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<String>,
    /// Galera members: wsrep state, seqno, cluster size, flow control.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wsrep: Option<super::galera::WsrepStatus>,
}

/// What `stratum local status -o json` prints, and what `up` keeps in
/// `state.json`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusSnapshot {
    /// Cluster kind.
    pub kind: String,
    /// Cluster name.
    pub cluster: String,
    /// Phase.
    pub phase: Phase,
    /// The member taking writes now, if any.
    pub primary: Option<String>,
    /// Client endpoints.
    pub endpoints: Endpoints,
    /// Every instance of the spec, in ordinal order.
    pub instances: Vec<InstanceStatus>,
    /// The engine's election decision, in words (logged, not acted on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub election: Option<String>,
    /// Pid of the running `up`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// The primary the operator recognises.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_primary: Option<String>,
    /// The primary the operator is making (equal to `currentPrimary` when
    /// no failover or switchover is in progress).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_primary: Option<String>,
    /// The primary's timeline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeline: Option<u32>,
    /// The failover term (one per promotion).
    #[serde(default)]
    pub term: u64,
    /// The operation in progress: `idle`, `failover`, `switchover`.
    #[serde(default)]
    pub step: String,
    /// The last failover/switchover events, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<String>,
    /// When this snapshot was taken (RFC 3339).
    #[serde(default)]
    pub observed_at: String,
    /// Multi-writer (Galera) clusters: writer, pending bootstrap, HAProxy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub galera: Option<super::galera::GaleraSummary>,
}

/// `host:port` of a port on the listen address.
pub fn address(listen: &str, port: u16) -> String {
    match listen.parse() {
        Ok(ip) => SocketAddr::new(ip, port).to_string(),
        Err(_) => format!("{listen}:{port}"),
    }
}

/// Inputs of a snapshot.
pub struct SnapshotInput<'a> {
    /// Kind and name.
    pub kind: &'a str,
    /// Cluster name.
    pub cluster: &'a str,
    /// Listen address.
    pub listen: &'a str,
    /// Ports.
    pub ports: &'a PortPlan,
    /// Instances of the spec, in order.
    pub instances: &'a [String],
    /// Their observations (may be empty before the first tick).
    pub members: &'a [ObservedMember],
    /// Current routing.
    pub routing: &'a Routing,
    /// Phase.
    pub phase: Phase,
    /// Election decision.
    pub election: Option<&'a Election>,
    /// Pid of `up`.
    pub pid: Option<u32>,
    /// Failover state.
    pub ha: Option<&'a super::ha::HaState>,
}

/// Build a snapshot. Pure.
pub fn snapshot(input: SnapshotInput<'_>) -> StatusSnapshot {
    let instances = input
        .instances
        .iter()
        .map(|name| {
            let member = input.members.iter().find(|m| &m.name == name);
            let status = member.and_then(|m| m.status.as_ref());
            InstanceStatus {
                name: name.clone(),
                role: member.map(ObservedMember::role).unwrap_or_default(),
                address: input
                    .ports
                    .instances
                    .get(name)
                    .map(|p| address(input.listen, p.db))
                    .unwrap_or_default(),
                ready: member.is_some_and(ObservedMember::ready),
                message: status
                    .and_then(|s| s.message.clone())
                    .or_else(|| member.and_then(|m| m.error.clone())),
                position: status.and_then(|s| s.position.describe()),
                wsrep: status.and_then(super::galera::wsrep_status),
            }
        })
        .collect();
    StatusSnapshot {
        kind: input.kind.to_string(),
        cluster: input.cluster.to_string(),
        phase: input.phase,
        primary: input.routing.rw.clone(),
        endpoints: Endpoints {
            rw: address(input.listen, input.ports.rw),
            ro: address(input.listen, input.ports.ro),
        },
        instances,
        election: input.election.map(describe_election),
        pid: input.pid,
        current_primary: input.ha.and_then(|h| h.current_primary.clone()),
        target_primary: input.ha.and_then(|h| h.target_primary.clone()),
        timeline: input.ha.and_then(|h| h.timeline),
        term: input.ha.map(|h| h.term).unwrap_or_default(),
        step: input
            .ha
            .map(|h| match &h.step {
                super::ha::Step::Idle => "idle".to_string(),
                super::ha::Step::Failover { from } => format!("failover from {from}"),
                super::ha::Step::Switchover { from, to } => {
                    format!("switchover from {from} to {to}")
                }
            })
            .unwrap_or_default(),
        events: input
            .ha
            .map(|h| h.events.iter().rev().take(20).rev().cloned().collect())
            .unwrap_or_default(),
        observed_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        galera: None,
    }
}

/// An election decision in words.
pub fn describe_election(e: &Election) -> String {
    match e {
        Election::Keep { primary } => format!("keep {primary}"),
        Election::Promote { candidate, reason } => format!("promote {candidate}: {reason}"),
        Election::Wait {
            reason,
            retry_after,
        } => format!("wait {}ms: {reason}", retry_after.as_millis()),
        Election::NoCandidate { reason } => format!("no candidate: {reason}"),
        Election::Native => "native election".to_string(),
    }
}

/// The snapshot of a cluster with no running `up`: the last one seen, with
/// phase `Stopped` and nothing ready or routed.
pub fn stopped(mut s: StatusSnapshot) -> StatusSnapshot {
    s.phase = Phase::Stopped;
    s.primary = None;
    s.pid = None;
    for i in &mut s.instances {
        i.ready = false;
    }
    s
}

/// The snapshot to show for a state file: the one `up` wrote (or an empty
/// one built from the ports), stopped unless `running`.
pub fn current(state: &LocalState, running: Option<u32>) -> StatusSnapshot {
    let snap = state.status.clone().unwrap_or_else(|| {
        let names: Vec<String> = state.ports.instances.keys().cloned().collect();
        snapshot(SnapshotInput {
            kind: &state.kind,
            cluster: &state.cluster,
            listen: &state.listen,
            ports: &state.ports,
            instances: &names,
            members: &[],
            routing: &Routing::default(),
            phase: Phase::Creating,
            election: None,
            pid: running,
            ha: Some(&state.ha),
        })
    });
    match running {
        Some(_) => snap,
        None => stopped(snap),
    }
}

/// The table `stratum local status` prints.
pub fn render_text(s: &StatusSnapshot) -> String {
    let mut out = format!(
        "{} {}: {:?}, primary {}\nrw  {}\nro  {}\n",
        s.kind,
        s.cluster,
        s.phase,
        s.primary.as_deref().unwrap_or("-"),
        s.endpoints.rw,
        s.endpoints.ro
    );
    if let Some(g) = &s.galera {
        out.push_str(&super::galera::render_summary(g));
    } else if s.current_primary.is_some() || !s.step.is_empty() {
        out.push_str(&format!(
            "current primary {}, target {}, timeline {}, term {}, {}\n",
            s.current_primary.as_deref().unwrap_or("-"),
            s.target_primary.as_deref().unwrap_or("-"),
            s.timeline
                .map(|t| t.to_string())
                .unwrap_or_else(|| "-".into()),
            s.term,
            if s.step.is_empty() { "idle" } else { &s.step }
        ));
    }
    if let Some(last) = s.events.last() {
        out.push_str(&format!("last event: {last}\n"));
    }
    let rows: Vec<[String; 5]> = s
        .instances
        .iter()
        .map(|i| {
            [
                i.name.clone(),
                i.role.as_str().to_string(),
                if i.ready { "yes" } else { "no" }.to_string(),
                i.address.clone(),
                i.message
                    .clone()
                    .or_else(|| i.wsrep.as_ref().map(super::galera::describe_wsrep))
                    .or_else(|| i.position.clone())
                    .unwrap_or_default(),
            ]
        })
        .collect();
    let header = ["NAME", "ROLE", "READY", "ADDRESS", "DETAIL"].map(String::from);
    let mut widths = [0usize; 5];
    for row in std::iter::once(&header).chain(&rows) {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    out.push('\n');
    for row in std::iter::once(&header).chain(&rows) {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// `stratum local status`.
pub fn run(args: StatusArgs) -> anyhow::Result<()> {
    let dir = StateDir::new(&args.state_dir)?;
    let Some(state) = state::read_state(&dir)? else {
        anyhow::bail!(
            "no Stratum cluster in {}; start one with `stratum local up -f FILE --state-dir {}`",
            dir.root().display(),
            dir.root().display()
        );
    };
    let snap = current(&state, state::running_pid(&dir));
    match args.output {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&snap)?),
        OutputFormat::Text => print!("{}", render_text(&snap)),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::instance::protocol::{MemberStatus, Position};
    use crate::local::ports::InstancePorts;

    fn member(name: &str, role: Role, ready: bool) -> ObservedMember {
        ObservedMember {
            name: name.into(),
            status: Some(MemberStatus {
                name: name.into(),
                role,
                ready,
                position: Position::Wal {
                    timeline: 1,
                    received_lsn: Some(0x3000060),
                    replayed_lsn: Some(0x3000060),
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

    #[test]
    fn phase_table() {
        let ok = [
            member("a", Role::Primary, true),
            member("b", Role::Replica, true),
        ];
        let half = [member("a", Role::Primary, true), unreachable("b")];
        for (members, seen, want) in [
            (&ok[..], false, Phase::Healthy),
            (&ok[..], true, Phase::Healthy),
            (&half[..], false, Phase::Creating),
            (&half[..], true, Phase::Degraded),
            (&[][..], false, Phase::Creating),
        ] {
            assert_eq!(
                compute_phase(members, true, seen),
                want,
                "{members:?} {seen}"
            );
            // Every instance ready but no writer routed (a failover in
            // progress, a primary waiting for its lease): not Healthy.
            if want == Phase::Healthy {
                let without_writer = if seen {
                    Phase::Degraded
                } else {
                    Phase::Creating
                };
                assert_eq!(compute_phase(members, false, seen), without_writer);
            }
        }
    }

    fn plan() -> PortPlan {
        PortPlan {
            rw: 40001,
            ro: 40002,
            instances: [
                (
                    "simple-pg-0".to_string(),
                    InstancePorts {
                        db: 40003,
                        api: 40004,
                        extra: Default::default(),
                    },
                ),
                (
                    "simple-pg-1".to_string(),
                    InstancePorts {
                        db: 40005,
                        api: 40006,
                        extra: Default::default(),
                    },
                ),
            ]
            .into(),
        }
    }

    #[test]
    fn status_json_shape() {
        let names = vec!["simple-pg-0".to_string(), "simple-pg-1".to_string()];
        let members = [
            member("simple-pg-0", Role::Primary, true),
            unreachable("simple-pg-1"),
        ];
        let routing = Routing {
            rw: Some("simple-pg-0".into()),
            ro: vec![],
        };
        let snap = snapshot(SnapshotInput {
            kind: "PostgresCluster",
            cluster: "simple-pg",
            listen: "127.0.0.1",
            ports: &plan(),
            instances: &names,
            members: &members,
            routing: &routing,
            phase: Phase::Creating,
            election: Some(&Election::Keep {
                primary: "simple-pg-0".into(),
            }),
            pid: Some(7),
            ha: None,
        });
        let v = serde_json::to_value(&snap).unwrap();
        assert_eq!(v["phase"], "Creating");
        assert_eq!(v["primary"], "simple-pg-0");
        assert_eq!(v["endpoints"]["rw"], "127.0.0.1:40001");
        assert_eq!(v["endpoints"]["ro"], "127.0.0.1:40002");
        assert_eq!(v["instances"][0]["name"], "simple-pg-0");
        assert_eq!(v["instances"][0]["role"], "primary");
        assert_eq!(v["instances"][0]["address"], "127.0.0.1:40003");
        assert_eq!(v["instances"][0]["ready"], true);
        assert_eq!(
            v["instances"][0]["position"],
            "tl 1 received 0/3000060 replayed 0/3000060"
        );
        assert_eq!(v["instances"][1]["role"], "unknown");
        assert_eq!(v["instances"][1]["ready"], false);
        assert_eq!(v["instances"][1]["message"], "connection refused");
        assert_eq!(v["election"], "keep simple-pg-0");
        let back: StatusSnapshot = serde_json::from_value(v).unwrap();
        assert_eq!(back, snap);

        let text = render_text(&snap);
        assert!(
            text.contains("PostgresCluster simple-pg: Creating, primary simple-pg-0"),
            "{text}"
        );
        assert!(
            text.lines()
                .any(|l| l.starts_with("simple-pg-1  unknown  no")),
            "{text}"
        );

        let st = stopped(snap);
        assert_eq!(st.phase, Phase::Stopped);
        assert_eq!(st.primary, None);
        assert!(st.instances.iter().all(|i| !i.ready));
    }

    #[test]
    fn current_without_snapshot_lists_planned_instances() {
        let state = LocalState {
            kind: "PostgresCluster".into(),
            cluster: "simple-pg".into(),
            listen: "::1".into(),
            ports: plan(),
            ..Default::default()
        };
        let s = current(&state, Some(1));
        assert_eq!(s.phase, Phase::Creating);
        assert_eq!(s.endpoints.rw, "[::1]:40001");
        assert_eq!(s.instances.len(), 2);
        assert_eq!(current(&state, None).phase, Phase::Stopped);
    }
}
