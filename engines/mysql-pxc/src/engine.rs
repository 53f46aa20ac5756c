//! [`PxcEngine`]: the operator side of the Galera engine (validation,
//! topology, pod pieces, instance settings, election, routing). Pure, no
//! IO; the instance side is [`crate::instance::PxcDriver`].

use std::collections::BTreeMap;
use std::sync::LazyLock;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use operator_core::api::common::PodManagementPolicy;
use operator_core::engine::{
    Election, Engine, EngineManifest, EnginePort, InstanceDriver, ObservedMember, ProxyPods,
    ReplicationModel, Routing, TlsSecret, Topology, ValidatedCluster,
};
use operator_core::error::SpecError;
use operator_core::validate::typed_cluster;

use crate::api::{ProxyType, PxcCluster, PxcClusterSpec};
use crate::settings::{PxcInstanceSettings, TlsSettings, secret_keys, sst_password_key};
use crate::{galera, mycnf};

/// The cluster kind.
pub const KIND: &str = "PxcCluster";

/// MySQL client port.
pub const PORT_MYSQL: u16 = 3306;
/// State Snapshot Transfer.
pub const PORT_SST: u16 = 4444;
/// Galera group communication (replication).
pub const PORT_GALERA: u16 = 4567;
/// Incremental State Transfer.
pub const PORT_IST: u16 = 4568;
/// Where the data volume is mounted (the images' data directory).
pub const DATA_MOUNT_PATH: &str = "/var/lib/mysql";

static CRD: LazyLock<CustomResourceDefinition> = LazyLock::new(PxcCluster::crd);

/// The Percona XtraDB Cluster / MariaDB Galera engine. Stateless: build it
/// with `Arc::new(PxcEngine)`.
#[derive(Clone, Copy, Debug, Default)]
pub struct PxcEngine;

impl PxcEngine {
    /// The typed spec of a cluster this engine validated.
    fn spec(cluster: &ValidatedCluster) -> Result<PxcClusterSpec, SpecError> {
        cluster.engine_spec()
    }
}

/// Check a PxcCluster spec beyond its CRD schema and CEL rules.
fn check_spec(name: &str, spec: &PxcClusterSpec) -> Result<(), SpecError> {
    let sst = spec.effective_sst_method();
    if !spec.flavor.supported_sst_methods().contains(&sst) {
        let supported: Vec<&str> = spec
            .flavor
            .supported_sst_methods()
            .iter()
            .map(|m| m.as_str())
            .collect();
        return Err(SpecError::new(
            "spec.sstMethod",
            format!(
                "{} is not available with flavor {}; use {}",
                sst.as_str(),
                spec.flavor.as_str(),
                supported.join(" or ")
            ),
        ));
    }
    if let Some(v) = &spec.version {
        let ok = !v.is_empty()
            && v.split('.').count() <= 3
            && v.split('.')
                .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
        if !ok {
            return Err(SpecError::new(
                "spec.version",
                format!("{v:?} must be a version such as \"8.0\" or \"10.11\""),
            ));
        }
    }
    if let Some(text) = &spec.configuration {
        mycnf::parse(text)
            .and_then(|file| {
                mycnf::check_user_options(&file)?;
                if spec.tls.encrypt_cluster_traffic {
                    mycnf::check_tls_options(&file)?;
                }
                Ok(())
            })
            .map_err(|e| SpecError::new("spec.configuration", e.to_string()))?;
    }
    if spec.proxy.type_ == ProxyType::Haproxy && spec.proxy.instances < 1 {
        return Err(SpecError::new(
            "spec.proxy.instances",
            format!(
                "must be at least 1 with proxy type haproxy; got {} (set spec.proxy.type: none to run without a proxy)",
                spec.proxy.instances
            ),
        ));
    }
    if let Some(forced) = spec.force_bootstrap_from() {
        let exists = (0..spec.common.instances.max(0))
            .any(|i| operator_core::engine::instance_name(name, i as u32) == forced);
        if !exists {
            return Err(SpecError::new(
                "spec.bootstrap.forceBootstrapFrom",
                format!(
                    "{forced:?} is not an instance of this cluster; use one of {name}-0 … {name}-{}",
                    spec.common.instances - 1
                ),
            ));
        }
    }
    Ok(())
}

