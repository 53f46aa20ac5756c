//! Instance managers as child processes: spawns `stratum instance --config
//! <file>` per instance (own process group, output appended to its
//! `manager.log`), restarts it with backoff when it exits unexpectedly, and
//! stops it on shutdown. Process and filesystem IO.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::instance::{leftovers, manager};

/// How long managers get to stop after SIGTERM before SIGKILL: longer
/// than a manager gives its own server ([`manager::STOP_TIMEOUT`]), so
/// that a manager is never killed while it still waits for a slow server
/// (a Galera joiner finishing its state transfer ignores SIGTERM), which
/// left that server running without a manager.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(manager::STOP_TIMEOUT.as_secs() + 10);
/// How long a server left behind by a manager that had to be killed gets
/// after SIGTERM: its manager already asked it for [`manager::STOP_TIMEOUT`].
const LEFT_SERVER_GRACE: Duration = Duration::from_secs(2);

/// First restart delay; doubled per quick exit up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_secs(1);
/// Longest restart delay.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A manager that ran this long resets the backoff.
const STABLE_AFTER: Duration = Duration::from_secs(60);

/// How to run one manager.
#[derive(Clone, Debug)]
pub struct ManagerSpec {
    /// Instance name.
    pub name: String,
    /// The `stratum` binary.
    pub exe: PathBuf,
    /// Its `instance.json`.
    pub config: PathBuf,
    /// Its `manager.log`.
    pub log: PathBuf,
    /// The instance's run directory, where the manager records the server
    /// it runs (a manager that dies leaves it to us to stop).
    pub run_dir: PathBuf,
}

/// Pids of the running managers, by instance.
pub type Pids = Arc<Mutex<BTreeMap<String, u32>>>;

/// The running managers.
pub struct Supervisor {
    /// Per instance: its own stop signal and its supervising task.
    managers: BTreeMap<String, (watch::Sender<bool>, JoinHandle<()>)>,
    pids: Pids,
}

impl Supervisor {
    /// Start one supervised manager per spec.
    pub fn start(specs: Vec<ManagerSpec>) -> Self {
        let mut sup = Self {
            managers: BTreeMap::new(),
            pids: Pids::default(),
        };
        for spec in specs {
            sup.add(spec);
        }
        sup
    }

    /// Start supervising one more manager (a cluster scaled up). A name
    /// already supervised is left as it is.
    pub fn add(&mut self, spec: ManagerSpec) {
        if self.managers.contains_key(&spec.name) {
            return;
        }
        let (tx, rx) = watch::channel(false);
        let name = spec.name.clone();
        let task = tokio::spawn(supervise(spec, rx, self.pids.clone()));
        self.managers.insert(name, (tx, task));
    }

    /// Stop one manager (SIGTERM, then SIGKILL after [`STOP_TIMEOUT`]) and
    /// stop supervising it (a cluster scaled down). False when `name` was
    /// not supervised.
    pub async fn remove(&mut self, name: &str) -> bool {
        let Some((tx, task)) = self.managers.remove(name) else {
            return false;
        };
        let _ = tx.send(true);
        let _ = task.await;
        true
    }

    /// The supervised instances, running or waiting to restart.
    pub fn names(&self) -> Vec<String> {
        self.managers.keys().cloned().collect()
    }

    /// Pids of the managers running now.
    pub fn pids(&self) -> BTreeMap<String, u32> {
        self.pids.lock().map(|p| p.clone()).unwrap_or_default()
    }

    /// SIGTERM every manager and wait for them, SIGKILL-ing (with their
    /// process groups) those still there after [`STOP_TIMEOUT`].
    pub async fn stop(self) {
        let mut tasks = Vec::new();
        for (_, (tx, task)) in self.managers {
            let _ = tx.send(true);
            tasks.push(task);
        }
        for task in tasks {
            let _ = task.await;
        }
    }
}

/// The delay before the next restart. Pure.
pub fn next_backoff(previous: Duration, ran_for: Duration) -> Duration {
    if ran_for >= STABLE_AFTER {
        MIN_BACKOFF
    } else {
        (previous * 2).clamp(MIN_BACKOFF, MAX_BACKOFF)
    }
}

