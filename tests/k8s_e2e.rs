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

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams};
use kube::{Client, ResourceExt};
use serde_json::Value;
use support::k8s_db::{
    DbCluster, Operator, galera_cr, mariadb_connect, pg_connect_as, pg_cr, require_postgres,
    wait_rw_ip,
};
use support::kubelet::service_ips;
use support::*;

/// First boot runs initdb and two pg_basebackups, one pod after the other
/// (OrderedReady).
const START: Duration = Duration::from_secs(120);
const WAIT: Duration = Duration::from_secs(60);

fn simple_pg() -> Value {
    pg_cr("simple-pg")
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

/// The ids in `t` on the pod at `ip` (a replica or the primary).
async fn ids_at(ip: Ipv4Addr, password: &str) -> Result<Vec<i32>, String> {
    let c = pg_connect_as(ip, "app", password, "app").await?;
    let rows = c
        .query("SELECT id FROM t ORDER BY id", &[])
        .await
        .map_err(|e| format!("select on {ip}: {e}"))?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Insert `id` into `t` through the `-rw` Service.
async fn insert_via_rw(client: &Client, ns: &str, password: &str, id: i32) {
    let rw = wait_rw_ip(client, ns, "simple-pg", WAIT).await;
    let c = pg_connect_as(rw, "app", password, "app").await.unwrap();
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
    let db = DbCluster::create("e2e-pg", &simple_pg(), Operator::InProcess).await;
    let (client, ns, kubelet) = (&db.client, &db.ns, &db.kubelet);

    // (a) Healthy, ordinal 0 primary, as the instance managers report.
    let status = db
        .wait_status("phase Healthy", START, |s| s["phase"] == "Healthy")
        .await;
    assert_eq!(status["currentPrimary"], "simple-pg-0", "{status}");
    assert_eq!(status["ready"], "3/3", "{status}");
    let password = db.secret("app-password").await;
    insert_via_rw(client, ns, &password, 1).await;
    let rw = service_ips(client, ns, "simple-pg-rw").await.unwrap();
    assert_eq!(
        rw,
        [kubelet.pod_ip("simple-pg-0")],
        "{}",
        pods_summary(client, ns).await
    );
    replicas_have(client, ns, &password, &[1]).await;

    // (b) A replica pod is deleted: its processes are killed, the
    // StatefulSet controller recreates it, and it starts again on the same
    // volume and IP and streams from the primary.
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
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
    insert_via_rw(client, ns, &password, 2).await;
    db.wait_status("phase Healthy again", WAIT, |s| {
        s["phase"] == "Healthy" && s["ready"] == "3/3"
    })
    .await;
    replicas_have(client, ns, &password, &[1, 2]).await;
    let superuser = db.secret("superuser-password").await;
    eventually("simple-pg-2 streaming from the primary", WAIT, || async {
        let c = pg_connect_as(
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
    insert_via_rw(client, ns, &password, 3).await;
    kubelet.recover("simple-pg-2");
    replicas_have(client, ns, &password, &[1, 2, 3]).await;
    db.wait_status("phase Healthy after the hooks", WAIT, |s| {
        s["phase"] == "Healthy" && s["ready"] == "3/3"
    })
    .await;
    assert_no_failures(client, ns).await;
}

fn galera() -> Value {
    galera_cr("galera", 3, "[mysqld]\ninnodb_buffer_pool_size = 64M\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pxc_cluster_runs_real_instances_once_bootstrapped() {
    use mysql_async::prelude::Queryable;

    assert!(
        Path::new("/usr/sbin/mariadbd").is_file(),
        "MariaDB not found: install mariadb-server galera-4 mariadb-backup rsync (scripts/setup.sh)"
    );
    let db = DbCluster::create("e2e-pxc", &galera(), Operator::InProcess).await;
    let (client, ns, kubelet) = (&db.client, &db.ns, &db.kubelet);

    // The three members start (Parallel) and wait for the bootstrap
    // order, which the controller sends to one of them.
    let status = db
        .wait_status("phase Healthy", START, |s| s["phase"] == "Healthy")
        .await;
    assert_eq!(status["ready"], "3/3", "{status}");
    let writer = status["currentPrimary"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let password = db.secret("root-password").await;

    // Writes through -rw (one writer), then every node has them.
    let rw = db.wait_rw_ip(WAIT).await;
    assert_eq!(
        rw,
        kubelet.pod_ip(&writer),
        "-rw is not the writer {writer}: {}",
        pods_summary(client, ns).await
    );
    let mut c = mariadb_connect(rw, &password).await.unwrap();
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
            let mut c = mariadb_connect(ip, &password).await?;
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
    assert_no_failures(client, ns).await;
}