impl Engine for PxcEngine {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn crd(&self) -> CustomResourceDefinition {
        CRD.clone()
    }

    /// `Parallel`: after a full crash every member must run so that the most advanced one can be
    /// found and bootstrapped; `OrderedReady` would start only ordinal 0.
    fn default_pod_management_policy(&self) -> PodManagementPolicy {
        PodManagementPolicy::Parallel
    }

    /// Metadata, then the CRD's CEL rules (as on create), then typed
    /// deserialization, then [`check_spec`]: flavor/SST compatibility,
    /// `spec.configuration` syntax and operator-owned options (the
    /// certificate and SST encryption options too while cluster traffic
    /// is encrypted), proxy size, and that `forceBootstrapFrom` names an
    /// instance.
    fn validate(&self, object: &serde_json::Value) -> Result<ValidatedCluster, SpecError> {
        let (meta, spec, _): (_, PxcClusterSpec, _) = typed_cluster(KIND, &CRD, object)?;
        check_spec(&meta.name, &spec)?;
        let spec_json = serde_json::to_value(&spec)
            .map_err(|e| SpecError::new("spec", format!("failed to serialize: {e}")))?;
        Ok(ValidatedCluster {
            meta,
            image: spec.effective_image(),
            common: spec.common,
            spec: spec_json,
        })
    }

    /// Galera is multi-writer: every instance votes; the writer (the
    /// current primary) is restarted last.
    fn topology(&self, cluster: &ValidatedCluster, current_primary: Option<&str>) -> Topology {
        let names = cluster.instance_names();
        Topology {
            model: ReplicationModel::MultiWriter,
            update_order: galera::update_order(&names, current_primary),
            voters: names,
        }
    }

    fn manifest(&self, cluster: &ValidatedCluster) -> EngineManifest {
        let flavor = Self::spec(cluster).map(|s| s.flavor).unwrap_or_default();
        let port = |name: &str, port: u16, client: bool| EnginePort {
            name: name.to_string(),
            port,
            client,
        };
        EngineManifest {
            ports: vec![
                port("mysql", PORT_MYSQL, true),
                port("sst", PORT_SST, false),
                port("galera", PORT_GALERA, false),
                port("ist", PORT_IST, false),
            ],
            data_mount_path: DATA_MOUNT_PATH.to_string(),
            extra_volumes: Vec::new(),
            run_as_user: Some(flavor.run_as_user()),
            bin_dir: None,
            env: BTreeMap::new(),
            generated_secrets: [
                secret_keys::ROOT_PASSWORD,
                sst_password_key(flavor),
                secret_keys::MONITOR_PASSWORD,
                secret_keys::PROXYADMIN_PASSWORD,
                secret_keys::OPERATOR_PASSWORD,
                secret_keys::API_TOKEN,
            ]
            .map(str::to_string)
            .to_vec(),
        }
    }

    /// With `spec.tls.encryptClusterTraffic` (the default): the user's
    /// `spec.tls.secretName`, or `<cluster>-ssl-internal`, generated.
    fn tls_secret(&self, cluster: &ValidatedCluster) -> Option<TlsSecret> {
        let spec = Self::spec(cluster).ok()?;
        Some(TlsSecret {
            name: spec.tls_secret_name(&cluster.meta.name)?,
            generate: spec.tls.secret_name.is_none(),
        })
    }

    fn proxy(&self, cluster: &ValidatedCluster) -> Option<ProxyPods> {
        let spec = Self::spec(cluster).ok()?;
        (spec.proxy.type_ == ProxyType::Haproxy && spec.proxy.instances >= 1).then_some(ProxyPods {
            instances: spec.proxy.instances,
            image: spec.proxy.image,
        })
    }

