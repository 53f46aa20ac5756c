//! Builder tests from small inline YAML fixtures with a fake engine, so
//! they do not depend on the real engines.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, PodSpec, Service};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::json;

use super::*;
use crate::api::common::{ClusterSpecCommon, StorageSpec};
use crate::engine::{
    Election, EnginePort, ExtraVolume, ObservedMember, ReplicationModel, Routing, Topology,
};
use crate::instance::config::InstanceConfig;

/// Implements the pure part of [`Engine`] with fixed answers; rejects
/// `instances: 2` the way a quorum engine would. Shared with the controller
/// tests.
pub(crate) struct FakeEngine;

impl Engine for FakeEngine {
    fn kind(&self) -> &'static str {
        "FakeCluster"
    }

    fn crd(&self) -> CustomResourceDefinition {
        CustomResourceDefinition::default()
    }

    fn validate(&self, object: &serde_json::Value) -> Result<ValidatedCluster, SpecError> {
        let meta = crate::validate::cluster_meta(self.kind(), object)?;
        let spec = object.get("spec").cloned().unwrap_or_default();
        let common: ClusterSpecCommon = crate::validate::from_json(spec.clone(), "spec")?;
        if common.instances == 2 {
            return Err(SpecError::new(
                "spec.instances",
                "must be odd for FakeCluster (a quorum needs a majority); got 2",
            ));
        }
        let image = common
            .image
            .clone()
            .unwrap_or_else(|| "example.invalid/fakedb:1".into());
        Ok(ValidatedCluster {
            meta,
            common,
            image,
            spec,
        })
    }

    fn topology(&self, cluster: &ValidatedCluster, _: Option<&str>) -> Topology {
        Topology {
            model: ReplicationModel::PrimaryReplica,
            update_order: cluster.instance_names(),
            voters: Vec::new(),
        }
    }

    fn manifest(&self, _cluster: &ValidatedCluster) -> EngineManifest {
        EngineManifest {
            ports: vec![
                EnginePort {
                    name: "fakedb".into(),
                    port: 7000,
                    client: true,
                },
                EnginePort {
                    name: "fakerepl".into(),
                    port: 7001,
                    client: false,
                },
            ],
            data_mount_path: "/var/lib/fake".into(),
            extra_volumes: vec![ExtraVolume {
                name: "wal".into(),
                mount_path: "/var/lib/fake-wal".into(),
                storage: StorageSpec {
                    size: "2Gi".into(),
                    storage_class: None,
                    pvc_template: None,
                },
            }],
            run_as_user: Some(1001),
            bin_dir: Some("/opt/fake/bin".into()),
            env: BTreeMap::from([("FAKE_MODE".to_string(), "test".to_string())]),
            generated_secrets: vec!["superuser-password".into(), "replication-password".into()],
        }
    }

    fn instance_settings(
        &self,
        cluster: &ValidatedCluster,
    ) -> Result<serde_json::Value, SpecError> {
        Ok(json!({"fake": true, "instances": cluster.common.instances}))
    }

    fn elect(&self, _: &ValidatedCluster, _: &[ObservedMember]) -> Election {
        Election::Native
    }

    /// Proxy pods when the spec has `fakeProxy: {instances, image}`.
    fn proxy(&self, cluster: &ValidatedCluster) -> Option<crate::engine::ProxyPods> {
        let p = cluster.spec.get("fakeProxy")?;
        Some(crate::engine::ProxyPods {
            instances: p.get("instances")?.as_i64()? as i32,
            image: p.get("image").and_then(|i| i.as_str()).map(String::from),
        })
    }

    /// A TLS Secret when the spec has `fakeTls: {name, generate}`.
    fn tls_secret(&self, cluster: &ValidatedCluster) -> Option<crate::engine::TlsSecret> {
        let t = cluster.spec.get("fakeTls")?;
        Some(crate::engine::TlsSecret {
            name: t.get("name")?.as_str()?.to_string(),
            generate: t.get("generate")?.as_bool()?,
        })
    }

    fn route(&self, members: &[ObservedMember]) -> Routing {
        Routing {
            rw: members
                .iter()
                .find(|m| m.role() == crate::instance::protocol::Role::Primary)
                .map(|m| m.name.clone()),
            ro: members
                .iter()
                .filter(|m| m.role() == crate::instance::protocol::Role::Replica)
                .map(|m| m.name.clone())
                .collect(),
        }
    }
}

pub(crate) const SIMPLE_PG: &str = r#"
apiVersion: stratum.dev/v1alpha1
kind: FakeCluster
metadata:
  name: simple-pg
  namespace: team-a
  uid: 6d1f0c52-1b0e-4c39-9d0e-3c0b7e5c2a11
  generation: 2
