//! Object metadata of every child: labels, annotations, owner reference.
//! Pure.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};

use super::{BuildError, LABEL_CLUSTER, LABEL_KIND, selector_labels};
use crate::api::{GROUP, VERSION};
use crate::engine::ValidatedCluster;

/// `app.kubernetes.io/name` of a cluster kind's objects: the engine's short
/// name. Known kinds have fixed names; another kind gets its name without
/// the `Cluster` suffix, lower-cased (the Engine trait has no short name
/// yet).
pub fn app_name(kind: &str) -> String {
    match kind {
        "PostgresCluster" => "postgres".into(),
        "PxcCluster" => "pxc".into(),
        "MongoCluster" => "mongodb".into(),
        other => generic_short_name(other),
    }
}

/// Name of the database container: the server process it runs.
pub fn container_name(kind: &str) -> String {
    match kind {
        "PostgresCluster" => "postgres".into(),
        "PxcCluster" => "pxc".into(),
        "MongoCluster" => "mongod".into(),
        other => generic_short_name(other),
    }
}

fn generic_short_name(kind: &str) -> String {
    let base = kind.strip_suffix("Cluster").unwrap_or(kind).to_lowercase();
    if base.is_empty() {
        "database".into()
    } else {
        base
    }
}

/// Whether the cluster's annotations ask for the NetworkPolicy
/// ([`super::ANNOTATION_NETWORK_POLICY`] = `"true"`).
pub fn network_policy_enabled(annotations: &BTreeMap<String, String>) -> bool {
    annotations
        .get(super::ANNOTATION_NETWORK_POLICY)
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
}

/// Shared metadata of one cluster's children.
pub(super) struct MetaBuilder {
    pub cluster: String,
    pub namespace: String,
    pub kind: String,
    own_labels: BTreeMap<String, String>,
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
    owner: OwnerReference,
}

impl MetaBuilder {
    pub fn new(cluster: &ValidatedCluster, kind: &str) -> Result<Self, BuildError> {
        let name = &cluster.meta.name;
        let uid = cluster
            .meta
            .uid
            .clone()
            .filter(|u| !u.is_empty())
            .ok_or_else(|| BuildError::MissingUid {
                kind: kind.to_string(),
                name: name.clone(),
            })?;
        let inherited = cluster
            .common
            .inherited_metadata
            .clone()
            .unwrap_or_default();
        let own_labels = BTreeMap::from([
            ("app.kubernetes.io/name".to_string(), app_name(kind)),
            ("app.kubernetes.io/instance".to_string(), name.clone()),
            (
                "app.kubernetes.io/managed-by".to_string(),
                "stratum".to_string(),
            ),
            (
                "app.kubernetes.io/part-of".to_string(),
                "stratum".to_string(),
            ),
            (LABEL_CLUSTER.to_string(), name.clone()),
            (LABEL_KIND.to_string(), kind.to_string()),
        ]);
        // Inherited labels first so that ours win on a clash: selectors and
        // pruning depend on them.
        let mut labels = inherited.labels;
        labels.extend(own_labels.clone());
        Ok(Self {
            cluster: name.clone(),
            namespace: cluster.meta.namespace.clone(),
            kind: kind.to_string(),
            own_labels,
            labels,
            annotations: inherited.annotations,
            owner: OwnerReference {
                api_version: format!("{GROUP}/{VERSION}"),
                kind: kind.to_string(),
                name: name.clone(),
                uid,
                controller: Some(true),
                block_owner_deletion: Some(true),
            },
        })
    }

    /// Every label of the cluster's objects.
    pub fn labels(&self) -> BTreeMap<String, String> {
        self.labels.clone()
    }

    /// The operator's own labels, without inherited ones: for places that
    /// cannot change after creation (volume claim templates).
    pub fn own_labels(&self) -> BTreeMap<String, String> {
        self.own_labels.clone()
    }

    /// Inherited annotations.
    pub fn annotations(&self) -> BTreeMap<String, String> {
        self.annotations.clone()
    }

    /// Labels selecting the cluster's pods.
    pub fn selector(&self) -> BTreeMap<String, String> {
        selector_labels(&self.cluster, &self.kind)
    }

    /// [`Self::selector`] as a `LabelSelector`.
    pub fn label_selector(&self) -> LabelSelector {
        LabelSelector {
            match_labels: Some(self.selector()),
            match_expressions: None,
        }
    }

    /// Metadata of a child named `name`: namespace, labels, annotations and
    /// the controller owner reference.
    pub fn object_meta(&self, name: String) -> ObjectMeta {
        ObjectMeta {
            name: Some(name),
            namespace: Some(self.namespace.clone()),
            labels: Some(self.labels()),
            annotations: (!self.annotations.is_empty()).then(|| self.annotations()),
            owner_references: Some(vec![self.owner.clone()]),
            ..Default::default()
        }
    }
}
