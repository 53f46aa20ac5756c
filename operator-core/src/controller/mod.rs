//! controller: the generic reconcile on kube-runtime, one `Controller` per
//! engine kind of an [`EngineRegistry`], on `DynamicObject`s typed by each
//! engine's CRD (operator-core never needs the engines' Rust types), plus
//! the metrics/health HTTP server. IO: Kubernetes API, instance managers
//! (HTTP), and the metrics listener.
//!
//! Pipeline per cluster object (`reconcile.rs`): finalizer → validate (pure)
//! → build (pure, [`crate::build`]) → apply (server-side apply with field
//! manager `stratum-operator`, create-if-absent Secret, prune orphans; all
//! children in one round trip) → observe (pods, instance managers) → ha
//! (failover, switchover, fencing and the primary's write lease, for
//! engines with the failover capability: [`ha`]) →
//! decide (pure routing, pod labels) → status (pure computation, merge
//! patch of the status subresource) → report (tracing + Kubernetes Event,
//! the Event sent in the background). A new cluster's finalizer is added
//! alongside its first applies rather than in a reconcile of its own.
//!
//! # RBAC
//!
//! Every resource and verb the controller uses (ClusterRole when
//! [`ControllerOptions::namespace`] is `None`, else a Role in that
//! namespace; `<plural>` is each registered engine's CRD plural, e.g.
//! `postgresclusters`, `pxcclusters`, `mongoclusters`):
//!
//! | apiGroup            | resource                | verbs                                   | used for |
//! |---------------------|-------------------------|-----------------------------------------|----------|
//! | `stratum.dev`       | `<plural>`              | get, list, watch, patch                 | watch clusters; add/remove the finalizer (JSON patch) |
//! | `stratum.dev`       | `<plural>/status`       | get, patch                              | status (merge patch) |
//! | `stratum.dev`       | `<plural>/finalizers`   | update                                  | owner references with `blockOwnerDeletion` (OwnerReferencesPermissionEnforcement) |
//! | `apps`              | `statefulsets`          | get, list, watch, create, patch, delete | read before apply (immutable fields), server-side apply, metadata watch (cache, owned), prune |
//! | `apps`              | `deployments`           | list, watch, create, patch, delete      | HAProxy pods ([`Engine::proxy`](crate::engine::Engine::proxy)): server-side apply, metadata watch (cache, owned), prune |
//! | `""`                | `services`              | list, watch, create, patch, delete      | server-side apply, metadata watch (cache, owned), prune |
//! | `""`                | `configmaps`            | list, watch, create, patch, delete      | server-side apply, metadata watch (cache, owned), prune |
//! | `policy`            | `poddisruptionbudgets`  | list, watch, create, patch, delete      | server-side apply, metadata watch (cache, owned), prune |
//! | `networking.k8s.io` | `networkpolicies`       | list, watch, create, patch, delete      | server-side apply, metadata watch (cache, owned), prune |
//! | `""`                | `secrets`               | get, list, watch, create, patch         | watch (cache: `api-token`, owned), create-if-absent, read before adding missing keys (never deleted) |
//! | `""`                | `pods`                  | list, watch, patch, delete              | watch (cache: readiness; triggers a reconcile); move `stratum.dev/route` and `stratum.dev/role` labels; delete a failed primary's pod whose instance manager does not answer, once its write lease expired (the host-side fence, [`ha`]) |
//! | `events.k8s.io`     | `events`                | create, patch                           | Events (kube-runtime `Recorder`) |
//! | `coordination.k8s.io` | `leases`              | get, create, patch                      | leader election ([`leader`]), in the operator's namespace only |
//!
//! Leases are granted by a Role in the operator's namespace
//! (`stratum-system`), not by the ClusterRole: the operator touches no
//! Lease elsewhere.
//!
//! `create` is listed next to `patch` for applied kinds because server-side
//! apply creates objects through PATCH; keep both. Child and pod watches
//! are filtered by the label `stratum.dev/kind=<kind>`, which narrows
//! traffic but not the RBAC needed.
//!
//! # Caches
//!
//! A reconcile reads children, pods and the credentials Secret from watch
//! caches ([`cache`]), applies only what changed since this process last
//! applied it, and is triggered by changes of the cluster, its children
//! and its pods; at most [`CONCURRENCY`] reconciles of a kind run at once.
//! What is remembered per cluster (validated spec, applied children,
//! written status) is dropped when the cluster watch shows it gone, so a
//! cluster deleted before its finalizer landed leaves nothing behind.

