//! The decision loop of multi-writer (Galera) clusters on the local
//! runtime, used by `stratum local up` instead of the primary/replica loop
//! when the engine's `Topology.model` is `MultiWriter`. Process IO (the
//! instance managers and HAProxy), network IO (the managers' API) and the
//! state directory (`state.json`).
//!
//! Every tick:
//! - **Bootstrap.** When no member runs in a primary component,
//!   `Engine::elect` names the member to bootstrap the group from (the
//!   highest recovered seqno of the majority cluster UUID, or
//!   `spec.bootstrap.forceBootstrapFrom`), or says why it waits. The
//!   decision is written to `state.json` *before* the `bootstrap` action
//!   is sent to exactly that member; while it is pending, no other member
//!   is ever ordered to bootstrap, also by a restarted `up`. It is cleared
//!   once a member is Synced.
//! - **Writer.** HAProxy routes `rw` to the writer and fails over to the
//!   first healthy backup by itself; the loop keeps the writer while it
//!   is ready and otherwise adopts the server HAProxy chose (read over its
//!   master CLI; the first ready member when HAProxy has none), rewriting
//!   HAProxy's configuration and reloading it, so that a returning member
//!   does not take writes back. Every tick, open `rw` sessions on any
//!   other server than the one HAProxy sends writes to are cut (in old
//!   workers too), so all writes go to one node at a time.
//! - **Live changes.** A changed CR handed over by `stratum local up -f`
//!   (`apply.yaml`, see [`super::apply`]) is checked again; a changed
//!   `spec.configuration` rewrites every instance's configuration and
//!   restarts the members one at a time (a clean stop: the group shrinks
//!   and the member rejoins by IST), each Synced in a Primary component
//!   before the next, the writer last, after `rw` was moved to a Synced
//!   member. Anything else is refused naming the field; nothing changes.
//! - **Scaling.** A changed `spec.instances` adds members one at a time
//!   (laid out, its manager started, Synced in a Primary component and up
//!   in HAProxy's lists before the next) or removes the highest ordinals
//!   one at a time (`rw` moved off it first, out of HAProxy, its manager
//!   stopped, which stops mariadbd cleanly: the group shrinks by a leave,
//!   not an eviction; the others report the smaller size before the
//!   next), only while every member is Synced, so quorum holds at each
//!   step. `spec.pvcRetentionPolicy.whenScaled: Delete` deletes a removed
//!   member's directory; `Retain` (default) keeps it for a later scale-up.
//! - **Status and events**: per-member wsrep state, seqno and cluster
//!   size; events for bootstrap decisions and orders, joins, leaves,
//!   writer changes, applied or refused changes and restarts.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::signal::unix::{SignalKind, signal};

use super::apply;
use super::ha::HaState;
use super::haproxy::{self, Backend, Haproxy};
use super::input::Accepted;
use super::state::{LocalState, StateDir};
use super::status::{self, Phase, SnapshotInput, StatusSnapshot};
use super::supervisor::Supervisor;
use crate::engine::{Election, Engine, InstanceOps, ObservedMember, Routing, ValidatedCluster};
use crate::galera::{ComponentWatch, StuckWatch, in_primary};
use crate::instance::client::InstanceClient;
use crate::instance::protocol::Role;
use crate::instance::server::ACTION_RESTART;
use crate::registry::EngineRegistry;

/// How long one member of a rolling restart may take to be Synced again
/// before the loop says so (it keeps waiting: moving on would restart a
/// second member while the first is out of the group).
const RESTART_SLOW_AFTER: Duration = Duration::from_secs(300);

pub use crate::api::status::WsrepStatus;
pub use crate::galera::{
    ACTION_BOOTSTRAP, BootstrapStep, bootstrap_step, component_unknown, wsrep_status,
};
/// Events kept in `state.json`.
const MAX_EVENTS: usize = 50;
/// Least time between two `bootstrap` requests to the chosen member when
/// the previous one failed.
const RETRY_ORDER_EVERY: Duration = Duration::from_secs(2);
/// An ordered bootstrap that has not produced a Synced member after this
/// long is ordered again (to the same member only).
const REORDER_AFTER: Duration = Duration::from_secs(60);
/// Consecutive ticks the writer must be seen not ready before the loop
/// moves it (HAProxy has already moved new connections by then; this
/// only keeps an observation blip from rewriting the configuration).
const WRITER_DOWN_TICKS: u32 = 2;

/// What the Galera loop decided and saw, persisted in `state.json`
/// (`galera`) before each action.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GaleraState {
    /// The member `rw` sends writes to while it is ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writer: Option<String>,
    /// A bootstrap decided and not yet completed (no member Synced since).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bootstrap: Option<BootstrapDecision>,
    /// Bootstrap decisions taken in this state directory, ever (an order
    /// sent again to the same member is the same bootstrap).
    #[serde(default)]
    pub bootstraps: u64,
    /// The instance count a scaling in progress goes to (the CR in
    /// `cluster.yaml` says so too: a restarted `up` starts that many).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_to: Option<usize>,
    /// The last events, oldest first (`<RFC 3339> <Reason>: <message>`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<String>,
}

/// The member chosen to bootstrap the group, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BootstrapDecision {
    /// The member.
    pub member: String,
    /// The election's reason.
    pub reason: String,
    /// When it was decided (RFC 3339).
    pub decided_at: String,
    /// When the member accepted the order (RFC 3339); `None` until then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ordered_at: Option<String>,
}

