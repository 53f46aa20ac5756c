//! Pipeline tests against a fake API server on loopback (an axum app that
//! records every request and answers like an empty cluster). They check
//! what the controller sends — paths, verbs, field manager, patch types —
//! not Kubernetes semantics; a real kube-apiserver test comes later.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, store::Writer};
use kube::runtime::watcher;
use serde_json::{Value, json};

use super::ControllerOptions;
use super::backoff::Backoff;
use super::cache::{AppliedMemo, Caches, TestWriters};
use super::metrics::Metrics;
use super::reconcile::{self, FINALIZER, KindContext, REQUEUE_WAITING, Shared};
use super::report::Reporter;
use crate::build::tests::{FakeEngine, SIMPLE_PG};

#[derive(Clone, Debug)]
struct Recorded {
    method: Method,
    path: String,
    query: String,
    content_type: String,
    body: Value,
}

#[derive(Default)]
struct FakeApi {
    requests: Mutex<Vec<Recorded>>,
    objects: Mutex<HashMap<String, Value>>,
    lists: Mutex<HashMap<String, Vec<Value>>>,
    /// Paths whose DELETE fails with 500.
    failing: Mutex<Vec<String>>,
    /// DELETEs being answered now, and the most at once.
    deleting: AtomicUsize,
    most_deleting: AtomicUsize,
}

const PLURALS: &[&str] = &[
    "pods",
    "secrets",
    "services",
    "configmaps",
    "statefulsets",
    "poddisruptionbudgets",
    "networkpolicies",
    "events",
    "fakeclusters",
];

fn json_response(code: StatusCode, body: Value) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

async fn handle(
    State(api): State<Arc<FakeApi>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_string();
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    api.requests.lock().unwrap().push(Recorded {
        method: method.clone(),
        path: path.clone(),
        query: uri.query().unwrap_or_default().to_string(),
        content_type: headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string(),
        body: body.clone(),
    });
    if method == Method::DELETE {
        // Held a moment, so deletions sent together overlap here.
        let now = api.deleting.fetch_add(1, Ordering::SeqCst) + 1;
        api.most_deleting.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(50)).await;
        api.deleting.fetch_sub(1, Ordering::SeqCst);
        if api.failing.lock().unwrap().contains(&path) {
            return json_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({"apiVersion": "v1", "kind": "Status", "status": "Failure",
                       "reason": "InternalError", "code": 500, "message": "etcd is down"}),
            );
        }
    }
    let last = path.rsplit('/').next().unwrap_or_default();
    let object_path = path.trim_end_matches("/status").to_string();
    let stored = api.objects.lock().unwrap().get(&object_path).cloned();
    match method {
        Method::GET if PLURALS.contains(&last) => {
            let items = api
                .lists
                .lock()
                .unwrap()
                .get(&path)
                .cloned()
                .unwrap_or_default();
            json_response(
                StatusCode::OK,
                json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": "1"}, "items": items}),
            )
        }
        Method::GET => match stored {
            Some(obj) => json_response(StatusCode::OK, obj),
            None => json_response(
                StatusCode::NOT_FOUND,
                json!({"apiVersion": "v1", "kind": "Status", "status": "Failure",
                       "reason": "NotFound", "code": 404, "message": format!("{path} not found")}),
            ),
        },
        Method::POST => json_response(StatusCode::CREATED, body),
        Method::PATCH if body.get("metadata").is_some() => json_response(StatusCode::OK, body),
        Method::PATCH => json_response(
            StatusCode::OK,
            stored.unwrap_or_else(|| json!({"metadata": {"name": last}})),
        ),
        _ => json_response(
            StatusCode::OK,
            json!({"apiVersion": "v1", "kind": "Status", "status": "Success"}),
        ),
    }
}

struct Harness {
    api: Arc<FakeApi>,
    ctx: Arc<KindContext>,
    server: tokio::task::JoinHandle<()>,
    /// The watch caches' writers: the tests play the watches.
    writers: TestWriters,
    /// The cluster cache's writer.
    clusters: Writer<DynamicObject>,
}

