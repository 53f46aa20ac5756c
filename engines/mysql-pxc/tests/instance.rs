//! Engine tests of the instance manager with the Galera driver against real
//! MariaDB 10.11 + galera-4 from Debian (`mariadbd`, `mariadb-install-db`,
//! `/usr/lib/galera/libgalera_smm.so`, mariabackup SST). Three instance
//! managers on loopback, each with its own client, API, Galera, IST and SST
//! ports: a new group forms (bootstrap ordered on member 0, the others join
//! by SST), a killed server rejoins by IST, a survivor that lost quorum
//! refuses writes and the group heals when the others return, a full crash
//! is recovered from the most advanced member, `bootstrap` is refused on a
//! Primary member, `reconfigure` sets writable variables live and leaves
//! the rest for a restart, missing binaries are a clear error. The servers run as an unprivileged
//! user when the tests run as root. Missing binaries fail the tests, they
//! never skip.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mysql_async::prelude::Queryable;
use operator_core::engine::{Election, ObservedMember};
use operator_core::instance::config::{InstanceConfig, PeerEndpoint};
use operator_core::instance::manager;
use operator_core::instance::protocol::{MemberStatus, Position, ProcessState, Role};
use stratum_mysql_pxc::galera::{self, NIL_UUID};
use stratum_mysql_pxc::instance::PxcDriver;
use stratum_mysql_pxc::settings::secret_keys;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const CLUSTER: &str = "simple-pxc";
const ROOT_PASSWORD: &str = "root-pw-'quoted'";
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

/// Fail (never skip) when MariaDB Galera is not installed.
fn require_mariadb() {
    for path in [
        "/usr/sbin/mariadbd",
        "/usr/bin/mariadb-install-db",
        "/usr/lib/galera/libgalera_smm.so",
        "/usr/bin/mariabackup",
        "/usr/bin/socat",
    ] {
        assert!(
            Path::new(path).exists(),
            "{path} not found: install MariaDB Galera (Debian: apt-get install mariadb-server galera-4 mariadb-backup rsync socat, or run scripts/setup.sh)"
        );
    }
}