    fn instance_settings(
        &self,
        cluster: &ValidatedCluster,
    ) -> Result<serde_json::Value, SpecError> {
        let spec = Self::spec(cluster)?;
        let my_cnf = match &spec.configuration {
            Some(text) => mycnf::render(
                &mycnf::parse(text)
                    .map_err(|e| SpecError::new("spec.configuration", e.to_string()))?,
            ),
            None => Default::default(),
        };
        let settings = PxcInstanceSettings {
            flavor: spec.flavor,
            version: spec.effective_version(),
            cluster_name: cluster.meta.name.clone(),
            sst_method: spec.effective_sst_method(),
            my_cnf,
            tls: spec
                .tls_secret_name(&cluster.meta.name)
                .map(|secret_name| TlsSettings { secret_name }),
        };
        serde_json::to_value(settings).map_err(|e| {
            SpecError::new(
                "spec",
                format!("failed to serialize instance settings: {e}"),
            )
        })
    }

    fn instance_driver(&self) -> Option<std::sync::Arc<dyn InstanceDriver>> {
        Some(std::sync::Arc::new(crate::instance::PxcDriver::new()))
    }

    /// See [`galera::elect`].
    fn elect(&self, cluster: &ValidatedCluster, members: &[ObservedMember]) -> Election {
        match Self::spec(cluster) {
            Ok(spec) => galera::elect(
                cluster.common.instances,
                spec.force_bootstrap_from(),
                members,
            ),
            Err(e) => Election::NoCandidate {
                reason: format!("failed to read the spec: {e}"),
            },
        }
    }

