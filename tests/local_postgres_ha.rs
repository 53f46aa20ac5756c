//! High availability end to end on the local runtime with real PostgreSQL
//! 15 (Debian) and, for most scenarios, 17 (PyPI wheel): replication, failover under write load with no acknowledged write
//! lost (synchronous mode), rejoin of the old primary, repeated failures,
//! switchover, the write lease, a frozen primary manager killed on the
//! host before the failover, bad input, `up` killed in the middle
//! of a failover or of a scale-down, scaling 3 → 5 → 2, and parameters
//! reloaded in place or rolled. Every check goes through the `rw` endpoint (or, for the
//! lease, straight to the old primary's port). Each test owns a temporary
//! state directory and stops its cluster when it ends; none skips.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::Value;

#[path = "support/local.rs"]
mod local;
use local::{
    Local, Runtime, address, assert_none_lost, instance, kill, manager_pid_in, rw_endpoint,
    wait_acks,
};

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(90);
/// Short ticks and lease so that the suite stays within a few minutes;
/// the benchmark measures the defaults.
const TICK_MS: &str = "100";
const LEASE_MS: u64 = 3000;

/// The binaries of `version`: Debian's PostgreSQL 15, or a newer major
/// from the cache that scripts/setup.sh fills (found by the driver from
/// `spec.version`, so no `--bin-dir` is passed for it).
fn require_postgres(version: u32) {
    let postgres = if version == 15 {
        Path::new(PG_BIN).join("postgres")
    } else {
        let cache = std::env::var("STRATUM_CACHE").unwrap_or_else(|_| "/var/cache/stratum".into());
        Path::new(&cache).join(format!("postgresql/{version}/bin/postgres"))
    };
    assert!(
        postgres.exists(),
        "PostgreSQL {version} is required at {} : install PostgreSQL 15 with `apt-get install postgresql-15`, newer majors with scripts/setup.sh",
        postgres.display()
    );
}

/// Three instances, quorum-synchronous (any 1): every acknowledged commit
/// is on a replica.
fn simple_pg_ha(version: u32) -> String {
    format!(
        "apiVersion: stratum.dev/v1alpha1
kind: PostgresCluster
metadata:
  name: simple-pg
spec:
  instances: 3
  version: {version}
  storage:
    size: 1Gi
  postgresql:
    synchronous:
      method: any
      number: 1
"
    )
}

const RUNTIME: Runtime = Runtime {
    tick_ms: TICK_MS,
    lease_ms: Some(LEASE_MS),
    no_backtrace: true,
    timeout: CONVERGE_TIMEOUT,
    poll: Duration::from_millis(100),
    instance_logs,
    state_logs: &[],
};

/// The manager's log, and PostgreSQL's own words (a standby that never
/// reaches consistency says why only there).
fn instance_logs(dir: &Path) -> Vec<(PathBuf, usize)> {
    vec![
        (dir.join("manager.log"), 60),
        (dir.join("run/server.log"), 30),
    ]
}

impl Local {
    fn new() -> Self {
        Self::with_version(15)
    }

    fn with_version(version: u32) -> Self {
        Self::with_spec(version, &simple_pg_ha(version))
    }

    /// A workspace with `yaml` as `simple-pg.yaml`; PostgreSQL 15 is
    /// Debian's (`--bin-dir`), newer majors are found by `spec.version`.
    fn with_spec(version: u32, yaml: &str) -> Self {
        require_postgres(version);
        let bin_dir: &[&str] = if version == 15 {
            &["--bin-dir", PG_BIN]
        } else {
            &[]
        };
        Local::create(RUNTIME, "simple-pg.yaml", yaml, bin_dir)
    }

    /// Healthy: every instance ready, one primary (the recognised one), the
    /// others replicas.
    fn wait_converged(&mut self) -> Value {
        self.wait_for("converged (3 ready, one primary)", converged)
    }

    /// [`Self::wait_converged`] on a snapshot taken at least a second after
    /// `since`: after `up` was stopped and resumed, the status file still
    /// holds what it saw before the stop.
    fn wait_converged_after(&mut self, since: chrono::DateTime<chrono::Utc>) -> Value {
        let since = since + chrono::Duration::seconds(1);
        self.wait_for("converged in a fresh snapshot", |s| {
            converged(s)
                && s["observedAt"]
                    .as_str()
                    .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                    .is_some_and(|t| t >= since)
        })
    }

    /// A currentPrimary other than `old`.
    fn wait_new_primary(&mut self, old: &str) -> Value {
        self.wait_for("a new primary", |s| {
            s["currentPrimary"].is_string() && s["currentPrimary"] != old
        })
    }

    /// `name` the primary, with writes routed to it.
    fn wait_primary_is(&mut self, name: &str) -> Value {
        self.wait_for(&format!("{name} the primary"), |s| {
            s["currentPrimary"] == name && s["primary"] == name
        })
    }

    fn password(&self) -> String {
        self.secret("app-password")
    }

    fn postmaster_pid(&self, instance: &str) -> i32 {
        let text = std::fs::read_to_string(
            self.instance_dir(instance)
                .join("data/pgdata/postmaster.pid"),
        )
        .unwrap();
        text.lines().next().unwrap().trim().parse().unwrap()
    }
}

/// What most scenarios start from: a converged cluster whose table has its
/// first 100 rows.
struct Started {
    t0: Instant,
    local: Local,
    status: Value,
    rw: String,
    password: String,
}

impl Started {
    /// `local` started and converged, the table created.
    async fn new(local: Local) -> Self {
        let t = Self::converged(local);
        create_table(&t.rw, &t.password).await;
        t
    }

    /// `local` started and converged.
    fn converged(mut local: Local) -> Self {
        let t0 = Instant::now();
        local.start();
        let status = local.wait_converged();
        let rw = rw_endpoint(&status);
        let password = local.password();
        Self {
            t0,
            local,
            status,
            rw,
            password,
        }
    }

    /// A writer through `rw` (rows from 1001) that has `acks`
    /// acknowledgements.
    async fn writer(&self, acks: usize, what: &str) -> Writer {
        let writer = Writer::start(self.rw.clone(), self.password.clone(), 1000);
        wait_acks(&writer, 0, acks, what).await;
        writer
    }

    /// 20 more acknowledgements, then the writer stopped: every
    /// acknowledged insert is present through `rw`. Returns them.
    async fn finish_writes(&self, writer: Writer, what: &str) -> Vec<i64> {
        wait_acks(&writer, writer.acked_count(), 20, what).await;
        let acked = writer.stop().await;
        assert_all_present(&self.rw, &self.password, &acked).await;
        acked
    }

    /// Report the test's time and stop the cluster.
    fn done(mut self) {
        eprintln!("test took {:.1}s", self.t0.elapsed().as_secs_f64());
        self.local.down();
    }
}

impl std::ops::Deref for Started {
    type Target = Local;
    fn deref(&self) -> &Local {
        &self.local
    }
}

impl std::ops::DerefMut for Started {
    fn deref_mut(&mut self) -> &mut Local {
        &mut self.local
    }
}

fn instance_names() -> Vec<String> {
    (0..3).map(|i| format!("simple-pg-{i}")).collect()
}

/// Healthy and idle, 3 ready, one primary (the recognised one), two replicas.
fn converged(s: &Value) -> bool {
    s["phase"] == "Healthy"
        && s["step"] == "idle"
        && roles(s).iter().filter(|r| *r == "primary").count() == 1
        && roles(s).iter().filter(|r| *r == "replica").count() == 2
        && s["primary"] == s["currentPrimary"]
}

