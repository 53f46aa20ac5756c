//! apply: writes the desired objects to the API server (server-side apply
//! with one field manager, create-if-absent for the Secret) and deletes the
//! orphans this cluster owns. IO: Kubernetes API only. The decisions
//! (orphans, immutable StatefulSet fields) are pure functions below.

use std::collections::BTreeMap;
use std::fmt::Debug;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::error::ApplyError;
use crate::build::{ChildKind, ClusterObjects, LABEL_CLUSTER, SecretAction, secret_action};

/// The one field manager of every object the operator applies.
pub const FIELD_MANAGER: &str = "stratum-operator";

/// A child found in the namespace, as far as pruning cares.
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
}

impl ExistingChild {
    fn from_meta(kind: ChildKind, meta: &ObjectMeta) -> Self {
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
        }
    }
}

/// The children to delete: labelled with this cluster's name AND owned by
/// this cluster's UID (so a user's look-alike object, or one of a deleted
/// and recreated cluster of the same name, is never touched), and not in
/// the desired set.
pub fn select_orphans(
    cluster: &str,
    cluster_uid: &str,
    desired: &[(ChildKind, String)],
    existing: &[ExistingChild],
) -> Vec<(ChildKind, String)> {
    existing
        .iter()
        .filter(|c| c.labels.get(LABEL_CLUSTER).map(String::as_str) == Some(cluster))
        .filter(|c| c.owner_uids.iter().any(|u| u == cluster_uid))
        .filter(|c| !desired.iter().any(|(k, n)| *k == c.kind && *n == c.name))
        .map(|c| (c.kind, c.name.clone()))
        .collect()
}

/// Make `desired` keep the StatefulSet fields that the API server refuses
/// to change (`selector`, `serviceName`, `podManagementPolicy`,
/// `volumeClaimTemplates`) as they are in `existing`, so that applying it
/// never fails. Returns the fields whose desired value differed (a spec
/// change that cannot take effect this way, e.g. a storage resize, which
/// needs its own procedure).
pub fn preserve_immutable_fields(
    desired: &mut StatefulSet,
    existing: &StatefulSet,
) -> Vec<&'static str> {
    let (Some(want), Some(have)) = (desired.spec.as_mut(), existing.spec.as_ref()) else {
        return Vec::new();
    };
    let mut changed = Vec::new();
    if want.selector != have.selector {
        changed.push("selector");
        want.selector = have.selector.clone();
    }
    if want.service_name != have.service_name {
        changed.push("serviceName");
        want.service_name = have.service_name.clone();
    }
    let policy = |p: &Option<String>| p.clone().unwrap_or_else(|| "OrderedReady".into());
    if policy(&want.pod_management_policy) != policy(&have.pod_management_policy) {
        changed.push("podManagementPolicy");
    }
    want.pod_management_policy = have.pod_management_policy.clone();
    let summary = |claims: &Option<Vec<k8s_openapi::api::core::v1::PersistentVolumeClaim>>| {
        claims
            .iter()
            .flatten()
            .map(|c| {
                let spec = c.spec.as_ref();
                (
                    c.metadata.name.clone(),
                    spec.and_then(|s| s.storage_class_name.clone()),
                    spec.and_then(|s| s.resources.as_ref())
                        .and_then(|r| r.requests.as_ref())
                        .and_then(|r| r.get("storage").map(|q| q.0.clone())),
                )
            })
            .collect::<Vec<_>>()
    };
    if summary(&want.volume_claim_templates) != summary(&have.volume_claim_templates) {
        changed.push("volumeClaimTemplates");
    }
    // The server's copy includes defaulted fields (volumeMode, status);
    // sending it back unchanged is a no-op for server-side apply.
    want.volume_claim_templates = have.volume_claim_templates.clone().map(|claims| {
        claims
            .into_iter()
            .map(|mut c| {
                c.status = None;
                c
            })
            .collect()
    });
    changed
}

fn namespaced<K>(client: &Client, ns: &str) -> Api<K>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>,
{
    Api::namespaced(client.clone(), ns)
}

async fn server_side_apply<K>(api: &Api<K>, kind: &'static str, obj: &K) -> Result<(), ApplyError>
where
    K: Resource + Clone + DeserializeOwned + Serialize + Debug,
{
    let name = obj.meta().name.clone().unwrap_or_default();
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(obj),
    )
    .await
    .map(|_| ())
    .map_err(|source| ApplyError::Apply { kind, name, source })
}

fn is_status(err: &kube::Error, check: impl Fn(&kube::core::Status) -> bool) -> bool {
    matches!(err, kube::Error::Api(s) if check(s))
}