/// The unprivileged user to run MariaDB as when the tests run as root:
/// Debian's `mysql` user, else `stratum` (created).
fn run_as_user() -> Option<String> {
    if !nix::unistd::Uid::effective().is_root() {
        return None;
    }
    for name in ["mysql", "stratum"] {
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
    assert!(status.success(), "useradd stratum failed: {status}");
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
}

impl Fixture {
    fn new(instances: usize) -> Self {
        init_tracing();
        require_mariadb();
        let dir = tempfile::Builder::new()
            .prefix("stratum-pxc-")
            .tempdir()
            .unwrap();
        // The database user must be able to traverse to its directories.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let secrets = dir.path().join("secrets");
        std::fs::create_dir(&secrets).unwrap();
        for (key, value) in [
            (secret_keys::ROOT_PASSWORD, ROOT_PASSWORD),
            (secret_keys::MARIABACKUP_PASSWORD, "sst-pw"),
            (secret_keys::MONITOR_PASSWORD, "monitor-pw"),
            (secret_keys::OPERATOR_PASSWORD, "operator-pw"),
            (secret_keys::PROXYADMIN_PASSWORD, "proxyadmin-pw"),
            (secret_keys::API_TOKEN, TOKEN),
        ] {
            std::fs::write(secrets.join(key), format!("{value}\n")).unwrap();
        }
        let ports = free_ports(5 * instances);
        let members = (0..instances)
            .map(|i| {
                let p = &ports[5 * i..5 * i + 5];
                PeerEndpoint {
                    name: format!("{CLUSTER}-{i}"),
                    host: "127.0.0.1".into(),
                    db_port: p[0],
                    api_port: p[1],
                    ports: [("galera", p[2]), ("ist", p[3]), ("sst", p[4])]
                        .into_iter()
                        .map(|(k, v)| (k.to_string(), v))
                        .collect(),
                }
            })
            .collect();
        let cluster_id = format!("uid-{}", dir.path().file_name().unwrap().to_string_lossy());
        Self {
            dir,
            cluster_id,
            members,
            run_as: run_as_user(),
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn config(&self, ordinal: usize) -> InstanceConfig {
        let name = self.members[ordinal].name.clone();
        let base = self.path().join(&name);
        InstanceConfig {
            kind: "PxcCluster".into(),
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
            bin_dir: None,
            engine: serde_json::json!({
                "flavor": "MariaDB",
                "version": "10.11",
                "clusterName": CLUSTER,
                "sstMethod": "mariabackup",
                "myCnf": {
                    "mysqld": {
                        "innodb_buffer_pool_size": "32M",
                        "innodb_log_file_size": "16M",
                        "max_connections": "50",
                        "performance_schema": "OFF"
                    }
                }
            }),
        }
    }

    fn run_dir(&self, ordinal: usize) -> PathBuf {
        self.path().join(&self.members[ordinal].name).join("run")
    }

    /// A root connection over TCP to a member's client port.
    async fn sql(&self, ordinal: usize) -> mysql_async::Conn {
        let m = &self.members[ordinal];
        let opts = mysql_async::OptsBuilder::default()
            .ip_or_hostname("127.0.0.1")
            .tcp_port(m.db_port)
            .user(Some("root"))
            .pass(Some(ROOT_PASSWORD))
            .prefer_socket(false);
        mysql_async::Conn::new(opts)
            .await
            .unwrap_or_else(|e| panic!("connect as root to {}: {e}", m.name))
    }

    async fn rows(&self, ordinal: usize) -> Vec<i64> {
        let mut c = self.sql(ordinal).await;
        // Read your writes across members: wait for the member to apply
        // what the group committed before reading.
        c.query_drop("SET SESSION wsrep_sync_wait = 1")
            .await
            .unwrap();
        let rows: Vec<i64> = c.query("SELECT id FROM app.t ORDER BY id").await.unwrap();
        let _ = c.disconnect().await;
        rows
    }

    async fn insert(&self, ordinal: usize, ids: std::ops::Range<i64>) {
        let mut c = self.sql(ordinal).await;
        for id in ids {
            c.exec_drop("INSERT INTO app.t (id) VALUES (?)", (id,))
                .await
                .unwrap_or_else(|e| panic!("insert {id} on member {ordinal}: {e}"));
        }
        let _ = c.disconnect().await;
    }

    fn server_pid(&self, ordinal: usize) -> i32 {
        let text = std::fs::read_to_string(self.run_dir(ordinal).join("mysqld.pid"))
            .expect("the server's pid file");
        text.trim().parse().expect("a pid")
    }

    fn kill9(&self, ordinal: usize) -> i32 {
        let pid = self.server_pid(ordinal);
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .expect("kill -9 the server");
        pid
    }

    fn server_log(&self, ordinal: usize) -> String {
        std::fs::read_to_string(self.run_dir(ordinal).join(manager::SERVER_LOG)).unwrap_or_default()
    }
}

/// A manager running in this process. Dropping it aborts the manager task,
/// which kills the server's process group (SIGKILL).
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
            Arc::new(PxcDriver::new()),
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

    async fn check_alive(&mut self) {
        if self.handle.as_ref().unwrap().is_finished() {
            let result = self.handle.take().unwrap().await;
            panic!("manager exited: {result:?}");
        }
    }

    async fn status(&self) -> MemberStatus {
        let resp = self
            .http
            .get(format!("{}/v1/status", self.api))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        resp.json().await.unwrap()
    }

    async fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        f: impl Fn(&MemberStatus) -> bool,
    ) -> MemberStatus {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_alive().await;
            if let Ok(resp) = self
                .http
                .get(format!("{}/v1/status", self.api))
                .bearer_auth(TOKEN)
                .send()
                .await
                && let Ok(status) = resp.json::<MemberStatus>().await
            {
                if f(&status) {
                    return status;
                }
                if Instant::now() > deadline {
                    panic!("timed out after {timeout:?} waiting for {what}: {status:?}");
                }
            } else if Instant::now() > deadline {
                panic!("timed out after {timeout:?} waiting for {what}: no status");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn wait_ready(&mut self) -> MemberStatus {
        let s = self
            .wait_for("Synced and Primary", READY_TIMEOUT, |s| s.ready)
            .await;
        let resp = self
            .http
            .get(format!("{}/readyz", self.api))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "readyz of a ready member");
        s
    }

    async fn bootstrap(&self) -> (reqwest::StatusCode, serde_json::Value) {
        let resp = self
            .http
            .post(format!("{}/v1/actions/bootstrap", self.api))
            .bearer_auth(TOKEN)
            .json(&serde_json::json!({}))
            .send()
            .await
            .unwrap();
        let code = resp.status();
        (code, resp.json().await.unwrap_or_default())
    }

    /// The SIGTERM path: ask the manager to stop and wait for it.
    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        let handle = self.handle.take().unwrap();
        tokio::time::timeout(Duration::from_secs(60), handle)
            .await
            .expect("manager stops within 60s")
            .unwrap()
            .unwrap();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            handle.abort();
        }
    }
}