impl Harness {
    async fn start() -> Self {
        let api = Arc::new(FakeApi::default());
        let app = axum::Router::new().fallback(handle).with_state(api.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        let config = kube::Config::new(format!("http://{addr}").parse().unwrap());
        let client = kube::Client::try_from(config).unwrap();
        let mut opts = ControllerOptions::new("example.invalid/stratum-operator:test");
        opts.instance_timeout = Duration::from_millis(200);
        let (caches, mut writers) = Caches::for_tests();
        let resource = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("stratum.dev", "v1alpha1", "FakeCluster"),
            "fakeclusters",
        );
        let clusters = Writer::new(resource.clone());
        let metrics = Arc::new(Metrics::new());
        let shared = Arc::new(Shared {
            reporter: Reporter::new(client.clone(), metrics.clone()),
            client,
            metrics,
            backoff: Backoff::default(),
            opts,
        });
        let ctx = Arc::new(KindContext {
            engine: Arc::new(FakeEngine),
            resource,
            shared,
            caches,
            memo: AppliedMemo::default(),
            validated: Default::default(),
            written: Default::default(),
            clusters: clusters.as_reader(),
            galera: Default::default(),
            rolling: Default::default(),
            ha: super::ha::HaRegistry::new(futures::channel::mpsc::unbounded().0),
            reconfigure: Default::default(),
        });
        writers.ready();
        Self {
            api,
            ctx,
            server,
            writers,
            clusters,
        }
    }

    /// What a watch would deliver: a cached object.
    fn cache_secret(&mut self, secret: Value) {
        let secret = serde_json::from_value(secret).unwrap();
        self.writers
            .secrets
            .apply_watcher_event(&watcher::Event::Apply(secret));
    }

    fn cache_pod(&mut self, pod: Value) {
        let pod = serde_json::from_value(pod).unwrap();
        self.writers
            .pods
            .apply_watcher_event(&watcher::Event::Apply(pod));
    }

    /// Put every object the operator applied into the metadata caches, as
    /// the watches would (as the fake server answered: the applied body).
    fn cache_applied(&mut self) {
        fn put<K: kube::Resource<DynamicType = ()> + Clone>(
            w: &mut kube::runtime::reflector::store::Writer<PartialObjectMeta<K>>,
            body: &Value,
        ) {
            let meta: PartialObjectMeta<K> =
                serde_json::from_value(json!({"metadata": body["metadata"].clone()})).unwrap();
            w.apply_watcher_event(&watcher::Event::Apply(meta));
        }
        for r in self.requests() {
            if r.method != Method::PATCH || r.content_type != "application/apply-patch+yaml" {
                continue;
            }
            let w = &mut self.writers;
            match r.body["kind"].as_str().unwrap() {
                "StatefulSet" => put(&mut w.stateful_sets, &r.body),
                "Service" => put(&mut w.services, &r.body),
                "ConfigMap" => put(&mut w.config_maps, &r.body),
                "PodDisruptionBudget" => put(&mut w.pod_disruption_budgets, &r.body),
                "NetworkPolicy" => put(&mut w.network_policies, &r.body),
                other => panic!("applied {other}"),
            }
        }
    }

    fn requests(&self) -> Vec<Recorded> {
        self.api.requests.lock().unwrap().clone()
    }

    fn find(&self, method: Method, path: &str) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.method == method && r.path == path)
            .collect()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn cluster(yaml: &str, with_finalizer: bool) -> DynamicObject {
    let mut v: Value = serde_yaml::from_str(yaml).unwrap();
    if with_finalizer {
        v["metadata"]["finalizers"] = json!([FINALIZER]);
    }
    serde_json::from_value(v).unwrap()
}

const NS: &str = "/api/v1/namespaces/team-a";
const APPS: &str = "/apis/apps/v1/namespaces/team-a";
const CLUSTER_PATH: &str = "/apis/stratum.dev/v1alpha1/namespaces/team-a/fakeclusters/simple-pg";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/team-a/events";

