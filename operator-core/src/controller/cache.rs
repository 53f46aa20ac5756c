//! cache: the watch caches (reflector stores) of one cluster kind's
//! children, pods and credentials Secrets, and the memo of what the operator
//! last applied. IO: the Kubernetes watches that fill the stores (polled by
//! the controller as trigger streams); every read here is in memory.
//!
//! Why: a reconcile that lists five kinds to find orphans, reads the Secret
//! and lists pods makes ~15 sequential requests; at 200 clusters that
//! saturates a small API server. The stores hold only what the reconcile
//! reads: metadata for the applied kinds (orphans and "changed since we
//! applied it?"), trimmed pods (readiness, address, labels) and Secrets,
//! all without `managedFields`.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Mutex;

use futures::{Stream, StreamExt};
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, PodStatus, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::build::{ChildKind, LABEL_CLUSTER};

/// A child as far as apply and pruning care, from its cached metadata.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExistingChild {
    /// Its kind.
    pub kind: ChildKind,
    /// Its name.
    pub name: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// UIDs of its owners.
    pub owner_uids: Vec<String>,
    /// Changes whenever someone changes the object in a way apply would
    /// undo: uid, generation (resourceVersion for kinds without one),
    /// labels and owners. Status-only writes leave it alone.
    pub version: u64,
    /// Deletion has started.
    pub deleting: bool,
}

impl ExistingChild {
    /// From an object's metadata.
    pub fn from_meta(kind: ChildKind, meta: &ObjectMeta) -> Self {
        let mut h = DefaultHasher::new();
        meta.uid.hash(&mut h);
        match meta.generation {
            Some(g) => g.hash(&mut h),
            None => meta.resource_version.hash(&mut h),
        }
        meta.labels.hash(&mut h);
        for o in meta.owner_references.iter().flatten() {
            (&o.uid, &o.kind, &o.name, o.controller).hash(&mut h);
        }
        Self {
            kind,
            name: meta.name.clone().unwrap_or_default(),
            labels: meta.labels.clone().unwrap_or_default(),
            owner_uids: meta
                .owner_references
                .iter()
                .flatten()
                .map(|o| o.uid.clone())
                .collect(),
            version: h.finish(),
            deleting: meta.deletion_timestamp.is_some(),
        }
    }
}

/// The stores of one kind's controller. Filled by the streams
/// [`Caches::watch`] returns.
#[derive(Clone)]
pub(crate) struct Caches {
    stateful_sets: Store<PartialObjectMeta<StatefulSet>>,
    services: Store<PartialObjectMeta<Service>>,
    config_maps: Store<PartialObjectMeta<ConfigMap>>,
    pod_disruption_budgets: Store<PartialObjectMeta<PodDisruptionBudget>>,
    network_policies: Store<PartialObjectMeta<NetworkPolicy>>,
    deployments: Store<PartialObjectMeta<Deployment>>,
    secrets: Store<Secret>,
    pods: Store<Pod>,
}

/// A watch stream of objects, for the controller's triggers.
pub(crate) type Trigger<K> =
    std::pin::Pin<Box<dyn Stream<Item = Result<K, watcher::Error>> + Send + 'static>>;

/// The trigger streams that fill [`Caches`]: give each to the controller
/// (`owns_stream`, `watches_stream`), which polls them.
pub(crate) struct Triggers {
    pub stateful_sets: Trigger<PartialObjectMeta<StatefulSet>>,
    pub services: Trigger<PartialObjectMeta<Service>>,
    pub config_maps: Trigger<PartialObjectMeta<ConfigMap>>,
    pub pod_disruption_budgets: Trigger<PartialObjectMeta<PodDisruptionBudget>>,
    pub network_policies: Trigger<PartialObjectMeta<NetworkPolicy>>,
    pub deployments: Trigger<PartialObjectMeta<Deployment>>,
    pub secrets: Trigger<Secret>,
    pub pods: Trigger<Pod>,
}

fn scoped<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

