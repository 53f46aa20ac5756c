//! controller: the generic reconcile on kube-runtime, one `Controller` per
//! engine kind of an [`EngineRegistry`], on `DynamicObject`s typed by each
//! engine's CRD (operator-core never needs the engines' Rust types), plus
//! the metrics/health HTTP server. IO: Kubernetes API, instance managers
//! (HTTP), and the metrics listener.
//!
//! Pipeline per cluster object (`reconcile.rs`): finalizer → validate (pure)
//! → build (pure, [`crate::build`]) → apply (server-side apply with field
//! manager `stratum-operator`, create-if-absent Secret, prune orphans) →
//! observe (pods, instance managers) → decide (pure routing, pod labels) →
//! status (pure computation, merge patch of the status subresource) →
//! report (tracing + Kubernetes Event).
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
//! | `apps`              | `statefulsets`          | get, list, watch, create, patch, delete | read before apply (immutable fields), server-side apply, watch owned, prune |
//! | `""`                | `services`              | list, watch, create, patch, delete      | server-side apply, watch owned, prune |
//! | `""`                | `configmaps`            | list, watch, create, patch, delete      | server-side apply, watch owned, prune |
//! | `policy`            | `poddisruptionbudgets`  | list, watch, create, patch, delete      | server-side apply, watch owned, prune |
//! | `networking.k8s.io` | `networkpolicies`       | list, watch, create, patch, delete      | server-side apply, watch owned, prune |
//! | `""`                | `secrets`               | get, list, watch, create, patch         | create-if-absent, add missing keys, read `api-token`, watch owned (never deleted) |
//! | `""`                | `pods`                  | list, patch                             | readiness; move `stratum.dev/route` and `stratum.dev/role` labels |
//! | `events.k8s.io`     | `events`                | create, patch                           | Events (kube-runtime `Recorder`) |
//!
//! `create` is listed next to `patch` for applied kinds because server-side
//! apply creates objects through PATCH; keep both. Child watches are
//! filtered by the label `stratum.dev/kind=<kind>`, which narrows traffic
//! but not the RBAC needed.

pub mod apply;
pub mod backoff;
pub mod decide;
pub mod error;
pub mod metrics;
pub mod observe;
mod reconcile;
pub mod report;
pub mod status;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt;
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::{Controller, watcher};
use kube::{Client, Resource};

use crate::build::LABEL_KIND;
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
/// metrics/health server on `opts.metrics_addr`. Returns when every
/// controller has shut down (SIGTERM/Ctrl-C), or with an error when the
/// metrics server cannot run or a CRD is unusable.
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
    tracing::info!(addr = %opts.metrics_addr, kinds = ?registry.kinds(), namespace = ?opts.namespace, "starting controllers");
    let shared = Arc::new(reconcile::Shared {
        reporter: report::Reporter::new(client.clone()),
        client,
        metrics: metrics.clone(),
        backoff: backoff::Backoff::default(),
        opts,
    });
    let controllers = futures::future::join_all(
        kinds
            .into_iter()
            .map(|(engine, resource)| run_kind(shared.clone(), engine, resource)),
    );
    tokio::select! {
        result = metrics::serve(listener, metrics) => result,
        _ = controllers => {
            tracing::info!("controllers stopped");
            Ok(())
        }
    }
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

async fn run_kind(shared: Arc<reconcile::Shared>, engine: Arc<dyn Engine>, resource: ApiResource) {
    let client = shared.client.clone();
    let namespace = shared.opts.namespace.clone();
    let ns = namespace.as_deref();
    let clusters: Api<DynamicObject> = match ns {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
        None => Api::all_with(client.clone(), &resource),
    };
    let kind = engine.kind();
    let children = watcher::Config::default().labels(&format!("{LABEL_KIND}={kind}"));
    let ctx = Arc::new(reconcile::KindContext {
        engine,
        resource: resource.clone(),
        shared,
    });
    Controller::new_with(clusters, watcher::Config::default(), resource)
        .owns(scoped::<StatefulSet>(&client, ns), children.clone())
        .owns(scoped::<Service>(&client, ns), children.clone())
        .owns(scoped::<ConfigMap>(&client, ns), children.clone())
        .owns(scoped::<PodDisruptionBudget>(&client, ns), children.clone())
        .owns(scoped::<NetworkPolicy>(&client, ns), children.clone())
        .owns(scoped::<Secret>(&client, ns), children)
        .shutdown_on_signal()
        .run(reconcile::reconcile, reconcile::error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((object, action)) => tracing::trace!(%object, ?action, "reconciled"),
                // Reconcile errors were reported where they happened.
                Err(kube::runtime::controller::Error::ReconcilerFailed(_, object)) => {
                    tracing::trace!(%object, "reconcile failed")
                }
                // A child changed after its cluster was deleted (garbage
                // collection of the children does that every time): normal.
                Err(kube::runtime::controller::Error::ObjectNotFound(object)) => {
                    tracing::debug!(%object, "cluster already deleted")
                }
                Err(e) => tracing::warn!(kind, error = %e, "controller error"),
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