/// Create the credentials Secret when absent; add keys it lacks; never
/// overwrite a value. Returns what was done.
async fn ensure_secret(
    client: &Client,
    ns: &str,
    desired: &Secret,
) -> Result<SecretAction, ApplyError> {
    let api: Api<Secret> = namespaced(client, ns);
    let name = desired.metadata.name.clone().unwrap_or_default();
    let err = |action, source| ApplyError::Secret {
        action,
        name: name.clone(),
        source,
    };
    let existing = api.get_opt(&name).await.map_err(|e| err("read", e))?;
    let action = secret_action(existing.as_ref(), desired);
    match &action {
        SecretAction::Keep => {}
        SecretAction::Create => match api.create(&PostParams::default(), desired).await {
            Ok(_) => {}
            // Someone else created it first: theirs stays.
            Err(e) if is_status(&e, |s| s.is_already_exists()) => return Ok(SecretAction::Keep),
            Err(e) => return Err(err("create", e)),
        },
        SecretAction::AddMissing(keys) => {
            let patch = serde_json::json!({ "data": keys });
            api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map_err(|e| err("add missing keys to", e))?;
        }
    }
    Ok(action)
}

async fn list_children<K>(
    client: &Client,
    ns: &str,
    kind: ChildKind,
    selector: &str,
) -> Result<Vec<ExistingChild>, ApplyError>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + Debug,
{
    let api: Api<K> = namespaced(client, ns);
    let list = api
        .list_metadata(&ListParams::default().labels(selector))
        .await
        .map_err(|source| ApplyError::ListChildren {
            kind: kind.as_str(),
            source,
        })?;
    Ok(list
        .items
        .iter()
        .map(|o| ExistingChild::from_meta(kind, &o.metadata))
        .collect())
}

async fn delete_child(
    client: &Client,
    ns: &str,
    kind: ChildKind,
    name: &str,
) -> Result<(), ApplyError> {
    let dp = DeleteParams::background();
    let result = match kind {
        ChildKind::StatefulSet => namespaced::<StatefulSet>(client, ns)
            .delete(name, &dp)
            .await
            .map(|_| ()),
        ChildKind::Service => namespaced::<Service>(client, ns)
            .delete(name, &dp)
            .await
            .map(|_| ()),
        ChildKind::ConfigMap => namespaced::<ConfigMap>(client, ns)
            .delete(name, &dp)
            .await
            .map(|_| ()),
        ChildKind::PodDisruptionBudget => namespaced::<PodDisruptionBudget>(client, ns)
            .delete(name, &dp)
            .await
            .map(|_| ()),
        ChildKind::NetworkPolicy => namespaced::<NetworkPolicy>(client, ns)
            .delete(name, &dp)
            .await
            .map(|_| ()),
    };
    match result {
        Ok(()) => Ok(()),
        Err(e) if is_status(&e, |s| s.is_not_found()) => Ok(()),
        Err(source) => Err(ApplyError::DeleteOrphan {
            kind: kind.as_str(),
            name: name.to_string(),
            source,
        }),
    }
}

/// What apply did that the reporter should know about.
#[derive(Debug, Default)]
pub struct ApplyOutcome {
    /// StatefulSet fields whose change could not be applied.
    pub immutable_changes: Vec<&'static str>,
    /// The credentials Secret was created or completed.
    pub secret: Option<SecretAction>,
    /// Children deleted as orphans.
    pub deleted: Vec<(ChildKind, String)>,
}