fn cached<K>(
    api: Api<K>,
    config: watcher::Config,
    trim: impl FnMut(&mut K) + Send + 'static,
) -> (Store<K>, Trigger<K>)
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let (reader, writer) = reflector::store();
    let stream = watcher(api, config)
        .default_backoff()
        .modify(trim)
        .reflect(writer)
        .touched_objects()
        .boxed();
    (reader, stream)
}

fn meta_only<K>(
    client: &Client,
    namespace: Option<&str>,
    config: &watcher::Config,
) -> (Store<PartialObjectMeta<K>>, Trigger<PartialObjectMeta<K>>)
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + Debug
        + Send
        + Sync
        + 'static,
{
    cached(
        scoped::<PartialObjectMeta<K>>(client, namespace),
        config.clone(),
        |o| o.metadata.managed_fields = None,
    )
}

/// Keep what [`PodInfo::from_pod`](super::decide::PodInfo::from_pod)
/// reads: name, namespace, labels, owners, deletion, phase, Ready, address.
pub(crate) fn trim_pod(pod: &mut Pod) {
    pod.metadata.managed_fields = None;
    pod.metadata.annotations = None;
    pod.spec = None;
    pod.status = pod.status.take().map(|s| PodStatus {
        phase: s.phase,
        pod_ip: s.pod_ip,
        conditions: s.conditions.map(|cs| {
            cs.into_iter()
                .filter(|c| c.type_ == "Ready")
                .map(|mut c| {
                    c.message = None;
                    c.reason = None;
                    c
                })
                .collect()
        }),
        ..Default::default()
    });
}

impl Caches {
    /// Watches of one kind's children, pods and Secrets (label
    /// `stratum.dev/kind=<kind>`), in `namespace` or all namespaces.
    pub fn watch(client: &Client, namespace: Option<&str>, selector: &str) -> (Self, Triggers) {
        let config = watcher::Config::default().labels(selector);
        let (stateful_sets, sts_t) = meta_only::<StatefulSet>(client, namespace, &config);
        let (services, svc_t) = meta_only::<Service>(client, namespace, &config);
        let (config_maps, cm_t) = meta_only::<ConfigMap>(client, namespace, &config);
        let (pod_disruption_budgets, pdb_t) =
            meta_only::<PodDisruptionBudget>(client, namespace, &config);
        let (network_policies, np_t) = meta_only::<NetworkPolicy>(client, namespace, &config);
        let (deployments, deploy_t) = meta_only::<Deployment>(client, namespace, &config);
        let (secrets, secret_t) = cached(
            scoped::<Secret>(client, namespace),
            config.clone(),
            |s: &mut Secret| s.metadata.managed_fields = None,
        );
        let (pods, pod_t) = cached(scoped::<Pod>(client, namespace), config, trim_pod);
        (
            Self {
                stateful_sets,
                services,
                config_maps,
                pod_disruption_budgets,
                network_policies,
                deployments,
                secrets,
                pods,
            },
            Triggers {
                stateful_sets: sts_t,
                services: svc_t,
                config_maps: cm_t,
                pod_disruption_budgets: pdb_t,
                network_policies: np_t,
                deployments: deploy_t,
                secrets: secret_t,
                pods: pod_t,
            },
        )
    }

    /// Wait until every store holds its first complete list. Fails only
    /// when a watch has been dropped (the controller is stopping).
    pub async fn ready(&self) -> Result<(), reflector::store::WriterDropped> {
        self.stateful_sets.wait_until_ready().await?;
        self.services.wait_until_ready().await?;
        self.config_maps.wait_until_ready().await?;
        self.pod_disruption_budgets.wait_until_ready().await?;
        self.network_policies.wait_until_ready().await?;
        self.deployments.wait_until_ready().await?;
        self.secrets.wait_until_ready().await?;
        self.pods.wait_until_ready().await
    }

