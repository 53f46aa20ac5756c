//! Helpers of the control-plane tests (`tests/k8s_*.rs`): clients of the
//! real kube-apiserver that `scripts/test.sh` (or `scripts/control-plane.sh
//! start`) runs, or else one the test binary starts for itself through
//! that script and stops at exit; one namespace per test, server-side
//! apply of YAML, the `deploy/` manifests, pre-bound volumes, pod
//! readiness (no kubelet runs), and the operator in-process under its own
//! ServiceAccount. IO: the Kubernetes API, `kubectl` for printer columns,
//! and `scripts/control-plane.sh` (processes, a temporary directory).
//!
//! Every helper panics with a message saying what it waited for or what
//! the API server answered: these are test helpers.

#![allow(dead_code)] // each test binary uses a part

pub mod k8s_db;
pub mod kubelet;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, PersistentVolume, Pod, ServiceAccount};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch,
    PatchParams, PostParams,
};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::discovery::Scope;
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

/// The kubeconfig (admin) of the control plane under test.
pub const KUBECONFIG_ENV: &str = "STRATUM_TEST_KUBECONFIG";
/// The directory of the control plane's binaries (for `kubectl`).
pub const K8S_BIN_ENV: &str = "STRATUM_K8S_BIN";
/// Field manager of everything the tests apply.
pub const TEST_MANAGER: &str = "stratum-tests";
/// Label on test namespaces and on the volumes made for them.
pub const LABEL_TEST_NAMESPACE: &str = "stratum.dev/test-namespace";
/// Namespace and name of the operator's ServiceAccount in deploy/.
pub const OPERATOR_NAMESPACE: &str = "stratum-system";
pub const OPERATOR_SERVICE_ACCOUNT: &str = "stratum-operator";

const HOW_TO_START: &str = "this test needs the Kubernetes control plane: install Go \
     (https://go.dev/dl, on PATH) and run scripts/setup.sh, which builds and caches its binaries; \
     cargo test then starts one per test binary (or share one: \
     `scripts/control-plane.sh start DIR && source DIR/env`)";

/// Path of a file in the repository.
pub fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// A control plane this test binary started because [`KUBECONFIG_ENV`]
/// was not set.
struct OwnControlPlane {
    kubeconfig: PathBuf,
    bin: PathBuf,
    /// The stopper, holding the write end of its stdin, never closed by
    /// hand: the stopper waits for the end of its input, which comes when
    /// this process exits, whichever way (the test harness runs no
    /// destructor of a static, and a panic or signal would skip one
    /// anyway). Never waited for: it outlives this process.
    _stopper: std::process::Child,
}

static OWN_CONTROL_PLANE: OnceLock<OwnControlPlane> = OnceLock::new();

/// The control plane of this test binary: `scripts/control-plane.sh start`
/// in a fresh directory (it builds the binaries first when they are not
/// cached), stopped and removed by a stopper process when this process
/// exits. Started once, by the first test that needs it.
fn own_control_plane() -> &'static OwnControlPlane {
    OWN_CONTROL_PLANE.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("stratum-test-control-plane.")
            .tempdir()
            .expect("temporary directory for the control plane")
            .keep();
        let script = repo_path("scripts/control-plane.sh");
        let log_path = dir.join("start.log");
        let log = std::fs::File::create(&log_path).expect("control plane start log");
        eprintln!(
            "{KUBECONFIG_ENV} is not set: starting a control plane in {} for this test binary",
            dir.display()
        );
        // The stopper first, so the control plane is stopped even if the
        // start fails half-way. Its own session: Ctrl-C on the tests does
        // not stop it before it has stopped the control plane (whose
        // processes run in sessions of their own too).
        let stopper = std::process::Command::new("setsid")
            .args([
                "bash",
                "-c",
                r#"cat >/dev/null; bash "$0" stop "$1"; rm -rf "$1""#,
            ])
            .arg(&script)
            .arg(&dir)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run setsid (util-linux) to stop the control plane at exit: {e}")
            });
        let status = std::process::Command::new("bash")
            .arg(&script)
            .arg("start")
            .arg(&dir)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .status()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        if !status.success() {
            let out = std::fs::read_to_string(&log_path).unwrap_or_default();
            let tail: Vec<_> = out.lines().rev().take(15).collect();
            let tail: Vec<_> = tail.into_iter().rev().collect();
            panic!(
                "{} start failed ({status}):\n{}\n{HOW_TO_START}",
                script.display(),
                tail.join("\n")
            );
        }
        // What the script exported for shells (`DIR/env`).
        let env = std::fs::read_to_string(dir.join("env")).expect("control plane env file");
        let exported = |var: &str| {
            env.lines()
                .find_map(|l| l.strip_prefix(&format!("export {var}=")))
                .map(PathBuf::from)
                .unwrap_or_else(|| panic!("{} has no {var}", dir.join("env").display()))
        };
        OwnControlPlane {
            kubeconfig: exported(KUBECONFIG_ENV),
            bin: exported(K8S_BIN_ENV),
            _stopper: stopper,
        }
    })
}

