//! The StatefulSet and its pod template. Pure.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    StatefulSet, StatefulSetPersistentVolumeClaimRetentionPolicy, StatefulSetSpec,
    StatefulSetUpdateStrategy,
};
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource,
    EnvVar, EnvVarSource, HTTPGetAction, LocalObjectReference, ObjectFieldSelector,
    PersistentVolumeClaim, PersistentVolumeClaimSpec, PodAffinityTerm, PodAntiAffinity,
    PodSecurityContext, PodSpec, PodTemplateSpec, Probe, SeccompProfile, SecretVolumeSource,
    SecurityContext, TopologySpreadConstraint, Volume, VolumeMount, VolumeResourceRequirements,
    WeightedPodAffinityTerm,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::meta::{MetaBuilder, container_name};
use super::{
    API_PORT_NAME, BIN_DIR, BuildContext, CONFIG_DIR, CONFIG_KEY, DATA_VOLUME, RUN_DIR,
    SECRETS_DIR, TLS_DIR, names,
};
use crate::api::common::{PodAntiAffinityType, StorageSpec, UpdateStrategy};
use crate::engine::{Engine, EngineManifest, TlsSecret, ValidatedCluster};
use crate::plan::POD_API_PORT;

/// Name of the init container that copies the `stratum` binary.
pub const INIT_CONTAINER: &str = "bootstrap-controller";
const BIN_VOLUME: &str = "stratum-bin";
const CONFIG_VOLUME: &str = "config";
const SECRETS_VOLUME: &str = "credentials";
const TLS_VOLUME: &str = "tls";
const RUN_VOLUME: &str = "run";
/// Mode of the credential files: owned by root and the pod's `fsGroup`
/// (the database user's group), so group-read is enough and other users
/// read nothing.
pub const SECRET_DEFAULT_MODE: i32 = 0o440;
/// Mode when the engine names no user (so there is no `fsGroup`): the
/// image's own non-root user must still read the files.
pub const SECRET_MODE_WITHOUT_FS_GROUP: i32 = 0o444;
/// Time for a clean database shutdown (checkpoint, demotion) before SIGKILL.
pub const TERMINATION_GRACE_SECONDS: i64 = 60;

pub(super) fn stateful_set(
    meta: &MetaBuilder,
    cluster: &ValidatedCluster,
    engine: &dyn Engine,
    manifest: &EngineManifest,
    tls: Option<&TlsSecret>,
    ctx: &BuildContext,
) -> StatefulSet {
    let kind = engine.kind();
    let common = &cluster.common;
    let pod_management_policy = common
        .pod_management_policy
        .unwrap_or_else(|| engine.default_pod_management_policy());
    let mut claims = vec![claim_template(meta, DATA_VOLUME, &common.storage)];
    claims.extend(
        manifest
            .extra_volumes
            .iter()
            .map(|v| claim_template(meta, &v.name, &v.storage)),
    );
    let update_strategy = match common.update_strategy {
        // SmartUpdate: the operator deletes pods itself, replicas first.
        UpdateStrategy::SmartUpdate | UpdateStrategy::OnDelete => "OnDelete",
        UpdateStrategy::RollingUpdate => "RollingUpdate",
    };
    StatefulSet {
        metadata: meta.object_meta(names::stateful_set(&meta.cluster)),
        spec: Some(StatefulSetSpec {
            replicas: Some(common.instances),
            service_name: Some(names::headless_service(&meta.cluster)),
            selector: meta.label_selector(),
            pod_management_policy: Some(pod_management_policy.as_str().to_string()),
            update_strategy: Some(StatefulSetUpdateStrategy {
                type_: Some(update_strategy.to_string()),
                rolling_update: None,
            }),
            // Retain on both unless spec.pvcRetentionPolicy says otherwise:
            // a PVC holds the only copy of an instance's data, so neither
            // scaling down nor deleting the cluster removes it by default.
            // Scaling back up reuses the volume (a fast rejoin instead of a
            // full clone), as with CloudNativePG.
            persistent_volume_claim_retention_policy: Some(
                StatefulSetPersistentVolumeClaimRetentionPolicy {
                    when_deleted: Some(common.pvc_retention_policy.when_deleted.as_str().into()),
                    when_scaled: Some(common.pvc_retention_policy.when_scaled.as_str().into()),
                },
            ),
            volume_claim_templates: Some(claims),
            template: pod_template(meta, cluster, kind, manifest, tls, ctx),
            ..Default::default()
        }),
        status: None,
    }
}