fn log_line(spec: &ManagerSpec, line: &str) {
    let stamp = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&spec.log)
    {
        let _ = writeln!(f, "{stamp} stratum local: {line}");
    }
}

fn spawn(spec: &ManagerSpec) -> std::io::Result<Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&spec.log)?;
    let err = log.try_clone()?;
    Command::new(&spec.exe)
        .arg("instance")
        .arg("--config")
        .arg(&spec.config)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err)
        // Its own group: a terminal's Ctrl-C reaches `up` only, which
        // stops the managers in order; SIGKILL can take the whole group.
        .process_group(0)
        .kill_on_drop(false)
        .spawn()
}

async fn supervise(spec: ManagerSpec, mut shutdown: watch::Receiver<bool>, pids: Pids) {
    let mut backoff = Duration::ZERO;
    let mut attempt = 0u32;
    loop {
        if *shutdown.borrow() {
            return;
        }
        attempt += 1;
        log_line(
            &spec,
            &format!("starting instance manager {} (start {attempt})", spec.name),
        );
        let started = Instant::now();
        let mut child = match spawn(&spec) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(instance = %spec.name, exe = %spec.exe.display(), error = %e, "failed to start the instance manager");
                log_line(
                    &spec,
                    &format!("failed to start {}: {e}", spec.exe.display()),
                );
                backoff = next_backoff(backoff, Duration::ZERO);
                if wait_or_shutdown(&mut shutdown, backoff).await {
                    return;
                }
                continue;
            }
        };
        let pid = child.id().unwrap_or(0);
        if let Ok(mut p) = pids.lock() {
            p.insert(spec.name.clone(), pid);
        }
        tracing::info!(instance = %spec.name, pid, log = %spec.log.display(), "instance manager started");
        let exit = tokio::select! {
            exit = child.wait() => Some(exit),
            _ = shutdown.wait_for(|s| *s) => None,
        };
        let Some(exit) = exit else {
            stop_child(&spec, &mut child, pid).await;
            if let Ok(mut p) = pids.lock() {
                p.remove(&spec.name);
            }
            return;
        };
        if let Ok(mut p) = pids.lock() {
            p.remove(&spec.name);
        }
        // A manager that died (SIGKILL, a crash) could not stop its server.
        stop_left_server(&spec, manager::STOP_TIMEOUT).await;
        let ran = started.elapsed();
        let exit = exit
            .map(|s| s.to_string())
            .unwrap_or_else(|e| e.to_string());
        if *shutdown.borrow() {
            return;
        }
        backoff = next_backoff(backoff, ran);
        tracing::warn!(instance = %spec.name, pid, %exit, ran_secs = ran.as_secs(), restart_in_ms = backoff.as_millis() as u64, "instance manager exited unexpectedly; restarting");
        log_line(
            &spec,
            &format!(
                "instance manager exited ({exit}); restarting in {}ms",
                backoff.as_millis()
            ),
        );
        if wait_or_shutdown(&mut shutdown, backoff).await {
            return;
        }
    }
}

/// Sleep `d`; true when shutdown was requested meanwhile.
async fn wait_or_shutdown(shutdown: &mut watch::Receiver<bool>, d: Duration) -> bool {
    let slept = tokio::select! {
        _ = tokio::time::sleep(d) => true,
        _ = shutdown.wait_for(|s| *s) => false,
    };
    !slept || *shutdown.borrow()
}