impl GaleraState {
    /// Record an event (also logged).
    pub fn event(&mut self, reason: &str, message: impl Into<String>) {
        let message = message.into();
        tracing::info!(reason, "{message}");
        self.events.push(format!("{} {reason}: {message}", now()));
        if self.events.len() > MAX_EVENTS {
            let extra = self.events.len() - MAX_EVENTS;
            self.events.drain(..extra);
        }
    }
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// The Galera part of `stratum local status`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GaleraSummary {
    /// The writer in HAProxy's configuration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writer: Option<String>,
    /// The pending bootstrap, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bootstrap: Option<BootstrapDecision>,
    /// Bootstrap decisions so far.
    pub bootstraps: u64,
    /// Pid of the HAProxy master.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub haproxy_pid: Option<u32>,
}

/// A member's Galera facts in words, for the status table. Pure.
pub fn describe_wsrep(w: &WsrepStatus) -> String {
    let mut out = format!("{} {}:{}", w.state, w.cluster_uuid, w.seqno);
    if let Some(size) = w.cluster_size {
        out.push_str(&format!(", cluster size {size}"));
    }
    if let Some(t) = &w.last_state_transfer {
        out.push_str(&format!(", last {t}"));
    }
    out
}

/// The Galera line of `stratum local status`. Pure.
pub fn render_summary(g: &GaleraSummary) -> String {
    let mut out = format!(
        "writer {}, HAProxy pid {}, bootstraps {}\n",
        g.writer.as_deref().unwrap_or("-"),
        g.haproxy_pid
            .map(|p| p.to_string())
            .unwrap_or_else(|| "-".into()),
        g.bootstraps
    );
    if let Some(b) = &g.bootstrap {
        out.push_str(&format!(
            "bootstrap pending from {} ({}): {}\n",
            b.member,
            if b.ordered_at.is_some() {
                "ordered"
            } else {
                "decided"
            },
            b.reason
        ));
    }
    out
}

/// Where `rw` goes: keep `current` while it is ready (or was seen not
/// ready for fewer than [`WRITER_DOWN_TICKS`] ticks), else `haproxy`
/// (the server HAProxy sends new `rw` connections to by its own checks)
/// when it is ready, else the first ready member in `order` (the order of
/// HAProxy's backups: ordinal order). Adopting HAProxy's choice means the
/// reload that follows does not move `rw` a second time. `None` when
/// nobody is ready and there is no writer yet. Pure.
pub fn choose_writer(
    current: Option<&str>,
    ready: &[String],
    order: &[String],
    current_down_ticks: u32,
    haproxy: Option<&str>,
) -> Option<String> {
    if let Some(c) = current
        && (ready.iter().any(|r| r == c) || current_down_ticks < WRITER_DOWN_TICKS)
    {
        return Some(c.to_string());
    }
    haproxy
        .filter(|h| ready.iter().any(|r| r == h))
        .map(str::to_string)
        .or_else(|| order.iter().find(|n| ready.contains(n)).cloned())
        .or_else(|| current.map(str::to_string))
}

/// Where connections go now, for the status: the writer when ready, else
/// the first ready backup (what HAProxy does); reads to every ready
/// member. Pure.
pub fn effective_routing(writer: Option<&str>, ready: &[String], order: &[String]) -> Routing {
    let rw = writer
        .filter(|w| ready.iter().any(|r| r == w))
        .map(str::to_string)
        .or_else(|| order.iter().find(|n| ready.contains(n)).cloned());
    Routing {
        rw,
        ro: order
            .iter()
            .filter(|n| ready.contains(n))
            .cloned()
            .collect(),
    }
}

/// The order of a rolling restart: every member but the writer in
/// ordinal order, the writer last. Pure.
pub fn restart_order(names: &[String], writer: Option<&str>) -> Vec<String> {
    let mut out: Vec<String> = names
        .iter()
        .filter(|n| Some(n.as_str()) != writer)
        .cloned()
        .collect();
    if let Some(w) = writer.filter(|w| names.iter().any(|n| n == w)) {
        out.push(w.to_string());
    }
    out
}

/// A rolling restart in progress (in memory: a restarted `up` starts
/// every manager with the rewritten configuration anyway).
#[derive(Debug, Default)]
struct Rolling {
    /// Members still to restart, in order.
    queue: Vec<String>,
    /// The member restarting now: its manager's pid before, and since.
    now: Option<(String, Option<u32>, Instant)>,
    /// Whether "slow" was said for the member restarting now.
    slow_noted: bool,
}

/// A scaling in progress.
#[derive(Debug)]
struct Scaling {
    /// The members at the end.
    target: Vec<String>,
    /// The member being added, and since when.
    adding: Option<(String, Instant)>,
    /// The member removed last, and since when (the others have not
    /// reported the smaller group yet).
    removing: Option<(String, Instant)>,
}

/// The decision loop's memory and hands.
struct Loop {
    engine: Arc<dyn Engine>,
    cluster: ValidatedCluster,
    /// The CR in force (changed by a live change).
    accepted: Accepted,
    rolling: Option<Rolling>,
    scaling: Option<Scaling>,
    observe: InstanceClient,
    token: String,
    cluster_id: String,
    dir: StateDir,
    names: Vec<String>,
    act: InstanceClient,
    gs: GaleraState,
    haproxy: Haproxy,
    plan: haproxy::Plan,
    writer_down_ticks: u32,
    /// Members in the primary component as of the last `Joined`/`Left`.
    in_group: BTreeMap<String, bool>,
    last_order_attempt: Option<Instant>,
    ordered: Option<Instant>,
    last_wait: Option<String>,
    /// Members whose unknown component holds a bootstrap decision back.
    components: ComponentWatch,
    /// Members whose server runs outside the group without joining.
    stuck: StuckWatch,
}