/// A claim template from a storage block: `ReadWriteOnce`, the size and
/// class, then every field set in `pvcTemplate` on top.
fn claim_template(meta: &MetaBuilder, name: &str, storage: &StorageSpec) -> PersistentVolumeClaim {
    let base = PersistentVolumeClaimSpec {
        access_modes: Some(vec!["ReadWriteOnce".into()]),
        resources: Some(VolumeResourceRequirements {
            requests: Some(BTreeMap::from([(
                "storage".to_string(),
                Quantity(storage.size.clone()),
            )])),
            limits: None,
        }),
        storage_class_name: storage.storage_class.clone(),
        ..Default::default()
    };
    let spec = match &storage.pvc_template {
        None => base,
        Some(overrides) => {
            let mut merged = serde_json::to_value(&base).unwrap_or_default();
            merge_json(
                &mut merged,
                serde_json::to_value(overrides).unwrap_or_default(),
            );
            serde_json::from_value(merged).unwrap_or(base)
        }
    };
    PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            // Only labels that never change: claim templates are immutable.
            labels: Some(meta.own_labels()),
            ..Default::default()
        },
        spec: Some(spec),
        status: None,
    }
}

/// JSON merge: objects merge key by key, anything else (arrays included)
/// replaces; nulls in `patch` are ignored (unset override fields).
pub(super) fn merge_json(target: &mut serde_json::Value, patch: serde_json::Value) {
    match (target, patch) {
        (serde_json::Value::Object(t), serde_json::Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    continue;
                }
                match t.get_mut(&k) {
                    Some(existing) => merge_json(existing, v),
                    None => {
                        t.insert(k, v);
                    }
                }
            }
        }
        (t, p) if !p.is_null() => *t = p,
        _ => {}
    }
}

fn pod_template(
    meta: &MetaBuilder,
    cluster: &ValidatedCluster,
    kind: &str,
    manifest: &EngineManifest,
    tls: Option<&TlsSecret>,
    ctx: &BuildContext,
) -> PodTemplateSpec {
    let common = &cluster.common;
    let affinity = &common.affinity;
    let annotations = meta.annotations();
    PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(meta.labels()),
            annotations: (!annotations.is_empty()).then_some(annotations),
            ..Default::default()
        }),
        spec: Some(PodSpec {
            init_containers: Some(vec![init_container(ctx)]),
            containers: vec![database_container(cluster, kind, manifest, tls.is_some())],
            volumes: Some(volumes(meta, manifest.run_as_user, tls)),
            security_context: Some(pod_security_context(manifest.run_as_user)),
            termination_grace_period_seconds: Some(TERMINATION_GRACE_SECONDS),
            // Pods find each other through the headless Service; Service
            // environment variables would only leak other apps' addresses.
            enable_service_links: Some(false),
            image_pull_secrets: (!common.image_pull_secrets.is_empty()).then(|| {
                common
                    .image_pull_secrets
                    .iter()
                    .map(|s| LocalObjectReference {
                        name: s.name.clone(),
                    })
                    .collect()
            }),
            node_selector: (!affinity.node_selector.is_empty())
                .then(|| affinity.node_selector.clone()),
            tolerations: (!affinity.tolerations.is_empty()).then(|| affinity.tolerations.clone()),
            affinity: pod_affinity(&meta.label_selector(), cluster),
            topology_spread_constraints: topology_spread(
                &meta.label_selector(),
                &common.topology_spread_constraints,
            ),
            ..Default::default()
        }),
    }
}