fn galera(status: &MemberStatus) -> (String, i64, String) {
    match &status.position {
        Position::Galera {
            cluster_uuid,
            seqno,
            state,
        } => (cluster_uuid.clone(), *seqno, state.clone()),
        other => panic!("expected a Galera position, got {other:?} in {status:?}"),
    }
}

/// The member [`galera::elect`] (the operator's decision) chooses to
/// bootstrap from the managers' current reports.
async fn elected(m: &[Running]) -> String {
    let mut observed = Vec::new();
    for (i, r) in m.iter().enumerate() {
        observed.push(ObservedMember {
            name: format!("{CLUSTER}-{i}"),
            status: Some(r.status().await),
            error: None,
        });
    }
    match galera::elect(3, None, &observed) {
        Election::Promote { candidate, .. } => candidate,
        other => panic!("expected a bootstrap decision, got {other:?}"),
    }
}

/// Wait until process `pid` is gone (an aborted manager kills its server
/// when the runtime drops the task).
async fn wait_dead(pid: i32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok() {
        assert!(Instant::now() < deadline, "server pid {pid} still alive");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const WAITING: &str = "no member of the group is reachable";

/// (a) a new group forms, (d) a Primary member refuses `bootstrap`, (b) a
/// killed server rejoins by IST, (f) quorum loss and return, (c) a full
/// crash is recovered from the most advanced member without losing a
/// committed row. One test, because each
/// step starts from the previous one's cluster (and three Galera servers
/// are what two cores can run at once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_forms_rejoins_by_ist_and_recovers_from_a_full_crash() {
    let fx = Fixture::new(3);
    let t0 = Instant::now();

    // (a) All three wait for the operator's choice.
    let mut m: Vec<Running> = (0..3).map(|i| Running::start(fx.config(i))).collect();
    for r in m.iter_mut() {
        let s = r
            .wait_for(
                "waiting for a bootstrap order",
                Duration::from_secs(60),
                |s| s.message.as_deref().is_some_and(|m| m.contains(WAITING)),
            )
            .await;
        assert_eq!(s.process, ProcessState::Preparing);
        assert!(!s.ready);
        assert_eq!(
            galera(&s),
            (NIL_UUID.to_string(), -1, "Down".to_string()),
            "a new member has no Galera state"
        );
    }
    // What the operator decides from these reports: a new cluster from
    // the lowest ordinal.
    assert_eq!(elected(&m).await, "simple-pxc-0");
    let (code, body) = m[0].bootstrap().await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["bootstrap"], "pending");
    for r in m.iter_mut() {
        r.wait_ready().await;
    }
    let mut sizes = Vec::new();
    for r in &m {
        let s = r.status().await;
        assert_eq!(s.role, Role::Member);
        assert_eq!(galera(&s).2, "Synced");
        sizes.push(s.details["wsrepClusterSize"].clone());
    }
    assert_eq!(sizes, vec![serde_json::json!(3); 3]);
    let uuid = galera(&m[0].status().await).0;
    for (i, r) in m.iter().enumerate().skip(1) {
        let s = r.status().await;
        assert_eq!(
            s.details["lastStateTransfer"], "sst",
            "member {i} joined a new group by SST"
        );
        assert_eq!(galera(&s).0, uuid);
    }
    {
        let mut c = fx.sql(1).await;
        c.query_drop("CREATE DATABASE app").await.unwrap();
        c.query_drop("CREATE TABLE app.t (id BIGINT PRIMARY KEY)")
            .await
            .unwrap();
        let _ = c.disconnect().await;
    }
    fx.insert(1, 0..10).await;
    for i in 0..3 {
        assert_eq!(fx.rows(i).await, (0..10).collect::<Vec<_>>(), "member {i}");
    }
    eprintln!("(a) group formed in {:?}", t0.elapsed());

    // (d) A member in a Primary component refuses to bootstrap.
    let (code, body) = m[1].bootstrap().await;
    assert_eq!(code, 409, "{body}");
    assert!(
        body.to_string().contains("already in a Primary component"),
        "{body}"
    );
    assert!(!fx.run_dir(1).join("bootstrap.order").exists());

    // (b) kill -9 member 2's server: the manager restarts it and it rejoins
    // by IST, seeing rows written meanwhile.
    let t1 = Instant::now();
    let log_before = fx.server_log(2).len();
    let old_pid = fx.kill9(2);
    // A commit on member 0 waits until the group has evicted the dead
    // member. Not a timed assertion (benchmarks measure speed): printed for
    // the report.
    let killed = Instant::now();
    m[2].wait_for("the kill noticed", Duration::from_secs(20), |s| !s.ready)
        .await;
    fx.insert(0, 10..11).await;
    eprintln!(
        "(b) first commit on member 0 {:?} after kill -9 of member 2",
        killed.elapsed()
    );
    fx.insert(0, 11..20).await;
    m[2].wait_ready().await;
    assert_ne!(fx.server_pid(2), old_pid, "a new server process");
    let log = fx.server_log(2)[log_before..].to_string();
    // The SST script ran only to hand over to IST (MariaDB always starts
    // it on a joiner); no snapshot was copied.
    assert!(
        log.contains("IST received") && log.contains("IST completed on joiner"),
        "member 2 rejoined by IST:\n{log}"
    );
    assert!(
        !log.contains("SST completed on joiner"),
        "member 2 must not need an SST:\n{log}"
    );
    assert_eq!(m[2].status().await.details["lastStateTransfer"], "ist");
    fx.insert(2, 20..25).await;
    for i in 0..3 {
        assert_eq!(fx.rows(i).await, (0..25).collect::<Vec<_>>(), "member {i}");
    }
    eprintln!("(b) kill -9 and IST rejoin in {:?}", t1.elapsed());

    // (f) Quorum loss: members 1 and 2 die (managers aborted, servers
    // SIGKILLed). The survivor leaves the Primary component and refuses
    // writes rather than diverging; when the two come back, the group
    // restores its Primary component by itself (pc.recovery) and nothing
    // committed is lost.
    let t3 = Instant::now();
    let pids = [fx.server_pid(1), fx.server_pid(2)];
    drop(m.remove(2));
    drop(m.remove(1));
    for pid in pids {
        wait_dead(pid).await;
    }
    let s = m[0]
        .wait_for("the survivor non-Primary", Duration::from_secs(20), |s| {
            s.details["wsrepClusterStatus"] == "non-Primary"
        })
        .await;
    assert!(!s.ready);
    assert_eq!(s.role, Role::Unknown);
    {
        let mut c = fx.sql(0).await;
        let refused = c.query_drop("INSERT INTO app.t (id) VALUES (1000)").await;
        assert!(refused.is_err(), "a non-Primary member must refuse writes");
        let _ = c.disconnect().await;
    }
    m.push(Running::start(fx.config(1)));
    m.push(Running::start(fx.config(2)));
    for r in m.iter_mut() {
        r.wait_ready().await;
    }
    for i in 0..3 {
        assert_eq!(fx.rows(i).await, (0..25).collect::<Vec<_>>(), "member {i}");
    }
    eprintln!("(f) quorum loss and return in {:?}", t3.elapsed());

    // (c) Full crash, staggered so that member 2 is the most advanced:
    // each manager is aborted, which kills its server with SIGKILL.
    let t2 = Instant::now();
    let pids: Vec<i32> = (0..3).map(|i| fx.server_pid(i)).collect();
    drop(m.remove(0));
    wait_dead(pids[0]).await;
    fx.insert(1, 25..30).await;
    drop(m.remove(0));
    wait_dead(pids[1]).await;
    // Member 2 alone has lost quorum (non-Primary) and refuses writes.
    drop(m.remove(0));
    wait_dead(pids[2]).await;

    let mut m: Vec<Running> = (0..3).map(|i| Running::start(fx.config(i))).collect();
    let mut positions = Vec::new();
    for r in m.iter_mut() {
        let s = r
            .wait_for("a recovered position", Duration::from_secs(60), |s| {
                s.message.as_deref().is_some_and(|m| m.contains(WAITING))
                    && matches!(&s.position, Position::Galera { state, .. } if state == "Recovered")
            })
            .await;
        positions.push(galera(&s));
    }
    eprintln!("(c) recovered positions: {positions:?}");
    for (u, seqno, _) in &positions {
        assert_eq!(u, &uuid, "the cluster UUID survives the crash");
        assert!(*seqno > 0, "a seqno, not reset: {positions:?}");
    }
    // Members 1 and 2 committed rows 25..30 after member 0 died; the
    // operator bootstraps from the most advanced (ties: lowest ordinal).
    assert!(positions[2].1 >= positions[1].1 && positions[1].1 > positions[0].1);
    let best = if positions[2].1 > positions[1].1 {
        2
    } else {
        1
    };
    assert_eq!(elected(&m).await, fx.members[best].name, "{positions:?}");
    let (code, body) = m[best].bootstrap().await;
    assert_eq!(code, 200, "{body}");
    for r in m.iter_mut() {
        r.wait_ready().await;
    }
    let after = galera(&m[best].status().await);
    assert_eq!(after.0, uuid, "same cluster history after the recovery");
    assert!(after.1 >= positions[2].1);
    for i in 0..3 {
        assert_eq!(fx.rows(i).await, (0..30).collect::<Vec<_>>(), "member {i}");
    }
    fx.insert(0, 30..31).await;
    assert_eq!(fx.rows(2).await, (0..31).collect::<Vec<_>>());
    // The bootstrapped member kept its write-set cache (gcache.recover),
    // so the others caught up by IST, not SST.
    for (i, r) in m.iter().enumerate().filter(|(i, _)| *i != best) {
        let s = r.status().await;
        assert_eq!(
            s.details["lastStateTransfer"], "ist",
            "member {i} rejoined after the full crash by IST"
        );
    }
    eprintln!("(c) full-crash recovery in {:?}", t2.elapsed());

    // A clean stop of every manager stops every server cleanly.
    for r in m {
        r.stop().await;
    }
    let grastate = std::fs::read_to_string(
        fx.path()
            .join(&fx.members[0].name)
            .join("data/mysql/grastate.dat"),
    )
    .unwrap();
    assert!(!grastate.contains("seqno:   -1"), "{grastate}");
    eprintln!("total {:?}", t0.elapsed());
}