pub mod apply;
pub mod backoff;
pub mod cache;
pub mod decide;
pub mod error;
pub mod galera;
pub mod ha;
pub mod leader;
pub mod metrics;
pub mod observe;
mod reconcile;
pub mod reconfigure;
pub mod report;
pub mod rolling;
pub mod status;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{Controller, WatchStreamExt, controller, watcher};
use kube::{Client, ResourceExt};

use self::cache::{AppliedMemo, Caches};
use crate::build::{LABEL_CLUSTER, LABEL_KIND};
use crate::engine::Engine;
use crate::registry::EngineRegistry;

pub use reconcile::{FINALIZER, REQUEUE_HEALTHY, REQUEUE_WAITING};

/// Settings of the controller process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControllerOptions {
    /// Image of the operator itself; its binary is copied into database
    /// pods by their init container.
    pub operator_image: String,
    /// Address of the `/metrics` and `/healthz` HTTP server.
    pub metrics_addr: SocketAddr,
    /// Watch only this namespace; every namespace when `None`.
    pub namespace: Option<String>,
    /// Bound on each request to an instance manager during observe.
    pub instance_timeout: Duration,
    /// Leader election between replicas; `None` reconciles at once (a
    /// single replica, or tests).
    pub leader_election: Option<leader::LeaderElection>,
}

impl ControllerOptions {
    /// Options with the given operator image, metrics on `0.0.0.0:8080`,
    /// all namespaces, and a 3 s instance timeout.
    pub fn new(operator_image: impl Into<String>) -> Self {
        Self {
            operator_image: operator_image.into(),
            metrics_addr: SocketAddr::from(([0, 0, 0, 0], 8080)),
            namespace: None,
            instance_timeout: Duration::from_secs(3),
            leader_election: None,
        }
    }
}

/// The `ApiResource` of a cluster kind, from its CRD: the storage version
/// (else the first served one) and the plural name.
pub fn api_resource(crd: &CustomResourceDefinition) -> anyhow::Result<ApiResource> {
    let spec = &crd.spec;
    let version = spec
        .versions
        .iter()
        .find(|v| v.storage)
        .or_else(|| spec.versions.iter().find(|v| v.served))
        .with_context(|| format!("CRD of {} has no served version", spec.names.kind))?;
    Ok(ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(&spec.group, &version.name, &spec.names.kind),
        &spec.names.plural,
    ))
}