fn init_container(ctx: &BuildContext) -> Container {
    Container {
        name: INIT_CONTAINER.into(),
        image: Some(ctx.operator_image.clone()),
        command: Some(vec![
            "/usr/local/bin/stratum".into(),
            "install-binary".into(),
            format!("{BIN_DIR}/stratum"),
        ]),
        volume_mounts: Some(vec![mount(BIN_VOLUME, BIN_DIR, false)]),
        security_context: Some(container_security_context()),
        ..Default::default()
    }
}

fn database_container(
    cluster: &ValidatedCluster,
    kind: &str,
    manifest: &EngineManifest,
    tls: bool,
) -> Container {
    let common = &cluster.common;
    let mut ports: Vec<ContainerPort> = manifest
        .ports
        .iter()
        .map(|p| ContainerPort {
            name: Some(p.name.clone()),
            container_port: i32::from(p.port),
            protocol: Some("TCP".into()),
            ..Default::default()
        })
        .collect();
    ports.push(ContainerPort {
        name: Some(API_PORT_NAME.into()),
        container_port: i32::from(POD_API_PORT),
        protocol: Some("TCP".into()),
        ..Default::default()
    });

    let field = |path: &str| EnvVarSource {
        field_ref: Some(ObjectFieldSelector {
            field_path: path.to_string(),
            api_version: None,
        }),
        ..Default::default()
    };
    let mut env = vec![
        EnvVar {
            name: "STRATUM_INSTANCE".into(),
            value_from: Some(field("metadata.name")),
            value: None,
        },
        // The same value under the name InstanceConfig documents, until
        // the instance manager settles on one.
        EnvVar {
            name: "POD_NAME".into(),
            value_from: Some(field("metadata.name")),
            value: None,
        },
        EnvVar {
            name: "POD_IP".into(),
            value_from: Some(field("status.podIP")),
            value: None,
        },
    ];
    env.extend(manifest.env.iter().map(|(k, v)| EnvVar {
        name: k.clone(),
        value: Some(v.clone()),
        value_from: None,
    }));

    let mut mounts = vec![mount(DATA_VOLUME, &manifest.data_mount_path, false)];
    mounts.extend(
        manifest
            .extra_volumes
            .iter()
            .map(|v| mount(&v.name, &v.mount_path, false)),
    );
    mounts.extend([
        mount(CONFIG_VOLUME, CONFIG_DIR, true),
        mount(SECRETS_VOLUME, SECRETS_DIR, true),
        mount(RUN_VOLUME, RUN_DIR, false),
        mount(BIN_VOLUME, BIN_DIR, true),
    ]);
    if tls {
        mounts.push(mount(TLS_VOLUME, TLS_DIR, true));
    }

    let http_probe = |path: &str, period: i32, failures: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_string()),
            port: IntOrString::String(API_PORT_NAME.into()),
            scheme: Some("HTTP".into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(5),
        failure_threshold: Some(failures),
        ..Default::default()
    };

    Container {
        name: container_name(kind),
        image: Some(cluster.image.clone()),
        image_pull_policy: common.image_pull_policy.clone(),
        command: Some(vec![
            format!("{BIN_DIR}/stratum"),
            "instance".into(),
            "--config".into(),
            format!("{CONFIG_DIR}/{CONFIG_KEY}"),
        ]),
        env: Some(env),
        ports: Some(ports),
        volume_mounts: Some(mounts),
        resources: common.resources.clone(),
        // /healthz answers as soon as the manager runs, so liveness only
        // catches a hung manager; readiness follows the database.
        liveness_probe: Some(http_probe(crate::instance::protocol::PATH_HEALTHZ, 10, 3)),
        readiness_probe: Some(http_probe(crate::instance::protocol::PATH_READYZ, 5, 3)),
        // Generous: first boot may run initdb, clone a replica or restore a
        // backup before the manager is considered live (up to one hour).
        startup_probe: Some(http_probe(crate::instance::protocol::PATH_HEALTHZ, 10, 360)),
        security_context: Some(container_security_context()),
        ..Default::default()
    }
}

pub(super) fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.to_string(),
        mount_path: path.to_string(),
        read_only: read_only.then_some(true),
        ..Default::default()
    }
}