/// (e) Missing binaries: the manager refuses to start and says what to
/// install.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_binaries_are_a_clear_error() {
    let fx = Fixture::new(1);
    let empty = fx.path().join("empty-bin");
    std::fs::create_dir(&empty).unwrap();
    let mut config = fx.config(0);
    config.bin_dir = Some(empty.clone());
    let err = tokio::time::timeout(
        Duration::from_secs(30),
        manager::run_until(config, Arc::new(PxcDriver::new()), std::future::pending()),
    )
    .await
    .expect("the manager fails fast")
    .expect_err("the manager must refuse to start without binaries");
    let text = format!("{err:#}");
    assert!(text.contains("mariadbd not found"), "{text}");
    assert!(text.contains(&empty.display().to_string()), "{text}");
    assert!(
        text.contains("apt-get install mariadb-server galera-4 mariadb-backup"),
        "{text}"
    );
}

/// `SHOW GLOBAL VARIABLES LIKE 'name'` on a member (`name`: a constant
/// of the test; SHOW takes no placeholders).
async fn variable(fx: &Fixture, ordinal: usize, name: &str) -> String {
    let mut c = fx.sql(ordinal).await;
    let row: Option<(String, String)> = c
        .query_first(format!("SHOW GLOBAL VARIABLES LIKE '{name}'"))
        .await
        .unwrap();
    let _ = c.disconnect().await;
    row.unwrap_or_else(|| panic!("no variable {name}")).1
}

