//! End to end: `stratum local up|status|down` with real PostgreSQL 15
//! processes (Debian's, at /usr/lib/postgresql/15/bin). Runs the built
//! binary, owns a temporary state directory, and never skips: a missing
//! PostgreSQL fails with what to install.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;

#[path = "support/local.rs"]
mod local;
use local::{Local, Runtime};

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
const HEALTHY_TIMEOUT: Duration = Duration::from_secs(60);

fn require_postgres() {
    let postgres = Path::new(PG_BIN).join("postgres");
    assert!(
        postgres.exists(),
        "PostgreSQL 15 is required at {PG_BIN} (missing {}): install it with `apt-get install postgresql-15`",
        postgres.display()
    );
}

fn fixture(name: &str, kind: &str, instances: &str, size: &str) -> String {
    format!(
        "apiVersion: stratum.dev/v1alpha1
kind: {kind}
metadata:
  name: {name}
spec:
  instances: {instances}
  version: 15
  storage:
    size: {size}
"
    )
}

fn simple_pg(size: &str) -> String {
    fixture("simple-pg", "PostgresCluster", "1", size)
}

const RUNTIME: Runtime = Runtime {
    tick_ms: "200",
    lease_ms: None,
    no_backtrace: false,
    timeout: HEALTHY_TIMEOUT,
    poll: Duration::from_millis(250),
    instance_logs,
    state_logs: &[],
};

/// Each instance's whole manager log.
fn instance_logs(dir: &Path) -> Vec<(PathBuf, usize)> {
    vec![(dir.join("manager.log"), usize::MAX)]
}

/// Every file and directory under `dir` with its mode and bytes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, (u32, Vec<u8>)> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, (u32, Vec<u8>)>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            let path = entry.path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let rel = path.strip_prefix(root).unwrap().to_path_buf();
            let mode = meta.permissions().mode();
            if meta.is_dir() {
                out.insert(rel, (mode, Vec::new()));
                walk(root, &path, out);
            } else if meta.is_file() {
                out.insert(rel, (mode, std::fs::read(&path).unwrap()));
            } else {
                out.insert(rel, (mode, Vec::new()));
            }
        }
    }
    let mut out = BTreeMap::new();
    let meta = std::fs::metadata(dir).unwrap();
    out.insert(PathBuf::new(), (meta.permissions().mode(), Vec::new()));
    walk(dir, dir, &mut out);
    out
}

impl Local {
    /// A workspace with `simple-pg.yaml` (1Gi), started with PostgreSQL 15.
    fn new() -> Self {
        Local::create(
            RUNTIME,
            "simple-pg.yaml",
            &simple_pg("1Gi"),
            &["--bin-dir", PG_BIN],
        )
    }

    /// Run `stratum local up` expecting it to fail fast.
    fn up_fails(&self, file: &Path) -> String {
        let mut child = self
            .stratum()
            .args(["local", "up", "-f"])
            .arg(file)
            .arg("--state-dir")
            .arg(&self.state)
            .args(["--bin-dir", PG_BIN])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                if self.state.exists() {
                    let _ = self.run(&["down"]);
                }
                panic!(
                    "`local up -f {}` was expected to fail but is running",
                    file.display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !out.status.success(),
            "`local up -f {}` succeeded; stderr: {stderr}",
            file.display()
        );
        stderr
    }

    fn wait_healthy(&mut self) -> Value {
        self.wait_for("Healthy", |s| s["phase"] == "Healthy")
    }

