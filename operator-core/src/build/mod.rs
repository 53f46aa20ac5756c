//! build: pure manifest builders, no client and no IO. From a
//! [`ValidatedCluster`] and its [`Engine`] to every Kubernetes object of the
//! cluster ([`ClusterObjects`]). The only non-deterministic output is the
//! random credentials of [`ClusterObjects::secret_if_absent`], which the
//! apply step creates once and never overwrites (see [`secret_action`]).
//!
//! Objects built here (all in the cluster's namespace, all owned by the
//! cluster object with `controller: true`):
//! - StatefulSet `<cluster>`: one pod per instance, ordinal names through
//!   `serviceName: <cluster>-headless`;
//! - ConfigMap `<cluster>-config`: `instance.json`, the shared
//!   [`InstanceConfig`](crate::instance::config::InstanceConfig) (instance
//!   name empty; each pod fills it from `STRATUM_INSTANCE`);
//! - Services `<cluster>-headless`, `<cluster>-rw`, `<cluster>-ro`,
//!   `<cluster>-r`;
//! - PodDisruptionBudget `<cluster>`;
//! - Secret `<cluster>-credentials` (create-if-absent only);
//! - the engine's TLS Secret ([`Engine::tls_secret`]) when the operator
//!   generates it: a new CA and certificate ([`crate::tls`]), created when
//!   absent and never changed afterwards ([`tls_secret_action`]); a user's
//!   TLS Secret is only mounted;
//! - NetworkPolicy `<cluster>` when [`BuildContext::network_policy`] is set;
//! - ConfigMap and Deployment `<cluster>-haproxy` when the engine asks for
//!   proxy pods ([`Engine::proxy`]); the `-rw`/`-ro` Services then select
//!   the HAProxy pods instead of the members.

mod config;
mod meta;
mod policy;
mod proxy;
mod services;
mod statefulset;

#[cfg(test)]
pub(crate) mod tests;

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;

use crate::engine::{Engine, EngineManifest, ValidatedCluster};
use crate::error::SpecError;

pub use config::{
    SECRET_VALUE_LEN, SecretAction, generate_secret_value, secret_action, tls_secret_action,
};
pub use meta::{app_name, container_name, network_policy_enabled};
pub use proxy::{
    ANNOTATION_CONFIG_HASH, CLUSTER_DOMAIN, COMPONENT_HAPROXY, DEFAULT_PROXY_IMAGE,
    LABEL_COMPONENT, PROXY_CONFIG_DIR, PROXY_CONFIG_KEY, ProxyConfig, RO_PORT_NAME, RW_PORT_NAME,
    proxy_selector, render as render_proxy_config, ro_port,
};
pub use statefulset::{
    INIT_CONTAINER, SECRET_DEFAULT_MODE, SECRET_MODE_WITHOUT_FS_GROUP, TERMINATION_GRACE_SECONDS,
};

/// Label: the cluster name, on every object and pod of a cluster.
pub const LABEL_CLUSTER: &str = "stratum.dev/cluster";
/// Label: the cluster kind (e.g. `PostgresCluster`).
pub const LABEL_KIND: &str = "stratum.dev/kind";
/// Pod label moved by the operator: `rw` on the writer, `ro` on readers,
/// absent elsewhere. The `-rw`/`-ro` Services select on it.
pub const LABEL_ROUTE: &str = "stratum.dev/route";
/// Pod label set by the operator: the observed role
/// ([`Role::as_str`](crate::instance::protocol::Role::as_str)).
pub const LABEL_ROLE: &str = "stratum.dev/role";
/// Value of [`LABEL_ROUTE`] on the writer.
pub const ROUTE_RW: &str = "rw";
/// Value of [`LABEL_ROUTE`] on the readers.
pub const ROUTE_RO: &str = "ro";
/// Cluster annotation that turns the NetworkPolicy on when `"true"`. An
/// annotation for now so that the CRD does not change; a spec field can
/// replace it later.
pub const ANNOTATION_NETWORK_POLICY: &str = "stratum.dev/network-policy";
/// `app.kubernetes.io/name` of the operator's own pods; the NetworkPolicy
/// lets them reach the instance API.
pub const OPERATOR_APP_NAME: &str = "stratum";

/// Where the instance config ConfigMap is mounted.
pub const CONFIG_DIR: &str = "/etc/stratum/config";
/// Key of the instance config in the ConfigMap (and file name under
/// [`CONFIG_DIR`]).
pub const CONFIG_KEY: &str = "instance.json";
/// Where the credentials Secret is mounted.
pub const SECRETS_DIR: &str = "/etc/stratum/secrets";
/// Where the engine's TLS Secret ([`Engine::tls_secret`]) is mounted.
pub const TLS_DIR: &str = "/etc/stratum/tls";
/// Run directory (sockets, rendered config, logs) of the instance manager.
pub const RUN_DIR: &str = "/var/run/stratum";
/// Where the init container copies the `stratum` binary.
pub const BIN_DIR: &str = "/stratum/bin";
/// Name of the API port of the database container (the instance manager).
pub const API_PORT_NAME: &str = "api";
/// Name of the data volume (claim template).
pub const DATA_VOLUME: &str = "data";

