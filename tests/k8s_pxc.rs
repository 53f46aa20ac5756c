//! Galera on Kubernetes, end to end: the operator on a real control plane
//! with real MariaDB 10.11 + galera-4 in the pods, run by the fake kubelet
//! of `tests/support/kubelet.rs` (`stratum instance` per pod on a loopback
//! IP of its own). One scenario, in order (each step needs the cluster the
//! step before left):
//!
//! 1. a 3-node `PxcCluster` (flavor MariaDB, `spec.proxy.type: none`)
//!    reaches Healthy: the controller bootstraps the new cluster from one
//!    member (decided in `status.bootstrap`, ordered, cleared), the others
//!    join; per-instance wsrep facts and the Events show it; rows written
//!    through the `-rw` writer are on every node;
//! 2. `spec.bootstrap.forceBootstrapFrom` naming an instance the cluster
//!    does not have is refused (phase Failed, `Degraded` naming the field,
//!    Event `InvalidSpec`) and the running cluster is untouched;
//! 3. a full crash: one member dies first (manager and server, kill -9)
//!    and falls behind while writes go on, then the other two die at once
//!    under write load; all three come back: the controller bootstraps the
//!    most advanced member only (never the one behind; one decision, every
//!    order to it), every acknowledged row is present on every node, and
//!    the cluster UUID and seqno history are preserved; the Events show it.
//!
//! Uses the control plane of `STRATUM_TEST_KUBECONFIG`, or starts one for
//! this binary (scripts/control-plane.sh); fails when it cannot, or when
//! MariaDB Galera is not installed.

mod support;

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use mysql_async::prelude::*;
use serde_json::{Value, json};
use support::k8s_db::{
    AckedWriter, DbCluster, Operator, condition, galera_cr, mariadb_connect, require_galera,
};
use support::kubelet::Kubelet;
use support::*;

const CLUSTER: &str = "simple-galera";
/// A new group: one bootstrap, then two joiners served by rsync SST, on
/// 2 shared cores.
const START: Duration = Duration::from_secs(300);
/// Recovery after the full crash: `--wsrep-recover` on every member, the
/// decision, the bootstrap, two IST joins (each after the 5 s
/// rejoin-after-crash wait).
const RECOVER: Duration = Duration::from_secs(240);
const WAIT: Duration = Duration::from_secs(60);

fn simple_galera() -> Value {
    galera_cr(
        CLUSTER,
        3,
        "[mysqld]\ninnodb_buffer_pool_size = 64M\nmax_connections = 100\n",
    )
}

fn pod_names() -> Vec<String> {
    (0..3).map(|i| format!("{CLUSTER}-{i}")).collect()
}

/// Wait until the cluster's status satisfies `check`; returns it.
async fn wait_status(
    api: &Api<DynamicObject>,
    what: &str,
    timeout: Duration,
    check: impl Fn(&Value) -> bool,
) -> Value {
    let started = Instant::now();
    let status = support::k8s_db::wait_status(api, CLUSTER, what, timeout, check).await;
    eprintln!("{what} after {:.1}s", started.elapsed().as_secs_f64());
    status
}

/// Healthy: every member Synced in one Primary component of three, a
/// writer routed, no bootstrap pending.
fn healthy(s: &Value) -> bool {
    s["phase"] == "Healthy"
        && s["ready"] == "3/3"
        && s.get("bootstrap").is_none()
        && condition(s, "PrimaryComponent").is_some_and(|c| c["status"] == "True")
        && s["instancesStatus"].as_array().is_some_and(|is| {
            is.len() == 3
                && is.iter().all(|i| {
                    i["wsrep"]["state"] == "Synced"
                        && i["wsrep"]["clusterSize"] == 3
                        && i["wsrep"]["clusterStatus"] == "Primary"
                })
        })
}