spec:
  instances: 3
  storage:
    size: 1Gi
    storageClass: fast-ssd
    pvcTemplate:
      accessModes: [ReadWriteOncePod]
      volumeMode: Filesystem
  podManagementPolicy: Parallel
  imagePullPolicy: IfNotPresent
  imagePullSecrets: [{name: registry-creds}]
  resources:
    requests: {cpu: 500m, memory: 1Gi}
  affinity:
    podAntiAffinityType: required
    topologyKey: topology.kubernetes.io/zone
    nodeSelector: {disktype: ssd}
    tolerations:
      - {key: dedicated, operator: Equal, value: databases, effect: NoSchedule}
  topologySpreadConstraints:
    - maxSkew: 1
      topologyKey: topology.kubernetes.io/zone
      whenUnsatisfiable: DoNotSchedule
    - maxSkew: 2
      topologyKey: kubernetes.io/hostname
      whenUnsatisfiable: ScheduleAnyway
      labelSelector: {matchLabels: {custom: chosen}}
  inheritedMetadata:
    labels: {team: data, stratum.dev/cluster: hijacked}
    annotations: {owner: alice}
"#;

const MINIMAL_PG: &str = r#"
apiVersion: stratum.dev/v1alpha1
kind: FakeCluster
metadata:
  name: tiny-pg
  uid: 11111111-2222-3333-4444-555555555555
spec:
  instances: 1
  storage: {size: 5Gi}
"#;

fn validated(yaml: &str) -> ValidatedCluster {
    let object: serde_json::Value = serde_yaml::from_str(yaml).unwrap();
    FakeEngine.validate(&object).unwrap()
}

fn ctx() -> BuildContext {
    BuildContext::new("example.invalid/stratum-operator:test")
}

fn objects(yaml: &str) -> ClusterObjects {
    build(&validated(yaml), &FakeEngine, &ctx()).unwrap()
}

fn pod_spec(o: &ClusterObjects) -> &PodSpec {
    o.stateful_set
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
}

fn db_container(o: &ClusterObjects) -> &Container {
    &pod_spec(o).containers[0]
}

fn service<'a>(o: &'a ClusterObjects, name: &str) -> &'a Service {
    o.services
        .iter()
        .find(|s| s.metadata.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("no Service {name}"))
}

#[test]
fn pvc_retention_follows_the_spec() {
    let yaml = SIMPLE_PG.replace(
        "  instances: 3\n",
        "  instances: 3\n  pvcRetentionPolicy:\n    whenScaled: Delete\n",
    );
    let o = objects(&yaml);
    let retention = o
        .stateful_set
        .spec
        .as_ref()
        .unwrap()
        .persistent_volume_claim_retention_policy
        .clone()
        .unwrap();
    assert_eq!(retention.when_scaled.as_deref(), Some("Delete"));
    // Unset: still kept.
    assert_eq!(retention.when_deleted.as_deref(), Some("Retain"));
}