/// The kubeconfig of a control plane already running: [`KUBECONFIG_ENV`]
/// or the one this binary started; `None` before either.
fn running_kubeconfig() -> Option<PathBuf> {
    match std::env::var_os(KUBECONFIG_ENV) {
        Some(p) if !p.is_empty() => Some(PathBuf::from(p)),
        _ => OWN_CONTROL_PLANE.get().map(|cp| cp.kubeconfig.clone()),
    }
}

/// The admin kubeconfig path: [`KUBECONFIG_ENV`] (a control plane shared
/// by the whole run, as scripts/test.sh starts), else that of a control
/// plane this test binary starts for itself. Panics (never skips) when
/// none can be started.
pub fn kubeconfig_path() -> PathBuf {
    match std::env::var_os(KUBECONFIG_ENV) {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => own_control_plane().kubeconfig.clone(),
    }
}

/// The directory of the control plane's binaries: [`K8S_BIN_ENV`] with
/// [`KUBECONFIG_ENV`], else those of this binary's own control plane.
pub fn k8s_bin() -> PathBuf {
    match std::env::var_os(KUBECONFIG_ENV) {
        Some(p) if !p.is_empty() => std::env::var_os(K8S_BIN_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                panic!("{K8S_BIN_ENV} is not set (with {KUBECONFIG_ENV}); {HOW_TO_START}")
            }),
        _ => own_control_plane().bin.clone(),
    }
}

/// The admin client configuration.
pub async fn admin_config() -> kube::Config {
    let path = kubeconfig_path();
    let kubeconfig = Kubeconfig::read_from(&path)
        .unwrap_or_else(|e| panic!("cannot read {} ({KUBECONFIG_ENV}): {e}", path.display()));
    kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap_or_else(|e| panic!("invalid kubeconfig {}: {e}", path.display()))
}

/// A client authenticated as the control plane's admin (system:masters).
pub async fn admin() -> Client {
    let client = Client::try_from(admin_config().await).expect("admin client");
    if let Err(e) = client.apiserver_version().await {
        panic!("kube-apiserver of {KUBECONFIG_ENV} does not answer: {e}; {HOW_TO_START}");
    }
    client
}