    fn metas(&self, kind: ChildKind, keep: impl Fn(&ObjectMeta) -> bool) -> Vec<ExistingChild> {
        fn pick<K: Resource<DynamicType = ()> + Clone>(
            store: &Store<PartialObjectMeta<K>>,
            kind: ChildKind,
            keep: &dyn Fn(&ObjectMeta) -> bool,
        ) -> Vec<ExistingChild> {
            store
                .state_filter(|o| keep(&o.metadata))
                .iter()
                .map(|o| ExistingChild::from_meta(kind, &o.metadata))
                .collect()
        }
        match kind {
            ChildKind::StatefulSet => pick(&self.stateful_sets, kind, &keep),
            ChildKind::Service => pick(&self.services, kind, &keep),
            ChildKind::ConfigMap => pick(&self.config_maps, kind, &keep),
            ChildKind::PodDisruptionBudget => pick(&self.pod_disruption_budgets, kind, &keep),
            ChildKind::NetworkPolicy => pick(&self.network_policies, kind, &keep),
            ChildKind::Deployment => pick(&self.deployments, kind, &keep),
        }
    }

    /// The cached child `ns/name` of `kind`, if any.
    pub fn child(&self, kind: ChildKind, ns: &str, name: &str) -> Option<ExistingChild> {
        self.metas(kind, |m| {
            m.name.as_deref() == Some(name) && m.namespace.as_deref() == Some(ns)
        })
        .pop()
    }

    /// Every cached child of every kind labelled for `cluster` in `ns`.
    pub fn children_of(&self, ns: &str, cluster: &str) -> Vec<ExistingChild> {
        let keep = |m: &ObjectMeta| {
            m.namespace.as_deref() == Some(ns)
                && m.labels
                    .as_ref()
                    .and_then(|l| l.get(LABEL_CLUSTER))
                    .is_some_and(|c| c == cluster)
        };
        ChildKind::ALL
            .into_iter()
            .flat_map(|kind| self.metas(kind, keep))
            .collect()
    }

    /// The cached Secret `ns/name`.
    pub fn secret(&self, ns: &str, name: &str) -> Option<std::sync::Arc<Secret>> {
        self.secrets
            .get(&reflector::ObjectRef::new(name).within(ns))
    }

    /// The cached pods of `ns` carrying every label of `selector`.
    pub fn pods(&self, ns: &str, selector: &BTreeMap<String, String>) -> Vec<std::sync::Arc<Pod>> {
        self.pods.state_filter(|p| {
            p.metadata.namespace.as_deref() == Some(ns)
                && selector
                    .iter()
                    .all(|(k, v)| p.labels().get(k).is_some_and(|x| x == v))
        })
    }
}

/// The writers behind a [`Caches`] made by [`Caches::for_tests`]: tests
/// fill the stores by hand.
#[cfg(test)]
pub(crate) struct TestWriters {
    pub stateful_sets: reflector::store::Writer<PartialObjectMeta<StatefulSet>>,
    pub services: reflector::store::Writer<PartialObjectMeta<Service>>,
    pub config_maps: reflector::store::Writer<PartialObjectMeta<ConfigMap>>,
    pub pod_disruption_budgets: reflector::store::Writer<PartialObjectMeta<PodDisruptionBudget>>,
    pub network_policies: reflector::store::Writer<PartialObjectMeta<NetworkPolicy>>,
    pub deployments: reflector::store::Writer<PartialObjectMeta<Deployment>>,
    pub secrets: reflector::store::Writer<Secret>,
    pub pods: reflector::store::Writer<Pod>,
}

#[cfg(test)]
impl TestWriters {
    /// Mark every store listed (ready).
    pub fn ready(&mut self) {
        use watcher::Event::{Init, InitDone};
        macro_rules! init {
            ($($w:ident),*) => {$(
                self.$w.apply_watcher_event(&Init);
                self.$w.apply_watcher_event(&InitDone);
            )*};
        }
        init!(
            stateful_sets,
            services,
            config_maps,
            pod_disruption_budgets,
            network_policies,
            deployments,
            secrets,
            pods
        );
    }
}

