//! The cluster under a benchmark binary (`stratum-bench`,
//! `stratum-bench-galera`): a temporary directory with the cluster file,
//! `stratum local up` (the `stratum` binary next to the benchmark's) with
//! default settings, the status read from `state.json`, pids and signals,
//! acknowledgement times, and the machine's size for the results table.
//! IO: child processes (`stratum`, kill(1)), the temporary directory,
//! `/proc/meminfo`.

#![allow(dead_code)] // each benchmark uses a part

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

/// A cluster run by `stratum local up` in a temporary directory; `down
/// --purge` and the directory removed when dropped.
pub struct Cluster {
    pub tmp: PathBuf,
    pub file: PathBuf,
    pub state: PathBuf,
    pub up: Option<Child>,
    ups: usize,
    pub stratum: PathBuf,
    /// How long [`Cluster::wait`] waits.
    wait: Duration,
}

impl Cluster {
    /// A fresh temporary directory `<prefix>-<pid>` (readable by the
    /// database user) with `yaml` as `file_name`; nothing started yet.
    pub fn create(
        prefix: &str,
        file_name: &str,
        yaml: &str,
        wait: Duration,
    ) -> anyhow::Result<Self> {
        let exe = std::env::current_exe()?;
        let stratum = exe.with_file_name("stratum");
        anyhow::ensure!(
            stratum.exists(),
            "{} not found: build the workspace first (cargo build)",
            stratum.display()
        );
        let tmp = std::env::temp_dir().join(format!("{prefix}-{}", std::process::id()));
        std::fs::create_dir_all(&tmp)?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
        }
        let file = tmp.join(file_name);
        std::fs::write(&file, yaml)?;
        Ok(Self {
            state: tmp.join("state"),
            tmp,
            file,
            up: None,
            ups: 0,
            stratum,
            wait,
        })
    }

    /// Start `stratum local up` in the background with the default
    /// decision loop and write lease (the tests' shorter ones removed from
    /// its environment); its output goes to `up-<n>.log`.
    pub fn start(&mut self) -> anyhow::Result<()> {
        self.ups += 1;
        let log = std::fs::File::create(self.tmp.join(format!("up-{}.log", self.ups)))?;
        let up = Command::new(&self.stratum)
            .args(["local", "up", "-f"])
            .arg(&self.file)
            .arg("--state-dir")
            .arg(&self.state)
            .env_remove("STRATUM_LOCAL_TICK_MS")
            .env_remove("STRATUM_LOCAL_LEASE_MS")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.up = Some(up);
        Ok(())
    }

    /// The pid of the running `up`.
    pub fn up_pid(&self) -> anyhow::Result<i32> {
        Ok(self.up.as_ref().context("up")?.id() as i32)
    }

    pub fn state_json(&self) -> Value {
        std::fs::read(self.state.join("state.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(Value::Null)
    }

    /// The last status `up` wrote (straight from `state.json`, without
    /// starting a `stratum` process per poll).
    pub fn status(&self) -> Value {
        self.state_json()["status"].clone()
    }

    /// Poll the status every 20 ms until `f` holds; returns it.
    pub async fn wait(&self, what: &str, f: impl Fn(&Value) -> bool) -> anyhow::Result<Value> {
        let deadline = Instant::now() + self.wait;
        loop {
            let s = self.status();
            if f(&s) {
                return Ok(s);
            }
            if Instant::now() > deadline {
                bail!("not {what} within {}s: {s}", self.wait.as_secs());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn instance_dir(&self, name: &str) -> PathBuf {
        self.state.join("instances").join(name)
    }

    /// A file of `secrets/` (a generated password), trimmed.
    pub fn secret(&self, name: &str) -> anyhow::Result<String> {
        let p = self.state.join("secrets").join(name);
        let text = std::fs::read_to_string(&p).with_context(|| p.display().to_string())?;
        Ok(text.trim().to_string())
    }

    pub fn manager_pid(&self, name: &str) -> anyhow::Result<i32> {
        self.state_json()["managers"][name]
            .as_i64()
            .map(|p| p as i32)
            .with_context(|| format!("no manager pid for {name}"))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(&self.stratum)
            .args(["local", "down", "--purge", "--state-dir"])
            .arg(&self.state)
            .output();
        if let Some(mut up) = self.up.take() {
            let _ = up.wait();
        }
        let _ = std::fs::remove_dir_all(&self.tmp);
    }
}

/// Send a signal (`KILL`, `STOP`, `CONT`) with kill(1).
pub fn kill(pid: i32, signal: &str) -> anyhow::Result<()> {
    let ok = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()?
        .success();
    anyhow::ensure!(ok, "kill -{signal} {pid} failed");
    Ok(())
}

/// The port of the member `name` of the status `s` (0 when unknown).
pub fn port_of<P: FromStr + Default>(s: &Value, name: &str) -> P {
    s["instances"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|i| i["name"] == name)
        .and_then(|i| i["address"].as_str())
        .and_then(|a| a.rsplit_once(':'))
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or_default()
}

/// Row number, when, and the port of the server that acknowledged it.
pub type Acks<P> = std::sync::Arc<Mutex<Vec<(i64, Instant, P)>>>;

/// The first acknowledgement after `t` by another server than `port`.
pub fn first_ack_elsewhere<P: PartialEq + Copy>(
    acks: &Acks<P>,
    t: Instant,
    port: P,
) -> Option<Instant> {
    acks.lock()
        .unwrap()
        .iter()
        .find(|(_, at, p)| *at > t && *p != port)
        .map(|(_, at, _)| *at)
}

/// Wait until an acknowledgement after `t` by another server than
/// `port` (`by`, in the error); returns the time from `t`.
pub async fn wait_ack_elsewhere<P: PartialEq + Copy>(
    acks: &Acks<P>,
    t: Instant,
    port: P,
    by: &str,
    within: Duration,
) -> anyhow::Result<Duration> {
    loop {
        if let Some(at) = first_ack_elsewhere(acks, t, port) {
            return Ok(at - t);
        }
        if t.elapsed() > within {
            bail!("no write acknowledged by {by} within {}s", within.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The row numbers of `acks` missing from `present`.
pub fn lost<P>(acks: &Acks<P>, present: &std::collections::BTreeSet<i64>) -> (usize, usize) {
    let acked: Vec<i64> = acks.lock().unwrap().iter().map(|(n, _, _)| *n).collect();
    let lost = acked.iter().filter(|n| !present.contains(n)).count();
    (acked.len(), lost)
}

/// This machine's cores and memory (GiB), for the results table.
pub fn machine() -> (usize, f64) {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0 / 1024.0)
        .unwrap_or(0.0);
    (cores, mem_gib)
}