    /// See [`galera::route`].
    fn route(&self, members: &[ObservedMember]) -> Routing {
        galera::route(members)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{Flavor, SstMethod};
    use operator_core::engine::capability;

    const SIMPLE: &str = r#"
apiVersion: stratum.dev/v1alpha1
kind: PxcCluster
metadata:
  name: simple-pxc
  namespace: db
spec:
  instances: 3
  storage:
    size: 1Gi
"#;

    fn object(yaml: &str) -> serde_json::Value {
        serde_yaml::from_str(yaml).unwrap()
    }

    /// The simple fixture with `patch` merged into its spec.
    fn with_spec(patch: &str) -> serde_json::Value {
        let mut obj = object(SIMPLE);
        let patch: serde_json::Value = serde_yaml::from_str(patch).unwrap();
        for (k, v) in patch.as_object().unwrap() {
            obj["spec"][k] = v.clone();
        }
        obj
    }

    fn rejected(patch: &str) -> SpecError {
        PxcEngine.validate(&with_spec(patch)).unwrap_err()
    }

    #[test]
    fn crd_has_names_columns_and_cel_rules() {
        let crd = PxcEngine.crd();
        assert_eq!(crd.spec.group, "stratum.dev");
        assert_eq!(crd.spec.names.kind, "PxcCluster");
        assert_eq!(crd.spec.names.short_names, Some(vec!["pxc".to_string()]));
        assert_eq!(crd.spec.names.categories, Some(vec!["stratum".to_string()]));
        assert_eq!(crd.spec.scope, "Namespaced");
        let v = &crd.spec.versions[0];
        assert_eq!(v.name, "v1alpha1");
        assert!(v.subresources.as_ref().unwrap().status.is_some());
        let cols: Vec<_> = v
            .additional_printer_columns
            .as_ref()
            .unwrap()
            .iter()
            .map(|c| (c.name.as_str(), c.json_path.as_str()))
            .collect();
        assert_eq!(
            cols,
            [
                ("Ready", ".status.ready"),
                ("Primary", ".status.currentPrimary"),
                ("Phase", ".status.phase"),
                ("Age", ".metadata.creationTimestamp"),
            ]
        );
        let schema = serde_json::to_value(v.schema.as_ref().unwrap()).unwrap();
        let spec = &schema["openAPIV3Schema"]["properties"]["spec"];
        let rules = spec["x-kubernetes-validations"].as_array().unwrap();
        assert!(
            rules.iter().any(
                |r| r["rule"].as_str().unwrap().contains("unsafeFlags.pxcSize")
                    && r["fieldPath"] == ".instances"
            ),
            "{rules:?}"
        );
        // Doc comments become `kubectl explain` text.
        for field in [
            "flavor",
            "version",
            "configuration",
            "proxy",
            "sstMethod",
            "unsafeFlags",
            "bootstrap",
            "tls",
        ] {
            let d = spec["properties"][field]["description"]
                .as_str()
                .unwrap_or("");
            assert!(!d.is_empty(), "spec.{field} has no description");
        }
        for field in ["encryptClusterTraffic", "secretName"] {
            let d = spec["properties"]["tls"]["properties"][field]["description"]
                .as_str()
                .unwrap_or("");
            assert!(!d.is_empty(), "spec.tls.{field} has no description");
        }
        let sst_doc = spec["properties"]["sstMethod"]["description"]
            .as_str()
            .unwrap();
        assert!(sst_doc.contains("MariaDB only"), "{sst_doc}");
        assert_eq!(
            spec["properties"]["sstMethod"]["enum"],
            serde_json::json!(["xtrabackup-v2", "mariabackup", "rsync"])
        );
        assert_eq!(
            spec["properties"]["flavor"]["enum"],
            serde_json::json!(["PerconaXtraDB", "MariaDB"])
        );
    }

    #[test]
    fn accepts_minimal_fixture_with_defaults() {
        let c = PxcEngine.validate(&object(SIMPLE)).unwrap();
        assert_eq!(c.meta.name, "simple-pxc");
        assert_eq!(c.meta.namespace, "db");
        assert_eq!(c.meta.kind, "PxcCluster");
        assert_eq!(c.common.instances, 3);
        assert_eq!(c.image, "percona/percona-xtradb-cluster:8.0");
        let spec: PxcClusterSpec = c.engine_spec().unwrap();
        assert_eq!(spec.flavor, Flavor::PerconaXtraDB);
        assert_eq!(spec.effective_sst_method(), SstMethod::XtrabackupV2);
        assert_eq!(spec.proxy.instances, 2);
        assert_eq!(spec.proxy.type_, ProxyType::Haproxy);
    }

    #[test]
    fn accepts_mariadb_fixture() {
        let obj = object(
            r#"
apiVersion: stratum.dev/v1alpha1
kind: PxcCluster
metadata:
  name: simple-galera
spec:
  instances: 2
  unsafeFlags:
    pxcSize: true
  storage:
    size: 1Gi
  flavor: MariaDB
  sstMethod: rsync
  proxy:
    type: none
  configuration: |
    [mysqld]
    max_connections = 250
    wsrep_provider_options = "gcache.size=1G"
    [mariabackup]
    parallel = 2
  bootstrap:
    forceBootstrapFrom: simple-galera-1
"#,
        );
        let c = PxcEngine.validate(&obj).unwrap();
        assert_eq!(c.image, "mariadb:10.11");
        assert_eq!(c.meta.namespace, "default");
        let settings: PxcInstanceSettings =
            serde_json::from_value(PxcEngine.instance_settings(&c).unwrap()).unwrap();
        assert_eq!(settings.flavor, Flavor::MariaDB);
        assert_eq!(settings.version, "10.11");
        assert_eq!(settings.cluster_name, "simple-galera");
        assert_eq!(settings.sst_method, SstMethod::Rsync);
        assert_eq!(
            settings.my_cnf["mysqld"]["max_connections"],
            Some("250".into())
        );
        assert_eq!(settings.my_cnf["mariabackup"]["parallel"], Some("2".into()));
        let m = PxcEngine.manifest(&c);
        assert_eq!(m.run_as_user, Some(999));
        assert!(
            m.generated_secrets
                .contains(&"mariabackup-password".to_string())
        );
    }

    #[test]
    fn instance_settings_json_shape() {
        let c = PxcEngine
            .validate(&with_spec(
                "configuration: \"[mysqld]\\nskip-name-resolve\\n\"",
            ))
            .unwrap();
        let v = PxcEngine.instance_settings(&c).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "flavor": "PerconaXtraDB",
                "version": "8.0",
                "clusterName": "simple-pxc",
                "sstMethod": "xtrabackup-v2",
                "myCnf": {"mysqld": {"skip_name_resolve": null}},
                "tls": {"secretName": "simple-pxc-ssl-internal"},
            })
        );
    }

    #[test]
    fn tls_is_on_by_default_with_a_generated_secret() {
        let c = PxcEngine.validate(&object(SIMPLE)).unwrap();
        assert_eq!(
            PxcEngine.tls_secret(&c),
            Some(TlsSecret {
                name: "simple-pxc-ssl-internal".into(),
                generate: true
            })
        );
        let c = PxcEngine
            .validate(&with_spec("tls: {secretName: my-certs}"))
            .unwrap();
        assert_eq!(
            PxcEngine.tls_secret(&c),
            Some(TlsSecret {
                name: "my-certs".into(),
                generate: false
            })
        );
        let settings: PxcInstanceSettings =
            serde_json::from_value(PxcEngine.instance_settings(&c).unwrap()).unwrap();
        assert_eq!(settings.tls.unwrap().secret_name, "my-certs");

        let c = PxcEngine
            .validate(&with_spec(
                "{tls: {encryptClusterTraffic: false, secretName: my-certs}, configuration: \"[mysqld]\\nssl-ca=/etc/ca.pem\\n\"}",
            ))
            .unwrap();
        assert_eq!(PxcEngine.tls_secret(&c), None);
        let settings: PxcInstanceSettings =
            serde_json::from_value(PxcEngine.instance_settings(&c).unwrap()).unwrap();
        assert_eq!(settings.tls, None);
    }

    #[test]
    fn tls_options_in_configuration_are_refused_while_encrypting() {
        let err = rejected("configuration: \"[sst]\\nencrypt=0\\n\"");
        assert_eq!(err.field, "spec.configuration");
        assert!(err.message.contains("line 2"), "{err}");
        assert!(err.message.contains("option encrypt in [sst]"), "{err}");
        assert_eq!(
            rejected("tls: {secretName: My_Certs}").field,
            "spec.tls.secretName"
        );
    }

    #[test]
    fn rejects_even_or_small_instance_counts() {
        for n in [1, 2, 4] {
            let err = rejected(&format!("instances: {n}"));
            assert_eq!(err.field, "spec.instances", "{err}");
            assert!(err.message.contains("Galera needs a quorum"), "{err}");
            assert!(err.message.contains("spec.unsafeFlags.pxcSize"), "{err}");
        }
        PxcEngine.validate(&with_spec("{instances: 5}")).unwrap();
        PxcEngine
            .validate(&with_spec("{instances: 2, unsafeFlags: {pxcSize: true}}"))
            .unwrap();
    }

    #[test]
    fn rejects_operator_owned_mycnf_options() {
        let err = rejected(
            "configuration: \"[mysqld]\\nmax_connections=10\\nwsrep_cluster_address=gcomm://x\\n\"",
        );
        assert_eq!(err.field, "spec.configuration");
        assert!(err.message.contains("line 3"), "{err}");
        assert!(err.message.contains("wsrep_cluster_address"), "{err}");
        let err = rejected("configuration: \"[mysqld]\\nport = 3307\\n\"");
        assert_eq!(err.field, "spec.configuration");
        assert!(err.message.contains("option port"), "{err}");
        let err = rejected("configuration: \"max_connections=10\\n\"");
        assert_eq!(err.field, "spec.configuration");
        assert!(err.message.contains("[mysqld]"), "{err}");
    }

    #[test]
    fn rejects_flavor_sst_mismatch() {
        for (patch, needle) in [
            (
                "{flavor: MariaDB, sstMethod: xtrabackup-v2}",
                "use mariabackup or rsync",
            ),
            (
                "{sstMethod: mariabackup}",
                "not available with flavor PerconaXtraDB",
            ),
            (
                "{flavor: PerconaXtraDB, sstMethod: rsync}",
                "use xtrabackup-v2",
            ),
        ] {
            let err = rejected(patch);
            assert_eq!(err.field, "spec.sstMethod", "{err}");
            assert!(err.message.contains(needle), "{patch}: {err}");
        }
        let err = rejected("{sstMethod: clone}");
        assert_eq!(err.field, "spec.sstMethod", "{err}");
    }

    #[test]
    fn rejects_forced_bootstrap_of_missing_instance() {
        for name in ["simple-pxc-3", "other-0", "simple-pxc"] {
            let err = rejected(&format!("bootstrap: {{forceBootstrapFrom: {name}}}"));
            assert_eq!(err.field, "spec.bootstrap.forceBootstrapFrom", "{err}");
            assert!(err.message.contains("simple-pxc-0 … simple-pxc-2"), "{err}");
        }
        PxcEngine
            .validate(&with_spec("bootstrap: {forceBootstrapFrom: simple-pxc-2}"))
            .unwrap();
    }

    #[test]
    fn rejects_other_bad_fields() {
        assert_eq!(rejected("version: \"8.0-latest\"").field, "spec.version");
        assert_eq!(
            rejected("proxy: {instances: 0}").field,
            "spec.proxy.instances"
        );
        let mut obj = object(SIMPLE);
        obj["kind"] = "PostgresCluster".into();
        assert_eq!(PxcEngine.validate(&obj).unwrap_err().field, "kind");
        let mut obj = object(SIMPLE);
        obj.as_object_mut().unwrap().remove("spec");
        assert_eq!(PxcEngine.validate(&obj).unwrap_err().field, "spec");
    }

    #[test]
    fn haproxy_pods_follow_spec_proxy() {
        let c = PxcEngine.validate(&object(SIMPLE)).unwrap();
        assert_eq!(
            PxcEngine.proxy(&c),
            Some(ProxyPods {
                instances: 2,
                image: None
            })
        );
        let custom =
            format!("{SIMPLE}  proxy: {{instances: 3, image: example.invalid/haproxy:2.9}}\n");
        let c = PxcEngine.validate(&object(&custom)).unwrap();
        assert_eq!(
            PxcEngine.proxy(&c),
            Some(ProxyPods {
                instances: 3,
                image: Some("example.invalid/haproxy:2.9".into())
            })
        );
        let none = format!("{SIMPLE}  proxy: {{type: none}}\n");
        let c = PxcEngine.validate(&object(&none)).unwrap();
        assert_eq!(PxcEngine.proxy(&c), None);
    }

    #[test]
    fn manifest_ports_volume_and_secrets() {
        let c = PxcEngine.validate(&object(SIMPLE)).unwrap();
        let m = PxcEngine.manifest(&c);
        let ports: Vec<_> = m
            .ports
            .iter()
            .map(|p| (p.name.as_str(), p.port, p.client))
            .collect();
        assert_eq!(
            ports,
            [
                ("mysql", 3306, true),
                ("sst", 4444, false),
                ("galera", 4567, false),
                ("ist", 4568, false)
            ]
        );
        assert_eq!(m.data_mount_path, "/var/lib/mysql");
        assert_eq!(m.run_as_user, Some(1001));
        assert_eq!(
            m.generated_secrets,
            [
                "root-password",
                "xtrabackup-password",
                "monitor-password",
                "proxyadmin-password",
                "operator-password",
                "api-token"
            ]
        );
    }

    #[test]
    fn topology_is_multi_writer_with_writer_last() {
        let c = PxcEngine.validate(&with_spec("{instances: 5}")).unwrap();
        let t = PxcEngine.topology(&c, Some("simple-pxc-0"));
        assert_eq!(t.model, ReplicationModel::MultiWriter);
        assert_eq!(t.voters.len(), 5);
        assert_eq!(
            t.update_order,
            [
                "simple-pxc-4",
                "simple-pxc-3",
                "simple-pxc-2",
                "simple-pxc-1",
                "simple-pxc-0"
            ]
        );
        let t = PxcEngine.topology(&c, Some("simple-pxc-3"));
        assert_eq!(t.update_order.last().unwrap(), "simple-pxc-3");
        assert_eq!(t.update_order[0], "simple-pxc-4");
    }

    #[test]
    fn elect_uses_forced_bootstrap_from_spec() {
        let c = PxcEngine
            .validate(&with_spec("bootstrap: {forceBootstrapFrom: simple-pxc-1}"))
            .unwrap();
        let down = |n: &str| ObservedMember {
            name: n.into(),
            status: None,
            error: Some("timeout".into()),
        };
        let members: Vec<_> = c.instance_names().iter().map(|n| down(n)).collect();
        match PxcEngine.elect(&c, &members) {
            Election::Promote { candidate, .. } => assert_eq!(candidate, "simple-pxc-1"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn instances_capability_is_supported() {
        assert!(PxcEngine.instance_driver().is_some());
        assert!(
            !PxcEngine
                .unsupported_capabilities()
                .contains(&capability::INSTANCES)
        );
        assert_eq!(PxcEngine.kind(), "PxcCluster");
    }
}
