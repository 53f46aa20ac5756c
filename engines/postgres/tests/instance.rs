//! Engine tests of the instance manager with the PostgreSQL driver against
//! real PostgreSQL 15 binaries (`/usr/lib/postgresql/15/bin`): bootstrap,
//! the HTTP API, restarts, data directory identity, cloning a replica,
//! `reconfigure` (reload in place, or a pending restart).
//! Each test owns a temporary directory and loopback ports; the database
//! runs as an unprivileged user when the tests run as root. Missing
//! binaries fail the tests, they never skip.

use std::sync::Arc;
use std::time::{Duration, Instant};

use operator_core::engine::InstanceError;
use operator_core::instance::config::InstanceConfig;
use operator_core::instance::manager;
use operator_core::instance::protocol::{MemberStatus, Position, ProcessState, Role};
use stratum_postgres::instance::PostgresDriver;

mod support;
use support::*;

/// Run a manager that must fail before serving; return its error.
async fn expect_failure(config: InstanceConfig) -> anyhow::Error {
    let run = manager::run_until(
        config,
        Arc::new(PostgresDriver::new()),
        std::future::pending(),
    );
    tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("the manager fails fast")
        .expect_err("the manager must refuse this configuration")
}

fn wal(status: &MemberStatus) -> (u32, Option<u64>, Option<u64>) {
    match &status.position {
        Position::Wal {
            timeline,
            received_lsn,
            replayed_lsn,
        } => (*timeline, *received_lsn, *replayed_lsn),
        other => panic!("expected a WAL position, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_bootstraps_serves_the_api_and_keeps_rows_across_restarts() {
    let fx = Fixture::new(1);
    let config = fx.config(0);
    let pgdata = config.data_dir.join("pgdata");

    let mut m = Running::start(config.clone());
    m.wait_ready().await;

    assert_eq!(m.get("/healthz").send().await.unwrap().status(), 200);
    // Authentication of /v1/*.
    let resp = m.get("/v1/status").send().await.unwrap();
    assert_eq!(resp.status(), 401);
    let resp = m
        .get("/v1/status")
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    let resp = m
        .get("/v1/status")
        .bearer_auth(TOKEN)
        .header("x-stratum-cluster-id", "uid-of-another-cluster")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 409);
    let resp = m
        .post("/v1/actions/checkpoint")
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);

    let status = m.status().await;
    assert_eq!(status.name, "simple-pg-0");
    assert_eq!(status.cluster_id, fx.cluster_id);
    assert_eq!(status.role, Role::Primary);
    assert!(status.ready);
    assert_eq!(status.process, ProcessState::Running);
    assert_eq!(
        status.address,
        format!("127.0.0.1:{}", fx.members[0].db_port)
    );
    assert!(
        status
            .server_version
            .as_deref()
            .unwrap_or("")
            .starts_with("15"),
        "{status:?}"
    );
    let (timeline, received, replayed) = wal(&status);
    assert_eq!(timeline, 1);
    assert!(received.is_some_and(|l| l > 0), "{status:?}");
    assert_eq!(received, replayed);
    assert_eq!(status.details["connectedReplicas"], 0);

    // Actions: the driver's checkpoint, unknown ones are 404.
    let resp = m
        .post("/v1/actions/checkpoint")
        .bearer_auth(TOKEN)
        .header("x-stratum-cluster-id", &fx.cluster_id)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let resp = m
        .post("/v1/actions/no-such-action")
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);

    let metrics = m
        .get("/metrics")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "stratum_instance_up 1",
        "stratum_instance_ready 1",
        "stratum_instance_role{role=\"primary\"} 1",
        "stratum_instance_timeline 1",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "missing {line} in\n{metrics}"
        );
    }

    // Configuration lives outside PGDATA; PGDATA's own file is untouched.
    let conf = std::fs::read_to_string(config.run_dir.join("postgresql.conf")).unwrap();
    assert!(
        conf.contains(&format!("port = '{}'", fx.members[0].db_port)),
        "{conf}"
    );
    assert!(
        std::fs::read_to_string(pgdata.join("postgresql.conf"))
            .unwrap()
            .contains("initdb")
    );

    let client = fx.app_client(0).await;
    client
        .batch_execute("CREATE TABLE notes (id int PRIMARY KEY, body text); INSERT INTO notes VALUES (1, 'before restart')")
        .await
        .unwrap();
    drop(client);

    m.stop().await.expect("clean stop");
    assert!(
        !pgdata.join("postmaster.pid").exists(),
        "postgres was not shut down cleanly"
    );

    // Same directory again: no initdb, the row is there.
    let mut m = Running::start(config.clone());
    m.wait_ready().await;
    let client = fx.app_client(0).await;
    let row = client
        .query_one("SELECT body FROM notes WHERE id = 1", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "before restart");
    drop(client);

    // The built-in restart action.
    let resp = m
        .post("/v1/actions/restart")
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    m.wait_ready().await;
    let client = fx.app_client(0).await;
    client
        .batch_execute("INSERT INTO notes VALUES (2, 'after restart')")
        .await
        .unwrap();
    drop(client);
    m.stop().await.expect("clean stop");

    // Another cluster's instance on this data directory is refused.
    let other = InstanceConfig {
        cluster: "other-pg".into(),
        cluster_id: "uid-other".into(),
        ..config
    };
    let err = expect_failure(other).await;
    let msg = format!("{err:#}");
    assert!(
        matches!(
            err.downcast_ref::<InstanceError>(),
            Some(InstanceError::DataDirectory { .. })
        ),
        "{msg}"
    );
    assert!(
        msg.contains(&format!(
            "belongs to cluster simple-pg (id {})",
            fx.cluster_id
        )) && msg.contains("this instance is cluster other-pg (id uid-other)"),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_waits_for_the_primary_then_clones_and_streams() {
    let fx = Fixture::new(2);
    let replica_config = fx.config(1);

    // The replica starts first: it waits for simple-pg-0 and says so.
    let mut replica = Running::start(replica_config.clone());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(resp) = replica.get("/v1/status").bearer_auth(TOKEN).send().await
            && resp.status() == 200
        {
            let status: MemberStatus = resp.json().await.unwrap();
            if status
                .message
                .as_deref()
                .is_some_and(|m| m.contains("waiting for simple-pg-0 to accept connections"))
            {
                assert_eq!(status.process, ProcessState::Preparing);
                assert!(!status.ready);
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the replica never reported waiting for simple-pg-0"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(replica.get("/readyz").send().await.unwrap().status(), 503);

    let mut primary = Running::start(fx.config(0));
    primary.wait_ready().await;
    let writer = fx.app_client(0).await;
    writer
        .batch_execute(
            "CREATE TABLE notes (id int PRIMARY KEY, body text); INSERT INTO notes VALUES (1, 'first')",
        )
        .await
        .unwrap();

    replica.wait_ready().await;
    assert!(
        replica_config
            .data_dir
            .join("pgdata/standby.signal")
            .exists()
    );
    let reader = fx.app_client(1).await;
    let wait_for_row = |id: i32| {
        let reader = &reader;
        async move {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                // Before the table itself has arrived the query fails.
                if let Ok(Some(row)) = reader
                    .query_opt("SELECT body FROM notes WHERE id = $1", &[&id])
                    .await
                {
                    return row.get::<_, String>(0);
                }
                assert!(
                    Instant::now() < deadline,
                    "row {id} not on the replica within 20s"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert_eq!(wait_for_row(1).await, "first");
    // Streaming: a row written now shows up on the replica.
    writer
        .batch_execute("INSERT INTO notes VALUES (2, 'streamed')")
        .await
        .unwrap();
    assert_eq!(wait_for_row(2).await, "streamed");
    // A replica takes no writes.
    let err = reader
        .batch_execute("INSERT INTO notes VALUES (3, 'nope')")
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::READ_ONLY_SQL_TRANSACTION),
        "{err:?}"
    );

    let status = replica.status().await;
    assert_eq!(status.role, Role::Replica, "{status:?}");
    assert!(status.ready);
    assert_eq!(status.process, ProcessState::Running);
    let (timeline, received, replayed) = wal(&status);
    assert_eq!(timeline, 1);
    assert!(received.is_some_and(|l| l > 0), "{status:?}");
    assert!(replayed.is_some(), "{status:?}");
    assert_eq!(status.details["walReceiver"]["running"], true, "{status:?}");
    assert_eq!(
        status.details["walReceiver"]["status"], "streaming",
        "{status:?}"
    );

    let primary_status = primary.status().await;
    assert_eq!(primary_status.role, Role::Primary);
    assert_eq!(
        primary_status.details["connectedReplicas"], 1,
        "{primary_status:?}"
    );
    assert_eq!(primary_status.details["replicas"][0]["name"], "simple-pg-1");
    assert_eq!(primary_status.details["replicas"][0]["syncState"], "async");

    drop((reader, writer));
    replica.stop().await.expect("replica stops cleanly");
    primary.stop().await.expect("primary stops cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_done_initdb_is_wiped_and_redone() {
    let fx = Fixture::new(1);
    let config = fx.config(0);
    // What a crash in the middle of initdb leaves: our identity file, the
    // incompleteness marker, and a PGDATA with PG_VERSION but no roles.
    let pgdata = config.data_dir.join("pgdata");
    std::fs::create_dir_all(&pgdata).unwrap();
    std::fs::write(pgdata.join("PG_VERSION"), "15\n").unwrap();
    std::fs::write(pgdata.join("leftover"), "from the crashed attempt").unwrap();
    std::fs::write(config.data_dir.join("stratum-init.incomplete"), "initdb").unwrap();
    std::fs::write(
        config.data_dir.join("stratum-cluster.json"),
        serde_json::json!({
            "clusterId": fx.cluster_id,
            "cluster": CLUSTER,
            "instance": "simple-pg-0"
        })
        .to_string(),
    )
    .unwrap();

    let mut m = Running::start(config.clone());
    m.wait_ready().await;
    assert!(!pgdata.join("leftover").exists());
    assert!(!config.data_dir.join("stratum-init.incomplete").exists());
    // The redone bootstrap created the application owner.
    let client = fx.app_client(0).await;
    client.batch_execute("SELECT 1").await.unwrap();
    drop(client);
    m.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_bin_dir_is_reported_with_the_install_hint() {
    let fx = Fixture::new(1);
    let mut config = fx.config(0);
    config.bin_dir = Some(fx.path().join("no-such-bin"));
    let err = expect_failure(config).await;
    let msg = format!("{err:#}");
    assert!(
        matches!(
            err.downcast_ref::<InstanceError>(),
            Some(InstanceError::MissingBinary { binary, .. }) if binary == "postgres"
        ),
        "{msg}"
    );
    assert!(
        msg.contains("install PostgreSQL (Debian: apt-get install postgresql) or set STRATUM_POSTGRES_BIN_DIR"),
        "{msg}"
    );
    assert!(msg.contains("no-such-bin"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binaries_of_another_major_version_are_refused() {
    let fx = Fixture::new(1);
    let mut config = fx.config(0);
    config.engine["version"] = 17.into();
    let err = expect_failure(config).await;
    let msg = format!("{err:#}");
    assert!(
        matches!(
            err.downcast_ref::<InstanceError>(),
            Some(InstanceError::MissingBinary { .. })
        ),
        "{msg}"
    );
    assert!(
        msg.contains(PG15_BIN) && msg.contains("PostgreSQL 15") && msg.contains("version 17"),
        "{msg}"
    );
}

impl Running {
    async fn reconfigure(&self, engine: &serde_json::Value) -> serde_json::Value {
        let resp = self
            .post("/v1/actions/reconfigure")
            .bearer_auth(TOKEN)
            .json(&serde_json::json!({ "engine": engine }))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
        resp.json().await.unwrap()
    }

    async fn status_until(&self, what: &str, f: impl Fn(&MemberStatus) -> bool) -> MemberStatus {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let status = self.status().await;
            if f(&status) {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "no {what} within 30s: {status:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

async fn show(client: &tokio_postgres::Client, name: &str) -> String {
    client
        .query_one(&format!("SHOW {name}"), &[])
        .await
        .unwrap()
        .get(0)
}

fn postmaster_pid(config: &InstanceConfig) -> String {
    std::fs::read_to_string(config.data_dir.join("pgdata").join("postmaster.pid"))
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .to_string()
}

/// The `reconfigure` path against a real server: the manager reports the
/// hash of the settings it runs with; a reloadable parameter is live at
/// once without a restart; a restart-only one (and a lowered hot-standby
/// one) leaves `pendingRestart` (PostgreSQL's own `pg_settings`) and
/// `restartPrimaryFirst` set until the manager's `restart` action starts
/// the server with the new settings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconfigure_reloads_or_leaves_a_pending_restart_that_restart_applies() {
    use operator_core::instance::protocol::settings_hash;
    let fx = Fixture::new(1);
    let config = fx.config(0);
    let mut m = Running::start(config.clone());
    m.wait_ready().await;
    let status = m.status().await;
    assert_eq!(
        status.config_hash.as_deref(),
        Some(settings_hash(&config.engine).as_str())
    );
    assert!(!status.pending_restart && !status.restart_primary_first);
    let pid = postmaster_pid(&config);

    // Reloadable: live at once, same server process.
    let mut engine = config.engine.clone();
    engine["parameters"]["work_mem"] = "12MB".into();
    let reply = m.reconfigure(&engine).await;
    assert_eq!(reply["restart"], false, "{reply}");
    assert_eq!(reply["changed"], serde_json::json!(["work_mem"]), "{reply}");
    let client = fx.app_client(0).await;
    assert_eq!(show(&client, "work_mem").await, "12MB");
    let status = m.status().await;
    assert_eq!(
        status.config_hash.as_deref(),
        Some(settings_hash(&engine).as_str())
    );
    assert!(!status.pending_restart, "{status:?}");
    assert_eq!(postmaster_pid(&config), pid, "no restart for work_mem");

    // Restart-only, and max_connections lowered (30 → 25).
    engine["parameters"]["shared_buffers"] = "24MB".into();
    engine["parameters"]["max_connections"] = "25".into();
    let reply = m.reconfigure(&engine).await;
    assert_eq!(reply["restart"], true, "{reply}");
    assert_eq!(reply["primaryFirst"], true, "{reply}");
    let status = m
        .status_until("pendingRestart", |s| s.pending_restart)
        .await;
    assert!(status.restart_primary_first, "{status:?}");
    assert_eq!(
        status.config_hash.as_deref(),
        Some(settings_hash(&engine).as_str())
    );
    assert_eq!(
        status.details["pendingRestartFor"]["max_connections"], "30",
        "{status:?}"
    );
    assert_eq!(show(&client, "shared_buffers").await, "16MB");
    drop(client);

    // The manager's restart starts the server with them.
    let resp = m
        .post("/v1/actions/restart")
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    m.wait_ready().await;
    let status = m
        .status_until("no pendingRestart", |s| s.ready && !s.pending_restart)
        .await;
    assert!(!status.restart_primary_first, "{status:?}");
    assert_eq!(
        status.config_hash.as_deref(),
        Some(settings_hash(&engine).as_str())
    );
    assert_ne!(postmaster_pid(&config), pid);
    let client = fx.app_client(0).await;
    assert_eq!(show(&client, "shared_buffers").await, "24MB");
    assert_eq!(show(&client, "max_connections").await, "25");
    assert_eq!(show(&client, "work_mem").await, "12MB");
    drop(client);
    m.stop().await.expect("clean stop");
}
