//! End to end: the operator on a real control plane (kube-apiserver,
//! controller manager, scheduler, fake Nodes) with real database processes
//! in the pods, run by the fake kubelet of `tests/support/kubelet.rs`
//! (`stratum instance` per pod on a loopback IP of its own). The operator
//! runs in-process under its own ServiceAccount and reaches the instance
//! managers by pod IP, as it would in a cluster.
//!
//! - a 3-instance `PostgresCluster` (PostgreSQL 15 from Debian) becomes
//!   Healthy with ordinal 0 as primary; rows written through the `-rw`
//!   Service reach both replicas (through the `-ro` selection);
//! - a deleted replica pod comes back on its volume and IP and streams
//!   again; the kubelet's hooks work: a killed postmaster is restarted by
//!   its manager, a replica whose node crashed catches up when it is back;
//! - a 3-instance `PxcCluster` (MariaDB Galera, `proxy.type: none`)
//!   becomes Healthy (the controller orders the bootstrap of the new
//!   group) and rows written through `-rw` reach every node
//!   (tests/k8s_pxc.rs goes on to a full crash).
//!
//! Uses the control plane of `STRATUM_TEST_KUBECONFIG`, or starts one for
//! this binary (scripts/control-plane.sh); fails when it cannot, or when
//! PostgreSQL 15 or MariaDB is not installed.

mod support;

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, DeleteParams, DynamicObject, ListParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use support::kubelet::{Kubelet, service_ips, wait_status};
use support::*;

/// First boot runs initdb and two pg_basebackups, one pod after the other
/// (OrderedReady).
const START: Duration = Duration::from_secs(120);
const WAIT: Duration = Duration::from_secs(60);
const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

fn require_postgres() {
    assert!(
        Path::new(PG_BIN).join("postgres").is_file(),
        "PostgreSQL 15 not found in {PG_BIN}: install postgresql-15 (scripts/setup.sh; Debian: apt-get install postgresql-15)"
    );
}

fn simple_pg() -> Value {
    json!({
        "apiVersion": "stratum.dev/v1alpha1",
        "kind": "PostgresCluster",
        "metadata": {"name": "simple-pg"},
        "spec": {
            "instances": 3,
            "version": 15,
            "storage": {"size": "1Gi"},
            "postgresql": {"parameters": {"shared_buffers": "16MB", "max_connections": "40"}},
        },
    })
}

/// Each pod's route and role labels, readiness and IP (for failure
/// messages).
async fn pods_summary(client: &Client, ns: &str) -> String {
    let pods = Api::<Pod>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
        .map(|l| l.items)
        .unwrap_or_default();
    pods.iter()
        .map(|p| {
            let status = p.status.clone().unwrap_or_default();
            let ready: Vec<String> = status
                .conditions
                .iter()
                .flatten()
                .map(|c| format!("{}={}", c.type_, c.status))
                .collect();
            format!(
                "{} labels={:?} {ready:?} ip={:?} deleting={}\n",
                p.name_any(),
                p.labels()
                    .iter()
                    .filter(|(k, _)| k.starts_with("stratum.dev/r"))
                    .collect::<Vec<_>>(),
                status.pod_ip,
                p.metadata.deletion_timestamp.is_some()
            )
        })
        .collect()
}

/// A credential of the cluster's Secret.
async fn secret_value(client: &Client, ns: &str, cluster: &str, key: &str) -> String {
    let secret = Api::<Secret>::namespaced(client.clone(), ns)
        .get(&format!("{cluster}-credentials"))
        .await
        .unwrap_or_else(|e| panic!("credentials Secret: {}", api_message(&e)));
    let value = secret.data.unwrap_or_default().remove(key);
    String::from_utf8(value.unwrap_or_else(|| panic!("no {key} in the Secret")).0).unwrap()
}

/// Connect to PostgreSQL at `ip:5432`.
async fn connect(
    ip: Ipv4Addr,
    user: &str,
    password: &str,
    db: &str,
) -> Result<tokio_postgres::Client, String> {
    let (client, conn) = tokio_postgres::Config::new()
        .host(ip.to_string())
        .port(5432)
        .user(user)
        .password(password)
        .dbname(db)
        .connect_timeout(Duration::from_secs(2))
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(|e| format!("connect to {ip} as {user}: {e}"))?;
    tokio::spawn(conn);
    Ok(client)
}

