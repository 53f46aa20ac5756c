//! apply: writes the desired objects to the API server (server-side apply
//! with one field manager, create-if-absent for the Secret) and deletes the
//! orphans this cluster owns, found in the watch cache. Objects unchanged
//! since this process applied them are not sent again. IO: Kubernetes API
//! (writes, and the StatefulSet read before applying it). The decisions
//! (orphans, immutable StatefulSet fields) are pure functions below.

use std::fmt::Debug;
use std::future::Future;
use std::time::Instant;

use futures::StreamExt;
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::{Client, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;

pub use super::cache::ExistingChild;
use super::cache::{AppliedMemo, Caches, desired_hash};
use super::error::ApplyError;
use super::metrics::Metrics;
use crate::build::{
    ChildKind, ClusterObjects, LABEL_CLUSTER, SecretAction, secret_action, tls_secret_action,
};

/// The one field manager of every object the operator applies.
pub const FIELD_MANAGER: &str = "stratum-operator";

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
        .filter(|c| !c.deleting)
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

/// Where apply reads the current state and records what it applied.
pub(crate) struct ApplyTarget<'a> {
    pub client: &'a Client,
    pub caches: &'a Caches,
    pub memo: &'a AppliedMemo,
    pub ns: &'a str,
    pub cluster: &'a str,
    pub cluster_uid: &'a str,
    /// Where each request's duration is recorded, under the cluster kind.
    pub metrics: &'a Metrics,
    pub kind: &'a str,
}