/// Poll `check` every 200 ms until it returns `Ok`; panic after `timeout`
/// with `what` and the last `Err` (what was seen instead).
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let started = Instant::now();
    loop {
        match check().await {
            Ok(v) => return v,
            Err(last) if started.elapsed() > timeout => {
                panic!("timed out after {timeout:?} waiting for {what}; last seen: {last}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// The YAML documents of a file, as JSON values (empty documents skipped).
pub fn yaml_docs(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| {
            let v: Value = serde::Deserialize::deserialize(doc)
                .unwrap_or_else(|e| panic!("{} is not YAML: {e}", path.display()));
            v
        })
        .filter(|v| !v.is_null())
        .collect()
}

/// The API resource and scope of a manifest's kind, from discovery.
pub async fn resource_of(client: &Client, doc: &Value) -> (ApiResource, Scope) {
    let api_version = doc["apiVersion"].as_str().unwrap_or_default();
    let kind = doc["kind"].as_str().unwrap_or_default();
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let gvk = GroupVersionKind::gvk(group, version, kind);
    let (ar, caps) = kube::discovery::pinned_kind(client, &gvk)
        .await
        .unwrap_or_else(|e| panic!("discovery of {api_version} {kind}: {e}"));
    (ar, caps.scope)
}

/// The dynamic API of a manifest's kind in `ns` (ignored when
/// cluster-scoped; the manifest's own namespace wins).
pub async fn api_for(client: &Client, doc: &Value, ns: &str) -> Api<DynamicObject> {
    let (ar, scope) = resource_of(client, doc).await;
    match scope {
        Scope::Cluster => Api::all_with(client.clone(), &ar),
        Scope::Namespaced => {
            let ns = doc["metadata"]["namespace"].as_str().unwrap_or(ns);
            Api::namespaced_with(client.clone(), ns, &ar)
        }
    }
}

/// Server-side apply of one manifest (field manager [`TEST_MANAGER`]).
pub async fn apply(client: &Client, doc: &Value, ns: &str) -> Result<DynamicObject, kube::Error> {
    let api = api_for(client, doc, ns).await;
    let name = doc["metadata"]["name"].as_str().unwrap_or_default();
    api.patch(
        name,
        &PatchParams::apply(TEST_MANAGER).force(),
        &Patch::Apply(doc),
    )
    .await
}

/// The message of an API error (for assertions on rejections).
pub fn api_message(err: &kube::Error) -> String {
    match err {
        kube::Error::Api(s) => format!("{} ({}): {}", s.reason, s.code, s.message),
        other => other.to_string(),
    }
}

/// Every CRD under deploy/crds/.
pub fn deploy_crds() -> Vec<CustomResourceDefinition> {
    let mut files: Vec<_> = std::fs::read_dir(repo_path("deploy/crds"))
        .expect("deploy/crds")
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
        .iter()
        .flat_map(|f| yaml_docs(f))
        .map(|v| serde_json::from_value(v).expect("a CRD"))
        .collect()
}

/// The served `ApiResource` of a stratum.dev kind, from deploy/crds/.
pub fn stratum_resource(kind: &str) -> ApiResource {
    let crd = deploy_crds()
        .into_iter()
        .find(|c| c.spec.names.kind == kind)
        .unwrap_or_else(|| panic!("no CRD of {kind} in deploy/crds"));
    operator_core::controller::api_resource(&crd).expect("served version")
}

static INSTALLED: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();

/// Apply deploy/stratum.yaml (CRDs, namespace, RBAC, the operator
/// Deployment) with server-side apply, once per test process, and wait for
/// every CRD to be Established.
pub async fn install_deploy(client: &Client) {
    INSTALLED
        .get_or_init(|| async {
            for doc in yaml_docs(&repo_path("deploy/stratum.yaml")) {
                if let Err(e) = apply(client, &doc, "default").await {
                    panic!(
                        "deploy/stratum.yaml: {} {} was rejected: {}",
                        doc["kind"],
                        doc["metadata"]["name"],
                        api_message(&e)
                    );
                }
            }
            let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
            for crd in deploy_crds() {
                let name = crd.metadata.name.clone().unwrap_or_default();
                eventually(
                    &format!("CRD {name} Established"),
                    Duration::from_secs(30),
                    || async {
                        let c = crds.get(&name).await.map_err(|e| e.to_string())?;
                        let conditions = c.status.and_then(|s| s.conditions).unwrap_or_default();
                        if conditions
                            .iter()
                            .any(|c| c.type_ == "Established" && c.status == "True")
                        {
                            Ok(())
                        } else {
                            Err(format!("{conditions:?}"))
                        }
                    },
                )
                .await;
            }
        })
        .await;
}

static NAMESPACE_COUNTER: AtomicU32 = AtomicU32::new(0);

/// A namespace owned by one test: created on [`TestNamespace::create`],
/// deleted (with the volumes made for it) when dropped, even when the test
/// panics.
pub struct TestNamespace {
    /// The namespace name.
    pub name: String,
}

impl TestNamespace {
    /// Create `<prefix>-<pid>-<n>`, unique across test processes sharing
    /// a control plane.
    pub async fn create(client: &Client, prefix: &str) -> Self {
        let n = NAMESPACE_COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("{prefix}-{}-{n}", std::process::id());
        let ns = json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": name, "labels": {LABEL_TEST_NAMESPACE: name}},
        });
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &serde_json::from_value(ns).unwrap())
            .await
            .unwrap_or_else(|e| panic!("create namespace {name}: {}", api_message(&e)));
        Self { name }
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop cannot await, and the test's runtime may be shutting down:
        // clean up on a thread with a runtime of its own.
        let done = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime")
                .block_on(delete_namespace(&name))
        })
        .join();
        if let Err(e) = done {
            eprintln!("cleanup of namespace {} panicked: {e:?}", self.name);
        }
    }
}