#[tokio::test]
async fn first_reconcile_applies_everything_and_reports_creating() {
    let h = Harness::start().await;
    let action = reconcile::reconcile(Arc::new(cluster(SIMPLE_PG, true)), h.ctx.clone())
        .await
        .unwrap();
    // No pod is ready: waiting, not an error.
    assert_eq!(action, Action::requeue(REQUEUE_WAITING));

    // Server-side apply, one field manager, forced.
    for path in [
        format!("{NS}/configmaps/simple-pg-config"),
        format!("{NS}/services/simple-pg-headless"),
        format!("{NS}/services/simple-pg-rw"),
        format!("{NS}/services/simple-pg-ro"),
        format!("{NS}/services/simple-pg-r"),
        format!("{APPS}/statefulsets/simple-pg"),
        "/apis/policy/v1/namespaces/team-a/poddisruptionbudgets/simple-pg".to_string(),
    ] {
        let patches = h.find(Method::PATCH, &path);
        assert_eq!(patches.len(), 1, "{path}: {:?}", h.requests());
        let p = &patches[0];
        assert_eq!(p.content_type, "application/apply-patch+yaml", "{path}");
        assert!(
            p.query.contains("fieldManager=stratum-operator"),
            "{path}: {}",
            p.query
        );
        assert!(p.query.contains("force=true"), "{path}: {}", p.query);
        assert!(p.body["apiVersion"].is_string() && p.body["kind"].is_string());
    }
    // The NetworkPolicy is off without the annotation.
    assert!(
        h.requests()
            .iter()
            .all(|r| r.method != Method::PATCH || !r.path.contains("networkpolicies"))
    );

    // The Secret is created, never applied or patched.
    let secret_path = format!("{NS}/secrets/simple-pg-credentials");
    let created = h.find(Method::POST, &format!("{NS}/secrets"));
    assert_eq!(created.len(), 1);
    assert!(created[0].body["data"]["api-token"].is_string());
    assert!(h.find(Method::PATCH, &secret_path).is_empty());

    // Pods, the Secret and the children to prune come from the watch
    // caches; a StatefulSet the cache does not know is not read either.
    let reads: Vec<_> = h
        .requests()
        .into_iter()
        .filter(|r| r.method == Method::GET)
        .map(|r| r.path)
        .collect();
    assert!(reads.is_empty(), "{reads:?}");

    // Status: a merge patch of the status subresource.
    let status = h.find(Method::PATCH, &format!("{CLUSTER_PATH}/status"));
    assert_eq!(status.len(), 1);
    assert_eq!(status[0].content_type, "application/merge-patch+json");
    let s = &status[0].body["status"];
    assert_eq!(s["phase"], "Creating");
    assert_eq!(s["ready"], "0/3");
    assert_eq!(s["observedGeneration"], 2);
    assert_eq!(s["writeService"], "simple-pg-rw");
    assert_eq!(s["instancesStatus"][0]["message"], "pod does not exist yet");
    let types: Vec<_> = s["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["type"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(types, ["Ready", "Progressing", "Degraded"]);

    // Events: the new credentials and the first phase, sent off the
    // reconcile path.
    h.ctx.shared.reporter.flush().await;
    let reasons: Vec<_> = h
        .find(Method::POST, EVENTS)
        .iter()
        .map(|e| e.body["reason"].as_str().unwrap_or_default().to_string())
        .collect();
    assert!(
        reasons.contains(&"CredentialsCreated".to_string()),
        "{reasons:?}"
    );
    assert!(reasons.contains(&"Creating".to_string()), "{reasons:?}");
    let metrics = h.ctx.shared.metrics.encode();
    assert!(
        metrics.contains(r#"stratum_reconciles_total{kind="FakeCluster"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn unchanged_children_are_not_applied_again() {
    let mut h = Harness::start().await;
    let obj = Arc::new(cluster(SIMPLE_PG, true));
    reconcile::reconcile(obj.clone(), h.ctx.clone())
        .await
        .unwrap();
    h.cache_applied();
    let before = h.requests().len();
    reconcile::reconcile(obj.clone(), h.ctx.clone())
        .await
        .unwrap();
    let again: Vec<_> = h.requests()[before..]
        .iter()
        // Events and status are written for this (unchanged) input object.
        .filter(|r| !r.path.starts_with(EVENTS) && !r.path.starts_with(CLUSTER_PATH))
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    // The Secret is not cached here, so it is created again (and the
    // fake server accepts it); nothing is applied.
    assert_eq!(again, [format!("POST {NS}/secrets")], "{again:?}");

    // A spec change applies what it changes: the StatefulSet (read first
    // for its immutable fields) and the ConfigMap with the instance
    // config; the Services and the PDB stay.
    let grown = Arc::new(cluster(
        &SIMPLE_PG.replace("instances: 3", "instances: 5"),
        true,
    ));
    let before = h.requests().len();
    reconcile::reconcile(grown, h.ctx.clone()).await.unwrap();
    let applied: Vec<_> = h.requests()[before..]
        .iter()
        .filter(|r| r.method == Method::PATCH && r.content_type == "application/apply-patch+yaml")
        .map(|r| r.path.clone())
        .collect();
    assert!(
        applied.contains(&format!("{APPS}/statefulsets/simple-pg")),
        "{applied:?}"
    );
    assert!(
        applied
            .iter()
            .all(|p| !p.contains("/services/") && !p.contains("poddisruptionbudgets")),
        "{applied:?}"
    );
}

#[tokio::test]
async fn invalid_spec_is_permanent_failed_and_reported() {
    let h = Harness::start().await;
    let yaml = SIMPLE_PG.replace("instances: 3", "instances: 2");
    let obj = Arc::new(cluster(&yaml, true));
    let err = reconcile::reconcile(obj.clone(), h.ctx.clone())
        .await
        .unwrap_err();
    assert!(err.is_permanent());
    assert_eq!(err.category(), "InvalidSpec");
    assert_eq!(
        reconcile::error_policy(obj, &err, h.ctx.clone()),
        Action::await_change()
    );

    // Nothing was applied.
    assert!(
        h.requests()
            .iter()
            .all(|r| r.method != Method::PATCH || r.path.starts_with(CLUSTER_PATH)),
        "{:?}",
        h.requests()
    );
    let status = h.find(Method::PATCH, &format!("{CLUSTER_PATH}/status"));
    let s = &status[0].body["status"];
    assert_eq!(s["phase"], "Failed");
    let degraded = s["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Degraded")
        .unwrap();
    assert_eq!(degraded["status"], "True");
    assert_eq!(degraded["reason"], "InvalidSpec");
    assert!(
        degraded["message"]
            .as_str()
            .unwrap()
            .starts_with("spec.instances: must be odd"),
        "{degraded}"
    );
    h.ctx.shared.reporter.flush().await;
    let events = h.find(Method::POST, EVENTS);
    assert_eq!(events.len(), 1, "one report per result");
    assert_eq!(events[0].body["reason"], "InvalidSpec");
    assert_eq!(events[0].body["type"], "Warning");
    assert!(
        events[0].body["note"]
            .as_str()
            .unwrap()
            .contains("spec.instances")
    );
}

#[tokio::test]
async fn finalizer_is_added_with_the_first_applies() {
    let h = Harness::start().await;
    let action = reconcile::reconcile(Arc::new(cluster(SIMPLE_PG, false)), h.ctx.clone())
        .await
        .unwrap();
    assert_eq!(action, Action::requeue(REQUEUE_WAITING));
    let patches = h.find(Method::PATCH, CLUSTER_PATH);
    assert_eq!(patches.len(), 1);
    assert_eq!(patches[0].content_type, "application/json-patch+json");
    // Test-then-add, as kube-runtime's finalizer() does, so a concurrent
    // change of the list fails the patch instead of being overwritten.
    assert_eq!(
        patches[0].body,
        json!([
            {"op": "test", "path": "/metadata/finalizers", "value": null},
            {"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]},
        ])
    );
    // In the same reconcile: the children and the status.
    assert_eq!(
        h.find(Method::PATCH, &format!("{APPS}/statefulsets/simple-pg"))
            .len(),
        1
    );
    assert_eq!(
        h.find(Method::PATCH, &format!("{CLUSTER_PATH}/status"))
            .len(),
        1
    );
    let metrics = h.ctx.shared.metrics.encode();
    for step in ["finalizer", "apply", "status"] {
        assert!(
            metrics.contains(&format!(
                r#"stratum_reconcile_step_duration_seconds_count{{kind="FakeCluster",step="{step}"}} 1"#
            )),
            "{step}: {metrics}"
        );
    }
}

#[tokio::test]
async fn transient_errors_back_off_per_object() {
    let h = Harness::start().await;
    let obj = Arc::new(cluster(SIMPLE_PG, true));
    let err: super::error::ReconcileError =
        super::error::FinalizerError::Invalid("object has no name".into()).into();
    let first = reconcile::error_policy(obj.clone(), &err, h.ctx.clone());
    let second = reconcile::error_policy(obj, &err, h.ctx.clone());
    assert_eq!(first, Action::requeue(Duration::from_secs(5)));
    assert_eq!(second, Action::requeue(Duration::from_secs(10)));
}

#[tokio::test]
async fn network_policy_annotation_and_existing_secret() {
    let mut h = Harness::start().await;
    // An existing Secret with every key: left alone.
    h.cache_secret(json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "simple-pg-credentials", "namespace": "team-a"},
            "data": {"api-token": "dG9rZW4=", "superuser-password": "cHc=", "replication-password": "cHc="}
    }));
    let mut obj = cluster(SIMPLE_PG, true);
    obj.metadata.annotations =
        Some([("stratum.dev/network-policy".to_string(), "true".to_string())].into());
    reconcile::reconcile(Arc::new(obj), h.ctx.clone())
        .await
        .unwrap();
    assert_eq!(
        h.find(
            Method::PATCH,
            "/apis/networking.k8s.io/v1/namespaces/team-a/networkpolicies/simple-pg"
        )
        .len(),
        1
    );
    assert!(h.find(Method::POST, &format!("{NS}/secrets")).is_empty());
    assert!(
        h.find(
            Method::PATCH,
            &format!("{NS}/secrets/simple-pg-credentials")
        )
        .is_empty()
    );
}

fn running_pod(name: &str, labels: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "team-a", "labels": labels},
        "status": {
            "phase": "Running",
            "podIP": "192.0.2.10",
            "conditions": [{"type": "Ready", "status": "True"}]
        }
    })
}

