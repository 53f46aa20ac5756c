//! The operator on a real control plane (kube-apiserver, controller
//! manager, scheduler, fake Nodes in three zones), running in-process with
//! a client authenticated as its own ServiceAccount from deploy/ (never as
//! admin): it reconciles the examples into StatefulSets, Services, PDBs,
//! ConfigMaps and Secrets that the StatefulSet controller and the scheduler
//! act on; status follows pod readiness (the tests play the kubelet);
//! deletion runs the finalizer and garbage collection; spec changes update
//! the StatefulSet in place; orphans are pruned; a PxcCluster's HAProxy
//! Deployment follows `spec.proxy`; the RBAC table of
//! operator-core/src/controller/mod.rs is what deploy/ grants.
//!
//! Needs the control plane of scripts/test.sh (`STRATUM_TEST_KUBECONFIG`);
//! fails without it.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Pod, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, PolicyRule, Role};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, Resource, ResourceExt};
use serde_json::{Value, json};
use support::k8s_db::{condition, patch_spec, wait_status};
use support::*;

const WAIT: Duration = Duration::from_secs(60);

fn example(file: &str, kind: &str) -> Value {
    yaml_docs(&repo_path(&format!("deploy/examples/{file}")))
        .into_iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} in {file}"))
}

/// Apply every document of an example into `ns` as admin (a user), and
/// return the cluster object's API and the document.
async fn create_example(
    client: &Client,
    ns: &str,
    file: &str,
    kind: &str,
) -> (Api<DynamicObject>, Value) {
    for doc in yaml_docs(&repo_path(&format!("deploy/examples/{file}"))) {
        apply(client, &doc, ns)
            .await
            .unwrap_or_else(|e| panic!("{file}: {}", api_message(&e)));
    }
    let doc = example(file, kind);
    (
        Api::namespaced_with(client.clone(), ns, &stratum_resource(kind)),
        doc,
    )
}

/// An example applied (see [`create_example`]) and its cluster object
/// once the API server has it: the API, the document and the object.
async fn created_example(
    client: &Client,
    ns: &str,
    file: &str,
    kind: &str,
) -> (Api<DynamicObject>, Value, DynamicObject) {
    let (api, doc) = create_example(client, ns, file, kind).await;
    let name = doc["metadata"]["name"].as_str().unwrap().to_string();
    let cluster = eventually("the cluster's uid", WAIT, || async {
        api.get(&name).await.map_err(|e| e.to_string())
    })
    .await;
    (api, doc, cluster)
}

/// The admin client, the in-process operator started, and a namespace
/// of the test's own.
async fn operator_test(prefix: &str) -> (Client, TestNamespace) {
    let client = admin().await;
    start_operator();
    let ns = TestNamespace::create(&client, prefix).await;
    (client, ns)
}

/// [`operator_test`] with the pxc example created in its namespace: the
/// client, the namespace, the cluster's API and object.
async fn pxc_example(prefix: &str) -> (Client, TestNamespace, Api<DynamicObject>, DynamicObject) {
    let (client, ns) = operator_test(prefix).await;
    let (api, _, cluster) = created_example(&client, &ns.name, "pxc.yaml", "PxcCluster").await;
    (client, ns, api, cluster)
}

/// Wait until the Events about `name` include every reason of `wanted`.
async fn wait_event_reasons(client: &Client, ns: &str, name: &str, what: &str, wanted: &[&str]) {
    eventually(what, WAIT, || async {
        let reasons: BTreeSet<_> = events_about(client, ns, name)
            .await
            .into_iter()
            .filter_map(|e| e.reason)
            .collect();
        if wanted.iter().all(|r| reasons.contains(*r)) {
            Ok(())
        } else {
            Err(format!("{reasons:?}"))
        }
    })
    .await;
}

async fn get<K>(client: &Client, ns: &str, name: &str) -> Result<K, String>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    Api::<K>::namespaced(client.clone(), ns)
        .get(name)
        .await
        .map_err(|e| format!("{} {name}: {}", K::kind(&()), api_message(&e)))
}

async fn wait_get<K>(client: &Client, ns: &str, name: &str) -> K
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    eventually(&format!("{} {ns}/{name}", K::kind(&())), WAIT, || {
        get::<K>(client, ns, name)
    })
    .await
}

async fn wait_gone<K>(client: &Client, ns: &str, name: &str)
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    eventually(
        &format!("{} {ns}/{name} to be deleted", K::kind(&())),
        WAIT,
        || async {
            match Api::<K>::namespaced(client.clone(), ns).get_opt(name).await {
                Ok(None) => Ok(()),
                Ok(Some(o)) => Err(format!("still there: {:?}", o.meta().deletion_timestamp)),
                Err(e) => Err(e.to_string()),
            }
        },
    )
    .await
}

/// The child is owned by the cluster (controller, blockOwnerDeletion).
fn assert_owned(meta: &ObjectMeta, cluster: &DynamicObject, what: &str) {
    let refs = meta.owner_references.clone().unwrap_or_default();
    assert!(
        refs.iter()
            .any(|r| Some(&r.uid) == cluster.metadata.uid.as_ref()
                && r.controller == Some(true)
                && r.block_owner_deletion == Some(true)
                && Some(r.kind.as_str()) == cluster.types.as_ref().map(|t| t.kind.as_str())),
        "{what} is not owned by the cluster: {refs:?}"
    );
}