/// Delete a test namespace: its clusters first, then its pods without
/// grace, the namespace, and its volumes.
async fn delete_namespace(ns: &str) {
    let Some(path) = running_kubeconfig() else {
        return;
    };
    let Ok(kubeconfig) = Kubeconfig::read_from(path) else {
        return;
    };
    let Ok(config) =
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await
    else {
        return;
    };
    let Ok(client) = Client::try_from(config) else {
        return;
    };
    // Delete the clusters first, so that an operator still running sees
    // them go (its finalizer) before their namespace does; after 10 s,
    // remove the finalizer of what is left.
    let apis: Vec<Api<DynamicObject>> = ["PostgresCluster", "PxcCluster", "MongoCluster"]
        .into_iter()
        .map(|kind| Api::namespaced_with(client.clone(), ns, &stratum_resource(kind)))
        .collect();
    for api in &apis {
        let _ = api
            .delete_collection(&DeleteParams::background(), &ListParams::default())
            .await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for api in &apis {
        while let Ok(list) = api.list_metadata(&ListParams::default()).await {
            if list.items.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                for obj in list.items {
                    let patch = json!({"metadata": {"finalizers": null}});
                    let _ = api
                        .patch(
                            &obj.name_any(),
                            &PatchParams::default(),
                            &Patch::Merge(&patch),
                        )
                        .await;
                }
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    // No kubelet confirms that a pod bound to a node stopped: delete them
    // without grace, or the namespace waits for them forever.
    let _ = Api::<Pod>::namespaced(client.clone(), ns)
        .delete_collection(
            &DeleteParams::background().grace_period(0),
            &ListParams::default(),
        )
        .await;
    let _ = Api::<Namespace>::all(client.clone())
        .delete(ns, &DeleteParams::background())
        .await;
    let _ = Api::<PersistentVolume>::all(client)
        .delete_collection(
            &DeleteParams::background(),
            &ListParams::default().labels(&format!("{LABEL_TEST_NAMESPACE}={ns}")),
        )
        .await;
}

/// A ServiceAccount token of the operator (TokenRequest API, 1 h).
pub async fn operator_token(admin: &Client) -> String {
    let sa: Api<ServiceAccount> = Api::namespaced(admin.clone(), OPERATOR_NAMESPACE);
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: Vec::new(),
            expiration_seconds: Some(3600),
            ..Default::default()
        },
        ..Default::default()
    };
    let answer = sa
        .create_token_request(OPERATOR_SERVICE_ACCOUNT, &PostParams::default(), &request)
        .await
        .unwrap_or_else(|e| panic!("TokenRequest for the operator: {}", api_message(&e)));
    answer.status.expect("TokenRequest status").token
}

/// A client authenticated as the operator's ServiceAccount from deploy/,
/// not as admin: what the operator may do is what its ClusterRole grants.
pub async fn operator_client(admin: &Client) -> Client {
    install_deploy(admin).await;
    let token = operator_token(admin).await;
    let mut config = admin_config().await;
    config.auth_info =
        serde_json::from_value(json!({ "token": token })).expect("token-only AuthInfo");
    Client::try_from(config).expect("operator client")
}

static OPERATOR: OnceLock<()> = OnceLock::new();

/// Start the operator (`operator_core::controller::run` with every engine
/// of this build, all namespaces) once per test process, on a thread and
/// runtime of its own that live as long as the process, with a client
/// authenticated as its ServiceAccount. Instance managers get 500 ms to
/// answer: without a kubelet none runs, and waiting longer only slows the
/// reconciles down.
pub fn start_operator() {
    start_operator_with_instance_timeout(Duration::from_millis(500));
}

/// [`start_operator`] with `instance_timeout` for the instance managers'
/// answers: the end-to-end tests, whose managers run, use the production
/// default (a debug-built manager on a loaded machine can take longer than
/// 500 ms, and a primary that does not answer loses its `rw` label). The
/// first call in a process decides.
pub fn start_operator_with_instance_timeout(instance_timeout: Duration) {
    OPERATOR.get_or_init(|| {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("stratum-operator".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("operator runtime");
                runtime.block_on(async move {
                    let _ = tracing_subscriber::fmt()
                        .with_env_filter(
                            tracing_subscriber::EnvFilter::try_from_default_env()
                                .unwrap_or_else(|_| "warn".into()),
                        )
                        .try_init();
                    let admin = admin().await;
                    let client = operator_client(&admin).await;
                    let mut opts =
                        operator_core::controller::ControllerOptions::new("stratum/operator:test");
                    opts.metrics_addr = ([127, 0, 0, 1], 0).into();
                    opts.instance_timeout = instance_timeout;
                    let _ = ready_tx.send(());
                    if let Err(e) =
                        operator_core::controller::run(client, stratum::registry(), opts).await
                    {
                        eprintln!("the operator stopped: {e:#}");
                    }
                });
            })
            .expect("operator thread");
        ready_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the operator did not start (see the panic above)");
    });
}