/// The Events about the cluster, by when they last happened (a series
/// of isomorphic Events — same reason, action and related pod — is one
/// object with a count and its first note), as `Reason: note`, each with
/// that time (and ` [xN]` for a series of N).
async fn events(client: &Client, ns: &str) -> Vec<(Timestamp, String)> {
    let mut out: Vec<(Timestamp, String)> = events_about(client, ns, CLUSTER)
        .await
        .into_iter()
        .map(|e: Event| {
            let at = e
                .series
                .as_ref()
                .map(|s| s.last_observed_time.0)
                .or_else(|| e.event_time.as_ref().map(|t| t.0))
                .or_else(|| e.metadata.creation_timestamp.as_ref().map(|t| t.0))
                .unwrap_or_default();
            let count = e.series.as_ref().map_or(1, |s| s.count);
            let text = format!(
                "{}: {}{}",
                e.reason.unwrap_or_default(),
                e.note.unwrap_or_default(),
                if count > 1 {
                    format!(" [x{count}]")
                } else {
                    String::new()
                }
            );
            (at, text)
        })
        .collect();
    out.sort();
    out
}

/// The notes of `events` since `since` (all when `None`).
fn texts(events: &[(Timestamp, String)], since: Option<Timestamp>) -> Vec<String> {
    events
        .iter()
        .filter(|(at, _)| since.is_none_or(|s| *at >= s))
        .map(|(_, t)| t.clone())
        .collect()
}

fn with_reason<'a>(events: &'a [String], reason: &str) -> Vec<&'a String> {
    let prefix = format!("{reason}: ");
    events.iter().filter(|e| e.starts_with(&prefix)).collect()
}

/// Wait until an Event with `reason` (and `containing`) happened since
/// `since`; the reporter sends them in the background.
async fn wait_event(
    client: &Client,
    ns: &str,
    since: Option<Timestamp>,
    reason: &str,
    containing: &str,
) -> Vec<String> {
    eventually(
        &format!("an Event {reason} with {containing:?}"),
        WAIT,
        || async {
            let all = texts(&events(client, ns).await, since);
            if with_reason(&all, reason)
                .iter()
                .any(|e| e.contains(containing))
            {
                Ok(all)
            } else {
                Err(all.join("\n"))
            }
        },
    )
    .await
}

/// The pod the `-rw` Service selects now (the writer label), when ready.
async fn writer_pod(client: &Client, ns: &str) -> Result<String, String> {
    let pods = Api::<Pod>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(&format!(
            "{}={CLUSTER},{}=rw",
            operator_core::build::LABEL_CLUSTER,
            operator_core::build::LABEL_ROUTE
        )))
        .await
        .map_err(|e| e.to_string())?
        .items;
    let ready: Vec<String> = pods
        .iter()
        .filter(|p| {
            p.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .map(|p| p.name_any())
        .collect();
    match ready.as_slice() {
        [one] => Ok(one.clone()),
        other => Err(format!("-rw selects {other:?}")),
    }
}

/// The acknowledged rows at `ip`.
async fn rows_at(ip: Ipv4Addr, password: &str) -> Result<BTreeSet<i64>, String> {
    let mut c = mariadb_connect(ip, password).await?;
    let rows: Vec<i64> = c
        .query("SELECT n FROM app.rows_acked")
        .await
        .map_err(|e| format!("{ip}: {e}"))?;
    let _ = c.disconnect().await;
    Ok(rows.into_iter().collect())
}

/// One wsrep status variable at `ip`.
async fn wsrep(ip: Ipv4Addr, password: &str, name: &str) -> Result<String, String> {
    let mut c = mariadb_connect(ip, password).await?;
    let row: Option<(String, String)> = c
        .query_first(format!("SHOW GLOBAL STATUS LIKE '{name}'"))
        .await
        .map_err(|e| format!("{ip}: {e}"))?;
    let _ = c.disconnect().await;
    row.map(|(_, v)| v)
        .ok_or_else(|| format!("{ip}: no {name}"))
}

/// Every node holds every row of `want` (Galera applies replicated
/// write-sets asynchronously: wait a little), and the same rows.
async fn every_node_has(kubelet: &Kubelet, password: &str, want: &BTreeSet<i64>) {
    eventually(
        &format!("the {} acknowledged rows on every node", want.len()),
        WAIT,
        || async {
            let mut first: Option<BTreeSet<i64>> = None;
            for pod in pod_names() {
                let got = rows_at(kubelet.pod_ip(&pod), password).await?;
                let missing: Vec<&i64> = want.difference(&got).take(10).collect();
                if !missing.is_empty() {
                    return Err(format!(
                        "{pod} lacks {} acknowledged rows, e.g. {missing:?}",
                        want.difference(&got).count()
                    ));
                }
                match &first {
                    Some(f) if *f != got => {
                        return Err(format!("{pod} has {} rows, not {}", got.len(), f.len()));
                    }
                    _ => first = Some(got),
                }
            }
            Ok(())
        },
    )
    .await;
}

/// A client inserting numbered rows (from `first + 1` up) at one node in
/// a loop, as fast as it is answered; it records what was acknowledged
/// and stops at the first error (the node died), saying which.
fn start_writer(ip: Ipv4Addr, password: String, first: i64) -> AckedWriter<i64> {
    AckedWriter::spawn(WAIT, move |stop, acked| async move {
        let mut c = match mariadb_connect(ip, &password).await {
            Ok(c) => c,
            Err(e) => return e,
        };
        let mut n = first;
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            let insert = c.exec_drop("INSERT INTO app.rows_acked (n) VALUES (?)", (n,));
            match tokio::time::timeout(Duration::from_secs(10), insert).await {
                Ok(Ok(())) => acked.lock().unwrap().push(n),
                Ok(Err(e)) => return format!("insert {n}: {e}"),
                Err(_) => return format!("insert {n} timed out"),
            }
        }
        "stopped".into()
    })
}

