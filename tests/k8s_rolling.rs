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
use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use mysql_async::prelude::*;
use operator_core::engine::InstanceOps;
use operator_core::instance::protocol::Role;
use serde_json::{Value, json};
use support::kubelet::{self, Kubelet, service_ips};
use support::*;

/// First boot: initdb and two pg_basebackups (or a Galera group with two
/// SST joiners), one pod after the other, on 2 shared cores.
const START: Duration = Duration::from_secs(300);
/// A whole rolling update: three pods recreated and caught up, one
/// switchover.
const ROLL: Duration = Duration::from_secs(300);
const WAIT: Duration = Duration::from_secs(90);
const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

fn require_postgres() {
    assert!(
        Path::new(PG_BIN).join("postgres").is_file(),
        "PostgreSQL 15 not found in {PG_BIN}: install postgresql-15 (scripts/setup.sh; Debian: apt-get install postgresql-15)"
    );
}

fn require_galera() {
    for (path, package) in [
        ("/usr/sbin/mariadbd", "mariadb-server"),
        ("/usr/lib/galera/libgalera_smm.so", "galera-4"),
        ("/usr/bin/rsync", "rsync"),
    ] {
        assert!(
            Path::new(path).exists(),
            "{path} is required: install the Debian package {package} (scripts/setup.sh installs mariadb-server galera-4 mariadb-backup rsync)"
        );
    }
}

fn names(cluster: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{cluster}-{i}")).collect()
}

/// Three instances, synchronous (`ANY 1`): an acknowledged commit is on a
/// replica too.
fn roll_pg(name: &str, supervised: bool) -> Value {
    roll_pg_with(name, supervised, "switchover")
}

fn roll_pg_with(name: &str, supervised: bool, method: &str) -> Value {
    json!({
        "apiVersion": "stratum.dev/v1alpha1",
        "kind": "PostgresCluster",
        "metadata": {"name": name},
        "spec": {
            "instances": 3,
            "version": 15,
            "storage": {"size": "1Gi"},
            "primaryUpdateStrategy": if supervised { "supervised" } else { "unsupervised" },
            "primaryUpdateMethod": method,
            "postgresql": {
                "parameters": {"shared_buffers": "16MB", "max_connections": "40"},
                "synchronous": {"method": "any", "number": 1},
            },
        },
    })
}

/// The change that lands in the pod template: container resources (the
/// fake Nodes have room; the fake kubelet does not enforce them).
fn resources_patch() -> Value {
    json!({"spec": {"resources": {"requests": {"cpu": "10m", "memory": "64Mi"}}}})
}

fn condition<'a>(s: &'a Value, type_: &str) -> Option<&'a Value> {
    s["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
}

