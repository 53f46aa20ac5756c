//! Configuration changes reaching running instances on Kubernetes, end to
//! end: the operator (the `stratum controller` binary, watching the test's
//! namespace) on a real control plane, real PostgreSQL 15 / MariaDB in the
//! pods run by the fake kubelet of `tests/support/kubelet.rs`, which gives
//! each pod the ConfigMap's instance config once, at its start (as a
//! manager reads it once): only the controller's `reconfigure` makes a
//! changed spec reach a running server.
//!
//! - PostgresCluster, 3 instances: a changed reloadable parameter
//!   (`work_mem`) is live on every instance (`SHOW work_mem`) with the same
//!   postmaster (no restart), Events `InstanceReconfigured`; a changed
//!   restart-only one (`shared_buffers`) makes every member report a
//!   pending restart (Event), which the rolling update carries out until
//!   every server runs the new value (every postmaster restarted, Healthy,
//!   nothing pending); an operator-owned parameter (`max_wal_senders`) is
//!   refused naming the field, the ConfigMap and the running instances
//!   untouched;
//! - PxcCluster (one member, so that the test stays short): a changed
//!   `spec.configuration` reaches my.cnf and `SHOW VARIABLES` at once for
//!   a writable variable (same mariadbd); a read-only one (`back_log`) is
//!   written to my.cnf and taken by the restart the rolling update makes;
//!   an operator-owned option (`port`) is refused naming
//!   `spec.configuration`, the ConfigMap untouched.
//!
//! Uses the control plane of `STRATUM_TEST_KUBECONFIG`, or starts one for
//! this binary (scripts/control-plane.sh); fails when it cannot, or when
//! PostgreSQL 15 / MariaDB are not installed.

mod support;

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::Client;
use kube::api::Api;
use operator_core::engine::InstanceOps;
use operator_core::instance::protocol::MemberStatus;
use serde_json::{Value, json};
use support::k8s_db::{
    DbCluster, Operator, condition, galera_cr, mariadb_connect, patch_spec, pg_connect, pg_cr,
    require_postgres, wait_status,
};
use support::kubelet::Kubelet;
use support::*;

const START: Duration = Duration::from_secs(180);
const WAIT: Duration = Duration::from_secs(90);
const PG: &str = "rc-pg";
const PG_NAMES: [&str; 3] = ["rc-pg-0", "rc-pg-1", "rc-pg-2"];
const PXC: &str = "rc-pxc";

fn require_mariadb() {
    assert!(
        ["/usr/sbin/mariadbd", "/usr/bin/mariadbd"]
            .iter()
            .any(|p| Path::new(p).is_file()),
        "mariadbd not found: install mariadb-server galera-4 rsync (scripts/setup.sh)"
    );
}

fn rc_pg() -> Value {
    let mut cr = pg_cr(PG);
    cr["spec"]["postgresql"]["parameters"]["work_mem"] = json!("4MB");
    cr
}

/// `SHOW name` on every PostgreSQL instance, in `PG_NAMES` order.
async fn pg_show(kubelet: &Kubelet, password: &str, name: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for pod in PG_NAMES {
        let c = pg_connect(kubelet.pod_ip(pod), password).await?;
        let row = c
            .query_one(&format!("SHOW {name}"), &[])
            .await
            .map_err(|e| format!("SHOW {name} on {pod}: {e}"))?;
        out.push(row.get(0));
    }
    Ok(out)
}

/// Every manager's status, in `names` order.
async fn managers(kubelet: &Kubelet, names: &[&str]) -> Result<Vec<MemberStatus>, String> {
    let ops = kubelet.instance_client();
    let mut out = Vec::new();
    for n in names {
        out.push(ops.status(n).await.map_err(|e| e.to_string())?);
    }
    Ok(out)
}

fn pids(kubelet: &Kubelet, names: &[&str]) -> Vec<Option<i32>> {
    names.iter().map(|n| kubelet.server_pid(n)).collect()
}

fn reasons_with(events: &[k8s_openapi::api::events::v1::Event], reason: &str) -> Vec<String> {
    events
        .iter()
        .filter(|e| e.reason.as_deref() == Some(reason))
        .filter_map(|e| e.note.clone())
        .collect()
}