#[test]
fn statefulset_identity_claims_and_policies() {
    let o = objects(SIMPLE_PG);
    let sts = &o.stateful_set;
    assert_eq!(sts.metadata.name.as_deref(), Some("simple-pg"));
    assert_eq!(sts.metadata.namespace.as_deref(), Some("team-a"));
    let spec = sts.spec.as_ref().unwrap();
    // Ordinal pod names resolve through the headless Service.
    assert_eq!(spec.service_name.as_deref(), Some("simple-pg-headless"));
    assert_eq!(spec.replicas, Some(3));
    assert_eq!(spec.pod_management_policy.as_deref(), Some("Parallel"));
    // SmartUpdate (the default) is OnDelete underneath.
    assert_eq!(
        spec.update_strategy.as_ref().unwrap().type_.as_deref(),
        Some("OnDelete")
    );
    let retention = spec
        .persistent_volume_claim_retention_policy
        .as_ref()
        .unwrap();
    assert_eq!(retention.when_deleted.as_deref(), Some("Retain"));
    assert_eq!(retention.when_scaled.as_deref(), Some("Retain"));

    let selector = spec.selector.match_labels.as_ref().unwrap();
    assert_eq!(selector.get(LABEL_CLUSTER).unwrap(), "simple-pg");
    assert_eq!(selector.get(LABEL_KIND).unwrap(), "FakeCluster");

    let claims = spec.volume_claim_templates.as_ref().unwrap();
    let claim_names: Vec<_> = claims
        .iter()
        .map(|c| c.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(claim_names, ["data", "wal"]);
    let data = claims[0].spec.as_ref().unwrap();
    // pvcTemplate overrides the derived access mode and adds volumeMode;
    // size and class still come from the storage block.
    assert_eq!(
        data.access_modes.as_deref(),
        Some(&["ReadWriteOncePod".to_string()][..])
    );
    assert_eq!(data.volume_mode.as_deref(), Some("Filesystem"));
    assert_eq!(data.storage_class_name.as_deref(), Some("fast-ssd"));
    assert_eq!(
        data.resources.as_ref().unwrap().requests.as_ref().unwrap()["storage"].0,
        "1Gi"
    );
    let wal = claims[1].spec.as_ref().unwrap();
    assert_eq!(
        wal.resources.as_ref().unwrap().requests.as_ref().unwrap()["storage"].0,
        "2Gi"
    );
    assert_eq!(
        wal.access_modes.as_deref(),
        Some(&["ReadWriteOnce".to_string()][..])
    );
    // Claim templates never carry inherited labels (they are immutable).
    assert!(
        !claims[0]
            .metadata
            .labels
            .as_ref()
            .unwrap()
            .contains_key("team")
    );
}

#[test]
fn update_strategy_mapping() {
    for (strategy, expected) in [
        ("SmartUpdate", "OnDelete"),
        ("OnDelete", "OnDelete"),
        ("RollingUpdate", "RollingUpdate"),
    ] {
        let yaml = format!("{MINIMAL_PG}  updateStrategy: {strategy}\n");
        let o = objects(&yaml);
        let spec = o.stateful_set.spec.unwrap();
        assert_eq!(
            spec.update_strategy.unwrap().type_.as_deref(),
            Some(expected),
            "{strategy}"
        );
        assert_eq!(spec.pod_management_policy.as_deref(), Some("OrderedReady"));
    }
}

#[test]
fn pod_template_containers_volumes_and_security() {
    let o = objects(SIMPLE_PG);
    let pod = pod_spec(&o);
    assert_eq!(pod.termination_grace_period_seconds, Some(60));

    let init = &pod.init_containers.as_ref().unwrap()[0];
    assert_eq!(init.name, "bootstrap-controller");
    assert_eq!(
        init.image.as_deref(),
        Some("example.invalid/stratum-operator:test")
    );
    assert_eq!(
        init.command.as_ref().unwrap(),
        &[
            "/usr/local/bin/stratum",
            "install-binary",
            "/stratum/bin/stratum"
        ]
    );

    let db = db_container(&o);
    assert_eq!(db.name, "fake");
    assert_eq!(db.image.as_deref(), Some("example.invalid/fakedb:1"));
    assert_eq!(db.image_pull_policy.as_deref(), Some("IfNotPresent"));
    assert_eq!(
        db.command.as_ref().unwrap(),
        &[
            "/stratum/bin/stratum",
            "instance",
            "--config",
            "/etc/stratum/config/instance.json"
        ]
    );
    let env: BTreeMap<_, _> = db
        .env
        .as_ref()
        .unwrap()
        .iter()
        .map(|e| (e.name.as_str(), e))
        .collect();
    assert_eq!(
        env["STRATUM_INSTANCE"]
            .value_from
            .as_ref()
            .unwrap()
            .field_ref
            .as_ref()
            .unwrap()
            .field_path,
        "metadata.name"
    );
    assert!(env.contains_key("POD_IP"));
    assert!(env.contains_key("POD_NAME"));
    assert_eq!(env["FAKE_MODE"].value.as_deref(), Some("test"));

    let ports: Vec<_> = db
        .ports
        .as_ref()
        .unwrap()
        .iter()
        .map(|p| (p.name.clone().unwrap(), p.container_port))
        .collect();
    assert_eq!(
        ports,
        [
            ("fakedb".to_string(), 7000),
            ("fakerepl".to_string(), 7001),
            ("api".to_string(), 8000)
        ]
    );

    let mounts: BTreeMap<_, _> = db
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .map(|m| (m.mount_path.as_str(), m.name.as_str()))
        .collect();
    assert_eq!(mounts["/var/lib/fake"], "data");
    assert_eq!(mounts["/var/lib/fake-wal"], "wal");
    assert!(mounts.contains_key("/etc/stratum/config"));
    assert!(mounts.contains_key("/etc/stratum/secrets"));
    assert!(mounts.contains_key("/var/run/stratum"));
    assert!(mounts.contains_key("/stratum/bin"));

    let secret_volume = pod
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find_map(|v| v.secret.as_ref())
        .unwrap();
    assert_eq!(
        secret_volume.secret_name.as_deref(),
        Some("simple-pg-credentials")
    );
    assert_eq!(secret_volume.default_mode, Some(0o440));

    let live = db
        .liveness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(live.path.as_deref(), Some("/healthz"));
    assert_eq!(live.port, IntOrString::String("api".into()));
    let ready = db
        .readiness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(ready.path.as_deref(), Some("/readyz"));
    assert!(
        db.startup_probe
            .as_ref()
            .unwrap()
            .failure_threshold
            .unwrap()
            >= 60
    );

    let psc = pod.security_context.as_ref().unwrap();
    assert_eq!(psc.run_as_user, Some(1001));
    assert_eq!(psc.run_as_group, Some(1001));
    assert_eq!(psc.fs_group, Some(1001));
    assert_eq!(psc.run_as_non_root, Some(true));
    assert_eq!(
        psc.seccomp_profile.as_ref().unwrap().type_,
        "RuntimeDefault"
    );
    for c in [db, init] {
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(
            sc.capabilities.as_ref().unwrap().drop.as_deref(),
            Some(&["ALL".to_string()][..])
        );
    }
    assert_eq!(
        db.resources.as_ref().unwrap().requests.as_ref().unwrap()["cpu"].0,
        "500m"
    );
    assert_eq!(
        pod.image_pull_secrets.as_ref().unwrap()[0].name,
        "registry-creds"
    );
}

#[test]
fn scheduling_pass_through_and_anti_affinity() {
    let o = objects(SIMPLE_PG);
    let pod = pod_spec(&o);
    assert_eq!(pod.node_selector.as_ref().unwrap()["disktype"], "ssd");
    let tol = &pod.tolerations.as_ref().unwrap()[0];
    assert_eq!(tol.key.as_deref(), Some("dedicated"));
    assert_eq!(tol.effect.as_deref(), Some("NoSchedule"));

    let anti = pod
        .affinity
        .as_ref()
        .unwrap()
        .pod_anti_affinity
        .as_ref()
        .unwrap();
    let required = anti
        .required_during_scheduling_ignored_during_execution
        .as_ref()
        .unwrap();
    assert!(
        anti.preferred_during_scheduling_ignored_during_execution
            .is_none()
    );
    assert_eq!(required[0].topology_key, "topology.kubernetes.io/zone");
    assert_eq!(
        required[0]
            .label_selector
            .as_ref()
            .unwrap()
            .match_labels
            .as_ref()
            .unwrap()[LABEL_CLUSTER],
        "simple-pg"
    );

    // Defaults: preferred, weight 100, per host.
    let o = objects(MINIMAL_PG);
    let anti = pod_spec(&o)
        .affinity
        .as_ref()
        .unwrap()
        .pod_anti_affinity
        .clone()
        .unwrap();
    assert!(
        anti.required_during_scheduling_ignored_during_execution
            .is_none()
    );
    let preferred = &anti
        .preferred_during_scheduling_ignored_during_execution
        .unwrap()[0];
    assert_eq!(preferred.weight, 100);
    assert_eq!(
        preferred.pod_affinity_term.topology_key,
        "kubernetes.io/hostname"
    );

    // Disabled: no affinity at all.
    let yaml = format!("{MINIMAL_PG}  affinity: {{enablePodAntiAffinity: false}}\n");
    assert!(pod_spec(&objects(&yaml)).affinity.is_none());
}

#[test]
fn topology_spread_gets_the_cluster_selector_when_absent() {
    let o = objects(SIMPLE_PG);
    let tsc = pod_spec(&o).topology_spread_constraints.as_ref().unwrap();
    assert_eq!(tsc.len(), 2);
    let filled = tsc[0]
        .label_selector
        .as_ref()
        .unwrap()
        .match_labels
        .as_ref()
        .unwrap();
    assert_eq!(filled[LABEL_CLUSTER], "simple-pg");
    assert_eq!(filled[LABEL_KIND], "FakeCluster");
    let kept = tsc[1]
        .label_selector
        .as_ref()
        .unwrap()
        .match_labels
        .as_ref()
        .unwrap();
    assert_eq!(kept, &BTreeMap::from([("custom".into(), "chosen".into())]));
}

#[test]
fn services_select_by_route() {
    let o = objects(SIMPLE_PG);
    let names: Vec<_> = o
        .services
        .iter()
        .map(|s| s.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "simple-pg-headless",
            "simple-pg-rw",
            "simple-pg-ro",
            "simple-pg-r"
        ]
    );
    let headless = service(&o, "simple-pg-headless").spec.as_ref().unwrap();
    assert_eq!(headless.cluster_ip.as_deref(), Some("None"));
    assert_eq!(headless.publish_not_ready_addresses, Some(true));
    assert_eq!(headless.ports.as_ref().unwrap().len(), 3);

    let selector = |name: &str| {
        service(&o, name)
            .spec
            .as_ref()
            .unwrap()
            .selector
            .clone()
            .unwrap()
    };
    assert_eq!(selector("simple-pg-rw")[LABEL_ROUTE], "rw");
    assert_eq!(selector("simple-pg-ro")[LABEL_ROUTE], "ro");
    assert!(!selector("simple-pg-r").contains_key(LABEL_ROUTE));
    assert_eq!(selector("simple-pg-r")[LABEL_CLUSTER], "simple-pg");
    for name in ["simple-pg-rw", "simple-pg-ro", "simple-pg-r"] {
        let ports = service(&o, name).spec.clone().unwrap().ports.unwrap();
        assert_eq!(ports.len(), 1, "{name}: client ports only");
        assert_eq!(ports[0].port, 7000);
    }
}