/// Every child of a cluster: StatefulSet, headless/-rw/-ro/-r Services,
/// PDB, ConfigMap, Secret, all owned by it; returns the StatefulSet.
async fn assert_children(client: &Client, ns: &str, cluster: &DynamicObject) -> StatefulSet {
    let name = cluster.name_any();
    let sts: StatefulSet = wait_get(client, ns, &name).await;
    assert_owned(&sts.metadata, cluster, "StatefulSet");
    let managers: Vec<_> = sts
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|m| m.operation.as_deref() == Some("Apply"))
        .filter_map(|m| m.manager.clone())
        .collect();
    assert!(
        managers.iter().any(|m| m == "stratum-operator"),
        "StatefulSet not server-side applied by stratum-operator: {managers:?}"
    );
    let headless: Service = wait_get(client, ns, &format!("{name}-headless")).await;
    assert_eq!(
        headless.spec.as_ref().unwrap().cluster_ip.as_deref(),
        Some("None")
    );
    assert_owned(&headless.metadata, cluster, "headless Service");
    for suffix in ["rw", "ro", "r"] {
        let svc: Service = wait_get(client, ns, &format!("{name}-{suffix}")).await;
        assert_owned(&svc.metadata, cluster, &format!("Service -{suffix}"));
    }
    let pdb: PodDisruptionBudget = wait_get(client, ns, &name).await;
    assert_owned(&pdb.metadata, cluster, "PodDisruptionBudget");
    let cm: ConfigMap = wait_get(client, ns, &format!("{name}-config")).await;
    assert_owned(&cm.metadata, cluster, "ConfigMap");
    let secret: Secret = wait_get(client, ns, &format!("{name}-credentials")).await;
    assert_owned(&secret.metadata, cluster, "Secret");
    sts
}

/// Play the kubelet: mark every scheduled pod of the cluster Running and
/// Ready as it appears (OrderedReady creates the next pod only then),
/// until `replicas` pods are ready; returns them.
async fn run_pods(client: &Client, ns: &str, cluster: &str, replicas: usize) -> Vec<Pod> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    eventually(
        &format!("{replicas} ready pods of {ns}/{cluster}"),
        Duration::from_secs(120),
        || async {
            let list = pods
                // Database pods only (they carry the kind label; the
                // HAProxy pods of a Galera cluster do not).
                .list(
                    &ListParams::default()
                        .labels(&format!("stratum.dev/cluster={cluster},stratum.dev/kind")),
                )
                .await
                .map_err(|e| e.to_string())?
                .items;
            let mut ready = Vec::new();
            let mut waiting = Vec::new();
            for pod in list {
                let scheduled = pod.spec.as_ref().and_then(|s| s.node_name.clone());
                let is_ready = pod
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
                match (scheduled, is_ready) {
                    (Some(_), true) => ready.push(pod),
                    (Some(_), false) => {
                        set_pod_ready(client, ns, &pod.name_any(), true).await;
                        waiting.push(format!("{}: marked ready", pod.name_any()));
                    }
                    (None, _) => waiting.push(format!(
                        "{}: not scheduled: {:?}",
                        pod.name_any(),
                        pod.status.and_then(|s| s.conditions)
                    )),
                }
            }
            if ready.len() == replicas {
                Ok(ready)
            } else {
                Err(format!("{} ready; {waiting:?}", ready.len()))
            }
        },
    )
    .await
}

fn secret_data(secret: &Secret) -> BTreeMap<String, Vec<u8>> {
    secret
        .data
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.0))
        .collect()
}

