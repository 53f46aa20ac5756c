//! The instance manager (`stratum instance`): supervises one database server
//! process through an engine's [`InstanceDriver`]. Does process IO (spawns,
//! signals and restarts the server), filesystem IO (data and run
//! directories, the server log) and serves the HTTP API ([`super::server`]).
//!
//! Life cycle: build the context (directories, ownership) → check binaries
//! → serve HTTP → `prepare` until done → run the server, restarting it with
//! a backoff when it exits → on SIGTERM/SIGINT stop it with the engine's
//! stop signal (SIGKILL after [`STOP_TIMEOUT`]) and return. Whenever the
//! server ends, what it left behind (helpers in its process group and their
//! descendants) is killed, and the server it runs is recorded so that a
//! server whose manager was killed outright is stopped by whoever comes
//! next ([`super::leftovers`]).

use std::collections::VecDeque;
use std::future::Future;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot, watch};

use super::client::InstanceClient;
use super::config::{InstanceConfig, PeerEndpoint};
use super::failsafe::{self, ReplicaRecord};
use super::leftovers;
use super::process::{self, RunAs};
use super::protocol::{
    ACTION_FAILSAFE, FailsafeRequest, MemberStatus, ProcessState, RevokeReply, Role,
};
use crate::engine::InstanceOps as _;
use crate::engine::{InstanceContext, InstanceDriver, InstanceError, Progress, ServerCommand};

/// How long a stopping server may take before it is killed.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Name of the server log in the run directory.
pub const SERVER_LOG: &str = "server.log";
/// The server log is rotated (to `server.log.1`) at start when larger.
const SERVER_LOG_MAX_BYTES: u64 = 16 * 1024 * 1024;
/// Lines of server output kept for status messages.
const RECENT_OUTPUT_LINES: usize = 5;
/// Shortest wait between two `prepare` attempts.
const MIN_PREPARE_RETRY: Duration = Duration::from_millis(200);

/// Run the instance manager for `config` until SIGTERM or SIGINT, then stop
/// the server and return `Ok(())`. Errors that need a human (missing
/// binaries, a foreign data directory, bad settings) are returned at once;
/// the caller prints the chain and exits non-zero.
pub async fn run(config: InstanceConfig, driver: Arc<dyn InstanceDriver>) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    // Installed before anything starts so that an early SIGTERM is not lost
    // (as PID 1 the default action would be to ignore it).
    let mut term = signal(SignalKind::terminate()).context("failed to install SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("failed to install SIGINT handler")?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received, stopping"),
            _ = int.recv() => tracing::info!("SIGINT received, stopping"),
        }
    };
    run_until(config, driver, shutdown).await
}

/// [`run`] with the stop request given as a future (tests, embedding): when
/// `shutdown` completes the server is stopped as on SIGTERM.
pub async fn run_until<F>(
    config: InstanceConfig,
    driver: Arc<dyn InstanceDriver>,
    shutdown: F,
) -> anyhow::Result<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    let me = config.me().cloned().with_context(|| {
        format!(
            "instance {:?} is not among the members of cluster {} ({}); set --instance to one of them",
            config.instance,
            config.cluster,
            config
                .members
                .iter()
                .map(|m| m.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )
    })?;
    let ctx = build_context(config)?;
    driver.check_binaries(&ctx)?;
    let token = ctx.config.read_token().with_context(|| {
        format!(
            "failed to read the API token from {}",
            ctx.config.token_file.display()
        )
    })?;
    anyhow::ensure!(
        !token.is_empty(),
        "the API token file {} is empty",
        ctx.config.token_file.display()
    );

    // A previous manager of this instance killed outright (SIGKILL) left
    // its server running unsupervised: stop it before this one starts
    // another on the same data directory and ports.
    if let Some(what) = leftovers::stop_recorded(&ctx.run_dir, STOP_TIMEOUT).await {
        tracing::warn!(instance = %ctx.config.instance, "the server of a previous manager was still running: {what}");
    }

    let (control_tx, control_rx) = mpsc::channel(8);
    let lease = load_lease(&ctx.run_dir, &ctx.config.data_dir);
    let failsafe = ReplicaRecord::load(&ctx.config.data_dir, unix_ms(), UNKNOWN_ACK_GUARD);
    let shared = Arc::new(Shared {
        ctx,
        driver,
        state: Mutex::new(SupervisorState::default()),
        control_tx,
        lease: Mutex::new(lease),
        failsafe: Mutex::new(failsafe),
    });

    let listener =
        tokio::net::TcpListener::bind((shared.ctx.config.listen_address.as_str(), me.api_port))
            .await
            .with_context(|| {
                format!(
                    "failed to listen on {}:{} for the instance API",
                    shared.ctx.config.listen_address, me.api_port
                )
            })?;
    tracing::info!(
        instance = %me.name,
        address = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        "instance API listening"
    );
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let shutdown_task = tokio::spawn(async move {
        shutdown.await;
        let _ = shutdown_tx.send(true);
    });
    let app = super::server::router(shared.clone());
    let (http_done_tx, http_done_rx) = watch::channel(false);
    let mut http = tokio::spawn(async move {
        let stop = async move {
            // Serve until the supervisor has stopped the server, so status
            // stays observable while the database shuts down.
            let mut done = http_done_rx;
            let _ = done.wait_for(|d| *d).await;
        };
        axum::serve(listener, app)
            .with_graceful_shutdown(stop)
            .await
    });

    let failsafe_task = tokio::spawn(failsafe_loop(shared.clone(), token));
    let result = supervise(&shared, shutdown_rx, control_rx).await;
    shutdown_task.abort();
    failsafe_task.abort();
    let _ = http_done_tx.send(true);
    match tokio::time::timeout(Duration::from_secs(5), &mut http).await {
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "instance API server failed"),
        Err(_) => {
            tracing::warn!("instance API connections did not close within 5s; dropping them");
            http.abort();
        }
        _ => {}
    }
    result
}