async fn secret_value(client: &Client, ns: &str, cluster: &str, key: &str) -> String {
    let secret = Api::<Secret>::namespaced(client.clone(), ns)
        .get(&format!("{cluster}-credentials"))
        .await
        .unwrap_or_else(|e| panic!("credentials Secret: {}", api_message(&e)));
    let value = secret.data.unwrap_or_default().remove(key);
    String::from_utf8(value.unwrap_or_else(|| panic!("no {key} in the Secret")).0).unwrap()
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

/// The one IP behind `<cluster>-rw`.
async fn rw_ip(client: &Client, ns: &str, cluster: &str) -> Result<Ipv4Addr, String> {
    match service_ips(client, ns, &format!("{cluster}-rw"))
        .await?
        .as_slice()
    {
        [ip] => Ok(*ip),
        other => Err(format!("-rw selects {other:?}")),
    }
}

async fn pg_connect(ip: Ipv4Addr, password: &str) -> Result<tokio_postgres::Client, String> {
    let (client, conn) = tokio_postgres::Config::new()
        .host(ip.to_string())
        .port(5432)
        .user("app")
        .password(password)
        .dbname("app")
        .connect_timeout(Duration::from_secs(2))
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(|e| format!("connect to {ip}: {e}"))?;
    tokio::spawn(conn);
    Ok(client)
}

/// Inserts numbered rows through `-rw` in a loop, reconnecting (to what
/// `-rw` selects then) after any error; keeps the acknowledged ids.
struct PgWriter {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<i32>>>,
    task: tokio::task::JoinHandle<()>,
}

impl PgWriter {
    /// Ids from `first` up.
    fn start(client: Client, ns: String, cluster: String, password: String, first: i32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let acked: Arc<Mutex<Vec<i32>>> = Arc::default();
        let (s, a) = (stop.clone(), acked.clone());
        let task = tokio::spawn(async move {
            let mut next = first;
            while !s.load(Ordering::SeqCst) {
                let Ok(ip) = rw_ip(&client, &ns, &cluster).await else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                let Ok(c) = pg_connect(ip, &password).await else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                while !s.load(Ordering::SeqCst) {
                    let id = next;
                    next += 1;
                    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&id];
                    let insert = c.execute("INSERT INTO t VALUES ($1)", &params);
                    match tokio::time::timeout(Duration::from_secs(5), insert).await {
                        Ok(Ok(_)) => a.lock().unwrap().push(id),
                        _ => break,
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        });
        Self { stop, acked, task }
    }

    fn acked(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    async fn wait_more(&self, n: usize, what: &str) {
        let from = self.acked();
        eventually(what, WAIT, || async {
            let now = self.acked();
            (now >= from + n)
                .then_some(())
                .ok_or(format!("{} acknowledged since", now - from))
        })
        .await;
    }

    async fn stop(self) -> Vec<i32> {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.task.await;
        self.acked.lock().unwrap().clone()
    }
}

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

async fn all_rows_present(client: &Client, ns: &str, cluster: &str, password: &str, acked: &[i32]) {
    let ip = eventually("one ready pod behind -rw", WAIT, || {
        rw_ip(client, ns, cluster)
    })
    .await;
    let c = pg_connect(ip, password).await.unwrap();
    let rows = c.query("SELECT id FROM t", &[]).await.unwrap();
    let have: BTreeSet<i32> = rows.iter().map(|r| r.get(0)).collect();
    let lost: Vec<&i32> = acked.iter().filter(|id| !have.contains(id)).collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged rows lost: {:?}",
        lost.len(),
        acked.len(),
        &lost[..lost.len().min(20)]
    );
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

fn healthy(s: &Value, n: usize) -> bool {
    s["phase"] == "Healthy"
        && s["ready"] == format!("{n}/{n}")
        && s.get("primaryChange").is_none()
        && s["currentPrimary"].is_string()
        && s["currentPrimary"] == s["targetPrimary"]
}

struct PgSetup {
    client: Client,
    ns: String,
    api: Api<DynamicObject>,
    kubelet: Kubelet,
    password: String,
    _operator: OperatorProcess,
    _namespace: TestNamespace,
}

async fn pg_setup(prefix: &str, cluster: &str, supervised: bool) -> PgSetup {
    pg_setup_with(prefix, roll_pg(cluster, supervised)).await
}

async fn pg_setup_with(prefix: &str, cr: Value) -> PgSetup {
    let cluster = cr["metadata"]["name"].as_str().unwrap().to_string();
    let cluster = cluster.as_str();
    require_postgres();
    let client = admin().await;
    let namespace = TestNamespace::create(&client, prefix).await;
    let ns = namespace.name.clone();
    let operator = OperatorProcess::start_for_instances(&client, Some(&ns)).await;
    let kubelet = Kubelet::start(&client, &ns, cluster, "PostgresCluster").await;
    apply(&client, &cr, &ns)
        .await
        .unwrap_or_else(|e| panic!("{cluster}: {}", api_message(&e)));
    let api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &ns, &stratum_resource("PostgresCluster"));
    kubelet::wait_status(&api, cluster, "phase Healthy", START, |s| {
        healthy(s, 3) && s["currentPrimary"] == format!("{cluster}-0")
    })
    .await;
    let password = secret_value(&client, &ns, cluster, "app-password").await;
    let ip = eventually("one ready pod behind -rw", WAIT, || {
        rw_ip(&client, &ns, cluster)
    })
    .await;
    pg_connect(ip, &password)
        .await
        .unwrap()
        .execute("CREATE TABLE t (id int PRIMARY KEY)", &[])
        .await
        .unwrap();
    PgSetup {
        client,
        ns,
        api,
        kubelet,
        password,
        _operator: operator,
        _namespace: namespace,
    }
}

async fn patch_spec(api: &Api<DynamicObject>, cluster: &str, patch: &Value) {
    api.patch(cluster, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .unwrap_or_else(|e| panic!("patch {cluster}: {}", api_message(&e)));
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
    let (client, ns, api, kubelet) = (&s.client, &s.ns, &s.api, &s.kubelet);
    let pods = names(C, 3);
    let (before, _) = revisions(client, ns, C).await;

    let writer = PgWriter::start(client.clone(), ns.clone(), C.into(), s.password.clone(), 1);
    writer.wait_more(20, "writes before the update").await;
    let primaries = PrimaryMonitor::start(kubelet, pods.clone());
    let monitor = PodMonitor::start(client, ns, pods.clone()).await;

    patch_spec(api, C, &resources_patch()).await;
    // Phase Upgrading with the progress line while it rolls.
    let upgrading = kubelet::wait_status(api, C, "phase Upgrading", WAIT, |s| {
        s["phase"] == "Upgrading"
    })
    .await;
    let reason = upgrading["phaseReason"].as_str().unwrap_or_default();
    assert!(reason.starts_with("Rolling update: "), "{upgrading}");
    let progressing = condition(&upgrading, "Progressing").unwrap();
    assert_eq!(progressing["status"], "True", "{upgrading}");
    assert_eq!(progressing["reason"], "RollingUpdate", "{upgrading}");

    let status = kubelet::wait_status(api, C, "Healthy after the rolling update", ROLL, |s| {
        healthy(s, 3) && s["currentPrimary"] != "roll-pg-0"
    })
    .await;
    all_pods_updated(client, ns, C, 3).await;
    let (after, _) = revisions(client, ns, C).await;
    assert_ne!(before, after, "the template change made a new revision");
    writer.wait_more(20, "writes after the update").await;
    let (order, most_away) = monitor.stop().await;
    let two = primaries.stop().await;
    let acked = writer.stop().await;

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
    all_rows_present(client, ns, C, &s.password, &acked).await;
    eprintln!("{} acknowledged rows, none lost", acked.len());
    let has = |prefix: &str| events.iter().any(|e| e.starts_with(prefix));
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
        api.patch_status(
            C,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"targetPrimary": "roll-pg-2"}})),
        )
        .await
        .unwrap();
        kubelet::wait_status(api, C, "roll-pg-2 primary", WAIT, |s| {
            healthy(s, 3) && s["currentPrimary"] == "roll-pg-2"
        })
        .await;
    }
    let writer = PgWriter::start(
        client.clone(),
        ns.clone(),
        C.into(),
        s.password.clone(),
        1_000_000,
    );
    writer.wait_more(20, "writes before the scale-down").await;
    patch_spec(api, C, &json!({"spec": {"instances": 2}})).await;
    let status = kubelet::wait_status(api, C, "Healthy with 2 instances", ROLL, |s| {
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
    all_rows_present(client, ns, C, &s.password, &acked).await;
    let events = reasons(&events_about(client, ns, C).await);
    assert!(
        events.iter().any(|e| e.starts_with(
            "SwitchoverForScaleDown: scaling down to 2 removes the primary roll-pg-2"
        )),
        "{events:#?}"
    );
    assert!(
        !events.iter().any(|e| e.starts_with("FailoverStarted")),
        "{events:#?}"
    );
    assert_no_failures(client, ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn supervised_primary_waits_for_the_users_switchover() {
    const C: &str = "sup-pg";
    let s = pg_setup("pg-roll-sup", C, true).await;
    let (client, ns, api) = (&s.client, &s.ns, &s.api);
    let pods = names(C, 3);
    let monitor = PodMonitor::start(client, ns, pods.clone()).await;
    patch_spec(api, C, &resources_patch()).await;

    let status = kubelet::wait_status(api, C, "waiting for the user", ROLL, |s| {
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
    api.patch_status(
        C,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"targetPrimary": "sup-pg-1"}})),
    )
    .await
    .unwrap();
    kubelet::wait_status(api, C, "Healthy on sup-pg-1, all updated", ROLL, |s| {
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
    assert!(
        events.iter().any(|e| e.starts_with("WaitingForUser: ")),
        "{events:#?}"
    );
    assert!(
        !events.iter().any(|e| e.starts_with("SwitchoverForUpdate")),
        "{events:#?}"
    );
    assert_no_failures(client, ns).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_method_recreates_the_primary_in_place_without_a_failover() {
    const C: &str = "rst-pg";
    let s = pg_setup_with("pg-roll-rst", roll_pg_with(C, false, "restart")).await;
    let (client, ns, api, kubelet) = (&s.client, &s.ns, &s.api, &s.kubelet);
    let pods = names(C, 3);
    let writer = PgWriter::start(client.clone(), ns.clone(), C.into(), s.password.clone(), 1);
    writer.wait_more(20, "writes before the update").await;
    let primaries = PrimaryMonitor::start(kubelet, pods.clone());
    let monitor = PodMonitor::start(client, ns, pods.clone()).await;
    patch_spec(api, C, &resources_patch()).await;
    kubelet::wait_status(api, C, "phase Upgrading", WAIT, |s| {
        s["phase"] == "Upgrading"
    })
    .await;
    let status = kubelet::wait_status(api, C, "Healthy after the rolling update", ROLL, |s| {
        healthy(s, 3)
            && condition(s, "Progressing").is_some_and(|c| c["status"] == "False")
            && s["instancesStatus"]
                .as_array()
                .is_some_and(|is| is.iter().all(|i| i["ready"] == true))
    })
    .await;
    all_pods_updated(client, ns, C, 3).await;
    writer.wait_more(20, "writes after the update").await;
    let (order, most_away) = monitor.stop().await;
    let two = primaries.stop().await;
    let acked = writer.stop().await;
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
        assert!(
            !events.iter().any(|e| e.starts_with(never)),
            "{never}: {events:#?}"
        );
    }
    assert!(
        events
            .iter()
            .any(|e| e.starts_with("RollingUpdate: deleted pod rst-pg-0 (primary)")),
        "{events:#?}"
    );
    all_rows_present(client, ns, C, &s.password, &acked).await;
    eprintln!("{} acknowledged rows, none lost", acked.len());
    assert_no_failures(client, ns).await;
}

// ---------------------------------------------------------------------
// Galera
// ---------------------------------------------------------------------

const GX: &str = "roll-galera";

fn roll_galera() -> Value {
    json!({
        "apiVersion": "stratum.dev/v1alpha1",
        "kind": "PxcCluster",
        "metadata": {"name": GX},
        "spec": {
            "instances": 3,
            "flavor": "MariaDB",
            "version": "10.11",
            "storage": {"size": "1Gi"},
            "proxy": {"type": "none"},
            // rsync SST: binds the joiner's IP (see tests/k8s_pxc.rs).
            "sstMethod": "rsync",
            "configuration": "[mysqld]\ninnodb_buffer_pool_size = 64M\nmax_connections = 100\n",
        },
    })
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

async fn my_connect(ip: Ipv4Addr, password: &str) -> Result<mysql_async::Conn, String> {
    let opts = mysql_async::OptsBuilder::default()
        .ip_or_hostname(ip.to_string())
        .tcp_port(3306)
        .user(Some("root"))
        .pass(Some(password.to_string()))
        .prefer_socket(false);
    match tokio::time::timeout(Duration::from_secs(5), mysql_async::Conn::new(opts)).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(format!("{ip}: {e}")),
        Err(_) => Err(format!("connecting to {ip} timed out")),
    }
}

/// Inserts numbered rows at whatever `-rw` selects, reconnecting after
/// any error; keeps the acknowledged ones.
struct GaleraWriter {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<i64>>>,
    task: tokio::task::JoinHandle<()>,
}

impl GaleraWriter {
    fn start(client: Client, ns: String, password: String) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let acked: Arc<Mutex<Vec<i64>>> = Arc::default();
        let (s, a) = (stop.clone(), acked.clone());
        let task = tokio::spawn(async move {
            let mut n = 0i64;
            while !s.load(Ordering::SeqCst) {
                let ip = match service_ips(&client, &ns, &format!("{GX}-rw")).await {
                    Ok(ips) if ips.len() == 1 => ips[0],
                    _ => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Ok(mut c) = my_connect(ip, &password).await else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                while !s.load(Ordering::SeqCst) {
                    n += 1;
                    let insert = c.exec_drop("INSERT INTO app.rows_acked (n) VALUES (?)", (n,));
                    match tokio::time::timeout(Duration::from_secs(10), insert).await {
                        Ok(Ok(())) => a.lock().unwrap().push(n),
                        _ => break,
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        });
        Self { stop, acked, task }
    }

    async fn wait_more(&self, more: usize, what: &str) {
        let from = self.acked.lock().unwrap().len();
        eventually(what, WAIT, || async {
            let now = self.acked.lock().unwrap().len();
            (now >= from + more)
                .then_some(())
                .ok_or(format!("{} acknowledged since", now - from))
        })
        .await;
    }

    async fn stop(self) -> Vec<i64> {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.task.await;
        self.acked.lock().unwrap().clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn galera_rolls_one_member_at_a_time_writer_last() {
    require_galera();
    let client = admin().await;
    let namespace = TestNamespace::create(&client, "pxc-roll").await;
    let ns = namespace.name.clone();
    let operator = OperatorProcess::start_for_instances(&client, Some(&ns)).await;
    let kubelet = Kubelet::start(&client, &ns, GX, "PxcCluster").await;
    apply(&client, &roll_galera(), &ns)
        .await
        .unwrap_or_else(|e| panic!("{GX}: {}", api_message(&e)));
    let api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &ns, &stratum_resource("PxcCluster"));
    kubelet::wait_status(
        &api,
        GX,
        "Healthy with 3 Synced members",
        START,
        galera_healthy,
    )
    .await;
    let password = secret_value(&client, &ns, GX, "root-password").await;
    let ip = eventually("the -rw writer", WAIT, || async {
        match service_ips(&client, &ns, &format!("{GX}-rw"))
            .await?
            .as_slice()
        {
            [ip] => Ok(*ip),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    // The writer: the member the bootstrap made writer (the label stays
    // where it is); it is updated last.
    let writer_pod = names(GX, 3)
        .into_iter()
        .find(|p| kubelet.pod_ip(p) == ip)
        .expect("-rw selects a member");
    let mut c = my_connect(ip, &password).await.unwrap();
    c.query_drop("CREATE DATABASE IF NOT EXISTS app")
        .await
        .unwrap();
    c.query_drop("CREATE TABLE app.rows_acked (n BIGINT PRIMARY KEY)")
        .await
        .unwrap();
    drop(c);

    let writer = GaleraWriter::start(client.clone(), ns.clone(), password.clone());
    writer.wait_more(20, "writes before the update").await;
    let pods = names(GX, 3);
    let monitor = PodMonitor::start(&client, &ns, pods.clone()).await;
    patch_spec(&api, GX, &resources_patch()).await;
    kubelet::wait_status(&api, GX, "phase Upgrading", WAIT, |s| {
        s["phase"] == "Upgrading"
    })
    .await;
    kubelet::wait_status(&api, GX, "Healthy after the rolling update", ROLL, |s| {
        galera_healthy(s) && condition(s, "Progressing").is_some_and(|c| c["status"] == "False")
    })
    .await;
    all_pods_updated(&client, &ns, GX, 3).await;
    writer.wait_more(20, "writes after the update").await;
    let (order, most_away) = monitor.stop().await;
    let acked: BTreeSet<i64> = writer.stop().await.into_iter().collect();
    let events = reasons(&events_about(&client, &ns, GX).await);
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
        events.iter().any(|e| e.starts_with(&prefix))
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
        assert!(
            events.iter().any(|e| e.starts_with(&want)),
            "no Event {want:?}: {events:#?}"
        );
    }
    // Every acknowledged row on every node.
    eventually(
        &format!("the {} acknowledged rows on every node", acked.len()),
        WAIT,
        || async {
            for pod in &pods {
                let mut c = my_connect(kubelet.pod_ip(pod), &password).await?;
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
    assert_no_failures(&client, &ns).await;
    drop(operator);
}