#[tokio::test]
async fn postgres_ha_lifecycle_under_the_operator_service_account() {
    let (client, namespace) = operator_test("pg-ha").await;
    let ns = namespace.name.clone();
    let (api, _) = create_example(&client, &ns, "postgres-ha.yaml", "PostgresCluster").await;

    // The finalizer goes on first; then every child, owned by the cluster.
    let cluster = eventually("the finalizer", WAIT, || async {
        let c = api.get("pg-ha").await.map_err(|e| e.to_string())?;
        if c.finalizers().iter().any(|f| f == "stratum.dev/finalizer") {
            Ok(c)
        } else {
            Err(format!("{:?}", c.finalizers()))
        }
    })
    .await;
    let sts = assert_children(&client, &ns, &cluster).await;
    assert_eq!(sts.spec.as_ref().unwrap().replicas, Some(3));
    let status = wait_status(&api, "pg-ha", "phase Creating", WAIT, |s| {
        s["phase"] == "Creating"
    })
    .await;
    assert_eq!(
        condition(&status, "Ready").unwrap()["status"],
        "False",
        "{status}"
    );

    // The credentials Secret is created once.
    let secret: Secret = get(&client, &ns, "pg-ha-credentials").await.unwrap();
    let values = secret_data(&secret);
    assert!(!values.is_empty());

    // The StatefulSet controller creates pods and claims; the scheduler
    // places them (volumes pre-bound, no kubelet: the test marks them
    // ready) and spreads them over the zones.
    provide_volumes(&client, &sts).await;
    let pods = run_pods(&client, &ns, "pg-ha", 3).await;
    let zones = node_zones(&client).await;
    let used: BTreeSet<_> = pods
        .iter()
        .map(|p| zones[p.spec.as_ref().unwrap().node_name.as_ref().unwrap()].clone())
        .collect();
    assert_eq!(
        used.len(),
        3,
        "pods not spread over the zones: {:?}",
        pods.iter()
            .map(|p| (p.name_any(), p.spec.as_ref().unwrap().node_name.clone()))
            .collect::<Vec<_>>()
    );
    let claims: Vec<String> = Api::<PersistentVolumeClaim>::namespaced(client.clone(), &ns)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .map(|c| c.name_any())
        .collect();
    for n in 0..3 {
        for template in ["data", "wal"] {
            let claim = format!("{template}-pg-ha-{n}");
            assert!(claims.contains(&claim), "no claim {claim}: {claims:?}");
        }
    }

    // Status follows readiness: Healthy, 3/3, pg-ha-0 routed as writer.
    let status = wait_status(&api, "pg-ha", "phase Healthy", WAIT, |s| {
        s["phase"] == "Healthy"
    })
    .await;
    assert_eq!(status["ready"], "3/3", "{status}");
    assert_eq!(status["currentPrimary"], "pg-ha-0", "{status}");
    assert_eq!(condition(&status, "Ready").unwrap()["status"], "True");
    let rw: Pod = get(&client, &ns, "pg-ha-0").await.unwrap();
    assert_eq!(
        rw.labels().get("stratum.dev/route").map(String::as_str),
        Some("rw")
    );
    let out = kubectl(&["get", "postgresclusters", "-n", &ns]);
    let row: Vec<&str> = out.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(&row[..4], ["pg-ha", "3/3", "pg-ha-0", "Healthy"], "{out}");

    // A lost instance degrades the cluster.
    set_pod_ready(&client, &ns, "pg-ha-2", false).await;
    let status = wait_status(&api, "pg-ha", "phase Degraded", WAIT, |s| {
        s["phase"] == "Degraded"
    })
    .await;
    assert_eq!(condition(&status, "Degraded").unwrap()["status"], "True");
    assert_eq!(status["ready"], "2/3");
    set_pod_ready(&client, &ns, "pg-ha-2", true).await;
    wait_status(&api, "pg-ha", "phase Healthy again", WAIT, |s| {
        s["phase"] == "Healthy"
    })
    .await;

    // Another reconcile (a spec change) leaves the Secret's values alone.
    let patch = json!({"spec": {"postgresql": {"parameters": {"max_connections": "150"}}}});
    let changed = api
        .patch("pg-ha", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let generation = changed.metadata.generation.unwrap();
    wait_status(&api, "pg-ha", "the new generation observed", WAIT, |s| {
        s["observedGeneration"] == generation
    })
    .await;
    let cm: ConfigMap = get(&client, &ns, "pg-ha-config").await.unwrap();
    assert!(
        format!("{:?}", cm.data).contains("150"),
        "the parameter did not reach the ConfigMap: {:?}",
        cm.data
    );
    let again: Secret = get(&client, &ns, "pg-ha-credentials").await.unwrap();
    assert_eq!(secret_data(&again), values, "the Secret was overwritten");

    // Events of the state changes.
    wait_event_reasons(
        &client,
        &ns,
        "pg-ha",
        "the Events of the state changes",
        &[
            "CredentialsCreated",
            "Healthy",
            "Degraded",
            "PrimaryChanged",
        ],
    )
    .await;
    assert_no_failures(&client, &ns).await;

    // Deletion: the finalizer runs, garbage collection takes the children;
    // the claims stay (retention policy Retain).
    api.delete("pg-ha", &DeleteParams::default()).await.unwrap();
    eventually("the cluster to be gone", WAIT, || async {
        match api.get_opt("pg-ha").await {
            Ok(None) => Ok(()),
            Ok(Some(c)) => Err(format!("finalizers {:?}", c.finalizers())),
            Err(e) => Err(e.to_string()),
        }
    })
    .await;
    wait_gone::<StatefulSet>(&client, &ns, "pg-ha").await;
    for svc in ["pg-ha-headless", "pg-ha-rw", "pg-ha-ro", "pg-ha-r"] {
        wait_gone::<Service>(&client, &ns, svc).await;
    }
    wait_gone::<PodDisruptionBudget>(&client, &ns, "pg-ha").await;
    wait_gone::<ConfigMap>(&client, &ns, "pg-ha-config").await;
    wait_gone::<Secret>(&client, &ns, "pg-ha-credentials").await;
    get::<PersistentVolumeClaim>(&client, &ns, "data-pg-ha-0")
        .await
        .expect("claims are retained");
    // Late watch events of the deleted cluster (its children going) were
    // no failures either.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_no_failures(&client, &ns).await;
}

/// Reconcile one example up to Healthy; returns the pods.
async fn example_reaches_healthy(
    client: &Client,
    file: &str,
    kind: &str,
    prefix: &str,
) -> (TestNamespace, Vec<Pod>) {
    let ns = TestNamespace::create(client, prefix).await;
    let (api, doc, cluster) = created_example(client, &ns.name, file, kind).await;
    let name = cluster.name_any();
    let instances = doc["spec"]["instances"].as_u64().unwrap() as usize;
    let sts = assert_children(client, &ns.name, &cluster).await;
    assert_eq!(
        sts.spec.as_ref().unwrap().replicas,
        Some(instances as i32),
        "{file}"
    );
    provide_volumes(client, &sts).await;
    let pods = run_pods(client, &ns.name, &name, instances).await;
    let status = wait_status(&api, &name, &format!("{file}: Healthy"), WAIT, |s| {
        s["phase"] == "Healthy"
    })
    .await;
    assert_eq!(
        status["ready"],
        format!("{instances}/{instances}"),
        "{status}"
    );
    assert_no_failures(client, &ns.name).await;
    (ns, pods)
}

#[tokio::test]
async fn every_example_cluster_is_reconciled() {
    let client = admin().await;
    start_operator();
    let (single, pxc, mongo) = tokio::join!(
        example_reaches_healthy(
            &client,
            "postgres-single.yaml",
            "PostgresCluster",
            "pg-single"
        ),
        example_reaches_healthy(&client, "pxc.yaml", "PxcCluster", "pxc"),
        example_reaches_healthy(&client, "mongo.yaml", "MongoCluster", "mongo"),
    );
    assert_eq!(single.1.len(), 1);
    assert_eq!(mongo.1.len(), 3);
    // PxcCluster asks for required anti-affinity: three distinct nodes.
    let nodes: BTreeSet<_> = pxc
        .1
        .iter()
        .map(|p| p.spec.as_ref().unwrap().node_name.clone())
        .collect();
    assert_eq!(nodes.len(), 3, "{nodes:?}");
}

#[tokio::test]
async fn spec_change_updates_the_statefulset_in_place() {
    let (client, ns) = operator_test("pg-change").await;
    let (api, _) =
        create_example(&client, &ns.name, "postgres-single.yaml", "PostgresCluster").await;
    let sts: StatefulSet = wait_get(&client, &ns.name, "pg-single").await;
    let uid = sts.metadata.uid.clone();

    // Someone else owns some fields of the StatefulSet.
    let sts_api: Api<StatefulSet> = Api::namespaced(client.clone(), &ns.name);
    let theirs = json!({
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": "pg-single", "annotations": {"example.com/owner": "team-a"}},
        "spec": {"template": {"metadata": {"annotations": {"example.com/injected": "yes"}}}},
    });
    sts_api
        .patch(
            "pg-single",
            &PatchParams::apply("other-controller"),
            &Patch::Apply(&theirs),
        )
        .await
        .unwrap();

    let spec = json!({
        "instances": 3,
        "resources": {"requests": {"cpu": "300m", "memory": "300Mi"}, "limits": {"memory": "600Mi"}},
    });
    patch_spec(&api, "pg-single", &spec).await;
    let sts = eventually("3 replicas and the new resources", WAIT, || async {
        let sts = sts_api.get("pg-single").await.map_err(|e| e.to_string())?;
        let spec = sts.spec.clone().unwrap();
        let resources = spec.template.spec.as_ref().unwrap().containers[0]
            .resources
            .clone()
            .unwrap_or_default();
        let cpu = resources
            .requests
            .as_ref()
            .and_then(|r| r.get("cpu"))
            .map(|q| q.0.clone());
        if spec.replicas == Some(3) && cpu.as_deref() == Some("300m") {
            Ok(sts)
        } else {
            Err(format!(
                "replicas {:?}, resources {resources:?}",
                spec.replicas
            ))
        }
    })
    .await;
    assert_eq!(sts.metadata.uid, uid, "the StatefulSet was replaced");
    assert_eq!(
        sts.annotations()
            .get("example.com/owner")
            .map(String::as_str),
        Some("team-a"),
        "another manager's annotation was removed"
    );
    let template_annotations = sts
        .spec
        .as_ref()
        .unwrap()
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.annotations.clone())
        .unwrap_or_default();
    assert_eq!(
        template_annotations
            .get("example.com/injected")
            .map(String::as_str),
        Some("yes"),
        "another manager's template annotation was removed"
    );
    let managers: BTreeSet<_> = sts
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter_map(|m| m.manager.clone())
        .collect();
    assert!(
        managers.contains("stratum-operator") && managers.contains("other-controller"),
        "{managers:?}"
    );
    // The new pods come up too.
    provide_volumes(&client, &sts).await;
    run_pods(&client, &ns.name, "pg-single", 3).await;
    assert_no_failures(&client, &ns.name).await;
}

