//! The PostgreSQL block of an instance's configuration: what the operator
//! side (`Engine::instance_settings`) hands the instance side. Pure data.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Keys of the generated credentials Secret (and files in
/// `InstanceConfig::secrets_dir`).
pub mod secret_keys {
    /// Password of the `postgres` superuser.
    pub const SUPERUSER_PASSWORD: &str = "superuser-password";
    /// Password of the `streaming_replica` user.
    pub const REPLICATION_PASSWORD: &str = "replication-password";
    /// Password of the application database owner.
    pub const APP_PASSWORD: &str = "app-password";
    /// Bearer token of the instance manager API (shared by all engines).
    pub const API_TOKEN: &str = operator_core::instance::protocol::SECRET_KEY_API_TOKEN;
}

/// Name of the replication user.
pub const REPLICATION_USER: &str = "streaming_replica";
/// Name of the superuser.
pub const SUPERUSER: &str = "postgres";

/// PostgreSQL settings of one instance.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PostgresInstanceSettings {
    /// Major version the cluster runs (the binaries must match).
    pub version: u32,
    /// Every `postgresql.conf` parameter: the user's and the operator's.
    /// Rendered into a file outside PGDATA.
    pub parameters: BTreeMap<String, String>,
    /// Extra `pg_hba.conf` lines from the user, before the operator's.
    #[serde(default)]
    pub pg_hba: Vec<String>,
    /// initdb settings for the first instance.
    pub initdb: InitDbSettings,
    /// `synchronous_standby_names` for the primary; empty for asynchronous.
    #[serde(default)]
    pub synchronous_standby_names: String,
    /// Keep `pg_wal` on the separate volume of this name
    /// (`InstanceConfig::volumes`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wal_volume: Option<String>,
}

/// initdb settings.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InitDbSettings {
    /// Application database.
    pub database: String,
    /// Its owner (a login role whose password is the `app-password` secret).
    pub owner: String,
    /// `--data-checksums`.
    pub data_checksums: bool,
    /// `--encoding`.
    pub encoding: String,
}
