//! Galera end to end on the local runtime with real MariaDB 10.11 +
//! galera-4 and a real HAProxy in front (`rw`/`ro`): a 3-node cluster
//! reaches Healthy and rows written through `rw` are on every node; bad
//! input is refused naming the field while the cluster runs on; kill -9 of
//! the writer under write load (writes resume on another node, nothing
//! acknowledged is lost, the killed node rejoins by IST); a full crash of
//! every process (recovery from the most advanced node, cluster UUID and
//! seqno preserved, one bootstrap); loss of quorum (the survivor refuses
//! writes, recovery when the others return); one writer for open `rw`
//! sessions when HAProxy fails over to another backup than the loop would;
//! a configuration change rolled out one member at a time, the writer
//! never restarted while it is the writer; scaling 3 → 5 → 3 → 5 → 3
//! under write load (clean leaves, quorum kept, Retain and Delete). Every
//! cluster encrypts its traffic with the generated TLS Secret (the
//! default): the writer-kill test checks the provider's TLS settings on
//! every node, a TLS handshake on a Galera port with the generated CA,
//! and the encrypted SST; the one-writer test uses rsync SST, tunnelled
//! through stunnel; the quorum-loss test runs on a user's TLS Secret (RSA
//! certificates made with openssl); a user's TLS Secret missing a key is
//! refused before anything starts. A joiner whose server aborts during its
//! SST rejoins (the dead server's SST script does not block it), and no
//! server outlives its manager (SIGKILL, SIGTERM, SIGKILL with `up`).
//! Each test owns a temporary state directory and stops its cluster when
//! it ends; none skips. A failing test prints the tails of `up`'s log and
//! of every member's manager, server, `--wsrep-recover` and SST logs.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mysql_async::prelude::*;
use serde_json::Value;

#[path = "support/local.rs"]
mod local;
use local::{Local, Runtime, assert_none_lost, instance, kill, port_of, rw_endpoint, wait_acks};

/// SST (mariabackup) of three servers on two shared cores takes a while.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(240);
const TICK_MS: &str = "200";
const CLUSTER: &str = "simple-pxc";

/// Fail (never skip) with what to install when a binary is missing.
fn require_galera() {
    for (path, package) in [
        ("/usr/sbin/mariadbd", "mariadb-server"),
        ("/usr/lib/galera/libgalera_smm.so", "galera-4"),
        ("/usr/bin/mariabackup", "mariadb-backup"),
        ("/usr/sbin/haproxy", "haproxy"),
    ] {
        assert!(
            Path::new(path).exists(),
            "{path} is required: install the Debian package {package} (scripts/setup.sh installs mariadb-server galera-4 mariadb-backup rsync stunnel4 haproxy)"
        );
    }
}

fn simple_pxc(extra: &str) -> String {
    format!(
        "apiVersion: stratum.dev/v1alpha1
kind: PxcCluster
metadata:
  name: {CLUSTER}
spec:
  instances: 3
  flavor: MariaDB
  version: \"10.11\"
  storage:
    size: 1Gi
  configuration: |
    [mysqld]
    innodb_buffer_pool_size = 64M
    max_connections = 100
{extra}"
    )
}

const RUNTIME: Runtime = Runtime {
    tick_ms: TICK_MS,
    lease_ms: None,
    no_backtrace: true,
    timeout: CONVERGE_TIMEOUT,
    poll: Duration::from_millis(200),
    instance_logs,
    state_logs: &[("haproxy/haproxy.log", 30)],
};

/// A member's manager log, its server's error log (mariadbd writes it to
/// the manager's stdout/stderr, kept in `run/server.log`), the
/// `--wsrep-recover` log, the SST logs (mariabackup's in the data
/// directory: `backup` on a donor, `prepare`/`move` on a joiner; the SST
/// script's archive of older ones in `run/sst-log-archive/`).
fn instance_logs(dir: &Path) -> Vec<(PathBuf, usize)> {
    let datadir = dir.join("data").join("mysql");
    let mut logs = vec![
        (dir.join("manager.log"), 40),
        (dir.join("run").join("server.log"), 80),
        (dir.join("run").join("wsrep-recover.log"), 10),
    ];
    for sst in ["backup", "prepare", "move"] {
        logs.push((datadir.join(format!("mariabackup.{sst}.log")), 15));
    }
    // The SST script's archived logs, newest last.
    let mut archived: Vec<(std::time::SystemTime, PathBuf)> =
        std::fs::read_dir(dir.join("run").join("sst-log-archive"))
            .map(|d| {
                d.flatten()
                    .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
                    .collect()
            })
            .unwrap_or_default();
    archived.sort();
    let n = archived.len();
    logs.extend(
        archived
            .into_iter()
            .skip(n.saturating_sub(3))
            .map(|(_, p)| (p, 15)),
    );
    logs
}

fn instance_names() -> Vec<String> {
    (0..3).map(|i| format!("{CLUSTER}-{i}")).collect()
}

impl Local {
    /// A workspace with `simple-pxc.yaml`.
    fn new() -> Self {
        require_galera();
        Local::create(RUNTIME, "simple-pxc.yaml", &simple_pxc(""), &[])
    }

    /// Healthy: every member Synced in one 3-member Primary component and
    /// `rw` routed.
    fn wait_healthy(&mut self) -> Value {
        self.wait_for("Healthy (3 Synced, rw routed)", |s| {
            s["phase"] == "Healthy"
                && s["primary"].is_string()
                && s["instances"].as_array().unwrap().iter().all(|i| {
                    i["wsrep"]["state"] == "Synced"
                        && i["wsrep"]["clusterSize"] == 3
                        && i["wsrep"]["clusterStatus"] == "Primary"
                })
        })
    }

    /// `yaml` written as `name` and handed to the running cluster with
    /// `local up -f`, which must take it; returns the file and what `up`
    /// printed.
    fn apply_ok(&self, name: &str, yaml: &str) -> (PathBuf, String) {
        let file = self.write_file(name, yaml);
        let out = self.up_once(&file, &[]);
        assert!(
            out.status.success(),
            "up -f {name} refused: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (file, String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn root_password(&self) -> String {
        self.secret("root-password").trim().to_string()
    }

    /// Pid of the instance's mariadbd, found by its option file (inside
    /// the instance's run directory).
    fn mariadbd_pid(&self, name: &str) -> Option<i32> {
        let needle = format!(
            "--defaults-file={}",
            self.instance_dir(name).join("run").display()
        );
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            let cmd = String::from_utf8_lossy(&cmd);
            let mut args = cmd.split('\0');
            if args.next().is_some_and(|a| a.ends_with("mariadbd"))
                && args.any(|a| a.starts_with(&needle))
            {
                return Some(pid);
            }
        }
        None
    }