impl Loop {
    fn order_due(&self) -> bool {
        let pending = self.gs.bootstrap.as_ref();
        match (pending.and_then(|p| p.ordered_at.as_ref()), self.ordered) {
            // Accepted by this `up`: again only when stale.
            (Some(_), Some(at)) => at.elapsed() >= REORDER_AFTER,
            // Accepted by a previous `up`, which was stopped before the
            // group ran: the member may have used the order and been
            // stopped since (a new `up` restarts the managers), so it is
            // told again. Only that member ever is; while its server
            // starts, the manager refuses the order.
            _ => self
                .last_order_attempt
                .is_none_or(|t| t.elapsed() >= RETRY_ORDER_EVERY),
        }
    }

    /// Act on the bootstrap decision; `persist` writes `state.json`.
    /// `blockers` (members that may be in a primary component) keep a new
    /// decision from being taken.
    async fn bootstrap(
        &mut self,
        election: &Election,
        blockers: &[String],
        persist: &mut impl FnMut(&GaleraState),
    ) {
        let pending = self.gs.bootstrap.as_ref().map(|p| p.member.clone());
        match bootstrap_step(election, pending.as_deref(), self.order_due()) {
            BootstrapStep::Decide { .. } if !blockers.is_empty() => {
                self.note_wait(&Election::Wait {
                    reason: format!("not bootstrapping yet: {}", blockers.join("; ")),
                    retry_after: Duration::ZERO,
                });
            }
            BootstrapStep::None => {}
            BootstrapStep::Completed(member) => {
                let Election::Keep { primary } = election else {
                    return;
                };
                self.gs.bootstrap = None;
                self.ordered = None;
                self.gs.event(
                    "Bootstrapped",
                    format!(
                        "the group runs again: bootstrapped from {member}, {primary} is Synced"
                    ),
                );
                persist(&self.gs);
            }
            BootstrapStep::Decide { member, reason } => {
                self.gs.bootstraps += 1;
                self.gs.bootstrap = Some(BootstrapDecision {
                    member: member.clone(),
                    reason: reason.clone(),
                    decided_at: now(),
                    ordered_at: None,
                });
                self.gs.event(
                    "BootstrapDecided",
                    format!("bootstrap from {member}: {reason}"),
                );
                // Persisted before the order: a restarted `up` orders
                // this member or nobody.
                persist(&self.gs);
                self.order(&member, persist).await;
            }
            BootstrapStep::Order(member) => self.order(&member, persist).await,
        }
    }

    async fn order(&mut self, member: &str, persist: &mut impl FnMut(&GaleraState)) {
        self.last_order_attempt = Some(Instant::now());
        match self.act.action(member, ACTION_BOOTSTRAP, json!({})).await {
            Ok(reply) => {
                self.ordered = Some(Instant::now());
                if let Some(p) = self.gs.bootstrap.as_mut() {
                    p.ordered_at = Some(now());
                }
                self.gs.event(
                    "BootstrapOrdered",
                    format!("{member} ordered to bootstrap a new primary component ({reply})"),
                );
                persist(&self.gs);
            }
            Err(e) => {
                let note = format!("bootstrap order to {member} failed: {e}");
                if self.last_wait.as_deref() != Some(note.as_str()) {
                    self.gs.event("BootstrapOrderRefused", note.clone());
                    self.last_wait = Some(note);
                    persist(&self.gs);
                }
            }
        }
    }

    /// Keep or move the writer; reload HAProxy when it moves.
    async fn writer(&mut self, ready: &[String]) {
        let current = self.gs.writer.clone();
        if current.as_ref().is_some_and(|c| ready.contains(c)) {
            self.writer_down_ticks = 0;
        } else if current.is_some() {
            self.writer_down_ticks += 1;
        }
        // What HAProxy does by its own checks, read only when the writer
        // may move.
        let (worker, haproxy_active) =
            if current.is_none() || self.writer_down_ticks >= WRITER_DOWN_TICKS {
                let worker = self
                    .haproxy
                    .workers()
                    .await
                    .ok()
                    .and_then(|w| w.first().copied());
                let active = match worker {
                    Some(pid) => self
                        .haproxy
                        .rw_servers(pid)
                        .await
                        .ok()
                        .and_then(|s| haproxy::rw_active(&s)),
                    None => None,
                };
                (worker, active)
            } else {
                (None, None)
            };
        let chosen = choose_writer(
            current.as_deref(),
            ready,
            &self.names,
            self.writer_down_ticks,
            haproxy_active.as_deref(),
        );
        if chosen == current || chosen.is_none() {
            return;
        }
        self.writer_down_ticks = 0;
        self.gs.writer = chosen.clone();
        let to = chosen.unwrap_or_default();
        match &current {
            Some(from) => self.gs.event(
                "WriterChanged",
                format!("rw writer moved from {from} (not ready) to {to}"),
            ),
            None => self
                .gs
                .event("WriterChosen", format!("rw writes go to {to}")),
        }
        self.plan.writer = Some(to);
        match self.haproxy.reload(haproxy::render(&self.plan)).await {
            Ok(()) => self.haproxy.wait_new_worker(worker).await,
            Err(e) => self.gs.event("HaproxyReloadFailed", format!("{e:#}")),
        }
    }

