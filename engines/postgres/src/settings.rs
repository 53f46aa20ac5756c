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
    /// The value a server starts with; the operator replaces it on the
    /// primary (see [`SyncSettings::standby_names`]) as replicas come and go.
    #[serde(default)]
    pub synchronous_standby_names: String,
    /// Synchronous replication as the spec asks for it; `None` for
    /// asynchronous.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub synchronous: Option<SyncSettings>,
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

/// Synchronous replication settings (`spec.postgresql.synchronous`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SyncSettings {
    /// `ANY` (quorum) or `FIRST` (priority).
    pub method: String,
    /// Standbys that confirm each commit when enough are available.
    pub number: u32,
    /// Fewest standbys a commit waits for when fewer are available
    /// (default `number`: never fewer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_sync_replicas: Option<u32>,
    /// Most standbys listed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_sync_replicas: Option<u32>,
}

impl SyncSettings {
    /// `synchronous_standby_names` for a primary whose other members are
    /// `replicas` and of which `available` stream from it now (CloudNativePG
    /// semantics, with `number` as the goal). Pure.
    ///
    /// - Enough available: `number` of them confirm each commit.
    /// - Fewer: as many as are available, but never fewer than
    ///   `minSyncReplicas` (default `number`); missing ones are listed from
    ///   the unavailable replicas, so commits wait for them rather than
    ///   become less durable than asked.
    /// - At most `maxSyncReplicas` names, available ones first.
    /// - Empty (asynchronous) only when nothing must confirm.
    pub fn standby_names(&self, replicas: &[String], available: &[String]) -> String {
        let floor = self
            .min_sync_replicas
            .unwrap_or(self.number)
            .min(self.number) as usize;
        let number = self.number as usize;
        let mut listed: Vec<&String> = replicas.iter().filter(|r| available.contains(r)).collect();
        if let Some(max) = self.max_sync_replicas {
            listed.truncate(max as usize);
        }
        let quorum = if listed.len() >= number {
            number
        } else {
            listed.len().max(floor)
        };
        if quorum == 0 {
            return String::new();
        }
        for r in replicas {
            if listed.len() >= quorum {
                break;
            }
            if !listed.contains(&r) {
                listed.push(r);
            }
        }
        let names = listed
            .iter()
            .map(|n| format!("\"{n}\""))
            .collect::<Vec<_>>()
            .join(",");
        format!("{} {quorum} ({names})", self.method)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn sync(number: u32, min: Option<u32>, max: Option<u32>) -> SyncSettings {
        SyncSettings {
            method: "ANY".into(),
            number,
            min_sync_replicas: min,
            max_sync_replicas: max,
        }
    }

    #[test]
    fn standby_names_follow_the_available_replicas() {
        let replicas = names(&["pg-1", "pg-2", "pg-3", "pg-4"]);
        let all = replicas.clone();
        // Enough available: number of them; every available one listed.
        assert_eq!(
            sync(2, None, None).standby_names(&replicas, &all),
            r#"ANY 2 ("pg-1","pg-2","pg-3","pg-4")"#
        );
        // maxSyncReplicas caps the list.
        assert_eq!(
            sync(2, None, Some(3)).standby_names(&replicas, &all),
            r#"ANY 2 ("pg-1","pg-2","pg-3")"#
        );
        // Fewer available, no minimum: still number, the missing one from
        // the unavailable replicas (commits wait for it).
        assert_eq!(
            sync(2, None, None).standby_names(&replicas, &names(&["pg-3"])),
            r#"ANY 2 ("pg-3","pg-1")"#
        );
        // minSyncReplicas 1: down to the available ones, never below 1.
        assert_eq!(
            sync(2, Some(1), None).standby_names(&replicas, &names(&["pg-3"])),
            r#"ANY 1 ("pg-3")"#
        );
        assert_eq!(
            sync(2, Some(1), None).standby_names(&replicas, &[]),
            r#"ANY 1 ("pg-1")"#
        );
        // minSyncReplicas 0: asynchronous when nobody streams.
        assert_eq!(sync(1, Some(0), None).standby_names(&replicas, &[]), "");
        // Names of members that are not replicas (the primary) never appear.
        assert_eq!(
            sync(1, None, None).standby_names(&names(&["pg-1"]), &names(&["pg-0", "pg-1"])),
            r#"ANY 1 ("pg-1")"#
        );
        let first = SyncSettings {
            method: "FIRST".into(),
            ..sync(1, None, Some(2))
        };
        assert_eq!(
            first.standby_names(&replicas, &names(&["pg-2", "pg-4"])),
            r#"FIRST 1 ("pg-2","pg-4")"#
        );
    }
}