/// How many times a pod's manager started its server with
/// `--wsrep-new-cluster` (its log covers every start of the pod).
fn bootstraps_in_log(kubelet: &Kubelet, pod: &str) -> usize {
    kubelet
        .manager_log(pod)
        .matches("bootstrapping a new primary component (--wsrep-new-cluster), as ordered")
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pxc_cluster_bootstraps_refuses_a_bad_force_and_recovers_a_full_crash() {
    require_galera();
    let t0 = Instant::now();
    // In-process, with the production timeout: a debug-built manager
    // asking a loaded mariadbd for its status can take longer than the
    // tests' 500 ms.
    let db = DbCluster::create("e2e-pxc", &simple_galera(), Operator::InProcess).await;
    let (client, ns, api, kubelet) = (&db.client, &db.ns, &db.api, &db.kubelet);

    // 1. A new group: bootstrapped once by the controller's order.
    let status = wait_status(api, "Healthy with 3 Synced members", START, healthy).await;
    let first = wait_event(client, ns, None, "Bootstrapped", "the new group is Primary").await;
    let decided = with_reason(&first, "BootstrapDecided");
    assert_eq!(decided.len(), 1, "one bootstrap decision: {first:#?}");
    assert!(
        decided[0].contains("no member has Galera state: bootstrapping a new cluster"),
        "{first:#?}"
    );
    for pod in pod_names() {
        wait_event(
            client,
            ns,
            None,
            "MemberJoined",
            &format!("{pod} is Synced"),
        )
        .await;
    }
    assert_eq!(
        pod_names()
            .iter()
            .map(|p| bootstraps_in_log(kubelet, p))
            .sum::<usize>(),
        1,
        "one member started with --wsrep-new-cluster\n{}",
        kubelet.logs()
    );
    let uuid = status["instancesStatus"][0]["wsrep"]["clusterUuid"]
        .as_str()
        .unwrap()
        .to_string();
    for i in status["instancesStatus"].as_array().unwrap() {
        assert_eq!(i["wsrep"]["clusterUuid"], uuid.as_str(), "{status}");
        assert!(i["wsrep"]["flowControlPaused"].is_number(), "{status}");
    }
    let password = db.secret("root-password").await;
    let writer = eventually("a ready writer behind -rw", WAIT, || writer_pod(client, ns)).await;
    let mut c = mariadb_connect(kubelet.pod_ip(&writer), &password)
        .await
        .unwrap();
    c.query_drop(
        "CREATE DATABASE app;
         CREATE TABLE app.rows_acked (n BIGINT PRIMARY KEY) ENGINE=InnoDB;
         INSERT INTO app.rows_acked (n) SELECT seq FROM app.seq_1_to_100",
    )
    .await
    .unwrap();
    c.disconnect().await.unwrap();
    let mut acked: BTreeSet<i64> = (1..=100).collect();
    every_node_has(kubelet, &password, &acked).await;
    eprintln!(
        "(1) healthy, writer {writer}, {:.1}s",
        t0.elapsed().as_secs_f64()
    );

    // 2. forceBootstrapFrom naming a missing instance: refused, the
    // cluster untouched.
    let sts_api: Api<StatefulSet> = Api::namespaced(client.clone(), ns);
    let sts_before = sts_api.get(CLUSTER).await.unwrap();
    let pods_api: Api<Pod> = Api::namespaced(client.clone(), ns);
    let uids_before: Vec<Option<String>> = {
        let mut v = Vec::new();
        for p in pod_names() {
            v.push(pods_api.get(&p).await.unwrap().metadata.uid);
        }
        v
    };
    let refused_at = Timestamp::now();
    let force = |value: Value| {
        json!({"apiVersion": "stratum.dev/v1alpha1", "kind": "PxcCluster",
               "spec": {"bootstrap": {"forceBootstrapFrom": value}}})
    };
    api.patch(
        CLUSTER,
        &PatchParams::default(),
        &Patch::Merge(force(json!(format!("{CLUSTER}-7")))),
    )
    .await
    .unwrap_or_else(|e| panic!("the API server accepts the field: {}", api_message(&e)));
    let refused = wait_status(api, "the force refused", WAIT, |s| {
        s["phase"] == "Failed"
            && condition(s, "Degraded").is_some_and(|c| {
                c["reason"] == "InvalidSpec"
                    && c["message"]
                        .as_str()
                        .is_some_and(|m| m.contains("spec.bootstrap.forceBootstrapFrom"))
            })
    })
    .await;
    let message = condition(&refused, "Degraded").unwrap()["message"].clone();
    assert!(
        message.as_str().unwrap().contains(&format!("{CLUSTER}-7")),
        "{message}"
    );
    wait_event(
        client,
        ns,
        Some(refused_at),
        "InvalidSpec",
        "forceBootstrapFrom",
    )
    .await;
    // Untouched: the StatefulSet as it was, the same pods ready, the same
    // processes, no order sent, and writes go on.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let sts_after = sts_api.get(CLUSTER).await.unwrap();
    assert_eq!(
        sts_after.metadata.resource_version, sts_before.metadata.resource_version,
        "the StatefulSet was not changed"
    );
    for (p, uid) in pod_names().iter().zip(&uids_before) {
        let pod = pods_api.get(p).await.unwrap();
        assert_eq!(&pod.metadata.uid, uid, "{p} is the same pod");
        assert!(kubelet.is_running(p), "{p} runs");
    }
    let mut c = mariadb_connect(kubelet.pod_ip(&writer), &password)
        .await
        .unwrap();
    c.query_drop("INSERT INTO app.rows_acked (n) VALUES (101)")
        .await
        .unwrap();
    c.disconnect().await.unwrap();
    acked.insert(101);
    let meanwhile = texts(&events(client, ns).await, Some(refused_at));
    assert!(
        with_reason(&meanwhile, "BootstrapOrdered").is_empty()
            && with_reason(&meanwhile, "BootstrapDecided").is_empty(),
        "no bootstrap while the spec is refused: {meanwhile:#?}"
    );
    api.patch(
        CLUSTER,
        &PatchParams::default(),
        &Patch::Merge(force(Value::Null)),
    )
    .await
    .unwrap();
    wait_status(api, "Healthy again with the field removed", WAIT, healthy).await;
    eprintln!(
        "(2) refused and untouched, {:.1}s",
        t0.elapsed().as_secs_f64()
    );

    // 3. A full crash. A member other than the writer dies first and
    // falls behind while writes go on at the writer.
    let status = wait_status(api, "Healthy before the crash", WAIT, healthy).await;
    let seqno_before = status["instancesStatus"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i["wsrep"]["seqno"].as_i64())
        .max()
        .unwrap();
    let writer = writer_pod(client, ns).await.unwrap();
    let behind = pod_names().into_iter().find(|p| *p != writer).unwrap();
    let load = start_writer(kubelet.pod_ip(&writer), password.clone(), 1000);
    load.wait_more(100, "writes before the crash").await;
    kubelet.crash(&behind);
    load.wait_more(100, &format!("writes after {behind} died"))
        .await;
    // Then the other two, at once, under load.
    let crash_at = Timestamp::now();
    for p in pod_names().iter().filter(|p| **p != behind) {
        kubelet.crash(p);
    }
    let (rows, end) = load.stop_with_reason().await;
    eprintln!(
        "(3) crashed with {} rows acknowledged during the load (writer ended: {end})",
        rows.len()
    );
    acked.extend(rows);
    let t_crash = Instant::now();
    for p in pod_names() {
        kubelet.recover(&p);
    }
    // The decision is recorded in status before the order.
    let pending = wait_status(api, "a bootstrap decided", RECOVER, |s| {
        s.get("bootstrap").is_some()
    })
    .await;
    let member = pending["bootstrap"]["instance"]
        .as_str()
        .unwrap()
        .to_string();
    eprintln!("decided: {}", pending["bootstrap"]);
    let after = wait_status(api, "Healthy after the full crash", RECOVER, healthy).await;
    eprintln!(
        "(3) recovered: Healthy {:.1}s after the pods came back",
        t_crash.elapsed().as_secs_f64()
    );
    let since = wait_event(
        client,
        ns,
        Some(crash_at),
        "Bootstrapped",
        &format!("the group is Primary again: bootstrapped from {member}"),
    )
    .await;
    eprintln!("Events since the crash:\n{}", since.join("\n"));

    // The most advanced member only: never the one behind, one decision,
    // every order to it, one more --wsrep-new-cluster start, on it.
    assert_ne!(
        member, behind,
        "bootstrapped from {behind}, which was behind"
    );
    let decided = with_reason(&since, "BootstrapDecided");
    assert_eq!(decided.len(), 1, "one decision: {since:#?}");
    assert!(!decided[0].contains(" [x"), "decided once: {since:#?}");
    assert!(
        decided[0].starts_with(&format!(
            "BootstrapDecided: bootstrap from {member} (position {uuid}:"
        )) && decided[0].contains("highest recovered seqno"),
        "{since:#?}"
    );
    let orders = with_reason(&since, "BootstrapOrdered");
    assert!(!orders.is_empty(), "{since:#?}");
    for o in &orders {
        assert!(
            o.starts_with(&format!("BootstrapOrdered: {member} ordered")),
            "an order to another member than {member}: {since:#?}"
        );
    }
    assert!(!with_reason(&since, "MemberLeft").is_empty(), "{since:#?}");
    // Sent in the background after the status write that saw it Synced.
    wait_event(
        client,
        ns,
        Some(crash_at),
        "MemberJoined",
        &format!("{behind} is Synced"),
    )
    .await;
    let new_cluster_starts: Vec<usize> = pod_names()
        .iter()
        .map(|p| bootstraps_in_log(kubelet, p))
        .collect();
    assert_eq!(
        new_cluster_starts.iter().sum::<usize>(),
        2,
        "one bootstrap at creation, one after the crash: {new_cluster_starts:?}\n{}",
        kubelet.logs()
    );
    assert!(
        bootstraps_in_log(kubelet, &member) >= 1,
        "{member} bootstrapped\n{}",
        kubelet.logs()
    );

    // Nothing acknowledged is lost; the history goes on.
    every_node_has(kubelet, &password, &acked).await;
    for p in pod_names() {
        let ip = kubelet.pod_ip(&p);
        assert_eq!(
            wsrep(ip, &password, "wsrep_cluster_state_uuid")
                .await
                .unwrap(),
            uuid,
            "{p} is in the same cluster"
        );
    }
    let seqno_after: i64 = wsrep(kubelet.pod_ip(&member), &password, "wsrep_last_committed")
        .await
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        seqno_after > seqno_before + 200,
        "seqno went from {seqno_before} to {seqno_after}"
    );
    for i in after["instancesStatus"].as_array().unwrap() {
        assert_eq!(i["wsrep"]["clusterUuid"], uuid.as_str(), "{after}");
    }
    assert_no_failures(client, ns).await;
    eprintln!(
        "all {} acknowledged rows on every node; test took {:.1}s",
        acked.len(),
        t0.elapsed().as_secs_f64()
    );
}