    /// Wait until `name` runs under another manager than `old` (its `up`
    /// started a new one) and is Synced again in a Healthy cluster: the
    /// status from before the old manager went is not taken for it.
    fn wait_restarted(&mut self, name: &str, old: i32) {
        let deadline = Instant::now() + CONVERGE_TIMEOUT;
        loop {
            let m = self.state_json()["managers"][name].as_i64();
            if m.is_some_and(|m| m != i64::from(old)) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{name}'s manager (pid {old}) was not replaced"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        // The ticks since the old manager died saw the member unreachable
        // (its `up` restarts a manager after a second at least), so a
        // Healthy status from now on is the new manager's.
        self.wait_healthy();
    }
}

/// `local` started and Healthy; returns it with that status.
fn healthy(mut local: Local) -> (Local, Value) {
    local.start();
    let status = local.wait_healthy();
    (local, status)
}

fn events(s: &Value) -> String {
    s["events"].to_string()
}

async fn connect(address: &str, password: &str) -> Result<mysql_async::Conn, String> {
    let (host, port) = address.rsplit_once(':').unwrap();
    let opts = mysql_async::OptsBuilder::default()
        .ip_or_hostname(host.to_string())
        .tcp_port(port.parse().unwrap())
        .user(Some("root"))
        .pass(Some(password.to_string()))
        .prefer_socket(false);
    match tokio::time::timeout(Duration::from_secs(5), mysql_async::Conn::new(opts)).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("connecting to {address} timed out")),
    }
}