/// The Galera `reconfigure` path against a real MariaDB: writable
/// variables are set live (`SET GLOBAL`, same server process), a
/// read-only one is written to my.cnf and reported `pendingRestart` with
/// the hash of the new settings until the manager's `restart` action
/// starts the server with it. One member (a group of one), so that the
/// test stays focused; its restart waits for a bootstrap order like any
/// member that finds no peer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconfigure_sets_dynamic_variables_and_leaves_the_rest_for_a_restart() {
    use operator_core::instance::protocol::settings_hash;
    let fx = Fixture::new(1);
    let config = fx.config(0);
    let mut m = Running::start(config.clone());
    m.wait_for("waiting for a bootstrap order", READY_TIMEOUT, |s| {
        s.message.as_deref().is_some_and(|m| m.contains(WAITING))
    })
    .await;
    let (code, body) = m.bootstrap().await;
    assert_eq!(code, 200, "{body}");
    let status = m.wait_ready().await;
    assert_eq!(
        status.config_hash.as_deref(),
        Some(settings_hash(&config.engine).as_str())
    );
    assert!(!status.pending_restart);
    let pid = fx.server_pid(0);

    let mut engine = config.engine.clone();
    engine["myCnf"]["mysqld"]["max_connections"] = "120".into();
    engine["myCnf"]["mysqld"]["wait_timeout"] = "600".into();
    engine["myCnf"]["mysqld"]["back_log"] = "90".into();
    let resp = m
        .http
        .post(format!("{}/v1/actions/reconfigure", m.api))
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({ "engine": engine }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let reply: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(
        reply["set"],
        serde_json::json!(["max_connections", "wait_timeout"]),
        "{reply}"
    );
    assert_eq!(reply["restart"], true, "{reply}");
    assert!(
        reply["restartFor"].to_string().contains("back_log"),
        "{reply}"
    );
    assert_eq!(variable(&fx, 0, "max_connections").await, "120");
    assert_eq!(variable(&fx, 0, "wait_timeout").await, "600");
    assert_ne!(variable(&fx, 0, "back_log").await, "90");
    assert_eq!(fx.server_pid(0), pid, "set live, no restart");
    let cnf = std::fs::read_to_string(fx.run_dir(0).join("my.cnf")).unwrap();
    assert!(cnf.contains("back_log=90"), "{cnf}");
    let status = m.status().await;
    assert!(status.pending_restart, "{status:?}");
    assert_eq!(
        status.config_hash.as_deref(),
        Some(settings_hash(&engine).as_str())
    );

    // The manager's restart starts the server with all of it (a group of
    // one waits for the bootstrap order again).
    let restart = {
        let (http, api) = (m.http.clone(), m.api.clone());
        tokio::spawn(async move {
            http.post(format!("{api}/v1/actions/restart"))
                .bearer_auth(TOKEN)
                .timeout(Duration::from_secs(120))
                .send()
                .await
                .map(|r| r.status())
        })
    };
    m.wait_for("waiting for a bootstrap order", READY_TIMEOUT, |s| {
        s.message.as_deref().is_some_and(|m| m.contains(WAITING))
    })
    .await;
    let (code, body) = m.bootstrap().await;
    assert_eq!(code, 200, "{body}");
    let status = m.wait_ready().await;
    assert_eq!(restart.await.unwrap().unwrap(), 200);
    assert!(!status.pending_restart, "{status:?}");
    assert_eq!(
        status.config_hash.as_deref(),
        Some(settings_hash(&engine).as_str())
    );
    assert_ne!(fx.server_pid(0), pid);
    assert_eq!(variable(&fx, 0, "back_log").await, "90");
    assert_eq!(variable(&fx, 0, "max_connections").await, "120");
    m.stop().await;
}