fn roles(s: &Value) -> Vec<String> {
    s["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["role"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// Exactly one instance of `s` is the primary.
fn assert_one_primary(s: &Value) {
    assert_eq!(
        roles(s).iter().filter(|r| *r == "primary").count(),
        1,
        "{s}"
    );
}

/// The name of the first replica of `s`.
fn a_replica(s: &Value) -> String {
    s["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["role"] == "replica")
        .unwrap()["name"]
        .as_str()
        .unwrap()
        .to_string()
}

/// The events of `s`, oldest first.
fn event_list(s: &Value) -> Vec<String> {
    s["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap().to_string())
        .collect()
}

fn primary(s: &Value) -> String {
    s["currentPrimary"].as_str().unwrap().to_string()
}

async fn connect(endpoint: &str, password: &str) -> Result<tokio_postgres::Client, String> {
    let (host, port) = endpoint.rsplit_once(':').unwrap();
    let conn = format!(
        "host={host} port={port} user=app password={password} dbname=app connect_timeout=2"
    );
    let (client, connection) = tokio_postgres::connect(&conn, tokio_postgres::NoTls)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    Ok(client)
}

type Writer = local::Writer<i32>;

impl Writer {
    /// A client inserting numbered rows (from `first + 1`) through `rw` in
    /// a loop, reconnecting after errors; each acknowledgement is recorded
    /// with the port of the server that gave it.
    fn start(rw: String, password: String, first: i64) -> Self {
        Writer::spawn(CONVERGE_TIMEOUT, move |s, a| async move {
            let mut n = first;
            let mut client: Option<tokio_postgres::Client> = None;
            while !s.load(Ordering::Relaxed) {
                if client.is_none() {
                    match connect(&rw, &password).await {
                        Ok(c) => client = Some(c),
                        Err(_) => {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            continue;
                        }
                    }
                }
                let c = client.as_ref().unwrap();
                n += 1;
                let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&n];
                let insert = c.query_one(
                    "INSERT INTO ha_rows (n) VALUES ($1) RETURNING inet_server_port()",
                    &params,
                );
                match tokio::time::timeout(Duration::from_secs(5), insert).await {
                    Ok(Ok(row)) => a.lock().unwrap().push((n, Instant::now(), row.get(0))),
                    _ => {
                        client = None;
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
        })
    }
}

/// Every acknowledged row is readable through `rw`.
async fn assert_all_present(rw: &str, password: &str, acked: &[i64]) {
    let client = connect(rw, password).await.unwrap();
    let rows = client.query("SELECT n FROM ha_rows", &[]).await.unwrap();
    let present: std::collections::BTreeSet<i64> = rows.iter().map(|r| r.get(0)).collect();
    assert_none_lost(acked, &present, "");
}

async fn create_table(rw: &str, password: &str) {
    let client = connect(rw, password).await.unwrap();
    client
        .batch_execute(
            "CREATE TABLE ha_rows (n bigint PRIMARY KEY, at timestamptz DEFAULT now());
             INSERT INTO ha_rows (n) SELECT generate_series(1, 100);",
        )
        .await
        .unwrap();
}

/// Kill the primary's postgres, wait for a new primary and a converged
/// cluster; returns (new status, kill → first acknowledged write).
async fn fail_primary(local: &mut Local, w: &Writer, how: &str) -> (Value, Duration) {
    let before = local.wait_converged();
    let old = primary(&before);
    let old_port: i32 = before["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == old.as_str())
        .unwrap()["address"]
        .as_str()
        .unwrap()
        .rsplit_once(':')
        .unwrap()
        .1
        .parse()
        .unwrap();
    let base = w.acked_count();
    let t_kill = Instant::now();
    match how {
        "postgres" => kill(local.postmaster_pid(&old), "KILL"),
        "manager+postgres" => {
            let (m, p) = (local.manager_pid(&old), local.postmaster_pid(&old));
            kill(m, "KILL");
            kill(p, "KILL");
            // `up` restarts the manager after a second; when the restarted
            // manager brings its server back as the writer (lease still
            // valid) before the primary counts as failed, there is rightly
            // no failover: the cluster converges on the same primary.
            let term = before["term"].as_u64();
            let state = local.state.clone();
            let after = local.wait_for("a new primary, or the old one back", |s| {
                let moved = s["currentPrimary"].is_string() && s["currentPrimary"] != old.as_str();
                let back = s["currentPrimary"] == old.as_str()
                    && s["term"].as_u64() == term
                    && s["phase"] == "Healthy"
                    && manager_pid_in(&state, &old) != Some(m)
                    && std::fs::read_to_string(
                        state
                            .join("instances")
                            .join(&old)
                            .join("data/pgdata/postmaster.pid"),
                    )
                    .ok()
                    .and_then(|t| t.lines().next().map(|l| l.trim() != p.to_string()))
                    .unwrap_or(false);
                moved || back
            });
            if primary(&after) == old {
                wait_acks(w, base, 20, "after the restart of the primary").await;
                let first = w.first_ack_after(t_kill, None).unwrap() - t_kill;
                eprintln!(
                    "killed {how} of {old}: its manager restarted it as the primary before a failover was due; first write acknowledged {}ms after the kill",
                    first.as_millis()
                );
                return (local.wait_converged(), first);
            }
        }
        _ => unreachable!(),
    }
    wait_acks(w, base, 1, "after the kill").await;
    let after = local.wait_new_primary(&old);
    wait_acks(w, w.acked_count(), 20, "on the new primary").await;
    let first = w.first_ack_after(t_kill, Some(old_port)).unwrap() - t_kill;
    eprintln!(
        "killed {how} of {old}: {} is the primary; first write acknowledged {}ms after the kill",
        primary(&after),
        first.as_millis()
    );
    let converged = local.wait_converged();
    let rejoined = converged["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == old.as_str())
        .unwrap();
    assert_eq!(rejoined["role"], "replica", "{converged}");
    (converged, first)
}

/// (a) three instances Healthy, rows through `rw` on both replicas; (b)
/// kill -9 of the primary's postgres under a writer: a new primary takes
/// writes, every acknowledged insert is there, the old primary rejoins as
/// a replica (pg_rewind) and the cluster is back to 3 ready.
#[tokio::test(flavor = "multi_thread")]
async fn ha_replicates_then_fails_over_without_losing_acknowledged_writes() {
    let mut local = Started::converged(Local::new());
    let status = local.status.clone();
    eprintln!(
        "3 instances Healthy after {:.1}s",
        local.t0.elapsed().as_secs_f64()
    );
    let rw = status["endpoints"]["rw"].as_str().unwrap().to_string();
    let password = local.password();
    create_table(&rw, &password).await;

    // (a) Both replicas hold the rows.
    for instance in status["instances"].as_array().unwrap() {
        if instance["role"] != "replica" {
            continue;
        }
        let replica = connect(instance["address"].as_str().unwrap(), &password)
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let n: i64 = replica
                .query_one("SELECT count(*) FROM ha_rows", &[])
                .await
                .map(|r| r.get(0))
                .unwrap_or(0);
            if n == 100 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} has {n} of 100 rows",
                instance["name"]
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    // (b) Failover under write load.
    let writer = local.writer(50, "before the kill").await;
    let (converged, first) = fail_primary(&mut local, &writer, "postgres").await;
    let acked = writer.stop().await;
    assert_all_present(&rw, &password, &acked).await;
    assert_eq!(converged["timeline"], 2, "{converged}");
    let events = converged["events"].to_string();
    for step in ["FailoverStarted", "FailoverCandidate", "Promoted", "Follow"] {
        assert!(events.contains(step), "no {step} event in {events}");
    }
    eprintln!(
        "failover: first write {}ms after the kill; test took {:.1}s",
        first.as_millis(),
        local.t0.elapsed().as_secs_f64()
    );
    local.down();
}

/// (c) the primary's manager and postgres killed together, a replica
/// killed, the primary killed five times in a row: converges each time
/// with no acknowledged write lost.
#[tokio::test(flavor = "multi_thread")]
async fn ha_converges_after_repeated_failures() {
    converges_after_repeated_failures(15).await;
}

/// The repeated failures of [`ha_converges_after_repeated_failures`] on
/// PostgreSQL 17 from the wheel.
#[tokio::test(flavor = "multi_thread")]
async fn ha_converges_after_repeated_failures_on_postgresql_17() {
    converges_after_repeated_failures(17).await;
}

async fn converges_after_repeated_failures(version: u32) {
    let mut local = Started::new(Local::with_version(version)).await;
    let (rw, password) = (local.rw.clone(), local.password.clone());
    let writer = local.writer(20, "at start").await;

    fail_primary(&mut local, &writer, "manager+postgres").await;

    // A replica's postgres killed: its manager restarts it; no failover.
    let s = local.wait_converged();
    let term = s["term"].as_u64().unwrap();
    let replica = a_replica(&s);
    kill(local.postmaster_pid(&replica), "KILL");
    std::thread::sleep(Duration::from_millis(500));
    let s = local.wait_converged();
    assert_eq!(
        s["term"].as_u64().unwrap(),
        term,
        "a replica's crash is no failover"
    );

    for round in 1..=5 {
        eprintln!("primary kill {round} of 5");
        fail_primary(&mut local, &writer, "postgres").await;
    }

    let acked = writer.stop().await;
    assert_all_present(&rw, &password, &acked).await;
    local.done();
}

/// (e) `up` killed in the middle of a failover (right after it persisted
/// the intent) and restarted: it stops the managers the killed `up` left,
/// resumes the failover, and ends with exactly one primary and no
/// acknowledged write lost.
#[tokio::test(flavor = "multi_thread")]
async fn ha_up_killed_mid_failover_resumes_with_one_primary() {
    up_killed_mid_failover_resumes_with_one_primary(15).await;
}

/// [`ha_up_killed_mid_failover_resumes_with_one_primary`] on PostgreSQL 17
/// from the wheel.
#[tokio::test(flavor = "multi_thread")]
async fn ha_up_killed_mid_failover_resumes_on_postgresql_17() {
    up_killed_mid_failover_resumes_with_one_primary(17).await;
}

async fn up_killed_mid_failover_resumes_with_one_primary(version: u32) {
    let mut local = Started::new(Local::with_version(version)).await;
    let writer = local.writer(50, "at start").await;
    // Kill `up` as soon as it has persisted a failover intent.
    let s = local.wait_converged();
    let old = primary(&s);
    let term = s["term"].as_u64().unwrap();
    kill(local.postmaster_pid(&old), "KILL");
    let step = local.wait_state(
        Duration::from_secs(20),
        |st| {
            (st["ha"]["step"]["type"] == "failover" || st["ha"]["term"].as_u64() != Some(term))
                .then(|| st["ha"]["step"].clone())
        },
        |_| "no failover started".into(),
    );
    eprintln!("killing `up` at step {step}");
    local.kill_up();
    local.start();
    let s = local.wait_converged();
    assert_ne!(primary(&s), old, "{s}");
    local.finish_writes(writer, "after the restart of up").await;
    let s = local.wait_converged();
    assert_one_primary(&s);
    local.done();
}

/// (f) promote to a missing instance or to the primary is refused and
/// changes nothing; (d) switchover under write load with sub-second write
/// unavailability; the write lease: a primary cut off from the operator
/// (`up` stopped, no lease renewals) and from one replica (its manager
/// frozen, so no failsafe) stops taking writes by itself.
#[tokio::test(flavor = "multi_thread")]
async fn ha_switchover_bad_input_and_lease() {
    switchover_bad_input_and_lease(15).await;
}

/// [`ha_switchover_bad_input_and_lease`] on PostgreSQL 17 from the wheel.
#[tokio::test(flavor = "multi_thread")]
async fn ha_switchover_bad_input_and_lease_on_postgresql_17() {
    switchover_bad_input_and_lease(17).await;
}

async fn switchover_bad_input_and_lease(version: u32) {
    let mut local = Started::new(Local::with_version(version)).await;
    let status = local.status.clone();
    let (rw, password) = (local.rw.clone(), local.password.clone());
    let old = primary(&status);
    let term = status["term"].as_u64().unwrap();

    // (f) Bad input.
    for (target, want) in [
        ("simple-pg-9", "there is no instance \"simple-pg-9\""),
        (old.as_str(), "is already the primary"),
    ] {
        let out = local.run(&["promote", target]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "promote {target} succeeded");
        assert!(stderr.contains(want), "promote {target}: {stderr}");
    }
    let s = local.status().unwrap();
    assert_eq!(primary(&s), old);
    assert_eq!(s["term"].as_u64().unwrap(), term);

    // (d) Switchover under load.
    let writer = local.writer(50, "before the switchover").await;
    let target = a_replica(&s);
    let t_switch = Instant::now();
    let out = local.run(&["promote", &target]);
    assert!(
        out.status.success(),
        "promote {target}: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        local.logs()
    );
    eprintln!("{}", String::from_utf8_lossy(&out.stdout).trim());
    wait_acks(&writer, writer.acked_count(), 50, "after the switchover").await;
    let gap = writer.longest_gap_after(t_switch);
    eprintln!("switchover: writes unavailable for {}ms", gap.as_millis());
    // Sub-second on an idle machine (see docs/benchmarks.md); the bound
    // here only catches a switchover that degenerates into a failover.
    assert!(gap < Duration::from_secs(6), "switchover gap {gap:?}");
    let s = local.wait_converged();
    assert_eq!(primary(&s), target);
    let acked = writer.stop().await;
    assert_all_present(&rw, &password, &acked).await;

    // The lease: stop `up` (no renewals); the primary's manager stops its
    // server within the lease TTL. Writes straight to its port fail.
    let address = s["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == target.as_str())
        .unwrap()["address"]
        .as_str()
        .unwrap()
        .to_string();
    let direct = connect(&address, &password).await.unwrap();
    direct
        .execute("INSERT INTO ha_rows (n) VALUES (-1)", &[])
        .await
        .unwrap();
    let up_pid = local.up.as_ref().unwrap().id() as i32;
    // The primary keeps its lease on failsafe while every replica
    // acknowledges it: one replica's manager frozen too, so that one
    // cannot (docs/failover.md, "Failsafe").
    let replica = instance_names().into_iter().find(|n| *n != target).unwrap();
    let replica_manager = local.manager_pid(&replica);
    kill(replica_manager, "STOP");
    kill(up_pid, "STOP");
    let stopped_at = Instant::now();
    let mut refused_after = None;
    for n in 2.. {
        let ok = match connect(&address, &password).await {
            Ok(c) => tokio::time::timeout(
                Duration::from_secs(2),
                c.execute("INSERT INTO ha_rows (n) VALUES ($1)", &[&-(n as i64)]),
            )
            .await
            .is_ok_and(|r| r.is_ok()),
            Err(_) => false,
        };
        if !ok {
            refused_after = Some(stopped_at.elapsed());
            break;
        }
        if stopped_at.elapsed() > Duration::from_millis(LEASE_MS * 3) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    kill(up_pid, "CONT");
    kill(replica_manager, "CONT");
    let resumed = chrono::Utc::now();
    let refused_after = refused_after.expect("the cut-off primary kept taking writes");
    eprintln!(
        "cut off from the operator, {target} stopped taking writes after {}ms (lease {LEASE_MS}ms)",
        refused_after.as_millis()
    );
    // TTL, the watchdog period and a fast shutdown on a loaded machine.
    assert!(refused_after <= Duration::from_millis(LEASE_MS + 3000));
    // Back in touch, the operator finds the primary stopped by its own
    // manager: it fails over (or grants the lease again); either way one
    // primary, and writes through rw work.
    let s = local.wait_converged_after(resumed);
    assert_one_primary(&s);
    let t_back = Instant::now();
    loop {
        let err = match connect(&rw, &password).await {
            Ok(c) => match c
                .execute("INSERT INTO ha_rows (n) VALUES (-100000)", &[])
                .await
            {
                Ok(_) => break,
                Err(e) => e.to_string(),
            },
            Err(e) => e,
        };
        assert!(
            t_back.elapsed() < Duration::from_secs(20),
            "no write through rw within 20 s of a converged status: {err}\n{}",
            local.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "a write through rw {}ms after the converged status",
        t_back.elapsed().as_millis()
    );
    local.done();
}

/// The failover of (b) on a newer major: PostgreSQL 17 from the PyPI wheel
/// (its own libpq, pg_rewind of 17), found by `spec.version`.
#[tokio::test(flavor = "multi_thread")]
async fn ha_fails_over_on_postgresql_17() {
    let mut local = Started::converged(Local::with_version(17));
    let (rw, password) = (local.rw.clone(), local.password.clone());
    let client = connect(&rw, &password).await.unwrap();
    let version: String = client
        .query_one("SHOW server_version", &[])
        .await
        .unwrap()
        .get(0);
    assert!(version.starts_with("17."), "server_version {version}");
    create_table(&rw, &password).await;
    let writer = local.writer(50, "before the kill").await;
    let (converged, first) = fail_primary(&mut local, &writer, "postgres").await;
    let acked = writer.stop().await;
    assert_all_present(&rw, &password, &acked).await;
    assert_eq!(converged["timeline"], 2, "{converged}");
    eprintln!(
        "PostgreSQL 17 failover: first write {}ms after the kill; test took {:.1}s",
        first.as_millis(),
        local.t0.elapsed().as_secs_f64()
    );
    local.down();
}

/// `SHOW synchronous_standby_names` through `rw`, polled until `want`.
async fn wait_sync_names(rw: &str, password: &str, want: &str) {
    let deadline = Instant::now() + CONVERGE_TIMEOUT;
    let mut last = String::new();
    while Instant::now() < deadline {
        if let Ok(c) = connect(rw, password).await
            && let Ok(row) = c.query_one("SHOW synchronous_standby_names", &[]).await
        {
            last = row.get(0);
            if last == want {
                eprintln!("synchronous_standby_names = {want}");
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("synchronous_standby_names is {last:?}, not {want:?}");
}

/// An insert through `rw` acknowledged within 5 s.
async fn insert_ok(rw: &str, password: &str, n: i64) {
    let c = connect(rw, password).await.unwrap();
    tokio::time::timeout(
        Duration::from_secs(5),
        c.execute("INSERT INTO ha_rows (n) VALUES ($1)", &[&n]),
    )
    .await
    .unwrap_or_else(|_| panic!("insert {n} not acknowledged within 5s"))
    .unwrap();
}

/// Synchronous standbys kept right as replicas come and go
/// (`number: 2, minSyncReplicas: 1`): both replicas confirm commits while
/// both stream; with one gone (its manager frozen, its postgres killed) the
/// primary waits for the remaining one only, so writes go on; back, both
/// again.
#[tokio::test(flavor = "multi_thread")]
async fn ha_synchronous_standbys_follow_the_replicas() {
    let yaml = simple_pg_ha(15).replace(
        "      number: 1\n",
        "      number: 2\n      minSyncReplicas: 1\n",
    );
    assert!(yaml.contains("minSyncReplicas: 1"));
    let mut local = Started::converged(Local::with_spec(15, &yaml));
    let status = local.status.clone();
    let (rw, password) = (local.rw.clone(), local.password.clone());
    let p = primary(&status);
    let replicas: Vec<String> = instance_names().into_iter().filter(|n| *n != p).collect();
    let both = format!("ANY 2 (\"{}\",\"{}\")", replicas[0], replicas[1]);
    wait_sync_names(&rw, &password, &both).await;
    create_table(&rw, &password).await;

    let gone = replicas[1].clone();
    let manager = local.manager_pid(&gone);
    kill(manager, "STOP");
    kill(local.postmaster_pid(&gone), "KILL");
    let one = format!("ANY 1 (\"{}\")", replicas[0]);
    wait_sync_names(&rw, &password, &one).await;
    insert_ok(&rw, &password, -1).await;

    kill(manager, "CONT");
    wait_sync_names(&rw, &password, &both).await;
    insert_ok(&rw, &password, -2).await;
    let s = local.wait_converged();
    assert!(
        s["events"].to_string().contains("SynchronousStandbys"),
        "{}",
        s["events"]
    );
    local.done();
}

/// `yaml` with `parameters` (YAML lines, indented by the caller after the
/// first) in `spec.postgresql.parameters`.
fn with_parameters(yaml: &str, parameters: &str) -> String {
    yaml.replace(
        "    synchronous:\n",
        &format!("    parameters:\n      {parameters}\n    synchronous:\n"),
    )
}

/// The cluster file with the fencing annotation set to `fenced` (a JSON
/// list), or without it.
fn with_fencing(fenced: Option<&str>) -> String {
    let yaml = simple_pg_ha(15);
    match fenced {
        None => yaml,
        Some(list) => yaml.replace(
            "  name: simple-pg\n",
            &format!(
                "  name: simple-pg\n  annotations:\n    stratum.dev/fencedInstances: '{list}'\n"
            ),
        ),
    }
}

impl Local {
    /// `stratum local up -f` with `yaml` while `up` runs: the change is
    /// handed to it. Returns the command's output.
    fn apply(&self, yaml: &str) -> Output {
        let file = self.write_file("changed.yaml", yaml);
        self.up_once(&file, &["--bin-dir", PG_BIN])
    }

    /// `yaml` applied, the rolling restart it needs done, the cluster
    /// converged again; returns that status.
    fn roll_out(&mut self, yaml: &str) -> Value {
        self.apply_ok(yaml);
        self.wait_event("the rolling restart done", "RollingRestartDone");
        self.wait_converged()
    }

    /// A rolling restart resumed (by a new `up`) and then done.
    fn wait_resumed_roll_done(&mut self) -> Value {
        self.wait_for("the resumed rolling restart done", |s| {
            let events = s["events"].to_string();
            events
                .split("RollingRestartResumed")
                .nth(1)
                .is_some_and(|after| after.contains("RollingRestartDone"))
        })
    }

    /// `up` SIGKILLed, then started again with `yaml` as its file.
    fn restart_up_with(&mut self, yaml: &str) {
        self.kill_up();
        std::fs::write(&self.file, yaml).unwrap();
        self.start();
    }

    /// [`Self::apply`], which must be taken.
    fn apply_ok(&self, yaml: &str) {
        let out = self.apply(yaml);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A changed CR applied to the running cluster (`up -f` again): invalid
/// (an operator-owned parameter) or not changeable live (storage size) is
/// refused naming the field, the cluster untouched; the fencing annotation
/// `stratum.dev/fencedInstances` stops a replica (no failover, writes go
/// on), fences the primary (failover to a replica that is not fenced), and
/// with `["*"]` stops everything without a failover; removing it brings
/// every instance back.
#[tokio::test(flavor = "multi_thread")]
async fn ha_apply_changed_cr_and_fencing() {
    let mut local = Started::new(Local::new()).await;
    let s = local.status.clone();
    let (rw, password) = (local.rw.clone(), local.password.clone());
    let p = primary(&s);
    let term = s["term"].as_u64().unwrap();
    let saved = std::fs::read(local.state.join("cluster.yaml")).unwrap();

    // Refused: invalid, and valid but not changeable live.
    let bad = with_parameters(&simple_pg_ha(15), "port: '6000'");
    for (yaml, want) in [
        (bad, "spec.postgresql.parameters.port"),
        (
            simple_pg_ha(15).replace("size: 1Gi", "size: 2Gi"),
            "changing spec.storage.size on a running local cluster is not supported yet",
        ),
        (
            with_fencing(Some(r#"["simple-pg-7"]"#)),
            "metadata.annotations[stratum.dev/fencedInstances]: there is no instance \"simple-pg-7\"",
        ),
    ] {
        let out = local.apply(&yaml);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "applied: {yaml}");
        assert!(stderr.contains(want), "{stderr}");
    }
    let s = local.wait_converged();
    assert_eq!(primary(&s), p);
    assert_eq!(s["term"].as_u64().unwrap(), term);
    assert_eq!(
        std::fs::read(local.state.join("cluster.yaml")).unwrap(),
        saved
    );
    insert_ok(&rw, &password, -1).await;

    // A replica fenced: stopped and kept down, no failover, writes go on.
    let replica = instance_names().into_iter().find(|n| *n != p).unwrap();
    local.apply_ok(&with_fencing(Some(&format!(r#"["{replica}"]"#))));
    local.wait_for("the fenced replica down", |s| {
        instance(s, &replica)["ready"] == false
    });
    std::thread::sleep(Duration::from_secs(3));
    let s = local.status().unwrap();
    assert_eq!(instance(&s, &replica)["ready"], false, "{s}");
    assert_eq!(s["term"].as_u64().unwrap(), term);
    insert_ok(&rw, &password, -2).await;

    // Unfenced: back as a replica.
    local.apply_ok(&with_fencing(None));
    local.wait_converged();

    // The primary fenced: a failover to a replica that is not fenced.
    local.apply_ok(&with_fencing(Some(&format!(r#"["{p}"]"#))));
    let s = local.wait_new_primary(&p);
    let q = primary(&s);
    local.wait_for("writes routed to the new primary", |s| {
        s["primary"] == q.as_str()
    });
    insert_ok(&rw, &password, -3).await;
    let s = local.status().unwrap();
    assert_eq!(instance(&s, &p)["ready"], false, "{s}");

    // Everything fenced: stopped, no failover, no writes.
    let term = s["term"].as_u64().unwrap();
    local.apply_ok(&with_fencing(Some(r#"["*"]"#)));
    local.wait_for("every instance down", |s| {
        s["instances"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["ready"] == false)
    });
    std::thread::sleep(Duration::from_secs(2));
    let s = local.status().unwrap();
    assert_eq!(s["term"].as_u64().unwrap(), term, "no failover: {s}");
    assert_eq!(primary(&s), q);
    assert!(connect(&rw, &password).await.is_err(), "rw still connects");

    // Unfenced: the same primary, every instance back.
    local.apply_ok(&with_fencing(None));
    let s = local.wait_converged();
    assert_eq!(primary(&s), q);
    insert_ok(&rw, &password, -4).await;
    let client = connect(&rw, &password).await.unwrap();
    let n: i64 = client
        .query_one("SELECT count(*) FROM ha_rows WHERE n < 0", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 4);
    local.done();
}

/// A restart-only parameter (`max_connections`, raised: a standby needs at
/// least the primary's value) changed on the running cluster under a
/// writer: the replicas restart one at a time, each
/// streaming again before the next, then the primary is switched over to
/// an updated replica and restarted last; every instance runs with the new
/// value and no acknowledged write is lost (synchronous mode).
#[tokio::test(flavor = "multi_thread")]
async fn ha_rolling_restart_for_a_changed_parameter() {
    let mut local = Started::new(Local::new()).await;
    let s = local.status.clone();
    let password = local.password.clone();
    let old = primary(&s);
    let writer = local.writer(50, "before the change").await;

    let changed = with_parameters(&simple_pg_ha(15), "max_connections: '150'");
    let s = local.roll_out(&changed);
    assert_ne!(primary(&s), old, "the primary was switched over: {s}");
    local
        .finish_writes(writer, "after the rolling restart")
        .await;
    assert_setting_everywhere(&s, &password, "max_connections", "150").await;
    let events = s["events"].to_string();
    let restarts = events.matches("runs with the new configuration").count();
    assert!(restarts >= 3, "{events}");
    local.done();
}

/// `primaryUpdateStrategy: supervised`: after a parameter change the
/// replicas restart, then the operator waits; a manual switchover
/// (`stratum local promote`) lets it restart the old primary last.
#[tokio::test(flavor = "multi_thread")]
async fn ha_rolling_restart_supervised_waits_for_promote() {
    let supervised = |extra: &str| {
        simple_pg_ha(15).replace(
            "  instances: 3\n",
            &format!("  instances: 3\n  primaryUpdateStrategy: supervised\n{extra}"),
        )
    };
    let mut local = Started::converged(Local::with_spec(15, &supervised("")));
    let s = local.status.clone();
    let old = primary(&s);
    let changed = with_parameters(&supervised(""), "max_connections: '150'");
    local.apply_ok(&changed);
    let s = local.wait_event(
        "waiting for a manual switchover",
        "primaryUpdateStrategy is supervised",
    );
    assert_eq!(primary(&s), old);
    let target = instance_names().into_iter().find(|n| *n != old).unwrap();
    let s = local.wait_converged();
    assert_eq!(primary(&s), old);
    local.run_ok(&["promote", &target]);
    local.wait_event("the rolling restart done", "RollingRestartDone");
    let s = local.wait_converged();
    assert_eq!(primary(&s), target);
    let password = local.password();
    assert_setting_everywhere(&s, &password, "max_connections", "150").await;
    local.done();
}

/// `primaryUpdateMethod: restart`: after the replicas, the primary is
/// restarted in place (no switchover, no failover: same primary, same
/// term) and no acknowledged write is lost.
#[tokio::test(flavor = "multi_thread")]
async fn ha_rolling_restart_primary_in_place() {
    let spec = |extra: &str| {
        simple_pg_ha(15).replace(
            "  instances: 3\n",
            &format!("  instances: 3\n  primaryUpdateMethod: restart\n{extra}"),
        )
    };
    let mut local = Started::new(Local::with_spec(15, &spec(""))).await;
    let s = local.status.clone();
    let password = local.password.clone();
    let old = primary(&s);
    let term = s["term"].as_u64().unwrap();
    let writer = local.writer(50, "before the change").await;
    let changed = with_parameters(&spec(""), "max_connections: '150'");
    let s = local.roll_out(&changed);
    assert_eq!(primary(&s), old, "{s}");
    assert_eq!(s["term"].as_u64().unwrap(), term, "no failover: {s}");
    local
        .finish_writes(writer, "after the rolling restart")
        .await;
    assert_setting_everywhere(&s, &password, "max_connections", "150").await;
    local.done();
}

/// `connect` as the superuser (replication views show everything to it).
async fn connect_superuser(local: &Local, endpoint: &str) -> tokio_postgres::Client {
    let password = std::fs::read_to_string(local.state.join("secrets/superuser-password")).unwrap();
    let (host, port) = endpoint.rsplit_once(':').unwrap();
    let conn = format!(
        "host={host} port={port} user=postgres password={password} dbname=postgres connect_timeout=2"
    );
    let (client, connection) = tokio_postgres::connect(&conn, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
}

/// The Stratum replication slots on the server at `endpoint`, sorted.
async fn stratum_slots(local: &Local, endpoint: &str) -> Vec<String> {
    let c = connect_superuser(local, endpoint).await;
    c.query(
        "SELECT slot_name::text FROM pg_replication_slots WHERE slot_name LIKE 'stratum%' ORDER BY 1",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// The replicas streaming from the server at `endpoint`, sorted.
async fn streaming_from(local: &Local, endpoint: &str) -> Vec<String> {
    let c = connect_superuser(local, endpoint).await;
    c.query(
        "SELECT application_name FROM pg_stat_replication WHERE state = 'streaming' ORDER BY 1",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

impl Local {
    /// Healthy with exactly `names`: every one ready, one primary (the
    /// recognised one), the others replicas.
    fn wait_instances(&mut self, names: &[&str]) -> Value {
        let want: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        self.wait_for(&format!("converged on {}", want.join(", ")), |s| {
            let have: Vec<String> = s["instances"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i["name"].as_str().unwrap_or_default().to_string())
                .collect();
            have == want
                && s["phase"] == "Healthy"
                && s["step"] == "idle"
                && roles(s).iter().filter(|r| *r == "primary").count() == 1
                && roles(s).iter().filter(|r| *r == "replica").count() == want.len() - 1
                && s["primary"] == s["currentPrimary"]
        })
    }
}

/// Wait until every replica of `s` streams from its primary, each has its
/// slot there and no other Stratum slot is left, and each has the row `n`.
async fn assert_replicas_streaming(local: &Local, s: &Value, n: i64) {
    let p = primary(s);
    let primary_addr = address(s, &p);
    let mut replicas: Vec<String> = s["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap().to_string())
        .filter(|name| *name != p)
        .collect();
    replicas.sort();
    let slots: Vec<String> = replicas
        .iter()
        .map(|r| format!("stratum_{}", r.replace('-', "_")))
        .collect();
    let deadline = Instant::now() + CONVERGE_TIMEOUT;
    loop {
        let streaming = streaming_from(local, &primary_addr).await;
        let have_slots = stratum_slots(local, &primary_addr).await;
        if streaming == replicas && have_slots == slots {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "on {p}: streaming {streaming:?}, slots {have_slots:?}; want {replicas:?} / {slots:?}\n{}",
            local.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let password = local.password();
    for r in &replicas {
        let addr = address(s, r);
        let deadline = Instant::now() + CONVERGE_TIMEOUT;
        loop {
            let c = connect(&addr, &password).await.unwrap();
            let found: i64 = c
                .query_one("SELECT count(*) FROM ha_rows WHERE n = $1", &[&n])
                .await
                .unwrap()
                .get(0);
            if found == 1 {
                break;
            }
            assert!(Instant::now() < deadline, "row {n} not on {r}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    eprintln!("{p} streams to {replicas:?} through their slots; row {n} on each");
}

/// Scaling a running cluster under a writer in synchronous mode (issue 3
/// test 4): 3 → 5 (new replicas cloned from the primary, streaming
/// through their slots, the rows on them), the primary moved to a new
/// instance, then 5 → 2 (the primary is among the removed: switched over
/// to a kept replica first; the removed instances' slots dropped, the
/// synchronous standbys recomputed). No acknowledged write is lost. A scale
/// that leaves synchronous `number` >= instances is refused naming the
/// field, the cluster untouched. Then `up` stopped and started with 3
/// instances: the retained data of the third rejoins.
#[tokio::test(flavor = "multi_thread")]
async fn ha_scales_up_and_down_under_writes() {
    scales_up_and_down_under_writes(15).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ha_scales_up_and_down_under_writes_on_postgresql_17() {
    scales_up_and_down_under_writes(17).await;
}

async fn scales_up_and_down_under_writes(version: u32) {
    let mut local = Started::new(Local::with_version(version)).await;
    let (rw, password) = (local.rw.clone(), local.password.clone());
    let writer = local.writer(50, "before scaling").await;

    // 3 → 5.
    let five = simple_pg_ha(version).replace("instances: 3", "instances: 5");
    local.apply_ok(&five);
    let all5 = [
        "simple-pg-0",
        "simple-pg-1",
        "simple-pg-2",
        "simple-pg-3",
        "simple-pg-4",
    ];
    local.wait_instances(&all5);
    insert_ok(&rw, &password, -1).await;
    let s = local.wait_instances(&all5);
    assert_replicas_streaming(&local, &s, -1).await;
    wait_acks(&writer, writer.acked_count(), 20, "after scaling up").await;

    // The primary moves to a new instance, so that scaling down has to
    // move it again.
    local.run_ok(&["promote", "simple-pg-4"]);
    local.wait_primary_is("simple-pg-4");
    let s = local.wait_instances(&all5);
    let term = s["term"].as_u64().unwrap();
    wait_acks(&writer, writer.acked_count(), 20, "on simple-pg-4").await;

    // Refused: synchronous number 1 with 1 instance; nothing changes.
    let saved = std::fs::read(local.state.join("cluster.yaml")).unwrap();
    let out = local.apply(&simple_pg_ha(version).replace("instances: 3", "instances: 1"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "applied instances: 1");
    assert!(
        stderr.contains("spec.postgresql.synchronous.number")
            && stderr.contains("less than spec.instances"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read(local.state.join("cluster.yaml")).unwrap(),
        saved
    );
    let s = local.wait_instances(&all5);
    assert_eq!(s["term"].as_u64().unwrap(), term);
    assert_eq!(primary(&s), "simple-pg-4");

    // 5 → 2: simple-pg-4 (the primary), -3 and -2 go.
    let two = simple_pg_ha(version).replace("instances: 3", "instances: 2");
    local.apply_ok(&two);
    let s = local.wait_instances(&["simple-pg-0", "simple-pg-1"]);
    let p = primary(&s);
    assert!(p == "simple-pg-0" || p == "simple-pg-1", "{s}");
    wait_acks(&writer, writer.acked_count(), 20, "after scaling down").await;
    insert_ok(&rw, &password, -2).await;
    assert_replicas_streaming(&local, &s, -2).await;
    let other = if p == "simple-pg-0" {
        "simple-pg-1"
    } else {
        "simple-pg-0"
    };
    wait_sync_names(&rw, &password, &format!("ANY 1 (\"{other}\")")).await;
    let acked = writer.stop().await;
    assert_all_present(&rw, &password, &acked).await;
    let events = s["events"].to_string();
    assert!(
        events.contains("scaling down removes simple-pg-4"),
        "{events}"
    );
    // pvcRetentionPolicy.whenScaled defaults to Retain.
    for gone in ["simple-pg-2", "simple-pg-3", "simple-pg-4"] {
        assert!(
            local
                .state
                .join("instances")
                .join(gone)
                .join("data/pgdata/PG_VERSION")
                .exists(),
            "{gone}'s data was not kept"
        );
    }

    // `up` stopped and started with 3 instances: the two that ran start,
    // then simple-pg-2 is added again from its kept data (rejoined or
    // cloned again).
    let out = local.run(&["down"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    if let Some(mut child) = local.up.take() {
        let _ = child.wait();
    }
    std::fs::write(&local.file, simple_pg_ha(version)).unwrap();
    local.start();
    let s = local.wait_instances(&["simple-pg-0", "simple-pg-1", "simple-pg-2"]);
    insert_ok(&rw, &password, -3).await;
    assert_replicas_streaming(&local, &s, -3).await;
    assert_all_present(&rw, &password, &acked).await;
    local.done();
}

/// `SHOW name` and `pg_postmaster_start_time()` on every instance of `s`.
async fn show_everywhere(s: &Value, password: &str, name: &str) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for i in s["instances"].as_array().unwrap() {
        let c = connect(i["address"].as_str().unwrap(), password)
            .await
            .unwrap();
        let row = c
            .query_one(
                &format!("SELECT current_setting('{name}'), pg_postmaster_start_time()::text"),
                &[],
            )
            .await
            .unwrap();
        out.push((
            i["name"].as_str().unwrap().to_string(),
            row.get(0),
            row.get(1),
        ));
    }
    out
}

/// Every instance of `s` runs with `name` = `want`.
async fn assert_setting_everywhere(s: &Value, password: &str, name: &str, want: &str) {
    for (instance, v, _) in show_everywhere(s, password, name).await {
        assert_eq!(v, want, "{instance}");
    }
}

/// Changed parameters on the running cluster under a writer: reloadable
/// ones (`work_mem`, `log_min_duration_statement`) are reloaded with no
/// postgres restarted (same `pg_postmaster_start_time` everywhere, no
/// rolling restart); a lowered `max_connections` (standbys need at least
/// the primary's value) restarts the primary first, in place, then the
/// replicas. No acknowledged write is lost.
#[tokio::test(flavor = "multi_thread")]
async fn ha_reloads_parameters_and_lowers_primary_first() {
    let mut local = Started::new(Local::new()).await;
    let s = local.status.clone();
    let password = local.password.clone();
    let writer = local.writer(50, "before the change").await;
    let before = show_everywhere(&s, &password, "work_mem").await;

    let reloadable = with_parameters(
        &simple_pg_ha(15),
        "work_mem: '8MB'\n      log_min_duration_statement: '250'",
    );
    local.apply_ok(&reloadable);
    let s = local.wait_event("the new configuration reloaded", "Reconfigured");
    let events = s["events"].to_string();
    assert!(
        events.contains("restart needed on none") && !events.contains("RollingRestart"),
        "{events}"
    );
    // pg_reload_conf() only signals the postmaster: poll briefly.
    let deadline = Instant::now() + Duration::from_secs(10);
    let after = loop {
        let after = show_everywhere(&s, &password, "work_mem").await;
        if after.iter().all(|(_, v, _)| v == "8MB") || Instant::now() > deadline {
            break after;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for ((name, _, started), (_, value, started_after)) in before.iter().zip(&after) {
        assert_eq!(value, "8MB", "{name}");
        assert_eq!(started, started_after, "{name} restarted");
    }
    assert_setting_everywhere(&s, &password, "log_min_duration_statement", "250ms").await;
    wait_acks(&writer, writer.acked_count(), 20, "after the reload").await;

    // Lowered max_connections (default 100): the primary first, in place.
    let p = primary(&s);
    let lowered = reloadable.replace(
        "      work_mem: '8MB'\n",
        "      work_mem: '8MB'\n      max_connections: '90'\n",
    );
    let s = local.roll_out(&lowered);
    let events = event_list(&s);
    let restarts: Vec<&String> = events
        .iter()
        .filter(|e| e.contains(" Restarting: "))
        .collect();
    assert_eq!(restarts.len(), 3, "{events:#?}");
    assert!(
        restarts[0].contains(&format!("{p} restarting: new configuration (primary first")),
        "{events:#?}"
    );
    assert_eq!(primary(&s), p, "restarted in place, not switched over");
    assert_setting_everywhere(&s, &password, "max_connections", "90").await;
    local
        .finish_writes(writer, "after the rolling restart")
        .await;
    local.done();
}

/// `up` killed (SIGKILL) in the middle of a scale-down that removes the
/// primary (3 → 2 with `simple-pg-2` the primary) under a writer, then
/// started again with the new file: it resumes from the persisted intent
/// (the switchover step, the instances that ran) and ends with
/// `simple-pg-0` and `simple-pg-1` only, one primary, no acknowledged write
/// lost, `simple-pg-2`'s slot gone, and (`pvcRetentionPolicy.whenScaled:
/// Delete`) its directory and ports too.
#[tokio::test(flavor = "multi_thread")]
async fn ha_up_killed_mid_scale_down_resumes() {
    let mut local = Started::new(Local::new()).await;
    let (rw, password) = (local.rw.clone(), local.password.clone());
    local.run_ok(&["promote", "simple-pg-2"]);
    local.wait_primary_is("simple-pg-2");
    local.wait_converged();
    let writer = local.writer(50, "before scaling").await;

    let two = simple_pg_ha(15).replace(
        "instances: 3\n",
        "instances: 2\n  pvcRetentionPolicy:\n    whenScaled: Delete\n",
    );
    local.apply_ok(&two);
    let ha = local.wait_state(
        Duration::from_secs(20),
        |st| {
            let events = st["ha"]["events"].to_string();
            (st["ha"]["step"]["type"] == "switchover" || events.contains("ScalingDown"))
                .then(|| st["ha"].clone())
        },
        |_| "no scale-down started".into(),
    );
    eprintln!(
        "killing `up` at step {}, members {}",
        ha["step"], ha["members"]
    );
    local.restart_up_with(&two);
    let s = local.wait_instances(&["simple-pg-0", "simple-pg-1"]);
    local.finish_writes(writer, "after the restart of up").await;
    insert_ok(&rw, &password, -1).await;
    assert_replicas_streaming(&local, &s, -1).await;
    let st = local.state_json();
    assert_eq!(
        st["ha"]["members"],
        serde_json::json!(["simple-pg-0", "simple-pg-1"])
    );
    assert!(
        st["ports"]["instances"].get("simple-pg-2").is_none(),
        "{st}"
    );
    assert!(!local.state.join("instances/simple-pg-2").exists());
    local.done();
}

/// A frozen primary instance manager (SIGSTOP) in an asynchronous cluster,
/// under a writer, with a client connected straight to the primary's own
/// port: the manager cannot stop its server when its lease expires, so
/// `up` (the host) kills the manager's process group and the server before
/// it promotes. The old port then takes no writes (the direct client's
/// connection is gone), every acknowledged row is there, and after SIGCONT
/// (a no-op: the frozen manager was killed; `up` started a new one) the old
/// instance rejoins as a replica, never as a second primary.
#[tokio::test(flavor = "multi_thread")]
async fn ha_frozen_primary_manager_is_killed_before_failover() {
    let yaml = simple_pg_ha(15).replace(
        "  postgresql:\n    synchronous:\n      method: any\n      number: 1\n",
        "",
    );
    assert!(!yaml.contains("synchronous"), "{yaml}");
    let mut local = Started::new(Local::with_spec(15, &yaml)).await;
    let status = local.status.clone();
    let (rw, password) = (local.rw.clone(), local.password.clone());
    let old = primary(&status);
    let address = address(&status, &old);
    let direct = connect(&address, &password).await.unwrap();
    let writer = local.writer(50, "before the freeze").await;

    let (manager, postmaster) = (local.manager_pid(&old), local.postmaster_pid(&old));
    kill(manager, "STOP");
    let frozen_at = Instant::now();
    // The gap this closes: frozen manager, server still writable directly.
    direct
        .execute("INSERT INTO ha_rows (n) VALUES (-1)", &[])
        .await
        .expect("the server of a frozen manager still runs");
    let after = local.wait_new_primary(&old);
    eprintln!(
        "{} promoted {:.1}s after {old}'s manager was frozen",
        primary(&after),
        frozen_at.elapsed().as_secs_f64()
    );
    let events = after["events"].to_string();
    assert!(
        events.contains(&format!("its server (pid {postmaster}) killed")),
        "no KilledOnHost event for postmaster {postmaster}: {events}"
    );
    // The old postmaster and its backends are gone: the direct client's
    // connection is dead, and a new connection to the old port either is
    // refused or (once the instance is back as a standby) cannot write.
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        direct.execute("INSERT INTO ha_rows (n) VALUES (-2)", &[]),
    )
    .await;
    assert!(
        !matches!(r, Ok(Ok(_))),
        "the old primary took a write on a direct connection after the failover"
    );
    let r = match connect(&address, &password).await {
        Ok(c) => c
            .execute("INSERT INTO ha_rows (n) VALUES (-3)", &[])
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(e),
    };
    assert!(r.is_err(), "the old primary's port took a write: {r:?}");
    eprintln!("old port after the failover: {}", r.unwrap_err());
    assert!(
        !Path::new(&format!("/proc/{manager}")).exists()
            || std::fs::read_to_string(format!("/proc/{manager}/stat"))
                .is_ok_and(|t| t.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z'))),
        "the frozen manager {manager} still exists"
    );

    wait_acks(&writer, writer.acked_count(), 20, "on the new primary").await;
    let old_port: i32 = address.rsplit_once(':').unwrap().1.parse().unwrap();
    let first = writer.first_ack_after(frozen_at, Some(old_port)).unwrap();
    eprintln!(
        "first write on the new primary {:.1}s after {old}'s manager was frozen",
        (first - frozen_at).as_secs_f64()
    );
    let detail = writer.acked.lock().unwrap().clone();
    let acked = writer.stop().await;
    let client = connect(&rw, &password).await.unwrap();
    let present: std::collections::BTreeSet<i64> = client
        .query("SELECT n FROM ha_rows", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let lost: Vec<String> = detail
        .iter()
        .filter(|(n, _, _)| !present.contains(n))
        .map(|(n, at, port)| {
            format!(
                "{n} (port {port}, {}ms after the freeze)",
                at.saturating_duration_since(frozen_at).as_millis()
            )
        })
        .collect();
    assert!(
        lost.is_empty(),
        "acknowledged and missing: {lost:?}; old primary at {address}; events {}\n{}",
        local
            .status()
            .map(|s| s["events"].to_string())
            .unwrap_or_default(),
        local.logs()
    );
    assert_all_present(&rw, &password, &acked).await;

    // Thaw: the process is gone (kill(1) fails); `up` runs a new manager.
    let _ = Command::new("kill")
        .args(["-CONT", &manager.to_string()])
        .status();
    let s = local.wait_converged();
    assert_ne!(primary(&s), old, "{s}");
    assert_one_primary(&s);
    let rejoined = instance(&s, &old);
    assert_eq!(rejoined["role"], "replica", "{s}");
    assert_ne!(local.manager_pid(&old), manager);
    let client = connect(&rw, &password).await.unwrap();
    client
        .execute("INSERT INTO ha_rows (n) VALUES (-100000)", &[])
        .await
        .unwrap();
    local.done();
}

/// `up` SIGKILLed in the middle of a rolling restart (a restart-only
/// parameter changed, the first instance restarting) and started again
/// with the new file: the rolling restart is in `state.json`
/// (`ha.rolling`), the new `up` (which starts every manager anew, with the
/// new configuration) resumes it, waits for the remaining instances and
/// finishes it; every instance runs the new value, one primary, no
/// acknowledged write lost.
#[tokio::test(flavor = "multi_thread")]
async fn ha_up_killed_mid_rolling_restart_resumes() {
    let mut local = Started::new(Local::new()).await;
    let password = local.password.clone();
    let writer = local.writer(50, "before the change").await;

    let changed = with_parameters(&simple_pg_ha(15), "max_connections: '150'");
    local.apply_ok(&changed);
    let rolling = local.wait_state(
        Duration::from_secs(30),
        |st| {
            let rolling = &st["ha"]["rolling"];
            rolling["restarting"].is_string().then(|| rolling.clone())
        },
        |st| format!("no rolling restart persisted: {}", st["ha"]),
    );
    eprintln!("killing `up` during the rolling restart: {rolling}");
    assert_eq!(
        rolling["remaining"].as_array().unwrap().len(),
        3,
        "{rolling}"
    );
    local.restart_up_with(&changed);
    local.wait_resumed_roll_done();
    let s = local.wait_converged();
    assert_one_primary(&s);
    local.finish_writes(writer, "after the restart of up").await;
    assert_setting_everywhere(&s, &password, "max_connections", "150").await;
    let st = local.state_json();
    assert!(st["ha"]["rolling"].is_null(), "{}", st["ha"]);
    local.done();
}

/// `up` SIGKILLed in the middle of a primary-first rolling restart (a
/// lowered `max_connections`: standbys may not run with less than their
/// primary announced), just as the primary's restart began, and started
/// again with the new file. The new `up` starts every manager at once
/// from the rewritten configuration: each replica, whose control file
/// still holds the primary's old value, starts with that value instead of
/// refusing to start (it says so in its manager log), and once the primary
/// is back the resumed rolling restart restarts the replicas one at a
/// time, each after replaying past the primary's restart. Every instance
/// ends with the lowered value, one primary, no acknowledged write lost.
#[tokio::test(flavor = "multi_thread")]
async fn ha_up_killed_mid_primary_first_roll_resumes() {
    let mut local = Started::converged(Local::new());
    let s = local.status.clone();
    let (rw, password) = (local.rw.clone(), local.password.clone());
    let p = primary(&s);
    create_table(&rw, &password).await;
    let writer = local.writer(50, "before the change").await;

    let lowered = with_parameters(&simple_pg_ha(15), "max_connections: '90'");
    local.apply_ok(&lowered);
    let rolling = local.wait_state(
        Duration::from_secs(30),
        |st| {
            let rolling = &st["ha"]["rolling"];
            (rolling["restarting"] == p.as_str()).then(|| rolling.clone())
        },
        |st| format!("the primary's restart never began: {}", st["ha"]),
    );
    eprintln!("killing `up` as the primary restarts: {rolling}");
    assert_eq!(rolling["primaryFirst"], true, "{rolling}");
    local.restart_up_with(&lowered);
    local.wait_resumed_roll_done();
    let s = local.wait_converged();
    assert_eq!(primary(&s), p, "restarted in place, no failover: {s}");
    // The replicas ran with the control file's value until their turn.
    for name in instance_names().into_iter().filter(|n| *n != p) {
        let log = std::fs::read_to_string(
            local
                .state
                .join("instances")
                .join(&name)
                .join("manager.log"),
        )
        .unwrap();
        assert!(
            log.contains("max_connections: 90 -> 100"),
            "{name} did not start with the control file's max_connections:\n{}",
            local.logs()
        );
    }
    let events = event_list(&s);
    let resumed = events
        .iter()
        .position(|e| e.contains("RollingRestartResumed"))
        .unwrap();
    let restarts: Vec<&String> = events[resumed..]
        .iter()
        .filter(|e| e.contains(" Restarting: "))
        .collect();
    assert_eq!(
        restarts.len(),
        2,
        "both replicas restarted again: {events:#?}"
    );
    local.finish_writes(writer, "after the restart of up").await;
    assert_setting_everywhere(&s, &password, "max_connections", "90").await;
    let st = local.state_json();
    assert!(st["ha"]["rolling"].is_null(), "{}", st["ha"]);
    local.done();
}

/// Scaling down removes the only synchronous standby of a `method: first`
/// cluster (`FIRST 1 ("simple-pg-2")` while `simple-pg-1` is down: its
/// manager frozen, its postgres killed), under a writer. The removed
/// replica is stopped only after the primary reports the kept replica as
/// its synchronous standby and that replica received the primary's WAL
/// past the change (`SynchronousStandbysMoved` before `ScalingDown`); the
/// primary is killed the moment the removal is done, and the failover to
/// the kept replica loses no acknowledged write.
#[tokio::test(flavor = "multi_thread")]
async fn ha_scale_down_moves_first_sync_standby_before_stopping_it() {
    let yaml = simple_pg_ha(15).replace("      method: any\n", "      method: first\n");
    assert!(yaml.contains("method: first"), "{yaml}");
    let mut local = Started::converged(Local::with_spec(15, &yaml));
    let s = local.status.clone();
    let (rw, password) = (local.rw.clone(), local.password.clone());
    let p = primary(&s);
    assert_eq!(p, "simple-pg-0", "a new cluster's primary is ordinal 0");
    wait_sync_names(&rw, &password, "FIRST 1 (\"simple-pg-1\",\"simple-pg-2\")").await;
    create_table(&rw, &password).await;
    let writer = local.writer(50, "before scaling").await;

    // simple-pg-2 becomes the synchronous standby.
    let manager = local.manager_pid("simple-pg-1");
    kill(manager, "STOP");
    kill(local.postmaster_pid("simple-pg-1"), "KILL");
    wait_sync_names(&rw, &password, "FIRST 1 (\"simple-pg-2\")").await;
    wait_acks(
        &writer,
        writer.acked_count(),
        20,
        "with simple-pg-2 synchronous",
    )
    .await;

    let two = yaml.replace("instances: 3\n", "instances: 2\n");
    local.apply_ok(&two);
    local.wait_event(
        "the scale-down waiting for the kept standby",
        "scaling down: waiting for",
    );
    let st = local.state_json();
    assert_eq!(
        st["ha"]["members"].as_array().unwrap().len(),
        3,
        "{}",
        st["ha"]
    );
    kill(manager, "CONT");
    local.wait_state(
        CONVERGE_TIMEOUT,
        |st| {
            st["ha"]["members"]
                .as_array()
                .is_some_and(|m| m.len() == 2)
                .then_some(())
        },
        |st| format!("simple-pg-2 never removed: {}", st["ha"]),
    );
    // The primary fails right after: the kept replica must hold every
    // commit that only simple-pg-2 had confirmed.
    kill(local.postmaster_pid(&p), "KILL");
    local.wait_primary_is("simple-pg-1");
    let s = local.wait_instances(&["simple-pg-0", "simple-pg-1"]);
    assert_eq!(primary(&s), "simple-pg-1", "{s}");
    local.finish_writes(writer, "after the failover").await;
    let events = event_list(&s);
    let at = |what: &str| {
        events
            .iter()
            .position(|e| e.contains(what))
            .unwrap_or_else(|| panic!("no {what} event: {events:#?}"))
    };
    assert!(
        at("SynchronousStandbysMoved: simple-pg-0 waits for simple-pg-1 only")
            < at("ScalingDown: removing simple-pg-2"),
        "{events:#?}"
    );
    assert!(at("ScalingDown: removing simple-pg-2") < at("Resized: stopped simple-pg-2"));
    local.done();
}

/// The operator away (the decision loop paused through
/// `<state-dir>/pause-decisions`: no observation, no decision, no lease
/// renewal, while `rw` keeps forwarding, as the `-rw` Service does when
/// the operator is down on Kubernetes) for 20 s, more than six lease
/// TTLs, under a writer in synchronous mode: the primary keeps its lease
/// on failsafe (both replicas acknowledge it), no write waits more than a
/// second, and when the loop is back the same primary is kept (same
/// term, no failover) and the event says how long writes ran on failsafe.
#[tokio::test(flavor = "multi_thread")]
async fn ha_failsafe_keeps_writes_while_the_decision_loop_is_away() {
    let mut local = Started::new(Local::new()).await;
    let status = local.status.clone();
    let old = primary(&status);
    let term = local.state_json()["ha"]["term"].as_u64().unwrap();
    let writer = local.writer(50, "before the pause").await;

    let pause = local.state.join("pause-decisions");
    std::fs::write(&pause, "").unwrap();
    let paused_at = Instant::now();
    let before = writer.acked_count();
    tokio::time::sleep(Duration::from_secs(20)).await;
    let during = writer.acked_count() - before;
    let gap = writer.longest_gap_after(paused_at);
    eprintln!(
        "operator away 20 s: {during} writes acknowledged, longest gap {} ms",
        gap.as_millis()
    );
    assert!(
        gap < Duration::from_secs(1),
        "writes stopped for {} ms while the operator was away (lease {LEASE_MS} ms)\n{}",
        gap.as_millis(),
        local.logs()
    );
    assert!(during > 100, "only {during} writes in 20 s");
    // The primary says it runs on failsafe (its manager's log).
    let log = std::fs::read_to_string(local.state.join("instances").join(&old).join("manager.log"))
        .unwrap();
    assert!(
        log.contains("lease extended on failsafe"),
        "no failsafe extension in {old}'s log\n{}",
        local.logs()
    );

    std::fs::remove_file(&pause).unwrap();
    let s = local.wait_event("the failsafe episode reported", "FailsafeEnded");
    let events = s["events"].to_string();
    assert!(
        events.contains(&format!("primary {old} kept writes on failsafe for")),
        "{events}"
    );
    assert!(!events.contains("FailoverStarted"), "{events}");
    let s = local.wait_converged();
    assert_eq!(primary(&s), old, "{s}");
    assert_eq!(local.state_json()["ha"]["term"].as_u64(), Some(term));
    local.finish_writes(writer, "after the pause").await;
    local.done();
}

/// The operator away and, meanwhile, the primary's manager frozen
/// (SIGSTOP): the primary's server runs on with the lease its manager
/// extended last. When the decision loop is back it fails over: the
/// replicas are revoked first (event `FailsafeRevoked`: no more
/// acknowledgements for the old term), the frozen manager and its server
/// are killed on the host, a revoked replica is promoted; one primary,
/// the old one's port takes no write, no acknowledged write lost.
#[tokio::test(flavor = "multi_thread")]
async fn ha_failsafe_failover_from_a_frozen_primary_after_the_operator_was_away() {
    let mut local = Started::new(Local::new()).await;
    let status = local.status.clone();
    let password = local.password.clone();
    let old = primary(&status);
    let address = address(&status, &old);
    let writer = local.writer(50, "before the pause").await;

    let pause = local.state.join("pause-decisions");
    std::fs::write(&pause, "").unwrap();
    // Past the lease: running on failsafe.
    tokio::time::sleep(Duration::from_millis(LEASE_MS * 2)).await;
    let manager = local.manager_pid(&old);
    kill(manager, "STOP");
    let frozen_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    std::fs::remove_file(&pause).unwrap();
    let after = local.wait_new_primary(&old);
    let new = primary(&after);
    eprintln!(
        "{new} promoted {:.1}s after {old}'s manager was frozen (loop paused for 2 s of it)",
        frozen_at.elapsed().as_secs_f64()
    );
    let events = after["events"].to_string();
    assert!(
        events.contains("FailsafeRevoked") && events.contains(&format!("for {old} (term")),
        "{events}"
    );
    let at = |needle: &str| events.find(needle).unwrap_or(usize::MAX);
    assert!(at("FailsafeRevoked") < at("Promoted"), "{events}");
    let r = match connect(&address, &password).await {
        Ok(c) => c
            .execute("INSERT INTO ha_rows (n) VALUES (-3)", &[])
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(e),
    };
    assert!(r.is_err(), "the old primary's port took a write: {r:?}");
    let _ = Command::new("kill")
        .args(["-CONT", &manager.to_string()])
        .status();
    let s = local.wait_converged();
    assert_eq!(primary(&s), new, "{s}");
    assert_one_primary(&s);
    local.finish_writes(writer, "on the new primary").await;
    local.done();
}