async fn stop_child(spec: &ManagerSpec, child: &mut Child, pid: u32) {
    log_line(spec, "stopping instance manager (SIGTERM)");
    let raw = Pid::from_raw(pid as i32);
    if pid != 0 {
        let _ = kill(raw, Signal::SIGTERM);
    }
    match tokio::time::timeout(STOP_TIMEOUT, child.wait()).await {
        Ok(status) => {
            let status = status
                .map(|s| s.to_string())
                .unwrap_or_else(|e| e.to_string());
            tracing::info!(instance = %spec.name, %status, "instance manager stopped");
            log_line(spec, &format!("instance manager stopped ({status})"));
        }
        Err(_) => {
            tracing::warn!(instance = %spec.name, pid, "instance manager did not stop in {}s; killing its process group", STOP_TIMEOUT.as_secs());
            log_line(
                spec,
                "instance manager did not stop in time; SIGKILL to its process group",
            );
            if pid != 0 {
                let _ = killpg(raw, Signal::SIGKILL);
            }
            let _ = child.wait().await;
        }
    }
    // The database may have outlived a manager that crashed while stopping;
    // anything left in the group goes with it, and the server it recorded.
    if pid != 0 {
        let _ = killpg(raw, Signal::SIGKILL);
    }
    stop_left_server(spec, LEFT_SERVER_GRACE).await;
}

/// Stop the server a manager that is gone left running (it runs in a
/// process group of its own, so the manager's group did not take it).
async fn stop_left_server(spec: &ManagerSpec, grace: Duration) {
    if let Some(what) = leftovers::stop_recorded(&spec.run_dir, grace).await {
        tracing::warn!(instance = %spec.name, "the instance manager left its server running: {what}");
        log_line(spec, &format!("the server it left running: {what}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_caps_and_resets() {
        let mut b = Duration::ZERO;
        let mut seen = Vec::new();
        for _ in 0..7 {
            b = next_backoff(b, Duration::from_secs(1));
            seen.push(b.as_secs());
        }
        assert_eq!(seen, [1, 2, 4, 8, 16, 30, 30]);
        assert_eq!(next_backoff(b, Duration::from_secs(120)), MIN_BACKOFF);
    }

    fn script(dir: &std::path::Path, body: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.join("fake-stratum");
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    #[tokio::test]
    async fn restarts_crashed_managers_and_stops_on_request() {
        let tmp = tempfile::tempdir().unwrap();
        // Exits at once the first time, then runs until SIGTERM.
        let marker = tmp.path().join("ran-once");
        let exe = script(
            tmp.path(),
            &format!(
                "echo \"args: $*\"\nif [ ! -e {m} ]; then touch {m}; exit 3; fi\ntrap 'echo bye; exit 0' TERM\nwhile true; do sleep 0.1; done",
                m = marker.display()
            ),
        );
        let log = tmp.path().join("manager.log");
        let sup_exe = exe.clone();
        let mut sup = Supervisor::start(vec![ManagerSpec {
            name: "simple-fake-0".into(),
            exe,
            config: tmp.path().join("instance.json"),
            log: log.clone(),
            run_dir: tmp.path().to_path_buf(),
        }]);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("args: instance --config")
            .count()
            < 2
        {
            assert!(Instant::now() < deadline, "not restarted");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(sup.pids().len(), 1);

        // One more, then that one alone stopped.
        let log2 = tmp.path().join("manager-2.log");
        sup.add(ManagerSpec {
            name: "simple-fake-1".into(),
            exe: sup_exe.clone(),
            config: tmp.path().join("instance-2.json"),
            log: log2.clone(),
            run_dir: tmp.path().to_path_buf(),
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while sup.pids().len() < 2 {
            assert!(Instant::now() < deadline, "the added manager did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(sup.names(), ["simple-fake-0", "simple-fake-1"]);
        assert!(sup.remove("simple-fake-1").await);
        assert!(!sup.remove("simple-fake-1").await);
        assert_eq!(sup.names(), ["simple-fake-0"]);
        assert_eq!(sup.pids().keys().collect::<Vec<_>>(), ["simple-fake-0"]);
        let text2 = std::fs::read_to_string(&log2).unwrap();
        assert!(
            text2.contains("instance manager stopped (exit status: 0)"),
            "{text2}"
        );
        sup.stop().await;
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(
            text.contains("exited (exit status: 3); restarting in 1000ms"),
            "{text}"
        );
        assert!(text.contains("bye"), "{text}");
        assert!(
            text.contains("instance manager stopped (exit status: 0)"),
            "{text}"
        );
    }
}
