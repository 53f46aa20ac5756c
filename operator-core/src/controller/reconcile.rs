//! The reconcile pipeline of one cluster object: finalizer → validate →
//! build → apply → observe → decide → status, and the error policy. IO:
//! Kubernetes API and instance managers, through the step modules.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use futures::FutureExt;
use k8s_openapi::api::core::v1::{ObjectReference, Pod};
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event as FinalizerEvent, finalizer};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use tracing::Instrument;

use super::ControllerOptions;
use super::apply::{self, ApplyTarget, FIELD_MANAGER};
use super::backoff::Backoff;
use super::cache::{AppliedMemo, Caches};
use super::decide;
use super::error::{
    ApplyError, DecideError, ReconcileError, StatusError, ValidateError, error_chain,
};
use super::galera;
use super::ha;
use super::metrics::{Metrics, Step};
use super::observe;
use super::reconfigure;
use super::report::Reporter;
use super::rolling;
use super::status::{self, StatusInput};
use crate::api::status::{ClusterStatus, Phase};
use crate::build::{self, BuildContext, SecretAction, network_policy_enabled};
use crate::engine::{Engine, ValidatedCluster};

/// The finalizer the controller puts on every cluster object.
pub const FINALIZER: &str = "stratum.dev/finalizer";
/// Requeue while instances are not all ready (waiting is not an error).
/// Pod and child changes trigger a reconcile as they happen (watches);
/// this only catches what no Kubernetes object shows, e.g. an instance
/// manager's report changing while its pod stays as it is.
pub const REQUEUE_WAITING: Duration = Duration::from_secs(10);
/// Requeue of a healthy cluster: roles change without Kubernetes events
/// (a native MongoDB election), so look again regularly.
pub const REQUEUE_HEALTHY: Duration = Duration::from_secs(30);

/// State shared by the controllers of every kind.
pub(crate) struct Shared {
    pub client: kube::Client,
    pub reporter: Reporter,
    pub metrics: Arc<Metrics>,
    pub backoff: Backoff,
    pub opts: ControllerOptions,
}

/// Context of one kind's controller.
pub(crate) struct KindContext {
    pub engine: Arc<dyn Engine>,
    pub resource: ApiResource,
    pub shared: Arc<Shared>,
    /// Watch caches of this kind's children, pods and Secrets.
    pub caches: Caches,
    /// What was applied to each child, to skip unchanged applies.
    pub memo: AppliedMemo,
    /// The last validated spec of each cluster, by [`spec_key`]:
    /// validation evaluates the CRD's schema and CEL rules, the costliest
    /// step of a reconcile that changes nothing.
    pub validated: Mutex<HashMap<(String, String), (u64, ValidatedCluster)>>,
    /// The last status this process wrote for each cluster, until the
    /// watch cache shows it (see [`KindContext::previous`]).
    pub written: Mutex<HashMap<(String, String), WrittenStatus>>,
    /// The controller's cache of this kind's cluster objects: a cluster
    /// missing from it is gone, and so are its records above (see
    /// [`KindContext::on_cluster_event`]).
    pub clusters: Store<DynamicObject>,
    /// What the Galera bootstrap step remembers between reconciles.
    pub galera: galera::Memory,
    /// Failover memory and write-lease renewals per cluster ([`ha`]).
    pub ha: ha::HaRegistry,
    /// Failed `reconfigure` attempts per member ([`reconfigure`]).
    pub reconfigure: reconfigure::Memory,
    /// What the rolling-update step remembers per cluster ([`rolling`]).
    pub rolling: rolling::Memory,
}

/// A status written by this process, with the `resourceVersion` the write
/// produced.
pub(crate) struct WrittenStatus {
    uid: Option<String>,
    resource_version: u64,
    status: ClusterStatus,
    value: serde_json::Value,
}

fn resource_version(obj: &DynamicObject) -> Option<u64> {
    obj.metadata.resource_version.as_deref()?.parse().ok()
}