/// Volumes for every claim of a StatefulSet's pods: a hostPath
/// PersistentVolume pre-bound (`claimRef`) to each `<template>-<sts>-<n>`,
/// so that the PV binder binds the claims and the scheduler can place the
/// pods. Nothing mounts them: no kubelet runs. Idempotent.
pub async fn provide_volumes(client: &Client, sts: &StatefulSet) {
    let ns = sts.namespace().unwrap_or_default();
    let name = sts.name_any();
    let spec = sts.spec.as_ref().expect("StatefulSet spec");
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    for template in spec.volume_claim_templates.iter().flatten() {
        let claim_spec = template.spec.clone().unwrap_or_default();
        let size = claim_spec
            .resources
            .as_ref()
            .and_then(|r| r.requests.as_ref())
            .and_then(|r| r.get("storage"))
            .map(|q| q.0.clone())
            .unwrap_or_else(|| "1Gi".into());
        for ordinal in 0..spec.replicas.unwrap_or(1) {
            let claim = format!("{}-{name}-{ordinal}", template.name_any());
            let pv_name = format!("{ns}-{claim}");
            let pv = json!({
                "apiVersion": "v1",
                "kind": "PersistentVolume",
                "metadata": {"name": pv_name, "labels": {LABEL_TEST_NAMESPACE: ns}},
                "spec": {
                    "capacity": {"storage": size},
                    "accessModes": claim_spec.access_modes.clone().unwrap_or_else(|| vec!["ReadWriteOnce".into()]),
                    "storageClassName": claim_spec.storage_class_name.clone().unwrap_or_default(),
                    "persistentVolumeReclaimPolicy": "Retain",
                    "hostPath": {"path": format!("/tmp/stratum-fake-pv/{pv_name}")},
                    "claimRef": {"namespace": ns, "name": claim},
                },
            });
            pvs.patch(
                &pv_name,
                &PatchParams::apply(TEST_MANAGER).force(),
                &Patch::Apply(&pv),
            )
            .await
            .unwrap_or_else(|e| panic!("PersistentVolume {pv_name}: {}", api_message(&e)));
        }
    }
}

