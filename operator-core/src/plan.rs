//! Instance planning shared by both runtimes: from a validated cluster to
//! each instance's [`InstanceConfig`]. Pure, no IO.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::engine::{Engine, EngineManifest, ValidatedCluster};
use crate::error::SpecError;
use crate::instance::config::{InstanceConfig, PeerEndpoint};

/// Port of the instance manager API inside a pod.
pub const POD_API_PORT: u16 = 8000;

/// Where things live for one runtime.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstancePaths {
    /// Data volume mount (the engine keeps its data directory beneath it).
    pub data_dir: PathBuf,
    /// Extra volumes by name.
    pub volumes: std::collections::BTreeMap<String, PathBuf>,
    /// Configuration, sockets and logs, outside the data directory.
    pub run_dir: PathBuf,
    /// Directory of credential files.
    pub secrets_dir: PathBuf,
    /// The API token file.
    pub token_file: PathBuf,
    /// Directory of the TLS Secret's files, when the engine asked for one.
    pub tls_dir: Option<PathBuf>,
}

/// Everything about one cluster that both runtimes feed into instance
/// configs.
pub struct PlanInput<'a> {
    /// The cluster.
    pub cluster: &'a ValidatedCluster,
    /// Its engine.
    pub engine: &'a dyn Engine,
    /// Cluster identity (UID or local id).
    pub cluster_id: String,
    /// Every member's endpoint.
    pub members: Vec<PeerEndpoint>,
    /// Address to listen on.
    pub listen_address: String,
    /// Unix user for the database when run as root.
    pub run_as_user: Option<String>,
    /// Directory of the server binaries.
    pub bin_dir: Option<PathBuf>,
}

/// The config of one instance (`instance` empty for the shared ConfigMap
/// form on Kubernetes).
pub fn instance_config(
    input: &PlanInput<'_>,
    instance: &str,
    paths: InstancePaths,
) -> Result<InstanceConfig, SpecError> {
    let cluster = input.cluster;
    Ok(InstanceConfig {
        kind: cluster.meta.kind.clone(),
        cluster: cluster.meta.name.clone(),
        namespace: cluster.meta.namespace.clone(),
        cluster_id: input.cluster_id.clone(),
        instance: instance.to_string(),
        data_dir: paths.data_dir,
        volumes: paths.volumes,
        run_dir: paths.run_dir,
        listen_address: input.listen_address.clone(),
        members: input.members.clone(),
        token_file: paths.token_file,
        secrets_dir: paths.secrets_dir,
        tls_dir: paths.tls_dir,
        run_as_user: input.run_as_user.clone(),
        bin_dir: input.bin_dir.clone(),
        engine: input.engine.instance_settings(cluster)?,
    })
}

/// Kubernetes member endpoints: stable DNS names through the headless
/// Service; every pod uses the container ports of the manifest.
pub fn kubernetes_members(
    cluster: &ValidatedCluster,
    manifest: &EngineManifest,
) -> Vec<PeerEndpoint> {
    let db_port = manifest
        .ports
        .iter()
        .find(|p| p.client)
        .map(|p| p.port)
        .unwrap_or_default();
    let ports: BTreeMap<String, u16> = manifest
        .ports
        .iter()
        .filter(|p| !p.client)
        .map(|p| (p.name.clone(), p.port))
        .collect();
    cluster
        .instance_names()
        .into_iter()
        .map(|name| PeerEndpoint {
            host: format!(
                "{name}.{}-headless.{}.svc",
                cluster.meta.name, cluster.meta.namespace
            ),
            name,
            db_port,
            api_port: POD_API_PORT,
            ports: ports.clone(),
        })
        .collect()
}