/// Build the [`InstanceContext`]: create the data and run directories and
/// the extra volumes' directories when missing (mode 0700) and, when running as root with `run_as_user`, hand
/// both to that user with mode 0700 (PostgreSQL demands 0700/0750 on its
/// data directory and the user must write sockets into the run directory).
pub fn build_context(config: InstanceConfig) -> Result<InstanceContext, InstanceError> {
    let run_as = RunAs::for_config(&config)?;
    for dir in [&config.data_dir, &config.run_dir]
        .into_iter()
        .chain(config.volumes.values())
    {
        if !dir.exists() {
            process::create_dir_with_mode(dir, 0o700)?;
        }
        if let Some(user) = &run_as {
            process::chown_one(dir, user)?;
            process::create_dir_with_mode(dir, 0o700)?;
        }
    }
    Ok(InstanceContext {
        run_dir: config.run_dir.clone(),
        config,
    })
}

/// Restart delays of a crashing server: doubling from `initial` up to `max`,
/// back to `initial` after a run that lasted `healthy_after`. Pure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// First delay.
    pub initial: Duration,
    /// Largest delay.
    pub max: Duration,
    /// A run at least this long counts as healthy and resets the delay.
    pub healthy_after: Duration,
    failures: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(
            Duration::from_secs(1),
            Duration::from_secs(30),
            Duration::from_secs(60),
        )
    }
}

impl Backoff {
    /// A backoff with no failures yet.
    pub fn new(initial: Duration, max: Duration, healthy_after: Duration) -> Self {
        Self {
            initial,
            max,
            healthy_after,
            failures: 0,
        }
    }

    /// The delay before starting again after a run that lasted `ran_for`.
    pub fn next_delay(&mut self, ran_for: Duration) -> Duration {
        if ran_for >= self.healthy_after {
            self.failures = 0;
        }
        let factor = 1u32 << self.failures.min(16);
        self.failures = self.failures.saturating_add(1);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// Forget past failures (after a requested restart).
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

/// State shared by the supervisor and the HTTP handlers.
pub(crate) struct Shared {
    pub(crate) ctx: InstanceContext,
    pub(crate) driver: Arc<dyn InstanceDriver>,
    pub(crate) state: Mutex<SupervisorState>,
    /// Requests to the supervisor loop (restart, stop, wake up).
    pub(crate) control_tx: mpsc::Sender<Control>,
    /// The write lease (see [`LeaseState`]).
    pub(crate) lease: Mutex<LeaseState>,
    /// As a replica: the failsafe acknowledgements given and the terms
    /// revoked (persisted on the data volume).
    pub(crate) failsafe: Mutex<ReplicaRecord>,
}

/// An answer channel for a supervisor request.
pub(crate) type Ack = oneshot::Sender<Result<(), String>>;

/// A request to the supervisor loop.
pub(crate) enum Control {
    /// Stop the server, prepare, start it again; answered once the new
    /// process is started (or could not be, or is held down).
    Restart(Ack),
    /// Stop the server (the fence marker keeps it down); answered once it
    /// is stopped.
    Stop(Ack),
    /// Look at the hold-down conditions again now (after `unfence`, a new
    /// lease).
    Wake,
}

/// Name of the fence marker in the run directory.
pub const FENCE_MARKER: &str = "fenced";
/// Name of the persisted write lease in the run directory.
pub const LEASE_FILE: &str = "lease.json";
/// Name of the marker on the data volume saying that this instance has
/// held a write lease (and the last term), for a run directory that did
/// not survive: on Kubernetes it is an `emptyDir`, and the recreated pod
/// of a deposed primary must not start as a writer without a new lease.
pub const LEASE_MARKER: &str = "stratum-write-lease.json";
/// How often the hold-down conditions and the lease are checked.
const WATCHDOG_PERIOD: Duration = Duration::from_millis(100);
/// What an unreadable failsafe record counts as: an acknowledgement valid
/// this long from the start of the manager (longer than any lease TTL the
/// operators grant).
const UNKNOWN_ACK_GUARD: Duration = Duration::from_secs(30);

/// The write lease as the manager knows it.
#[derive(Clone, Debug, Default)]
pub(crate) struct LeaseState {
    /// A lease was ever granted to this instance (persisted): from then on
    /// a writer starts and keeps running only under a valid lease.
    pub(crate) known: bool,
    /// Highest term seen.
    pub(crate) term: u64,
    /// When the lease ends; `None` when expired or never granted.
    pub(crate) expires: Option<Instant>,
    /// The TTL of the last grant (failsafe extensions last as long).
    pub(crate) ttl: Duration,
    /// The replicas of the last grant's list (`None`: no failsafe).
    pub(crate) replicas: Option<Vec<PeerEndpoint>>,
    /// When the operator's last grant ends (without failsafe).
    pub(crate) operator_expires: Option<Instant>,
    /// Failsafe extensions since the operator's last grant.
    pub(crate) extensions: u64,
    /// Length of the last failsafe episode, ended by the operator's grant
    /// (reported once in the `lease` reply, and in status).
    pub(crate) last_episode_ms: Option<u64>,
}

impl LeaseState {
    fn valid(&self) -> bool {
        self.expires.is_some_and(|e| Instant::now() < e)
    }

    /// Running past the operator's grant on failsafe extensions now.
    fn on_failsafe(&self) -> bool {
        self.valid()
            && self.extensions > 0
            && self.operator_expires.is_some_and(|e| Instant::now() >= e)
    }

    /// How long writes have been kept on failsafe in the episode running
    /// now, else in the last one.
    fn kept_ms(&self) -> Option<u64> {
        if self.on_failsafe() {
            self.operator_expires
                .map(|e| Instant::now().saturating_duration_since(e).as_millis() as u64)
        } else {
            self.last_episode_ms
        }
    }

    fn remaining_ms(&self) -> Option<i64> {
        self.known.then(|| match self.expires {
            Some(e) => {
                let now = Instant::now();
                if e > now {
                    (e - now).as_millis() as i64
                } else {
                    -((now - e).as_millis() as i64)
                }
            }
            None => -1,
        })
    }
}

/// `lease.json`: the lease's end as wall-clock milliseconds, so that a
/// restarted manager knows whether it still holds one.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct LeaseFile {
    holder: String,
    term: u64,
    expires_at_unix_ms: i64,
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// [`LEASE_MARKER`]'s content.
#[derive(serde::Serialize, serde::Deserialize)]
struct LeaseMarker {
    term: u64,
}

fn load_lease(run_dir: &Path, data_dir: &Path) -> LeaseState {
    let Ok(text) = std::fs::read_to_string(run_dir.join(LEASE_FILE)) else {
        // A lease held before this run directory existed (a new pod on
        // the same volume): known, expired.
        return match std::fs::read_to_string(data_dir.join(LEASE_MARKER)) {
            Ok(text) => LeaseState {
                known: true,
                term: serde_json::from_str::<LeaseMarker>(&text).map_or(0, |m| m.term),
                ..Default::default()
            },
            Err(_) => LeaseState::default(),
        };
    };
    let Ok(file) = serde_json::from_str::<LeaseFile>(&text) else {
        // Unreadable: a lease existed; treat it as expired.
        return LeaseState {
            known: true,
            ..Default::default()
        };
    };
    let left = file.expires_at_unix_ms - unix_ms();
    let expires = (left > 0).then(|| Instant::now() + Duration::from_millis(left as u64));
    // The member list is not persisted: a restarted manager extends
    // nothing until the operator grants again.
    LeaseState {
        known: true,
        term: file.term,
        expires,
        operator_expires: expires,
        ..Default::default()
    }
}

/// What the supervisor knows about the server process.
#[derive(Clone, Debug, Default)]
pub(crate) struct SupervisorState {
    pub(crate) process: ProcessState,
    /// A server process exists (it may not accept connections yet).
    pub(crate) running: bool,
    /// Why the server is not running (waiting reason, exit status).
    pub(crate) message: Option<String>,
    /// Unexpected exits so far.
    pub(crate) restarts: u64,
    /// Last lines of server output.
    pub(crate) recent_output: VecDeque<String>,
}

impl Shared {
    fn update(&self, f: impl FnOnce(&mut SupervisorState)) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut state);
    }