/// Mark a pod Running and Ready (or not ready), as a kubelet would.
pub async fn set_pod_ready(client: &Client, ns: &str, pod: &str, ready: bool) {
    let status = if ready { "True" } else { "False" };
    let patch = json!({"status": {
        "phase": "Running",
        "conditions": [
            {"type": "Initialized", "status": "True"},
            {"type": "ContainersReady", "status": status},
            {"type": "Ready", "status": status},
        ],
    }});
    Api::<Pod>::namespaced(client.clone(), ns)
        .patch_status(pod, &PatchParams::default(), &Patch::Strategic(&patch))
        .await
        .unwrap_or_else(|e| panic!("mark pod {ns}/{pod} ready={ready}: {}", api_message(&e)));
}

/// The zone of every node (`topology.kubernetes.io/zone`).
pub async fn node_zones(client: &Client) -> BTreeMap<String, String> {
    Api::<k8s_openapi::api::core::v1::Node>::all(client.clone())
        .list(&ListParams::default())
        .await
        .expect("list nodes")
        .items
        .into_iter()
        .map(|n| {
            let zone = n
                .labels()
                .get("topology.kubernetes.io/zone")
                .cloned()
                .unwrap_or_default();
            (n.name_any(), zone)
        })
        .collect()
}

/// Events about one object in a namespace (events.k8s.io/v1).
pub async fn events_about(client: &Client, ns: &str, name: &str) -> Vec<Event> {
    Api::<Event>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
        .expect("list events")
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .collect()
}

/// Fail when the operator reported a failed reconcile step (Warning Events
/// with a `...Failed` reason, e.g. `ApplyFailed` on a forbidden PATCH):
/// under its own ServiceAccount, such an Event is an RBAC or controller
/// bug.
pub async fn assert_no_failures(client: &Client, ns: &str) {
    let failures: Vec<String> = Api::<Event>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
        .expect("list events")
        .items
        .into_iter()
        .filter(|e| {
            e.type_.as_deref() == Some("Warning")
                && e.reason.as_deref().is_some_and(|r| r.ends_with("Failed"))
        })
        .map(|e| {
            format!(
                "{} {}: {}",
                e.regarding
                    .as_ref()
                    .and_then(|r| r.name.clone())
                    .unwrap_or_default(),
                e.reason.unwrap_or_default(),
                e.note.unwrap_or_default()
            )
        })
        .collect();
    assert!(
        failures.is_empty(),
        "the operator reported failures in {ns}:\n{}",
        failures.join("\n")
    );
}