/// Connect through an endpoint right after the status turned Healthy:
/// HAProxy marks a returning member up only after two passed checks
/// (about a second), and closes connections it cannot place until then.
async fn connect_endpoint(endpoint: &str, password: &str) -> mysql_async::Conn {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match connect(endpoint, password).await {
            Ok(mut c) => {
                if c.query_drop("DO 1").await.is_ok() {
                    return c;
                }
            }
            Err(e) if Instant::now() > deadline => panic!("cannot connect to {endpoint}: {e}"),
            Err(_) => {}
        }
        assert!(
            Instant::now() < deadline,
            "no usable connection to {endpoint}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn create_table(rw: &str, password: &str) {
    let mut c = connect_endpoint(rw, password).await;
    c.query_drop(
        "CREATE DATABASE IF NOT EXISTS app;
         CREATE TABLE app.rows_acked (n BIGINT PRIMARY KEY, port INT NOT NULL) ENGINE=InnoDB",
    )
    .await
    .unwrap();
    c.query_drop("INSERT INTO app.rows_acked (n, port) SELECT seq, @@port FROM app.seq_1_to_100")
        .await
        .unwrap();
    c.disconnect().await.unwrap();
}

async fn count_on(address: &str, password: &str) -> Result<i64, String> {
    let mut c = connect(address, password).await?;
    let n: Option<i64> = c
        .query_first("SELECT count(*) FROM app.rows_acked")
        .await
        .map_err(|e| e.to_string())?;
    let _ = c.disconnect().await;
    Ok(n.unwrap_or(0))
}

type Writer = local::Writer<u16>;

impl Writer {
    /// A client inserting numbered rows (from `first + 1`) through `rw` in
    /// a loop, reconnecting after errors; each acknowledgement is recorded
    /// with the port of the server that gave it.
    fn start(rw: String, password: String, first: i64) -> Self {
        Self::paced(rw, password, first, Duration::ZERO)
    }

    /// Like [`Writer::start`], with `pause` after each acknowledged insert
    /// (a light load).
    fn paced(rw: String, password: String, first: i64, pause: Duration) -> Self {
        Writer::spawn(CONVERGE_TIMEOUT, move |s, a| async move {
            let mut n = first;
            let mut conn: Option<(mysql_async::Conn, u16)> = None;
            while !s.load(Ordering::Relaxed) {
                if conn.is_none() {
                    match connect(&rw, &password).await {
                        Ok(mut c) => match c.query_first::<u16, _>("SELECT @@port").await {
                            Ok(Some(port)) => conn = Some((c, port)),
                            _ => {
                                tokio::time::sleep(Duration::from_millis(20)).await;
                                continue;
                            }
                        },
                        Err(_) => {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            continue;
                        }
                    }
                }
                let (c, port) = conn.as_mut().unwrap();
                let port = *port;
                n += 1;
                let insert = c.exec_drop(
                    "INSERT INTO app.rows_acked (n, port) VALUES (?, ?)",
                    (n, port),
                );
                match tokio::time::timeout(Duration::from_secs(10), insert).await {
                    Ok(Ok(())) => {
                        a.lock().unwrap().push((n, Instant::now(), port));
                        if !pause.is_zero() {
                            tokio::time::sleep(pause).await;
                        }
                    }
                    _ => {
                        conn = None;
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
        })
    }
}

/// Every acknowledged row is readable at `address`.
async fn assert_all_present(address: &str, password: &str, acked: &[i64]) {
    let mut c = connect_endpoint(address, password).await;
    let present: BTreeSet<i64> = c
        .query::<i64, _>("SELECT n FROM app.rows_acked")
        .await
        .unwrap()
        .into_iter()
        .collect();
    assert_none_lost(acked, &present, &format!(" at {address}"));
}

/// Every node holds the same number of rows as `rw` (Galera applies
/// replicated write-sets asynchronously: wait a little).
async fn assert_same_rows_everywhere(s: &Value, password: &str) {
    let rw = s["endpoints"]["rw"].as_str().unwrap();
    let want: i64 = connect_endpoint(rw, password)
        .await
        .query_first("SELECT count(*) FROM app.rows_acked")
        .await
        .unwrap()
        .unwrap_or(0);
    for i in s["instances"].as_array().unwrap() {
        let address = i["address"].as_str().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let got = count_on(address, password).await;
            if got.as_ref().is_ok_and(|n| *n == want) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} has {got:?} rows, rw has {want}",
                i["name"]
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    eprintln!("every node holds the {want} rows");
}

/// 1. Three nodes reach Healthy; rows written through `rw` are on every
/// node, `ro` reaches several nodes. 6. Bad input (2 instances, an
/// operator-owned option in `configuration`, forceBootstrapFrom naming a
/// missing instance) is refused naming the field, and the running cluster
/// is untouched.
#[tokio::test(flavor = "multi_thread")]
async fn pxc_three_nodes_healthy_then_bad_input_is_refused() {
    let t0 = Instant::now();
    let mut local = Local::new();
    local.start();
    let status = local.wait_healthy();
    eprintln!("3 nodes Healthy after {:.1}s", t0.elapsed().as_secs_f64());
    let rw = rw_endpoint(&status);
    let ro = status["endpoints"]["ro"].as_str().unwrap().to_string();
    let password = local.root_password();
    create_table(&rw, &password).await;
    assert_same_rows_everywhere(&status, &password).await;

    // rw goes to the writer; ro spreads over the Synced nodes.
    let writer = status["galera"]["writer"].as_str().unwrap().to_string();
    let writer_port = port_of(instance(&status, &writer)["address"].as_str().unwrap());
    let mut c = connect_endpoint(&rw, &password).await;
    let port: Option<u16> = c.query_first("SELECT @@port").await.unwrap();
    assert_eq!(port, Some(writer_port));
    // HAProxy marks a member up after two passed checks (1 s).
    let mut ro_ports = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while ro_ports.len() < 3 && Instant::now() < deadline {
        let mut c = connect_endpoint(&ro, &password).await;
        ro_ports.insert(c.query_first::<u16, _>("SELECT @@port").await.unwrap());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ro_ports.len(), 3, "ro reached only {ro_ports:?}");
    let ev = events(&status);
    for e in [
        "BootstrapDecided",
        "BootstrapOrdered",
        "Joined",
        "WriterChosen",
    ] {
        assert!(ev.contains(e), "no {e} event in {ev}");
    }
    let st = local.state_json();
    assert_eq!(st["galera"]["bootstraps"], 1, "{st}");
    assert!(st["haproxy"].as_i64().is_some(), "no HAProxy pid in {st}");

    // 6. Bad input against the running cluster.
    let bad = local.tmp.path().join("bad.yaml");
    let cases = [
        (
            simple_pxc("").replace("instances: 3", "instances: 2"),
            "spec.instances",
        ),
        (
            simple_pxc("    wsrep_cluster_address = gcomm://10.0.0.1\n"),
            "spec.configuration",
        ),
        (
            simple_pxc("  bootstrap:\n    forceBootstrapFrom: simple-pxc-7\n"),
            "spec.bootstrap.forceBootstrapFrom",
        ),
    ];
    let saved = std::fs::read_to_string(local.state.join("cluster.yaml")).unwrap();
    for (yaml, field) in cases {
        std::fs::write(&bad, yaml).unwrap();
        let out = local.up_once(&bad, &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{field}: up accepted it");
        assert!(
            stderr.contains(&format!("{}: {field}", bad.display())),
            "{field}: {stderr}"
        );
        eprintln!("refused: {}", stderr.trim());
    }
    assert!(
        String::from_utf8_lossy(&std::fs::read(&bad).unwrap()).contains("simple-pxc-7"),
        "the last case was the forced bootstrap"
    );
    // Untouched: same CR, still Healthy, same writer, writes work.
    assert_eq!(
        std::fs::read_to_string(local.state.join("cluster.yaml")).unwrap(),
        saved
    );
    let s = local.wait_healthy();
    assert_eq!(s["galera"]["writer"], writer.as_str());
    let mut c = connect_endpoint(&rw, &password).await;
    c.query_drop("INSERT INTO app.rows_acked (n, port) VALUES (-1, @@port)")
        .await
        .unwrap();
    eprintln!("test took {:.1}s", t0.elapsed().as_secs_f64());
    local.down();
}

/// The directory of the generated TLS Secret.
fn tls_dir(state: &Path) -> PathBuf {
    state.join("tls").join(format!("{CLUSTER}-ssl-internal"))
}

/// Cluster traffic is encrypted with the generated TLS Secret: every
/// node's provider runs with `socket.ssl` and the Secret's files, a Galera
/// port completes a TLS handshake whose certificate verifies against the
/// generated CA (with that CA's certificate as the client's), and the SST
/// that gave the joiners their data went through the encrypted stream.
async fn assert_cluster_traffic_encrypted(local: &Local, s: &Value, password: &str) {
    let tls = tls_dir(&local.state);
    for name in instance_names() {
        let address = instance(s, &name)["address"].as_str().unwrap().to_string();
        let mut c = connect(&address, password).await.unwrap();
        let (_, opts): (String, String) = c
            .query_first("SHOW GLOBAL VARIABLES LIKE 'wsrep_provider_options'")
            .await
            .unwrap()
            .unwrap();
        let want = [
            "socket.ssl = YES".to_string(),
            format!("socket.ssl_ca = {}", tls.join("ca.crt").display()),
            format!("socket.ssl_cert = {}", tls.join("tls.crt").display()),
            format!("socket.ssl_key = {}", tls.join("tls.key").display()),
            // The fast eviction stays in force next to TLS.
            "evs.suspect_timeout = PT2S".to_string(),
        ];
        for w in want {
            assert!(
                opts.split("; ").any(|o| o == w),
                "{name}: no {w:?} in wsrep_provider_options: {opts}"
            );
        }
    }
    let galera_port =
        local.state_json()["ports"]["instances"][format!("{CLUSTER}-0")]["extra"]["galera"]
            .as_u64()
            .unwrap();
    let out = Command::new("openssl")
        .args(["s_client", "-brief", "-verify_return_error"])
        .arg("-connect")
        .arg(format!("127.0.0.1:{galera_port}"))
        .arg("-CAfile")
        .arg(tls.join("ca.crt"))
        .arg("-cert")
        .arg(tls.join("tls.crt"))
        .arg("-key")
        .arg(tls.join("tls.key"))
        .stdin(Stdio::null())
        .output()
        .expect("openssl not found: apt-get install openssl (scripts/setup.sh)");
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("Verification: OK"),
        "no verified TLS handshake on the Galera port {galera_port}: {text}"
    );
    let joiners_decrypted = instance_names()
        .iter()
        .filter(|n| {
            std::fs::read_to_string(local.instance_dir(n).join("run").join("server.log"))
                .is_ok_and(|log| log.contains("Decrypting with cert="))
        })
        .count();
    assert!(
        joiners_decrypted >= 2,
        "the SST of the two joiners was not decrypted with the Secret's certificate ({joiners_decrypted} did)"
    );
}

/// A user's TLS Secret (locally the directory `tls/<name>/`) that lacks a
/// key is refused before anything is written or started, naming the
/// Secret and the key.
#[test]
fn pxc_a_users_tls_secret_without_its_key_is_refused() {
    let local = Local::new();
    let yaml = simple_pxc("  tls:\n    secretName: my-certs\n");
    std::fs::write(&local.file, yaml).unwrap();
    let secret = local.state.join("tls").join("my-certs");
    std::fs::create_dir_all(&secret).unwrap();
    std::fs::write(secret.join("ca.crt"), "-----BEGIN CERTIFICATE-----\n").unwrap();
    std::fs::write(secret.join("tls.crt"), "-----BEGIN CERTIFICATE-----\n").unwrap();
    let out = local.up_once(&local.file, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "up accepted it: {stderr}");
    assert!(
        stderr.contains("spec.tls")
            && stderr.contains("TLS Secret my-certs has no key tls.key")
            && stderr.contains(&secret.join("tls.key").display().to_string()),
        "{stderr}"
    );
    eprintln!("refused: {}", stderr.trim());
    assert!(
        !local.state.join("state.json").exists() && !local.state.join("instances").exists(),
        "nothing may be laid out for a refused cluster"
    );
}

/// 2. kill -9 of the writer's mariadbd while a client inserts numbered rows
/// through `rw`: writes resume on another node, every acknowledged insert
/// is present, the killed node rejoins by IST and does not take the
/// writes back.
#[tokio::test(flavor = "multi_thread")]
async fn pxc_writer_killed_under_load_loses_nothing_and_rejoins_by_ist() {
    let t0 = Instant::now();
    let (mut local, status) = healthy(Local::new());
    let (rw, password) = (rw_endpoint(&status), local.root_password());
    create_table(&rw, &password).await;

    let writer = Writer::start(rw.clone(), password.clone(), 1000);
    wait_acks(&writer, 0, 100, "before the kill").await;
    let old = status["galera"]["writer"].as_str().unwrap().to_string();
    let old_port = port_of(instance(&status, &old)["address"].as_str().unwrap());
    let pid = local.mariadbd_pid(&old).expect("the writer's mariadbd");
    let base = writer.acked_count();
    let t_kill = Instant::now();
    kill(pid, "KILL");
    wait_acks(&writer, base, 1, "after the kill").await;
    let after = local.wait_for("a new writer", |s| {
        s["galera"]["writer"].is_string() && s["galera"]["writer"] != old.as_str()
    });
    wait_acks(&writer, writer.acked_count(), 50, "on the new writer").await;
    let first = writer
        .first_ack_after(t_kill, Some(old_port))
        .expect("an acknowledgement by another node")
        - t_kill;
    eprintln!(
        "killed mariadbd of {old}: {} writes; first write acknowledged {}ms after the kill",
        after["galera"]["writer"],
        first.as_millis()
    );

    // The killed node is restarted by its manager and rejoins by IST,
    // over TLS like every other member.
    let healthy = local.wait_healthy();
    let rejoined = instance(&healthy, &old);
    assert_eq!(
        rejoined["wsrep"]["lastStateTransfer"], "ist",
        "{old} did not rejoin by IST: {rejoined}"
    );
    assert_cluster_traffic_encrypted(&local, &healthy, &password).await;
    // Writes stay on the new writer although the old one is back.
    let new_writer = after["galera"]["writer"].as_str().unwrap().to_string();
    std::thread::sleep(Duration::from_secs(2));
    let s = local.wait_healthy();
    // It moves again only if the new writer itself is not Synced for a
    // moment (e.g. the donor of the returning node's IST).
    let end_writer = s["galera"]["writer"].as_str().unwrap().to_string();
    if end_writer != new_writer {
        let all = local.state_json()["galera"]["events"].to_string();
        assert!(
            all.contains(&format!(
                "moved from {new_writer} (not ready) to {end_writer}"
            )),
            "the writer moved from {new_writer} to {end_writer} while {new_writer} was ready: {all}"
        );
        eprintln!(
            "{new_writer} was not Synced for a moment (an IST donor); rw moved to {end_writer}"
        );
    }
    let mut c = connect_endpoint(&rw, &password).await;
    let port: Option<u16> = c.query_first("SELECT @@port").await.unwrap();
    assert_eq!(
        port,
        Some(port_of(
            instance(&s, &end_writer)["address"].as_str().unwrap()
        ))
    );
    let acked = writer.stop().await;
    assert_all_present(&rw, &password, &acked).await;
    assert_same_rows_everywhere(&s, &password).await;
    let ev = events(&s);
    for e in ["Left", "WriterChanged", "Joined"] {
        assert!(ev.contains(e), "no {e} event in {ev}");
    }
    assert_eq!(local.state_json()["galera"]["bootstraps"], 1);
    eprintln!(
        "writer kill: first write {}ms after the kill; test took {:.1}s",
        first.as_millis(),
        t0.elapsed().as_secs_f64()
    );
    local.down();
}

/// One command on HAProxy's admin socket (the current worker).
fn haproxy_admin(state: &Path, command: &str) -> String {
    use std::io::{Read, Write};
    let mut sock = std::os::unix::net::UnixStream::connect(state.join("haproxy/admin.sock"))
        .expect("HAProxy's admin socket");
    sock.write_all(format!("{command}\n").as_bytes()).unwrap();
    sock.shutdown(std::net::Shutdown::Write).unwrap();
    let mut out = String::new();
    sock.read_to_string(&mut out).unwrap();
    out
}

/// The port of the server each still-open connection is on (connections
/// cut meanwhile are dropped).
async fn ports_of(conns: Vec<mysql_async::Conn>) -> (Vec<mysql_async::Conn>, Vec<u16>) {
    let (mut alive, mut ports) = (Vec::new(), Vec::new());
    for mut c in conns {
        let q = c.query_first::<u16, _>("SELECT @@port");
        if let Ok(Ok(Some(p))) = tokio::time::timeout(Duration::from_secs(5), q).await {
            alive.push(c);
            ports.push(p);
        }
    }
    (alive, ports)
}

/// One writer at a time, also for open sessions: HAProxy fails over to
/// another backup than the loop would pick (the first backup's `rw` check
/// is held down through the admin socket, as a survivor's check that is
/// briefly down during the eviction), then that backup comes back. Every
/// `rw` connection still open at the end is on the one node HAProxy and
/// the loop send writes to; before the fix, sessions opened during the
/// failover stayed on one node while new ones went to another. The
/// cluster uses rsync SST, which under TLS (the default) goes through
/// stunnel with the generated certificate.
#[tokio::test(flavor = "multi_thread")]
async fn pxc_rw_sessions_stay_on_one_writer_after_a_kill() {
    let t0 = Instant::now();
    let mut local = Local::new();
    assert!(
        Path::new("/usr/bin/stunnel").exists(),
        "/usr/bin/stunnel is required for rsync SST under TLS: install the Debian package stunnel4 (scripts/setup.sh does)"
    );
    std::fs::write(&local.file, simple_pxc("  sstMethod: rsync\n")).unwrap();
    local.start();
    let status = local.wait_healthy();
    // Both joiners received their copy through stunnel, the chain
    // checked against the generated CA.
    let ca = tls_dir(&local.state).join("ca.crt");
    let tunnelled = instance_names()
        .iter()
        .filter(|n| {
            std::fs::read_to_string(local.instance_dir(n).join("run").join("server.log")).is_ok_and(
                |log| {
                    log.contains(&format!(
                        "Using stunnel for SSL encryption: CA: '{}'",
                        ca.display()
                    ))
                },
            )
        })
        .count();
    assert!(
        tunnelled >= 2,
        "rsync SST did not go through stunnel with the generated CA ({tunnelled} logs say so)"
    );
    let rw = rw_endpoint(&status);
    let password = local.root_password();
    let port = |s: &Value, name: &str| port_of(instance(s, name)["address"].as_str().unwrap());
    let old = status["galera"]["writer"].as_str().unwrap().to_string();
    let others: Vec<String> = instance_names().into_iter().filter(|n| *n != old).collect();
    let (first_backup, second_backup) = (others[0].clone(), others[1].clone());

    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(connect_endpoint(&rw, &password).await);
    }
    let (conns, ports) = ports_of(held).await;
    assert_eq!(ports, vec![port(&status, &old); 3]);
    held = conns;

    let out = haproxy_admin(
        &local.state,
        &format!("set server rw/{first_backup} state maint"),
    );
    assert!(out.trim().is_empty(), "HAProxy refused: {out}");
    let pid = local.mariadbd_pid(&old).expect("the writer's mariadbd");
    kill(pid, "KILL");
    // Sessions opened while HAProxy fails over by itself: on the second
    // backup.
    for _ in 0..3 {
        held.push(connect_endpoint(&rw, &password).await);
    }
    let moved = local.wait_for("a new writer", |s| {
        s["galera"]["writer"].is_string() && s["galera"]["writer"] != old.as_str()
    });
    eprintln!(
        "HAProxy failed over to {second_backup}; the loop's writer is {}",
        moved["galera"]["writer"]
    );
    // The first backup is back in HAProxy's rw list.
    std::thread::sleep(Duration::from_secs(1));
    let out = haproxy_admin(
        &local.state,
        &format!("set server rw/{first_backup} state ready"),
    );
    assert!(out.trim().is_empty(), "HAProxy refused: {out}");
    std::thread::sleep(Duration::from_secs(3));
    for _ in 0..3 {
        held.push(connect_endpoint(&rw, &password).await);
    }
    // A few ticks for the loop to act on what it sees.
    std::thread::sleep(Duration::from_secs(2));
    let s = local.status().unwrap();
    let writer = s["galera"]["writer"].as_str().unwrap().to_string();
    let (alive, ports) = ports_of(held).await;
    let distinct: BTreeSet<u16> = ports.iter().copied().collect();
    eprintln!(
        "writer {writer} (port {}); {} of 9 rw sessions open, on ports {distinct:?}; events {}",
        port(&s, &writer),
        alive.len(),
        events(&s)
    );
    assert!(
        alive.len() >= 3,
        "the last sessions were cut too: {ports:?}"
    );
    assert_eq!(
        distinct,
        BTreeSet::from([port(&s, &writer)]),
        "open rw sessions on more than one node (writer {writer}): {}",
        events(&s)
    );
    // New sessions go there too, and writes work.
    let mut c = connect_endpoint(&rw, &password).await;
    let p: Option<u16> = c.query_first("SELECT @@port").await.unwrap();
    assert_eq!(p, Some(port(&s, &writer)));
    c.query_drop("CREATE DATABASE IF NOT EXISTS app")
        .await
        .unwrap();
    drop(alive);
    eprintln!("one-writer test took {:.1}s", t0.elapsed().as_secs_f64());
    local.down();
}

/// The events of `s` with reason `reason` (their messages).
fn events_of(s: &Value, reason: &str) -> Vec<String> {
    let tag = format!(" {reason}: ");
    s["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e.as_str()?.split_once(&tag).map(|(_, m)| m.to_string()))
        .collect()
}

/// 5 (second half). A changed `spec.configuration` handed to the running
/// cluster with `up -f` under write load: every member restarts once with
/// the new my.cnf, one at a time, each Synced again before the next, the
/// writer last after `rw` moved to another member; every acknowledged row
/// is present. A change the running cluster cannot take is refused naming
/// the field and changes nothing.
#[tokio::test(flavor = "multi_thread")]
async fn pxc_configuration_change_restarts_one_at_a_time_writer_last() {
    let t0 = Instant::now();
    let (mut local, status) = healthy(Local::new());
    let (rw, password) = (rw_endpoint(&status), local.root_password());
    create_table(&rw, &password).await;
    let old_writer = status["galera"]["writer"].as_str().unwrap().to_string();

    // Refused: a running cluster does not grow its storage.
    let managers = local.state_json()["managers"].clone();
    let saved = std::fs::read_to_string(local.state.join("cluster.yaml")).unwrap();
    let bad = local.tmp.path().join("grown.yaml");
    std::fs::write(&bad, simple_pxc("").replace("size: 1Gi", "size: 2Gi")).unwrap();
    let out = local.up_once(&bad, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a running cluster took storage 2Gi");
    assert!(stderr.contains("spec.storage.size"), "{stderr}");
    eprintln!("refused: {}", stderr.trim());
    assert_eq!(
        std::fs::read_to_string(local.state.join("cluster.yaml")).unwrap(),
        saved
    );
    assert_eq!(local.state_json()["managers"], managers);

    let writer = Writer::start(rw.clone(), password.clone(), 1000);
    wait_acks(&writer, 0, 100, "before the change").await;
    let changed = simple_pxc("").replace("max_connections = 100", "max_connections = 151");
    let t_apply = Instant::now();
    let (_, stdout) = local.apply_ok("changed.yaml", &changed);
    eprintln!("{}", stdout.trim());
    local.wait_for("the rolling restart done", |s| {
        !events_of(s, "RollingRestartDone").is_empty()
    });
    let rolled = t_apply.elapsed();
    let s = local.wait_healthy();
    // Every event (the status shows the last 20; state.json keeps 50).
    let done = local.state_json()["galera"].clone();
    eprintln!("events: {:#}", done["events"]);
    let restarting = events_of(&done, "Restarting");
    let restarted = events_of(&done, "Restarted");
    eprintln!("restarting: {restarting:?}\nrestarted: {restarted:?}");
    let order: Vec<String> = restarting
        .iter()
        .map(|m| m.split_whitespace().next().unwrap().to_string())
        .collect();
    assert_eq!(order.len(), 3, "{order:?}");
    assert_eq!(
        order.iter().collect::<BTreeSet<_>>().len(),
        3,
        "each member restarts once: {order:?}"
    );
    // One at a time: each Restarted before the next Restarting.
    let seq = subjects_of(&done, &["Restarting", "Restarted"]);
    assert_eq!(seq, [0, 0, 1, 1, 2, 2].map(|i| order[i].clone()), "{seq:?}");
    // Never the writer while it restarts: follow the writer through the
    // events. `rw` moves off a member before it restarts ("before"), or
    // earlier by itself (an IST donor is briefly not Synced).
    let mut writer_now = old_writer.clone();
    let (mut moved_before, mut moved_by_itself, mut applied) = (false, false, false);
    let all: Vec<&str> = done["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e.as_str())
        .collect();
    for e in all {
        applied |= e.contains(" Applied: ");
        if !applied {
            continue;
        }
        if let Some((_, m)) = e.split_once(" WriterChanged: ") {
            let to = m.split(" to ").nth(1).unwrap();
            writer_now = to.split_whitespace().next().unwrap().to_string();
            moved_before |= m.contains(" before ");
            moved_by_itself |= m.contains("(not ready)");
        }
        if let Some((_, m)) = e.split_once(" Restarting: ") {
            let who = m.split_whitespace().next().unwrap();
            assert_ne!(who, writer_now, "{who} restarted while it was the writer");
        }
    }
    assert!(
        moved_before || moved_by_itself,
        "rw never moved off {old_writer}, yet every member restarted"
    );
    for name in instance_names() {
        let addr = instance(&s, &name)["address"].as_str().unwrap();
        let mut c = connect(addr, &password).await.unwrap();
        let mc: Option<u64> = c.query_first("SELECT @@max_connections").await.unwrap();
        assert_eq!(mc, Some(151), "{name} runs the old configuration");
    }
    let acked = writer.stop().await;
    assert_all_present(&rw, &password, &acked).await;
    assert_same_rows_everywhere(&s, &password).await;
    eprintln!(
        "rolling restart of 3 members: {:.1}s from `up -f`; {} writes acknowledged; test took {:.1}s",
        rolled.as_secs_f64(),
        acked.len(),
        t0.elapsed().as_secs_f64()
    );
    local.down();
}

/// The subject (the first word of the message) of every event of `s` with
/// one of `reasons`, in order.
fn subjects_of(s: &Value, reasons: &[&str]) -> Vec<String> {
    s["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e.as_str())
        .filter(|e| reasons.iter().any(|r| e.contains(&format!(" {r}: "))))
        .map(|e| {
            e.split_once(": ")
                .unwrap()
                .1
                .split_whitespace()
                .next()
                .unwrap()
                .to_string()
        })
        .collect()
}

/// The message of the last event of `s` with reason `reason`.
fn last_event(s: &Value, reason: &str) -> Option<String> {
    events_of(s, reason).pop()
}

/// The first file called `name` under `dir`.
fn find_file(dir: &Path, name: &str) -> Option<PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let p = entry.path();
        if p.is_dir() {
            if let Some(f) = find_file(&p, name) {
                return Some(f);
            }
        } else if entry.file_name() == name {
            return Some(p);
        }
    }
    None
}

/// `stratum local status -o json` of `state`, when it answers.
fn status_of(state: &Path) -> Option<Value> {
    let out = RUNTIME
        .stratum()
        .args(["local", "status", "-o", "json", "--state-dir"])
        .arg(state)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).ok())
        .flatten()
}

/// Every member of `s` Synced in one Primary component of `n` members.
fn synced_group_of(s: &Value, n: usize) -> bool {
    let members = s["instances"].as_array().unwrap();
    members.len() == n
        && members.iter().all(|i| {
            i["wsrep"]["state"] == "Synced"
                && i["wsrep"]["clusterSize"] == n as i64
                && i["wsrep"]["clusterStatus"] == "Primary"
        })
}

/// 5. Scale 3 → 5 → 3 under a light write load through `rw`: members are
/// added one at a time (each Synced and in HAProxy before the next) and
/// removed from the highest ordinal down with a clean leave (their
/// `grastate.dat` keeps the seqno); no member ever reports a non-Primary
/// component; `whenScaled: Retain` keeps the removed members' directories
/// (a second 3 → 5 reuses them), `Delete` deletes them; every
/// acknowledged row is present.
#[tokio::test(flavor = "multi_thread")]
async fn pxc_scales_3_to_5_to_3_under_load_keeping_quorum() {
    let t0 = Instant::now();
    let (mut local, status) = healthy(Local::new());
    let (rw, password) = (rw_endpoint(&status), local.root_password());
    create_table(&rw, &password).await;

    // Watch every member's component the whole time.
    let watching = Arc::new(AtomicBool::new(true));
    let non_primary: Arc<Mutex<Vec<String>>> = Arc::default();
    let watcher = {
        let (w, bad, state) = (watching.clone(), non_primary.clone(), local.state.clone());
        std::thread::spawn(move || {
            let mut polls = 0u64;
            while w.load(Ordering::Relaxed) {
                if let Some(s) = status_of(&state) {
                    polls += 1;
                    for i in s["instances"].as_array().into_iter().flatten() {
                        // A joiner sees a non-primary view until its
                        // state exchange is done; a member of the group
                        // (Synced or a donor) must never.
                        let state = i["wsrep"]["state"].as_str().unwrap_or_default();
                        let member = state == "Synced" || state.starts_with("Donor");
                        if i["wsrep"]["clusterStatus"] == "non-Primary" {
                            let line = format!("{} {}", i["name"], i["wsrep"]);
                            if member {
                                bad.lock().unwrap().push(line);
                            } else {
                                eprintln!("joiner not in the primary component yet: {line}");
                            }
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            polls
        })
    };
    let writer = Writer::paced(
        rw.clone(),
        password.clone(),
        1000,
        Duration::from_millis(20),
    );
    wait_acks(&writer, 0, 50, "before scaling").await;

    let five = simple_pxc("").replace("instances: 3", "instances: 5");
    let t_up = Instant::now();
    local.apply_ok("five.yaml", &five);
    let scaled_to = |n: usize| {
        move |s: &Value| {
            synced_group_of(s, n)
                && last_event(s, "Scaled").as_deref()
                    == Some(&format!("the cluster has {n} members"))
        }
    };
    local.wait_for("5 members Synced", scaled_to(5));
    // Every event (the status shows the last 20; state.json keeps 50).
    let s5 = local.state_json()["galera"].clone();
    let scaled_up = t_up.elapsed();
    let added = events_of(&s5, "MemberAdded");
    eprintln!("added: {added:?}");
    assert_eq!(added.len(), 2, "{added:?}");
    assert!(added[0].starts_with(&format!("{CLUSTER}-3 ")), "{added:?}");
    assert!(added[1].starts_with(&format!("{CLUSTER}-4 ")), "{added:?}");
    // One at a time: the second was started after the first was in.
    let seq = subjects_of(&s5, &["AddingMember", "MemberAdded"]);
    assert_eq!(
        seq,
        [
            format!("{CLUSTER}-3"),
            format!("{CLUSTER}-3"),
            format!("{CLUSTER}-4"),
            format!("{CLUSTER}-4")
        ],
        "{seq:?}"
    );
    let base = writer.acked_count();
    wait_acks(&writer, base, 20, "with 5 members").await;

    // 5 → 3 with the default whenScaled: Retain.
    let t_down = Instant::now();
    local.apply_ok("three.yaml", &simple_pxc(""));
    local.wait_for("back to 3 members", scaled_to(3));
    let s3 = local.state_json()["galera"].clone();
    let scaled_down = t_down.elapsed();
    let removed = events_of(&s3, "MemberRemoved");
    eprintln!("removed: {removed:?}");
    assert_eq!(removed.len(), 2, "{removed:?}");
    assert!(
        removed[0].starts_with(&format!("{CLUSTER}-4 ")),
        "{removed:?}"
    );
    assert!(
        removed[1].starts_with(&format!("{CLUSTER}-3 ")),
        "{removed:?}"
    );
    for gone in [3, 4] {
        let d = local.instance_dir(&format!("{CLUSTER}-{gone}"));
        // A clean leave: the server stopped normally, so its grastate.dat
        // holds its last seqno (an unclean stop leaves -1).
        let grastate = find_file(&d, "grastate.dat")
            .unwrap_or_else(|| panic!("{} not kept (whenScaled: Retain)", d.display()));
        let text = std::fs::read_to_string(&grastate).unwrap();
        let seqno = text
            .lines()
            .find_map(|l| l.strip_prefix("seqno:"))
            .map(|v| v.trim().parse::<i64>().unwrap());
        assert!(
            seqno.is_some_and(|n| n > 0),
            "{CLUSTER}-{gone} did not stop cleanly: {text}"
        );
    }
    let managers = local.state_json()["managers"].clone();
    assert_eq!(
        managers.as_object().unwrap().len(),
        3,
        "managers after scaling down: {managers}"
    );
    let base = writer.acked_count();
    wait_acks(&writer, base, 20, "with 3 members").await;

    // Up again: the retained members rejoin; then down with Delete.
    local.apply_ok("five.yaml", &five);
    local.wait_for("5 members Synced again", scaled_to(5));
    let again = events_of(&local.state_json()["galera"], "MemberAdded");
    eprintln!("added again: {again:?}");
    local.apply_ok(
        "three-delete.yaml",
        &simple_pxc("  pvcRetentionPolicy:\n    whenScaled: Delete\n"),
    );
    local.wait_for("3 members again", scaled_to(3));
    for gone in [3, 4] {
        let d = local.instance_dir(&format!("{CLUSTER}-{gone}"));
        assert!(
            !d.exists(),
            "{} kept despite whenScaled: Delete",
            d.display()
        );
    }
    let base = writer.acked_count();
    wait_acks(&writer, base, 20, "with 3 members again").await;
    let acked = writer.stop().await;
    watching.store(false, Ordering::Relaxed);
    let polls = watcher.join().unwrap();
    let bad = non_primary.lock().unwrap().clone();
    assert!(
        bad.is_empty(),
        "a member reported a non-Primary component: {bad:?}"
    );
    let s = local.wait_healthy();
    assert_all_present(&rw, &password, &acked).await;
    assert_same_rows_everywhere(&s, &password).await;
    eprintln!(
        "scale 3→5 {:.1}s, 5→3 {:.1}s (then 3→5→3 again); {} writes acknowledged, {polls} status polls never non-Primary; test took {:.1}s",
        scaled_up.as_secs_f64(),
        scaled_down.as_secs_f64(),
        acked.len(),
        t0.elapsed().as_secs_f64()
    );
    local.down();
}

/// 3. Every process killed with SIGKILL (`up`, the managers, mariadbd; one
/// node earlier than the others so that it is behind), then `up` again:
/// the group is bootstrapped once, from a most advanced node, never from
/// the one behind; every acknowledged row is there; the cluster UUID is
/// the same and the seqno continues.
#[tokio::test(flavor = "multi_thread")]
async fn pxc_full_crash_recovers_from_the_most_advanced_node() {
    let t0 = Instant::now();
    let (mut local, status) = healthy(Local::new());
    let (rw, password) = (rw_endpoint(&status), local.root_password());
    create_table(&rw, &password).await;
    let writer = Writer::start(rw.clone(), password.clone(), 1000);
    wait_acks(&writer, 0, 100, "before the crash").await;

    // One node (not the writer) dies first, manager and server: the
    // others go on without it and get ahead.
    let w = status["galera"]["writer"].as_str().unwrap().to_string();
    let behind = instance_names().into_iter().find(|n| *n != w).unwrap();
    let (m, p) = (
        local.manager_pid(&behind),
        local.mariadbd_pid(&behind).unwrap(),
    );
    let up_pid = local.up.as_ref().unwrap().id() as i32;
    // `up` is stopped first so that it does not restart the manager.
    kill(up_pid, "STOP");
    kill(m, "KILL");
    kill(p, "KILL");
    let base = writer.acked_count();
    wait_acks(&writer, base, 100, "after the first node died").await;

    // Then everything else, at once.
    let mut victims = vec![up_pid];
    for n in instance_names().iter().filter(|n| **n != behind) {
        victims.push(local.manager_pid(n));
        victims.push(local.mariadbd_pid(n).unwrap());
    }
    for pid in &victims {
        kill(*pid, "KILL");
    }
    kill(up_pid, "CONT");
    local.up.take().unwrap().wait().unwrap();
    let acked = writer.stop().await;
    let before = local.state_json()["status"].clone();
    let uuid = instance(&before, &w)["wsrep"]["clusterUuid"]
        .as_str()
        .unwrap()
        .to_string();
    let bootstraps = local.state_json()["galera"]["bootstraps"].as_u64().unwrap();
    eprintln!("crashed with {} acknowledged rows", acked.len());

    // HAProxy survived the killed `up`; the next `up` stops it, and the
    // managers' recovered positions decide the bootstrap member.
    local.start();
    // That `up` is killed as soon as it has ordered the bootstrap; the next
    // one restarts the managers (stopping a member that may already have
    // bootstrapped) and must order that same member, never another.
    let deadline = Instant::now() + CONVERGE_TIMEOUT;
    loop {
        let st = local.state_json();
        if st["galera"]["bootstrap"]["orderedAt"].is_string() {
            eprintln!(
                "killing `up` with the bootstrap ordered: {}",
                st["galera"]["bootstrap"]
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no bootstrap ordered\n{}",
            local.logs()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    local.kill_up();
    let t_up = Instant::now();
    local.start();
    let s = local.wait_for("writable again", |s| s["primary"].is_string());
    eprintln!(
        "full crash: writable {:.1}s after up",
        t_up.elapsed().as_secs_f64()
    );
    let s2 = local.wait_healthy();
    eprintln!(
        "full crash: all Synced {:.1}s after up",
        t_up.elapsed().as_secs_f64()
    );
    let st = local.state_json();
    assert_eq!(
        st["galera"]["bootstraps"].as_u64().unwrap(),
        bootstraps + 1,
        "exactly one bootstrap: {}",
        st["galera"]
    );
    let ev = st["galera"]["events"].to_string();
    eprintln!("events: {ev}");
    let decided = ev
        .split("BootstrapDecided: ")
        .last()
        .expect("a bootstrap decision");
    assert!(
        !decided.starts_with(&format!("bootstrap from {behind}")),
        "bootstrapped from {behind}, which was behind: {ev}"
    );
    assert!(decided.contains("highest recovered seqno"), "{decided}");
    // Every order since the decision went to the decided member.
    let member = decided
        .trim_start_matches("bootstrap from ")
        .split(':')
        .next()
        .unwrap();
    for order in decided.split("BootstrapOrdered: ").skip(1) {
        assert!(
            order.starts_with(&format!("{member} ordered")),
            "an order to another member than {member}: {ev}"
        );
    }
    for i in s2["instances"].as_array().unwrap() {
        assert_eq!(i["wsrep"]["clusterUuid"], uuid.as_str(), "{i}");
    }
    let seqno_before = before["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i["wsrep"]["seqno"].as_i64())
        .max()
        .unwrap();
    let seqno_after = instance(&s2, s2["primary"].as_str().unwrap())["wsrep"]["seqno"]
        .as_i64()
        .unwrap();
    assert!(
        seqno_after >= seqno_before && seqno_after > 100,
        "seqno went from {seqno_before} to {seqno_after}"
    );
    assert_all_present(&rw, &password, &acked).await;
    assert_same_rows_everywhere(&s2, &password).await;
    let _ = s;
    eprintln!("test took {:.1}s", t0.elapsed().as_secs_f64());
    local.down();
}

/// A user's TLS Secret made the way an administrator would with the
/// openssl tool (RSA keys, a CA, a certificate for `localhost` and
/// 127.0.0.1), put where the local runtime looks for the Secret `my-certs`,
/// and the cluster file pointed at it. Returns the Secret's directory.
fn use_own_tls_secret(local: &Local) -> PathBuf {
    let dir = local.state.join("tls").join("my-certs");
    std::fs::create_dir_all(&dir).unwrap();
    let openssl = |args: &str| {
        let out = Command::new("openssl")
            .args(args.split_whitespace())
            .current_dir(&dir)
            .output()
            .expect("openssl not found: apt-get install openssl (scripts/setup.sh)");
        assert!(
            out.status.success(),
            "openssl {args}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .unwrap();
    openssl(
        "req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 2 -subj /CN=test-admin-CA",
    );
    openssl("req -newkey rsa:2048 -nodes -keyout tls.key -out tls.csr -subj /CN=localhost");
    openssl(
        "x509 -req -in tls.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out tls.crt -days 2 -extfile san.ext",
    );
    std::fs::write(
        &local.file,
        simple_pxc("  tls:\n    secretName: my-certs\n"),
    )
    .unwrap();
    dir
}

/// 4. Two of three nodes lost (frozen with SIGSTOP, then killed): the
/// survivor leaves the Primary component and refuses writes rather than
/// diverge, and `rw` routes nowhere; when the others return, the cluster
/// recovers with every row. The cluster runs with a user's TLS Secret
/// (`spec.tls.secretName`, RSA certificates made with openssl), used as
/// given.
#[tokio::test(flavor = "multi_thread")]
async fn pxc_quorum_loss_refuses_writes_then_recovers() {
    let t0 = Instant::now();
    let mut local = Local::new();
    let own_tls = use_own_tls_secret(&local);
    let own_cert = std::fs::read(own_tls.join("tls.crt")).unwrap();
    local.start();
    let status = local.wait_healthy();
    let rw = rw_endpoint(&status);
    let password = local.root_password();
    create_table(&rw, &password).await;

    let survivor = status["galera"]["writer"].as_str().unwrap().to_string();
    let survivor_addr = instance(&status, &survivor)["address"]
        .as_str()
        .unwrap()
        .to_string();
    let lost: Vec<String> = instance_names()
        .into_iter()
        .filter(|n| *n != survivor)
        .collect();
    let pids: Vec<i32> = lost
        .iter()
        .map(|n| local.mariadbd_pid(n).unwrap())
        .collect();
    for pid in &pids {
        kill(*pid, "STOP");
    }
    let s = local.wait_for("the survivor out of the Primary component", |s| {
        let i = instance(s, &survivor);
        i["wsrep"]["clusterStatus"].is_string()
            && i["wsrep"]["clusterStatus"] != "Primary"
            && s["primary"].is_null()
    });
    eprintln!("survivor: {}", instance(&s, &survivor)["wsrep"]);
    // The survivor refuses writes (and reads) by itself.
    let mut c = connect(&survivor_addr, &password).await.unwrap();
    let err = c
        .query_drop("INSERT INTO app.rows_acked (n, port) VALUES (-2, @@port)")
        .await
        .expect_err("a non-Primary member took a write");
    eprintln!("survivor refused the write: {err}");
    drop(c);
    // rw has no healthy server.
    let refused = match connect(&rw, &password).await {
        Err(_) => true,
        Ok(mut c) => c
            .query_drop("INSERT INTO app.rows_acked (n, port) VALUES (-3, @@port)")
            .await
            .is_err(),
    };
    assert!(refused, "rw took a write without quorum");

    // The lost nodes die and their managers start them again.
    for pid in &pids {
        kill(*pid, "KILL");
        kill(*pid, "CONT");
    }
    let s = local.wait_healthy();
    let mut c = connect_endpoint(&rw, &password).await;
    c.query_drop("INSERT INTO app.rows_acked (n, port) VALUES (-4, @@port)")
        .await
        .unwrap();
    let n: Option<i64> = c
        .query_first("SELECT count(*) FROM app.rows_acked WHERE n > 0")
        .await
        .unwrap();
    assert_eq!(n, Some(100));
    assert_same_rows_everywhere(&s, &password).await;
    // Every member ran, and rejoined, with the user's certificate, which
    // nothing replaced.
    for name in instance_names() {
        let address = instance(&s, &name)["address"].as_str().unwrap().to_string();
        let mut c = connect(&address, &password).await.unwrap();
        let (_, opts): (String, String) = c
            .query_first("SHOW GLOBAL VARIABLES LIKE 'wsrep_provider_options'")
            .await
            .unwrap()
            .unwrap();
        let want = format!("socket.ssl_cert = {}", own_tls.join("tls.crt").display());
        assert!(
            opts.split("; ").any(|o| o == want) && opts.contains("socket.ssl = YES"),
            "{name}: not on the user's certificate: {opts}"
        );
    }
    assert_eq!(std::fs::read(own_tls.join("tls.crt")).unwrap(), own_cert);
    assert!(
        !tls_dir(&local.state).exists(),
        "a Secret was generated anyway"
    );
    eprintln!("events: {}", events(&s));
    eprintln!("test took {:.1}s", t0.elapsed().as_secs_f64());
    local.down();
}

/// Pids of the processes whose command line contains every one of
/// `needles`.
fn pids_with(needles: &[&str]) -> Vec<i32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if !cmd.is_empty() && needles.iter().all(|n| cmd.contains(n)) {
            out.push(pid);
        }
    }
    out
}

/// Wait until no process with `pid` is left (a zombie counts as gone).
fn wait_gone(pid: i32, what: &str, within: Duration) -> Duration {
    let t = Instant::now();
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let gone = stat
            .rsplit_once(") ")
            .is_none_or(|(_, rest)| rest.starts_with('Z'));
        if gone {
            return t.elapsed();
        }
        assert!(
            t.elapsed() < within,
            "{what} (pid {pid}) still runs after {within:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A joiner whose server aborts in the middle of its SST — MariaDB aborts
/// a joiner whose state transfer cannot go on — is Synced once its
/// manager has started it again: the SST script and `socat` the dead
/// server left behind (`timeout` puts `socat` in a process group of its
/// own) are killed when it exits. Before, they held the joiner's SST pid
/// file and port for `sst-initial-timeout` (300 s) and every new start
/// aborted 2 s later on "previous SST script still running" (seen as a
/// flake of the writer-kill test after two members joined at once).
/// Then no server outlives its manager: a manager killed with SIGKILL
/// (its `up` stops the server it left and starts a new manager), one
/// stopped with SIGTERM, and one SIGKILLed together with `up` (`stratum
/// local down` stops the server it left).
#[tokio::test(flavor = "multi_thread")]
async fn pxc_an_aborted_joiner_rejoins_and_no_server_outlives_its_manager() {
    let t0 = Instant::now();
    let mut local = Local::new();
    local.start();
    let instances = local.state.join("instances").display().to_string();
    let tls = tls_dir(&local.state).display().to_string();
    // A joiner's SST script running, its socat listening.
    let deadline = Instant::now() + CONVERGE_TIMEOUT;
    let joiner = loop {
        let found = instance_names().into_iter().find(|n| {
            let dir = local.instance_dir(n).display().to_string();
            !pids_with(&["socat", "openssl-listen", &tls]).is_empty()
                && !pids_with(&["wsrep_sst_mariabackup", "--role joiner", &dir]).is_empty()
                && local.mariadbd_pid(n).is_some()
        });
        if let Some(n) = found {
            break n;
        }
        assert!(
            Instant::now() < deadline,
            "no joiner's SST seen\n{}",
            local.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let dir = local.instance_dir(&joiner).display().to_string();
    let pid = local.mariadbd_pid(&joiner).unwrap();
    let helpers = pids_with(&["wsrep_sst_mariabackup", "--role joiner", &dir]);
    kill(pid, "ABRT");
    let t_abort = Instant::now();
    eprintln!(
        "{joiner}'s mariadbd (pid {pid}) aborted during its SST; its SST script: {helpers:?}"
    );
    let s = local.wait_healthy();
    eprintln!(
        "{joiner} Synced {:.1}s after the abort",
        t_abort.elapsed().as_secs_f64()
    );
    let log = std::fs::read(local.instance_dir(&joiner).join("run/server.log")).unwrap();
    assert!(
        !String::from_utf8_lossy(&log).contains("previous SST script still running"),
        "a start of {joiner} found the dead server's SST script\n{}",
        local.logs()
    );
    for h in helpers {
        wait_gone(h, "the aborted server's SST script", Duration::ZERO);
    }
    assert_eq!(instance(&s, &joiner)["wsrep"]["lastStateTransfer"], "sst");

    // SIGKILL of a manager: `up` stops the server it left, and the member
    // comes back under a new manager.
    let names = instance_names();
    let (a, b, c) = (&names[0], &names[1], &names[2]);
    let (manager, server) = (local.manager_pid(a), local.mariadbd_pid(a).unwrap());
    kill(manager, "KILL");
    let took = wait_gone(
        server,
        &format!("{a}'s server after its manager's SIGKILL"),
        Duration::from_secs(20),
    );
    eprintln!(
        "{a}'s manager SIGKILLed: its server gone after {:.1}s",
        took.as_secs_f64()
    );
    local.wait_restarted(a, manager);
    assert_ne!(local.mariadbd_pid(a), Some(server));

    // SIGTERM: the manager stops its server itself.
    let (manager, server) = (local.manager_pid(b), local.mariadbd_pid(b).unwrap());
    kill(manager, "TERM");
    let took = wait_gone(
        server,
        &format!("{b}'s server after its manager's SIGTERM"),
        Duration::from_secs(20),
    );
    eprintln!(
        "{b}'s manager SIGTERMed: its server gone after {:.1}s",
        took.as_secs_f64()
    );
    local.wait_restarted(b, manager);

    // `up` and a manager SIGKILLed together: nobody supervises that
    // server any more; `down` stops it with the managers `up` left.
    let server = local.mariadbd_pid(c).unwrap();
    local.kill_up();
    kill(local.manager_pid(c), "KILL");
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        local.mariadbd_pid(c) == Some(server),
        "{c}'s server is expected to run on without its manager until `down`"
    );
    let t = Instant::now();
    local.down();
    eprintln!(
        "down after `up` and a manager were SIGKILLed took {:.1}s",
        t.elapsed().as_secs_f64()
    );
    let left = pids_with(&[&instances]);
    assert!(
        left.is_empty(),
        "processes of the cluster left after down: {left:?}"
    );
    eprintln!("test took {:.1}s", t0.elapsed().as_secs_f64());
}