#[test]
fn pdb_and_network_policy() {
    let o = objects(SIMPLE_PG);
    let pdb = o.pod_disruption_budget.spec.as_ref().unwrap();
    assert_eq!(pdb.max_unavailable, Some(IntOrString::Int(1)));
    assert_eq!(
        pdb.selector
            .as_ref()
            .unwrap()
            .match_labels
            .as_ref()
            .unwrap()[LABEL_CLUSTER],
        "simple-pg"
    );
    // Single instance: still built (see policy::pod_disruption_budget).
    assert!(objects(MINIMAL_PG).pod_disruption_budget.spec.is_some());

    assert!(o.network_policy.is_none());
    let mut c = ctx();
    c.network_policy = true;
    let o = build(&validated(SIMPLE_PG), &FakeEngine, &c).unwrap();
    let np = o.network_policy.as_ref().unwrap().spec.as_ref().unwrap();
    let rules = np.ingress.as_ref().unwrap();
    let ports = |i: usize| -> Vec<IntOrString> {
        rules[i]
            .ports
            .iter()
            .flatten()
            .filter_map(|p| p.port.clone())
            .collect()
    };
    assert_eq!(ports(0), [IntOrString::Int(7000)]);
    assert_eq!(ports(1), [IntOrString::Int(7001), IntOrString::Int(8000)]);
    let peers = rules[1].from.as_ref().unwrap();
    assert_eq!(
        peers[0]
            .pod_selector
            .as_ref()
            .unwrap()
            .match_labels
            .as_ref()
            .unwrap()[LABEL_CLUSTER],
        "simple-pg"
    );
    assert_eq!(
        peers[1]
            .pod_selector
            .as_ref()
            .unwrap()
            .match_labels
            .as_ref()
            .unwrap()["app.kubernetes.io/name"],
        "stratum"
    );
    assert!(
        o.desired_children()
            .contains(&(ChildKind::NetworkPolicy, "simple-pg".into()))
    );

    let on = BTreeMap::from([(ANNOTATION_NETWORK_POLICY.to_string(), "true".to_string())]);
    assert!(network_policy_enabled(&on));
    assert!(!network_policy_enabled(&BTreeMap::new()));
}