    /// Keep every open `rw` session on the server HAProxy sends writes to:
    /// sessions an old worker kept on the previous writer after a reload,
    /// or that HAProxy left on a backup when it moved to another one, are
    /// cut (their clients reconnect to the writer).
    async fn one_writer(&mut self) {
        match self.haproxy.single_writer().await {
            Ok((Some(active), cut)) if !cut.is_empty() => self.gs.event(
                "RwSessionsCut",
                format!(
                    "rw sessions cut on {}: HAProxy sends writes to {active}",
                    cut.join(", ")
                ),
            ),
            Ok(_) => {}
            Err(e) => tracing::debug!(
                error = format!("{e:#}"),
                "could not check HAProxy's rw sessions"
            ),
        }
    }

    /// Join and leave events: `Joined` when a member outside the primary
    /// component becomes Synced, `Left` when a member of it drops out
    /// (a donor or joiner stays in the component).
    fn membership(&mut self, members: &[ObservedMember]) {
        for m in members {
            let wsrep = m.status.as_ref().and_then(wsrep_status);
            let synced = m.role() == Role::Member
                && wsrep
                    .as_ref()
                    .is_some_and(|w| w.state.eq_ignore_ascii_case("synced"));
            if component_unknown(m) {
                // A busy server (a donor): no news is not a leave.
                continue;
            }
            let inside = synced || in_primary(m);
            let before = self.in_group.get(&m.name).copied().unwrap_or(false);
            match (before, inside) {
                (false, true) if synced => {
                    self.in_group.insert(m.name.clone(), true);
                    let w = wsrep.unwrap_or_default();
                    let transfer = w
                        .last_state_transfer
                        .map(|t| format!(", state transfer {t}"))
                        .unwrap_or_default();
                    self.gs.event(
                        "Joined",
                        format!(
                            "{} is Synced (cluster size {}, seqno {}{transfer})",
                            m.name,
                            w.cluster_size.map(|s| s.to_string()).unwrap_or("?".into()),
                            w.seqno
                        ),
                    );
                }
                (true, false) => {
                    self.in_group.insert(m.name.clone(), false);
                    let why = match (&m.status, wsrep) {
                        (None, _) => format!(
                            "its manager does not answer: {}",
                            m.error.as_deref().unwrap_or("unreachable")
                        ),
                        (Some(s), Some(w)) => format!(
                            "{}{} (server {:?})",
                            w.state,
                            w.cluster_status
                                .map(|c| format!(", {c}"))
                                .unwrap_or_default(),
                            s.process
                        ),
                        (Some(s), None) => format!("server {:?}", s.process),
                    };
                    self.gs
                        .event("Left", format!("{} left the group: {why}", m.name));
                }
                _ => {}
            }
        }
    }

    /// Take a CR handed over by `up -f`, if any: refused (an event, nothing
    /// changes) or applied; a changed configuration starts a rolling
    /// restart. The outcome goes to `ha`'s events too, which is where `up
    /// -f` looks for it.
    fn take_change(&mut self, ha: &mut HaState) {
        if self.rolling.is_some() || self.scaling.is_some() {
            // One change at a time: the file waits until this one is
            // done (`up -f` says so if that takes long).
            return;
        }
        let registry = EngineRegistry::new().with(self.engine.clone());
        let before = ha.events.len();
        let taken = apply::take(&registry, &self.dir, &self.accepted, ha);
        for e in ha.events.iter().skip(before) {
            tracing::info!("{e}");
            self.gs.events.push(e.clone());
        }
        if self.gs.events.len() > MAX_EVENTS {
            let extra = self.gs.events.len() - MAX_EVENTS;
            self.gs.events.drain(..extra);
        }
        let Some((new, change)) = taken else { return };
        self.cluster = new.cluster.clone();
        self.accepted = new;
        let target = self.accepted.cluster.instance_names();
        if target != self.names {
            self.gs.event(
                "Scaling",
                format!(
                    "from {} to {} members, one at a time",
                    self.names.len(),
                    target.len()
                ),
            );
            self.gs.scale_to = Some(target.len());
            self.scaling = Some(Scaling {
                target,
                adding: None,
                removing: None,
            });
        }
        if change.reconfigure_for.is_empty() {
            return;
        }
        let queue = restart_order(&self.names, self.gs.writer.as_deref());
        self.gs.event(
            "RollingRestart",
            format!(
                "restarting {} one at a time for {}",
                queue.join(", "),
                change.reconfigure_for.join(", ")
            ),
        );
        self.rolling = Some(Rolling {
            queue,
            ..Default::default()
        });
    }

