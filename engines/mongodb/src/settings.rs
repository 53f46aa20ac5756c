//! The MongoDB block of an instance's configuration: what the operator side
//! (`Engine::instance_settings`) hands the instance side. Pure data.

use serde::{Deserialize, Serialize};

/// Keys of the generated credentials Secret (and files in
/// `InstanceConfig::secrets_dir`).
pub mod secret_keys {
    /// The replica set's internal authentication key file
    /// (`security.keyFile`).
    pub const KEYFILE: &str = "keyfile";
    /// Password of the operator's administrative user.
    pub const ADMIN_PASSWORD: &str = "admin-password";
    /// Bearer token of the instance manager API (shared by all engines).
    pub const API_TOKEN: &str = operator_core::instance::protocol::SECRET_KEY_API_TOKEN;
}

/// Name of the operator's administrative user (in the `admin` database).
pub const ADMIN_USER: &str = "stratum-admin";

/// MongoDB settings of one instance (the same for every member).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MongoInstanceSettings {
    /// Server version the cluster runs.
    pub version: String,
    /// `replication.replSetName`.
    pub repl_set_name: String,
    /// mongod configuration-file document shared by every member: the
    /// user's `additionalMongodConfig` (normalised to nested objects) plus
    /// `replication.replSetName`. The instance side adds `net.port`,
    /// `net.bindIp`, `storage.dbPath` and `security.keyFile`.
    pub mongod_config: serde_json::Value,
}