    pub(crate) fn snapshot(&self) -> SupervisorState {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn lease_snapshot(&self) -> LeaseState {
        self.lease.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn fence_marker(&self) -> std::path::PathBuf {
        self.ctx.run_dir.join(FENCE_MARKER)
    }

    /// Whether the operator fenced this instance (persisted marker).
    pub(crate) fn fenced(&self) -> bool {
        self.fence_marker().exists()
    }

    /// Persist the fence marker.
    pub(crate) fn set_fence(&self) -> std::io::Result<()> {
        std::fs::write(self.fence_marker(), format!("fenced at {}\n", unix_ms()))
    }

    /// Remove the fence marker.
    pub(crate) fn clear_fence(&self) -> std::io::Result<()> {
        match std::fs::remove_file(self.fence_marker()) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Why the server must stay down now, if it must: a fence, or a writer
    /// without a valid lease.
    fn hold_reason(&self) -> Option<String> {
        if self.fenced() {
            return Some("fenced by the operator".into());
        }
        let lease = self.lease_snapshot();
        if lease.known && !lease.valid() && self.driver.needs_write_lease(&self.ctx) {
            return Some(
                "waiting for a write lease (this data directory would start as a writer)".into(),
            );
        }
        None
    }

    /// Grant or renew the write lease. Refused for another holder or an
    /// older term. Returns the milliseconds granted and, when this grant
    /// ends a failsafe episode, how long writes were kept on failsafe.
    pub(crate) fn grant_lease(
        &self,
        grant: &super::protocol::LeaseGrant,
    ) -> Result<(u64, Option<u64>), String> {
        let me = &self.ctx.config.instance;
        if &grant.holder != me {
            return Err(format!("the lease is for {}, this is {me}", grant.holder));
        }
        let mut lease = self.lease.lock().unwrap_or_else(|e| e.into_inner());
        if grant.term < lease.term {
            return Err(format!(
                "lease term {} is older than term {} already seen",
                grant.term, lease.term
            ));
        }
        let ttl = Duration::from_millis(grant.ttl_ms);
        self.persist_lease(&grant.holder, grant.term, unix_ms() + grant.ttl_ms as i64)?;
        if !lease.known || grant.term > lease.term {
            let marker = self.ctx.config.data_dir.join(LEASE_MARKER);
            let body = serde_json::to_vec(&LeaseMarker { term: grant.term }).unwrap_or_default();
            std::fs::write(&marker, body)
                .map_err(|e| format!("failed to persist the lease in {}: {e}", marker.display()))?;
        }
        let was_valid = lease.valid();
        let now = Instant::now();
        let ended = if lease.on_failsafe() && grant.term == lease.term {
            lease
                .operator_expires
                .map(|e| now.saturating_duration_since(e).as_millis() as u64)
        } else {
            None
        };
        if let Some(ms) = ended {
            tracing::info!(
                instance = %me,
                extensions = lease.extensions,
                "the operator renewed the lease again; writes were kept on failsafe for {ms} ms"
            );
            lease.last_episode_ms = Some(ms);
        }
        if grant.term != lease.term {
            lease.last_episode_ms = None;
        }
        lease.known = true;
        lease.term = grant.term;
        lease.expires = Some(now + ttl);
        lease.operator_expires = lease.expires;
        lease.ttl = ttl;
        lease.replicas = grant.replicas.clone();
        lease.extensions = 0;
        drop(lease);
        if !was_valid {
            let _ = self.control_tx.try_send(Control::Wake);
        }
        Ok((grant.ttl_ms, ended))
    }

    /// Write `lease.json`: the lease's end as wall-clock milliseconds.
    fn persist_lease(
        &self,
        holder: &str,
        term: u64,
        expires_at_unix_ms: i64,
    ) -> Result<(), String> {
        let file = LeaseFile {
            holder: holder.to_string(),
            term,
            expires_at_unix_ms,
        };
        let path = self.ctx.run_dir.join(LEASE_FILE);
        let tmp = self.ctx.run_dir.join(format!(".{LEASE_FILE}.tmp"));
        std::fs::write(&tmp, serde_json::to_vec(&file).unwrap_or_default())
            .and_then(|_| std::fs::rename(&tmp, &path))
            .map_err(|e| format!("failed to persist the lease in {}: {e}", path.display()))
    }

    /// Extend the lease after every replica acknowledged requests sent at
    /// `sent` for `term` (failsafe). Nothing when the term changed or the
    /// lease ended meanwhile (an expired lease is not revived: the server
    /// may already be stopping). Returns the new end.
    fn extend_lease(&self, term: u64, sent: Instant) -> Option<Instant> {
        let mut lease = self.lease.lock().unwrap_or_else(|e| e.into_inner());
        if lease.term != term || !lease.valid() {
            return None;
        }
        let end = failsafe::extended(lease.expires, sent, lease.ttl);
        let left = end.saturating_duration_since(Instant::now());
        if let Err(e) = self.persist_lease(
            &self.ctx.config.instance,
            term,
            unix_ms() + left.as_millis() as i64,
        ) {
            tracing::warn!(instance = %self.ctx.config.instance, "{e}; no failsafe extension");
            return None;
        }
        lease.expires = Some(end);
        lease.extensions += 1;
        Some(end)
    }

    /// Answer a primary's failsafe request (see [`failsafe::ack_refusal`]):
    /// `Ok` after the acknowledgement is on disk, `Err(why)` when refused.
    pub(crate) fn failsafe_ack(&self, req: &FailsafeRequest) -> Result<(), String> {
        let me = &self.ctx.config.instance;
        // Under the record's lock: a revocation is either before (refused)
        // or after (it reports this acknowledgement).
        let mut record = self.failsafe.lock().unwrap_or_else(|e| e.into_inner());
        let following = self.driver.following(&self.ctx);
        if let Some(why) =
            failsafe::ack_refusal(req, me, following.as_deref(), self.fenced(), &record)
        {
            return Err(why);
        }
        let mut next = record.clone();
        next.grant(req, unix_ms());
        next.save(&self.ctx.config.data_dir)
            .map_err(|e| format!("failed to persist the acknowledgement: {e}"))?;
        *record = next;
        Ok(())
    }

    /// Revoke failsafe acknowledgements for `term` and older (persisted
    /// first); returns the reply with the last acknowledgement's
    /// remaining validity.
    pub(crate) fn failsafe_revoke(&self, term: u64) -> Result<RevokeReply, String> {
        let mut record = self.failsafe.lock().unwrap_or_else(|e| e.into_inner());
        let mut next = record.clone();
        next.revoke(term);
        if next != *record {
            next.save(&self.ctx.config.data_dir)
                .map_err(|e| format!("failed to persist the revocation: {e}"))?;
        }
        *record = next;
        tracing::info!(instance = %self.ctx.config.instance, term, "failsafe acknowledgements revoked");
        Ok(RevokeReply {
            replica: self.ctx.config.instance.clone(),
            revoked_term: record.revoked_term.unwrap_or(term),
            failsafe_granted_ms: record.granted_ms(unix_ms()),
        })
    }

    /// Send a request to the supervisor and wait for its answer.
    pub(crate) async fn request(
        &self,
        make: impl FnOnce(Ack) -> Control,
        wait: Duration,
    ) -> Result<bool, String> {
        let (ack_tx, ack_rx) = oneshot::channel();
        if self.control_tx.send(make(ack_tx)).await.is_err() {
            return Err("the manager is stopping".into());
        }
        match tokio::time::timeout(wait, ack_rx).await {
            Ok(Ok(Ok(()))) => Ok(true),
            Ok(Ok(Err(e))) => Err(e),
            Ok(Err(_)) => Err("the manager is stopping".into()),
            Err(_) => Ok(false),
        }
    }

    /// The status document: the driver's report on the server, completed
    /// with what the manager knows (identity, process state, why it is
    /// down). While the data directory is being prepared the driver is
    /// asked as for a stopped server (`running == false`), so that what it
    /// knows from its files (a Galera member's recovered position) shows
    /// while `prepare` waits.
    pub(crate) async fn status(&self) -> (MemberStatus, SupervisorState) {
        let snap = self.snapshot();
        let mut status = if snap.process == ProcessState::Preparing {
            MemberStatus {
                role: Role::Unknown,
                ready: false,
                ..self.driver.status(&self.ctx, false).await
            }
        } else {
            self.driver.status(&self.ctx, snap.running).await
        };
        let config = &self.ctx.config;
        if status.name.is_empty() {
            status.name = config.instance.clone();
        }
        status.cluster_id = config.cluster_id.clone();
        if status.address.is_empty()
            && let Some(me) = config.me()
        {
            status.address = format!("{}:{}", me.host, me.db_port);
        }
        status.process = match snap.process {
            ProcessState::Starting | ProcessState::Running if snap.running => {
                if status.ready || status.role != Role::Unknown {
                    ProcessState::Running
                } else {
                    ProcessState::Starting
                }
            }
            other => other,
        };
        if !snap.running {
            status.ready = false;
            if snap.message.is_some() {
                status.message = snap.message.clone();
            }
        }
        let lease = self.lease_snapshot();
        status.fenced = self.fenced();
        status.awaiting_lease = !status.fenced
            && !snap.running
            && lease.known
            && !lease.valid()
            && self.driver.needs_write_lease(&self.ctx);
        status.lease_remaining_ms = lease.remaining_ms();
        // Which settings this manager was given (and its server runs
        // with, or takes at its next start: `pending_restart`).
        status.config_hash = Some(super::protocol::settings_hash(
            &super::reconfigured::effective_engine(config),
        ));
        status.on_failsafe = lease.on_failsafe();
        status.failsafe_kept_ms = lease.kept_ms();
        status.failsafe_granted_ms = self
            .failsafe
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .granted_ms(unix_ms());
        (status, snap)
    }
}

/// The primary's side of failsafe: while this instance holds a lease with
/// a member list and runs a writer, ask every listed replica for an
/// acknowledgement once less than half the TTL is left without a renewal,
/// and extend the lease to the sending time + TTL when all of them ack.
/// Runs until aborted with the manager.
async fn failsafe_loop(shared: Arc<Shared>, token: String) {
    let name = shared.ctx.config.instance.clone();
    let mut last_refusal: Option<String> = None;
    let mut tick = tokio::time::interval(WATCHDOG_PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let lease = shared.lease_snapshot();
        let (Some(replicas), Some(expires)) = (lease.replicas.clone(), lease.expires) else {
            continue;
        };
        let now = Instant::now();
        if !lease.valid()
            || !failsafe::should_ask(expires.saturating_duration_since(now), lease.ttl)
            || shared.fenced()
            || !shared.snapshot().running
            || !shared.driver.needs_write_lease(&shared.ctx)
        {
            continue;
        }
        let req = FailsafeRequest {
            primary: name.clone(),
            term: lease.term,
            ttl_ms: lease.ttl.as_millis() as u64,
        };
        // Each request gets what is left of the lease (at least one
        // watchdog period): an answer after the lease ended is useless.
        let timeout = expires
            .saturating_duration_since(now)
            .max(WATCHDOG_PERIOD)
            .min(lease.ttl / 4);
        let client = InstanceClient::new(
            token.clone(),
            shared.ctx.config.cluster_id.clone(),
            replicas.clone(),
            timeout,
        );
        let sent = Instant::now();
        let body = serde_json::to_value(&req).unwrap_or_default();
        let answers = futures::future::join_all(
            replicas
                .iter()
                .map(|r| client.action(&r.name, ACTION_FAILSAFE, body.clone())),
        )
        .await;
        let refusals: Vec<String> = answers
            .into_iter()
            .filter_map(|a| a.err().map(|e| e.to_string()))
            .collect();
        if refusals.is_empty() {
            if let Some(end) = shared.extend_lease(req.term, sent) {
                last_refusal = None;
                tracing::info!(
                    instance = %name,
                    replicas = replicas.len(),
                    "no lease renewal from the operator; every replica acknowledged, lease extended on failsafe by {} ms",
                    end.saturating_duration_since(Instant::now()).as_millis()
                );
            }
        } else {
            let why = refusals.join("; ");
            if last_refusal.as_deref() != Some(why.as_str()) {
                tracing::warn!(instance = %name, "no failsafe extension of the lease: {why}");
                last_refusal = Some(why);
            }
        }
    }
}

async fn wait_shutdown(rx: &mut watch::Receiver<bool>) {
    // An error means the sender is gone, which only happens after it sent.
    let _ = rx.wait_for(|stop| *stop).await;
}

/// How a running server's watch ended.
enum RunEnd {
    /// It exited by itself.
    Exited(ExitStatus, Box<ServerProcess>),
    /// The manager is stopping (server stopped).
    Shutdown,
    /// Stopped on request or by the lease watchdog; start again (the
    /// hold-down gate decides whether it may).
    Stopped,
}

/// Hold down, prepare, run, restart; returns when asked to stop (after
/// stopping the server) or on an error a human must fix.
async fn supervise(
    shared: &Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
    mut control: mpsc::Receiver<Control>,
) -> anyhow::Result<()> {
    let name = shared.ctx.config.instance.clone();
    let mut backoff = Backoff::default();
    let mut pending_ack: Option<Ack> = None;
    loop {
        // The gate: a fenced instance, or a writer without a lease, stays
        // down until that changes.
        if let Some(reason) = shared.hold_reason() {
            if shared.snapshot().message.as_deref() != Some(reason.as_str()) {
                tracing::info!(instance = %name, "server held down: {reason}");
            }
            shared.update(|s| {
                s.process = ProcessState::Fenced;
                s.running = false;
                s.message = Some(reason.clone());
            });
            if let Some(ack) = pending_ack.take() {
                let _ = ack.send(Ok(()));
            }
            tokio::select! {
                _ = tokio::time::sleep(WATCHDOG_PERIOD * 2) => {}
                _ = wait_shutdown(&mut shutdown) => return Ok(()),
                Some(c) = control.recv() => match c {
                    Control::Restart(ack) | Control::Stop(ack) => { let _ = ack.send(Ok(())); }
                    Control::Wake => {}
                },
            }
            continue;
        }
        // Prepare before every start: it is idempotent and re-renders the
        // configuration, so a restart picks up changes.
        let started: anyhow::Result<_> = async {
            if !prepare(shared, &mut shutdown).await? {
                return Ok(None);
            }
            if shared.hold_reason().is_some() {
                return Ok(Some(None));
            }
            let command = shared.driver.server_command(&shared.ctx)?;
            let server = spawn_server(shared, &command).await?;
            Ok(Some(Some((command, server))))
        }
        .await;
        let (command, mut server) = match started {
            Ok(Some(Some(started))) => started,
            // Held down meanwhile (a fence arrived during prepare).
            Ok(Some(None)) => continue,
            // Asked to stop; a pending restart request is answered by the
            // dropped sender ("the manager is stopping").
            Ok(None) => return Ok(()),
            Err(e) => {
                if let Some(ack) = pending_ack.take() {
                    let _ = ack.send(Err(format!("{e:#}")));
                }
                return Err(e);
            }
        };
        if let Some(ack) = pending_ack.take() {
            let _ = ack.send(Ok(()));
        }
        let started = Instant::now();
        let mut watchdog = tokio::time::interval(WATCHDOG_PERIOD);
        watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let end = loop {
            tokio::select! {
                exit = server.child.wait() => {
                    let exit = exit.context("failed to wait for the server process")?;
                    server.reaped = true;
                    break RunEnd::Exited(exit, Box::new(server));
                }
                _ = wait_shutdown(&mut shutdown) => {
                    stop_server(shared, server, command.stop_signal).await;
                    break RunEnd::Shutdown;
                }
                Some(c) = control.recv() => match c {
                    Control::Restart(ack) => {
                        tracing::info!(instance = %name, "restarting the server on request");
                        stop_server(shared, server, command.stop_signal).await;
                        backoff.reset();
                        pending_ack = Some(ack);
                        break RunEnd::Stopped;
                    }
                    Control::Stop(ack) => {
                        tracing::info!(instance = %name, "stopping the server on request (fence)");
                        stop_server(shared, server, command.stop_signal).await;
                        let _ = ack.send(Ok(()));
                        break RunEnd::Stopped;
                    }
                    Control::Wake => {}
                },
                _ = watchdog.tick() => {
                    if let Some(reason) = shared.hold_reason() {
                        tracing::warn!(instance = %name, "stopping the server: {reason}");
                        stop_server(shared, server, command.stop_signal).await;
                        break RunEnd::Stopped;
                    }
                }
            }
        };
        let (exit, mut server) = match end {
            RunEnd::Shutdown => return Ok(()),
            RunEnd::Stopped => continue,
            RunEnd::Exited(exit, server) => (exit, server),
        };
        // Its helpers (an SST script, socat) outlive it and would make every
        // next start fail; they also hold the output pipes open.
        server.kill_leftovers();
        server.drain_output().await;
        let delay = backoff.next_delay(started.elapsed());
        let output = shared
            .snapshot()
            .recent_output
            .into_iter()
            .collect::<Vec<_>>()
            .join(" | ");
        let message = format!(
            "server exited unexpectedly ({}); restarting in {}s{}",
            describe_exit(exit),
            delay.as_secs_f32(),
            if output.is_empty() {
                String::new()
            } else {
                format!("; last output: {output}")
            }
        );
        tracing::warn!(instance = %name, "{message}");
        shared.update(|s| {
            s.process = ProcessState::Exited;
            s.running = false;
            s.restarts += 1;
            s.message = Some(message);
        });
        let deadline = tokio::time::Instant::now() + delay;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => break,
                _ = wait_shutdown(&mut shutdown) => return Ok(()),
                _ = tokio::time::sleep(WATCHDOG_PERIOD) => {
                    // A fence or an expired lease ends the wait: the gate
                    // reports it at once.
                    if shared.hold_reason().is_some() {
                        break;
                    }
                }
                Some(c) = control.recv() => match c {
                    Control::Restart(ack) => {
                        // A requested restart skips the remaining delay.
                        backoff.reset();
                        pending_ack = Some(ack);
                        break;
                    }
                    Control::Stop(ack) => {
                        let _ = ack.send(Ok(()));
                        break;
                    }
                    Control::Wake => {}
                },
            }
        }
    }
}

/// Call `driver.prepare` until done. `Ok(false)` when asked to stop meanwhile.
async fn prepare(shared: &Shared, shutdown: &mut watch::Receiver<bool>) -> anyhow::Result<bool> {
    shared.update(|s| {
        s.process = ProcessState::Preparing;
        s.running = false;
        s.message = Some("preparing the data directory".into());
    });
    loop {
        let progress = tokio::select! {
            p = shared.driver.prepare(&shared.ctx) => p?,
            _ = wait_shutdown(shutdown) => return Ok(false),
        };
        match progress {
            Progress::Done => return Ok(true),
            Progress::Waiting {
                reason,
                retry_after,
            } => {
                tracing::info!(instance = %shared.ctx.config.instance, "prepare: {reason}");
                shared.update(|s| s.message = Some(reason));
                tokio::select! {
                    _ = tokio::time::sleep(retry_after.max(MIN_PREPARE_RETRY)) => {}
                    _ = wait_shutdown(shutdown) => return Ok(false),
                }
            }
        }
    }
}

/// A running server process. Dropping it (a cancelled manager, a panicking
/// test) kills the whole process group, so no database outlives us.
struct ServerProcess {
    child: tokio::process::Child,
    pid: i32,
    /// Where its record ([`leftovers::SERVER_RECORD`]) is.
    run_dir: std::path::PathBuf,
    reaped: bool,
    /// The tasks copying stdout and stderr.
    forwarders: Vec<tokio::task::JoinHandle<()>>,
}

impl ServerProcess {
    /// Kill what is left of the server's process group and its helpers'
    /// descendants (see [`leftovers`]) once the server itself is gone.
    fn kill_leftovers(&self) {
        let n = leftovers::kill_leftovers(self.pid);
        if n > 0 {
            tracing::warn!(
                pid = self.pid,
                "killed {n} process(es) the server left behind (e.g. an SST script)"
            );
        }
    }