    /// One step of a rolling restart: wait for the member restarting now
    /// to be Synced in a Primary component again (a new manager, `ready`),
    /// then, with every member ready, restart the next; the writer's `rw`
    /// is moved to a Synced member before it is restarted.
    async fn roll(&mut self, ready: &[String], pids: &BTreeMap<String, u32>) {
        if self.scaling.is_some() {
            return;
        }
        let names = self.names.clone();
        let Some(r) = self.rolling.as_mut() else {
            return;
        };
        // Members removed by a scaling meanwhile.
        r.queue.retain(|n| names.contains(n));
        if let Some((name, old_pid, since)) = r.now.clone() {
            let new_manager = pids.get(&name).is_some_and(|p| Some(*p) != old_pid);
            if new_manager && ready.contains(&name) {
                r.now = None;
                r.slow_noted = false;
                self.gs.event(
                    "Restarted",
                    format!(
                        "{name} is Synced again with the new configuration after {:.1}s",
                        since.elapsed().as_secs_f64()
                    ),
                );
            } else {
                if since.elapsed() > RESTART_SLOW_AFTER && !r.slow_noted {
                    r.slow_noted = true;
                    self.gs.event(
                        "RestartSlow",
                        format!(
                            "{name} is not Synced again after {}s; the rolling restart waits for it",
                            since.elapsed().as_secs()
                        ),
                    );
                }
                return;
            }
        }
        let Some(r) = self.rolling.as_mut() else {
            return;
        };
        if r.queue.is_empty() {
            self.rolling = None;
            self.gs.event(
                "RollingRestartDone",
                "every member runs the new configuration",
            );
            return;
        }
        // Quorum: nobody else out of the group while one member restarts.
        if !self.names.iter().all(|n| ready.contains(n)) {
            return;
        }
        // The writer last: it may have moved since the queue was made (a
        // donor of an IST is briefly not Synced, so `rw` moves off it).
        let writer = self.gs.writer.clone();
        let at = r
            .queue
            .iter()
            .position(|n| Some(n) != writer.as_ref())
            .unwrap_or(0);
        let next = r.queue.remove(at);
        if self.gs.writer.as_deref() == Some(next.as_str())
            && !self.move_writer_off(&next, ready, "restarts").await
        {
            if let Some(r) = self.rolling.as_mut() {
                r.queue.insert(0, next);
            }
            return;
        }
        let pid = pids.get(&next).copied();
        if let Some(pid) = pid {
            // The manager stops mariadbd cleanly (the member leaves the
            // group) and exits; the supervisor starts it again with the
            // rewritten instance.json.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        self.gs.event(
            "Restarting",
            format!("{next} restarting: new configuration"),
        );
        if let Some(r) = self.rolling.as_mut() {
            r.now = Some((next, pid, Instant::now()));
        }
    }

    /// Move `rw` off `from` (about to stop) to another ready member: the
    /// configuration reloaded and the sessions still open on `from` cut.
    /// False when no other member is ready.
    async fn move_writer_off(&mut self, from: &str, ready: &[String], why: &str) -> bool {
        let Some(to) = self
            .names
            .iter()
            .find(|n| *n != from && ready.contains(n))
            .cloned()
        else {
            return false;
        };
        self.gs.event(
            "WriterChanged",
            format!("rw writer moved from {from} to {to} before {from} {why}"),
        );
        self.gs.writer = Some(to.clone());
        self.plan.writer = Some(to);
        self.reload_haproxy().await;
        // Sessions still open on the member about to stop go now.
        self.one_writer().await;
        true
    }

    /// Reload HAProxy with the current plan and wait for its new worker.
    async fn reload_haproxy(&mut self) {
        let worker = self
            .haproxy
            .workers()
            .await
            .ok()
            .and_then(|w| w.first().copied());
        match self.haproxy.reload(haproxy::render(&self.plan)).await {
            Ok(()) => self.haproxy.wait_new_worker(worker).await,
            Err(e) => self.gs.event("HaproxyReloadFailed", format!("{e:#}")),
        }
    }

    /// The members are `names` from now on: the clients, HAProxy's
    /// configuration.
    async fn set_members(&mut self, names: Vec<String>, state: &LocalState) {
        self.names = names;
        let endpoints = super::up::members(state, &self.names);
        self.observe = InstanceClient::new(
            self.token.clone(),
            self.cluster_id.clone(),
            endpoints.clone(),
            Duration::from_secs(2),
        );
        self.act = InstanceClient::new(
            self.token.clone(),
            self.cluster_id.clone(),
            endpoints,
            Duration::from_secs(10),
        );
        match plan(state, &self.dir, &self.names, self.gs.writer.clone()) {
            Ok(p) => {
                self.plan = p;
                self.reload_haproxy().await;
            }
            Err(e) => self.gs.event("HaproxyReloadFailed", format!("{e:#}")),
        }
    }

    /// Whether HAProxy's current worker has `name` up in both `rw` (as a
    /// backup or the writer) and `ro`.
    async fn in_haproxy(&self, name: &str) -> bool {
        let Ok(workers) = self.haproxy.workers().await else {
            return false;
        };
        let Some(pid) = workers.first() else {
            return false;
        };
        let mut ok = true;
        for proxy in ["rw", "ro"] {
            ok &= self
                .haproxy
                .servers(*pid, proxy)
                .await
                .is_ok_and(|s| s.iter().any(|s| s.name == name && s.up()));
        }
        ok
    }

