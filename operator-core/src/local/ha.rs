//! Failover, switchover and the write lease on the local runtime: the
//! decision loop's actions on `Engine::elect`. Network IO (instance
//! manager API), the state directory (intent persisted in `state.json`
//! before each action) and signals to a failed primary's processes. The
//! rule that prevents two writers is described in `docs/failover.md`.
//!
//! - The operator names the primary (`currentPrimary`) and renews its write
//!   lease every [`lease_ttl`]/4. A manager stops a writer whose lease
//!   expired and will not start one without a valid lease.
//! - Failover: the primary is down → stop routing writes to it → fence it
//!   (manager reachable) or kill its manager and server on the host
//!   (signals: a frozen manager cannot stop its server; its fence marker
//!   written first), going on once the server is seen gone, else once its
//!   lease has certainly expired (last renewal + TTL + [`LEASE_MARGIN`])
//!   → persist `targetPrimary` →
//!   promote the engine's candidate, granting it a lease in the same call →
//!   `currentPrimary` → the others follow it (the old primary through
//!   pg_rewind when it is back).
//! - Switchover: stop routing writes → fence the primary (clean stop) →
//!   wait until the target received everything → promote → repoint.
//! - Scaling: towards the spec's instances while the primary is healthy:
//!   new replicas get their slots and are started by `up` ([`Resize`]);
//!   a primary being removed is switched over to a kept replica first, the
//!   primary stops waiting for removed synchronous standbys, `up` stops
//!   them once kept standbys hold every acknowledged commit (`Drain`),
//!   their slots are dropped.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::watch;

use super::state::{self, StateDir};
use crate::engine::{Election, Engine, InstanceOps, ObservedMember, ValidatedCluster};
use crate::instance::client::InstanceClient;
use crate::instance::config::PeerEndpoint;
use crate::instance::failsafe::{self, RevokeOutcome, SentLists};
use crate::instance::protocol::{
    ACTION_FENCE, ACTION_FOLLOW, ACTION_LEASE, ACTION_PROMOTE, ACTION_RECONFIGURE, ACTION_REVOKE,
    ACTION_SLOTS, ACTION_SYNC_STANDBYS, ACTION_UNFENCE, BODY_LEASE, LeaseGrant, Position,
    ProcessState, RevokeReply, RevokeRequest, Role, format_lsn,
};
use crate::topology::{streaming_replicas, sync_standbys};

/// A file in the state directory that pauses the decision loop while it
/// exists: no observation, no decision, no lease renewal; `rw`/`ro` keep
/// forwarding where they did. It stands for an operator that is away
/// (crashed, being upgraded) while the database processes run on, as on
/// Kubernetes, and is how the failsafe tests take the operator away
/// without stopping the endpoints (`up` holds both).
pub const PAUSE_FILE: &str = "pause-decisions";
/// Environment variable overriding the lease TTL in milliseconds (tests).
pub const LEASE_ENV: &str = "STRATUM_LOCAL_LEASE_MS";
/// Default write-lease TTL.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(5);
/// Added to the TTL before a lease of an unreachable primary is taken as
/// expired (clock rate differences, the manager's watchdog period, the
/// time to stop the server).
pub const LEASE_MARGIN: Duration = Duration::from_secs(1);
/// Events kept in `state.json`.
const MAX_EVENTS: usize = 50;
/// How long a primary that is restarting (waiting for its lease) may take
/// before it counts as failed.
const AWAITING_LEASE_GRACE: Duration = Duration::from_secs(10);
/// How long a primary may be up but not ready before it counts as failed.
const NOT_READY_GRACE: Duration = Duration::from_secs(3);
/// How long a primary's manager may not answer before the primary counts
/// as failed (a loaded machine answers late; a dead one is fenced or waits
/// for its lease anyway).
const UNREACHABLE_GRACE: Duration = Duration::from_secs(5);
/// How long a primary that this `up` has not seen ready yet may stay
/// unready (its manager not answering, its server starting, waiting for
/// its lease) before it counts as failed. `up` starts every manager anew,
/// so after a restart of `up` the primary restarts too: on a loaded
/// machine that took more than [`NOT_READY_GRACE`], and the failover this
/// started (promoting a replica that was itself just restarting, rewinding
/// the others) once left a replica unready for over a minute in
/// `ha_up_killed_mid_rolling_restart_resumes`. A server that exited, or is
/// fenced, still counts at once.
const STARTUP_GRACE: Duration = Duration::from_secs(30);
/// A replica not streaming from the primary this long is told to follow.
const NOT_STREAMING_GRACE: Duration = Duration::from_secs(2);
/// … and this long (or failing to start this long), to follow through
/// pg_rewind.
const REWIND_AFTER: Duration = Duration::from_secs(5);
/// Least time between two `follow` requests to one instance.
const FOLLOW_EVERY: Duration = Duration::from_secs(3);
/// How long a fence request to a failed primary whose manager did not
/// answer the last observation may take.
const UNANSWERING_FENCE_TIMEOUT: Duration = Duration::from_millis(500);
/// How long a switchover waits for the target to receive the old primary's
/// last WAL.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(10);

/// The write-lease TTL (default 5 s, `STRATUM_LOCAL_LEASE_MS`).
pub fn lease_ttl() -> Duration {
    std::env::var(LEASE_ENV)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|ms| *ms >= 200)
        .map(Duration::from_millis)
        .unwrap_or(DEFAULT_LEASE_TTL)
}

/// What the operator intends and knows, persisted in `state.json` before
/// every action so that a restarted `up` resumes instead of deciding
/// again.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HaState {
    /// The primary the operator recognises (fact once promoted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_primary: Option<String>,
    /// The primary the operator is making (intent; equal to
    /// `currentPrimary` when nothing is in progress).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_primary: Option<String>,
    /// Incremented at each promotion; leases carry it.
    #[serde(default)]
    pub term: u64,
    /// Timeline of the current primary, as last reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeline: Option<u32>,
    /// The operation in progress.
    #[serde(default)]
    pub step: Step,
    /// Members the current primary reported as synchronous standbys
    /// (`details.replicas[].syncState` `sync` or `quorum`) at any time
    /// since it became primary: only they can hold acknowledged commits,
    /// so only they are compared in the next failover.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sync_standbys: Vec<String>,
    /// The instances the cluster runs now (managers started, observed,
    /// routed to). `up` moves them towards the spec's instances one step
    /// at a time (see [`Resize`]); a restarted `up` starts these and
    /// resumes from there. Empty in a state written before scaling
    /// existed: the spec's instances.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<String>,
    /// A rolling restart in progress, so that a restarted `up` knows of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolling: Option<RollingState>,
    /// The last events, oldest first (`<RFC 3339> <Reason>: <message>`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<String>,
}

/// A rolling restart in progress (`ha.rolling` in `state.json`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RollingState {
    /// The instances that do not run the new configuration yet, in order
    /// (the one restarting now included).
    pub remaining: Vec<String>,
    /// The instance restarting now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restarting: Option<String>,
    /// The primary restarts first (a lowered hot-standby parameter); kept
    /// for the whole rolling restart, so that an `up` started again in the
    /// middle knows that the replicas still to restart must wait until
    /// they replayed past the primary's restart (the primary is done when
    /// it is no longer in `remaining`).
    #[serde(default)]
    pub primary_first: bool,
}

/// A change of the running instances that the orchestrator asks `up` to
/// make (only `up` starts and stops managers).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resize {
    /// Lay out and start these instances; they clone from the primary,
    /// whose slots for them exist already.
    Add(Vec<String>),
    /// Stop these instances: none of them is the primary, and the
    /// primary's synchronous standbys no longer count on them.
    Remove(Vec<String>),
}

/// An operation in progress.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum Step {
    /// Nothing: keep the primary, converge the replicas.
    #[default]
    Idle,
    /// Replacing a failed primary.
    Failover {
        /// The failed primary.
        from: String,
    },
    /// A planned move of the primary.
    Switchover {
        /// The primary being demoted.
        from: String,
        /// The replica being promoted.
        to: String,
    },
}

impl HaState {
    /// Record an event (also logged).
    pub fn event(&mut self, reason: &str, message: impl Into<String>) {
        let message = message.into();
        tracing::info!(reason, "{message}");
        let stamp = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        self.events.push(format!("{stamp} {reason}: {message}"));
        if self.events.len() > MAX_EVENTS {
            let extra = self.events.len() - MAX_EVENTS;
            self.events.drain(..extra);
        }
    }
}

/// `switchover.json` in the state directory: a request of `stratum local
/// promote`, consumed by the running `up`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SwitchoverRequest {
    /// The replica to promote.
    pub target: String,
}

/// Name of the switchover request file.
pub const SWITCHOVER_FILE: &str = "switchover.json";

/// Why a switchover to `target` is refused, given the observed members
/// and the current primary; `None` when it may proceed. Pure.
pub fn switchover_refusal(
    target: &str,
    instances: &[String],
    current_primary: Option<&str>,
    members: &[ObservedMember],
) -> Option<String> {
    if !instances.iter().any(|i| i == target) {
        return Some(format!(
            "there is no instance {target:?}; instances are {}",
            instances.join(", ")
        ));
    }
    if current_primary == Some(target) {
        return Some(format!("{target} is already the primary"));
    }
    let Some(primary) = current_primary else {
        return Some("the cluster has no primary yet".into());
    };
    let member = members.iter().find(|m| m.name == target);
    if !member.is_some_and(|m| m.role() == Role::Replica && m.ready()) {
        return Some(format!(
            "{target} is not a ready replica (role {}); only a streaming replica can be promoted",
            member.map(|m| m.role().as_str()).unwrap_or("unknown")
        ));
    }
    let p = members.iter().find(|m| m.name == primary);
    if !p.is_some_and(|m| m.role() == Role::Primary && m.ready()) {
        return Some(format!(
            "the primary {primary} is not ready; a failover, not a switchover, replaces it"
        ));
    }
    None
}

/// Renews the write lease of one holder in the background, so that slow
/// actions in the decision loop never let the primary's lease lapse. Each
/// grant carries the holder's failsafe list: every other member that is
/// not fenced by the user (see docs/failover.md, "Failsafe").
struct LeaseKeeper {
    holder: watch::Sender<Option<(String, u64)>>,
    /// Replaced when the members change (a scaled cluster).
    client: Arc<Mutex<InstanceClient>>,
    /// Every member's endpoints and the user-fenced ones: the failsafe
    /// list is taken from them at each renewal.
    roster: Arc<Mutex<(Vec<PeerEndpoint>, BTreeSet<String>)>>,
    /// The lists sent to each holder (which ones it may hold).
    lists: Arc<Mutex<SentLists>>,
    /// A renewal's answer said the holder had kept writes on failsafe for
    /// so many ms (taken by the decision loop for its event).
    failsafe_ended: Arc<Mutex<Option<(String, u64)>>>,
    /// No renewals while set (the decision loop is paused).
    paused: Arc<std::sync::atomic::AtomicBool>,
    /// When each instance last confirmed a renewal (response time).
    renewed: Arc<Mutex<BTreeMap<String, Instant>>>,
    started: Instant,
    ttl: Duration,
    task: tokio::task::JoinHandle<()>,
}