    /// `stratum local down [--purge]`, timed, then reap the background
    /// `up`, which must have exited cleanly.
    fn down_and_reap(&mut self, purge: bool) {
        let mut args = vec!["down"];
        if purge {
            args.push("--purge");
        }
        let started = Instant::now();
        let out = self.run(&args);
        assert!(
            out.status.success(),
            "down failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        eprintln!("down took {:.1}s", started.elapsed().as_secs_f64());
        if let Some(mut child) = self.up.take() {
            let status = child.wait().unwrap();
            assert!(
                status.success(),
                "`local up` exited with {status}\n{}",
                self.logs()
            );
        }
    }

    fn password(&self) -> String {
        self.secret("app-password")
    }
}

async fn connect(endpoint: &str, password: &str) -> tokio_postgres::Client {
    let (host, port) = endpoint.rsplit_once(':').unwrap();
    let conn = format!("host={host} port={port} user=app password={password} dbname=app");
    let (client, connection) = tokio_postgres::connect(&conn, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect to {endpoint} as app: {e}"));
    tokio::spawn(connection);
    client
}

fn assert_rejected(stderr: &str, file: &Path, needles: &[&str]) {
    let file = file.display().to_string();
    assert!(
        stderr.contains(&file),
        "error does not name {file}: {stderr}"
    );
    for n in needles {
        assert!(stderr.contains(n), "error does not mention {n:?}: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn local_postgres_up_write_down_up_read_purge() {
    require_postgres();
    let t0 = Instant::now();
    let mut local = Local::new();
    let file = local.file.clone();

    local.start();
    let status = local.wait_healthy();
    assert_eq!(status["primary"], "simple-pg-0", "{status}");
    assert_eq!(status["instances"][0]["name"], "simple-pg-0");
    assert_eq!(status["instances"][0]["role"], "primary");
    assert_eq!(status["instances"][0]["ready"], true);
    let rw = status["endpoints"]["rw"].as_str().unwrap().to_string();
    let ro = status["endpoints"]["ro"].as_str().unwrap().to_string();
    assert!(rw.starts_with("127.0.0.1:"), "{rw}");

    let text = local.run(&["status"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("Healthy") && text.contains("simple-pg-0"),
        "{text}"
    );

    // A second `up` on the same state directory hands the (unchanged)
    // file to the running one instead of starting another cluster.
    let out = local.up_once(&file, &["--bin-dir", PG_BIN]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("applied to the running cluster"),
        "second up: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let password = local.password();
    assert_eq!(password.len(), 32);
    let client = connect(&rw, &password).await;
    client
        .batch_execute(
            "CREATE TABLE simple_rows (id int PRIMARY KEY, note text);
             INSERT INTO simple_rows SELECT g, 'row ' || g FROM generate_series(1, 100) g;",
        )
        .await
        .unwrap();
    drop(client);
    // A single instance serves reads on `ro` too.
    let reader = connect(&ro, &password).await;
    let n: i64 = reader
        .query_one("SELECT count(*) FROM simple_rows", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 100);
    drop(reader);

    local.down_and_reap(false);
    let stopped = local.status().expect("status of a stopped cluster");
    assert_eq!(stopped["phase"], "Stopped", "{stopped}");
    assert!(!local.state.join("up.pid").exists());
    // Down again is a no-op.
    local.down_and_reap(false);

    // Bad input leaves the stopped state directory exactly as it is.
    let before = snapshot(&local.state);
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "invalid-yaml.yaml",
            "apiVersion: stratum.dev/v1alpha1\nkind: PostgresCluster\nmetadata:\n  name: [simple-pg\nspec: {}\n".into(),
            vec!["line", "column"],
        ),
        (
            "unknown-kind.yaml",
            fixture("simple-pg", "PostgresClusters", "1", "1Gi"),
            vec!["kind", "PostgresCluster"],
        ),
        (
            "zero-instances.yaml",
            fixture("simple-pg", "PostgresCluster", "0", "1Gi"),
            vec!["spec.instances"],
        ),
        (
            "shrink.yaml",
            simple_pg("512Mi"),
            vec!["spec.storage", "cannot be decreased"],
        ),
        (
            "wrong-type.yaml",
            fixture("simple-pg", "PostgresCluster", "\"three\"", "1Gi"),
            vec!["spec.instances"],
        ),
        (
            "other-cluster.yaml",
            fixture("other-pg", "PostgresCluster", "1", "1Gi"),
            vec!["simple-pg", "other-pg"],
        ),
    ];
    for (name, text, needles) in &cases {
        let f = local.write_file(name, text);
        let stderr = local.up_fails(&f);
        if *name == "other-cluster.yaml" {
            for n in needles {
                assert!(stderr.contains(n), "{name}: {stderr}");
            }
        } else {
            assert_rejected(&stderr, &f, needles);
        }
        assert!(
            snapshot(&local.state) == before,
            "{name} changed the state directory"
        );
        eprintln!("{name}: rejected: {}", stderr.trim());
    }

    // Data survives a restart.
    local.start();
    let status = local.wait_healthy();
    assert_eq!(status["endpoints"]["rw"], rw.as_str(), "ports are kept");
    let client = connect(&rw, &local.password()).await;
    let rows = client
        .query("SELECT id, note FROM simple_rows ORDER BY id", &[])
        .await
        .unwrap();
    assert_eq!(rows.len(), 100);
    assert_eq!(rows[41].get::<_, String>(1), "row 42");
    drop(client);

    local.down_and_reap(true);
    assert!(!local.state.exists(), "down --purge removes the state dir");
    eprintln!("total {:.1}s", t0.elapsed().as_secs_f64());
}

#[test]
fn local_up_rejects_bad_input_before_creating_state() {
    let local = Local::new();
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "invalid-yaml.yaml",
            "kind: PostgresCluster\nspec: [\n".into(),
            vec!["line", "column"],
        ),
        (
            "unknown-kind.yaml",
            fixture("simple-pg", "MySqlCluster", "1", "1Gi"),
            vec!["kind: unknown kind \"MySqlCluster\"", "PostgresCluster"],
        ),
        (
            "zero-instances.yaml",
            fixture("simple-pg", "PostgresCluster", "0", "1Gi"),
            vec!["spec.instances"],
        ),
        (
            "wrong-type.yaml",
            fixture("simple-pg", "PostgresCluster", "1", "1Gi")
                .replace("version: 15", "version: fifteen"),
            vec!["spec.version"],
        ),
    ];
    for (name, text, needles) in &cases {
        let f = local.write_file(name, text);
        let stderr = local.up_fails(&f);
        assert_rejected(&stderr, &f, needles);
        assert!(!local.state.exists(), "{name} created the state directory");
    }
}

#[test]
fn local_status_and_down_without_cluster_fail_clearly() {
    let local = Local::new();
    let out = local.run(&["status"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no Stratum cluster in"), "{stderr}");
    let out = local.run(&["down", "--purge"]);
    assert!(!out.status.success());
}

/// The shipped example that `scripts/run-local.sh` runs: three instances of
/// PostgreSQL 17 (found by version in the cache that `scripts/setup.sh`
/// fills), quorum-synchronous replication. Rows written through `rw` are on
/// both replicas and readable through `ro`; the primary reports both
/// replicas as quorum standbys.
#[tokio::test(flavor = "multi_thread")]
async fn shipped_ha_example_replicates_synchronously() {
    let cache = std::env::var("STRATUM_CACHE").unwrap_or_else(|_| "/var/cache/stratum".into());
    let pg17 = Path::new(&cache).join("postgresql/17/bin/postgres");
    assert!(
        pg17.exists(),
        "PostgreSQL 17 is required at {} for deploy/examples/postgres-ha.yaml: run scripts/setup.sh",
        pg17.display()
    );
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/examples/postgres-ha.yaml");
    let mut local = Local::new();
    local.start_with(&example, &[]);
    let status = local.wait_healthy();
    let instances = status["instances"].as_array().unwrap();
    assert_eq!(instances.len(), 3, "{status}");
    let roles: Vec<&str> = instances
        .iter()
        .map(|i| i["role"].as_str().unwrap())
        .collect();
    assert_eq!(
        roles.iter().filter(|r| **r == "primary").count(),
        1,
        "{status}"
    );
    assert_eq!(
        roles.iter().filter(|r| **r == "replica").count(),
        2,
        "{status}"
    );

    let password = local.password();
    let rw = connect(status["endpoints"]["rw"].as_str().unwrap(), &password).await;
    let version: String = rw
        .query_one("SHOW server_version", &[])
        .await
        .unwrap()
        .get(0);
    assert!(version.starts_with("17."), "server_version {version}");
    rw.batch_execute("CREATE TABLE ha_rows (n int PRIMARY KEY); INSERT INTO ha_rows SELECT generate_series(1, 50)")
        .await
        .unwrap();

    let superuser =
        std::fs::read_to_string(local.state.join("secrets/superuser-password")).unwrap();
    let (host, port) = status["endpoints"]["rw"]
        .as_str()
        .unwrap()
        .rsplit_once(':')
        .unwrap();
    let (admin, conn) = tokio_postgres::connect(
        &format!("host={host} port={port} user=postgres password={superuser} dbname=app"),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let standbys = admin
        .query(
            "SELECT application_name, sync_state FROM pg_stat_replication ORDER BY 1",
            &[],
        )
        .await
        .unwrap();
    let standbys: Vec<(String, String)> = standbys.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(
        standbys,
        [
            ("pg-ha-1".to_string(), "quorum".to_string()),
            ("pg-ha-2".to_string(), "quorum".to_string())
        ],
        "synchronous standbys as the primary sees them"
    );

    // Each replica has the rows (synchronous commit: at least one had them
    // at commit; both catch up right after).
    for instance in instances.iter().filter(|i| i["role"] == "replica") {
        let replica = connect(instance["address"].as_str().unwrap(), &password).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let n: i64 = match replica.query_one("SELECT count(*) FROM ha_rows", &[]).await {
                Ok(row) => row.get(0),
                Err(_) => 0,
            };
            if n == 50 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} has {n} of 50 rows",
                instance["name"]
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let ro = connect(status["endpoints"]["ro"].as_str().unwrap(), &password).await;
    let in_recovery: bool = ro
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .unwrap()
        .get(0);
    assert!(in_recovery, "ro must route to a replica");

    // walStorage: each instance's pg_wal is on its own volume directory
    // inside the state dir, never on a shared host path.
    for name in ["pg-ha-0", "pg-ha-1", "pg-ha-2"] {
        let instance = local.state.join("instances").join(name);
        let link = std::fs::read_link(instance.join("data/pgdata/pg_wal")).unwrap_or_else(|e| {
            panic!("{name}: pgdata/pg_wal is not a symlink to the WAL volume: {e}")
        });
        assert_eq!(link, instance.join("volumes/wal/pg_wal"), "{name}");
    }
    local.down_and_reap(true);
}