    /// One step of a scaling: see the module documentation.
    async fn scale(
        &mut self,
        ready: &[String],
        members: &[ObservedMember],
        supervisor: &mut Supervisor,
        state: &mut LocalState,
        layout: &super::up::Layout,
    ) {
        let Some(sc) = self.scaling.as_ref() else {
            return;
        };
        if let Some((name, since)) = sc.adding.clone() {
            if !(ready.contains(&name) && self.in_haproxy(&name).await) {
                return;
            }
            self.gs.event(
                "MemberAdded",
                format!(
                    "{name} is Synced in the primary component and in HAProxy's rw/ro lists after {:.1}s ({} members)",
                    since.elapsed().as_secs_f64(),
                    self.names.len()
                ),
            );
        }
        if let Some((name, since)) = sc.removing.clone() {
            let size = self.names.len() as i64;
            let shrunk = self.names.iter().all(|n| {
                ready.contains(n)
                    && members.iter().any(|m| {
                        m.name == *n
                            && m.status.as_ref().and_then(wsrep_status).is_some_and(|w| {
                                w.cluster_size == Some(size)
                                    && w.cluster_status.as_deref() == Some("Primary")
                            })
                    })
            });
            if !shrunk {
                return;
            }
            self.gs.event(
                "MemberRemoved",
                format!(
                    "{name} left the group; the others report {size} members after {:.1}s",
                    since.elapsed().as_secs_f64()
                ),
            );
        }
        let Some(sc) = self.scaling.as_mut() else {
            return;
        };
        sc.adding = None;
        sc.removing = None;
        let target = sc.target.clone();
        if self.names == target {
            self.scaling = None;
            self.gs.scale_to = None;
            self.gs.event(
                "Scaled",
                format!("the cluster has {} members", target.len()),
            );
            return;
        }
        // Quorum: the group changes only while every member is Synced.
        if !self.names.iter().all(|n| ready.contains(n)) {
            return;
        }
        if target.len() > self.names.len() {
            let next = target[self.names.len()].clone();
            let mut names = self.names.clone();
            names.push(next.clone());
            match super::up::resize_instances(&self.dir, &self.accepted, state, &names, layout) {
                Ok(specs) => {
                    for spec in specs.into_iter().filter(|s| s.name == next) {
                        supervisor.add(spec);
                    }
                }
                Err(e) => {
                    self.gs
                        .event("ScalingFailed", format!("could not add {next}: {e:#}"));
                    self.scaling = None;
                    self.gs.scale_to = None;
                    return;
                }
            }
            self.set_members(names, state).await;
            self.gs.event(
                "AddingMember",
                format!("{next} started; it joins by SST or IST"),
            );
            if let Some(sc) = self.scaling.as_mut() {
                sc.adding = Some((next, Instant::now()));
            }
            return;
        }
        let Some(victim) = self.names.last().cloned() else {
            return;
        };
        if self.gs.writer.as_deref() == Some(victim.as_str())
            && !self.move_writer_off(&victim, ready, "is removed").await
        {
            return;
        }
        let names: Vec<String> = self
            .names
            .iter()
            .filter(|n| **n != victim)
            .cloned()
            .collect();
        // Out of HAProxy first, then a clean stop: the manager stops
        // mariadbd, which leaves the group.
        self.set_members(names.clone(), state).await;
        self.one_writer().await;
        self.gs.event(
            "RemovingMember",
            format!("{victim} out of HAProxy; stopping it cleanly so that it leaves the group"),
        );
        let t = Instant::now();
        supervisor.remove(&victim).await;
        if let Err(e) =
            super::up::resize_instances(&self.dir, &self.accepted, state, &names, layout)
        {
            self.gs.event(
                "ScalingFailed",
                format!("could not rewrite the members' configuration: {e:#}"),
            );
        }
        match super::up::delete_scaled_away_data(&self.dir, &self.accepted, &victim) {
            Ok(false) => {}
            Ok(true) => self.gs.event(
                "DataDeleted",
                format!(
                    "{} deleted (pvcRetentionPolicy.whenScaled: Delete)",
                    self.dir.instance_dir(&victim).display()
                ),
            ),
            Err(e) => self.gs.event("DataDeleteFailed", format!("{e:#}")),
        }
        if let Some(sc) = self.scaling.as_mut() {
            sc.removing = Some((victim, t));
        }
    }

    fn note_wait(&mut self, election: &Election) {
        let note = match election {
            Election::Wait { reason, .. } => Some(format!("waiting: {reason}")),
            Election::NoCandidate { reason } => Some(format!("no candidate: {reason}")),
            _ => None,
        };
        if let Some(note) = note
            && self.last_wait.as_deref() != Some(note.as_str())
        {
            let reason = if matches!(election, Election::Wait { .. }) {
                "BootstrapWaiting"
            } else {
                "NoBootstrapCandidate"
            };
            self.gs.event(reason, note.clone());
            self.last_wait = Some(note);
        }
    }
}

/// The HAProxy plan of a cluster.
fn plan(
    state: &LocalState,
    dir: &StateDir,
    names: &[String],
    writer: Option<String>,
) -> anyhow::Result<haproxy::Plan> {
    let files = haproxy::Files::new(dir);
    let listen: IpAddr = state
        .listen
        .parse()
        .with_context(|| format!("invalid listen address {:?}", state.listen))?;
    Ok(haproxy::Plan {
        cluster: format!("{} {}", state.kind, state.cluster),
        listen,
        rw_port: state.ports.rw,
        ro_port: state.ports.ro,
        members: names
            .iter()
            .filter_map(|n| {
                let p = state.ports.instances.get(n)?;
                Some(Backend {
                    name: n.clone(),
                    db_port: p.db,
                    api_port: p.api,
                })
            })
            .collect(),
        writer,
        socket: files.socket,
        state_file: files.state_file,
    })
}