impl ApplyTarget<'_> {
    /// Run one API request about a child, timing it.
    async fn timed<T>(&self, child: &str, verb: &str, request: impl Future<Output = T>) -> T {
        let started = Instant::now();
        let result = request.await;
        self.metrics
            .record_request(self.kind, child, verb, started.elapsed());
        result
    }

    /// Server-side apply `obj` unless neither it nor the object in the
    /// cache changed since this process last applied it. `hash` is the
    /// desired object's [`desired_hash`] (before any adjustment). Returns
    /// whether a request was made.
    async fn apply_if_changed<K>(
        &self,
        kind: ChildKind,
        hash: u64,
        obj: &K,
    ) -> Result<bool, ApplyError>
    where
        K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
            + Clone
            + DeserializeOwned
            + Serialize
            + Debug,
    {
        let name = obj.meta().name.clone().unwrap_or_default();
        let cached = self.caches.child(kind, self.ns, &name);
        if self
            .memo
            .unchanged(self.ns, self.cluster, kind, hash, cached.as_ref())
        {
            return Ok(false);
        }
        let api = namespaced::<K>(self.client, self.ns);
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let applied = self
            .timed(
                kind.as_str(),
                "apply",
                api.patch(&name, &params, &Patch::Apply(obj)),
            )
            .await
            .map_err(|source| ApplyError::Apply {
                kind: kind.as_str(),
                name,
                source,
            })?;
        self.memo
            .record(self.ns, self.cluster, kind, hash, applied.meta());
        Ok(true)
    }

    async fn apply<K>(&self, kind: ChildKind, obj: &K) -> Result<bool, ApplyError>
    where
        K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
            + Clone
            + DeserializeOwned
            + Serialize
            + Debug,
    {
        self.apply_if_changed(kind, desired_hash(obj), obj).await
    }

    /// The StatefulSet: its immutable fields need the stored object, read
    /// only when the StatefulSet is applied at all.
    async fn apply_stateful_set(
        &self,
        mut desired: StatefulSet,
    ) -> Result<(bool, Vec<&'static str>), ApplyError> {
        let kind = ChildKind::StatefulSet;
        let hash = desired_hash(&desired);
        let name = desired.metadata.name.clone().unwrap_or_default();
        let cached = self.caches.child(kind, self.ns, &name);
        if self
            .memo
            .unchanged(self.ns, self.cluster, kind, hash, cached.as_ref())
        {
            return Ok((false, Vec::new()));
        }
        // Not in the cache: a new StatefulSet, nothing to preserve (if the
        // cache lags behind one that exists, an immutable field that
        // differs fails the apply and the retry finds it cached).
        let api = namespaced::<StatefulSet>(self.client, self.ns);
        let existing = match cached {
            None => None,
            Some(_) => self
                .timed(kind.as_str(), "get", api.get_opt(&name))
                .await
                .map_err(|source| ApplyError::Apply {
                    kind: kind.as_str(),
                    name: name.clone(),
                    source,
                })?,
        };
        let changed = match &existing {
            Some(existing) => preserve_immutable_fields(&mut desired, existing),
            None => Vec::new(),
        };
        let applied = self.apply_if_changed(kind, hash, &desired).await?;
        Ok((applied, changed))
    }

    /// Create the credentials Secret when absent; add keys it lacks; never
    /// overwrite a value. Returns what was done.
    async fn ensure_secret(&self, desired: &Secret) -> Result<SecretAction, ApplyError> {
        let api: Api<Secret> = namespaced(self.client, self.ns);
        let name = desired.metadata.name.clone().unwrap_or_default();
        let err = |action, source| ApplyError::Secret {
            action,
            name: name.clone(),
            source,
        };
        let cached = self.caches.secret(self.ns, &name);
        match secret_action(cached.as_deref(), desired) {
            SecretAction::Keep => Ok(SecretAction::Keep),
            SecretAction::Create => match self
                .timed(
                    "Secret",
                    "create",
                    api.create(&PostParams::default(), desired),
                )
                .await
            {
                Ok(_) => Ok(SecretAction::Create),
                // Created since the cache saw it (by us or someone else):
                // the stored one stays.
                Err(e) if is_status(&e, |s| s.is_already_exists()) => Ok(SecretAction::Keep),
                Err(e) => Err(err("create", e)),
            },
            SecretAction::AddMissing(_) => {
                // The cache may lag behind keys added moments ago: decide
                // again on the stored Secret, so no value is replaced.
                let stored = api.get_opt(&name).await.map_err(|e| err("read", e))?;
                let action = secret_action(stored.as_ref(), desired);
                if let SecretAction::AddMissing(keys) = &action {
                    let patch = serde_json::json!({ "data": keys });
                    api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                        .await
                        .map_err(|e| err("add missing keys to", e))?;
                }
                Ok(action)
            }
        }
    }

    /// Create the generated TLS Secret when absent; never change one that
    /// exists ([`tls_secret_action`]). Returns what was done.
    async fn ensure_tls_secret(&self, desired: &Secret) -> Result<SecretAction, ApplyError> {
        let name = desired.metadata.name.clone().unwrap_or_default();
        let cached = self.caches.secret(self.ns, &name);
        if tls_secret_action(cached.as_deref()) == SecretAction::Keep {
            return Ok(SecretAction::Keep);
        }
        let api: Api<Secret> = namespaced(self.client, self.ns);
        match self
            .timed(
                "Secret",
                "create",
                api.create(&PostParams::default(), desired),
            )
            .await
        {
            Ok(_) => Ok(SecretAction::Create),
            // Created since the cache saw it: the stored one stays.
            Err(e) if is_status(&e, |s| s.is_already_exists()) => Ok(SecretAction::Keep),
            Err(source) => Err(ApplyError::Secret {
                action: "create",
                name,
                source,
            }),
        }
    }

    /// Delete the orphan `kind/name` (in the background: its pods and
    /// other dependents go through garbage collection). One that is gone
    /// already is not an error.
    async fn delete_child(&self, kind: ChildKind, name: &str) -> Result<(), ApplyError> {
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), self.ns, &child_resource(kind));
        let params = DeleteParams::background();
        let request = api.delete(name, &params);
        match self.timed(kind.as_str(), "delete", request).await {
            Ok(_) => Ok(()),
            Err(e) if is_status(&e, |s| s.is_not_found()) => Ok(()),
            Err(source) => Err(ApplyError::DeleteOrphan {
                kind: kind.as_str(),
                name: name.to_string(),
                source,
            }),
        }
    }
}

/// Where the API server serves a child kind (its group, version, plural).
fn child_resource(kind: ChildKind) -> ApiResource {
    match kind {
        ChildKind::StatefulSet => ApiResource::erase::<StatefulSet>(&()),
        ChildKind::Service => ApiResource::erase::<Service>(&()),
        ChildKind::ConfigMap => ApiResource::erase::<ConfigMap>(&()),
        ChildKind::PodDisruptionBudget => ApiResource::erase::<PodDisruptionBudget>(&()),
        ChildKind::NetworkPolicy => ApiResource::erase::<NetworkPolicy>(&()),
        ChildKind::Deployment => ApiResource::erase::<Deployment>(&()),
    }
}

fn is_status(err: &kube::Error, check: impl Fn(&kube::core::Status) -> bool) -> bool {
    matches!(err, kube::Error::Api(s) if check(s))
}

/// What apply did that the reporter should know about.
#[derive(Debug, Default)]
pub struct ApplyOutcome {
    /// StatefulSet fields whose change could not be applied.
    pub immutable_changes: Vec<&'static str>,
    /// The credentials Secret was created or completed.
    pub secret: Option<SecretAction>,
    /// The generated TLS Secret was created.
    pub tls_secret: Option<SecretAction>,
    /// Children deleted as orphans.
    pub deleted: Vec<(ChildKind, String)>,
    /// Server-side applies sent.
    pub applied: usize,
    /// Children unchanged since this process applied them: not sent.
    pub unchanged: usize,
}