/// The ids in `t` on the pod at `ip` (a replica or the primary).
async fn ids_at(ip: Ipv4Addr, password: &str) -> Result<Vec<i32>, String> {
    let c = connect(ip, "app", password, "app").await?;
    let rows = c
        .query("SELECT id FROM t ORDER BY id", &[])
        .await
        .map_err(|e| format!("select on {ip}: {e}"))?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Insert `id` into `t` through the `-rw` Service.
async fn insert_via_rw(client: &Client, ns: &str, password: &str, id: i32) {
    let rw = eventually("one ready pod behind simple-pg-rw", WAIT, || async {
        match service_ips(client, ns, "simple-pg-rw").await?.as_slice() {
            [ip] => Ok(*ip),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let c = connect(rw, "app", password, "app").await.unwrap();
    c.execute("CREATE TABLE IF NOT EXISTS t (id int PRIMARY KEY)", &[])
        .await
        .unwrap();
    c.execute("INSERT INTO t VALUES ($1)", &[&id])
        .await
        .unwrap();
}

/// Every pod behind `-ro` (the two replicas) has exactly `want`.
async fn replicas_have(client: &Client, ns: &str, password: &str, want: &[i32]) {
    eventually(
        &format!("rows {want:?} on both replicas behind simple-pg-ro"),
        WAIT,
        || async {
            let ips = service_ips(client, ns, "simple-pg-ro").await?;
            if ips.len() != 2 {
                return Err(format!("-ro selects {ips:?}"));
            }
            for ip in ips {
                let got = ids_at(ip, password).await?;
                if got != want {
                    return Err(format!("{ip} has {got:?}"));
                }
            }
            Ok(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_cluster_runs_real_instances_and_a_deleted_replica_rejoins() {
    require_postgres();
    let client = admin().await;
    start_operator_with_instance_timeout(
        operator_core::controller::ControllerOptions::new("test").instance_timeout,
    );
    let namespace = TestNamespace::create(&client, "e2e-pg").await;
    let ns = namespace.name.clone();
    let kubelet = Kubelet::start(&client, &ns, "simple-pg", "PostgresCluster").await;
    apply(&client, &simple_pg(), &ns)
        .await
        .unwrap_or_else(|e| panic!("simple-pg: {}", api_message(&e)));
    let api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &ns, &stratum_resource("PostgresCluster"));

    // (a) Healthy, ordinal 0 primary, as the instance managers report.
    let status = wait_status(&api, "simple-pg", "phase Healthy", START, |s| {
        s["phase"] == "Healthy"
    })
    .await;
    assert_eq!(status["currentPrimary"], "simple-pg-0", "{status}");
    assert_eq!(status["ready"], "3/3", "{status}");
    let password = secret_value(&client, &ns, "simple-pg", "app-password").await;
    insert_via_rw(&client, &ns, &password, 1).await;
    let rw = service_ips(&client, &ns, "simple-pg-rw").await.unwrap();
    assert_eq!(
        rw,
        [kubelet.pod_ip("simple-pg-0")],
        "{}",
        pods_summary(&client, &ns).await
    );
    replicas_have(&client, &ns, &password, &[1]).await;

    // (b) A replica pod is deleted: its processes are killed, the
    // StatefulSet controller recreates it, and it starts again on the same
    // volume and IP and streams from the primary.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let old_uid = pods.get("simple-pg-2").await.unwrap().uid();
    pods.delete("simple-pg-2", &DeleteParams::default())
        .await
        .unwrap();
    eventually("simple-pg-2 recreated and running", WAIT, || async {
        let pod = pods.get("simple-pg-2").await.map_err(|e| e.to_string())?;
        if pod.uid() != old_uid && kubelet.is_running("simple-pg-2") {
            Ok(())
        } else {
            Err(format!("uid {:?}", pod.uid()))
        }
    })
    .await;
    insert_via_rw(&client, &ns, &password, 2).await;
    wait_status(&api, "simple-pg", "phase Healthy again", WAIT, |s| {
        s["phase"] == "Healthy" && s["ready"] == "3/3"
    })
    .await;
    replicas_have(&client, &ns, &password, &[1, 2]).await;
    let superuser = secret_value(&client, &ns, "simple-pg", "superuser-password").await;
    eventually("simple-pg-2 streaming from the primary", WAIT, || async {
        let c = connect(
            kubelet.pod_ip("simple-pg-0"),
            "postgres",
            &superuser,
            "postgres",
        )
        .await?;
        let rows = c
            .query(
                "SELECT application_name, state FROM pg_stat_replication",
                &[],
            )
            .await
            .map_err(|e| e.to_string())?;
        let streaming: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        if streaming
            .iter()
            .any(|(name, state)| name == "simple-pg-2" && state == "streaming")
        {
            Ok(())
        } else {
            Err(format!("{streaming:?}"))
        }
    })
    .await;
    // The recreated pod started on its volume: cloned once, at first boot.
    let log = kubelet.manager_log("simple-pg-2");
    assert_eq!(log.matches("==== kubelet: starting").count(), 2, "{log}");
    assert_eq!(
        log.matches("cloning the data directory (pg_basebackup)")
            .count(),
        1,
        "{log}"
    );

    // The test hooks the failover tests use: a replica's postmaster killed
    // (its manager restarts it), then its node lost and back.
    let pid = kubelet.kill_server("simple-pg-1");
    eventually("a new postmaster on simple-pg-1", WAIT, || async {
        let killed = kubelet.server_pid("simple-pg-1");
        match killed {
            Some(p) if p != pid => Ok(()),
            other => Err(format!("pid file says {other:?}")),
        }
    })
    .await;
    kubelet.crash("simple-pg-2");
    assert!(!kubelet.is_running("simple-pg-2"));
    insert_via_rw(&client, &ns, &password, 3).await;
    kubelet.recover("simple-pg-2");
    replicas_have(&client, &ns, &password, &[1, 2, 3]).await;
    wait_status(
        &api,
        "simple-pg",
        "phase Healthy after the hooks",
        WAIT,
        |s| s["phase"] == "Healthy" && s["ready"] == "3/3",
    )
    .await;
    assert_no_failures(&client, &ns).await;
}

fn galera() -> Value {
    json!({
        "apiVersion": "stratum.dev/v1alpha1",
        "kind": "PxcCluster",
        "metadata": {"name": "galera"},
        "spec": {
            "instances": 3,
            "flavor": "MariaDB",
            "version": "10.11",
            "storage": {"size": "1Gi"},
            "configuration": "[mysqld]\ninnodb_buffer_pool_size = 64M\n",
            // Cluster traffic is encrypted (the default) with the
            // operator's certificate, which names each member's headless
            // DNS name. Under the fake kubelet members address each other
            // by loopback IP: mariabackup's SST checks the joiner's name
            // and would refuse (and its socat listens on 0.0.0.0:4444, where
            // two joiners in the one network namespace of every pod would
            // collide); rsync's (through stunnel) checks the chain and binds
            // the joiner's pod IP.
            "sstMethod": "rsync",
            // No HAProxy pods run here: -rw/-ro select the writer label.
            "proxy": {"type": "none"},
        },
    })
}

/// Connect to MariaDB at `ip:3306` as root.
async fn mariadb(ip: Ipv4Addr, password: &str) -> Result<mysql_async::Conn, String> {
    let opts = mysql_async::OptsBuilder::default()
        .ip_or_hostname(ip.to_string())
        .tcp_port(3306)
        .user(Some("root"))
        .pass(Some(password.to_string()))
        .prefer_socket(false);
    tokio::time::timeout(Duration::from_secs(5), mysql_async::Conn::new(opts))
        .await
        .map_err(|_| format!("connecting to {ip}:3306 timed out"))?
        .map_err(|e| format!("connect to {ip}:3306: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pxc_cluster_runs_real_instances_once_bootstrapped() {
    use mysql_async::prelude::Queryable;

    assert!(
        Path::new("/usr/sbin/mariadbd").is_file(),
        "MariaDB not found: install mariadb-server galera-4 mariadb-backup rsync (scripts/setup.sh)"
    );
    let client = admin().await;
    start_operator_with_instance_timeout(
        operator_core::controller::ControllerOptions::new("test").instance_timeout,
    );
    let namespace = TestNamespace::create(&client, "e2e-pxc").await;
    let ns = namespace.name.clone();
    let kubelet = Kubelet::start(&client, &ns, "galera", "PxcCluster").await;
    apply(&client, &galera(), &ns)
        .await
        .unwrap_or_else(|e| panic!("galera: {}", api_message(&e)));
    let api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &ns, &stratum_resource("PxcCluster"));

    // The three members start (Parallel) and wait for the bootstrap
    // order, which the controller sends to one of them.
    let status = wait_status(&api, "galera", "phase Healthy", START, |s| {
        s["phase"] == "Healthy"
    })
    .await;
    assert_eq!(status["ready"], "3/3", "{status}");
    let writer = status["currentPrimary"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let password = secret_value(&client, &ns, "galera", "root-password").await;

    // Writes through -rw (one writer), then every node has them.
    let rw = eventually("one ready pod behind galera-rw", WAIT, || async {
        match service_ips(&client, &ns, "galera-rw").await?.as_slice() {
            [ip] => Ok(*ip),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert_eq!(
        rw,
        kubelet.pod_ip(&writer),
        "-rw is not the writer {writer}: {}",
        pods_summary(&client, &ns).await
    );
    let mut c = mariadb(rw, &password).await.unwrap();
    c.query_drop("CREATE DATABASE IF NOT EXISTS e2e")
        .await
        .unwrap();
    c.query_drop("CREATE TABLE e2e.t (id INT PRIMARY KEY)")
        .await
        .unwrap();
    c.query_drop("INSERT INTO e2e.t VALUES (1), (2), (3)")
        .await
        .unwrap();
    for pod in ["galera-0", "galera-1", "galera-2"] {
        let ip = kubelet.pod_ip(pod);
        eventually(&format!("the rows on {pod}"), WAIT, || async {
            let mut c = mariadb(ip, &password).await?;
            let ids: Vec<i32> = c
                .query("SELECT id FROM e2e.t ORDER BY id")
                .await
                .map_err(|e| e.to_string())?;
            if ids == [1, 2, 3] {
                Ok(())
            } else {
                Err(format!("{ids:?}"))
            }
        })
        .await;
    }
    assert_no_failures(&client, &ns).await;
}
