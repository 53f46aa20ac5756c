//! Engine tests of failsafe (the write lease a primary extends by itself
//! while every replica of its list acknowledges it, see docs/failover.md)
//! with real instance managers and real PostgreSQL 15 binaries: a primary
//! keeps taking writes past its lease while both replicas ack; a revoked
//! replica stops it within the validity of its last ack, which it
//! reports; a replica whose manager is gone stops it within a TTL of the
//! last ack. No operator runs: the test grants the lease itself, as the
//! operator would, and then goes away. The fixture is the one of
//! `instance.rs` (a copy: each test file is its own crate).
//!
//! Missing binaries fail the tests, they never skip.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use operator_core::instance::config::{InstanceConfig, PeerEndpoint};
use operator_core::instance::manager;
use operator_core::instance::protocol::{MemberStatus, RevokeReply, Role};
use stratum_postgres::instance::PostgresDriver;
use stratum_postgres::settings::secret_keys;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const PG15_BIN: &str = "/usr/lib/postgresql/15/bin";
const CLUSTER: &str = "simple-pg";
const APP_PASSWORD: &str = "app-pw-'quoted'";
const TOKEN: &str = "test-token-0123456789";
const READY_TIMEOUT: Duration = Duration::from_secs(90);

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// The PostgreSQL 15 binary directory; fails the test when missing.
fn pg15_bin_dir() -> PathBuf {
    let dir = PathBuf::from(PG15_BIN);
    assert!(
        dir.join("postgres").is_file() && dir.join("initdb").is_file(),
        "PostgreSQL 15 binaries not found in {PG15_BIN}: install postgresql-15 (Debian: apt-get install postgresql-15)"
    );
    dir
}

/// The unprivileged user to run PostgreSQL as when the tests run as root:
/// the distribution's `postgres` user, else `stratum` (created).
fn run_as_user() -> Option<String> {
    if !nix::unistd::Uid::effective().is_root() {
        return None;
    }
    for name in ["postgres", "stratum"] {
        if nix::unistd::User::from_name(name).ok().flatten().is_some() {
            return Some(name.into());
        }
    }
    let status = std::process::Command::new("useradd")
        .args([
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            "stratum",
        ])
        .status()
        .expect("run useradd");
    assert!(
        status.success()
            || nix::unistd::User::from_name("stratum")
                .ok()
                .flatten()
                .is_some(),
        "useradd stratum failed: {status}"
    );
    Some("stratum".into())
}