#[test]
fn labels_and_owner_references_on_everything() {
    let o = objects(SIMPLE_PG);
    let mut metas = vec![
        &o.stateful_set.metadata,
        &o.config_map.metadata,
        &o.pod_disruption_budget.metadata,
        &o.secret_if_absent.metadata,
    ];
    metas.extend(o.services.iter().map(|s| &s.metadata));
    for m in metas {
        let labels = m.labels.as_ref().unwrap();
        assert_eq!(labels["app.kubernetes.io/name"], "fake");
        assert_eq!(labels["app.kubernetes.io/instance"], "simple-pg");
        assert_eq!(labels["app.kubernetes.io/managed-by"], "stratum");
        assert_eq!(labels["app.kubernetes.io/part-of"], "stratum");
        // Inherited labels are added but never replace ours.
        assert_eq!(labels[LABEL_CLUSTER], "simple-pg");
        assert_eq!(labels[LABEL_KIND], "FakeCluster");
        assert_eq!(labels["team"], "data");
        assert_eq!(m.annotations.as_ref().unwrap()["owner"], "alice");
        let owners = m.owner_references.as_ref().unwrap();
        assert_eq!(owners.len(), 1);
        assert_eq!(owners[0].api_version, "stratum.dev/v1alpha1");
        assert_eq!(owners[0].kind, "FakeCluster");
        assert_eq!(owners[0].name, "simple-pg");
        assert_eq!(owners[0].uid, "6d1f0c52-1b0e-4c39-9d0e-3c0b7e5c2a11");
        assert_eq!(owners[0].controller, Some(true));
        assert_eq!(owners[0].block_owner_deletion, Some(true));
    }
    let template_labels = o
        .stateful_set
        .spec
        .as_ref()
        .unwrap()
        .template
        .metadata
        .as_ref()
        .unwrap()
        .labels
        .clone()
        .unwrap();
    assert_eq!(template_labels["team"], "data");
    assert_eq!(template_labels[LABEL_CLUSTER], "simple-pg");
}

#[test]
fn missing_uid_is_an_error() {
    let yaml = MINIMAL_PG.replace("  uid: 11111111-2222-3333-4444-555555555555\n", "");
    let err = build(&validated(&yaml), &FakeEngine, &ctx()).unwrap_err();
    assert!(matches!(err, BuildError::MissingUid { .. }), "{err}");
}

#[test]
fn secret_is_random_and_never_overwritten() {
    let a = objects(SIMPLE_PG).secret_if_absent;
    let b = objects(SIMPLE_PG).secret_if_absent;
    assert_eq!(a.metadata.name.as_deref(), Some("simple-pg-credentials"));
    let keys: Vec<_> = a.data.as_ref().unwrap().keys().cloned().collect();
    assert_eq!(
        keys,
        ["api-token", "replication-password", "superuser-password"]
    );
    for (k, v) in a.data.as_ref().unwrap() {
        let s = std::str::from_utf8(&v.0).unwrap();
        assert_eq!(s.len(), 32, "{k}");
        assert!(
            s.bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'),
            "{k}: {s}"
        );
        // Two builds differ: applying the desired Secret would rotate every
        // password, so the apply step must only create it.
        assert_ne!(v, &b.data.as_ref().unwrap()[k], "{k}");
    }

    assert_eq!(secret_action(None, &a), SecretAction::Create);
    assert_eq!(secret_action(Some(&b), &a), SecretAction::Keep);

    let mut partial = b.clone();
    partial
        .data
        .as_mut()
        .unwrap()
        .remove("replication-password");
    match secret_action(Some(&partial), &a) {
        SecretAction::AddMissing(keys) => {
            assert_eq!(
                keys.keys().collect::<Vec<_>>(),
                ["replication-password"],
                "only the missing key, never existing ones"
            );
        }
        other => panic!("expected AddMissing, got {other:?}"),
    }
}

