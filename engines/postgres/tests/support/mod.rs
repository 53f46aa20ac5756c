//! The fixture shared by this crate's engine tests (instance.rs,
//! failsafe.rs): members' configs on loopback ports, real PostgreSQL 15
//! binaries run as an unprivileged user, instance managers started in
//! process. Each test file is its own crate, so not every item is used by
//! every one of them.
#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use operator_core::instance::config::{InstanceConfig, PeerEndpoint};
use operator_core::instance::manager;
use operator_core::instance::protocol::MemberStatus;
use stratum_postgres::instance::PostgresDriver;
use stratum_postgres::settings::secret_keys;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const PG15_BIN: &str = "/usr/lib/postgresql/15/bin";
pub const CLUSTER: &str = "simple-pg";
pub const APP_PASSWORD: &str = "app-pw-'quoted'";
pub const TOKEN: &str = "test-token-0123456789";
pub const READY_TIMEOUT: Duration = Duration::from_secs(90);

pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// The PostgreSQL 15 binary directory; fails the test when missing.
pub fn pg15_bin_dir() -> PathBuf {
    let dir = PathBuf::from(PG15_BIN);
    assert!(
        dir.join("postgres").is_file() && dir.join("initdb").is_file(),
        "PostgreSQL 15 binaries not found in {PG15_BIN}: install postgresql-15 (Debian: apt-get install postgresql-15)"
    );
    dir
}

/// The unprivileged user to run PostgreSQL as when the tests run as root:
/// the distribution's `postgres` user, else `stratum` (created).
pub fn run_as_user() -> Option<String> {
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

pub fn free_ports(n: usize) -> Vec<u16> {
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
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub cluster_id: String,
    pub members: Vec<PeerEndpoint>,
    pub run_as: Option<String>,
    pub bin_dir: PathBuf,
}

impl Fixture {
    pub fn new(instances: u32) -> Self {
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

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn config(&self, ordinal: usize) -> InstanceConfig {
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

    pub async fn app_client(&self, ordinal: usize) -> tokio_postgres::Client {
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
pub struct Running {
    pub handle: Option<JoinHandle<anyhow::Result<()>>>,
    pub stop: Option<oneshot::Sender<()>>,
    pub api: String,
    pub http: reqwest::Client,
}

impl Running {
    pub fn start(config: InstanceConfig) -> Self {
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

    pub async fn wait_ready(&mut self) {
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

    pub fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.http.get(format!("{}{path}", self.api))
    }

    pub fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.http.post(format!("{}{path}", self.api))
    }

    pub async fn status(&self) -> MemberStatus {
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
    pub async fn stop(mut self) -> anyhow::Result<()> {
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