/// Run the control plane's kubectl (from [`K8S_BIN_ENV`]) as admin.
pub fn kubectl(args: &[&str]) -> String {
    let out = std::process::Command::new(k8s_bin().join("kubectl"))
        .arg("--kubeconfig")
        .arg(kubeconfig_path())
        .args(args)
        .output()
        .expect("run kubectl");
    assert!(
        out.status.success(),
        "kubectl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The `stratum controller` binary of this build as a process of its own,
/// authenticated as the operator's ServiceAccount (a kubeconfig with a
/// TokenRequest token), metrics on a free loopback port. Killed on drop.
pub struct OperatorProcess {
    /// The process.
    pub child: std::process::Child,
    /// Port of its /metrics and /healthz server.
    pub port: u16,
    /// Holds the kubeconfig and `operator.log`.
    pub dir: tempfile::TempDir,
}

impl OperatorProcess {
    /// Start it (watching only `namespace` when given) and wait until its
    /// metrics server answers. It elects itself leader on a Lease of its
    /// own, so that operators of tests running side by side never wait
    /// for each other.
    pub async fn start(admin: &Client, namespace: Option<&str>) -> Self {
        static LEASES: AtomicU32 = AtomicU32::new(0);
        let lease = format!(
            "stratum-test-{}-{}",
            std::process::id(),
            LEASES.fetch_add(1, Ordering::SeqCst)
        );
        Self::start_with_lease(admin, namespace, &lease, &lease).await
    }

    /// Start it with leader election on the Lease `lease` (in the
    /// operator namespace) as `identity`.
    pub async fn start_with_lease(
        admin: &Client,
        namespace: Option<&str>,
        lease: &str,
        identity: &str,
    ) -> Self {
        Self::start_via(admin, namespace, lease, identity, None).await
    }

    /// [`Self::start_with_lease`], reaching the API server at `server`
    /// (e.g. `https://127.0.0.1:PORT` of a proxy the test can cut) instead
    /// of its own address when given.
    pub async fn start_via(
        admin: &Client,
        namespace: Option<&str>,
        lease: &str,
        identity: &str,
        server: Option<&str>,
    ) -> Self {
        Self::spawn(admin, namespace, lease, identity, server, 500).await
    }

    /// [`Self::start`] for clusters whose instance managers run (the
    /// end-to-end tests): the production instance timeout (3 s) instead of
    /// 500 ms, since a debug-built manager on a loaded machine may answer
    /// later and a primary that does not answer is failed over.
    pub async fn start_for_instances(admin: &Client, namespace: Option<&str>) -> Self {
        static LEASES: AtomicU32 = AtomicU32::new(0);
        let lease = format!(
            "stratum-test-i{}-{}",
            std::process::id(),
            LEASES.fetch_add(1, Ordering::SeqCst)
        );
        Self::spawn(admin, namespace, &lease, &lease, None, 3000).await
    }

    async fn spawn(
        admin: &Client,
        namespace: Option<&str>,
        lease: &str,
        identity: &str,
        server: Option<&str>,
        instance_timeout_ms: u64,
    ) -> Self {
        install_deploy(admin).await;
        let token = operator_token(admin).await;
        let admin_kc = Kubeconfig::read_from(kubeconfig_path()).expect("admin kubeconfig");
        let cluster = admin_kc.clusters[0].cluster.clone().expect("cluster");
        let dir = tempfile::tempdir().expect("tempdir");
        let kubeconfig = dir.path().join("operator.kubeconfig");
        let config = json!({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "c", "cluster": {
                "server": server.map(str::to_string).or(cluster.server),
                "certificate-authority": cluster.certificate_authority,
            }}],
            "users": [{"name": OPERATOR_SERVICE_ACCOUNT, "user": {"token": token}}],
            "contexts": [{"name": "x", "context": {"cluster": "c", "user": OPERATOR_SERVICE_ACCOUNT}}],
            "current-context": "x",
        });
        std::fs::write(&kubeconfig, config.to_string()).expect("write kubeconfig");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let log = std::fs::File::create(dir.path().join("operator.log")).expect("log");
        // STRATUM_OPERATOR_BIN: another build of the binary (the benchmark
        // measures a release build with this debug-built harness).
        let bin = std::env::var_os("STRATUM_OPERATOR_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_stratum")));
        let mut command = std::process::Command::new(bin);
        command
            .args(["controller", "--operator-image", "stratum/operator:test"])
            .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
            .args(["--instance-timeout-ms", &instance_timeout_ms.to_string()])
            .args(["--lease-name", lease, "--identity", identity])
            .args(["--lease-namespace", OPERATOR_NAMESPACE])
            .env("KUBECONFIG", &kubeconfig)
            // STRATUM_TEST_OPERATOR_LOG: a filter of its own, e.g.
            // `info` to see the steps of a switchover with their times.
            .env(
                "RUST_LOG",
                std::env::var("STRATUM_TEST_OPERATOR_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .env_remove("STRATUM_WATCH_NAMESPACE")
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        if let Some(ns) = namespace {
            command.args(["--namespace", ns]);
        }
        let child = command.spawn().expect("start stratum controller");
        let process = Self { child, port, dir };
        eventually(
            "the operator's metrics server",
            Duration::from_secs(30),
            || async {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .map(|_| ())
                    .map_err(|e| format!("{e}; log: {}", process.log()))
            },
        )
        .await;
        process
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("operator.log")).unwrap_or_default()
    }

    /// Stop it (SIGKILL: a crash, the harshest restart).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Send SIGTERM (what Kubernetes sends a pod that is stopped).
    pub fn terminate(&self) {
        let status = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill(1)");
        assert!(status.success(), "kill -TERM failed: {status}");
    }

    /// Wait up to `limit` for the process to exit; its status if it did.
    pub async fn exited_within(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let until = std::time::Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for the operator") {
                return Some(status);
            }
            if std::time::Instant::now() >= until {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