/// Names of the objects of a cluster.
pub mod names {
    /// StatefulSet, PodDisruptionBudget and NetworkPolicy: the cluster name.
    pub fn stateful_set(cluster: &str) -> String {
        cluster.to_string()
    }
    /// The headless Service that gives pods stable DNS names.
    pub fn headless_service(cluster: &str) -> String {
        format!("{cluster}-headless")
    }
    /// The Service routing to the writer.
    pub fn rw_service(cluster: &str) -> String {
        format!("{cluster}-rw")
    }
    /// The Service routing to the readers.
    pub fn ro_service(cluster: &str) -> String {
        format!("{cluster}-ro")
    }
    /// The Service routing to any ready instance.
    pub fn r_service(cluster: &str) -> String {
        format!("{cluster}-r")
    }
    /// The instance config ConfigMap.
    pub fn config_map(cluster: &str) -> String {
        format!("{cluster}-config")
    }
    /// The HAProxy ConfigMap and Deployment.
    pub fn proxy(cluster: &str) -> String {
        format!("{cluster}-haproxy")
    }
    /// The generated credentials Secret.
    pub fn credentials_secret(cluster: &str) -> String {
        format!("{cluster}-credentials")
    }
}

/// Operator-side inputs of the builders that are not in the cluster spec.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BuildContext {
    /// Image of the operator; its `stratum` binary is copied into each
    /// database pod by the `bootstrap-controller` init container.
    pub operator_image: String,
    /// Build the NetworkPolicy. The controller sets it from the cluster's
    /// [`ANNOTATION_NETWORK_POLICY`] annotation ([`network_policy_enabled`]),
    /// because [`ValidatedCluster`] carries no annotations.
    pub network_policy: bool,
}

impl BuildContext {
    /// A context with the operator image and no NetworkPolicy.
    pub fn new(operator_image: impl Into<String>) -> Self {
        Self {
            operator_image: operator_image.into(),
            network_policy: false,
        }
    }
}

/// Kinds of the children that are applied with server-side apply and
/// pruned when no longer desired. (The Secret is not among them: it is
/// created once and never deleted by the operator.)
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ChildKind {
    /// `apps/v1` StatefulSet.
    StatefulSet,
    /// `v1` Service.
    Service,
    /// `v1` ConfigMap.
    ConfigMap,
    /// `policy/v1` PodDisruptionBudget.
    PodDisruptionBudget,
    /// `networking.k8s.io/v1` NetworkPolicy.
    NetworkPolicy,
    /// `apps/v1` Deployment (the proxy pods).
    Deployment,
}

impl ChildKind {
    /// Every prunable kind.
    pub const ALL: [ChildKind; 6] = [
        Self::StatefulSet,
        Self::Service,
        Self::ConfigMap,
        Self::PodDisruptionBudget,
        Self::NetworkPolicy,
        Self::Deployment,
    ];

    /// The Kubernetes kind name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::StatefulSet => "StatefulSet",
            Self::Service => "Service",
            Self::ConfigMap => "ConfigMap",
            Self::PodDisruptionBudget => "PodDisruptionBudget",
            Self::NetworkPolicy => "NetworkPolicy",
            Self::Deployment => "Deployment",
        }
    }
}

/// Every object of one cluster, as desired now.
#[derive(Clone, Debug, PartialEq)]
pub struct ClusterObjects {
    /// The StatefulSet `<cluster>`.
    pub stateful_set: StatefulSet,
    /// The ConfigMap `<cluster>-config` with `instance.json`.
    pub config_map: ConfigMap,
    /// `<cluster>-headless`, `<cluster>-rw`, `<cluster>-ro`, `<cluster>-r`,
    /// in that order.
    pub services: Vec<Service>,
    /// The PodDisruptionBudget `<cluster>`.
    pub pod_disruption_budget: PodDisruptionBudget,
    /// The NetworkPolicy `<cluster>`, when enabled.
    pub network_policy: Option<NetworkPolicy>,
    /// The HAProxy ConfigMap and Deployment `<cluster>-haproxy`, when the
    /// engine asks for proxy pods.
    pub proxy: Option<(ConfigMap, Deployment)>,
    /// The credentials Secret with freshly generated values. Create it only
    /// when no Secret of that name exists and never overwrite one (the
    /// values are random on every build): see [`secret_action`].
    pub secret_if_absent: Secret,
    /// The engine's TLS Secret with a newly generated CA and certificate,
    /// when the operator generates it. Create it only when no Secret of
    /// that name exists and never change one: see [`tls_secret_action`].
    pub tls_secret_if_absent: Option<Secret>,
}