#[test]
fn a_generated_tls_secret_is_created_once_and_mounted() {
    let yaml = format!("{SIMPLE_PG}  fakeTls: {{name: simple-pg-ssl-internal, generate: true}}\n");
    let o = objects(&yaml);
    let secret = o.tls_secret_if_absent.clone().expect("a generated Secret");
    assert_eq!(
        secret.metadata.name.as_deref(),
        Some("simple-pg-ssl-internal")
    );
    assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
    assert_eq!(
        secret.metadata.labels.as_ref().unwrap()[LABEL_CLUSTER],
        "simple-pg"
    );
    assert!(crate::tls::missing_keys(&secret).is_empty());
    let again = objects(&yaml).tls_secret_if_absent.unwrap();
    // A new CA on every build: only creating it is safe.
    assert_ne!(secret.data, again.data);
    assert_eq!(tls_secret_action(None), SecretAction::Create);
    assert_eq!(tls_secret_action(Some(&again)), SecretAction::Keep);
    // An incomplete existing Secret is not completed with a key of
    // another CA either.
    let mut partial = again.clone();
    partial.data.as_mut().unwrap().remove("ca.crt");
    assert_eq!(tls_secret_action(Some(&partial)), SecretAction::Keep);

    let pod = pod_spec(&o);
    let volume = pod
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.name == "tls")
        .expect("tls volume");
    let source = volume.secret.as_ref().unwrap();
    assert_eq!(
        source.secret_name.as_deref(),
        Some("simple-pg-ssl-internal")
    );
    assert_eq!(source.default_mode, Some(SECRET_DEFAULT_MODE));
    assert!(source.items.is_none(), "every key mounted, none required");
    let mount = pod.containers[0]
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .find(|m| m.name == "tls")
        .expect("tls mount");
    assert_eq!(mount.mount_path, TLS_DIR);
    assert_eq!(mount.read_only, Some(true));
    let config: InstanceConfig =
        serde_json::from_str(&o.config_map.data.as_ref().unwrap()["instance.json"]).unwrap();
    assert_eq!(
        config.tls_dir.as_deref(),
        Some(std::path::Path::new(TLS_DIR))
    );
}

#[test]
fn a_users_tls_secret_is_mounted_as_given_and_never_built() {
    let yaml = format!("{SIMPLE_PG}  fakeTls: {{name: my-certs, generate: false}}\n");
    let o = objects(&yaml);
    assert!(o.tls_secret_if_absent.is_none());
    let pod = pod_spec(&o);
    let volume = pod
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.name == "tls")
        .unwrap();
    assert_eq!(
        volume.secret.as_ref().unwrap().secret_name.as_deref(),
        Some("my-certs")
    );

    // Without TLS: no volume, no mount, no tlsDir.
    let o = objects(SIMPLE_PG);
    assert!(o.tls_secret_if_absent.is_none());
    let pod = pod_spec(&o);
    assert!(
        !pod.volumes
            .as_ref()
            .unwrap()
            .iter()
            .any(|v| v.name == "tls")
    );
    assert!(
        !pod.containers[0]
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .any(|m| m.name == "tls")
    );
    let config: InstanceConfig =
        serde_json::from_str(&o.config_map.data.as_ref().unwrap()["instance.json"]).unwrap();
    assert_eq!(config.tls_dir, None);
}

