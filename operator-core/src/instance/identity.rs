//! Which cluster a data volume belongs to: `stratum-cluster.json`, written
//! on first boot and checked before every start, so that an instance never
//! runs on another cluster's data. Filesystem IO only.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::config::InstanceConfig;
use super::process::{self, RunAs};
use crate::engine::InstanceError;

/// Name of the identity file, at the top of the data volume.
pub const IDENTITY_FILE: &str = "stratum-cluster.json";

/// Contents of [`IDENTITY_FILE`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DataDirIdentity {
    /// Cluster identity (CR UID, or a generated id locally).
    pub cluster_id: String,
    /// Cluster name, for messages.
    pub cluster: String,
    /// Instance that created the directory.
    pub instance: String,
}

/// Make sure the volume at `volume` (identity file `identity_file`) belongs
/// to the cluster of `config`: compare the file, or write it on first boot.
/// `foreign_data` describes database files already in the volume
/// (e.g. "/data/pgdata holds a PostgreSQL data directory"); such a volume
/// without an identity file was not made by Stratum and is refused rather
/// than adopted.
pub fn claim_volume(
    volume: &Path,
    identity_file: &Path,
    config: &InstanceConfig,
    owner: Option<&RunAs>,
    foreign_data: Option<String>,
) -> Result<(), InstanceError> {
    let refuse = |reason: String| InstanceError::DataDirectory {
        path: volume.to_path_buf(),
        reason,
    };
    match std::fs::read(identity_file) {
        Ok(bytes) => {
            let found: DataDirIdentity = serde_json::from_slice(&bytes).map_err(|e| {
                refuse(format!(
                    "{} is unreadable ({e}); delete the data directory",
                    identity_file.display()
                ))
            })?;
            if found.cluster_id != config.cluster_id {
                return Err(refuse(format!(
                    "it belongs to cluster {} (id {}), this instance is cluster {} (id {}); use another data directory or delete it",
                    found.cluster, found.cluster_id, config.cluster, config.cluster_id
                )));
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(what) = foreign_data {
                return Err(refuse(format!(
                    "{what} that Stratum did not create (no {IDENTITY_FILE}); use another data directory or delete it"
                )));
            }
            let identity = DataDirIdentity {
                cluster_id: config.cluster_id.clone(),
                cluster: config.cluster.clone(),
                instance: config.instance.clone(),
            };
            let json = serde_json::to_vec_pretty(&identity).expect("identity serializes");
            process::write_file(identity_file, &json, 0o600, owner)
        }
        Err(e) => Err(InstanceError::io("read", identity_file)(e)),
    }
}