/// Run one controller per engine kind of `registry`, concurrently, plus the
/// metrics/health server on `opts.metrics_addr`. With leader election the
/// controllers start once this replica holds the Lease (the metrics server
/// answers before). Returns when every controller has shut down
/// (SIGTERM/Ctrl-C; the Lease is released), or with an error when the
/// metrics server cannot run, a CRD is unusable, or the Lease was lost.
pub async fn run(
    client: Client,
    registry: EngineRegistry,
    opts: ControllerOptions,
) -> anyhow::Result<()> {
    anyhow::ensure!(!registry.all().is_empty(), "no engines registered");
    let mut kinds = Vec::new();
    for engine in registry.all() {
        let resource = api_resource(&engine.crd())?;
        anyhow::ensure!(
            resource.kind == engine.kind(),
            "engine {} returns the CRD of {}",
            engine.kind(),
            resource.kind
        );
        kinds.push((engine.clone(), resource));
    }

    let metrics = Arc::new(metrics::Metrics::new());
    let listener = tokio::net::TcpListener::bind(opts.metrics_addr)
        .await
        .with_context(|| format!("failed to listen on {}", opts.metrics_addr))?;
    let server = metrics::serve(listener, metrics.clone());
    tokio::pin!(server);

    // Followers wait here; a signal ends the wait.
    let mut leadership = None;
    if let Some(election) = &opts.leader_election {
        tokio::select! {
            result = &mut server => return result,
            _ = shutdown_signal() => return Ok(()),
            held = leader::acquire(client.clone(), election) => leadership = Some(held?),
        }
    }

    tracing::info!(addr = %opts.metrics_addr, kinds = ?registry.kinds(), namespace = ?opts.namespace, "starting controllers");
    let shared = Arc::new(reconcile::Shared {
        reporter: report::Reporter::new(client.clone(), metrics.clone()),
        client,
        metrics,
        backoff: backoff::Backoff::default(),
        opts,
    });
    let reporter = shared.reporter.clone();
    let controllers = futures::future::join_all(
        kinds
            .into_iter()
            .map(|(engine, resource)| run_kind(shared.clone(), engine, resource)),
    );
    let lost = async {
        match &mut leadership {
            Some(l) => l.lost().await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        result = &mut server => result,
        why = lost => anyhow::bail!("lost the leader Lease ({why}): stopping so that a single replica reconciles"),
        _ = controllers => {
            tracing::info!("controllers stopped");
            // Events still queued (best effort, bounded wait).
            let _ = tokio::time::timeout(Duration::from_secs(2), reporter.flush()).await;
            if let Some(l) = leadership {
                l.release().await;
            }
            Ok(())
        }
    }
}

/// SIGTERM or Ctrl-C, as the controllers' `shutdown_on_signal` would.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

/// Reconciles of one kind that may run at once. Bounded so that a burst
/// (every cluster at start-up) queues in the controller instead of as
/// hundreds of concurrent requests against the API server.
pub const CONCURRENCY: u16 = 8;

/// The cluster objects of one kind, without `managedFields` (never read,
/// and often the larger part of a small object): the store, and the watch
/// events after the store took them in.
fn cluster_stream(
    api: Api<DynamicObject>,
    resource: &ApiResource,
) -> (
    Store<DynamicObject>,
    impl futures::Stream<Item = Result<watcher::Event<DynamicObject>, watcher::Error>> + Send + 'static,
) {
    let writer = reflector::store::Writer::new(resource.clone());
    let reader = writer.as_reader();
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .modify(|o: &mut DynamicObject| o.metadata.managed_fields = None)
        .reflect(writer);
    (reader, stream)
}

/// The cluster a pod belongs to (its `stratum.dev/cluster` label).
fn pod_owner(pod: &Pod, resource: &ApiResource) -> Option<ObjectRef<DynamicObject>> {
    let cluster = pod.labels().get(LABEL_CLUSTER)?;
    let ns = pod.namespace()?;
    Some(ObjectRef::new_with(cluster, resource.clone()).within(&ns))
}

async fn run_kind(shared: Arc<reconcile::Shared>, engine: Arc<dyn Engine>, resource: ApiResource) {
    let client = shared.client.clone();
    let namespace = shared.opts.namespace.clone();
    let ns = namespace.as_deref();
    let clusters: Api<DynamicObject> = match ns {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
        None => Api::all_with(client.clone(), &resource),
    };
    let kind = engine.kind();
    let (caches, triggers) = Caches::watch(&client, ns, &format!("{LABEL_KIND}={kind}"));
    let (store, cluster_events) = cluster_stream(clusters, &resource);
    // Lease renewals that see a primary in trouble wake its reconcile.
    let (wake, woken) = futures::channel::mpsc::unbounded();
    let ctx = Arc::new(reconcile::KindContext {
        engine,
        resource: resource.clone(),
        shared,
        caches,
        memo: AppliedMemo::default(),
        validated: Default::default(),
        written: Default::default(),
        clusters: store.clone(),
        galera: Default::default(),
        rolling: Default::default(),
        ha: ha::HaRegistry::new(wake),
        reconfigure: Default::default(),
    });
    // Deleted clusters' records go with the watch's Delete (or the next
    // re-list), whether or not their cleanup ran.
    let tracker = ctx.clone();
    // A status this process wrote comes back through the watch; that echo
    // carries nothing new, and reconciling on it made every reconcile of a
    // cluster under writes (whose status carries changing positions) start
    // the next one: a busy loop against the API server and the managers
    // that also delayed a user's switchover request by seconds.
    let echo = ctx.clone();
    let cluster_events = cluster_events
        .inspect_ok(move |event| tracker.on_cluster_event(event))
        .applied_objects()
        .try_filter(move |obj| futures::future::ready(!echo.is_own_status_echo(obj)));
    let forget_gone = ctx.clone();
    let pod_resource = resource.clone();
    Controller::for_stream_with(cluster_events, store, resource)
        .with_config(controller::Config::default().concurrency(CONCURRENCY))
        .owns_stream(triggers.stateful_sets)
        .owns_stream(triggers.services)
        .owns_stream(triggers.config_maps)
        .owns_stream(triggers.pod_disruption_budgets)
        .owns_stream(triggers.network_policies)
        .owns_stream(triggers.deployments)
        .owns_stream(triggers.secrets)
        // Pods are owned by the StatefulSet: map them by label.
        .watches_stream(triggers.pods, move |pod| pod_owner(&pod, &pod_resource))
        .reconcile_on(woken)
        .shutdown_on_signal()
        .run(reconcile::reconcile, reconcile::error_policy, ctx)
        .for_each(|result| {
            use kube::runtime::controller::Error as E;
            match &result {
                Ok((object, _)) => forget_gone.forget_if_gone(object),
                Err(E::ReconcilerFailed(_, object) | E::ObjectNotFound(object)) => {
                    forget_gone.forget_if_gone(object)
                }
                Err(_) => {}
            }
            async move {
                match result {
                    Ok((object, action)) => tracing::trace!(%object, ?action, "reconciled"),
                    // Reconcile errors were reported where they happened.
                    Err(E::ReconcilerFailed(_, object)) => {
                        tracing::trace!(%object, "reconcile failed")
                    }
                    // A child changed after its cluster was deleted (garbage
                    // collection of the children does that every time): normal.
                    Err(E::ObjectNotFound(object)) => {
                        tracing::debug!(%object, "cluster already deleted")
                    }
                    Err(e) => tracing::warn!(kind, error = %e, "controller error"),
                }
            }
        })
        .await;
    tracing::info!(kind, "controller stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_resource_from_crd() {
        let crd: CustomResourceDefinition = serde_json::from_value(serde_json::json!({
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": "fakeclusters.stratum.dev"},
            "spec": {
                "group": "stratum.dev",
                "names": {"kind": "FakeCluster", "plural": "fakeclusters"},
                "scope": "Namespaced",
                "versions": [
                    {"name": "v1alpha0", "served": true, "storage": false},
                    {"name": "v1alpha1", "served": true, "storage": true}
                ]
            }
        }))
        .unwrap();
        let ar = api_resource(&crd).unwrap();
        assert_eq!(ar.api_version, "stratum.dev/v1alpha1");
        assert_eq!(ar.kind, "FakeCluster");
        assert_eq!(ar.plural, "fakeclusters");

        let empty = CustomResourceDefinition::default();
        assert!(api_resource(&empty).is_err());
    }

    #[test]
    fn options_default_to_all_namespaces() {
        let o = ControllerOptions::new("example.invalid/stratum:test");
        assert_eq!(o.namespace, None);
        assert_eq!(o.metrics_addr.port(), 8080);
    }
}

#[cfg(test)]
mod pipeline_tests;