#[tokio::test]
async fn orphaned_network_policy_is_deleted() {
    let (client, ns) = operator_test("pg-netpol").await;
    let mut doc = example("postgres-single.yaml", "PostgresCluster");
    doc["metadata"]["annotations"] = json!({"stratum.dev/network-policy": "true"});
    apply(&client, &doc, &ns.name).await.unwrap();
    let api: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        &ns.name,
        &stratum_resource("PostgresCluster"),
    );
    let np: NetworkPolicy = wait_get(&client, &ns.name, "pg-single").await;
    let cluster = api.get("pg-single").await.unwrap();
    assert_owned(&np.metadata, &cluster, "NetworkPolicy");

    doc["metadata"]["annotations"] = json!({});
    apply(&client, &doc, &ns.name).await.unwrap();
    wait_gone::<NetworkPolicy>(&client, &ns.name, "pg-single").await;
    // The Event follows the deletion.
    wait_event_reasons(
        &client,
        &ns.name,
        "pg-single",
        "the OrphanDeleted Event",
        &["OrphanDeleted"],
    )
    .await;
    // The rest stays.
    get::<StatefulSet>(&client, &ns.name, "pg-single")
        .await
        .unwrap();
    assert_no_failures(&client, &ns.name).await;
}

/// `spec.proxy.type: haproxy` (the pxc example): a Deployment and a
/// ConfigMap `<cluster>-haproxy` owned by the cluster, the `-rw`/`-ro`
/// Services on the HAProxy pods; a changed proxy spec updates the
/// Deployment in place; `type: none` deletes both and points the Services
/// back at the members' route label.
#[tokio::test]
async fn pxc_haproxy_deployment_follows_spec_proxy() {
    let (client, ns, api, cluster) = pxc_example("pxc-proxy").await;
    let name = cluster.name_any();
    let proxy = format!("{name}-haproxy");

    let deployment: Deployment = wait_get(&client, &ns.name, &proxy).await;
    assert_owned(&deployment.metadata, &cluster, "HAProxy Deployment");
    let spec = deployment.spec.clone().unwrap();
    assert_eq!(spec.replicas, Some(2));
    let pod = spec.template.spec.clone().unwrap();
    let container = &pod.containers[0];
    assert_eq!(container.image.as_deref(), Some("haproxy:2.8"));
    let mount = &container.volume_mounts.as_ref().unwrap()[0];
    assert_eq!(mount.mount_path, "/usr/local/etc/haproxy");
    let volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .expect("the mounted volume");
    assert_eq!(volume.config_map.as_ref().unwrap().name, proxy);
    let hash = spec
        .template
        .metadata
        .as_ref()
        .unwrap()
        .annotations
        .as_ref()
        .unwrap()["stratum.dev/haproxy-config-sha256"]
        .clone();

    let cm: ConfigMap = wait_get(&client, &ns.name, &proxy).await;
    assert_owned(&cm.metadata, &cluster, "HAProxy ConfigMap");
    let cfg = cm.data.as_ref().unwrap()["haproxy.cfg"].clone();
    let server = |i: u32, backup: &str| {
        format!(
            "server {name}-{i} {name}-{i}.{name}-headless.{}.svc.cluster.local:3306 check port 8000{backup}\n",
            ns.name
        )
    };
    assert!(cfg.contains(&server(0, "")), "{cfg}");
    assert!(cfg.contains(&server(2, " backup")), "{cfg}");

    let proxy_selector = BTreeMap::from([
        ("stratum.dev/cluster".to_string(), name.clone()),
        ("stratum.dev/component".to_string(), "haproxy".to_string()),
    ]);
    for (suffix, target) in [("rw", "rw"), ("ro", "ro")] {
        let svc: Service = wait_get(&client, &ns.name, &format!("{name}-{suffix}")).await;
        let spec = svc.spec.unwrap();
        assert_eq!(spec.selector.as_ref(), Some(&proxy_selector), "-{suffix}");
        let port = &spec.ports.unwrap()[0];
        assert_eq!(port.port, 3306);
        assert_eq!(
            port.target_port,
            Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(target.into()))
        );
    }
    // The Deployment is valid for the Deployment controller: its pods
    // exist and carry what the Services select.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    eventually("2 HAProxy pods", WAIT, || async {
        let n = pods
            .list(&ListParams::default().labels("stratum.dev/component=haproxy"))
            .await
            .map_err(|e| e.to_string())?
            .items
            .len();
        if n == 2 {
            Ok(())
        } else {
            Err(format!("{n} pods"))
        }
    })
    .await;

    // More proxies and another image: the same Deployment, updated; more
    // members: a new configuration, so the pod template changes.
    let spec = json!({
        "instances": 5,
        "proxy": {"instances": 3, "image": "example.invalid/haproxy:2.9"},
    });
    patch_spec(&api, &name, &spec).await;
    let deploy_api: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    eventually("3 proxies, the new image and config", WAIT, || async {
        let d = deploy_api.get(&proxy).await.map_err(|e| e.to_string())?;
        let spec = d.spec.unwrap();
        let image = spec.template.spec.as_ref().unwrap().containers[0]
            .image
            .clone();
        let new_hash = spec
            .template
            .metadata
            .as_ref()
            .unwrap()
            .annotations
            .as_ref()
            .unwrap()["stratum.dev/haproxy-config-sha256"]
            .clone();
        if spec.replicas == Some(3)
            && image.as_deref() == Some("example.invalid/haproxy:2.9")
            && new_hash != hash
        {
            assert_eq!(d.metadata.uid, deployment.metadata.uid, "replaced");
            Ok(())
        } else {
            Err(format!("{:?} {image:?} {new_hash}", spec.replicas))
        }
    })
    .await;

    // No proxy: both go, the Services select the members again.
    patch_spec(&api, &name, &json!({"proxy": {"type": "none"}})).await;
    wait_gone::<Deployment>(&client, &ns.name, &proxy).await;
    wait_gone::<ConfigMap>(&client, &ns.name, &proxy).await;
    let svc_api: Api<Service> = Api::namespaced(client.clone(), &ns.name);
    for route in ["rw", "ro"] {
        eventually(&format!("-{route} on the members"), WAIT, || async {
            let svc = svc_api
                .get(&format!("{name}-{route}"))
                .await
                .map_err(|e| e.to_string())?;
            let spec = svc.spec.unwrap();
            let selector = spec.selector.unwrap_or_default();
            let target = spec.ports.unwrap_or_default()[0].target_port.clone();
            let want = BTreeMap::from([
                ("stratum.dev/cluster".to_string(), name.clone()),
                ("stratum.dev/kind".to_string(), "PxcCluster".to_string()),
                ("stratum.dev/route".to_string(), route.to_string()),
            ]);
            let mysql = Some(
                k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String("mysql".into()),
            );
            if selector == want && target == mysql {
                Ok(())
            } else {
                Err(format!("{selector:?} {target:?}"))
            }
        })
        .await;
    }
    // The cluster's own children stay.
    get::<StatefulSet>(&client, &ns.name, &name).await.unwrap();
    get::<ConfigMap>(&client, &ns.name, &format!("{name}-config"))
        .await
        .unwrap();
    assert_no_failures(&client, &ns.name).await;
}