/// What validation depends on: identity, generation (spec changes),
/// labels, annotations and the spec itself. Status writes leave it alone.
fn spec_key(obj: &DynamicObject) -> u64 {
    let mut h = DefaultHasher::new();
    let m = &obj.metadata;
    (
        &m.namespace,
        &m.name,
        &m.uid,
        m.generation,
        &m.labels,
        &m.annotations,
    )
        .hash(&mut h);
    serde_json::to_vec(obj.data.get("spec").unwrap_or(&serde_json::Value::Null))
        .unwrap_or_default()
        .hash(&mut h);
    h.finish()
}

impl KindContext {
    /// Validate `obj` unless the same spec was validated before.
    fn validate(&self, obj: &DynamicObject) -> Result<ValidatedCluster, crate::error::SpecError> {
        let key = spec_key(obj);
        let id = (obj.namespace().unwrap_or_default(), obj.name_any());
        let lock = || self.validated.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((k, cluster)) = lock().get(&id)
            && *k == key
        {
            return Ok(cluster.clone());
        }
        let mut object = serde_json::to_value(obj).unwrap_or_default();
        if let Some(map) = object.as_object_mut() {
            map.insert(
                "apiVersion".into(),
                self.resource.api_version.clone().into(),
            );
            map.insert("kind".into(), self.resource.kind.clone().into());
        }
        let cluster = self.engine.validate(&object)?;
        lock().insert(id, (key, cluster.clone()));
        Ok(cluster)
    }

    fn forget(&self, obj: &DynamicObject) {
        let (ns, name) = (obj.namespace().unwrap_or_default(), obj.name_any());
        self.retain(|n, c| (n, c) != (ns.as_str(), name.as_str()));
    }

    /// Keep the records (validated spec, applied children, written status)
    /// of the clusters `keep(namespace, name)` accepts; drop the others.
    fn retain(&self, keep: impl Fn(&str, &str) -> bool) {
        self.memo.retain(&keep);
        let keep_id = |(ns, name): &(String, String)| keep(ns, name);
        let mut validated = self.validated.lock().unwrap_or_else(|e| e.into_inner());
        validated.retain(|id, _| keep_id(id));
        drop(validated);
        let mut written = self.written.lock().unwrap_or_else(|e| e.into_inner());
        written.retain(|id, _| keep_id(id));
        drop(written);
        self.galera.retain(&keep);
        // A deleted cluster's primary is no longer renewed a lease.
        self.ha.retain(&keep);
        self.reconfigure.retain(&keep);
        self.rolling.retain(&keep);
    }

    fn cached(&self, ns: &str, name: &str) -> bool {
        let key = ObjectRef::new_with(name, self.resource.clone()).within(ns);
        self.clusters.get(&key).is_some()
    }

    /// Follow the cluster watch (after [`Self::clusters`] has taken the
    /// event in): forget a deleted cluster, and after a re-list every
    /// cluster the list no longer holds (deleted while the watch was
    /// down). Cleanup forgets a cluster too, but only one whose finalizer
    /// landed; one deleted before that would stay in memory until restart.
    pub(crate) fn on_cluster_event(&self, event: &watcher::Event<DynamicObject>) {
        match event {
            watcher::Event::Delete(obj) => self.forget(obj),
            watcher::Event::InitDone => self.retain(|ns, name| self.cached(ns, name)),
            _ => {}
        }
    }

    /// After a reconcile of `cluster`: forget it if it is gone from the
    /// cache. A reconcile still running when the deletion arrived may have
    /// recorded what it did after [`Self::on_cluster_event`] forgot.
    pub(crate) fn forget_if_gone(&self, cluster: &ObjectRef<DynamicObject>) {
        let ns = cluster.namespace.as_deref().unwrap_or_default();
        if !self.cached(ns, &cluster.name) {
            self.retain(|n, c| (n, c) != (ns, cluster.name.as_str()));
        }
    }

    /// How many clusters have records of any sort (tests).
    #[cfg(test)]
    pub(crate) fn remembered(&self) -> usize {
        let mut ids: std::collections::HashSet<(String, String)> = self.memo.clusters();
        ids.extend(self.validated.lock().unwrap().keys().cloned());
        ids.extend(self.written.lock().unwrap().keys().cloned());
        ids.len()
    }