#[tokio::test]
async fn ready_pods_without_managers_fall_back_to_ordinal_zero() {
    let mut h = Harness::start().await;
    let selector = json!({"stratum.dev/cluster": "simple-pg", "stratum.dev/kind": "FakeCluster"});
    let mut already_rw = selector.clone();
    already_rw["stratum.dev/route"] = json!("rw");
    h.cache_pod(running_pod("simple-pg-0", selector.clone()));
    // Stale: labelled rw but not the writer any more.
    h.cache_pod(running_pod("simple-pg-1", already_rw));
    h.cache_pod(running_pod("simple-pg-2", selector.clone()));
    // Another cluster's pod in the same namespace: not ours.
    h.cache_pod(running_pod(
        "other-pg-0",
        json!({"stratum.dev/cluster": "other-pg", "stratum.dev/kind": "FakeCluster"}),
    ));
    h.cache_secret(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "simple-pg-credentials", "namespace": "team-a"},
        "data": {"api-token": "dG9rZW4=", "superuser-password": "cHc=", "replication-password": "cHc="}
    }));
    let action = reconcile::reconcile(Arc::new(cluster(SIMPLE_PG, true)), h.ctx.clone())
        .await
        .unwrap();
    assert_eq!(action, Action::requeue(super::REQUEUE_HEALTHY));

    let label_patch = |pod: &str| {
        let patches = h.find(Method::PATCH, &format!("{NS}/pods/{pod}"));
        assert_eq!(patches.len(), 1, "{pod}");
        assert_eq!(patches[0].content_type, "application/merge-patch+json");
        patches[0].body["metadata"]["labels"].clone()
    };
    assert_eq!(
        label_patch("simple-pg-0"),
        json!({"stratum.dev/route": "rw", "stratum.dev/role": "unknown"})
    );
    assert_eq!(
        label_patch("simple-pg-1"),
        json!({"stratum.dev/route": "ro", "stratum.dev/role": "unknown"})
    );

    let status = h.find(Method::PATCH, &format!("{CLUSTER_PATH}/status"));
    let s = &status[0].body["status"];
    assert_eq!(s["phase"], "Healthy");
    assert_eq!(s["ready"], "3/3");
    assert_eq!(s["currentPrimary"], "simple-pg-0");
    // The managers were tried (token read) and are unreachable here.
    assert!(s["instancesStatus"][0]["message"].is_string(), "{s}");
    h.ctx.shared.reporter.flush().await;
    let reasons: Vec<_> = h
        .find(Method::POST, EVENTS)
        .iter()
        .map(|e| e.body["reason"].as_str().unwrap_or_default().to_string())
        .collect();
    assert!(reasons.contains(&"Healthy".to_string()), "{reasons:?}");
    assert!(
        reasons.contains(&"PrimaryChanged".to_string()),
        "{reasons:?}"
    );
}