#[cfg(test)]
impl Caches {
    /// Empty, not yet ready stores and their writers.
    pub fn for_tests() -> (Self, TestWriters) {
        let (stateful_sets, sts) = reflector::store();
        let (services, svc) = reflector::store();
        let (config_maps, cm) = reflector::store();
        let (pod_disruption_budgets, pdb) = reflector::store();
        let (network_policies, np) = reflector::store();
        let (deployments, deploy) = reflector::store();
        let (secrets, secret) = reflector::store();
        let (pods, pod) = reflector::store();
        (
            Self {
                stateful_sets,
                services,
                config_maps,
                pod_disruption_budgets,
                network_policies,
                deployments,
                secrets,
                pods,
            },
            TestWriters {
                stateful_sets: sts,
                services: svc,
                config_maps: cm,
                pod_disruption_budgets: pdb,
                network_policies: np,
                deployments: deploy,
                secrets: secret,
                pods: pod,
            },
        )
    }
}

/// Hash of a desired object, to tell whether it changed since it was last
/// applied. Stable within one process, which is all the memo needs.
pub fn desired_hash<K: Serialize>(obj: &K) -> u64 {
    let mut h = DefaultHasher::new();
    serde_json::to_vec(obj).unwrap_or_default().hash(&mut h);
    h.finish()
}

/// Namespace and name of a cluster.
type ClusterKey = (String, String);
/// What was applied to each child (kind, name) of one cluster.
type ClusterApplied = HashMap<(ChildKind, String), Applied>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Applied {
    desired: u64,
    version: u64,
}

/// What this process last applied to each child and the child's
/// [`ExistingChild::version`] right after: when neither the desired object
/// nor the child changed since, applying again would be a no-op and is
/// skipped. Empty after a restart, so the first reconcile applies
/// everything once.
#[derive(Debug, Default)]
pub struct AppliedMemo {
    clusters: Mutex<HashMap<ClusterKey, ClusterApplied>>,
}

impl AppliedMemo {
    /// Whether `kind/name` of cluster `ns/cluster` was applied from
    /// `desired` and has not changed since (`existing` is its cached
    /// state).
    pub fn unchanged(
        &self,
        ns: &str,
        cluster: &str,
        kind: ChildKind,
        desired: u64,
        existing: Option<&ExistingChild>,
    ) -> bool {
        let Some(existing) = existing.filter(|e| !e.deleting) else {
            return false;
        };
        let clusters = self.clusters.lock().unwrap_or_else(|e| e.into_inner());
        clusters
            .get(&(ns.to_string(), cluster.to_string()))
            .and_then(|c| c.get(&(kind, existing.name.clone())))
            == Some(&Applied {
                desired,
                version: existing.version,
            })
    }

    /// Record that `desired` was applied and the server answered with
    /// `applied` (its metadata).
    pub fn record(
        &self,
        ns: &str,
        cluster: &str,
        kind: ChildKind,
        desired: u64,
        applied: &ObjectMeta,
    ) {
        let child = ExistingChild::from_meta(kind, applied);
        let mut clusters = self.clusters.lock().unwrap_or_else(|e| e.into_inner());
        clusters
            .entry((ns.to_string(), cluster.to_string()))
            .or_default()
            .insert(
                (kind, child.name),
                Applied {
                    desired,
                    version: child.version,
                },
            );
    }

    /// Forget a cluster (deleted).
    pub fn forget(&self, ns: &str, cluster: &str) {
        self.retain(|n, c| (n, c) != (ns, cluster));
    }

    /// Keep the clusters `keep(namespace, name)` accepts; forget the others.
    pub fn retain(&self, keep: impl Fn(&str, &str) -> bool) {
        let mut clusters = self.clusters.lock().unwrap_or_else(|e| e.into_inner());
        clusters.retain(|(ns, name), _| keep(ns, name));
    }