/// Run a multi-writer cluster until SIGINT or SIGTERM: managers, HAProxy,
/// the decision loop. The `rw`/`ro` listeners `up` bound to check the
/// ports must be dropped before (HAProxy binds them).
pub(super) async fn serve(
    dir: StateDir,
    accepted: Accepted,
    names: Vec<String>,
    mut state: LocalState,
    haproxy_bin: PathBuf,
    layout: super::up::Layout,
) -> anyhow::Result<()> {
    let mut sigint = signal(SignalKind::interrupt()).context("failed to handle SIGINT")?;
    let mut sigterm = signal(SignalKind::terminate()).context("failed to handle SIGTERM")?;
    let token = std::fs::read_to_string(dir.token_file())
        .with_context(|| format!("failed to read {}", dir.token_file().display()))?
        .trim()
        .to_string();
    std::env::current_exe().context("failed to find the stratum binary")?;
    let endpoints = super::up::members(&state, &names);
    let observe = InstanceClient::new(
        token.clone(),
        state.cluster_id.clone(),
        endpoints.clone(),
        Duration::from_secs(2),
    );
    let act = InstanceClient::new(
        token.clone(),
        state.cluster_id.clone(),
        endpoints,
        Duration::from_secs(10),
    );

    let mut gs = state.galera.clone().unwrap_or_default();
    if let Some(p) = &gs.bootstrap {
        tracing::info!(member = %p.member, "resuming: a bootstrap from this member is pending");
    }
    if let Some(n) = gs.scale_to.take() {
        // `cluster.yaml` already says `n`: its members start now, together
        // (the ones removed are not started).
        gs.event(
            "ScalingResumed",
            format!(
                "a scaling to {n} members was under way when `up` stopped; the {} members of the CR start now",
                names.len()
            ),
        );
    }
    let plan = plan(&state, &dir, &names, gs.writer.clone())?;
    let hp = Haproxy::start(
        haproxy_bin,
        haproxy::Files::new(&dir),
        haproxy::render(&plan),
    )
    .await
    .context("failed to start HAProxy for the rw/ro endpoints")?;
    state.haproxy = hp.pid();

    let specs = super::up::manager_specs(&dir, &names);
    let mut supervisor = Supervisor::start(specs);
    let rw_addr = status::address(&state.listen, state.ports.rw);
    let ro_addr = status::address(&state.listen, state.ports.ro);
    tracing::info!(cluster = %state.cluster, kind = %state.kind, rw = %rw_addr, ro = %ro_addr,
        state_dir = %dir.root().display(), "local Galera cluster starting");
    eprintln!(
        "{} {}: rw {rw_addr}, ro {ro_addr} (HAProxy); credentials in {}; Ctrl-C or `stratum local down --state-dir {}` stops it",
        state.kind,
        state.cluster,
        dir.secrets_dir().display(),
        dir.root().display()
    );

    let mut lp = Loop {
        engine: accepted.engine.clone(),
        cluster: accepted.cluster.clone(),
        accepted: accepted.clone(),
        rolling: None,
        scaling: None,
        observe,
        token,
        cluster_id: state.cluster_id.clone(),
        dir: dir.clone(),
        names: names.clone(),
        act,
        gs,
        haproxy: hp,
        plan,
        writer_down_ticks: 0,
        in_group: BTreeMap::new(),
        last_order_attempt: None,
        ordered: None,
        last_wait: None,
        components: ComponentWatch::default(),
        stuck: StuckWatch::default(),
    };
    let mut phase = Phase::Creating;
    let mut seen_all_ready = false;
    state.galera = Some(lp.gs.clone());
    state.status = Some(snapshot(
        &state,
        &names,
        &[],
        &Routing::default(),
        phase,
        None,
        &lp,
    ));
    super::up::persist(&dir, &state);

    let mut ticker = tokio::time::interval(super::up::tick());
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let signal_name = loop {
        tokio::select! {
            _ = ticker.tick() => {
                let names = lp.names.clone();
                let members = lp.observe.observe_all().await;
                let election = lp.engine.elect(&lp.cluster, &members);
                lp.note_wait(&election);
                {
                    let (dir, base) = (&lp.dir.clone(), &state);
                    let mut persist = |gs: &GaleraState| {
                        let mut s = base.clone();
                        s.galera = Some(gs.clone());
                        super::up::persist(dir, &s);
                    };
                    let blockers = lp.components.blockers(&members, Instant::now());
                    lp.bootstrap(&election, &blockers, &mut persist).await;
                }
                lp.membership(&members);
                for member in lp.stuck.due(&members, Instant::now()) {
                    let note = match lp.act.action(&member, ACTION_RESTART, json!({})).await {
                        Ok(_) => format!(
                            "{member}'s server ran outside the group (Initialized, Disconnected) for {}s: restarted so that it joins again",
                            crate::galera::STUCK_GRACE.as_secs()
                        ),
                        Err(e) => format!("restarting stuck member {member} failed: {e}"),
                    };
                    lp.gs.event("MemberRestarted", note);
                }
                let ready: Vec<String> = names
                    .iter()
                    .filter(|n| members.iter().any(|m| &m.name == *n && m.ready()))
                    .cloned()
                    .collect();
                lp.writer(&ready).await;
                lp.one_writer().await;
                lp.take_change(&mut state.ha);
                lp.scale(&ready, &members, &mut supervisor, &mut state, &layout).await;
                lp.roll(&ready, &supervisor.pids()).await;
                let names = lp.names.clone();
                let routing = effective_routing(lp.gs.writer.as_deref(), &ready, &names);
                phase = status::compute_phase(&members, routing.rw.is_some(), seen_all_ready);
                if phase == Phase::Healthy && !seen_all_ready {
                    seen_all_ready = true;
                    tracing::info!(cluster = %state.cluster, "every member is Synced");
                    eprintln!("{} {}: every member is Synced", state.kind, state.cluster);
                }
                state.managers = supervisor.pids();
                state.haproxy = lp.haproxy.pid();
                state.galera = Some(lp.gs.clone());
                state.status = Some(snapshot(&state, &names, &members, &routing, phase, Some(&election), &lp));
                super::up::persist(&dir, &state);
            }
            _ = sigint.recv() => break "SIGINT",
            _ = sigterm.recv() => break "SIGTERM",
        }
    };

    tracing::info!(signal = signal_name, "stopping the local cluster");
    let Loop {
        haproxy: hp, gs, ..
    } = lp;
    hp.stop().await;
    supervisor.stop().await;
    state.up_pid = None;
    state.managers.clear();
    state.haproxy = None;
    state.galera = Some(gs);
    state.status = state.status.take().map(status::stopped);
    super::up::persist(&dir, &state);
    eprintln!(
        "{} {}: stopped; data kept in {}",
        state.kind,
        state.cluster,
        dir.root().display()
    );
    Ok(())
}