#[test]
fn config_map_parses_back_to_instance_config() {
    let o = objects(SIMPLE_PG);
    assert_eq!(
        o.config_map.metadata.name.as_deref(),
        Some("simple-pg-config")
    );
    let json = &o.config_map.data.as_ref().unwrap()["instance.json"];
    let config: InstanceConfig = serde_json::from_str(json).unwrap();
    assert_eq!(config.kind, "FakeCluster");
    assert_eq!(config.cluster, "simple-pg");
    assert_eq!(config.namespace, "team-a");
    assert_eq!(config.cluster_id, "6d1f0c52-1b0e-4c39-9d0e-3c0b7e5c2a11");
    assert_eq!(config.instance, "");
    assert_eq!(config.listen_address, "0.0.0.0");
    assert_eq!(config.data_dir.to_str(), Some("/var/lib/fake"));
    // Extra volumes are named in the config, at their mount paths.
    let volumes: Vec<(&str, &str)> = config
        .volumes
        .iter()
        .map(|(k, v)| (k.as_str(), v.to_str().unwrap()))
        .collect();
    assert_eq!(volumes, [("wal", "/var/lib/fake-wal")]);
    assert_eq!(config.run_dir.to_str(), Some("/var/run/stratum"));
    assert_eq!(config.secrets_dir.to_str(), Some("/etc/stratum/secrets"));
    assert_eq!(
        config.token_file.to_str(),
        Some("/etc/stratum/secrets/api-token")
    );
    assert_eq!(config.run_as_user, None);
    assert_eq!(
        config.bin_dir.as_deref().and_then(|p| p.to_str()),
        Some("/opt/fake/bin")
    );
    assert_eq!(config.engine, json!({"fake": true, "instances": 3}));
    let members: Vec<_> = config
        .members
        .iter()
        .map(|m| (m.name.as_str(), m.host.as_str(), m.db_port, m.api_port))
        .collect();
    assert_eq!(
        members,
        [
            (
                "simple-pg-0",
                "simple-pg-0.simple-pg-headless.team-a.svc",
                7000,
                8000
            ),
            (
                "simple-pg-1",
                "simple-pg-1.simple-pg-headless.team-a.svc",
                7000,
                8000
            ),
            (
                "simple-pg-2",
                "simple-pg-2.simple-pg-headless.team-a.svc",
                7000,
                8000
            ),
        ]
    );
}

#[test]
fn known_kinds_have_fixed_short_names() {
    assert_eq!(container_name("PostgresCluster"), "postgres");
    assert_eq!(container_name("PxcCluster"), "pxc");
    assert_eq!(container_name("MongoCluster"), "mongod");
    assert_eq!(app_name("PostgresCluster"), "postgres");
    assert_eq!(app_name("PxcCluster"), "pxc");
    assert_eq!(app_name("MongoCluster"), "mongodb");
    assert_eq!(app_name("FakeCluster"), "fake");
}

#[test]
fn desired_children_lists_applied_objects() {
    let o = objects(MINIMAL_PG);
    let mut children = o.desired_children();
    children.sort();
    assert_eq!(
        children,
        [
            (ChildKind::StatefulSet, "tiny-pg".to_string()),
            (ChildKind::Service, "tiny-pg-headless".to_string()),
            (ChildKind::Service, "tiny-pg-r".to_string()),
            (ChildKind::Service, "tiny-pg-ro".to_string()),
            (ChildKind::Service, "tiny-pg-rw".to_string()),
            (ChildKind::ConfigMap, "tiny-pg-config".to_string()),
            (ChildKind::PodDisruptionBudget, "tiny-pg".to_string()),
        ]
    );
}

const PROXIED: &str =
    "  instances: 3\n  fakeProxy: {instances: 2, image: example.invalid/haproxy:9}\n";