fn volumes(meta: &MetaBuilder, run_as_user: Option<i64>, tls: Option<&TlsSecret>) -> Vec<Volume> {
    let empty_dir = |name: &str| Volume {
        name: name.to_string(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Default::default()
    };
    let mode = if run_as_user.is_some() {
        SECRET_DEFAULT_MODE
    } else {
        SECRET_MODE_WITHOUT_FS_GROUP
    };
    let secret = |volume: &str, secret_name: String| Volume {
        name: volume.into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret_name),
            default_mode: Some(mode),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut volumes = vec![
        empty_dir(BIN_VOLUME),
        empty_dir(RUN_VOLUME),
        Volume {
            name: CONFIG_VOLUME.into(),
            config_map: Some(ConfigMapVolumeSource {
                name: names::config_map(&meta.cluster),
                ..Default::default()
            }),
            ..Default::default()
        },
        secret(SECRETS_VOLUME, names::credentials_secret(&meta.cluster)),
    ];
    // Every key of the Secret becomes a file (no `items`): a user's Secret
    // that lacks one still mounts, and the instance names the missing key
    // instead of the pod waiting on a mount error.
    if let Some(tls) = tls {
        volumes.push(secret(TLS_VOLUME, tls.name.clone()));
    }
    volumes
}

fn runtime_default_seccomp() -> SeccompProfile {
    SeccompProfile {
        type_: "RuntimeDefault".into(),
        localhost_profile: None,
    }
}

/// The database image's user for everything, so that files on the volumes
/// belong to it; never root.
fn pod_security_context(run_as_user: Option<i64>) -> PodSecurityContext {
    PodSecurityContext {
        run_as_user,
        run_as_group: run_as_user,
        fs_group: run_as_user,
        // Large data volumes: only chown when the root of the volume is
        // not already right.
        fs_group_change_policy: run_as_user.map(|_| "OnRootMismatch".into()),
        run_as_non_root: Some(true),
        seccomp_profile: Some(runtime_default_seccomp()),
        ..Default::default()
    }
}

pub(super) fn container_security_context() -> SecurityContext {
    SecurityContext {
        run_as_non_root: Some(true),
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            add: None,
        }),
        seccomp_profile: Some(runtime_default_seccomp()),
        ..Default::default()
    }
}

/// The spec's affinity; the anti-affinity term keeps apart the pods that
/// `selector` matches.
pub(super) fn pod_affinity(
    selector: &LabelSelector,
    cluster: &ValidatedCluster,
) -> Option<Affinity> {
    let spec = &cluster.common.affinity;
    let pod_anti_affinity = spec.enable_pod_anti_affinity.then(|| {
        let term = PodAffinityTerm {
            label_selector: Some(selector.clone()),
            topology_key: spec.topology_key.clone(),
            ..Default::default()
        };
        match spec.pod_anti_affinity_type {
            PodAntiAffinityType::Preferred => PodAntiAffinity {
                preferred_during_scheduling_ignored_during_execution: Some(vec![
                    WeightedPodAffinityTerm {
                        weight: 100,
                        pod_affinity_term: term,
                    },
                ]),
                ..Default::default()
            },
            PodAntiAffinityType::Required => PodAntiAffinity {
                required_during_scheduling_ignored_during_execution: Some(vec![term]),
                ..Default::default()
            },
        }
    });
    if pod_anti_affinity.is_none() && spec.node_affinity.is_none() {
        return None;
    }
    Some(Affinity {
        node_affinity: spec.node_affinity.clone(),
        pod_anti_affinity,
        pod_affinity: None,
    })
}

/// The spec's constraints, with the cluster's pod selector filled in where
/// a constraint has none (a constraint without a selector counts nothing).
pub(super) fn topology_spread(
    selector: &LabelSelector,
    constraints: &[TopologySpreadConstraint],
) -> Option<Vec<TopologySpreadConstraint>> {
    if constraints.is_empty() {
        return None;
    }
    Some(
        constraints
            .iter()
            .cloned()
            .map(|mut c| {
                if c.label_selector.is_none() {
                    c.label_selector = Some(selector.clone());
                }
                c
            })
            .collect(),
    )
}