/// Apply every object of the cluster, then prune orphans. Order: the
/// ConfigMap and Secret the pods mount, the Services, the StatefulSet, the
/// policies.
pub async fn apply_all(
    client: &Client,
    ns: &str,
    cluster: &str,
    cluster_uid: &str,
    mut objects: ClusterObjects,
) -> Result<ApplyOutcome, ApplyError> {
    let mut outcome = ApplyOutcome::default();
    server_side_apply(&namespaced(client, ns), "ConfigMap", &objects.config_map).await?;
    let secret = ensure_secret(client, ns, &objects.secret_if_absent).await?;
    if secret != SecretAction::Keep {
        outcome.secret = Some(secret);
    }
    let services: Api<Service> = namespaced(client, ns);
    for svc in &objects.services {
        server_side_apply(&services, "Service", svc).await?;
    }

    let sts_api: Api<StatefulSet> = namespaced(client, ns);
    let sts_name = objects
        .stateful_set
        .metadata
        .name
        .clone()
        .unwrap_or_default();
    let existing = sts_api
        .get_opt(&sts_name)
        .await
        .map_err(|source| ApplyError::Apply {
            kind: "StatefulSet",
            name: sts_name.clone(),
            source,
        })?;
    if let Some(existing) = &existing {
        outcome.immutable_changes = preserve_immutable_fields(&mut objects.stateful_set, existing);
    }
    server_side_apply(&sts_api, "StatefulSet", &objects.stateful_set).await?;
    server_side_apply(
        &namespaced(client, ns),
        "PodDisruptionBudget",
        &objects.pod_disruption_budget,
    )
    .await?;
    if let Some(np) = &objects.network_policy {
        server_side_apply(&namespaced(client, ns), "NetworkPolicy", np).await?;
    }

    let selector = format!("{LABEL_CLUSTER}={cluster}");
    let mut existing = Vec::new();
    for kind in ChildKind::ALL {
        let found = match kind {
            ChildKind::StatefulSet => {
                list_children::<StatefulSet>(client, ns, kind, &selector).await?
            }
            ChildKind::Service => list_children::<Service>(client, ns, kind, &selector).await?,
            ChildKind::ConfigMap => list_children::<ConfigMap>(client, ns, kind, &selector).await?,
            ChildKind::PodDisruptionBudget => {
                list_children::<PodDisruptionBudget>(client, ns, kind, &selector).await?
            }
            ChildKind::NetworkPolicy => {
                list_children::<NetworkPolicy>(client, ns, kind, &selector).await?
            }
        };
        existing.extend(found);
    }
    for (kind, name) in select_orphans(cluster, cluster_uid, &objects.desired_children(), &existing)
    {
        delete_child(client, ns, kind, &name).await?;
        outcome.deleted.push((kind, name));
    }
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn child(kind: ChildKind, name: &str, cluster: &str, owner: &str) -> ExistingChild {
        ExistingChild {
            kind,
            name: name.into(),
            labels: BTreeMap::from([(LABEL_CLUSTER.to_string(), cluster.to_string())]),
            owner_uids: vec![owner.into()],
        }
    }

    #[test]
    fn orphans_need_label_and_owner_and_not_desired() {
        let desired = vec![
            (ChildKind::StatefulSet, "simple-pg".to_string()),
            (ChildKind::Service, "simple-pg-rw".to_string()),
        ];
        let existing = vec![
            child(ChildKind::StatefulSet, "simple-pg", "simple-pg", "uid-1"),
            child(ChildKind::Service, "simple-pg-rw", "simple-pg", "uid-1"),
            // The NetworkPolicy after the annotation was removed.
            child(ChildKind::NetworkPolicy, "simple-pg", "simple-pg", "uid-1"),
            // Same name, another kind than desired: still an orphan.
            child(
                ChildKind::PodDisruptionBudget,
                "simple-pg-rw",
                "simple-pg",
                "uid-1",
            ),
            // Owned by an older cluster of the same name: not ours.
            child(ChildKind::Service, "simple-pg-old", "simple-pg", "uid-0"),
            // Owned by us but labelled for another cluster: not touched.
            child(ChildKind::ConfigMap, "x", "other-pg", "uid-1"),
        ];
        let mut orphans = select_orphans("simple-pg", "uid-1", &desired, &existing);
        orphans.sort();
        assert_eq!(
            orphans,
            [
                (ChildKind::PodDisruptionBudget, "simple-pg-rw".to_string()),
                (ChildKind::NetworkPolicy, "simple-pg".to_string()),
            ]
        );
    }

    fn sts(v: serde_json::Value) -> StatefulSet {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn immutable_statefulset_fields_are_kept() {
        let existing = sts(json!({
            "metadata": {"name": "simple-pg"},
            "spec": {
                "selector": {"matchLabels": {"stratum.dev/cluster": "simple-pg"}},
                "serviceName": "simple-pg-headless",
                "podManagementPolicy": "OrderedReady",
                "template": {},
                "volumeClaimTemplates": [{
                    "metadata": {"name": "data"},
                    "spec": {"resources": {"requests": {"storage": "1Gi"}}, "volumeMode": "Filesystem"},
                    "status": {"phase": "Pending"}
                }]
            }
        }));
        let mut same = existing.clone();
        same.spec
            .as_mut()
            .unwrap()
            .volume_claim_templates
            .as_mut()
            .unwrap()[0]
            .status = None;
        same.spec.as_mut().unwrap().pod_management_policy = None;
        assert!(preserve_immutable_fields(&mut same, &existing).is_empty());

        let mut grown = sts(json!({
            "metadata": {"name": "simple-pg"},
            "spec": {
                "selector": {"matchLabels": {"stratum.dev/cluster": "simple-pg"}},
                "serviceName": "simple-pg-headless",
                "podManagementPolicy": "Parallel",
                "template": {},
                "volumeClaimTemplates": [{
                    "metadata": {"name": "data"},
                    "spec": {"resources": {"requests": {"storage": "2Gi"}}}
                }]
            }
        }));
        let changed = preserve_immutable_fields(&mut grown, &existing);
        assert_eq!(changed, ["podManagementPolicy", "volumeClaimTemplates"]);
        let spec = grown.spec.unwrap();
        assert_eq!(spec.pod_management_policy.as_deref(), Some("OrderedReady"));
        let claim = &spec.volume_claim_templates.unwrap()[0];
        assert!(claim.status.is_none());
        assert_eq!(
            claim
                .spec
                .as_ref()
                .unwrap()
                .resources
                .as_ref()
                .unwrap()
                .requests
                .as_ref()
                .unwrap()["storage"]
                .0,
            "1Gi"
        );
    }
}