#[tokio::test]
async fn a_status_is_not_written_again_from_an_older_cached_object() {
    let h = Harness::start().await;
    let stale = |rv: &str| {
        let mut obj = cluster(SIMPLE_PG, true);
        obj.metadata.resource_version = Some(rv.into());
        Arc::new(obj)
    };
    // The API server answers the status patch with resourceVersion 10.
    let uid = stale("5").metadata.uid.clone();
    h.api.objects.lock().unwrap().insert(
        CLUSTER_PATH.to_string(),
        json!({"apiVersion": "stratum.dev/v1alpha1", "kind": "FakeCluster",
               "metadata": {"name": "simple-pg", "namespace": "team-a",
                            "uid": uid, "resourceVersion": "10"}}),
    );
    let status_writes = || {
        h.find(Method::PATCH, &format!("{CLUSTER_PATH}/status"))
            .len()
    };
    reconcile::reconcile(stale("5"), h.ctx.clone())
        .await
        .unwrap();
    assert_eq!(status_writes(), 1);
    // The cache still shows the object from before that write (no
    // status): the status written is the one compared against.
    reconcile::reconcile(stale("7"), h.ctx.clone())
        .await
        .unwrap();
    assert_eq!(status_writes(), 1, "written again from a stale cache");
    // A cached object newer than the write is believed: this one has no
    // status (someone removed it), so it is written again.
    reconcile::reconcile(stale("11"), h.ctx.clone())
        .await
        .unwrap();
    assert_eq!(status_writes(), 2);
}