/// Apply every object of the cluster, then prune orphans. The children
/// are independent requests and go together (one round trip, not one per
/// child): the StatefulSet does not need its ConfigMap or Secret to
/// exist, its pods do, and a kubelet waits for a missing volume source or
/// Secret key and starts the container once it appears. Objects
/// unchanged since this process applied them are skipped; orphans come
/// from the watch cache.
pub(crate) async fn apply_all(
    target: &ApplyTarget<'_>,
    objects: ClusterObjects,
) -> Result<ApplyOutcome, ApplyError> {
    let mut outcome = ApplyOutcome::default();
    let desired = objects.desired_children();
    let ClusterObjects {
        stateful_set,
        config_map,
        services,
        pod_disruption_budget,
        network_policy,
        proxy,
        secret_if_absent,
        tls_secret_if_absent,
    } = objects;

    let (config_map, secret, tls_secret, services, sts, pdb, np, proxy) = futures::join!(
        target.apply(ChildKind::ConfigMap, &config_map),
        target.ensure_secret(&secret_if_absent),
        async {
            match &tls_secret_if_absent {
                Some(tls) => target.ensure_tls_secret(tls).await,
                None => Ok(SecretAction::Keep),
            }
        },
        futures::future::try_join_all(
            services
                .iter()
                .map(|svc| target.apply(ChildKind::Service, svc)),
        ),
        target.apply_stateful_set(stateful_set),
        target.apply(ChildKind::PodDisruptionBudget, &pod_disruption_budget),
        async {
            match &network_policy {
                Some(np) => target.apply(ChildKind::NetworkPolicy, np).await,
                None => Ok(false),
            }
        },
        async {
            match &proxy {
                Some((cm, deployment)) => {
                    let (cm, deployment) = futures::join!(
                        target.apply(ChildKind::ConfigMap, cm),
                        target.apply(ChildKind::Deployment, deployment),
                    );
                    Ok::<_, ApplyError>(usize::from(cm?) + usize::from(deployment?))
                }
                None => Ok(0),
            }
        },
    );
    let count = |b: bool| usize::from(b);
    outcome.applied += count(config_map?);
    outcome.applied += services?.into_iter().filter(|b| *b).count();
    let secret = secret?;
    if secret != SecretAction::Keep {
        outcome.secret = Some(secret);
    }
    let tls_secret = tls_secret?;
    if tls_secret != SecretAction::Keep {
        outcome.tls_secret = Some(tls_secret);
    }
    let (applied, immutable_changes) = sts?;
    outcome.applied += count(applied) + count(pdb?) + count(np?) + proxy?;
    outcome.immutable_changes = immutable_changes;

    outcome.unchanged = desired.len().saturating_sub(outcome.applied);
    let existing = target.caches.children_of(target.ns, target.cluster);
    let orphans = select_orphans(target.cluster, target.cluster_uid, &desired, &existing);
    // Independent requests: together, a few at a time. Every deletion
    // runs to its end before the first failure is returned, so none is
    // cut off half-way (the retry finds the rest in the cache).
    let results: Vec<_> = futures::stream::iter(orphans)
        .map(|(kind, name)| async move {
            target
                .delete_child(kind, &name)
                .await
                .map(|()| (kind, name))
        })
        .buffer_unordered(ORPHAN_DELETES)
        .collect()
        .await;
    let mut failed = None;
    for result in results {
        match result {
            Ok(deleted) => outcome.deleted.push(deleted),
            Err(e) => {
                failed.get_or_insert(e);
            }
        }
    }
    outcome.deleted.sort();
    match failed {
        Some(e) => Err(e),
        None => Ok(outcome),
    }
}

/// Orphan deletions of one reconcile in flight at once. A cluster rarely
/// has more than a few orphans (a Service or the NetworkPolicy after a
/// spec change); the bound keeps a reconcile's burst small next to the
/// other reconciles sharing the API server.
pub const ORPHAN_DELETES: usize = 4;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::collections::BTreeMap;

    fn child(kind: ChildKind, name: &str, cluster: &str, owner: &str) -> ExistingChild {
        ExistingChild {
            kind,
            name: name.into(),
            labels: BTreeMap::from([(LABEL_CLUSTER.to_string(), cluster.to_string())]),
            owner_uids: vec![owner.into()],
            version: 0,
            deleting: false,
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
            // Already being deleted: not deleted again.
            ExistingChild {
                deleting: true,
                ..child(ChildKind::Service, "simple-pg-gone", "simple-pg", "uid-1")
            },
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
