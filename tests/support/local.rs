//! The harness of the local-runtime tests (`tests/local_*.rs`): a
//! temporary state directory with a cluster file, `stratum local up` in
//! the background, `status`/`down`/`promote` through the built binary,
//! waits on the status, the tails of every log when something fails, and
//! a client writing numbered rows that records what was acknowledged.
//! IO: child processes (`stratum`, kill(1)), the temporary directory and
//! `/proc`.
//!
//! Included with `#[path = "support/local.rs"] mod local;` rather than
//! through `mod support;`: the local tests need none of the Kubernetes
//! helpers of `support/mod.rs`.
//!
//! Every helper panics with a message saying what it waited for or what
//! failed: these are test helpers.

#![allow(dead_code)] // each test binary uses a part

use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How a test binary runs the local runtime and how long it waits.
#[derive(Clone, Copy)]
pub struct Runtime {
    /// `STRATUM_LOCAL_TICK_MS` of every `stratum` started.
    pub tick_ms: &'static str,
    /// `STRATUM_LOCAL_LEASE_MS`, when the test shortens the write lease.
    pub lease_ms: Option<u64>,
    /// Whether `RUST_BACKTRACE` is removed from `stratum`'s environment.
    pub no_backtrace: bool,
    /// How long [`Local::wait_for`] (and [`wait_acks`]) wait.
    pub timeout: Duration,
    /// How often [`Local::wait_for`] reads the status.
    pub poll: Duration,
    /// The log files of an instance (its directory given) worth reading
    /// when a test fails, with how many last lines of each.
    pub instance_logs: fn(&Path) -> Vec<(PathBuf, usize)>,
    /// Log files of the state directory (relative), with their tails.
    pub state_logs: &'static [(&'static str, usize)],
}

impl Runtime {
    /// `stratum` with this runtime's environment.
    pub fn stratum(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_stratum"));
        c.env("STRATUM_LOCAL_TICK_MS", self.tick_ms);
        if let Some(lease) = self.lease_ms {
            c.env("STRATUM_LOCAL_LEASE_MS", lease.to_string());
        }
        c.env("RUST_LOG", "info");
        if self.no_backtrace {
            c.env_remove("RUST_BACKTRACE");
        }
        c.env_remove("STRATUM_STATE_DIR");
        c
    }
}

/// A temporary workspace with a state directory and a cluster file; a
/// running `up` is stopped (and killed if need be) when it is dropped.
/// `STRATUM_TEST_KEEP=1` keeps the directory and its logs.
pub struct Local {
    pub rt: Runtime,
    pub tmp: tempfile::TempDir,
    pub state: PathBuf,
    /// The cluster file [`Local::start`] runs.
    pub file: PathBuf,
    /// Extra arguments of every [`Local::start`] (e.g. `--bin-dir`).
    pub up_args: Vec<String>,
    pub up: Option<Child>,
    pub ups: usize,
    /// Whether a failure message carried [`Local::logs`] already.
    logs_shown: AtomicBool,
}

