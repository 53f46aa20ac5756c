//! Rolling updates on Kubernetes (`updateStrategy: SmartUpdate`, the
//! default), end to end: the operator (the `stratum controller` binary,
//! watching the test's namespace) on a real control plane, real
//! PostgreSQL 15 / MariaDB Galera in the pods run by the fake kubelet of
//! `tests/support/kubelet.rs`. The pod template is changed the way a user
//! changes it (`spec.resources`), so the StatefulSet gets a new
//! `updateRevision` and the operator replaces the pods:
//!
//! - PostgreSQL, under a writer in synchronous mode through `-rw`: every
//!   pod recreated from the new revision, one at a time, the replicas
//!   first (highest ordinal first), the primary last after a switchover;
//!   never two ready primaries, every acknowledged row there, Healthy at
//!   the end; then a scale-down from 3 to 2 with the primary on the
//!   removed ordinal: switched over to a kept replica first;
//! - PostgreSQL with `primaryUpdateMethod: restart`: the primary's pod is
//!   recreated in place, last, without a failover (same primary, same
//!   lease term), under a writer;
//! - PostgreSQL with `primaryUpdateStrategy: supervised`: the replicas
//!   roll, the primary waits (phase `Upgrading`, `Progressing` reason
//!   `WaitingForUser`) until the user switches over;
//! - Galera (`PxcCluster`): one member at a time, each Synced again before
//!   the next, the writer last, every acknowledged row on every node.
//!
//! Uses the control plane of `STRATUM_TEST_KUBECONFIG`, or starts one for
//! this binary (scripts/control-plane.sh); fails when it cannot, or when
//! PostgreSQL 15 or MariaDB Galera is not installed.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};
use mysql_async::prelude::*;
use operator_core::engine::InstanceOps;
use operator_core::instance::protocol::Role;
use serde_json::{Value, json};
use support::k8s_db::{
    AckedWriter, DbCluster, Operator, all_rows_present, condition, galera_cr, mariadb_connect,
    patch_spec, pg_cr_synchronous, pg_writer, request_switchover, require_galera, require_postgres,
    rw_ip, wait_status,
};
use support::kubelet::Kubelet;
use support::*;

/// First boot: initdb and two pg_basebackups (or a Galera group with two
/// SST joiners), one pod after the other, on 2 shared cores.
const START: Duration = Duration::from_secs(300);
/// A whole rolling update: three pods recreated and caught up, one
/// switchover.
const ROLL: Duration = Duration::from_secs(300);
const WAIT: Duration = Duration::from_secs(90);
/// Between two inserts of a writer.
const PAUSE: Duration = Duration::from_millis(10);

fn names(cluster: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{cluster}-{i}")).collect()
}

/// Three instances, synchronous (`ANY 1`): an acknowledged commit is on a
/// replica too.
fn roll_pg(name: &str, supervised: bool) -> Value {
    roll_pg_with(name, supervised, "switchover")
}

fn roll_pg_with(name: &str, supervised: bool, method: &str) -> Value {
    let mut cr = pg_cr_synchronous(name);
    cr["spec"]["primaryUpdateStrategy"] = json!(if supervised {
        "supervised"
    } else {
        "unsupervised"
    });
    cr["spec"]["primaryUpdateMethod"] = json!(method);
    cr
}

/// The change that lands in the pod template: container resources (the
/// fake Nodes have room; the fake kubelet does not enforce them).
fn resources_patch() -> Value {
    json!({"resources": {"requests": {"cpu": "10m", "memory": "64Mi"}}})
}

/// The StatefulSet's update revision once its controller observed the
/// current generation, and the pods' revisions.
async fn revisions(
    client: &Client,
    ns: &str,
    cluster: &str,
) -> (Option<String>, BTreeMap<String, String>) {
    let sts = Api::<StatefulSet>::namespaced(client.clone(), ns)
        .get(cluster)
        .await
        .unwrap_or_else(|e| panic!("StatefulSet {cluster}: {}", api_message(&e)));
    let status = sts.status.unwrap_or_default();
    let update = (status.observed_generation == sts.metadata.generation)
        .then_some(status.update_revision)
        .flatten();
    let pods = Api::<Pod>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(&format!(
            "{}={cluster}",
            operator_core::build::LABEL_CLUSTER
        )))
        .await
        .unwrap()
        .items;
    let pods = pods
        .iter()
        .filter_map(|p| {
            Some((
                p.name_any(),
                p.labels().get("controller-revision-hash")?.clone(),
            ))
        })
        .collect();
    (update, pods)
}

