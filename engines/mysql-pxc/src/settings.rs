//! The Galera block of an instance's configuration: what the operator side
//! (`Engine::instance_settings`) hands the instance side. Pure data.

use serde::{Deserialize, Serialize};

use crate::api::{Flavor, SstMethod};
use crate::mycnf::RenderedMyCnf;

/// Keys of the generated credentials Secret (and files in
/// `InstanceConfig::secrets_dir`). Percona's user names, so that tooling
/// written for the Percona operator finds the same accounts.
pub mod secret_keys {
    /// Password of `root@%`.
    pub const ROOT_PASSWORD: &str = "root-password";
    /// Password of the SST/backup user on PerconaXtraDB (`xtrabackup`).
    pub const XTRABACKUP_PASSWORD: &str = "xtrabackup-password";
    /// Password of the SST/backup user on MariaDB (`mariabackup`).
    pub const MARIABACKUP_PASSWORD: &str = "mariabackup-password";
    /// Password of the `monitor` user (metrics, proxy health checks).
    pub const MONITOR_PASSWORD: &str = "monitor-password";
    /// Password of the `proxyadmin` user (proxy administration).
    pub const PROXYADMIN_PASSWORD: &str = "proxyadmin-password";
    /// Password of the `operator` user (the instance manager's account).
    pub const OPERATOR_PASSWORD: &str = "operator-password";
    /// Bearer token of the instance manager API (shared by all engines).
    pub const API_TOKEN: &str = operator_core::instance::protocol::SECRET_KEY_API_TOKEN;
}

/// Account names matching [`secret_keys`].
pub mod users {
    /// Superuser.
    pub const ROOT: &str = "root";
    /// SST/backup user on PerconaXtraDB.
    pub const XTRABACKUP: &str = "xtrabackup";
    /// SST/backup user on MariaDB.
    pub const MARIABACKUP: &str = "mariabackup";
    /// Monitoring user.
    pub const MONITOR: &str = "monitor";
    /// Proxy administration user.
    pub const PROXYADMIN: &str = "proxyadmin";
    /// The instance manager's user.
    pub const OPERATOR: &str = "operator";
}

/// Galera settings of one instance (the same for every member).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PxcInstanceSettings {
    /// Server distribution (selects binaries, SST user and defaults).
    pub flavor: Flavor,
    /// Server version the cluster runs.
    pub version: String,
    /// `wsrep_cluster_name`: the cluster's `metadata.name`.
    pub cluster_name: String,
    /// `wsrep_sst_method`.
    pub sst_method: SstMethod,
    /// The user's `spec.configuration`, checked and merged by group
    /// ([`crate::mycnf::render`]). The instance side writes it after its
    /// own settings and merges a user `wsrep_provider_options` with its own
    /// provider options.
    #[serde(default)]
    pub my_cnf: RenderedMyCnf,
    /// Encryption of the traffic between members, with the files of
    /// `InstanceConfig::tls_dir`; `None`: clear text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSettings>,
}

/// Cluster traffic encryption of an instance.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TlsSettings {
    /// The Secret the files come from, named in errors.
    pub secret_name: String,
}

impl PxcInstanceSettings {
    /// Key of the SST user's password for this flavor.
    pub fn sst_password_key(&self) -> &'static str {
        sst_password_key(self.flavor)
    }
}

/// Key of the SST user's password for a flavor.
pub fn sst_password_key(flavor: Flavor) -> &'static str {
    match flavor {
        Flavor::PerconaXtraDB => secret_keys::XTRABACKUP_PASSWORD,
        Flavor::MariaDB => secret_keys::MARIABACKUP_PASSWORD,
    }
}