    /// Let the output forwarders drain what the exited server wrote (its
    /// last words explain the exit), bounded: a surviving grandchild may
    /// hold the pipes open.
    async fn drain_output(&mut self) {
        let all = futures::future::join_all(self.forwarders.drain(..));
        let _ = tokio::time::timeout(Duration::from_secs(1), all).await;
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if !self.reaped && matches!(self.child.try_wait(), Ok(None)) {
            let _ = killpg(Pid::from_raw(self.pid), Signal::SIGKILL);
        }
        // However it ended (stopped, exited, a cancelled manager), nothing
        // it started may outlive it.
        self.kill_leftovers();
        leftovers::forget(&self.run_dir);
    }
}

async fn spawn_server(
    shared: &Arc<Shared>,
    command: &ServerCommand,
) -> anyhow::Result<ServerProcess> {
    let config = &shared.ctx.config;
    let run_as = RunAs::for_config(config)?;
    let log = open_server_log(&shared.ctx.run_dir).await?;
    let mut cmd = process::command(&command.program, run_as.as_ref());
    cmd.args(&command.args)
        .envs(&command.env)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("failed to start {}", command.program.display()))?;
    let pid = child
        .id()
        .context("the server exited before its pid was read")? as i32;
    tracing::info!(instance = %config.instance, pid, program = %command.program.display(), "server started");
    if let Err(e) = leftovers::record(
        &shared.ctx.run_dir,
        pid,
        &command.program,
        command.stop_signal,
    ) {
        tracing::warn!(instance = %config.instance, error = %e, "could not record the server's pid");
    }
    let log = Arc::new(tokio::sync::Mutex::new(log));
    let mut forwarders = Vec::new();
    if let Some(out) = child.stdout.take() {
        forwarders.push(tokio::spawn(forward_output(
            out,
            log.clone(),
            shared.clone(),
        )));
    }
    if let Some(err) = child.stderr.take() {
        forwarders.push(tokio::spawn(forward_output(err, log, shared.clone())));
    }
    shared.update(|s| {
        s.process = ProcessState::Starting;
        s.running = true;
        s.message = None;
        s.recent_output.clear();
    });
    Ok(ServerProcess {
        child,
        pid,
        run_dir: shared.ctx.run_dir.clone(),
        reaped: false,
        forwarders,
    })
}