/// Watches the cluster's pods every 200 ms: the order in which pods were
/// first replaced (a new UID), and the most pods missing or terminating
/// at one time.
struct PodMonitor {
    stop: Arc<AtomicBool>,
    order: Arc<Mutex<Vec<String>>>,
    most_away: Arc<Mutex<usize>>,
    task: tokio::task::JoinHandle<()>,
}

impl PodMonitor {
    async fn start(client: &Client, ns: &str, pods: Vec<String>) -> Self {
        let api = Api::<Pod>::namespaced(client.clone(), ns);
        let mut first: BTreeMap<String, String> = BTreeMap::new();
        for p in &pods {
            let pod = api.get(p).await.unwrap();
            first.insert(p.clone(), pod.uid().unwrap());
        }
        let stop = Arc::new(AtomicBool::new(false));
        let order: Arc<Mutex<Vec<String>>> = Arc::default();
        let most_away: Arc<Mutex<usize>> = Arc::default();
        let (s, o, m) = (stop.clone(), order.clone(), most_away.clone());
        let task = tokio::spawn(async move {
            while !s.load(Ordering::SeqCst) {
                let mut away = 0;
                for p in &pods {
                    match api.get_opt(p).await {
                        Ok(Some(pod)) => {
                            if pod.metadata.deletion_timestamp.is_some() {
                                away += 1;
                            }
                            let uid = pod.uid().unwrap_or_default();
                            if first[p] != uid {
                                let mut o = o.lock().unwrap();
                                if !o.contains(p) {
                                    o.push(p.clone());
                                }
                            }
                        }
                        Ok(None) => away += 1,
                        Err(_) => {}
                    }
                }
                {
                    let mut m = m.lock().unwrap();
                    *m = (*m).max(away);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        Self {
            stop,
            order,
            most_away,
            task,
        }
    }

    fn order(&self) -> Vec<String> {
        self.order.lock().unwrap().clone()
    }

    async fn stop(self) -> (Vec<String>, usize) {
        self.stop.store(true, Ordering::SeqCst);
        let order = self.order();
        let most = *self.most_away.lock().unwrap();
        let _ = self.task.await;
        (order, most)
    }
}

// ---------------------------------------------------------------------
// PostgreSQL
// ---------------------------------------------------------------------

/// Samples every manager's role every 200 ms; records any moment when
/// two members were ready primaries at once.
struct PrimaryMonitor {
    stop: Arc<AtomicBool>,
    two: Arc<Mutex<Vec<Vec<String>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl PrimaryMonitor {
    fn start(kubelet: &Kubelet, pods: Vec<String>) -> Self {
        let ops = kubelet.instance_client();
        let stop = Arc::new(AtomicBool::new(false));
        let two: Arc<Mutex<Vec<Vec<String>>>> = Arc::default();
        let (s, t) = (stop.clone(), two.clone());
        let task = tokio::spawn(async move {
            while !s.load(Ordering::SeqCst) {
                let mut primaries = Vec::new();
                for p in &pods {
                    if let Ok(st) = ops.status(p).await
                        && st.role == Role::Primary
                        && st.ready
                    {
                        primaries.push(p.clone());
                    }
                }
                if primaries.len() > 1 {
                    t.lock().unwrap().push(primaries);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        Self { stop, two, task }
    }

    async fn stop(self) -> Vec<Vec<String>> {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.task.await;
        self.two.lock().unwrap().clone()
    }
}

fn reasons(events: &[k8s_openapi::api::events::v1::Event]) -> Vec<String> {
    events
        .iter()
        .map(|e| {
            format!(
                "{}: {}",
                e.reason.as_deref().unwrap_or_default(),
                e.note.as_deref().unwrap_or_default()
            )
        })
        .collect()
}

/// Whether one of `events` (as [`reasons`] gives them) starts with
/// `prefix`.
fn has_event(events: &[String], prefix: &str) -> bool {
    events.iter().any(|e| e.starts_with(prefix))
}

fn healthy(s: &Value, n: usize) -> bool {
    s["phase"] == "Healthy"
        && s["ready"] == format!("{n}/{n}")
        && s.get("primaryChange").is_none()
        && s["currentPrimary"].is_string()
        && s["currentPrimary"] == s["targetPrimary"]
}

/// What a PostgreSQL rolling update is watched with: a writer through
/// `-rw` (20 writes acknowledged before the update), the managers' roles
/// ([`PrimaryMonitor`]) and the pods' replacements ([`PodMonitor`]).
struct PgRollWatch {
    writer: AckedWriter<i32>,
    primaries: PrimaryMonitor,
    monitor: PodMonitor,
}

impl PgRollWatch {
    async fn start(s: &PgSetup, pods: &[String]) -> Self {
        let writer = pg_writer(&s.db, &s.password, 1, PAUSE, WAIT);
        writer.wait_more(20, "writes before the update").await;
        let primaries = PrimaryMonitor::start(&s.db.kubelet, pods.to_vec());
        let monitor = PodMonitor::start(&s.db.client, &s.db.ns, pods.to_vec()).await;
        Self {
            writer,
            primaries,
            monitor,
        }
    }

    /// After 20 more writes: the order pods were replaced in, the most
    /// away at once, the moments with two ready primaries, and the
    /// acknowledged ids.
    async fn stop(self) -> (Vec<String>, usize, Vec<Vec<String>>, Vec<i32>) {
        self.writer.wait_more(20, "writes after the update").await;
        let (order, most_away) = self.monitor.stop().await;
        let two = self.primaries.stop().await;
        let acked = self.writer.stop().await;
        (order, most_away, two, acked)
    }
}

/// A Healthy 3-instance PostgreSQL cluster with the table `t`.
struct PgSetup {
    db: DbCluster,
    password: String,
}

async fn pg_setup(prefix: &str, cluster: &str, supervised: bool) -> PgSetup {
    pg_setup_with(prefix, roll_pg(cluster, supervised)).await
}

async fn pg_setup_with(prefix: &str, cr: Value) -> PgSetup {
    require_postgres();
    let db = DbCluster::create(prefix, &cr, Operator::Process).await;
    let first = format!("{}-0", db.name);
    db.wait_status("phase Healthy", START, |s| {
        healthy(s, 3) && s["currentPrimary"] == first
    })
    .await;
    let password = db.secret("app-password").await;
    db.pg_create_table_t(&password, WAIT).await;
    PgSetup { db, password }
}

/// Every pod runs the StatefulSet's update revision.
async fn all_pods_updated(client: &Client, ns: &str, cluster: &str, n: usize) {
    eventually("every pod on the update revision", WAIT, || async {
        let (update, pods) = revisions(client, ns, cluster).await;
        let update = update.ok_or("no update revision yet")?;
        if pods.len() == n && pods.values().all(|r| *r == update) {
            Ok(())
        } else {
            Err(format!("update revision {update}, pods {pods:?}"))
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_rolls_replicas_first_then_the_primary_after_a_switchover() {
    const C: &str = "roll-pg";
    let s = pg_setup("pg-roll", C, false).await;
    let (client, ns, api) = (&s.db.client, &s.db.ns, &s.db.api);
    let pods = names(C, 3);
    let (before, _) = revisions(client, ns, C).await;

    let watch = PgRollWatch::start(&s, &pods).await;

    patch_spec(api, C, &resources_patch()).await;
    // Phase Upgrading with the progress line while it rolls.
    let upgrading = wait_status(api, C, "phase Upgrading", WAIT, |s| {
        s["phase"] == "Upgrading"
    })
    .await;
    let reason = upgrading["phaseReason"].as_str().unwrap_or_default();
    assert!(reason.starts_with("Rolling update: "), "{upgrading}");
    let progressing = condition(&upgrading, "Progressing").unwrap();
    assert_eq!(progressing["status"], "True", "{upgrading}");
    assert_eq!(progressing["reason"], "RollingUpdate", "{upgrading}");

    let status = wait_status(api, C, "Healthy after the rolling update", ROLL, |s| {
        healthy(s, 3) && s["currentPrimary"] != "roll-pg-0"
    })
    .await;
    all_pods_updated(client, ns, C, 3).await;
    let (after, _) = revisions(client, ns, C).await;
    assert_ne!(before, after, "the template change made a new revision");
    let (order, most_away, two, acked) = watch.stop().await;

    let events = reasons(&events_about(client, ns, C).await);
    eprintln!("events:\n{}", events.join("\n"));
    eprintln!("replaced in order {order:?}; status {status}");
    assert_eq!(
        order,
        ["roll-pg-2", "roll-pg-1", "roll-pg-0"],
        "replicas first (highest ordinal first), the old primary last"
    );
    assert!(most_away <= 1, "{most_away} pods away at once");
    assert!(two.is_empty(), "two ready primaries at once: {two:?}");
    all_rows_present(&s.db, &s.password, &acked, WAIT).await;
    eprintln!("{} acknowledged rows, none lost", acked.len());
    let has = |prefix: &str| has_event(&events, prefix);
    for want in [
        "RollingUpdateStarted: ",
        "SwitchoverForUpdate: every replica is updated; switching over from roll-pg-0",
        "SwitchoverStarted: ",
        "InstanceUpdated: roll-pg-2",
        "InstanceUpdated: roll-pg-1",
        "InstanceUpdated: roll-pg-0",
        "RollingUpdateDone: ",
    ] {
        assert!(has(want), "no Event {want:?}: {events:#?}");
    }
    assert!(
        !has("FailoverStarted"),
        "a rolling update never fails over: {events:#?}"
    );
    let progressing = condition(&status, "Progressing").unwrap();
    assert_eq!(progressing["status"], "False", "{status}");

    // (d) Scale 3 → 2 with the primary on the removed ordinal: switched
    // over to a kept replica first, then the StatefulSet shrinks.
    let primary = status["currentPrimary"].as_str().unwrap().to_string();
    if primary != "roll-pg-2" {
        request_switchover(api, C, "roll-pg-2").await;
        wait_status(api, C, "roll-pg-2 primary", WAIT, |s| {
            healthy(s, 3) && s["currentPrimary"] == "roll-pg-2"
        })
        .await;
    }
    let writer = pg_writer(&s.db, &s.password, 1_000_000, PAUSE, WAIT);
    writer.wait_more(20, "writes before the scale-down").await;
    patch_spec(api, C, &json!({"instances": 2})).await;
    let status = wait_status(api, C, "Healthy with 2 instances", ROLL, |s| {
        healthy(s, 2) && s["instances"] == 2
    })
    .await;
    let new_primary = status["currentPrimary"].as_str().unwrap().to_string();
    assert!(
        ["roll-pg-0", "roll-pg-1"].contains(&new_primary.as_str()),
        "{status}"
    );
    eventually("roll-pg-2 removed", WAIT, || async {
        match Api::<Pod>::namespaced(client.clone(), ns)
            .get_opt("roll-pg-2")
            .await
        {
            Ok(None) => Ok(()),
            other => Err(format!("{:?}", other.map(|p| p.map(|p| p.name_any())))),
        }
    })
    .await;
    writer.wait_more(20, "writes after the scale-down").await;
    let acked = writer.stop().await;
    all_rows_present(&s.db, &s.password, &acked, WAIT).await;
    let events = reasons(&events_about(client, ns, C).await);
    assert!(
        has_event(
            &events,
            "SwitchoverForScaleDown: scaling down to 2 removes the primary roll-pg-2"
        ),
        "{events:#?}"
    );
    assert!(!has_event(&events, "FailoverStarted"), "{events:#?}");
    assert_no_failures(client, ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn supervised_primary_waits_for_the_users_switchover() {
    const C: &str = "sup-pg";
    let s = pg_setup("pg-roll-sup", C, true).await;
    let (client, ns, api) = (&s.db.client, &s.db.ns, &s.db.api);
    let pods = names(C, 3);
    let monitor = PodMonitor::start(client, ns, pods.clone()).await;
    patch_spec(api, C, &resources_patch()).await;

    let status = wait_status(api, C, "waiting for the user", ROLL, |s| {
        condition(s, "Progressing").is_some_and(|c| c["reason"] == "WaitingForUser")
    })
    .await;
    assert_eq!(status["phase"], "Upgrading", "{status}");
    let message = condition(&status, "Progressing").unwrap()["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        message.contains("2 of 3 instances updated")
            && message
                .contains("waiting for the user to request a switchover of the primary sup-pg-0"),
        "{message}"
    );
    // It stays there: the primary's pod is not replaced.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(monitor.order(), ["sup-pg-2", "sup-pg-1"]);
    let still = api.get(C).await.unwrap().data["status"].clone();
    assert_eq!(still["currentPrimary"], "sup-pg-0", "{still}");
    assert_eq!(still["phase"], "Upgrading", "{still}");

    // The user switches over: the old primary, now a replica, is updated.
    request_switchover(api, C, "sup-pg-1").await;
    wait_status(api, C, "Healthy on sup-pg-1, all updated", ROLL, |s| {
        healthy(s, 3)
            && s["currentPrimary"] == "sup-pg-1"
            && condition(s, "Progressing").is_some_and(|c| c["status"] == "False")
    })
    .await;
    all_pods_updated(client, ns, C, 3).await;
    let (order, most_away) = monitor.stop().await;
    assert_eq!(order, ["sup-pg-2", "sup-pg-1", "sup-pg-0"]);
    assert!(most_away <= 1, "{most_away} pods away at once");
    let events = reasons(&events_about(client, ns, C).await);
    assert!(has_event(&events, "WaitingForUser: "), "{events:#?}");
    assert!(!has_event(&events, "SwitchoverForUpdate"), "{events:#?}");
    assert_no_failures(client, ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_method_recreates_the_primary_in_place_without_a_failover() {
    const C: &str = "rst-pg";
    let s = pg_setup_with("pg-roll-rst", roll_pg_with(C, false, "restart")).await;
    let (client, ns, api) = (&s.db.client, &s.db.ns, &s.db.api);
    let pods = names(C, 3);
    let watch = PgRollWatch::start(&s, &pods).await;
    patch_spec(api, C, &resources_patch()).await;
    wait_status(api, C, "phase Upgrading", WAIT, |s| {
        s["phase"] == "Upgrading"
    })
    .await;
    let status = wait_status(api, C, "Healthy after the rolling update", ROLL, |s| {
        healthy(s, 3)
            && condition(s, "Progressing").is_some_and(|c| c["status"] == "False")
            && s["instancesStatus"]
                .as_array()
                .is_some_and(|is| is.iter().all(|i| i["ready"] == true))
    })
    .await;
    all_pods_updated(client, ns, C, 3).await;
    let (order, most_away, two, acked) = watch.stop().await;
    let events = reasons(&events_about(client, ns, C).await);
    eprintln!("events:\n{}", events.join("\n"));
    assert_eq!(order, ["rst-pg-2", "rst-pg-1", "rst-pg-0"]);
    assert!(most_away <= 1, "{most_away} pods away at once");
    assert!(two.is_empty(), "two ready primaries at once: {two:?}");
    // The same primary, the same lease term: recreated in place, no
    // failover, no switchover.
    assert_eq!(status["currentPrimary"], "rst-pg-0", "{status}");
    assert_eq!(status["leaseTerm"], 1, "{status}");
    for never in [
        "FailoverStarted",
        "SwitchoverStarted",
        "SwitchoverForUpdate",
    ] {
        assert!(!has_event(&events, never), "{never}: {events:#?}");
    }
    assert!(
        events
            .iter()
            .any(|e| e.starts_with("RollingUpdate: deleted pod rst-pg-0 (primary)")),
        "{events:#?}"
    );
    all_rows_present(&s.db, &s.password, &acked, WAIT).await;
    eprintln!("{} acknowledged rows, none lost", acked.len());
    assert_no_failures(client, ns).await;
}

// ---------------------------------------------------------------------
// Galera
// ---------------------------------------------------------------------

const GX: &str = "roll-galera";

fn roll_galera() -> Value {
    galera_cr(
        GX,
        3,
        "[mysqld]\ninnodb_buffer_pool_size = 64M\nmax_connections = 100\n",
    )
}

fn galera_healthy(s: &Value) -> bool {
    s["phase"] == "Healthy"
        && s["ready"] == "3/3"
        && s["instancesStatus"].as_array().is_some_and(|is| {
            is.len() == 3
                && is
                    .iter()
                    .all(|i| i["wsrep"]["state"] == "Synced" && i["wsrep"]["clusterSize"] == 3)
        })
}

/// Inserts numbered rows at whatever `-rw` selects, reconnecting after
/// any error; keeps the acknowledged ones.
fn galera_writer(db: &DbCluster, password: &str) -> AckedWriter<i64> {
    let (client, ns, password) = (db.client.clone(), db.ns.clone(), password.to_string());
    AckedWriter::spawn(WAIT, move |stop, acked| async move {
        let mut n = 0i64;
        while !stop.load(Ordering::SeqCst) {
            let Ok(ip) = rw_ip(&client, &ns, GX).await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let Ok(mut c) = mariadb_connect(ip, &password).await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                let insert = c.exec_drop("INSERT INTO app.rows_acked (n) VALUES (?)", (n,));
                match tokio::time::timeout(Duration::from_secs(10), insert).await {
                    Ok(Ok(())) => acked.lock().unwrap().push(n),
                    _ => break,
                }
                tokio::time::sleep(PAUSE).await;
            }
        }
        "stopped".into()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn galera_rolls_one_member_at_a_time_writer_last() {
    require_galera();
    let db = DbCluster::create("pxc-roll", &roll_galera(), Operator::Process).await;
    let (client, ns, api, kubelet) = (&db.client, &db.ns, &db.api, &db.kubelet);
    db.wait_status("Healthy with 3 Synced members", START, galera_healthy)
        .await;
    let password = db.secret("root-password").await;
    let ip = db.wait_rw_ip(WAIT).await;
    // The writer: the member the bootstrap made writer (the label stays
    // where it is); it is updated last.
    let writer_pod = names(GX, 3)
        .into_iter()
        .find(|p| kubelet.pod_ip(p) == ip)
        .expect("-rw selects a member");
    let mut c = mariadb_connect(ip, &password).await.unwrap();
    c.query_drop("CREATE DATABASE IF NOT EXISTS app")
        .await
        .unwrap();
    c.query_drop("CREATE TABLE app.rows_acked (n BIGINT PRIMARY KEY)")
        .await
        .unwrap();
    drop(c);

    let writer = galera_writer(&db, &password);
    writer.wait_more(20, "writes before the update").await;
    let pods = names(GX, 3);
    let monitor = PodMonitor::start(client, ns, pods.clone()).await;
    patch_spec(api, GX, &resources_patch()).await;
    wait_status(api, GX, "phase Upgrading", WAIT, |s| {
        s["phase"] == "Upgrading"
    })
    .await;
    wait_status(api, GX, "Healthy after the rolling update", ROLL, |s| {
        galera_healthy(s) && condition(s, "Progressing").is_some_and(|c| c["status"] == "False")
    })
    .await;
    all_pods_updated(client, ns, GX, 3).await;
    writer.wait_more(20, "writes after the update").await;
    let (order, most_away) = monitor.stop().await;
    let acked: BTreeSet<i64> = writer.stop().await.into_iter().collect();
    let events = reasons(&events_about(client, ns, GX).await);
    eprintln!("events:\n{}", events.join("\n"));
    // One at a time, each a member that was not the writer then, the
    // highest ordinal first, the writer last. (The writer label may move
    // while a member leaves the group and stays where it moved: the
    // writer is whoever holds it when the last one is due.)
    let first = names(GX, 3)
        .into_iter()
        .rev()
        .find(|p| *p != writer_pod)
        .unwrap();
    assert_eq!(order.len(), 3, "{order:?}");
    assert_eq!(order[0], first, "{order:?}; writer at first {writer_pod}");
    assert!(most_away <= 1, "{most_away} members away at once");
    let deleted = |pod: &str, role: &str| {
        let prefix = format!("RollingUpdate: deleted pod {pod} ({role})");
        has_event(&events, &prefix)
    };
    // The writer of the moment is never taken down before the last step
    // (which is the writer unless the label moved to an updated member).
    assert!(deleted(&order[0], "member"), "{events:#?}");
    assert!(deleted(&order[1], "member"), "{events:#?}");
    assert!(
        deleted(&order[2], "writer") || deleted(&order[2], "member"),
        "{events:#?}"
    );
    for want in [
        format!("InstanceUpdated: {}", order[0]),
        format!("InstanceUpdated: {}", order[2]),
        "RollingUpdateDone: ".to_string(),
    ] {
        assert!(has_event(&events, &want), "no Event {want:?}: {events:#?}");
    }
    // Every acknowledged row on every node.
    eventually(
        &format!("the {} acknowledged rows on every node", acked.len()),
        WAIT,
        || async {
            for pod in &pods {
                let mut c = mariadb_connect(kubelet.pod_ip(pod), &password).await?;
                let rows: Vec<i64> = c
                    .query("SELECT n FROM app.rows_acked")
                    .await
                    .map_err(|e| format!("{pod}: {e}"))?;
                let got: BTreeSet<i64> = rows.into_iter().collect();
                let missing = acked.difference(&got).count();
                if missing > 0 {
                    return Err(format!("{pod} lacks {missing} acknowledged rows"));
                }
            }
            Ok(())
        },
    )
    .await;
    eprintln!("{} acknowledged rows on every node", acked.len());
    assert_no_failures(client, ns).await;
}