/// The watch plays `events` on the cluster cache, as the controller's
/// stream does: the store first, then the context.
fn play(h: &mut Harness, events: Vec<watcher::Event<DynamicObject>>) {
    for event in events {
        h.clusters.apply_watcher_event(&event);
        h.ctx.on_cluster_event(&event);
    }
}

/// A cluster deleted before its finalizer landed never runs cleanup: its
/// records go with the watch's Delete instead.
#[tokio::test]
async fn a_cluster_deleted_without_cleanup_is_forgotten() {
    let mut h = Harness::start().await;
    let obj = cluster(SIMPLE_PG, false);
    play(&mut h, vec![watcher::Event::Apply(obj.clone())]);
    // The first reconcile: finalizer and applies together.
    reconcile::reconcile(Arc::new(obj.clone()), h.ctx.clone())
        .await
        .unwrap();
    assert_eq!(h.ctx.remembered(), 1);
    let key = ObjectRef::from_obj_with(&obj, h.ctx.resource.clone());
    h.ctx.forget_if_gone(&key);
    assert_eq!(h.ctx.remembered(), 1, "forgot a cluster that still exists");

    play(&mut h, vec![watcher::Event::Delete(obj.clone())]);
    assert_eq!(h.ctx.remembered(), 0, "records kept after the Delete");

    // A reconcile that was running when the Delete came records again;
    // the check after it forgets.
    reconcile::reconcile(Arc::new(obj.clone()), h.ctx.clone())
        .await
        .unwrap();
    assert_eq!(h.ctx.remembered(), 1);
    h.ctx.forget_if_gone(&key);
    assert_eq!(h.ctx.remembered(), 0);
}

/// A Delete missed while the watch was down: the re-list no longer holds
/// the cluster, and its records go; the listed clusters' stay.
#[tokio::test]
async fn a_relist_forgets_clusters_deleted_meanwhile() {
    let mut h = Harness::start().await;
    let gone = cluster(SIMPLE_PG, true);
    let mut kept = gone.clone();
    kept.metadata.name = Some("other-pg".into());
    play(
        &mut h,
        vec![
            watcher::Event::Apply(gone.clone()),
            watcher::Event::Apply(kept.clone()),
        ],
    );
    for obj in [&gone, &kept] {
        reconcile::reconcile(Arc::new(obj.clone()), h.ctx.clone())
            .await
            .unwrap();
    }
    assert_eq!(h.ctx.remembered(), 2);
    play(
        &mut h,
        vec![
            watcher::Event::Init,
            watcher::Event::InitApply(kept.clone()),
            watcher::Event::InitDone,
        ],
    );
    assert_eq!(h.ctx.remembered(), 1);
    // The one left is the listed cluster's: a reconcile of it changes
    // nothing, so nothing is applied again.
    let applies = h.requests().len();
    h.cache_applied();
    reconcile::reconcile(Arc::new(kept), h.ctx.clone())
        .await
        .unwrap();
    let again: Vec<_> = h.requests()[applies..]
        .iter()
        .filter(|r| r.content_type == "application/apply-patch+yaml")
        .map(|r| r.path.clone())
        .collect();
    assert!(again.is_empty(), "applied again: {again:?}");
}