/// Copy server output to the log file, to our log (tracing) and into the
/// recent-output buffer used in exit messages.
async fn forward_output(
    stream: impl AsyncRead + Unpin,
    log: Arc<tokio::sync::Mutex<tokio::fs::File>>,
    shared: Arc<Shared>,
) {
    let mut reader = BufReader::new(stream);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                {
                    let mut file = log.lock().await;
                    let _ = file.write_all(&buf).await;
                }
                let line = String::from_utf8_lossy(&buf).trim_end().to_string();
                if !line.is_empty() {
                    tracing::info!(
                        target: "stratum::server",
                        instance = %shared.ctx.config.instance,
                        "{line}"
                    );
                    shared.update(|s| {
                        if s.recent_output.len() == RECENT_OUTPUT_LINES {
                            s.recent_output.pop_front();
                        }
                        s.recent_output.push_back(line);
                    });
                }
            }
        }
    }
}

async fn open_server_log(run_dir: &Path) -> anyhow::Result<tokio::fs::File> {
    let path = run_dir.join(SERVER_LOG);
    if let Ok(meta) = tokio::fs::metadata(&path).await
        && meta.len() > SERVER_LOG_MAX_BYTES
    {
        let _ = tokio::fs::rename(&path, run_dir.join(format!("{SERVER_LOG}.1"))).await;
    }
    tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .await
        .with_context(|| format!("failed to open the server log {}", path.display()))
}

