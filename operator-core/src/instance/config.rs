//! The instance configuration document: everything `stratum instance` needs
//! to run one member. Written by the local runtime as a file, and by the
//! controller into the cluster ConfigMap (with the instance name from the
//! pod's name). Pure data.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// One member's network identity.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerEndpoint {
    /// Instance name.
    pub name: String,
    /// Host name or IP peers and clients use.
    pub host: String,
    /// Database port.
    pub db_port: u16,
    /// Instance manager API port.
    pub api_port: u16,
    /// The engine's other ports by [`EnginePort`](crate::engine::EnginePort)
    /// name (Galera: `galera`, `ist`, `sst`). On Kubernetes every pod uses
    /// the container ports, so this is filled from the manifest; locally
    /// each instance gets its own loopback ports.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ports: BTreeMap<String, u16>,
}

impl PeerEndpoint {
    /// The engine port called `name`, if planned.
    pub fn port(&self, name: &str) -> Option<u16> {
        self.ports.get(name).copied()
    }
}

/// Configuration of one instance manager.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InstanceConfig {
    /// Cluster kind, selects the engine.
    pub kind: String,
    /// Cluster name.
    pub cluster: String,
    /// Namespace (informational locally).
    #[serde(default)]
    pub namespace: String,
    /// Cluster identity: the CR's UID on Kubernetes, a generated id locally.
    /// Written into the data directory on first boot; a data directory with
    /// another id is refused.
    pub cluster_id: String,
    /// This instance's name. Empty in the ConfigMap form; filled from
    /// `--instance` / `POD_NAME`.
    #[serde(default)]
    pub instance: String,
    /// Where the data volume is mounted; the engine keeps its data
    /// directory beneath it.
    pub data_dir: PathBuf,
    /// Extra persistent volumes by name (`EngineManifest::extra_volumes`),
    /// e.g. `wal` → `/var/lib/postgresql/wal` in a pod or
    /// `instances/<name>/wal` locally. Engines refer to volumes by name so
    /// that their settings stay runtime-neutral.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub volumes: BTreeMap<String, PathBuf>,
    /// Where configuration, sockets and logs are kept (outside the data
    /// directory, so pg_rewind and restores do not touch them).
    pub run_dir: PathBuf,
    /// Address the database and the API listen on.
    pub listen_address: String,
    /// Every member, this one included. The instance's own ports are read
    /// from its entry.
    pub members: Vec<PeerEndpoint>,
    /// File holding the instance-API bearer token.
    pub token_file: PathBuf,
    /// Directory of credential files (one file per key of the credentials
    /// Secret).
    pub secrets_dir: PathBuf,
    /// Directory of the cluster's TLS files (`ca.crt`, `tls.crt`,
    /// `tls.key`) when the engine asked for a TLS Secret
    /// (`Engine::tls_secret`): the Secret's mount in a pod, a directory of
    /// the state directory locally.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_dir: Option<PathBuf>,
    /// Unix user to run the database as when the manager runs as root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_as_user: Option<String>,
    /// Directory of the server binaries; PATH when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bin_dir: Option<PathBuf>,
    /// Engine-specific settings, from `Engine::instance_settings`.
    #[serde(default)]
    pub engine: serde_json::Value,
}

impl InstanceConfig {
    /// This instance's own endpoint.
    pub fn me(&self) -> Option<&PeerEndpoint> {
        self.members.iter().find(|m| m.name == self.instance)
    }

    /// The ordinal from the `<cluster>-<ordinal>` name.
    pub fn ordinal(&self) -> Option<u32> {
        self.instance.rsplit_once('-')?.1.parse().ok()
    }

    /// Read the API token.
    pub fn read_token(&self) -> std::io::Result<String> {
        Ok(std::fs::read_to_string(&self.token_file)?
            .trim()
            .to_string())
    }

    /// Read one credential file from `secrets_dir`.
    pub fn read_secret(&self, key: &str) -> std::io::Result<String> {
        Ok(std::fs::read_to_string(self.secrets_dir.join(key))?
            .trim_end_matches('\n')
            .to_string())
    }
}