/// Children this cluster owns and no longer wants, as the watch caches
/// would show them: `count` Services and a NetworkPolicy.
fn cache_orphans(h: &mut Harness, count: usize) {
    fn meta<K: kube::Resource<DynamicType = ()> + Clone>(name: &str) -> PartialObjectMeta<K> {
        serde_json::from_value(json!({"metadata": {
            "name": name, "namespace": "team-a", "uid": format!("uid-{name}"),
            "labels": {"stratum.dev/cluster": "simple-pg", "stratum.dev/kind": "FakeCluster"},
            "ownerReferences": [{"apiVersion": "stratum.dev/v1alpha1", "kind": "FakeCluster",
                "name": "simple-pg", "uid": "6d1f0c52-1b0e-4c39-9d0e-3c0b7e5c2a11",
                "controller": true}]
        }}))
        .unwrap()
    }
    for i in 0..count {
        let svc = meta(&format!("simple-pg-old-{i}"));
        h.writers
            .services
            .apply_watcher_event(&watcher::Event::Apply(svc));
    }
    let np = meta("simple-pg");
    h.writers
        .network_policies
        .apply_watcher_event(&watcher::Event::Apply(np));
}

#[tokio::test]
async fn orphans_are_deleted_together_a_few_at_a_time() {
    let mut h = Harness::start().await;
    cache_orphans(&mut h, 6);
    reconcile::reconcile(Arc::new(cluster(SIMPLE_PG, true)), h.ctx.clone())
        .await
        .unwrap();
    let mut deleted: Vec<_> = h
        .requests()
        .into_iter()
        .filter(|r| r.method == Method::DELETE)
        .map(|r| {
            assert_eq!(r.body["propagationPolicy"], "Background", "{}", r.path);
            r.path
        })
        .collect();
    deleted.sort();
    let mut expected: Vec<_> = (0..6)
        .map(|i| format!("{NS}/services/simple-pg-old-{i}"))
        .collect();
    expected.push("/apis/networking.k8s.io/v1/namespaces/team-a/networkpolicies/simple-pg".into());
    expected.sort();
    assert_eq!(deleted, expected);
    let most = h.api.most_deleting.load(Ordering::SeqCst);
    assert!(
        (2..=super::apply::ORPHAN_DELETES).contains(&most),
        "{most} deletions at once"
    );
    // Reported (kube's Recorder folds Events of one reason into a series,
    // so the count of POSTs says nothing).
    h.ctx.shared.reporter.flush().await;
    assert!(
        h.find(Method::POST, EVENTS)
            .iter()
            .any(|e| e.body["reason"] == "OrphanDeleted")
    );
    let metrics = h.ctx.shared.metrics.encode();
    assert!(
        metrics.contains(r#"child="NetworkPolicy",verb="delete""#),
        "{metrics}"
    );
}

#[tokio::test]
async fn one_failed_orphan_deletion_leaves_the_others_done() {
    let mut h = Harness::start().await;
    cache_orphans(&mut h, 3);
    h.api
        .failing
        .lock()
        .unwrap()
        .push(format!("{NS}/services/simple-pg-old-1"));
    let err = reconcile::reconcile(Arc::new(cluster(SIMPLE_PG, true)), h.ctx.clone())
        .await
        .unwrap_err();
    assert_eq!(err.category(), "PruneFailed");
    assert!(
        super::error::error_chain(&err).contains("Service simple-pg-old-1"),
        "{}",
        super::error::error_chain(&err)
    );
    // Every deletion was sent, none cut off by the failure.
    let deletes = h
        .requests()
        .into_iter()
        .filter(|r| r.method == Method::DELETE)
        .count();
    assert_eq!(deletes, 4);
}