impl Local {
    /// A fresh workspace with `yaml` as `file_name`; `up_args` are passed
    /// to every [`Local::start`].
    pub fn create(rt: Runtime, file_name: &str, yaml: &str, up_args: &[&str]) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        // The database user must reach the state directory below it.
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let state = tmp.path().join("state");
        let file = tmp.path().join(file_name);
        std::fs::write(&file, yaml).unwrap();
        Self {
            rt,
            tmp,
            state,
            file,
            up_args: up_args.iter().map(|a| a.to_string()).collect(),
            up: None,
            ups: 0,
            logs_shown: AtomicBool::new(false),
        }
    }

    /// `stratum` with the runtime's environment.
    pub fn stratum(&self) -> Command {
        self.rt.stratum()
    }

    /// Write `text` as `name` in the workspace; returns its path.
    pub fn write_file(&self, name: &str, text: &str) -> PathBuf {
        let p = self.tmp.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn up_log(&self, n: usize) -> PathBuf {
        self.tmp.path().join(format!("up-{n}.log"))
    }

    /// Start `stratum local up -f <file>` in the background.
    pub fn start(&mut self) {
        let (file, args) = (self.file.clone(), self.up_args.clone());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.start_with(&file, &args);
    }

    /// Start `stratum local up -f file` in the background with `extra`
    /// arguments; its output goes to `up-<n>.log`.
    pub fn start_with(&mut self, file: &Path, extra: &[&str]) {
        assert!(self.up.is_none());
        self.ups += 1;
        let log = std::fs::File::create(self.up_log(self.ups)).unwrap();
        let child = self
            .stratum()
            .args(["local", "up", "-f"])
            .arg(file)
            .arg("--state-dir")
            .arg(&self.state)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.up = Some(child);
    }

    /// `stratum local up -f file` in the foreground (handed to the running
    /// `up`, or refused); returns its output.
    pub fn up_once(&self, file: &Path, extra: &[&str]) -> Output {
        self.stratum()
            .args(["local", "up", "-f"])
            .arg(file)
            .arg("--state-dir")
            .arg(&self.state)
            .args(extra)
            .output()
            .unwrap()
    }

    /// SIGKILL the background `up` and reap it.
    pub fn kill_up(&mut self) {
        let mut up = self.up.take().unwrap();
        up.kill().unwrap();
        up.wait().unwrap();
    }

    /// `stratum local <args> --state-dir <state>`.
    pub fn run(&self, args: &[&str]) -> Output {
        self.stratum()
            .arg("local")
            .args(args)
            .arg("--state-dir")
            .arg(&self.state)
            .output()
            .unwrap()
    }

    /// `stratum local <args>`, which must succeed; returns its stdout.
    pub fn run_ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "local {}: {}\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `status -o json`, when it answers; a successful `status` that does
    /// not print one JSON object fails the test.
    pub fn status(&self) -> Option<Value> {
        let out = self.run(&["status", "-o", "json"]);
        if !out.status.success() {
            return None;
        }
        Some(serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "status -o json printed something else than one JSON object ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        }))
    }

    /// `state.json` of the state directory.
    pub fn state_json(&self) -> Value {
        serde_json::from_slice(&std::fs::read(self.state.join("state.json")).unwrap()).unwrap()
    }

    pub fn instance_dir(&self, name: &str) -> PathBuf {
        self.state.join("instances").join(name)
    }

    /// The pid of `name`'s manager as `state.json` records it.
    pub fn manager_pid(&self, name: &str) -> i32 {
        manager_pid_in(&self.state, name).unwrap()
    }

    /// A file of `secrets/` (a generated password).
    pub fn secret(&self, name: &str) -> String {
        std::fs::read_to_string(self.state.join("secrets").join(name)).unwrap()
    }

    /// The tails of every log a failure may be explained by: `up`'s, the
    /// runtime's instance logs of every member directory (also members
    /// added by a scaling, and removed ones whose directory was kept), and
    /// the runtime's state-directory logs.
    pub fn logs(&self) -> String {
        self.logs_shown.store(true, Ordering::SeqCst);
        let mut out = String::new();
        for n in 1..=self.ups {
            out += &format!("==== up-{n}.log (tail)\n{}\n", tail(&self.up_log(n), 80));
        }
        let mut names: Vec<String> = std::fs::read_dir(self.state.join("instances"))
            .map(|d| {
                d.flatten()
                    .filter(|e| e.path().is_dir())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        for name in names {
            let dir = self.instance_dir(&name);
            for (path, n) in (self.rt.instance_logs)(&dir) {
                if path.exists() {
                    let shown = path.strip_prefix(&dir).unwrap_or(&path).display();
                    out += &format!("==== {name} {shown} (tail)\n{}\n", tail(&path, n));
                }
            }
        }
        for (rel, n) in self.rt.state_logs {
            out += &format!("==== {rel} (tail)\n{}\n", tail(&self.state.join(rel), *n));
        }
        out
    }

    /// Wait until `f` holds on the status; returns it. Fails when `up`
    /// exits meanwhile.
    pub fn wait_for(&mut self, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        let started = Instant::now();
        let mut last = None;
        while started.elapsed() < self.rt.timeout {
            if let Some(child) = self.up.as_mut()
                && let Some(exit) = child.try_wait().unwrap()
            {
                self.up = None;
                panic!(
                    "`local up` exited ({exit}) waiting for {what}\n{}",
                    self.logs()
                );
            }
            if let Some(s) = self.status() {
                if f(&s) {
                    eprintln!("{what} after {:.1}s", started.elapsed().as_secs_f64());
                    return s;
                }
                last = Some(s);
            }
            std::thread::sleep(self.rt.poll);
        }
        panic!(
            "not {what} within {}s; last status: {}\n{}",
            self.rt.timeout.as_secs(),
            last.map(|s| serde_json::to_string_pretty(&s).unwrap())
                .unwrap_or_default(),
            self.logs()
        );
    }

    /// Wait until an event of the status contains `needle`.
    pub fn wait_event(&mut self, what: &str, needle: &str) -> Value {
        self.wait_for(what, |s| s["events"].to_string().contains(needle))
    }

    /// Poll `state.json` every 5 ms until `f` picks something from it;
    /// fails with `fail(state.json)` after `within`.
    pub fn wait_state<T>(
        &self,
        within: Duration,
        f: impl Fn(&Value) -> Option<T>,
        fail: impl Fn(&Value) -> String,
    ) -> T {
        let deadline = Instant::now() + within;
        loop {
            let st = self.state_json();
            if let Some(t) = f(&st) {
                return t;
            }
            assert!(Instant::now() < deadline, "{}", fail(&st));
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// `stratum local down --purge` (plain `down` with
    /// `STRATUM_TEST_KEEP`), then reap the background `up`.
    pub fn down(&mut self) {
        let keep = std::env::var_os("STRATUM_TEST_KEEP").is_some();
        let out = self.run(if keep {
            &["down"][..]
        } else {
            &["down", "--purge"][..]
        });
        assert!(
            out.status.success(),
            "down failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        if let Some(mut child) = self.up.take() {
            let _ = child.wait();
        }
    }
}

impl Drop for Local {
    fn drop(&mut self) {
        // A failed assertion anywhere in a test: the logs explain it.
        if std::thread::panicking() && !self.logs_shown.load(Ordering::SeqCst) {
            eprintln!("{}", self.logs());
        }
        if std::env::var_os("STRATUM_TEST_KEEP").is_some() {
            // Debugging: keep the state directory and logs.
            self.tmp.disable_cleanup(true);
            eprintln!("kept {}", self.tmp.path().display());
        }
        if self.state.exists() {
            let _ = self.run(&["down"]);
        }
        if let Some(mut child) = self.up.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The last `n` lines of `path` without the request and "waiting" chatter.
fn tail(path: &Path, n: usize) -> String {
    // The SST logs mariabackup archives are gzip files.
    let bytes = if path.extension().is_some_and(|e| e == "gz") {
        std::process::Command::new("gzip")
            .arg("-dc")
            .arg(path)
            .output()
            .map(|o| o.stdout)
            .unwrap_or_default()
    } else {
        std::fs::read(path).unwrap_or_default()
    };
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| {
            !l.contains("stratum::server")
                && !l.contains("prepare: waiting")
                && !l.contains("prepare: no member")
        })
        .collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The pid of `instance`'s manager as `state.json` in `state` records it.
pub fn manager_pid_in(state: &Path, instance: &str) -> Option<i32> {
    let text = std::fs::read(state.join("state.json")).ok()?;
    let v: Value = serde_json::from_slice(&text).ok()?;
    v["managers"][instance].as_i64().map(|p| p as i32)
}

/// The member `name` of the status `s`.
pub fn instance<'a>(s: &'a Value, name: &str) -> &'a Value {
    s["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == name)
        .unwrap()
}

/// The address (`host:port`) of the member `name` of the status `s`.
pub fn address(s: &Value, name: &str) -> String {
    instance(s, name)["address"].as_str().unwrap().to_string()
}

/// The `rw` endpoint of the status `s`.
pub fn rw_endpoint(s: &Value) -> String {
    s["endpoints"]["rw"].as_str().unwrap().to_string()
}

/// The port of `host:port`.
pub fn port_of(address: &str) -> u16 {
    address.rsplit_once(':').unwrap().1.parse().unwrap()
}

/// Send a signal (`KILL`, `STOP`, `CONT`) with kill(1).
pub fn kill(pid: i32, signal: &str) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(status.success(), "kill -{signal} {pid}");
}

/// Row number, when, and the port of the server that acknowledged it.
pub type Acks<P> = Arc<Mutex<Vec<(i64, Instant, P)>>>;

/// A client inserting numbered rows through `rw` in a loop (the loop is
/// the engine's: see each test's `Writer::start`); it records what was
/// acknowledged, when and by which server (`P`: its port).
pub struct Writer<P> {
    stop: Arc<AtomicBool>,
    pub acked: Acks<P>,
    task: tokio::task::JoinHandle<()>,
    /// How long [`wait_acks`] waits.
    timeout: Duration,
}

impl<P: Copy + PartialEq + Send + 'static> Writer<P> {
    /// Run `client(stop, acks)` as the writer's task.
    pub fn spawn<Fut>(
        timeout: Duration,
        client: impl FnOnce(Arc<AtomicBool>, Acks<P>) -> Fut,
    ) -> Self
    where
        Fut: Future<Output = ()> + Send + 'static,
    {
        let stop = Arc::new(AtomicBool::new(false));
        let acked: Acks<P> = Arc::default();
        let task = tokio::spawn(client(stop.clone(), acked.clone()));
        Self {
            stop,
            acked,
            task,
            timeout,
        }
    }

    pub fn acked_count(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    /// The first acknowledgement after `t` (by another server than `not`).
    pub fn first_ack_after(&self, t: Instant, not: Option<P>) -> Option<Instant> {
        self.acked
            .lock()
            .unwrap()
            .iter()
            .find(|(_, at, p)| *at > t && Some(*p) != not)
            .map(|(_, at, _)| *at)
    }

    /// The longest time without an acknowledgement after `t`.
    pub fn longest_gap_after(&self, t: Instant) -> Duration {
        let acked = self.acked.lock().unwrap();
        let times: Vec<Instant> = acked
            .iter()
            .map(|(_, at, _)| *at)
            .filter(|at| *at > t)
            .collect();
        times
            .windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or_default()
    }

    /// Stop the client; returns the acknowledged row numbers.
    pub async fn stop(self) -> Vec<i64> {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        let acked = self.acked.lock().unwrap();
        acked.iter().map(|(n, _, _)| *n).collect()
    }
}

/// Every row of `acked` is in `present` (read `at`, e.g. " at <address>",
/// or "").
pub fn assert_none_lost(acked: &[i64], present: &std::collections::BTreeSet<i64>, at: &str) {
    let lost: Vec<i64> = acked
        .iter()
        .copied()
        .filter(|n| !present.contains(n))
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged inserts are missing{at}: {:?}",
        lost.len(),
        acked.len(),
        &lost[..lost.len().min(20)]
    );
    eprintln!("all {} acknowledged inserts are present{at}", acked.len());
}

/// Wait until the writer has `more` acknowledgements beyond `base`.
pub async fn wait_acks<P>(w: &Writer<P>, base: usize, more: usize, what: &str)
where
    P: Copy + PartialEq + Send + 'static,
{
    let deadline = Instant::now() + w.timeout;
    while w.acked_count() < base + more {
        assert!(Instant::now() < deadline, "no writes acknowledged {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