    /// The status `obj` has in the API server, as far as this process
    /// knows, and the JSON keys a merge patch must clear. Usually the
    /// cached object's; but a reconcile often runs on a cached object that
    /// predates this process's own last status write (the write and the
    /// finalizer add or a child's creation race in the watch streams), and
    /// comparing against that older status would write the same status
    /// again. `resourceVersion`s are compared as numbers: the API server
    /// (etcd) issues them in increasing order; one that is not a number
    /// disables the shortcut.
    fn previous(&self, obj: &DynamicObject) -> (Option<ClusterStatus>, Option<serde_json::Value>) {
        let cached = previous_status(obj);
        let cached_value = obj.data.get("status").cloned();
        let id = (obj.namespace().unwrap_or_default(), obj.name_any());
        let mut written = self.written.lock().unwrap_or_else(|e| e.into_inner());
        let Some(w) = written.get(&id) else {
            return (cached, cached_value);
        };
        match resource_version(obj) {
            Some(rv) if w.uid == obj.metadata.uid && rv < w.resource_version => {
                // Keys of both, so the patch clears whatever either has.
                let mut keys = w.value.clone();
                if let (Some(keys), Some(serde_json::Value::Object(old))) =
                    (keys.as_object_mut(), &cached_value)
                {
                    for k in old.keys() {
                        keys.entry(k.clone()).or_insert(serde_json::Value::Null);
                    }
                }
                (Some(w.status.clone()), Some(keys))
            }
            _ => {
                // The cache has caught up (or the object is another one).
                written.remove(&id);
                (cached, cached_value)
            }
        }
    }
}

impl KindContext {
    /// Whether `obj` is exactly the object this process's last status write
    /// stored (same uid and `resourceVersion`): the watch echoing our own
    /// write, which needs no reconcile. Any later change (spec, labels, a
    /// user's `status.targetPrimary`) has a newer `resourceVersion`.
    pub(crate) fn is_own_status_echo(&self, obj: &DynamicObject) -> bool {
        let id = (obj.namespace().unwrap_or_default(), obj.name_any());
        let written = self.written.lock().unwrap_or_else(|e| e.into_inner());
        written.get(&id).is_some_and(|w| {
            w.uid == obj.metadata.uid && resource_version(obj) == Some(w.resource_version)
        })
    }

    /// Remember a status written outside the pipeline's status write (the
    /// `ha` step records its intent before acting), so that the next
    /// reconcile does not start from an older cached status.
    pub(crate) fn remember_status(&self, stored: &DynamicObject) {
        let (Some(resource_version), Some(value)) =
            (resource_version(stored), stored.data.get("status"))
        else {
            return;
        };
        let Ok(status) = serde_json::from_value::<ClusterStatus>(value.clone()) else {
            return;
        };
        let id = (stored.namespace().unwrap_or_default(), stored.name_any());
        let mut written = self.written.lock().unwrap_or_else(|e| e.into_inner());
        written.insert(
            id,
            WrittenStatus {
                uid: stored.metadata.uid.clone(),
                resource_version,
                status,
                value: value.clone(),
            },
        );
    }
}

fn object_key(kind: &str, ns: &str, name: &str) -> String {
    format!("{kind}/{ns}/{name}")
}

fn patch_params() -> PatchParams {
    PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    }
}

/// Reconcile one cluster object. Idempotent; does not care why it was
/// called.
pub(crate) async fn reconcile(
    obj: Arc<DynamicObject>,
    ctx: Arc<KindContext>,
) -> Result<Action, ReconcileError> {
    let kind = ctx.engine.kind();
    let name = obj.name_any();
    let ns = obj.namespace().unwrap_or_default();
    let generation = obj.metadata.generation.unwrap_or_default();
    let span = tracing::info_span!("reconcile", kind, namespace = %ns, name = %name, generation);
    async move {
        let started = Instant::now();
        let object_ref = obj.object_ref(&ctx.resource);
        let api: Api<DynamicObject> =
            Api::namespaced_with(ctx.shared.client.clone(), &ns, &ctx.resource);
        let result = if needs_finalizer(&obj) {
            // A new cluster: add the finalizer together with the first
            // applies instead of in a reconcile of its own (one round
            // trip less before the children exist). Children created
            // before the finalizer lands are owned by the cluster, so
            // garbage collection removes them if it is deleted meanwhile.
            let (added, applied) =
                futures::join!(add_finalizer(&api, &obj, &ctx), apply_event(&obj, &ctx));
            match finalizer_outcome(added.map(|()| Action::await_change())) {
                Ok(_) => applied,
                Err(e) => Err(e),
            }
        } else {
            let result = finalizer(&api, FINALIZER, obj, |event| {
                let ctx = ctx.clone();
                async move {
                    match event {
                        FinalizerEvent::Apply(o) => apply_event(&o, &ctx).await,
                        FinalizerEvent::Cleanup(o) => cleanup_event(&o, &ctx).await,
                    }
                }
            })
            .await;
            finalizer_outcome(result)
        };
        let shared = &ctx.shared;
        shared.metrics.record(
            kind,
            started.elapsed(),
            result.as_ref().err().map(ReconcileError::category),
        );
        match &result {
            Ok(action) => {
                shared.backoff.reset(&object_key(kind, &ns, &name));
                tracing::debug!(?action, "reconciled");
            }
            Err(err) => shared.reporter.error(&object_ref, err),
        }
        result
    }
    .instrument(span)
    .await
}