async fn config_map(client: &Client, ns: &str, cluster: &str) -> ConfigMap {
    Api::<ConfigMap>::namespaced(client.clone(), ns)
        .get(&format!("{cluster}-config"))
        .await
        .unwrap_or_else(|e| panic!("ConfigMap: {}", api_message(&e)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_parameters_reach_running_instances() {
    require_postgres();
    let db = DbCluster::create("reconf-pg", &rc_pg(), Operator::Process).await;
    let (client, ns, api, kubelet) = (&db.client, &db.ns, &db.api, &db.kubelet);
    wait_status(api, PG, "phase Healthy", START, |s| {
        s["phase"] == "Healthy" && s["ready"] == "3/3" && s["currentPrimary"] == "rc-pg-0"
    })
    .await;
    let password = db.secret("app-password").await;
    let first = managers(kubelet, &PG_NAMES).await.unwrap();
    let hash = first[0]
        .config_hash
        .clone()
        .expect("managers report a hash");
    assert!(
        first.iter().all(|m| m.config_hash.as_ref() == Some(&hash)),
        "{first:?}"
    );
    let pids_before = pids(kubelet, &PG_NAMES);
    assert!(pids_before.iter().all(Option::is_some), "{pids_before:?}");

    // A reloadable parameter: live everywhere, no restart.
    patch_spec(
        api,
        PG,
        &json!({"postgresql": {"parameters": {"work_mem": "7MB"}}}),
    )
    .await;
    eventually("SHOW work_mem = 7MB on every instance", WAIT, || async {
        let got = pg_show(kubelet, &password, "work_mem").await?;
        if got.iter().all(|v| v == "7MB") {
            Ok(())
        } else {
            Err(format!("{got:?}"))
        }
    })
    .await;
    assert_eq!(
        pids(kubelet, &PG_NAMES),
        pids_before,
        "work_mem is reloaded, no server restarts"
    );
    let now = managers(kubelet, &PG_NAMES).await.unwrap();
    let reloaded_hash = now[0].config_hash.clone().unwrap();
    assert_ne!(reloaded_hash, hash);
    for m in &now {
        assert_eq!(m.config_hash.as_ref(), Some(&reloaded_hash), "{m:?}");
        assert!(!m.pending_restart, "{m:?}");
    }
    let notes = eventually(
        "an InstanceReconfigured Event per instance",
        WAIT,
        || async {
            let notes = reasons_with(&events_about(client, ns, PG).await, "InstanceReconfigured");
            if PG_NAMES
                .iter()
                .all(|n| notes.iter().any(|t| t.starts_with(n)))
            {
                Ok(notes)
            } else {
                Err(format!("{notes:?}"))
            }
        },
    )
    .await;
    assert!(notes.iter().all(|n| n.contains("work_mem")), "{notes:?}");

    // A restart-only parameter: every member reports a pending restart
    // (an Event says so) and the rolling update restarts them in update
    // order (replicas first, the primary last) until every server runs
    // the new value.
    patch_spec(
        api,
        PG,
        &json!({"postgresql": {"parameters": {"shared_buffers": "24MB"}}}),
    )
    .await;
    eventually("an Event saying a restart is pending", WAIT, || async {
        let notes = reasons_with(&events_about(client, ns, PG).await, "InstanceReconfigured");
        if notes
            .iter()
            .any(|n| n.contains("restart pending for shared_buffers"))
        {
            Ok(())
        } else {
            Err(format!("{notes:?}"))
        }
    })
    .await;
    eventually(
        "SHOW shared_buffers = 24MB on every instance",
        START,
        || async {
            let got = pg_show(kubelet, &password, "shared_buffers").await?;
            if got.iter().all(|v| v == "24MB") {
                Ok(())
            } else {
                Err(format!("{got:?}"))
            }
        },
    )
    .await;
    wait_status(api, PG, "Healthy, no restart pending", WAIT, |s| {
        s["phase"] == "Healthy"
            && s["ready"] == "3/3"
            && s["instancesStatus"]
                .as_array()
                .is_some_and(|is| is.len() == 3 && is.iter().all(|i| i["pendingRestart"] != true))
    })
    .await;
    let restarted = pids(kubelet, &PG_NAMES);
    for (i, name) in PG_NAMES.iter().enumerate() {
        assert_ne!(restarted[i], pids_before[i], "{name} was restarted");
    }
    let now = managers(kubelet, &PG_NAMES).await.unwrap();
    let pending_hash = now[0].config_hash.clone().unwrap();
    for m in &now {
        assert!(!m.pending_restart, "{m:?}");
        assert_eq!(m.config_hash.as_ref(), Some(&pending_hash), "{m:?}");
    }
    let pids_before = restarted;

    // An operator-owned parameter: refused naming the field; the
    // ConfigMap and the running instances stay as they are.
    let cm_before = config_map(client, ns, PG).await;
    patch_spec(
        api,
        PG,
        &json!({"postgresql": {"parameters": {"max_wal_senders": "12", "work_mem": "9MB"}}}),
    )
    .await;
    let refused = wait_status(api, PG, "the owned parameter refused", WAIT, |s| {
        s["phase"] == "Failed"
            && condition(s, "Degraded").is_some_and(|c| {
                c["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("spec.postgresql.parameters.max_wal_senders"))
            })
    })
    .await;
    assert!(
        condition(&refused, "Degraded").unwrap()["message"]
            .as_str()
            .unwrap()
            .contains("managed by the operator"),
        "{refused}"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let cm_after = config_map(client, ns, PG).await;
    assert_eq!(
        cm_after.metadata.resource_version, cm_before.metadata.resource_version,
        "the ConfigMap was not changed"
    );
    assert_eq!(
        pg_show(kubelet, &password, "work_mem").await.unwrap(),
        vec!["7MB"; 3],
        "nothing of the refused spec reached the instances"
    );
    let now = managers(kubelet, &PG_NAMES).await.unwrap();
    assert!(
        now.iter()
            .all(|m| m.config_hash.as_ref() == Some(&pending_hash))
    );
    assert_eq!(pids(kubelet, &PG_NAMES), pids_before);
}

fn rc_pxc(configuration: &str) -> Value {
    let mut cr = galera_cr(PXC, 1, configuration);
    // One member keeps the test short; Galera wants three.
    cr["spec"]["unsafeFlags"] = json!({"pxcSize": true});
    cr
}

async fn mariadb_variable(ip: Ipv4Addr, password: &str, name: &str) -> Result<String, String> {
    use mysql_async::prelude::Queryable;
    let mut c = mariadb_connect(ip, password).await?;
    let row: Option<(String, String)> = c
        .query_first(format!("SHOW GLOBAL VARIABLES LIKE '{name}'"))
        .await
        .map_err(|e| e.to_string())?;
    let _ = c.disconnect().await;
    row.map(|r| r.1)
        .ok_or_else(|| format!("no variable {name}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn galera_configuration_reaches_my_cnf_and_the_server() {
    require_mariadb();
    let db = DbCluster::create(
        "reconf-pxc",
        &rc_pxc("[mysqld]\ninnodb_buffer_pool_size = 64M\nmax_connections = 50\n"),
        Operator::Process,
    )
    .await;
    let (client, ns, api, kubelet) = (&db.client, &db.ns, &db.api, &db.kubelet);
    wait_status(api, PXC, "phase Healthy", START, |s| {
        s["phase"] == "Healthy" && s["ready"] == "1/1"
    })
    .await;
    let pod = "rc-pxc-0";
    let ip = kubelet.pod_ip(pod);
    let password = db.secret("root-password").await;
    assert_eq!(
        mariadb_variable(ip, &password, "max_connections")
            .await
            .unwrap(),
        "50"
    );
    let pid = kubelet.server_pid(pod).expect("mariadbd runs");
    let my_cnf = kubelet.pod_dir(pod).join("run").join("my.cnf");

    // max_connections is writable (SET GLOBAL): set live.
    patch_spec(
        api,
        PXC,
        &json!({"configuration": "[mysqld]\ninnodb_buffer_pool_size = 64M\nmax_connections = 77\n"}),
    )
    .await;
    eventually("SHOW VARIABLES max_connections = 77", WAIT, || async {
        match mariadb_variable(ip, &password, "max_connections").await? {
            v if v == "77" => Ok(()),
            v => Err(v),
        }
    })
    .await;
    assert_eq!(kubelet.server_pid(pod), Some(pid), "set live, no restart");
    let cnf = std::fs::read_to_string(&my_cnf).unwrap();
    assert!(cnf.contains("max_connections=77"), "{cnf}");

    // back_log is not writable: written to my.cnf, a pending restart, which
    // the rolling update carries out; the server then runs it.
    patch_spec(
        api,
        PXC,
        &json!({"configuration": "[mysqld]\ninnodb_buffer_pool_size = 64M\nmax_connections = 77\nback_log = 61\n"}),
    )
    .await;
    eventually(
        "SHOW VARIABLES back_log = 61 after a restart",
        START,
        || async {
            match mariadb_variable(ip, &password, "back_log").await? {
                v if v == "61" => Ok(()),
                v => Err(v),
            }
        },
    )
    .await;
    let cnf = std::fs::read_to_string(&my_cnf).unwrap();
    assert!(cnf.contains("back_log=61"), "{cnf}");
    let status = wait_status(api, PXC, "Healthy, no restart pending", WAIT, |s| {
        s["phase"] == "Healthy" && s["instancesStatus"][0]["pendingRestart"] != true
    })
    .await;
    assert_eq!(status["ready"], "1/1", "{status}");
    let pid = kubelet.server_pid(pod).expect("mariadbd runs");
    assert_eq!(
        mariadb_variable(ip, &password, "max_connections")
            .await
            .unwrap(),
        "77",
        "the live change survived the restart"
    );

    // An operator-owned option: refused naming the field, ConfigMap kept.
    let cm_before = config_map(client, ns, PXC).await;
    patch_spec(
        api,
        PXC,
        &json!({"configuration": "[mysqld]\nport = 3307\nmax_connections = 99\n"}),
    )
    .await;
    wait_status(api, PXC, "the owned option refused", WAIT, |s| {
        s["phase"] == "Failed"
            && condition(s, "Degraded").is_some_and(|c| {
                c["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("spec.configuration") && m.contains("port"))
            })
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        config_map(client, ns, PXC).await.metadata.resource_version,
        cm_before.metadata.resource_version,
        "the ConfigMap was not changed"
    );
    assert_eq!(
        mariadb_variable(ip, &password, "max_connections")
            .await
            .unwrap(),
        "77"
    );
    assert_eq!(kubelet.server_pid(pod), Some(pid));
}