#[test]
fn proxy_pods_get_a_configmap_a_deployment_and_the_rw_ro_services() {
    let o = objects(&SIMPLE_PG.replace("  instances: 3\n", PROXIED));
    let (cm, deployment) = o.proxy.as_ref().expect("proxy objects");
    assert_eq!(cm.metadata.name.as_deref(), Some("simple-pg-haproxy"));
    let cfg = &cm.data.as_ref().unwrap()[PROXY_CONFIG_KEY];
    assert!(cfg.contains("server simple-pg-2 simple-pg-2.simple-pg-headless.team-a.svc.cluster.local:7000 check port 8000 backup"), "{cfg}");
    assert_eq!(
        deployment.metadata.name.as_deref(),
        Some("simple-pg-haproxy")
    );
    let owner = &deployment.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(owner.uid, "6d1f0c52-1b0e-4c39-9d0e-3c0b7e5c2a11");
    assert_eq!(owner.controller, Some(true));
    // The object carries the kind label (watched, pruned); the pods do not
    // (never taken for members).
    let labels = deployment.metadata.labels.as_ref().unwrap();
    assert_eq!(labels[LABEL_KIND], "FakeCluster");
    let spec = deployment.spec.as_ref().unwrap();
    assert_eq!(spec.replicas, Some(2));
    let selector = proxy_selector("simple-pg");
    assert_eq!(spec.selector.match_labels.as_ref(), Some(&selector));
    let meta = spec.template.metadata.as_ref().unwrap();
    let pod_labels = meta.labels.as_ref().unwrap();
    assert!(!pod_labels.contains_key(LABEL_KIND), "{pod_labels:?}");
    assert!(selector.iter().all(|(k, v)| pod_labels.get(k) == Some(v)));
    let hash = &meta.annotations.as_ref().unwrap()[ANNOTATION_CONFIG_HASH];
    assert_eq!(hash.len(), 64);
    let pod = spec.template.spec.as_ref().unwrap();
    let c = &pod.containers[0];
    assert_eq!(c.image.as_deref(), Some("example.invalid/haproxy:9"));
    let ports: Vec<_> = c
        .ports
        .iter()
        .flatten()
        .map(|p| (p.name.as_deref().unwrap(), p.container_port))
        .collect();
    assert_eq!(ports, [(RW_PORT_NAME, 7000), (RO_PORT_NAME, 7001)]);
    let probe = c
        .readiness_probe
        .as_ref()
        .unwrap()
        .tcp_socket
        .as_ref()
        .unwrap();
    assert_eq!(probe.port, IntOrString::String(RW_PORT_NAME.into()));
    let mount = &c.volume_mounts.as_ref().unwrap()[0];
    assert_eq!(mount.mount_path, PROXY_CONFIG_DIR);
    let volume = &pod.volumes.as_ref().unwrap()[0];
    assert_eq!(
        volume.config_map.as_ref().unwrap().name,
        "simple-pg-haproxy"
    );
    // Spread like the database pods, counting the proxy pods.
    let anti = pod
        .affinity
        .as_ref()
        .unwrap()
        .pod_anti_affinity
        .as_ref()
        .unwrap();
    let term = &anti
        .required_during_scheduling_ignored_during_execution
        .as_ref()
        .unwrap()[0];
    assert_eq!(
        term.label_selector.as_ref().unwrap().match_labels.as_ref(),
        Some(&selector)
    );
    assert_eq!(term.topology_key, "topology.kubernetes.io/zone");
    let spread = pod.topology_spread_constraints.as_ref().unwrap();
    assert_eq!(
        spread[0]
            .label_selector
            .as_ref()
            .unwrap()
            .match_labels
            .as_ref(),
        Some(&selector)
    );
    assert_eq!(pod.node_selector.as_ref().unwrap()["disktype"], "ssd");

    for (name, target) in [
        ("simple-pg-rw", RW_PORT_NAME),
        ("simple-pg-ro", RO_PORT_NAME),
    ] {
        let svc = service(&o, name).spec.as_ref().unwrap();
        assert_eq!(svc.selector.as_ref(), Some(&selector), "{name}");
        let ports = svc.ports.as_ref().unwrap();
        assert_eq!(ports.len(), 1);
        assert_eq!(ports[0].port, 7000);
        assert_eq!(
            ports[0].target_port,
            Some(IntOrString::String(target.into()))
        );
    }
    // `-r` still reaches the members directly.
    let r = service(&o, "simple-pg-r").spec.as_ref().unwrap();
    assert_eq!(r.selector.as_ref().unwrap()[LABEL_KIND], "FakeCluster");

    let desired = o.desired_children();
    assert!(desired.contains(&(ChildKind::Deployment, "simple-pg-haproxy".into())));
    assert!(desired.contains(&(ChildKind::ConfigMap, "simple-pg-haproxy".into())));
}

#[test]
fn proxy_config_change_changes_the_pod_template_hash() {
    let hash = |yaml: &str| {
        let o = objects(yaml);
        let (_, d) = o.proxy.unwrap();
        d.spec
            .unwrap()
            .template
            .metadata
            .unwrap()
            .annotations
            .unwrap()[ANNOTATION_CONFIG_HASH]
            .clone()
    };
    let three = hash(&SIMPLE_PG.replace("  instances: 3\n", PROXIED));
    let five = hash(&SIMPLE_PG.replace(
        "  instances: 3\n",
        &PROXIED.replace("instances: 3", "instances: 5"),
    ));
    assert_ne!(three, five);
    assert_eq!(three, hash(&SIMPLE_PG.replace("  instances: 3\n", PROXIED)));
}

#[test]
fn without_proxy_the_services_select_members_by_route() {
    let o = objects(SIMPLE_PG);
    assert!(o.proxy.is_none());
    let rw = service(&o, "simple-pg-rw").spec.as_ref().unwrap();
    assert_eq!(rw.selector.as_ref().unwrap()[LABEL_ROUTE], ROUTE_RW);
    assert!(
        !o.desired_children()
            .iter()
            .any(|(k, _)| *k == ChildKind::Deployment)
    );
    // The NetworkPolicy lets the HAProxy pods check the instance API only
    // when they exist.
    let np = |o: &ClusterObjects| {
        let spec = o.network_policy.clone().unwrap().spec.unwrap();
        spec.ingress
            .unwrap()
            .iter()
            .flat_map(|r| r.from.clone().unwrap_or_default())
            .any(|peer| {
                peer.pod_selector.and_then(|s| s.match_labels) == Some(proxy_selector("simple-pg"))
            })
    };
    let with_np = |yaml: &str| {
        build(
            &validated(yaml),
            &FakeEngine,
            &BuildContext {
                network_policy: true,
                ..ctx()
            },
        )
        .unwrap()
    };
    assert!(!np(&with_np(SIMPLE_PG)));
    assert!(np(&with_np(
        &SIMPLE_PG.replace("  instances: 3\n", PROXIED)
    )));
    // Zero proxy instances: no proxy either.
    let zero = objects(&SIMPLE_PG.replace(
        "  instances: 3\n",
        "  instances: 3\n  fakeProxy: {instances: 0}\n",
    ));
    assert!(zero.proxy.is_none());
}