    /// The clusters remembered (tests).
    #[cfg(test)]
    pub(crate) fn clusters(&self) -> std::collections::HashSet<ClusterKey> {
        let clusters = self.clusters.lock().unwrap_or_else(|e| e.into_inner());
        clusters.keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn meta(v: serde_json::Value) -> ObjectMeta {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn version_ignores_status_writes_but_not_spec_or_labels() {
        let base = json!({"name": "simple-pg", "uid": "u1", "generation": 3,
            "resourceVersion": "10", "labels": {"stratum.dev/cluster": "simple-pg"}});
        let v = |m: serde_json::Value| {
            ExistingChild::from_meta(ChildKind::StatefulSet, &meta(m)).version
        };
        let mut status_write = base.clone();
        status_write["resourceVersion"] = json!("11");
        assert_eq!(v(base.clone()), v(status_write));
        let mut spec_write = base.clone();
        spec_write["generation"] = json!(4);
        assert_ne!(v(base.clone()), v(spec_write));
        let mut relabelled = base.clone();
        relabelled["labels"] = json!({});
        assert_ne!(v(base.clone()), v(relabelled));
        let mut recreated = base.clone();
        recreated["uid"] = json!("u2");
        assert_ne!(v(base.clone()), v(recreated));
        // Kinds without a generation (Service, ConfigMap): any write.
        let svc = json!({"name": "simple-pg-rw", "uid": "u3", "resourceVersion": "5"});
        let mut svc2 = svc.clone();
        svc2["resourceVersion"] = json!("6");
        assert_ne!(v(svc), v(svc2));
    }

    #[test]
    fn memo_skips_only_unchanged_children() {
        let memo = AppliedMemo::default();
        let applied = meta(json!({"name": "simple-pg", "uid": "u1", "generation": 1}));
        let cached = ExistingChild::from_meta(ChildKind::StatefulSet, &applied);
        let kind = ChildKind::StatefulSet;
        assert!(!memo.unchanged("team-a", "simple-pg", kind, 7, Some(&cached)));
        memo.record("team-a", "simple-pg", kind, 7, &applied);
        assert!(memo.unchanged("team-a", "simple-pg", kind, 7, Some(&cached)));
        // The desired object changed.
        assert!(!memo.unchanged("team-a", "simple-pg", kind, 8, Some(&cached)));
        // Gone from the cache, or being deleted.
        assert!(!memo.unchanged("team-a", "simple-pg", kind, 7, None));
        let mut deleting = cached.clone();
        deleting.deleting = true;
        assert!(!memo.unchanged("team-a", "simple-pg", kind, 7, Some(&deleting)));
        // Someone else changed its spec.
        let edited = meta(json!({"name": "simple-pg", "uid": "u1", "generation": 2}));
        let edited = ExistingChild::from_meta(kind, &edited);
        assert!(!memo.unchanged("team-a", "simple-pg", kind, 7, Some(&edited)));
        // Another namespace's cluster of the same name.
        assert!(!memo.unchanged("team-b", "simple-pg", kind, 7, Some(&cached)));
        memo.forget("team-a", "simple-pg");
        assert!(!memo.unchanged("team-a", "simple-pg", kind, 7, Some(&cached)));
    }

    #[test]
    fn trimmed_pods_keep_what_routing_reads() {
        let mut pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "simple-pg-0", "namespace": "team-a",
                "labels": {"stratum.dev/route": "rw"},
                "annotations": {"big": "x"},
                "managedFields": [{"manager": "kubelet"}]},
            "spec": {"containers": [{"name": "postgres"}]},
            "status": {"phase": "Running", "podIP": "192.0.2.10",
                "conditions": [
                    {"type": "Ready", "status": "True", "message": "m"},
                    {"type": "Initialized", "status": "True"}
                ],
                "containerStatuses": [{"name": "postgres", "image": "i", "imageID": "",
                    "ready": true, "restartCount": 0}]}
        }))
        .unwrap();
        let before = super::super::decide::PodInfo::from_pod(&pod);
        trim_pod(&mut pod);
        assert_eq!(super::super::decide::PodInfo::from_pod(&pod), before);
        assert!(pod.spec.is_none() && pod.metadata.managed_fields.is_none());
        let status = pod.status.unwrap();
        assert!(status.container_statuses.is_none());
        assert_eq!(status.conditions.unwrap().len(), 1);
    }
}