fn free_ports(n: usize) -> Vec<u16> {
    // Hold every listener until all ports are chosen so none repeats.
    let listeners: Vec<_> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// A temporary cluster: directory, secrets, members on loopback ports.
struct Fixture {
    dir: tempfile::TempDir,
    cluster_id: String,
    members: Vec<PeerEndpoint>,
    run_as: Option<String>,
    bin_dir: PathBuf,
}

impl Fixture {
    fn new(instances: u32) -> Self {
        init_tracing();
        let bin_dir = pg15_bin_dir();
        let dir = tempfile::Builder::new()
            .prefix("stratum-pg-")
            .tempdir()
            .unwrap();
        // The database user must be able to traverse to its directories.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let secrets = dir.path().join("secrets");
        std::fs::create_dir(&secrets).unwrap();
        for (key, value) in [
            (secret_keys::SUPERUSER_PASSWORD, "super-pw"),
            (secret_keys::REPLICATION_PASSWORD, "repl:pw\\x"),
            (secret_keys::APP_PASSWORD, APP_PASSWORD),
            (secret_keys::API_TOKEN, TOKEN),
        ] {
            std::fs::write(secrets.join(key), format!("{value}\n")).unwrap();
        }
        let ports = free_ports(2 * instances as usize);
        let members = (0..instances)
            .map(|i| PeerEndpoint {
                name: format!("{CLUSTER}-{i}"),
                host: "127.0.0.1".into(),
                db_port: ports[2 * i as usize],
                api_port: ports[2 * i as usize + 1],
                ports: Default::default(),
            })
            .collect();
        let cluster_id = format!("uid-{}", dir.path().file_name().unwrap().to_string_lossy());
        Self {
            dir,
            cluster_id,
            members,
            run_as: run_as_user(),
            bin_dir,
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn config(&self, ordinal: usize) -> InstanceConfig {
        let name = self.members[ordinal].name.clone();
        let base = self.path().join(&name);
        InstanceConfig {
            kind: "PostgresCluster".into(),
            cluster: CLUSTER.into(),
            namespace: "default".into(),
            cluster_id: self.cluster_id.clone(),
            instance: name,
            data_dir: base.join("data"),
            volumes: Default::default(),
            run_dir: base.join("run"),
            listen_address: "127.0.0.1".into(),
            members: self.members.clone(),
            token_file: self.path().join("secrets").join(secret_keys::API_TOKEN),
            secrets_dir: self.path().join("secrets"),
            tls_dir: None,
            run_as_user: self.run_as.clone(),
            bin_dir: Some(self.bin_dir.clone()),
            engine: serde_json::json!({
                "version": 15,
                "parameters": { "shared_buffers": "16MB", "max_connections": "30" },
                "initdb": {
                    "database": "app",
                    "owner": "app",
                    "dataChecksums": true,
                    "encoding": "UTF8"
                }
            }),
        }
    }

    async fn app_client(&self, ordinal: usize) -> tokio_postgres::Client {
        let m = &self.members[ordinal];
        let (client, conn) = tokio_postgres::Config::new()
            .host("127.0.0.1")
            .port(m.db_port)
            .user("app")
            .password(APP_PASSWORD)
            .dbname("app")
            .connect_timeout(Duration::from_secs(5))
            .connect(tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("connect as app to {}: {e}", m.name));
        tokio::spawn(conn);
        client
    }
}

/// A manager running in this process. Dropping it aborts the manager task,
/// which kills the server's process group.
struct Running {
    handle: Option<JoinHandle<anyhow::Result<()>>>,
    stop: Option<oneshot::Sender<()>>,
    api: String,
    http: reqwest::Client,
}

impl Running {
    fn start(config: InstanceConfig) -> Self {
        let api = format!("http://127.0.0.1:{}", config.me().unwrap().api_port);
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(manager::run_until(
            config,
            Arc::new(PostgresDriver::new()),
            async move {
                let _ = stop_rx.await;
            },
        ));
        Self {
            handle: Some(handle),
            stop: Some(stop_tx),
            api,
            http: reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
        }
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if self.handle.as_ref().unwrap().is_finished() {
                let result = self.handle.take().unwrap().await.unwrap();
                panic!("manager exited before ready: {result:?}");
            }
            if let Ok(resp) = self.http.get(format!("{}/readyz", self.api)).send().await
                && resp.status() == 200
            {
                return;
            }
            if Instant::now() > deadline {
                let status = self.status().await;
                panic!("not ready within {READY_TIMEOUT:?}: {status:?}");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.http.get(format!("{}{path}", self.api))
    }

    fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.http.post(format!("{}{path}", self.api))
    }

    async fn status(&self) -> MemberStatus {
        let resp = self
            .get("/v1/status")
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        resp.json().await.unwrap()
    }

    /// The SIGTERM path: ask the manager to stop and wait for it.
    async fn stop(mut self) -> anyhow::Result<()> {
        let _ = self.stop.take().unwrap().send(());
        let handle = self.handle.take().unwrap();
        tokio::time::timeout(Duration::from_secs(60), handle)
            .await
            .expect("manager stops within 60s")
            .unwrap()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            handle.abort();
        }
    }
}

/// The lease TTL of these tests (short, so the test is; the rule is the
/// same at 5 s).
const TTL_MS: u64 = 2000;

impl Running {
    async fn act(&self, action: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
        let resp = self
            .post(&format!("/v1/actions/{action}"))
            .bearer_auth(TOKEN)
            .json(&body)
            .send()
            .await
            .unwrap();
        let code = resp.status().as_u16();
        (code, resp.json().await.unwrap_or(serde_json::Value::Null))
    }
}

impl Fixture {
    /// A lease for `holder` whose failsafe list is `replicas`.
    fn grant(&self, holder: usize, term: u64, replicas: &[usize]) -> serde_json::Value {
        let list: Vec<&PeerEndpoint> = replicas.iter().map(|i| &self.members[*i]).collect();
        serde_json::json!({ "lease": {
            "holder": self.members[holder].name,
            "term": term,
            "ttlMs": TTL_MS,
            "replicas": list,
        }})
    }
}

/// Insert a row every 50 ms for `for_` (or until one fails): the time of
/// the first failure, if any, and the rows acknowledged.
async fn write_for(
    fx: &Fixture,
    ordinal: usize,
    first_id: i32,
    for_: Duration,
) -> (Option<Instant>, i32) {
    let client = fx.app_client(ordinal).await;
    let deadline = Instant::now() + for_;
    let mut id = first_id;
    while Instant::now() < deadline {
        if let Err(e) = client
            .execute("INSERT INTO ticks VALUES ($1)", &[&id])
            .await
        {
            tracing::info!("write {id} failed: {e}");
            return (Some(Instant::now()), id - first_id);
        }
        id += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (None, id - first_id)
}

/// Three real managers: simple-pg-0 primary, 1 and 2 streaming from it.
async fn three(fx: &Fixture) -> Vec<Running> {
    let mut primary = Running::start(fx.config(0));
    primary.wait_ready().await;
    let mut r1 = Running::start(fx.config(1));
    let mut r2 = Running::start(fx.config(2));
    r1.wait_ready().await;
    r2.wait_ready().await;
    fx.app_client(0)
        .await
        .batch_execute("CREATE TABLE ticks (id int PRIMARY KEY)")
        .await
        .unwrap();
    vec![primary, r1, r2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_keeps_writes_on_failsafe_until_a_replica_is_revoked() {
    let fx = Fixture::new(3);
    let ms = three(&fx).await;
    let ttl = Duration::from_millis(TTL_MS);

    // The operator grants once and goes away.
    let (code, reply) = ms[0].act("lease", fx.grant(0, 1, &[1, 2])).await;
    assert_eq!(code, 200, "{reply}");
    // Three TTLs without a renewal: no write fails.
    let (failed, rows) = write_for(&fx, 0, 0, ttl * 3).await;
    assert!(
        failed.is_none(),
        "a write failed on failsafe after {rows} rows"
    );
    let s = ms[0].status().await;
    assert!(s.on_failsafe, "{s:?}");
    assert!(s.lease_remaining_ms.is_some_and(|l| l > 0), "{s:?}");
    assert!(s.failsafe_kept_ms.is_some_and(|k| k > 0), "{s:?}");
    let metrics = ms[0]
        .get("/metrics")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("stratum_instance_on_failsafe 1"),
        "{metrics}"
    );
    for r in &ms[1..] {
        let s = r.status().await;
        let granted = s.failsafe_granted_ms.expect("a replica that acked says so");
        assert!(granted > 0 && granted <= TTL_MS as i64, "{s:?}");
    }
    // A replica does not ack a primary it does not follow, nor itself.
    let (code, reply) = ms[1]
        .act(
            "failsafe",
            serde_json::json!({"primary": "simple-pg-2", "term": 1, "ttlMs": TTL_MS}),
        )
        .await;
    assert_eq!(code, 409, "{reply}");
    assert!(
        reply["error"]
            .as_str()
            .unwrap()
            .contains("follows simple-pg-0"),
        "{reply}"
    );

    // The operator comes back for a failover: it revokes simple-pg-2,
    // which reports its last ack.
    let (code, reply) = ms[2].act("revoke", serde_json::json!({"term": 1})).await;
    let revoked_at = Instant::now();
    assert_eq!(code, 200, "{reply}");
    let reply: RevokeReply = serde_json::from_value(reply).unwrap();
    assert_eq!(reply.revoked_term, 1);
    let granted = reply.failsafe_granted_ms.expect("it acked before");
    assert!(granted > 0 && granted <= TTL_MS as i64, "{reply:?}");
    // Revoked: no more acks for term 1.
    let (code, _) = ms[2]
        .act(
            "failsafe",
            serde_json::json!({"primary": "simple-pg-0", "term": 1, "ttlMs": TTL_MS}),
        )
        .await;
    assert_eq!(code, 409);
    // The primary stops taking writes by the end of that last ack (plus
    // the watchdog's period and the server's stop).
    let (failed, _) = write_for(&fx, 0, 100_000, ttl * 3).await;
    let failed = failed.expect("writes stop once a listed replica is revoked");
    let limit = revoked_at + Duration::from_millis(granted as u64) + Duration::from_millis(800);
    assert!(
        failed <= limit,
        "writes went on {} ms past the revoked replica's last ack",
        (failed - limit).as_millis()
    );
    let s = ms[0].status().await;
    assert!(!s.ready && !s.on_failsafe, "{s:?}");
    // Its status still reports the last ack, in the past now.
    let s = ms[2].status().await;
    assert!(s.failsafe_granted_ms.is_some_and(|g| g < 0), "{s:?}");

    for m in ms {
        m.stop().await.expect("stops cleanly");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_stops_within_a_ttl_of_the_last_ack_when_a_replica_manager_is_gone() {
    let fx = Fixture::new(3);
    let mut ms = three(&fx).await;
    let ttl = Duration::from_millis(TTL_MS);

    let (code, reply) = ms[0].act("lease", fx.grant(0, 1, &[1, 2])).await;
    assert_eq!(code, 200, "{reply}");
    let (failed, rows) = write_for(&fx, 0, 0, ttl * 2).await;
    assert!(
        failed.is_none(),
        "a write failed on failsafe after {rows} rows"
    );
    // simple-pg-2's manager (and its server) go away.
    let r2 = ms.pop().unwrap();
    let last_ack = r2.status().await.failsafe_granted_ms.expect("it acked");
    r2.stop().await.expect("stops cleanly");
    let gone = Instant::now();
    let (failed, _) = write_for(&fx, 0, 100_000, ttl * 3).await;
    let failed = failed.expect("writes stop once a listed replica does not answer");
    // The manager answers until its stop completes (it stops its server
    // first), so it may ack once more after `last_ack` was read: the bound
    // is one TTL from when it was gone (no ack outlives that), not what
    // was left on the ack read before the stop (seen once: 2.1 s after
    // the stop with 1.0 s left on the earlier ack).
    assert!(
        failed <= gone + ttl + Duration::from_millis(800),
        "writes went on {} ms after the manager was gone (TTL {TTL_MS} ms; its ack read before the stop had {last_ack} ms left)",
        (failed - gone).as_millis()
    );
    let s = ms[0].status().await;
    assert!(!s.ready, "{s:?}");
    // The operator's grant of a new term ends it: back as a writer,
    // failsafe again with simple-pg-1 alone in the list.
    let (code, reply) = ms[0].act("lease", fx.grant(0, 2, &[1])).await;
    assert_eq!(code, 200, "{reply}");
    ms[0].wait_ready().await;
    let (failed, rows) = write_for(&fx, 0, 200_000, ttl * 2).await;
    assert!(
        failed.is_none(),
        "a write failed on failsafe after {rows} rows"
    );
    assert_eq!(ms[0].status().await.role, Role::Primary);
    for m in ms {
        m.stop().await.expect("stops cleanly");
    }
}