/// Send `signal` to the server, wait up to [`STOP_TIMEOUT`], then kill its
/// process group.
async fn stop_server(shared: &Shared, mut server: ServerProcess, signal: i32) {
    let name = &shared.ctx.config.instance;
    shared.update(|s| {
        s.process = ProcessState::Stopping;
        s.message = Some("stopping the server".into());
    });
    let signal = Signal::try_from(signal).unwrap_or(Signal::SIGTERM);
    if let Err(e) = kill(Pid::from_raw(server.pid), signal) {
        tracing::warn!(instance = %name, error = %e, "failed to signal the server");
    }
    match tokio::time::timeout(STOP_TIMEOUT, server.child.wait()).await {
        Ok(Ok(exit)) => {
            server.reaped = true;
            tracing::info!(instance = %name, "server stopped ({})", describe_exit(exit));
        }
        Ok(Err(e)) => tracing::warn!(instance = %name, error = %e, "failed to wait for the server"),
        Err(_) => {
            tracing::warn!(
                instance = %name,
                "server did not stop within {}s after {signal}; killing it",
                STOP_TIMEOUT.as_secs()
            );
            let _ = killpg(Pid::from_raw(server.pid), Signal::SIGKILL);
            if server.child.wait().await.is_ok() {
                server.reaped = true;
            }
        }
    }
    shared.update(|s| {
        s.running = false;
        s.message = Some("server stopped".into());
    });
}