impl LeaseKeeper {
    fn start(client: InstanceClient, endpoints: Vec<PeerEndpoint>, ttl: Duration) -> Self {
        let (holder, mut rx) = watch::channel::<Option<(String, u64)>>(None);
        let renewed: Arc<Mutex<BTreeMap<String, Instant>>> = Arc::default();
        let roster = Arc::new(Mutex::new((endpoints, BTreeSet::new())));
        let lists: Arc<Mutex<SentLists>> = Arc::default();
        let failsafe_ended: Arc<Mutex<Option<(String, u64)>>> = Arc::default();
        let paused: Arc<std::sync::atomic::AtomicBool> = Arc::default();
        let (seen, roster_t, lists_t, ended_t, paused_t) = (
            renewed.clone(),
            roster.clone(),
            lists.clone(),
            failsafe_ended.clone(),
            paused.clone(),
        );
        let period = ttl / 4;
        let shared = Arc::new(Mutex::new(client));
        let clients = shared.clone();
        let task = tokio::spawn(async move {
            loop {
                let current = rx.borrow_and_update().clone();
                let client = clients.lock().map(|c| c.clone()).ok();
                if let Some((name, term)) = current
                    && let Some(client) = client
                    && !paused_t.load(std::sync::atomic::Ordering::SeqCst)
                {
                    let replicas = roster_t
                        .lock()
                        .map(|r| failsafe::list(&r.0, &r.1, &name))
                        .unwrap_or_default();
                    if let Ok(mut l) = lists_t.lock() {
                        l.sent(&name, term, &replicas);
                    }
                    let body = json!({ BODY_LEASE: LeaseGrant {
                        holder: name.clone(),
                        term,
                        ttl_ms: ttl.as_millis() as u64,
                        replicas: Some(replicas.clone()),
                    }});
                    match client.action(&name, ACTION_LEASE, body).await {
                        Ok(reply) => {
                            if let Ok(mut l) = lists_t.lock() {
                                l.confirmed(&name, term, &replicas);
                            }
                            if let Some(ms) = reply.get("failsafeKeptMs").and_then(|v| v.as_u64())
                                && let Ok(mut e) = ended_t.lock()
                            {
                                *e = Some((name.clone(), ms));
                            }
                            if let Ok(mut r) = seen.lock() {
                                r.insert(name, Instant::now());
                            }
                        }
                        Err(e) => tracing::debug!(error = %e, "lease renewal failed"),
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(period) => {}
                    changed = rx.changed() => if changed.is_err() { return },
                }
            }
        });
        Self {
            holder,
            client: shared,
            roster,
            lists,
            failsafe_ended,
            paused,
            renewed,
            started: Instant::now(),
            ttl,
            task,
        }
    }

    fn set_roster(&self, endpoints: Vec<PeerEndpoint>, fenced: BTreeSet<String>) {
        if let Ok(mut r) = self.roster.lock() {
            *r = (endpoints, fenced);
        }
    }

    /// The failsafe list a grant to `holder` carries now (the promotion's
    /// grant), noted as sent.
    fn list_for(&self, holder: &str, term: u64) -> Vec<PeerEndpoint> {
        let list = self
            .roster
            .lock()
            .map(|r| failsafe::list(&r.0, &r.1, holder))
            .unwrap_or_default();
        if let Ok(mut l) = self.lists.lock() {
            l.sent(holder, term, &list);
        }
        list
    }

    fn confirmed(&self, holder: &str, term: u64, list: &[PeerEndpoint]) {
        if let Ok(mut l) = self.lists.lock() {
            l.confirmed(holder, term, list);
        }
    }

    /// The replicas in every list `holder` may hold for `term` (`None`:
    /// none sent by this `up`).
    fn in_every_list(&self, holder: &str, term: u64) -> Option<BTreeSet<String>> {
        self.lists.lock().ok()?.in_every_list(holder, term)
    }

    fn take_failsafe_ended(&self) -> Option<(String, u64)> {
        self.failsafe_ended.lock().ok()?.take()
    }

    fn pause(&self, paused: bool) {
        self.paused
            .store(paused, std::sync::atomic::Ordering::SeqCst);
    }

    fn set(&self, holder: Option<(String, u64)>) {
        self.holder.send_if_modified(|cur| {
            if *cur == holder {
                false
            } else {
                *cur = holder;
                true
            }
        });
    }

    fn set_client(&self, client: InstanceClient) {
        if let Ok(mut c) = self.client.lock() {
            *c = client;
        }
    }

    fn note_renewed(&self, name: &str) {
        if let Ok(mut r) = self.renewed.lock() {
            r.insert(name.to_string(), Instant::now());
        }
    }

    /// Whether `name`'s lease has certainly expired: its last renewal (or,
    /// never renewed by this process, the start of this `up`, since a
    /// previous `up` renewed at the latest before it) plus TTL and margin
    /// is past.
    fn expired(&self, name: &str) -> bool {
        let last = self
            .renewed
            .lock()
            .ok()
            .and_then(|r| r.get(name).copied())
            .unwrap_or(self.started)
            .max(self.started);
        Instant::now() > last + self.ttl + LEASE_MARGIN
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The decision loop's memory and its hands on the instance managers.
pub struct Orchestrator {
    engine: Arc<dyn Engine>,
    cluster: ValidatedCluster,
    dir: StateDir,
    token: String,
    cluster_id: String,
    /// Every member's endpoints.
    endpoints: Vec<PeerEndpoint>,
    /// Short timeouts: observation.
    observe: InstanceClient,
    /// Long timeouts: promote, clean stops, follow.
    act: InstanceClient,
    /// A few seconds: fencing a failed primary (a frozen manager must not
    /// hold the failover up).
    quick: InstanceClient,
    /// Half a second: fencing a failed primary whose manager did not
    /// answer the last observation (seen unreachable for
    /// [`UNREACHABLE_GRACE`] already; a frozen one never answers, and
    /// each wait delays the promotion).
    unanswering: InstanceClient,
    lease: LeaseKeeper,
    /// The persisted intent and facts.
    pub ha: HaState,
    failover_delay: Duration,
    primary_down_since: Option<Instant>,
    /// This `up` has seen a ready primary (see [`STARTUP_GRACE`]).
    primary_seen_ready: bool,
    /// When the primary was last seen ready: it is down since then (not
    /// since the first observation that failed, which may itself have
    /// waited seconds for a manager that does not answer). `None` while
    /// it is down on purpose (fenced, restarting in place).
    primary_ready_at: Option<Instant>,
    /// The primary whose replication slots were last ensured, and when
    /// (redone now and then: a removed replica's slot may still have been
    /// in use the first time).
    slots_done_for: Option<(String, Instant)>,
    /// The primary and the streaming replicas it was last told of
    /// ([`ACTION_SYNC_STANDBYS`]).
    sync_told: Option<(String, Vec<String>)>,
    /// The primary this `up` promoted and when (its synchronous standbys
    /// settle first: [`crate::topology::sync_standbys_due`]).
    promoted: Option<(String, Instant)>,
    not_streaming_since: BTreeMap<String, Instant>,
    /// When each instance was last told to follow, and whom.
    last_follow: BTreeMap<String, (Instant, String)>,
    following: Arc<Mutex<BTreeSet<String>>>,
    last_wait: Option<String>,
    /// Instances fenced by the user (`stratum.dev/fencedInstances`).
    fenced: BTreeSet<String>,
    /// Of those, the ones this process has stopped (to unfence when the
    /// annotation no longer names them).
    fenced_done: BTreeSet<String>,
    /// Instances still to restart for a changed configuration (a rolling
    /// restart), in order; replicas go first, the primary last.
    rolling: Vec<String>,
    /// The instance restarting now: its manager's pid before, and since
    /// when.
    rolling_now: Option<(String, Option<u32>, Instant)>,
    /// Restart the primary first in the rolling restart (a lowered
    /// parameter that standbys need at least as high as the primary); the
    /// whole rolling restart long (persisted as `ha.rolling.primaryFirst`).
    primary_first: bool,
    /// The rolling restart was in progress when this `up` started: this
    /// `up` started every manager anew, with the new configuration, so the
    /// remaining instances are only waited for, not restarted again.
    rolling_resumed: Option<Instant>,
    /// The failed primary killed on the host, and the term then: once per
    /// failover (the next ticks may fence the manager `up` started again).
    killed_on_host: Option<(String, u64, bool)>,
    /// The failed primary whose replicas were revoked (failsafe), the term
    /// revoked, and what the replicas answered.
    revoked: Option<(String, u64, RevokeOutcome)>,
    /// The failed primary (and term) that was taken as stopped only
    /// because its lease and the revoked replicas' acknowledgements ran
    /// out (no fence through its manager, no verified kill): only a
    /// revoked replica may replace it.
    failsafe_restricted: Option<(String, u64)>,
    /// The primary's WAL position once it was back from a primary-first
    /// restart: a replica restarts only after replaying past it (its
    /// control file must have seen the primary's lowered value, or it
    /// refuses to start as a standby).
    primary_back_lsn: Option<u64>,
    /// A changed engine block to hand every instance
    /// ([`ACTION_RECONFIGURE`]) on the next healthy tick.
    reconfigure: Option<serde_json::Value>,
    /// The instances the spec asks for.
    desired: Vec<String>,
    /// A resize decided and not yet taken by `up`.
    resize: Option<Resize>,
    /// A scale-down waiting until the removed replicas hold no commit the
    /// kept ones lack.
    drain: Option<Drain>,
}

/// A scale-down's wait before its replicas stop. A commit the primary
/// acknowledged may be on a synchronous standby alone (`FIRST 1 (removed,
/// kept)`: on the removed one); stopping it before the kept replicas have
/// that commit would lose it if the primary failed next. So the primary is
/// first told its synchronous standbys without the removed replicas, then
/// it must report only kept ones as synchronous (`sync`/`quorum`), and the
/// kept synchronous standbys must have received its WAL up to a position
/// read after that (every commit acknowledged before is below it; every
/// later one waits for them).
#[derive(Clone, Debug)]
struct Drain {
    primary: String,
    removed: Vec<String>,
    /// The `synchronous_standby_names` the primary was given without the
    /// removed replicas (empty: asynchronous, nothing to wait for); `None`
    /// until it took them.
    names: Option<String>,
    /// The primary reported only kept replicas as synchronous standbys.
    confirmed: bool,
    /// Its WAL position observed after that.
    goal: Option<u64>,
}

/// How often the primary's replication slots are ensured again.
const SLOTS_EVERY: Duration = Duration::from_secs(10);

/// How long one instance of a rolling restart may take to stream again.
const ROLL_STEP_TIMEOUT: Duration = Duration::from_secs(60);

impl Orchestrator {
    /// An orchestrator resuming from `ha` (as read from `state.json`).
    pub fn new(
        engine: Arc<dyn Engine>,
        cluster: ValidatedCluster,
        dir: StateDir,
        endpoints: Vec<PeerEndpoint>,
        token: String,
        cluster_id: String,
        ha: HaState,
    ) -> Self {
        let ttl = lease_ttl();
        let client = |timeout| {
            InstanceClient::new(
                token.clone(),
                cluster_id.clone(),
                endpoints.clone(),
                timeout,
            )
        };
        let desired = cluster.instance_names();
        let failover_delay = cluster
            .spec
            .get("failoverDelay")
            .and_then(|v| v.as_u64())
            .map(Duration::from_secs)
            .unwrap_or_default();
        let observe = client(Duration::from_secs(1));
        let act = client(Duration::from_secs(90));
        let quick = client(Duration::from_secs(3));
        let unanswering = client(UNANSWERING_FENCE_TIMEOUT);
        let lease = LeaseKeeper::start(client(ttl / 4), endpoints.clone(), ttl);
        let mut ha = ha;
        ha.members = endpoints.iter().map(|e| e.name.clone()).collect();
        let resumed = ha.rolling.take().filter(|r| !r.remaining.is_empty());
        if let Some(r) = &resumed {
            ha.event(
                "RollingRestartResumed",
                format!(
                    "a rolling restart was in progress ({} left{}); every instance was started again by this `up` with the new configuration: {}",
                    r.remaining.join(", "),
                    r.restarting
                        .as_deref()
                        .map(|n| format!(", {n} restarting"))
                        .unwrap_or_default(),
                    if r.primary_first {
                        "once the primary is back, the replicas left restart again one at a time, each after replaying past it (a lowered parameter: until then they keep the value their control file asks for)"
                    } else {
                        "waiting for them to be back"
                    }
                ),
            );
        }
        Self {
            engine,
            cluster,
            dir,
            token,
            cluster_id,
            endpoints,
            observe,
            act,
            quick,
            unanswering,
            lease,
            ha,
            failover_delay,
            primary_down_since: None,
            primary_seen_ready: false,
            primary_ready_at: None,
            slots_done_for: None,
            sync_told: None,
            promoted: None,
            not_streaming_since: BTreeMap::new(),
            last_follow: BTreeMap::new(),
            following: Arc::default(),
            last_wait: None,
            fenced: BTreeSet::new(),
            fenced_done: BTreeSet::new(),
            rolling: resumed
                .as_ref()
                .map(|r| r.remaining.clone())
                .unwrap_or_default(),
            rolling_now: None,
            primary_first: resumed.as_ref().is_some_and(|r| r.primary_first),
            rolling_resumed: resumed.as_ref().map(|_| Instant::now()),
            killed_on_host: None,
            revoked: None,
            failsafe_restricted: None,
            primary_back_lsn: None,
            reconfigure: None,
            desired,
            resize: None,
            drain: None,
        }
    }

    /// The accepted cluster changed (a CR applied to the running `up`);
    /// its instances are the ones to move towards.
    pub fn set_cluster(&mut self, cluster: ValidatedCluster) {
        self.desired = cluster.instance_names();
        self.cluster = cluster;
    }

    /// The resize the last ticks decided, for `up` to carry out (then
    /// [`Orchestrator::set_members`]).
    pub fn take_resize(&mut self) -> Option<Resize> {
        self.resize.take()
    }

    /// The running instances changed (`up` added or removed managers):
    /// observe, act on and fail over among `endpoints` from now on. The
    /// primary's slots and synchronous standbys are chosen again.
    pub fn set_members(&mut self, endpoints: Vec<PeerEndpoint>) {
        let names: Vec<String> = endpoints.iter().map(|e| e.name.clone()).collect();
        let client = |timeout| {
            InstanceClient::new(
                self.token.clone(),
                self.cluster_id.clone(),
                endpoints.clone(),
                timeout,
            )
        };
        self.observe = client(Duration::from_secs(1));
        self.act = client(Duration::from_secs(90));
        self.quick = client(Duration::from_secs(3));
        self.unanswering = client(UNANSWERING_FENCE_TIMEOUT);
        self.lease.set_client(client(self.lease.ttl / 4));
        self.lease
            .set_roster(endpoints.clone(), self.fenced.clone());
        self.endpoints = endpoints;
        self.slots_done_for = None;
        self.sync_told = None;
        self.not_streaming_since.retain(|n, _| names.contains(n));
        self.last_follow.retain(|n, _| names.contains(n));
        self.rolling.retain(|n| names.contains(n));
        if self
            .rolling_now
            .as_ref()
            .is_some_and(|(n, _, _)| !names.contains(n))
        {
            self.rolling_now = None;
        }
        self.ha.sync_standbys.retain(|n| names.contains(n));
        self.ha.members = names;
        self.save();
    }

    fn member_names(&self) -> Vec<String> {
        self.endpoints.iter().map(|e| e.name.clone()).collect()
    }

    /// The members other than `primary`.
    fn replicas_of(&self, primary: &str) -> Vec<String> {
        self.endpoints
            .iter()
            .filter(|e| e.name != primary)
            .map(|e| e.name.clone())
            .collect()
    }

    /// The most advanced ready replica streaming from `primary`, among
    /// `eligible` and not fenced.
    fn switchover_target(
        &self,
        primary: &str,
        members: &[ObservedMember],
        eligible: &[String],
    ) -> Option<String> {
        let primary_port = self.db_port(primary);
        members
            .iter()
            .filter(|m| m.name != primary && !self.fenced.contains(&m.name))
            .filter(|m| eligible.contains(&m.name))
            .filter(|m| {
                m.status.as_ref().is_some_and(|s| {
                    s.ready && streaming_from(s) == primary_port && primary_port.is_some()
                })
            })
            .max_by_key(|m| wal_lsn(Some(m)))
            .map(|m| m.name.clone())
    }

    /// One step towards the spec's instances while `primary` is healthy.
    /// Returns the route when it started a switchover (a primary being
    /// removed moves to a kept replica first).
    async fn scale_step(
        &mut self,
        primary: &str,
        members: &[ObservedMember],
    ) -> Option<Option<String>> {
        let current = self.member_names();
        if self.resize.is_some() || current == self.desired {
            if self.drain.take().is_some() {
                // The spec no longer removes them: choose again with them.
                self.sync_told = None;
            }
            return None;
        }
        let added: Vec<String> = self
            .desired
            .iter()
            .filter(|n| !current.contains(n))
            .cloned()
            .collect();
        let removed: Vec<String> = current
            .iter()
            .filter(|n| !self.desired.contains(n))
            .cloned()
            .collect();
        if !added.is_empty() {
            // Slots first, so that the clones stream through theirs at once.
            let mut replicas = self.replicas_of(primary);
            replicas.extend(added.iter().cloned());
            if let Err(e) = self
                .act
                .action(primary, ACTION_SLOTS, json!({ "replicas": replicas }))
                .await
            {
                self.wait_note(format!(
                    "scaling up: slots for {} not created on {primary} yet: {e}",
                    added.join(", ")
                ));
                return None;
            }
            self.ha.event(
                "ScalingUp",
                format!(
                    "adding {} (cloned from the primary {primary})",
                    added.join(", ")
                ),
            );
            self.resize = Some(Resize::Add(added));
            return None;
        }
        if removed.iter().any(|n| n == primary) {
            let kept: Vec<String> = current
                .iter()
                .filter(|n| !removed.contains(n))
                .cloned()
                .collect();
            let Some(target) = self.switchover_target(primary, members, &kept) else {
                self.wait_note(format!(
                    "scaling down removes the primary {primary}: waiting for a streaming replica among {} to switch over to",
                    kept.join(", ")
                ));
                return None;
            };
            self.ha.step = Step::Switchover {
                from: primary.to_string(),
                to: target.clone(),
            };
            self.ha.target_primary = Some(target.clone());
            self.ha.event(
                "SwitchoverStarted",
                format!("switchover from {primary} to {target} (scaling down removes {primary})"),
            );
            self.save();
            return Some(self.switchover(primary, &target, members).await);
        }
        // The primary stops counting on the removed replicas before they
        // stop, so that commits do not wait for them, and they stop only
        // once no acknowledged commit can be on them alone.
        let kept_replicas: Vec<String> = self
            .replicas_of(primary)
            .into_iter()
            .filter(|n| !removed.contains(n))
            .collect();
        if !self
            .drained(primary, members, &removed, &kept_replicas)
            .await
        {
            return None;
        }
        self.drain = None;
        self.ha.event(
            "ScalingDown",
            format!(
                "removing {} (the primary {primary} no longer waits for them)",
                removed.join(", ")
            ),
        );
        self.resize = Some(Resize::Remove(removed));
        None
    }

    /// Whether the replicas `removed` may stop now (see [`Drain`]): one
    /// step per observation, true once the kept synchronous standbys hold
    /// the primary's WAL past the change (at once in an asynchronous
    /// cluster).
    async fn drained(
        &mut self,
        primary: &str,
        members: &[ObservedMember],
        removed: &[String],
        kept: &[String],
    ) -> bool {
        if !self
            .drain
            .as_ref()
            .is_some_and(|d| d.primary == primary && d.removed == removed)
        {
            self.drain = Some(Drain {
                primary: primary.to_string(),
                removed: removed.to_vec(),
                names: None,
                confirmed: false,
                goal: None,
            });
        }
        let Some(ps) = members
            .iter()
            .find(|m| m.name == primary)
            .and_then(|m| m.status.as_ref())
        else {
            return false;
        };
        let Some(drain) = self.drain.clone() else {
            return false;
        };
        let Some(names) = drain.names else {
            let streaming: Vec<String> = streaming_replicas(ps)
                .into_iter()
                .filter(|n| kept.contains(n))
                .collect();
            let body = json!({ "available": streaming, "replicas": kept });
            match self.act.action(primary, ACTION_SYNC_STANDBYS, body).await {
                Ok(reply) => {
                    let names = reply
                        .get("synchronousStandbyNames")
                        .and_then(|v| v.as_str())
                        .unwrap_or_default()
                        .to_string();
                    if !names.is_empty() {
                        self.ha.event(
                            "SynchronousStandbys",
                            format!(
                                "{primary}: synchronous_standby_names = {names} (scaling down: without {})",
                                removed.join(", ")
                            ),
                        );
                    }
                    // What `tell_sync_standbys` would send now: it leaves
                    // the removed replicas out while this lasts.
                    self.sync_told = Some((primary.to_string(), streaming));
                    if let Some(d) = self.drain.as_mut() {
                        d.names = Some(names);
                    }
                }
                Err(e) => self.wait_note(format!(
                    "scaling down: {primary} not told its synchronous standbys without {} yet: {e}",
                    removed.join(", ")
                )),
            }
            // Look again on an observation made after the reload.
            return false;
        };
        if names.is_empty() {
            return true;
        }
        let sync = sync_standbys(ps);
        let kept_sync: Vec<String> = sync.iter().filter(|n| kept.contains(n)).cloned().collect();
        if sync.iter().any(|n| removed.contains(n)) || kept_sync.is_empty() {
            if let Some(d) = self.drain.as_mut() {
                d.confirmed = false;
                d.goal = None;
            }
            self.wait_note(format!(
                "scaling down: waiting for {primary} to report synchronous standbys among {} only (it reports {}) before {} stop",
                kept.join(", "),
                if sync.is_empty() {
                    "none".to_string()
                } else {
                    sync.join(", ")
                },
                removed.join(", ")
            ));
            return false;
        }
        if !drain.confirmed {
            if let Some(d) = self.drain.as_mut() {
                d.confirmed = true;
            }
            // This observation may have read the primary's position before
            // the new standbys took effect: take the next one's.
            return false;
        }
        let Some(goal) = drain.goal else {
            let goal = wal_lsn(members.iter().find(|m| m.name == primary));
            if let Some(g) = goal {
                self.ha.event(
                    "SynchronousStandbysMoved",
                    format!(
                        "{primary} waits for {} only; {} stop once {} received its WAL up to {}",
                        kept_sync.join(", "),
                        removed.join(", "),
                        if kept_sync.len() == 1 { "it" } else { "they" },
                        format_lsn(g)
                    ),
                );
            }
            if let Some(d) = self.drain.as_mut() {
                d.goal = goal;
            }
            return false;
        };
        let behind: Vec<String> = kept_sync
            .iter()
            .filter(|n| wal_lsn(members.iter().find(|m| m.name == **n)).is_none_or(|r| r < goal))
            .cloned()
            .collect();
        if !behind.is_empty() {
            self.wait_note(format!(
                "scaling down: waiting for {} to receive {primary}'s WAL up to {} before {} stop",
                behind.join(", "),
                format_lsn(goal),
                removed.join(", ")
            ));
            return false;
        }
        true
    }

    /// Restart `names` one at a time so that they take their rewritten
    /// configuration: replicas first, each streaming again before the
    /// next, the primary last (`primaryUpdateMethod`: `switchover` moves
    /// the primary to an updated replica first, `restart` restarts it in
    /// place; `primaryUpdateStrategy: supervised` waits for `stratum local
    /// promote`).
    ///
    /// With `primary_first` the primary restarts in place before the
    /// replicas (a lowered hot-standby parameter: a standby may not run
    /// with less than its primary, so the primary lowers first).
    pub fn roll(&mut self, names: &[String], primary_first: bool) {
        self.rolling = names.to_vec();
        self.rolling_now = None;
        self.rolling_resumed = None;
        self.primary_first = primary_first;
        self.primary_back_lsn = None;
        self.ha.event(
            "RollingRestart",
            format!(
                "restarting {} one at a time{}",
                names.join(", "),
                if primary_first {
                    " (the primary first, in place: a parameter standbys need at least as high as the primary is lowered)"
                } else {
                    ""
                }
            ),
        );
        self.note_rolling();
        self.save();
    }

    /// The instances' configuration changed (`engine`: the new engine
    /// block, already in every `instance.json`): on the next healthy tick
    /// every instance takes it without a restart where it can
    /// ([`ACTION_RECONFIGURE`]); those that still need one roll.
    pub fn reconfigure(&mut self, engine: serde_json::Value) {
        self.reconfigure = Some(engine);
    }

    /// Hand the changed engine block to every running instance; roll the
    /// ones that need a restart (or did not take it).
    async fn reconfigure_all(&mut self, primary: &str, engine: serde_json::Value) {
        let names = self.member_names();
        let body = json!({ "engine": engine });
        let replies = futures::future::join_all(
            names
                .iter()
                .map(|n| self.act.action(n, ACTION_RECONFIGURE, body.clone())),
        )
        .await;
        let mut restart = Vec::new();
        let mut reloaded = Vec::new();
        let mut primary_first = false;
        for (name, reply) in names.iter().zip(replies) {
            match reply {
                Ok(r) => {
                    if r.get("restart").and_then(|v| v.as_bool()) == Some(true) {
                        restart.push(name.clone());
                    } else {
                        reloaded.push(name.clone());
                    }
                    primary_first |= r.get("primaryFirst").and_then(|v| v.as_bool()) == Some(true);
                }
                Err(e) => {
                    // No such action, or unreachable: a restart reads the
                    // rewritten instance.json.
                    tracing::info!(instance = %name, error = %e, "not reconfigured in place; restarting it");
                    restart.push(name.clone());
                }
            }
        }
        self.ha.event(
            "Reconfigured",
            format!(
                "new configuration reloaded on {}; restart needed on {}",
                if reloaded.is_empty() {
                    "none".to_string()
                } else {
                    reloaded.join(", ")
                },
                if restart.is_empty() {
                    "none".to_string()
                } else {
                    restart.join(", ")
                },
            ),
        );
        if !restart.is_empty() {
            self.roll(
                &restart,
                primary_first && restart.iter().any(|n| n == primary),
            );
        }
    }

    fn manager_pid(&self, name: &str) -> Option<u32> {
        state::read_state(&self.dir)
            .ok()
            .flatten()
            .and_then(|s| s.managers.get(name).copied())
    }

    /// Stop `name`'s manager (it stops its server cleanly); `up` starts it
    /// again with the rewritten configuration.
    fn restart_manager(&mut self, name: &str, why: &str) {
        let pid = self.manager_pid(name);
        self.ha
            .event("Restarting", format!("{name} restarting: {why}"));
        self.rolling_now = Some((name.to_string(), pid, Instant::now()));
        // Persisted before the restart, like every other step.
        self.note_rolling();
        self.save();
        if let Some(pid) = pid {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }

    /// Mirror the rolling restart into `ha.rolling` (persisted).
    fn note_rolling(&mut self) {
        let restarting = self.rolling_now.as_ref().map(|(n, _, _)| n.clone());
        self.ha.rolling =
            (!self.rolling.is_empty() || restarting.is_some()).then(|| RollingState {
                remaining: self.rolling.clone(),
                restarting,
                primary_first: self.primary_first,
            });
    }

    /// The rolling restart is over: every instance runs the new
    /// configuration.
    fn roll_done(&mut self) {
        self.primary_first = false;
        self.primary_back_lsn = None;
        self.ha.event(
            "RollingRestartDone",
            "every instance runs with the new configuration",
        );
    }

    /// The rolling restart a restarted `up` found: every remaining
    /// instance was restarted by it; each counts once back (ready; a
    /// replica streaming from the primary).
    ///
    /// A primary-first one (a lowered hot-standby parameter) is different:
    /// a replica this `up` started before it replayed the primary's
    /// announcement of the lower value keeps the value its control file
    /// asks for (the driver raises it: PostgreSQL refuses to start a
    /// standby below it), so once the primary is back the replicas still
    /// to restart are restarted again, one at a time, each after it
    /// replayed past the primary's position then (the normal
    /// [`Orchestrator::roll_step`] path).
    fn resumed_roll_step(&mut self, primary: &str, members: &[ObservedMember], since: Instant) {
        if self.primary_first {
            // Called on a healthy primary only: it runs what this `up`
            // started it with, the new configuration.
            self.rolling.retain(|n| n != primary);
            self.rolling_resumed = None;
            self.primary_back_lsn = wal_lsn(members.iter().find(|m| m.name == primary));
            self.ha.event(
                "Restarted",
                format!(
                    "{primary} runs with the new configuration (started again by this `up`, primary first)"
                ),
            );
            if self.rolling.is_empty() {
                self.roll_done();
            }
            return;
        }
        let primary_port = self.db_port(primary);
        let back: Vec<String> = self
            .rolling
            .iter()
            .filter(|name| {
                members.iter().any(|m| {
                    m.name == **name
                        && m.status.as_ref().is_some_and(|s| {
                            s.ready
                                && if *name == primary {
                                    s.role == Role::Primary
                                } else {
                                    primary_port.is_some() && streaming_from(s) == primary_port
                                }
                        })
                })
            })
            .cloned()
            .collect();
        for name in back {
            self.rolling.retain(|n| *n != name);
            self.ha.event(
                "Restarted",
                format!("{name} runs with the new configuration (started again by this `up`)"),
            );
        }
        if self.rolling.is_empty() {
            self.rolling_resumed = None;
            self.roll_done();
        } else if since.elapsed() > ROLL_STEP_TIMEOUT {
            self.ha.event(
                "RollingRestartStopped",
                format!(
                    "{} not back within {}s with the new configuration",
                    self.rolling.join(", "),
                    ROLL_STEP_TIMEOUT.as_secs()
                ),
            );
            self.rolling.clear();
            self.rolling_resumed = None;
            self.primary_first = false;
        }
    }

    /// One step of a rolling restart while `primary` is healthy. Returns
    /// the route when it started a switchover (which takes the tick).
    async fn roll_step(
        &mut self,
        primary: &str,
        members: &[ObservedMember],
    ) -> Option<Option<String>> {
        if let Some(since) = self.rolling_resumed {
            self.resumed_roll_step(primary, members, since);
            return None;
        }
        let primary_port = self.db_port(primary);
        if let Some((name, old_pid, since)) = self.rolling_now.clone() {
            let restarted = self.manager_pid(&name).is_some_and(|p| Some(p) != old_pid);
            let back = members.iter().any(|m| {
                m.name == name
                    && m.status.as_ref().is_some_and(|s| {
                        s.ready
                            && if name == primary {
                                s.role == Role::Primary
                            } else {
                                streaming_from(s) == primary_port && primary_port.is_some()
                            }
                    })
            });
            if restarted && back {
                self.rolling.retain(|n| *n != name);
                self.rolling_now = None;
                if name == primary && self.primary_first {
                    self.primary_back_lsn = wal_lsn(members.iter().find(|m| m.name == primary));
                }
                self.ha.event(
                    "Restarted",
                    format!("{name} runs with the new configuration"),
                );
                if self.rolling.is_empty() {
                    self.roll_done();
                }
            } else if since.elapsed() > ROLL_STEP_TIMEOUT {
                // Do not take more instances down with a configuration the
                // first one could not run with (e.g. a lowered
                // max_connections: a standby needs at least the primary's).
                self.ha.event(
                    "RollingRestartStopped",
                    format!(
                        "{name} did not stream again within {}s with the new configuration; the others were left alone ({})",
                        ROLL_STEP_TIMEOUT.as_secs(),
                        self.rolling
                            .iter()
                            .filter(|n| **n != name)
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                );
                self.rolling.clear();
                self.rolling_now = None;
                self.primary_first = false;
            }
            return None;
        }
        let fenced = self.fenced.clone();
        self.rolling.retain(|n| !fenced.contains(n));
        if self.primary_first && self.rolling.iter().any(|n| n == primary) {
            self.restart_manager(primary, "new configuration (primary first, in place)");
            return None;
        }
        if let Some(next) = self.rolling.iter().find(|n| *n != primary).cloned() {
            if let Some(lsn) = self.primary_back_lsn {
                let replayed = members.iter().any(|m| {
                    m.name == next
                        && m.status.as_ref().is_some_and(|s| {
                            s.ready
                                && streaming_from(s) == primary_port
                                && matches!(s.position, Position::Wal { replayed_lsn: Some(r), .. } if r >= lsn)
                        })
                });
                if !replayed {
                    self.wait_note(format!(
                        "{next} restarts once it has replayed the restarted primary's WAL (a standby must have seen the lowered value before it runs with it)"
                    ));
                    return None;
                }
            }
            self.restart_manager(&next, "new configuration (replica)");
            return None;
        }
        if !self.rolling.iter().any(|n| n == primary) {
            // Only fenced instances were left.
            self.rolling.clear();
            self.primary_first = false;
            self.ha.event(
                "RollingRestartDone",
                "every instance that runs has the new configuration",
            );
            return None;
        }
        let spec = &self.cluster.spec;
        if spec.get("primaryUpdateStrategy").and_then(|v| v.as_str()) == Some("supervised") {
            self.wait_note(format!(
                "the primary {primary} runs the old configuration: waiting for a switchover (`stratum local promote`), primaryUpdateStrategy is supervised"
            ));
            return None;
        }
        if spec.get("primaryUpdateMethod").and_then(|v| v.as_str()) == Some("restart") {
            self.restart_manager(primary, "new configuration (primary, in place)");
            return None;
        }
        // Switch over to the most advanced replica streaming from it; the
        // old primary is then restarted as a replica.
        let target = self.switchover_target(primary, members, &self.member_names());
        let Some(target) = target else {
            self.wait_note(format!(
                "the primary {primary} runs the old configuration: waiting for a streaming replica to switch over to"
            ));
            return None;
        };
        self.ha.step = Step::Switchover {
            from: primary.to_string(),
            to: target.clone(),
        };
        self.ha.target_primary = Some(target.clone());
        self.ha.event(
            "SwitchoverStarted",
            format!("switchover from {primary} to {target} (rolling restart)"),
        );
        self.save();
        Some(self.switchover(primary, &target, members).await)
    }

    /// The instances the user fences now (from the CR's annotation): they
    /// are stopped, not elected, not told to follow, until unfenced.
    pub fn set_fenced(&mut self, fenced: BTreeSet<String>) {
        if fenced != self.fenced {
            self.ha.event(
                "FencingChanged",
                format!(
                    "fenced by the user: {}",
                    if fenced.is_empty() {
                        "none".to_string()
                    } else {
                        fenced.iter().cloned().collect::<Vec<_>>().join(", ")
                    }
                ),
            );
        }
        self.lease
            .set_roster(self.endpoints.clone(), fenced.clone());
        self.fenced = fenced;
    }

    /// Stop the user-fenced instances that still run; unfence those no
    /// longer named. Whether it changed anything.
    async fn apply_fencing(&mut self, members: &[ObservedMember]) -> bool {
        let mut changed = false;
        for m in members {
            let Some(s) = m.status.as_ref() else { continue };
            if self.fenced.contains(&m.name) {
                if !s.fenced || !self.fenced_done.contains(&m.name) {
                    match self.quick.action(&m.name, ACTION_FENCE, json!({})).await {
                        Ok(_) => {
                            changed |= !s.fenced;
                            if self.fenced_done.insert(m.name.clone()) {
                                self.ha.event(
                                    "Fenced",
                                    format!("{} stopped: fenced by the user", m.name),
                                );
                            }
                        }
                        Err(e) => tracing::warn!(instance = %m.name, error = %e, "fence failed"),
                    }
                }
            } else if self.fenced_done.contains(&m.name) {
                match self.quick.action(&m.name, ACTION_UNFENCE, json!({})).await {
                    Ok(_) => {
                        changed = true;
                        self.fenced_done.remove(&m.name);
                        self.ha
                            .event("Unfenced", format!("{} unfenced by the user", m.name));
                    }
                    Err(e) => tracing::warn!(instance = %m.name, error = %e, "unfence failed"),
                }
            }
        }
        changed
    }

    /// Persist the intent now (before acting on it).
    fn save(&self) {
        let result = state::read_state(&self.dir).and_then(|s| {
            let mut s = s.unwrap_or_default();
            s.ha = self.ha.clone();
            state::write_state(&self.dir, &s)
        });
        if let Err(e) = result {
            tracing::warn!(
                error = format!("{e:#}"),
                "failed to persist the failover intent"
            );
        }
    }

    fn db_port(&self, name: &str) -> Option<u16> {
        self.endpoints
            .iter()
            .find(|e| e.name == name)
            .map(|e| e.db_port)
    }

    /// One tick: act on the observation and return the member `rw` routes
    /// to (`None`: writes go nowhere, open `rw` connections are closed).
    pub async fn tick(
        &mut self,
        members: &[ObservedMember],
        request: Option<SwitchoverRequest>,
    ) -> Option<String> {
        let route = self.tick_inner(members, request).await;
        self.note_rolling();
        route
    }

    async fn tick_inner(
        &mut self,
        members: &[ObservedMember],
        request: Option<SwitchoverRequest>,
    ) -> Option<String> {
        if let Some((name, ms)) = self.lease.take_failsafe_ended() {
            self.ha.event(
                "FailsafeEnded",
                format!(
                    "primary {name} kept writes on failsafe for {:.1} s while the operator was away",
                    ms as f64 / 1000.0
                ),
            );
            self.save();
        }
        if (!self.fenced.is_empty() || !self.fenced_done.is_empty())
            && self.apply_fencing(members).await
        {
            // A primary just fenced or unfenced is down on purpose: its down
            // time counts from the next observation.
            self.primary_ready_at = None;
            // This observation predates the (un)fencing: decide on the
            // next one, keeping writes where they are if they can go.
            let primary = self.ha.current_primary.clone()?;
            let ok = members
                .iter()
                .any(|m| m.name == primary && m.role() == Role::Primary && m.ready());
            return (ok && matches!(self.ha.step, Step::Idle) && !self.fenced.contains(&primary))
                .then_some(primary);
        }
        match self.ha.step.clone() {
            Step::Idle => self.idle(members, request).await,
            Step::Failover { from } => {
                let unanswering = members
                    .iter()
                    .find(|m| m.name == from)
                    .is_none_or(|m| m.status.is_none());
                self.failover(&from, unanswering).await
            }
            Step::Switchover { from, to } => self.switchover(&from, &to, members).await,
        }
    }

    async fn idle(
        &mut self,
        members: &[ObservedMember],
        request: Option<SwitchoverRequest>,
    ) -> Option<String> {
        let primary = match self.ha.current_primary.clone() {
            Some(p) => p,
            None => {
                // First start (or a state file from before failover
                // existed): adopt the one ready primary, else the member
                // waiting for its lease (it was the primary).
                let adopt = match self.engine.elect(&self.cluster, members) {
                    Election::Keep { primary } => Some(primary),
                    _ => members
                        .iter()
                        .find(|m| m.status.as_ref().is_some_and(|s| s.awaiting_lease))
                        .map(|m| m.name.clone()),
                };
                let p = adopt?;
                self.ha.current_primary = Some(p.clone());
                self.ha.target_primary = Some(p.clone());
                self.ha
                    .event("PrimaryAdopted", format!("{p} is the primary"));
                self.save();
                p
            }
        };
        self.lease.set(Some((primary.clone(), self.ha.term)));
        let pm = members.iter().find(|m| m.name == primary);
        let status = pm.and_then(|m| m.status.as_ref());

        // Split-brain guard: nobody else may run as a writer.
        for m in members {
            if m.name != primary && m.role() == Role::Primary {
                self.ha.event(
                    "Fencing",
                    format!(
                        "{} reports itself primary while {primary} is; fencing it",
                        m.name
                    ),
                );
                if let Err(e) = self.act.action(&m.name, ACTION_FENCE, json!({})).await {
                    tracing::warn!(instance = %m.name, error = %e, "fence failed");
                }
            }
        }

        let healthy = status.is_some_and(|s| s.role == Role::Primary && s.ready);
        if healthy {
            self.primary_down_since = None;
            self.primary_seen_ready = true;
            self.primary_ready_at = Some(Instant::now());
            if let Some(s) = status {
                for name in sync_standbys(s) {
                    if !self.ha.sync_standbys.contains(&name) {
                        self.ha.sync_standbys.push(name);
                        self.ha.sync_standbys.sort();
                    }
                }
            }
            if let Some(Position::Wal { timeline, .. }) = status.map(|s| &s.position)
                && self.ha.timeline != Some(*timeline)
            {
                self.ha.timeline = Some(*timeline);
            }
            if !self
                .slots_done_for
                .as_ref()
                .is_some_and(|(p, at)| *p == primary && at.elapsed() < SLOTS_EVERY)
            {
                let replicas = self.replicas_of(&primary);
                // Quick: a primary whose manager froze after this tick's
                // observation must not hold the decision loop (and so its
                // failover) up for the long timeout.
                match self
                    .quick
                    .action(&primary, ACTION_SLOTS, json!({ "replicas": replicas }))
                    .await
                {
                    Ok(_) => self.slots_done_for = Some((primary.clone(), Instant::now())),
                    Err(e) => tracing::warn!(error = %e, "replication slots not ensured yet"),
                }
            }
            if let Some(s) = status {
                self.tell_sync_standbys(&primary, streaming_replicas(s))
                    .await;
            }
            if let Some(req) = request {
                match switchover_refusal(&req.target, &self.member_names(), Some(&primary), members)
                {
                    Some(why) => self.ha.event(
                        "SwitchoverRefused",
                        format!("switchover to {}: {why}", req.target),
                    ),
                    None => {
                        self.ha.step = Step::Switchover {
                            from: primary.clone(),
                            to: req.target.clone(),
                        };
                        self.ha.target_primary = Some(req.target.clone());
                        self.ha.event(
                            "SwitchoverStarted",
                            format!("switchover from {primary} to {}", req.target),
                        );
                        self.save();
                        return self.switchover(&primary, &req.target, members).await;
                    }
                }
            }
            self.converge(&primary, members);
            if let Some(route) = self.scale_step(&primary, members).await {
                return route;
            }
            if let Some(engine) = self.reconfigure.take() {
                self.reconfigure_all(&primary, engine).await;
            }
            if (!self.rolling.is_empty() || self.rolling_now.is_some())
                && let Some(route) = self.roll_step(&primary, members).await
            {
                return route;
            }
            return Some(primary);
        }
        if let Some(req) = request {
            self.ha.event(
                "SwitchoverRefused",
                format!(
                    "switchover to {}: the primary {primary} is not ready",
                    req.target
                ),
            );
        }

        if self.fenced.contains(&primary)
            && self.endpoints.iter().all(|e| self.fenced.contains(&e.name))
        {
            // Every instance fenced: nothing to fail over to. Once
            // unfenced, the primary's down time counts from then.
            self.primary_ready_at = None;
            self.wait_note(format!(
                "every instance is fenced; {primary} stays the primary, stopped"
            ));
            return None;
        }
        if let Some((name, _, started)) = &self.rolling_now
            && *name == primary
            && started.elapsed() < ROLL_STEP_TIMEOUT
        {
            // Restarted in place on purpose (primaryUpdateMethod: restart):
            // no writes meanwhile, and no failover unless it does not come
            // back.
            self.primary_ready_at = None;
            self.wait_note(format!("{primary} restarting in place"));
            return None;
        }
        let ready_at = self.primary_ready_at;
        // A second look before a failover unless the server is down for
        // sure: the first one only starts the clock (backdated to when the
        // primary was last seen ready).
        let first_look = self.primary_down_since.is_none();
        let since = *self
            .primary_down_since
            .get_or_insert_with(|| ready_at.unwrap_or_else(Instant::now));
        let grace = failure_grace(status, self.primary_seen_ready);
        if (!first_look || grace.is_zero())
            && since.elapsed() >= self.failover_delay + grace
            && members.len() > 1
        {
            let why = match (pm, status) {
                (Some(m), None) => format!(
                    "instance manager unreachable ({})",
                    m.error.clone().unwrap_or_default()
                ),
                (_, Some(s)) => s
                    .message
                    .as_deref()
                    .map(|m| m.split("; last output").next().unwrap_or(m).to_string())
                    .unwrap_or_else(|| format!("{:?}", s.process)),
                _ => "not observed".into(),
            };
            self.lease.set(None);
            self.ha.step = Step::Failover {
                from: primary.clone(),
            };
            self.ha.target_primary = None;
            self.ha.event(
                "FailoverStarted",
                format!(
                    "primary {primary} failed after {}ms: {why}; writes stopped",
                    since.elapsed().as_millis()
                ),
            );
            self.save();
            // A manager that does not answer: its server may still run,
            // and `rw` must stop reaching it now, not after the fence has
            // waited for that manager (routes change when a tick returns).
            // The failover goes on from the next tick (it waits for the
            // lease to expire anyway).
            status?;
            return self.failover(&primary, false).await;
        }
        Some(primary)
    }

    /// Make sure `from` cannot accept writes: fenced through its manager,
    /// killed on the host (its server seen gone), or its lease certainly
    /// expired. Returns how, or `None` (wait). `unanswering`: its manager
    /// did not answer the last observation, so the fence request gets
    /// [`UNANSWERING_FENCE_TIMEOUT`] instead of seconds.
    async fn neutralise(&mut self, from: &str, unanswering: bool) -> Option<String> {
        let client = if unanswering {
            &self.unanswering
        } else {
            &self.quick
        };
        match client.action(from, ACTION_FENCE, json!({})).await {
            Ok(_) => {
                // Fenced: its manager extends nothing any more.
                self.failsafe_restricted = None;
                Some(format!("{from} fenced (server stopped)"))
            }
            Err(e) => {
                // Its manager may be frozen (SIGSTOP) with its server still
                // running and writable to clients that connect to its port
                // directly: this process is the host, so it kills both
                // before anything is promoted, and at once: once the server
                // is seen gone (and the fence marker keeps a restarted
                // manager from starting it), the lease need not expire.
                //
                // Its manager may also keep the lease on failsafe while it
                // reaches every replica: the replicas are revoked first
                // (no more acknowledgements for its term), and without a
                // verified kill the wait covers their last one too.
                let revoke = self.revoke(from, false).await;
                let (killed, server_gone) = self.kill_on_host(from).await;
                if server_gone {
                    self.failsafe_restricted = None;
                    Some(format!("{from} unreachable ({e}); {killed}"))
                } else if self.lease.expired(from)
                    && revoke.grants_expired(Instant::now(), LEASE_MARGIN)
                {
                    self.failsafe_restricted = Some((from.to_string(), self.ha.term));
                    Some(format!(
                        "{from} unreachable ({e}); its write lease and its replicas' failsafe acknowledgements have expired; {killed}"
                    ))
                } else {
                    self.wait_note(format!(
                        "waiting for the write lease of unreachable {from} and its replicas' failsafe acknowledgements to expire"
                    ));
                    None
                }
            }
        }
    }

    /// Kill `name`'s instance manager (its process group, so that a
    /// frozen one cannot restart or keep its server when thawed; `up`
    /// starts a new one, which finds its lease expired and waits) and the
    /// server it started, which runs in a process group of its own: found
    /// through the engine's pid file and checked to be that server (its
    /// working directory is the pid file's directory). Waits up to 5 s for
    /// the server to be gone. Returns what was done, for the event.
    async fn kill_on_host(&mut self, name: &str) -> (String, bool) {
        use nix::sys::signal::{Signal, killpg};
        use nix::unistd::Pid;
        if let Some((n, term, gone)) = &self.killed_on_host
            && n == name
            && *term == self.ha.term
        {
            return ("killed on the host already".into(), *gone);
        }
        let mut done = Vec::new();
        // The fence marker first: the manager `up` starts again after the
        // kill must keep the server down even while the lease it persisted
        // is still valid (it rejoins as a replica when told to follow).
        let marker = self
            .dir
            .instance_paths(name, &[])
            .run_dir
            .join(crate::instance::manager::FENCE_MARKER);
        let marked = match std::fs::write(
            &marker,
            format!(
                "fenced on the host by `stratum local up` at {}\n",
                chrono::Utc::now().to_rfc3339()
            ),
        ) {
            Ok(()) => true,
            Err(e) => {
                done.push(format!("fence marker not written ({e})"));
                false
            }
        };
        let mut manager_gone = true;
        // Only the process that runs this instance's manager (not a pid
        // reused since state.json was written).
        let config = self.dir.instance_config_file(name);
        if let Some(pid) = self
            .manager_pid(name)
            .filter(|p| super::down::is_our_manager(*p, &config))
        {
            match killpg(Pid::from_raw(pid as i32), Signal::SIGKILL) {
                Ok(()) => done.push(format!("its instance manager (pid {pid}) killed")),
                Err(e) => {
                    manager_gone = false;
                    done.push(format!("its instance manager (pid {pid}) not killed: {e}"))
                }
            }
        }
        let mut server_gone = false;
        let data_dir = self.dir.instance_paths(name, &[]).data_dir;
        let pid_file = self
            .engine
            .instance_driver()
            .and_then(|d| d.server_pid_file(&data_dir));
        if let Some(pid_file) = pid_file {
            match server_pid(&pid_file) {
                Some(pid) => {
                    // The server leads its own process group (its
                    // backends are in it too); a plain kill when not.
                    let group = nix::unistd::getpgid(Some(Pid::from_raw(pid)))
                        .is_ok_and(|g| g.as_raw() == pid);
                    let sent = if group {
                        killpg(Pid::from_raw(pid), Signal::SIGKILL)
                    } else {
                        nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL)
                    };
                    let deadline = Instant::now() + Duration::from_secs(5);
                    while server_pid(&pid_file) == Some(pid) && Instant::now() < deadline {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    match sent {
                        Ok(()) if server_pid(&pid_file) != Some(pid) => {
                            server_gone = true;
                            done.push(format!("its server (pid {pid}) killed"))
                        }
                        Ok(()) => {
                            done.push(format!("its server (pid {pid}) still runs after SIGKILL"))
                        }
                        Err(e) => done.push(format!("its server (pid {pid}) not killed: {e}")),
                    }
                }
                None => done.push("no server of it runs".into()),
            }
        }
        let text = if done.is_empty() {
            "nothing of it found to kill on this host".to_string()
        } else {
            done.join(", ")
        };
        self.ha.event("KilledOnHost", format!("{name}: {text}"));
        // Verified: its server was running and is gone, its manager is gone
        // and cannot start it again. Anything less (no server found: it may
        // have been starting) waits for the lease.
        let gone = server_gone && manager_gone && marked;
        self.killed_on_host = Some((name.to_string(), self.ha.term, gone));
        (text, gone)
    }

    /// Revoke failsafe acknowledgements for the failed primary `from`'s
    /// term on every other member (once per failover, again while none
    /// confirmed). Event `FailsafeRevoked`.
    async fn revoke(&mut self, from: &str, again: bool) -> RevokeOutcome {
        let term = self.ha.term;
        let before = self
            .revoked
            .as_ref()
            .filter(|(f, t, _)| f == from && *t == term)
            .map(|(_, _, out)| out.clone());
        if let Some(out) = &before
            && !out.revoked.is_empty()
            && !again
        {
            return out.clone();
        }
        let others = self.replicas_of(from);
        let body = serde_json::to_value(RevokeRequest { term }).unwrap_or_default();
        let results = futures::future::join_all(
            others
                .iter()
                .map(|n| self.quick.action(n, ACTION_REVOKE, body.clone())),
        )
        .await;
        let now = Instant::now();
        let replies: Vec<(String, Result<RevokeReply, String>)> = others
            .into_iter()
            .zip(results)
            .map(|(n, r)| {
                let reply = r.map_err(|e| e.to_string()).and_then(|v| {
                    serde_json::from_value::<RevokeReply>(v).map_err(|e| e.to_string())
                });
                (n, reply)
            })
            .collect();
        let mut out = RevokeOutcome::from_replies(term, &replies, now);
        if let Some(b) = before {
            out = b.merged(out);
        }
        self.ha.event(
            "FailsafeRevoked",
            format!(
                "failsafe acknowledgements for {from} (term {term}) revoked on: {}; {}",
                if out.revoked.is_empty() {
                    "none".to_string()
                } else {
                    out.revoked.iter().cloned().collect::<Vec<_>>().join(", ")
                },
                match out.granted_until {
                    Some(u) => format!(
                        "the last one they gave ends in {} ms",
                        u.saturating_duration_since(now).as_millis()
                    ),
                    None => "none of them holds a valid one".into(),
                }
            ),
        );
        self.revoked = Some((from.to_string(), term, out.clone()));
        out
    }

    /// Whether `name` may be promoted in place of `from` as far as
    /// failsafe goes: when `from`'s replicas were revoked (its manager did
    /// not answer), only a revoked replica that was in every list `from`
    /// may hold ([`failsafe::may_promote`]).
    fn failsafe_allows(&self, from: &str, name: &str) -> bool {
        match (&self.revoked, &self.failsafe_restricted) {
            (Some((f, term, out)), Some((rf, rt))) if f == from && rf == from && term == rt => {
                failsafe::may_promote(name, out, self.lease.in_every_list(from, *term).as_ref())
            }
            _ => true,
        }
    }

    /// Pause or resume the decision loop's hold on the instances: while
    /// paused, no lease renewals (the operator is away; see
    /// [`PAUSE_FILE`]).
    pub fn pause(&mut self, paused: bool) {
        self.lease.pause(paused);
    }

    fn wait_note(&mut self, why: String) {
        if self.last_wait.as_deref() != Some(why.as_str()) {
            self.ha.event("Waiting", why.clone());
            self.last_wait = Some(why);
        }
    }

    async fn failover(&mut self, from: &str, unanswering: bool) -> Option<String> {
        self.lease.set(None);
        let started = Instant::now();
        let fenced = self.neutralise(from, unanswering).await?;
        if self.ha.target_primary.is_none() && fenced.contains("unreachable") {
            // The old primary may still run: cut its replicas off first, so
            // that it cannot have a commit acknowledged (synchronous mode)
            // and nothing more reaches them before their positions are
            // compared.
            let others: Vec<String> = self
                .endpoints
                .iter()
                .map(|e| e.name.clone())
                .filter(|n| n != from)
                .collect();
            let detach = others.iter().map(|name| {
                self.quick
                    .action(name, ACTION_FOLLOW, json!({ "primary": null }))
            });
            let results = futures::future::join_all(detach).await;
            let detached = others
                .iter()
                .zip(&results)
                .filter(|(_, r)| r.is_ok())
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>()
                .join(", ");
            self.ha.event(
                "ReplicasDetached",
                format!("replicas detached from {from}: {detached}"),
            );
        }
        let mut members = self.observe.observe_all().await;
        // A fenced instance is not elected.
        members.retain(|m| m.name == from || !self.fenced.contains(&m.name));
        if !self.ha.sync_standbys.is_empty() {
            // Only the synchronous standbys of the failed primary can hold
            // its acknowledged commits; the others (a member still
            // rewinding, one that never streamed from it) neither block
            // nor win the election, and follow the winner afterwards.
            members.retain(|m| m.name == from || self.ha.sync_standbys.contains(&m.name));
        }
        let candidate = match self.ha.target_primary.clone() {
            Some(t) => t,
            None => match self.engine.elect(&self.cluster, &members) {
                // The most advanced replica may still acknowledge the old
                // primary's failsafe requests: revoke again; never a less
                // advanced one instead (it may lack acknowledged commits).
                Election::Promote { candidate, .. }
                    if !self.failsafe_allows(from, &candidate) && {
                        self.revoke(from, true).await;
                        !self.failsafe_allows(from, &candidate)
                    } =>
                {
                    self.wait_note(format!(
                        "failover from {from}: {candidate} may still acknowledge its failsafe requests (not revoked, or not in every list it may hold)"
                    ));
                    return None;
                }
                Election::Promote { candidate, reason } => {
                    self.ha.target_primary = Some(candidate.clone());
                    self.ha.event(
                        "FailoverCandidate",
                        format!("{fenced}; promoting {candidate} ({reason})"),
                    );
                    self.save();
                    candidate
                }
                Election::Keep { primary } if primary != from => {
                    // Promoted before a restart of `up`: adopt it.
                    self.ha.target_primary = Some(primary.clone());
                    primary
                }
                other => {
                    self.wait_note(format!(
                        "failover from {from}: {}",
                        super::status::describe_election(&other)
                    ));
                    return None;
                }
            },
        };
        self.promote(&candidate, from, started).await
    }

    /// Promote `candidate` with a fresh lease of a new term; on success it
    /// is the current primary and the others are told to follow it.
    async fn promote(&mut self, candidate: &str, from: &str, started: Instant) -> Option<String> {
        let term = self.ha.term + 1;
        self.ha.term = term;
        self.save();
        let list = self.lease.list_for(candidate, term);
        let body = json!({
            BODY_LEASE: LeaseGrant {
                holder: candidate.to_string(),
                term,
                ttl_ms: self.lease.ttl.as_millis() as u64,
                replicas: Some(list.clone()),
            },
            "replicas": self.replicas_of(candidate),
        });
        match self.act.action(candidate, ACTION_PROMOTE, body).await {
            Ok(reply) => {
                self.lease.note_renewed(candidate);
                self.lease.confirmed(candidate, term, &list);
                self.lease.set(Some((candidate.to_string(), term)));
                let timeline = reply
                    .get("timeline")
                    .and_then(|t| t.as_u64())
                    .map(|t| t as u32);
                self.ha.timeline = timeline.or(self.ha.timeline);
                self.ha.current_primary = Some(candidate.to_string());
                self.ha.target_primary = Some(candidate.to_string());
                self.ha.step = Step::Idle;
                self.ha.sync_standbys.clear();
                self.ha.event(
                    "Promoted",
                    format!(
                        "{candidate} promoted (timeline {}, term {term}) in {}ms; rw moved to it",
                        timeline
                            .map(|t| t.to_string())
                            .unwrap_or_else(|| "?".into()),
                        started.elapsed().as_millis()
                    ),
                );
                self.save();
                self.primary_down_since = None;
                self.primary_seen_ready = true;
                self.primary_ready_at = Some(Instant::now());
                self.slots_done_for = Some((candidate.to_string(), Instant::now()));
                self.sync_told = None;
                self.promoted = Some((candidate.to_string(), Instant::now()));
                self.drain = None;
                self.last_wait = None;
                let others: Vec<String> = self
                    .endpoints
                    .iter()
                    .map(|e| e.name.clone())
                    .filter(|n| n != candidate && !self.fenced.contains(n))
                    .collect();
                for name in others {
                    self.follow(&name, candidate, false);
                }
                let _ = from;
                Some(candidate.to_string())
            }
            Err(e) => {
                self.ha
                    .event("PromoteFailed", format!("promote {candidate}: {e}"));
                self.save();
                None
            }
        }
    }

    async fn switchover(
        &mut self,
        from: &str,
        to: &str,
        members: &[ObservedMember],
    ) -> Option<String> {
        let started = Instant::now();
        self.lease.set(None);
        let last_lsn = wal_lsn(members.iter().find(|m| m.name == from));
        if let Err(e) = self.act.action(from, ACTION_FENCE, json!({})).await {
            // The primary is gone: this is a failover now.
            self.ha.event(
                "SwitchoverAborted",
                format!("could not stop {from} ({e}); failing over instead"),
            );
            self.ha.step = Step::Failover {
                from: from.to_string(),
            };
            self.ha.target_primary = None;
            self.save();
            return None;
        }
        self.ha.event(
            "Demoted",
            format!("{from} stopped cleanly for the switchover"),
        );
        // The target must hold everything the old primary wrote: past its
        // last observed position (its shutdown checkpoint is later), and at
        // least as far as any other replica got (a clean shutdown waits
        // until connected standbys flushed everything it sent).
        // The other replicas are asked in the same round as the target
        // (each status answer costs a server connection).
        let others: Vec<String> = self
            .endpoints
            .iter()
            .map(|e| e.name.clone())
            .filter(|n| n != to && n != from)
            .collect();
        let received = |s: Result<crate::instance::protocol::MemberStatus, _>| {
            s.ok().and_then(|s| match s.position {
                Position::Wal { received_lsn, .. } => received_lsn,
                _ => None,
            })
        };
        let caught_up = Instant::now();
        let deadline = caught_up + CATCH_UP_TIMEOUT;
        loop {
            let (target, others) = futures::future::join(
                self.observe.status(to),
                futures::future::join_all(others.iter().map(|n| self.observe.status(n))),
            )
            .await;
            let goal = others
                .into_iter()
                .filter_map(received)
                .chain(last_lsn.map(|l| l + 1))
                .max();
            if received(target).is_some_and(|r| goal.is_none_or(|g| r >= g)) {
                tracing::info!(
                    target = %to,
                    took_ms = caught_up.elapsed().as_millis() as u64,
                    "switchover target holds the old primary's last WAL"
                );
                break;
            }
            if Instant::now() > deadline {
                self.ha.event(
                    "SwitchoverCatchUpTimeout",
                    format!(
                        "{to} did not confirm the last WAL of {from} in time; promoting anyway"
                    ),
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.promote(to, from, started).await
    }

    /// Tell the primary which replicas stream from it when that changed,
    /// so that it keeps its synchronous standbys among them (the engine
    /// decides how many and which; an engine without the action answers
    /// with an error once per change).
    async fn tell_sync_standbys(&mut self, primary: &str, streaming: Vec<String>) {
        // Replicas a scale-down is removing are no longer chosen.
        let removing: Vec<String> = self
            .drain
            .as_ref()
            .filter(|d| d.primary == primary)
            .map(|d| d.removed.clone())
            .unwrap_or_default();
        let streaming: Vec<String> = streaming
            .into_iter()
            .filter(|n| !removing.contains(n))
            .collect();
        let now = (primary.to_string(), streaming);
        let promoted_for = self
            .promoted
            .as_ref()
            .filter(|(p, _)| p == primary)
            .map(|(_, at)| at.elapsed());
        // Not while a primary this `up` just promoted has no streaming
        // replica yet (the same rule as the controller's): a guess would
        // make commits wait on a standby that may not stream for seconds.
        if !crate::topology::sync_standbys_due(
            self.sync_told.as_ref(),
            primary,
            &now.1,
            promoted_for,
        ) {
            return;
        }
        let replicas: Vec<String> = self
            .replicas_of(primary)
            .into_iter()
            .filter(|n| !removing.contains(n))
            .collect();
        let body = json!({ "available": now.1, "replicas": replicas });
        // Quick, for the same reason as the slots upkeep.
        match self.quick.action(primary, ACTION_SYNC_STANDBYS, body).await {
            Ok(reply) => {
                if let Some(names) = reply
                    .get("synchronousStandbyNames")
                    .and_then(|v| v.as_str())
                    && !names.is_empty()
                {
                    self.ha.event(
                        "SynchronousStandbys",
                        format!(
                            "{primary}: synchronous_standby_names = {names} (streaming: {})",
                            if now.1.is_empty() {
                                "none".to_string()
                            } else {
                                now.1.join(", ")
                            }
                        ),
                    );
                }
            }
            Err(e) => tracing::debug!(error = %e, "synchronous standbys not set"),
        }
        self.sync_told = Some(now);
    }

    /// Replicas follow the primary: fenced or lease-waiting members, and
    /// replicas not streaming from it for a while, are told to.
    fn converge(&mut self, primary: &str, members: &[ObservedMember]) {
        let primary_port = self.db_port(primary);
        for m in members {
            let Some(s) = m
                .status
                .as_ref()
                .filter(|_| m.name != primary && !self.fenced.contains(&m.name))
            else {
                self.not_streaming_since.remove(&m.name);
                continue;
            };
            let streaming = streaming_from(s) == primary_port && primary_port.is_some();
            let (needed, rewind) = if s.fenced || s.awaiting_lease {
                (true, false)
            } else if !streaming && s.details.get("diverged").is_some() {
                // The engine says this data directory cannot follow as it
                // is (its history diverged): rewind now, not after a
                // timeout.
                (true, true)
            } else if s.role == Role::Replica && s.process == ProcessState::Running {
                if streaming_from(s) == primary_port && primary_port.is_some() {
                    self.not_streaming_since.remove(&m.name);
                    (false, false)
                } else {
                    let since = *self
                        .not_streaming_since
                        .entry(m.name.clone())
                        .or_insert_with(Instant::now);
                    (
                        since.elapsed() >= NOT_STREAMING_GRACE,
                        since.elapsed() >= REWIND_AFTER,
                    )
                }
            } else if s.process == ProcessState::Exited {
                // A server that keeps failing to start as a replica (its
                // timeline forked off before its last checkpoint) needs a
                // rewind; a plain crash is restarted by its manager sooner.
                let since = *self
                    .not_streaming_since
                    .entry(m.name.clone())
                    .or_insert_with(Instant::now);
                let due = since.elapsed() >= REWIND_AFTER;
                (due, due)
            } else if s.process == ProcessState::Starting {
                // Between two failed starts: keep counting, so that a
                // server that keeps exiting soon after starting is
                // rewound after REWIND_AFTER in all.
                (false, false)
            } else {
                self.not_streaming_since.remove(&m.name);
                (false, false)
            };
            if needed {
                self.follow(&m.name, primary, rewind);
            }
        }
    }

    /// Tell `name` to follow `primary`, in the background (a rewind takes
    /// seconds), the same primary at most every [`FOLLOW_EVERY`].
    fn follow(&mut self, name: &str, primary: &str, rewind: bool) {
        if self
            .last_follow
            .get(name)
            // Only repeats are spaced out: a new primary is followed at once.
            .is_some_and(|(t, p)| p == primary && t.elapsed() < FOLLOW_EVERY)
        {
            return;
        }
        {
            let Ok(mut busy) = self.following.lock() else {
                return;
            };
            if !busy.insert(name.to_string()) {
                return;
            }
        }
        self.last_follow
            .insert(name.to_string(), (Instant::now(), primary.to_string()));
        if rewind {
            // Start counting again: a rewind takes a while.
            self.not_streaming_since.remove(name);
        }
        self.ha.event(
            "Follow",
            format!(
                "{name} told to follow {primary}{}",
                if rewind { " (through pg_rewind)" } else { "" }
            ),
        );
        let act = self.act.clone();
        let busy = self.following.clone();
        // A manager started before `primary` was added does not know it.
        let endpoint = self.endpoints.iter().find(|e| e.name == primary).cloned();
        let (name, primary) = (name.to_string(), primary.to_string());
        tokio::spawn(async move {
            let body = json!({ "primary": primary, "rewind": rewind, "endpoint": endpoint });
            match act.action(&name, ACTION_FOLLOW, body).await {
                Ok(reply) => {
                    tracing::info!(instance = %name, %primary, reply = %reply, "following")
                }
                Err(e) => tracing::warn!(instance = %name, %primary, error = %e, "follow failed"),
            }
            if let Ok(mut b) = busy.lock() {
                b.remove(&name);
            }
        });
    }
}

/// The members a primary reports as synchronous standbys: its status
/// `details.replicas[]` entries with `syncState` `sync` or `quorum` (the
/// PostgreSQL driver reports `pg_stat_replication` so; engines without
/// the notion report none).
/// The pid in the first line of `pid_file` when that process is alive and
/// works in the pid file's directory (the server that wrote it: not a
/// reused pid, not a zombie, whose working directory cannot be read).
fn server_pid(pid_file: &std::path::Path) -> Option<i32> {
    let text = std::fs::read_to_string(pid_file).ok()?;
    let pid: i32 = text.lines().next()?.trim().parse().ok()?;
    if pid <= 0 {
        return None;
    }
    let dir = std::fs::canonicalize(pid_file.parent()?).ok()?;
    let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).ok()?;
    (cwd == dir).then_some(pid)
}

/// How long the primary may look as it does in `status` (`None`: its
/// manager did not answer) before it counts as failed. A server that
/// exited (or was fenced) is down for sure; a manager that missed one
/// observation may only be slow; a primary this `up` has not seen ready
/// yet (`seen_ready`) is still starting, as `up` started it. Pure.
fn failure_grace(
    status: Option<&crate::instance::protocol::MemberStatus>,
    seen_ready: bool,
) -> Duration {
    let grace = match status {
        None => UNREACHABLE_GRACE,
        Some(s)
            if matches!(s.process, ProcessState::Exited | ProcessState::Stopping)
                || (s.fenced && !s.awaiting_lease) =>
        {
            Duration::ZERO
        }
        Some(s) if s.awaiting_lease => AWAITING_LEASE_GRACE,
        Some(_) => NOT_READY_GRACE,
    };
    if seen_ready || grace.is_zero() {
        grace
    } else {
        grace.max(STARTUP_GRACE)
    }
}

fn wal_lsn(m: Option<&ObservedMember>) -> Option<u64> {
    match m?.status.as_ref()?.position {
        Position::Wal { received_lsn, .. } => received_lsn,
        _ => None,
    }
}

/// The upstream port a replica streams from, when its WAL receiver
/// streams.
fn streaming_from(s: &crate::instance::protocol::MemberStatus) -> Option<u16> {
    let r = s.details.get("walReceiver")?;
    if r.get("running")?.as_bool()? && r.get("status")?.as_str()? == "streaming" {
        r.get("senderPort")?.as_u64().map(|p| p as u16)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::instance::protocol::MemberStatus;

    #[test]
    fn server_pid_is_the_live_process_working_in_the_pid_files_directory() {
        let data = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .current_dir(data.path())
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let file = data.path().join("postmaster.pid");
        std::fs::write(&file, format!("{pid}\n{}\n", data.path().display())).unwrap();
        assert_eq!(server_pid(&file), Some(pid));
        // The same pid named by a pid file elsewhere: not that server.
        let elsewhere = other.path().join("postmaster.pid");
        std::fs::write(&elsewhere, format!("{pid}\n")).unwrap();
        assert_eq!(server_pid(&elsewhere), None);
        std::fs::write(&elsewhere, "garbage\n").unwrap();
        assert_eq!(server_pid(&elsewhere), None);
        assert_eq!(server_pid(&other.path().join("missing.pid")), None);
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(server_pid(&file), None, "a dead server");
    }

    fn member(name: &str, role: Role, ready: bool) -> ObservedMember {
        ObservedMember {
            name: name.into(),
            status: Some(MemberStatus {
                name: name.into(),
                role,
                ready,
                process: ProcessState::Running,
                ..Default::default()
            }),
            error: None,
        }
    }

    #[test]
    fn a_primary_started_by_this_up_gets_its_start_time() {
        let status = |process, awaiting_lease, fenced| MemberStatus {
            process,
            awaiting_lease,
            fenced,
            ..Default::default()
        };
        let starting = status(ProcessState::Starting, false, false);
        let awaiting = status(ProcessState::Fenced, true, false);
        let exited = status(ProcessState::Exited, false, false);
        let fenced = status(ProcessState::Exited, false, true);
        // Seen ready by this `up`: the usual graces.
        assert_eq!(failure_grace(None, true), UNREACHABLE_GRACE);
        assert_eq!(failure_grace(Some(&starting), true), NOT_READY_GRACE);
        assert_eq!(failure_grace(Some(&awaiting), true), AWAITING_LEASE_GRACE);
        // Not yet: it is starting because this `up` started it.
        for s in [None, Some(&starting), Some(&awaiting)] {
            assert_eq!(failure_grace(s, false), STARTUP_GRACE);
        }
        // A server that exited or is fenced: at once, either way.
        for seen in [true, false] {
            assert_eq!(failure_grace(Some(&exited), seen), Duration::ZERO);
            assert_eq!(failure_grace(Some(&fenced), seen), Duration::ZERO);
        }
    }

    #[test]
    fn switchover_refusals() {
        let names: Vec<String> = ["simple-pg-0", "simple-pg-1", "simple-pg-2"]
            .map(String::from)
            .to_vec();
        let members = [
            member("simple-pg-0", Role::Primary, true),
            member("simple-pg-1", Role::Replica, true),
            member("simple-pg-2", Role::Replica, false),
        ];
        let p = Some("simple-pg-0");
        assert_eq!(switchover_refusal("simple-pg-1", &names, p, &members), None);
        let cases = [
            ("simple-pg-9", "there is no instance \"simple-pg-9\""),
            ("simple-pg-0", "already the primary"),
            ("simple-pg-2", "is not a ready replica"),
        ];
        for (target, want) in cases {
            let got = switchover_refusal(target, &names, p, &members).unwrap();
            assert!(got.contains(want), "{target}: {got}");
        }
        assert!(
            switchover_refusal("simple-pg-1", &names, None, &members)
                .unwrap()
                .contains("no primary")
        );
    }

    #[test]
    fn events_are_bounded_and_state_round_trips() {
        let mut ha = HaState {
            step: Step::Failover {
                from: "simple-pg-0".into(),
            },
            rolling: Some(RollingState {
                remaining: vec!["simple-pg-1".into(), "simple-pg-0".into()],
                restarting: Some("simple-pg-1".into()),
                primary_first: false,
            }),
            ..Default::default()
        };
        for i in 0..(MAX_EVENTS + 5) {
            ha.event("Test", format!("event {i}"));
        }
        assert_eq!(ha.events.len(), MAX_EVENTS);
        assert!(ha.events.last().unwrap().ends_with("Test: event 54"));
        let v = serde_json::to_value(&ha).unwrap();
        assert_eq!(v["step"]["type"], "failover");
        assert_eq!(v["step"]["from"], "simple-pg-0");
        assert_eq!(v["rolling"]["restarting"], "simple-pg-1");
        assert_eq!(v["rolling"]["primaryFirst"], false);
        assert_eq!(serde_json::from_value::<HaState>(v).unwrap(), ha);
        // A state without a rolling restart has no `rolling` key.
        let idle = serde_json::to_value(HaState::default()).unwrap();
        assert!(idle.get("rolling").is_none(), "{idle}");
    }

    #[test]
    fn synchronous_standbys_from_the_primary_report() {
        let s = MemberStatus {
            details: json!({ "replicas": [
                { "name": "simple-pg-1", "syncState": "quorum" },
                { "name": "simple-pg-2", "syncState": "async" },
                { "name": "simple-pg-3", "syncState": "sync" },
            ]}),
            ..Default::default()
        };
        assert_eq!(sync_standbys(&s), ["simple-pg-1", "simple-pg-3"]);
        assert!(sync_standbys(&MemberStatus::default()).is_empty());
    }

    #[test]
    fn streaming_replicas_from_the_primary_report() {
        let s = MemberStatus {
            details: json!({ "replicas": [
                { "name": "simple-pg-2", "state": "streaming" },
                { "name": "simple-pg-1", "state": "catchup" },
                { "name": "simple-pg-3", "state": "streaming" },
            ]}),
            ..Default::default()
        };
        assert_eq!(streaming_replicas(&s), ["simple-pg-2", "simple-pg-3"]);
        assert!(streaming_replicas(&MemberStatus::default()).is_empty());
    }

    #[test]
    fn streaming_upstream_port() {
        let mut s = MemberStatus::default();
        assert_eq!(streaming_from(&s), None);
        s.details = json!({ "walReceiver": { "running": true, "status": "streaming", "senderPort": 5433 } });
        assert_eq!(streaming_from(&s), Some(5433));
        s.details["walReceiver"]["status"] = json!("waiting");
        assert_eq!(streaming_from(&s), None);
    }
}