/// PxcCluster encrypts cluster traffic by default: the operator creates
/// `<cluster>-ssl-internal` (type kubernetes.io/tls plus `ca.crt`, owned by
/// the cluster) once and mounts it in every member; later reconciles of a
/// changed spec never replace it; with `spec.tls.secretName` the pods
/// mount the user's Secret instead and the generated one is left alone.
#[tokio::test]
async fn pxc_tls_secret_is_generated_once_and_a_users_is_mounted() {
    let (client, ns, api, cluster) = pxc_example("pxc-tls").await;
    let name = cluster.name_any();
    let tls_name = format!("{name}-ssl-internal");
    let secret: Secret = wait_get(&client, &ns.name, &tls_name).await;
    assert_owned(&secret.metadata, &cluster, "TLS Secret");
    assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
    let data = secret.data.clone().unwrap();
    assert_eq!(
        data.keys().map(String::as_str).collect::<Vec<_>>(),
        ["ca.crt", "tls.crt", "tls.key"]
    );
    let tls_volume = |sts: &StatefulSet| {
        let pod = sts.spec.as_ref()?.template.spec.as_ref()?;
        let volume = pod.volumes.iter().flatten().find(|v| v.name == "tls")?;
        let mounted = pod.containers[0]
            .volume_mounts
            .iter()
            .flatten()
            .any(|m| m.name == "tls" && m.mount_path == "/etc/stratum/tls");
        mounted.then(|| volume.secret.as_ref()?.secret_name.clone())?
    };
    let sts: StatefulSet = wait_get(&client, &ns.name, &name).await;
    assert_eq!(tls_volume(&sts), Some(tls_name.clone()));

    // A changed spec is built again (a new random CA in the desired
    // objects) and applied: the stored Secret stays as it was.
    let spec = json!({"configuration": "[mysqld]\nmax_connections = 260\n"});
    patch_spec(&api, &name, &spec).await;
    eventually("the new configuration applied", WAIT, || async {
        let cm: ConfigMap = get(&client, &ns.name, &format!("{name}-config")).await?;
        let json = cm.data.unwrap_or_default()["instance.json"].clone();
        if json.contains("260") {
            Ok(())
        } else {
            Err("not yet".to_string())
        }
    })
    .await;
    let after: Secret = get(&client, &ns.name, &tls_name).await.unwrap();
    assert_eq!(
        after.metadata.resource_version, secret.metadata.resource_version,
        "the generated TLS Secret was written again"
    );
    assert_eq!(after.data, secret.data);
    eventually("the TlsSecretCreated Event, once", WAIT, || async {
        let created = events_about(&client, &ns.name, &name)
            .await
            .into_iter()
            .filter(|e| e.reason.as_deref() == Some("TlsSecretCreated"))
            .map(|e| e.series.as_ref().map_or(1, |s| s.count))
            .sum::<i32>();
        if created == 1 {
            Ok(())
        } else {
            Err(format!("{created} TlsSecretCreated Events"))
        }
    })
    .await;

    // The user's Secret: mounted as given; the generated one is not
    // deleted (a cluster may go back to it).
    patch_spec(&api, &name, &json!({"tls": {"secretName": "my-certs"}})).await;
    eventually("the user's Secret mounted", WAIT, || async {
        let sts: StatefulSet = get(&client, &ns.name, &name).await?;
        match tls_volume(&sts) {
            Some(n) if n == "my-certs" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let kept: Secret = get(&client, &ns.name, &tls_name).await.unwrap();
    assert_eq!(kept.data, secret.data);
    assert_no_failures(&client, &ns.name).await;
}

/// What a kubelet does for a pod being deleted: confirm it (no kubelet
/// runs here, so graceful deletions would wait for ever).
async fn confirm_pod_deletions(client: &Client, ns: &str) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    for pod in pods.list(&ListParams::default()).await.unwrap().items {
        if pod.metadata.deletion_timestamp.is_some() {
            let _ = pods
                .delete(&pod.name_any(), &DeleteParams::default().grace_period(0))
                .await;
        }
    }
}

/// The claims of the namespace, by name.
async fn claim_names(client: &Client, ns: &str) -> BTreeSet<String> {
    Api::<PersistentVolumeClaim>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .map(|c| c.name_any())
        .collect()
}

/// Until the namespace's claims are exactly `want` (confirming pod
/// deletions meanwhile, as kubelets would).
async fn wait_claims(client: &Client, ns: &str, want: &[&str]) {
    let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
    eventually(&format!("claims {want:?}"), WAIT, || async {
        confirm_pod_deletions(client, ns).await;
        let have = claim_names(client, ns).await;
        if have == want {
            Ok(())
        } else {
            Err(format!("{have:?}"))
        }
    })
    .await;
}

#[tokio::test]
async fn pvc_retention_policy_on_scale_down_and_deletion() {
    let (client, ns) = operator_test("pg-pvc").await;
    let api: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        &ns.name,
        &stratum_resource("PostgresCluster"),
    );
    // pvc-drop deletes its claims on scale-down and deletion; pvc-keep has
    // the default policy (keep them).
    for (name, policy) in [
        (
            "pvc-drop",
            json!({"whenScaled": "Delete", "whenDeleted": "Delete"}),
        ),
        ("pvc-keep", Value::Null),
    ] {
        let mut doc = example("postgres-single.yaml", "PostgresCluster");
        doc["metadata"]["name"] = json!(name);
        doc["spec"]["instances"] = json!(2);
        if !policy.is_null() {
            doc["spec"]["pvcRetentionPolicy"] = policy;
        }
        apply(&client, &doc, &ns.name)
            .await
            .unwrap_or_else(|e| panic!("{name}: {}", api_message(&e)));
    }
    for name in ["pvc-drop", "pvc-keep"] {
        let sts: StatefulSet = wait_get(&client, &ns.name, name).await;
        let retention = sts
            .spec
            .as_ref()
            .unwrap()
            .persistent_volume_claim_retention_policy
            .clone()
            .unwrap();
        let want = if name == "pvc-drop" {
            "Delete"
        } else {
            "Retain"
        };
        assert_eq!(retention.when_scaled.as_deref(), Some(want), "{name}");
        assert_eq!(retention.when_deleted.as_deref(), Some(want), "{name}");
        provide_volumes(&client, &sts).await;
        run_pods(&client, &ns.name, name, 2).await;
    }
    wait_claims(
        &client,
        &ns.name,
        &[
            "data-pvc-drop-0",
            "data-pvc-drop-1",
            "data-pvc-keep-0",
            "data-pvc-keep-1",
        ],
    )
    .await;

    // Scale both down to one instance: the StatefulSet controller removes
    // pod 1, and with it the claim of pvc-drop only.
    for name in ["pvc-drop", "pvc-keep"] {
        patch_spec(&api, name, &json!({"instances": 1})).await;
    }
    wait_claims(
        &client,
        &ns.name,
        &["data-pvc-drop-0", "data-pvc-keep-0", "data-pvc-keep-1"],
    )
    .await;

    // Delete both: garbage collection takes the StatefulSets, and with
    // pvc-drop's its remaining claim.
    for name in ["pvc-drop", "pvc-keep"] {
        api.delete(name, &DeleteParams::default()).await.unwrap();
    }
    for name in ["pvc-drop", "pvc-keep"] {
        wait_gone::<StatefulSet>(&client, &ns.name, name).await;
    }
    wait_claims(&client, &ns.name, &["data-pvc-keep-0", "data-pvc-keep-1"]).await;
    // And they stay.
    tokio::time::sleep(Duration::from_secs(3)).await;
    wait_claims(&client, &ns.name, &["data-pvc-keep-0", "data-pvc-keep-1"]).await;
    assert_no_failures(&client, &ns.name).await;
}

/// The RBAC table at the top of operator-core/src/controller/mod.rs:
/// (apiGroup, resource, verb), `<plural>` expanded to every engine's.
fn rbac_table() -> BTreeSet<(String, String, String)> {
    let source = std::fs::read_to_string(repo_path("operator-core/src/controller/mod.rs")).unwrap();
    let plurals: Vec<String> = stratum::registry()
        .all()
        .iter()
        .map(|e| e.crd().spec.names.plural)
        .collect();
    let mut rows = BTreeSet::new();
    for line in source.lines() {
        if !line.starts_with("//! | `") {
            continue;
        }
        let cells: Vec<String> = line
            .trim_start_matches("//!")
            .trim()
            .trim_matches('|')
            .split('|')
            .map(|c| c.trim().trim_matches('`').to_string())
            .collect();
        let group = cells[0].trim_matches('"');
        let resources: Vec<String> = if cells[1].contains("<plural>") {
            plurals
                .iter()
                .map(|p| cells[1].replace("<plural>", p))
                .collect()
        } else {
            vec![cells[1].to_string()]
        };
        for resource in resources {
            for verb in cells[2].split(',') {
                rows.insert((group.to_string(), resource.clone(), verb.trim().to_string()));
            }
        }
    }
    assert!(rows.len() > 10, "RBAC table not found: {rows:?}");
    rows
}

#[tokio::test]
async fn rbac_of_deploy_is_the_table_in_the_controller() {
    let client = admin().await;
    install_deploy(&client).await;
    let table = rbac_table();

    // What the ClusterRole and the leader-election Role (operator
    // namespace) grant together is exactly the table; Leases only in the
    // Role.
    let cluster_role = Api::<ClusterRole>::all(client.clone())
        .get("stratum-operator")
        .await
        .unwrap();
    let role = Api::<Role>::namespaced(client.clone(), OPERATOR_NAMESPACE)
        .get("stratum-operator-leader-election")
        .await
        .unwrap();
    let rows = |rules: Vec<PolicyRule>| {
        let mut granted = BTreeSet::new();
        for rule in rules {
            for group in rule.api_groups.unwrap_or_default() {
                for resource in rule.resources.clone().unwrap_or_default() {
                    for verb in &rule.verbs {
                        granted.insert((group.clone(), resource.clone(), verb.clone()));
                    }
                }
            }
        }
        granted
    };
    let cluster_wide = rows(cluster_role.rules.unwrap_or_default());
    let in_operator_namespace = rows(role.rules.unwrap_or_default());
    assert!(
        in_operator_namespace.iter().all(|r| r.1 == "leases")
            && cluster_wide.iter().all(|r| r.1 != "leases"),
        "Leases belong in the Role, everything else in the ClusterRole: {in_operator_namespace:?}"
    );
    let granted: BTreeSet<_> = cluster_wide
        .union(&in_operator_namespace)
        .cloned()
        .collect();
    let missing: Vec<_> = table.difference(&granted).collect();
    let extra: Vec<_> = granted.difference(&table).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "deploy/operator/rbac.yaml and the table in controller/mod.rs differ:\nnot granted: {missing:?}\nnot in the table: {extra:?}"
    );

    // The authorizer agrees for the ServiceAccount, in any namespace, and
    // denies what is not listed.
    let reviews: Api<SubjectAccessReview> = Api::all(client.clone());
    let user = format!("system:serviceaccount:{OPERATOR_NAMESPACE}:{OPERATOR_SERVICE_ACCOUNT}");
    let allowed = |group: &str, resource: &str, verb: &str, namespace: &str| {
        let (resource, subresource) = resource.split_once('/').unwrap_or((resource, ""));
        let review = SubjectAccessReview {
            metadata: Default::default(),
            spec: SubjectAccessReviewSpec {
                user: Some(user.clone()),
                groups: Some(vec![
                    "system:serviceaccounts".into(),
                    format!("system:serviceaccounts:{OPERATOR_NAMESPACE}"),
                    "system:authenticated".into(),
                ]),
                resource_attributes: Some(ResourceAttributes {
                    group: Some(group.into()),
                    resource: Some(resource.into()),
                    subresource: (!subresource.is_empty()).then(|| subresource.to_string()),
                    verb: Some(verb.into()),
                    namespace: Some(namespace.to_string()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            status: None,
        };
        let reviews = reviews.clone();
        async move {
            reviews
                .create(&PostParams::default(), &review)
                .await
                .unwrap()
                .status
                .unwrap()
                .allowed
        }
    };
    for (group, resource, verb) in &table {
        // Leases in the operator's namespace; the rest anywhere.
        let namespace = if resource == "leases" {
            OPERATOR_NAMESPACE
        } else {
            "some-team"
        };
        assert!(
            allowed(group, resource, verb, namespace).await,
            "{user} may not {verb} {group}/{resource}"
        );
    }
    for (group, resource, verb) in [
        ("", "secrets", "delete"),
        ("", "persistentvolumeclaims", "delete"),
        ("stratum.dev", "postgresclusters", "delete"),
        ("rbac.authorization.k8s.io", "clusterroles", "create"),
        // Leases outside the operator's namespace.
        ("coordination.k8s.io", "leases", "create"),
    ] {
        assert!(
            !allowed(group, resource, verb, "some-team").await,
            "{user} may {verb} {group}/{resource}, which the operator never does"
        );
    }
}