fn describe_exit(exit: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (exit.code(), exit.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => match Signal::try_from(sig) {
            Ok(s) => format!("killed by {s}"),
            Err(_) => format!("killed by signal {sig}"),
        },
        _ => exit.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::instance::config::PeerEndpoint;
    use crate::instance::protocol::Position;
    use async_trait::async_trait;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A driver whose "server" is a shell script.
    struct FakeDriver {
        script: &'static str,
        prepare_calls: AtomicU32,
        /// Its server would accept writes (needs a lease once granted).
        writer: bool,
    }

    #[async_trait]
    impl InstanceDriver for FakeDriver {
        fn check_binaries(&self, _: &InstanceContext) -> Result<(), InstanceError> {
            Ok(())
        }

        async fn prepare(&self, _: &InstanceContext) -> Result<Progress, InstanceError> {
            // Wait once, to exercise the waiting path.
            if self.prepare_calls.fetch_add(1, Ordering::SeqCst) == 0 {
                return Ok(Progress::waiting(
                    "waiting for fake-0",
                    Duration::from_millis(10),
                ));
            }
            Ok(Progress::Done)
        }

        fn server_command(&self, _: &InstanceContext) -> Result<ServerCommand, InstanceError> {
            Ok(ServerCommand {
                program: "sh".into(),
                args: vec!["-c".into(), self.script.into()],
                env: Default::default(),
                stop_signal: Signal::SIGTERM as i32,
            })
        }

        fn needs_write_lease(&self, _: &InstanceContext) -> bool {
            self.writer
        }

        async fn status(&self, _: &InstanceContext, running: bool) -> MemberStatus {
            MemberStatus {
                role: if running {
                    Role::Primary
                } else {
                    Role::Unknown
                },
                ready: running,
                position: Position::None,
                ..Default::default()
            }
        }
    }

    struct Harness {
        _dir: tempfile::TempDir,
        api: String,
        run_dir: std::path::PathBuf,
        stop: Option<oneshot::Sender<()>>,
        handle: tokio::task::JoinHandle<anyhow::Result<()>>,
        http: reqwest::Client,
    }

    fn start(script: &'static str) -> Harness {
        start_with(script, false)
    }

    fn start_with(script: &'static str, writer: bool) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        std::fs::write(dir.path().join("token"), "tok\n").unwrap();
        let config = InstanceConfig {
            kind: "FakeCluster".into(),
            cluster: "fake".into(),
            cluster_id: "uid-fake".into(),
            instance: "fake-0".into(),
            data_dir: dir.path().join("data"),
            run_dir: dir.path().join("run"),
            listen_address: "127.0.0.1".into(),
            members: vec![PeerEndpoint {
                name: "fake-0".into(),
                host: "127.0.0.1".into(),
                db_port: 1,
                api_port: port,
                ports: Default::default(),
            }],
            token_file: dir.path().join("token"),
            secrets_dir: dir.path().into(),
            ..Default::default()
        };
        let driver = Arc::new(FakeDriver {
            script,
            prepare_calls: AtomicU32::new(0),
            writer,
        });
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(run_until(config, driver, async move {
            let _ = rx.await;
        }));
        Harness {
            api: format!("http://127.0.0.1:{port}"),
            run_dir: dir.path().join("run"),
            _dir: dir,
            stop: Some(tx),
            handle,
            http: reqwest::Client::builder().no_proxy().build().unwrap(),
        }
    }

    impl Harness {
        async fn status_until(
            &self,
            what: &str,
            f: impl Fn(&MemberStatus) -> bool,
        ) -> MemberStatus {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Ok(resp) = self
                    .http
                    .get(format!("{}/v1/status", self.api))
                    .bearer_auth("tok")
                    .send()
                    .await
                    && let Ok(status) = resp.json::<MemberStatus>().await
                    && f(&status)
                {
                    return status;
                }
                assert!(Instant::now() < deadline, "timed out waiting for {what}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    impl Harness {
        /// Wait until the server log holds `n` greetings.
        async fn wait_greetings(&self, n: usize) {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let log =
                    std::fs::read_to_string(self.run_dir.join(SERVER_LOG)).unwrap_or_default();
                if log.matches("hello from the server").count() == n {
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "expected {n} greetings in\n{log}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn supervises_restarts_on_request_and_stops_on_shutdown() {
        let mut h = start("echo hello from the server; exec sleep 600");
        let status = h.status_until("ready", |s| s.ready).await;
        assert_eq!(status.process, ProcessState::Running);
        assert_eq!(status.name, "fake-0");
        assert_eq!(status.cluster_id, "uid-fake");
        assert_eq!(status.address, "127.0.0.1:1");
        let resp = h
            .http
            .get(format!("{}/readyz", h.api))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        h.wait_greetings(1).await;

        let resp = h
            .http
            .post(format!("{}/v1/actions/restart", h.api))
            .bearer_auth("tok")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let resp = h
            .http
            .post(format!("{}/v1/actions/unknown", h.api))
            .bearer_auth("tok")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 404);
        h.status_until("ready again", |s| s.ready).await;
        // The restarted process wrote its greeting too.
        h.wait_greetings(2).await;

        let _ = h.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(10), &mut h.handle)
            .await
            .expect("stops in time")
            .unwrap()
            .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_crashing_server_is_reported_and_restarted() {
        let mut h = start("echo boom >&2; exit 3");
        let status = h
            .status_until("an exit report", |s| {
                s.message
                    .as_deref()
                    .is_some_and(|m| m.contains("exit code 3"))
            })
            .await;
        assert!(!status.ready);
        assert_eq!(status.process, ProcessState::Exited);
        assert!(status.message.unwrap().contains("boom"));
        let metrics = h
            .http
            .get(format!("{}/metrics", h.api))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(metrics.contains("stratum_instance_up 0"), "{metrics}");
        let _ = h.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(10), &mut h.handle)
            .await
            .expect("stops in time")
            .unwrap()
            .unwrap();
    }

    impl Harness {
        async fn act(&self, name: &str, body: serde_json::Value) -> reqwest::StatusCode {
            self.http
                .post(format!("{}/v1/actions/{name}", self.api))
                .bearer_auth("tok")
                .json(&body)
                .send()
                .await
                .unwrap()
                .status()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fence_persists_and_an_expired_lease_stops_a_writer() {
        let mut h = start_with("exec sleep 600", true);
        h.status_until("ready", |s| s.ready).await;

        // Fence: stopped, reported, marker persisted; unfence starts it.
        assert_eq!(h.act("fence", serde_json::json!({})).await, 200);
        let s = h.status_until("fenced", |s| s.fenced && !s.ready).await;
        assert_eq!(s.process, ProcessState::Fenced);
        assert!(h.run_dir.join(FENCE_MARKER).exists());
        assert_eq!(
            h.act("fence", serde_json::json!({})).await,
            200,
            "idempotent"
        );
        assert_eq!(h.act("unfence", serde_json::json!({})).await, 200);
        h.status_until("running after unfence", |s| s.ready && !s.fenced)
            .await;

        // A lease for another instance or without a body is refused.
        let other = serde_json::json!({"lease": {"holder": "fake-1", "term": 1, "ttlMs": 400}});
        assert_eq!(h.act("lease", other).await, 409);
        assert_eq!(h.act("lease", serde_json::json!({})).await, 400);
        // Granted, then not renewed: the writer is stopped and held down.
        let lease = serde_json::json!({"lease": {"holder": "fake-0", "term": 2, "ttlMs": 400}});
        assert_eq!(h.act("lease", lease.clone()).await, 200);
        let s = h
            .status_until("held down for want of a lease", |s| {
                s.awaiting_lease && !s.ready
            })
            .await;
        assert!(s.lease_remaining_ms.unwrap() < 0);
        let old = serde_json::json!({"lease": {"holder": "fake-0", "term": 1, "ttlMs": 60000}});
        assert_eq!(h.act("lease", old).await, 409, "an older term");
        let renewed = serde_json::json!({"lease": {"holder": "fake-0", "term": 2, "ttlMs": 60000}});
        assert_eq!(h.act("lease", renewed).await, 200);
        h.status_until("running under a lease", |s| s.ready).await;

        let _ = h.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(10), &mut h.handle)
            .await
            .expect("stops in time")
            .unwrap()
            .unwrap();
    }

    #[test]
    fn backoff_doubles_caps_and_resets_after_a_healthy_run() {
        let mut b = Backoff::new(
            Duration::from_secs(1),
            Duration::from_secs(8),
            Duration::from_secs(60),
        );
        let short = Duration::from_secs(2);
        let delays: Vec<u64> = (0..6).map(|_| b.next_delay(short).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 8, 8]);
        assert_eq!(b.next_delay(Duration::from_secs(61)).as_secs(), 1);
        assert_eq!(b.next_delay(short).as_secs(), 2);
        b.reset();
        assert_eq!(b.next_delay(short).as_secs(), 1);
    }

    #[test]
    fn a_lease_held_on_the_volume_survives_a_new_run_directory() {
        let run = tempfile::tempdir().unwrap();
        let data = tempfile::tempdir().unwrap();
        // Never held one: no lease needed to start.
        assert!(!load_lease(run.path(), data.path()).known);
        // Held one on this volume, run directory new (a recreated pod):
        // known, expired, the term kept.
        std::fs::write(data.path().join(LEASE_MARKER), r#"{"term":7}"#).unwrap();
        let lease = load_lease(run.path(), data.path());
        assert!(lease.known && !lease.valid());
        assert_eq!(lease.term, 7);
    }

    #[test]
    fn backoff_survives_many_failures() {
        let mut b = Backoff::default();
        for _ in 0..100 {
            assert!(b.next_delay(Duration::ZERO) <= Duration::from_secs(30));
        }
    }
}