/// An object that is not being deleted and lacks [`FINALIZER`].
fn needs_finalizer(obj: &DynamicObject) -> bool {
    obj.metadata.deletion_timestamp.is_none() && !obj.finalizers().iter().any(|f| f == FINALIZER)
}

/// Add [`FINALIZER`] with the JSON patch kube-runtime's `finalizer()`
/// sends (test the list as cached, then add), so concurrent writers of
/// the list are detected rather than overwritten; errors come back as
/// that helper's.
async fn add_finalizer(
    api: &Api<DynamicObject>,
    obj: &DynamicObject,
    ctx: &KindContext,
) -> Result<(), kube::runtime::finalizer::Error<ReconcileError>> {
    use kube::runtime::finalizer::Error as F;
    let started = Instant::now();
    let finalizers = obj.finalizers();
    let ops = if finalizers.is_empty() {
        serde_json::json!([
            {"op": "test", "path": "/metadata/finalizers", "value": null},
            {"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]},
        ])
    } else {
        serde_json::json!([
            {"op": "test", "path": "/metadata/finalizers", "value": finalizers},
            {"op": "add", "path": "/metadata/finalizers/-", "value": FINALIZER},
        ])
    };
    let patch: json_patch::Patch = serde_json::from_value(ops).map_err(|_| F::InvalidFinalizer)?;
    let name = obj.metadata.name.as_deref().ok_or(F::UnnamedObject)?;
    let result = api
        .patch(name, &PatchParams::default(), &Patch::Json::<()>(patch))
        .await;
    ctx.shared
        .metrics
        .record_step(ctx.engine.kind(), Step::Finalizer, started.elapsed());
    result.map(|_| ()).map_err(F::AddFinalizer)
}

/// The result of the finalizer helper as a reconcile result. Two races
/// with the watch cache are not failures (both seen on a real API server):
/// - adding the finalizer is a JSON patch that tests the finalizer list
///   first; when the cached object is older than the stored one (our own
///   earlier add has not been seen yet), the test fails with 422: look
///   again shortly;
/// - removing the finalizer of an object that is already gone: a second
///   cleanup runs when a late event (a child deleted by garbage
///   collection) arrives after the first cleanup let the object go.
pub(crate) fn finalizer_outcome(
    result: Result<Action, kube::runtime::finalizer::Error<ReconcileError>>,
) -> Result<Action, ReconcileError> {
    use kube::runtime::finalizer::Error as F;
    match result {
        Err(F::AddFinalizer(kube::Error::Api(s))) if s.code == 422 => {
            Ok(Action::requeue(Duration::from_secs(1)))
        }
        Err(F::RemoveFinalizer(kube::Error::Api(s))) if s.is_not_found() => {
            Ok(Action::await_change())
        }
        other => other.map_err(ReconcileError::from_finalizer),
    }
}

/// Permanent errors wait for a change of the object; transient ones retry
/// with per-object exponential backoff.
pub(crate) fn error_policy(
    obj: Arc<DynamicObject>,
    err: &ReconcileError,
    ctx: Arc<KindContext>,
) -> Action {
    if err.is_permanent() {
        return Action::await_change();
    }
    let key = object_key(
        ctx.engine.kind(),
        &obj.namespace().unwrap_or_default(),
        &obj.name_any(),
    );
    Action::requeue(ctx.shared.backoff.next(&key))
}

fn previous_status(obj: &DynamicObject) -> Option<ClusterStatus> {
    obj.data
        .get("status")
        .and_then(|s| serde_json::from_value(s.clone()).ok())
}

/// Merge-patch the status subresource from `old` (the JSON status the
/// patch is computed against) to `new`, and remember what was written.
pub(super) async fn write_status(
    ctx: &KindContext,
    obj: &DynamicObject,
    old: Option<&serde_json::Value>,
    new: &ClusterStatus,
) -> Result<(), StatusError> {
    let name = obj.name_any();
    let ns = obj.namespace().unwrap_or_default();
    let api: Api<DynamicObject> =
        Api::namespaced_with(ctx.shared.client.clone(), &ns, &ctx.resource);
    let patch = status::status_patch(new, old);
    let started = Instant::now();
    let result = api
        .patch_status(&name, &patch_params(), &Patch::Merge(&patch))
        .await;
    ctx.shared
        .metrics
        .record_step(ctx.engine.kind(), Step::Status, started.elapsed());
    let stored = result.map_err(|source| StatusError::Patch {
        kind: ctx.engine.kind().to_string(),
        name: name.clone(),
        source,
    })?;
    if let Some(resource_version) = resource_version(&stored) {
        let mut written = ctx.written.lock().unwrap_or_else(|e| e.into_inner());
        written.insert(
            (ns, name),
            WrittenStatus {
                uid: stored.metadata.uid.clone(),
                resource_version,
                status: new.clone(),
                // What the status is now (the patch may leave fields out).
                value: serde_json::to_value(new).unwrap_or_else(|_| patch["status"].clone()),
            },
        );
    }
    Ok(())
}

/// Record a rejected spec in status (`Failed`, `Degraded=True` naming the
/// field). The caller returns the permanent error, which the reporter turns
/// into the `InvalidSpec` Event.
async fn reject(ctx: &KindContext, obj: &DynamicObject, message: &str) -> Result<(), StatusError> {
    let (previous, previous_value) = ctx.previous(obj);
    let new = status::failed_status(
        previous.as_ref(),
        message,
        obj.metadata.generation,
        unsupported(&*ctx.engine),
        Utc::now(),
    );
    if previous.as_ref() != Some(&new) {
        write_status(ctx, obj, previous_value.as_ref(), &new).await?;
    }
    Ok(())
}

fn unsupported(engine: &dyn Engine) -> Vec<String> {
    engine
        .unsupported_capabilities()
        .into_iter()
        .map(str::to_string)
        .collect()
}

async fn apply_event(obj: &DynamicObject, ctx: &KindContext) -> Result<Action, ReconcileError> {
    let engine = &*ctx.engine;
    let shared = &ctx.shared;
    let client = &shared.client;
    let kind = engine.kind();
    let object_ref: ObjectReference = obj.object_ref(&ctx.resource);
    let (mut previous, mut previous_value) = ctx.previous(obj);

    // validate: the API server already ran the schema and CEL rules.
    let mut cluster = match ctx.validate(obj) {
        Ok(c) => c,
        Err(spec) => {
            reject(ctx, obj, &spec.to_string()).await?;
            return Err(ValidateError::Spec(spec).into());
        }
    };

    // A PostgreSQL scale-down removing the primary's ordinal waits for
    // the rolling step's switchover: until then the cluster keeps it.
    let model = engine.topology(&cluster, None).model;
    let keep = rolling::hold_scale_down(
        &mut cluster,
        model,
        engine.failover().is_some(),
        previous.as_ref(),
    );

    // build: pure.
    let build_ctx = BuildContext {
        operator_image: shared.opts.operator_image.clone(),
        network_policy: network_policy_enabled(obj.annotations()),
    };
    let objects = match build::build(&cluster, engine, &build_ctx) {
        Ok(o) => o,
        Err(e) => {
            if e.is_permanent() {
                reject(ctx, obj, &error_chain(&e)).await?;
            }
            return Err(e.into());
        }
    };
    let manifest = engine.manifest(&cluster);

    // apply: server-side apply, create-if-absent Secret, prune orphans.
    let ns = cluster.meta.namespace.clone();
    let name = cluster.meta.name.clone();
    let uid = cluster.meta.uid.clone().unwrap_or_default();
    // Before the watch caches hold their first lists, the children are
    // unknown: look again shortly rather than hold a reconcile slot.
    match ctx.caches.ready().now_or_never() {
        Some(result) => result.map_err(ApplyError::CacheStopped)?,
        None => {
            tracing::debug!("watch caches not ready yet");
            return Ok(Action::requeue(Duration::from_millis(500)));
        }
    }
    let target = ApplyTarget {
        client,
        caches: &ctx.caches,
        memo: &ctx.memo,
        ns: &ns,
        cluster: &name,
        cluster_uid: &uid,
        metrics: &shared.metrics,
        kind,
    };
    let started = Instant::now();
    let outcome = apply::apply_all(&target, objects).await;
    shared
        .metrics
        .record_step(kind, Step::Apply, started.elapsed());
    let outcome = outcome?;
    shared
        .metrics
        .record_applies(kind, outcome.applied, outcome.unchanged);
    let reporter = &shared.reporter;
    if !outcome.immutable_changes.is_empty() {
        let note = format!(
            "not applied: StatefulSet {} cannot change in place; the previous value stays in effect",
            outcome.immutable_changes.join(", ")
        );
        reporter.note(&object_ref, true, "ImmutableFieldChange", note);
    }
    if let Some(action) = &outcome.secret {
        let note = match action {
            SecretAction::AddMissing(keys) => format!(
                "added missing credentials: {}",
                keys.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
            _ => "created the credentials Secret".to_string(),
        };
        reporter.note(&object_ref, false, "CredentialsCreated", note);
    }
    if outcome.tls_secret.is_some() {
        reporter.note(
            &object_ref,
            false,
            "TlsSecretCreated",
            "generated a CA and a certificate for the members' cluster traffic".to_string(),
        );
    }
    for (child_kind, child) in &outcome.deleted {
        let note = format!("deleted {} {child}: no longer desired", child_kind.as_str());
        reporter.note(&object_ref, false, "OrphanDeleted", note);
    }

    // observe.
    let mut seen = observe::observe(
        &ctx.caches,
        &cluster,
        kind,
        &manifest,
        shared.opts.instance_timeout,
    )
    .await;

    // galera: bootstrap after a full crash (multi-writer engines only);
    // the decision is written to status before the order.
    let recovery = galera::recover(
        ctx,
        obj,
        &cluster,
        &seen,
        &mut previous,
        &mut previous_value,
    )
    .await?;

    // ha: failover, switchover, fencing (engines with the failover
    // capability); may refresh `seen.members`.
    let ha = ha::step(ctx, obj, &cluster, &manifest, &mut seen, previous.as_ref()).await?;

    // reconfigure: running managers take the engine settings of the
    // ConfigMap applied above (restarts are the rolling update's).
    let reconfigured = reconfigure::step(ctx, obj, &cluster, &manifest, &seen).await;
    // rolling: SmartUpdate replaces outdated pods one at a time, the
    // primary/writer last (a switchover is asked for through status).
    let roll = rolling::step(
        ctx,
        obj,
        &cluster,
        &manifest,
        &seen,
        ha.as_ref(),
        recovery.base(previous.as_ref()),
        keep,
    )
    .await;

    // decide: routing and pod labels.
    let previous_primary = previous.as_ref().and_then(|s| s.current_primary.clone());
    let engine_routing = engine.route(&seen.members);
    let routing = decide::decide_routing(
        &name,
        match &ha {
            Some(ha) => ha.routing(engine_routing),
            None => engine_routing,
        },
        &seen.members,
        &seen.pods,
        previous_primary.as_deref(),
        engine.topology(&cluster, None).model == crate::engine::ReplicationModel::MultiWriter,
    );
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let label_patches = decide::label_patches(&seen.pods, &routing, &seen.members);
    if !label_patches.is_empty() {
        // Each pod's labels are independent of the others': together.
        let started = Instant::now();
        let results = futures::future::join_all(label_patches.into_iter().map(|(pod, patch)| {
            let pods = &pods;
            async move {
                match pods
                    .patch(&pod, &patch_params(), &Patch::Merge(&patch))
                    .await
                {
                    Ok(_) => Ok(()),
                    Err(kube::Error::Api(s)) if s.is_not_found() => Ok(()),
                    Err(source) => Err(DecideError::PatchPodLabels { pod, source }),
                }
            }
        }))
        .await;
        shared
            .metrics
            .record_step(kind, Step::PodLabels, started.elapsed());
        results.into_iter().collect::<Result<Vec<()>, _>>()?;
    }

    // status.
    let instance_names = cluster.instance_names();
    let mut new = status::compute_status(
        recovery.base(previous.as_ref()),
        &StatusInput {
            cluster: &name,
            generation: cluster.meta.generation,
            instance_names: &instance_names,
            pods: &seen.pods,
            members: &seen.members,
            routing: &routing,
            unsupported: unsupported(engine),
            now: Utc::now(),
        },
    );
    if let Some(ha) = &ha {
        ha.apply(previous.as_ref(), &mut new);
    }
    if let Some(roll) = &roll {
        roll.apply(&mut new);
    }
    if previous.as_ref() != Some(&new) {
        write_status(ctx, obj, previous_value.as_ref(), &new).await?;
    }
    for change in status::state_changes(previous.as_ref(), &new) {
        reporter.state_change(&object_ref, &change);
    }
    let requeue = if new.phase == Some(Phase::Healthy) {
        REQUEUE_HEALTHY
    } else {
        REQUEUE_WAITING
    };
    Ok(Action::requeue(
        [
            recovery.requeue,
            ha.and_then(|h| h.requeue),
            reconfigured,
            roll.and_then(|r| r.requeue),
        ]
        .into_iter()
        .flatten()
        .fold(requeue, Duration::min),
    ))
}

/// Deletion: owned children go with the cluster through garbage
/// collection (PVCs stay: retention policy Retain); record the phase.
async fn cleanup_event(obj: &DynamicObject, ctx: &KindContext) -> Result<Action, ReconcileError> {
    let (previous, previous_value) = ctx.previous(obj);
    let new = status::deleting_status(previous.as_ref(), Utc::now());
    if previous.as_ref() != Some(&new) {
        match write_status(ctx, obj, previous_value.as_ref(), &new).await {
            Ok(()) => {}
            Err(StatusError::Patch {
                source: kube::Error::Api(s),
                ..
            }) if s.is_not_found() => {}
            Err(e) => return Err(e.into()),
        }
    }
    ctx.forget(obj);
    let object_ref = obj.object_ref(&ctx.resource);
    for change in status::state_changes(previous.as_ref(), &new) {
        ctx.shared.reporter.state_change(&object_ref, &change);
    }
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::finalizer::Error as F;

    #[test]
    fn removing_the_finalizer_of_a_deleted_object_succeeds() {
        let gone = kube::core::Status::failure("not found", "NotFound").with_code(404);
        let outcome = finalizer_outcome(Err(F::RemoveFinalizer(kube::Error::Api(gone.boxed()))));
        assert_eq!(outcome.unwrap(), Action::await_change());

        let conflict = kube::core::Status::failure("conflict", "Conflict").with_code(409);
        let outcome =
            finalizer_outcome(Err(F::RemoveFinalizer(kube::Error::Api(conflict.boxed()))));
        assert_eq!(outcome.unwrap_err().category(), "FinalizerFailed");
    }

    #[test]
    fn a_stale_finalizer_list_is_retried_quietly() {
        let test_failed = kube::core::Status::failure(
            "the server rejected our request due to an error in our request",
            "Invalid",
        )
        .with_code(422);
        let outcome =
            finalizer_outcome(Err(F::AddFinalizer(kube::Error::Api(test_failed.boxed()))));
        assert_eq!(outcome.unwrap(), Action::requeue(Duration::from_secs(1)));

        let forbidden = kube::core::Status::failure("forbidden", "Forbidden").with_code(403);
        let outcome = finalizer_outcome(Err(F::AddFinalizer(kube::Error::Api(forbidden.boxed()))));
        assert_eq!(outcome.unwrap_err().category(), "FinalizerFailed");
    }
}