fn snapshot(
    state: &LocalState,
    names: &[String],
    members: &[ObservedMember],
    routing: &Routing,
    phase: Phase,
    election: Option<&Election>,
    lp: &Loop,
) -> StatusSnapshot {
    let mut snap = status::snapshot(SnapshotInput {
        kind: &state.kind,
        cluster: &state.cluster,
        listen: &state.listen,
        ports: &state.ports,
        instances: names,
        members,
        routing,
        phase,
        election,
        pid: Some(std::process::id()),
        ha: None,
    });
    snap.current_primary = lp.gs.writer.clone();
    snap.events = lp.gs.events.iter().rev().take(20).rev().cloned().collect();
    snap.galera = Some(GaleraSummary {
        writer: lp.gs.writer.clone(),
        bootstrap: lp.gs.bootstrap.clone(),
        bootstraps: lp.gs.bootstraps,
        haproxy_pid: lp.haproxy.pid(),
    });
    snap
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::instance::protocol::{MemberStatus, Position};

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("db-{i}")).collect()
    }
    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn writer_is_kept_while_ready_and_not_moved_back() {
        let order = names(3);
        // First choice: the lowest ordinal ready member.
        assert_eq!(
            choose_writer(None, &v(&["db-1", "db-2"]), &order, 0, None).as_deref(),
            Some("db-1")
        );
        assert_eq!(choose_writer(None, &[], &order, 0, None), None);
        // Kept while ready, even when a lower ordinal is back.
        assert_eq!(
            choose_writer(Some("db-1"), &v(&["db-0", "db-1", "db-2"]), &order, 0, None).as_deref(),
            Some("db-1")
        );
        // One blip is tolerated; the second tick moves it to the first
        // ready member in HAProxy's backup order.
        assert_eq!(
            choose_writer(Some("db-0"), &v(&["db-1", "db-2"]), &order, 1, Some("db-2")).as_deref(),
            Some("db-0")
        );
        assert_eq!(
            choose_writer(Some("db-0"), &v(&["db-1", "db-2"]), &order, 2, None).as_deref(),
            Some("db-1")
        );
        // HAProxy already sends writes to db-2 (db-1's check was down when
        // it failed over): the loop adopts that, not its own order.
        assert_eq!(
            choose_writer(Some("db-0"), &v(&["db-1", "db-2"]), &order, 2, Some("db-2")).as_deref(),
            Some("db-2")
        );
        // ... unless that member is not ready by the managers' reports.
        assert_eq!(
            choose_writer(Some("db-0"), &v(&["db-1"]), &order, 2, Some("db-2")).as_deref(),
            Some("db-1")
        );
        // Nobody ready: keep the configuration as it is.
        assert_eq!(
            choose_writer(Some("db-0"), &[], &order, 5, None).as_deref(),
            Some("db-0")
        );
    }

    #[test]
    fn rolling_restart_order_puts_the_writer_last() {
        let order = names(3);
        assert_eq!(
            restart_order(&order, Some("db-0")),
            v(&["db-1", "db-2", "db-0"])
        );
        assert_eq!(
            restart_order(&order, Some("db-1")),
            v(&["db-0", "db-2", "db-1"])
        );
        assert_eq!(restart_order(&order, None), order);
        assert_eq!(restart_order(&order, Some("gone")), order);
    }

    #[test]
    fn effective_routing_follows_haproxy() {
        let order = names(3);
        let r = effective_routing(Some("db-1"), &v(&["db-0", "db-1"]), &order);
        assert_eq!(r.rw.as_deref(), Some("db-1"));
        assert_eq!(r.ro, v(&["db-0", "db-1"]));
        // The writer is down: HAProxy uses the first healthy backup.
        let r = effective_routing(Some("db-0"), &v(&["db-2", "db-1"]), &order);
        assert_eq!(r.rw.as_deref(), Some("db-1"));
        let r = effective_routing(Some("db-0"), &[], &order);
        assert_eq!(r, Routing::default());
    }

    fn decision(member: &str, ordered: bool) -> BootstrapDecision {
        BootstrapDecision {
            member: member.into(),
            reason: "r".into(),
            decided_at: "t".into(),
            ordered_at: ordered.then(|| "t".into()),
        }
    }

    #[test]
    fn wsrep_facts_in_words() {
        let s = MemberStatus {
            position: Position::Galera {
                cluster_uuid: "u".into(),
                seqno: 42,
                state: "Synced".into(),
            },
            details: json!({"wsrepClusterSize": 3, "lastStateTransfer": "ist"}),
            ..Default::default()
        };
        let w = wsrep_status(&s).unwrap();
        assert_eq!(describe_wsrep(&w), "Synced u:42, cluster size 3, last ist");
    }

    #[test]
    fn state_round_trips() {
        let mut gs = GaleraState {
            writer: Some("db-1".into()),
            bootstrap: Some(decision("db-1", true)),
            bootstraps: 2,
            ..Default::default()
        };
        for i in 0..(MAX_EVENTS + 3) {
            gs.event("Test", format!("e{i}"));
        }
        assert_eq!(gs.events.len(), MAX_EVENTS);
        let v = serde_json::to_value(&gs).unwrap();
        assert_eq!(v["bootstrap"]["member"], "db-1");
        assert_eq!(serde_json::from_value::<GaleraState>(v).unwrap(), gs);
    }
}