impl ClusterObjects {
    /// Kind and name of every server-side-applied child; anything else of
    /// these kinds that this cluster owns is an orphan.
    pub fn desired_children(&self) -> Vec<(ChildKind, String)> {
        let name = |m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
            m.name.clone().unwrap_or_default()
        };
        let mut out = vec![
            (ChildKind::StatefulSet, name(&self.stateful_set.metadata)),
            (ChildKind::ConfigMap, name(&self.config_map.metadata)),
            (
                ChildKind::PodDisruptionBudget,
                name(&self.pod_disruption_budget.metadata),
            ),
        ];
        out.extend(
            self.services
                .iter()
                .map(|s| (ChildKind::Service, name(&s.metadata))),
        );
        if let Some((cm, deployment)) = &self.proxy {
            out.push((ChildKind::ConfigMap, name(&cm.metadata)));
            out.push((ChildKind::Deployment, name(&deployment.metadata)));
        }
        if let Some(np) = &self.network_policy {
            out.push((ChildKind::NetworkPolicy, name(&np.metadata)));
        }
        out
    }
}

/// Why the objects of a cluster cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// Owner references need the cluster's UID, which the API server
    /// assigns; a cluster without one was not read from the API server.
    #[error("failed to build objects of {kind} {name}: metadata.uid is missing")]
    MissingUid {
        /// Cluster kind.
        kind: String,
        /// Cluster name.
        name: String,
    },
    /// The engine declared no port, so there is nothing to route to.
    #[error("failed to build objects of {kind}: the engine declares no database port")]
    NoPorts {
        /// Cluster kind.
        kind: String,
    },
    /// The engine rejected the spec while rendering instance settings.
    #[error("failed to render instance settings")]
    Settings(#[source] SpecError),
    /// The instance config did not serialize (a bug).
    #[error("failed to serialize the instance config")]
    Serialize(#[source] serde_json::Error),
    /// The TLS certificates could not be generated (a bug: the names come
    /// from validated object names).
    #[error("failed to build the TLS Secret")]
    Tls(#[source] crate::tls::GenerateError),
}

impl BuildError {
    /// Whether retrying cannot help until the object changes.
    pub fn is_permanent(&self) -> bool {
        !matches!(self, Self::Serialize(_) | Self::Tls(_))
    }
}

/// Build every object of `cluster`. Pure apart from the random Secret
/// values; deterministic otherwise, so server-side apply of the result is a
/// no-op when nothing changed.
pub fn build(
    cluster: &ValidatedCluster,
    engine: &dyn Engine,
    ctx: &BuildContext,
) -> Result<ClusterObjects, BuildError> {
    let manifest = engine.manifest(cluster);
    let meta = meta::MetaBuilder::new(cluster, engine.kind())?;
    let port = client_port(&manifest).ok_or_else(|| BuildError::NoPorts {
        kind: engine.kind().to_string(),
    })?;
    let config_map = config::config_map(&meta, cluster, engine, &manifest)?;
    let tls = engine.tls_secret(cluster);
    let tls_secret_if_absent = match &tls {
        Some(t) if t.generate => Some(config::tls_secret(&meta, cluster, &t.name)?),
        _ => None,
    };
    let proxy = engine
        .proxy(cluster)
        .filter(|p| p.instances >= 1)
        .map(|p| proxy::proxy_objects(&meta, cluster, &p, port));
    let proxied = proxy.is_some();
    Ok(ClusterObjects {
        stateful_set: statefulset::stateful_set(
            &meta,
            cluster,
            engine,
            &manifest,
            tls.as_ref(),
            ctx,
        ),
        config_map,
        services: services::services(&meta, &manifest, proxied),
        proxy,
        pod_disruption_budget: policy::pod_disruption_budget(&meta),
        network_policy: ctx
            .network_policy
            .then(|| policy::network_policy(&meta, &manifest, proxied)),
        secret_if_absent: config::credentials_secret(&meta, &manifest),
        tls_secret_if_absent,
    })
}

/// The port peers and clients use for the database: the first client port,
/// else the first port.
pub fn client_port(manifest: &EngineManifest) -> Option<u16> {
    manifest
        .ports
        .iter()
        .find(|p| p.client)
        .or_else(|| manifest.ports.first())
        .map(|p| p.port)
}

/// Labels that select the pods of a cluster: stable for the life of the
/// cluster (a StatefulSet selector is immutable).
pub fn selector_labels(cluster: &str, kind: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_CLUSTER.to_string(), cluster.to_string()),
        (LABEL_KIND.to_string(), kind.to_string()),
    ])
}
