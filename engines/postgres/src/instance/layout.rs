//! Where an instance keeps its files, and the data directory's identity
//! file (`stratum-cluster.json`). Filesystem IO: reads and writes the
//! identity file and the incompleteness marker.

use std::path::PathBuf;

use operator_core::engine::{InstanceContext, InstanceError};
use operator_core::instance::config::InstanceConfig;
use operator_core::instance::identity;
use operator_core::instance::process::{self, RunAs};

use crate::settings::PostgresInstanceSettings;

/// Name of PGDATA under the data volume.
pub const PGDATA: &str = "pgdata";
pub use operator_core::instance::identity::IDENTITY_FILE;
/// Present while a data directory is being created (initdb, clone); a
/// data directory with it is half-done and is wiped and redone.
pub const INCOMPLETE_MARKER: &str = "stratum-init.incomplete";

/// Paths of one PostgreSQL instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// The data volume (`InstanceConfig::data_dir`).
    pub data_dir: PathBuf,
    /// PGDATA: `<data_dir>/pgdata`.
    pub pgdata: PathBuf,
    /// Where `pg_wal` lives when it has its own volume.
    pub wal_dir: Option<PathBuf>,
    /// The run directory: configuration, socket, password files, logs.
    pub run_dir: PathBuf,
}

impl Layout {
    /// The layout of the instance in `ctx`.
    pub fn new(ctx: &InstanceContext, settings: &PostgresInstanceSettings) -> Self {
        Self {
            data_dir: ctx.config.data_dir.clone(),
            pgdata: ctx.config.data_dir.join(PGDATA),
            wal_dir: settings
                .wal_volume
                .as_ref()
                .and_then(|v| ctx.config.volumes.get(v))
                .map(|d| d.join("pg_wal")),
            run_dir: ctx.run_dir.clone(),
        }
    }

    /// `PGDATA/PG_VERSION`, present once initdb or a clone has produced a
    /// data directory.
    pub fn pg_version_file(&self) -> PathBuf {
        self.pgdata.join("PG_VERSION")
    }

    /// `PGDATA/standby.signal`: the server starts as a replica.
    pub fn standby_signal(&self) -> PathBuf {
        self.pgdata.join("standby.signal")
    }

    /// `<data_dir>/stratum-cluster.json`.
    pub fn identity_file(&self) -> PathBuf {
        self.data_dir.join(IDENTITY_FILE)
    }

    /// `<data_dir>/stratum-init.incomplete`.
    pub fn incomplete_marker(&self) -> PathBuf {
        self.data_dir.join(INCOMPLETE_MARKER)
    }

    /// The rendered server configuration.
    pub fn conf_file(&self) -> PathBuf {
        self.run_dir.join("postgresql.conf")
    }

    /// The rendered `pg_hba.conf`.
    pub fn hba_file(&self) -> PathBuf {
        self.run_dir.join("pg_hba.conf")
    }

    /// The rendered `pg_ident.conf` (empty: no ident maps).
    pub fn ident_file(&self) -> PathBuf {
        self.run_dir.join("pg_ident.conf")
    }

    /// `<run_dir>/upstream.json`: the member this instance follows, as the
    /// operator last said (`follow`); ordinal 0 until then.
    pub fn upstream_file(&self) -> PathBuf {
        self.run_dir.join("upstream.json")
    }

    /// `<run_dir>/follow.pending`: the next start must first make the data
    /// directory a replica of the upstream (pg_rewind, else a re-clone).
    pub fn follow_pending(&self) -> PathBuf {
        self.run_dir.join("follow.pending")
    }

    /// The libpq password file holding the replication password.
    pub fn passfile(&self) -> PathBuf {
        self.run_dir.join("pgpass")
    }

    /// The unix socket the server listens on for `port`.
    pub fn socket(&self, port: u16) -> PathBuf {
        self.run_dir.join(format!(".s.PGSQL.{port}"))
    }

    /// Whether PGDATA holds a complete data directory (PG_VERSION and no
    /// incompleteness marker).
    pub fn is_initialised(&self) -> bool {
        self.pg_version_file().is_file() && !self.incomplete_marker().exists()
    }

    /// Remove a half-done data directory (PGDATA and the separate WAL
    /// directory). Callers make sure it is not [`Layout::is_initialised`].
    pub fn wipe(&self) -> Result<(), InstanceError> {
        process::remove_dir_if_exists(&self.pgdata)?;
        if let Some(wal) = &self.wal_dir {
            process::remove_dir_if_exists(wal)?;
        }
        Ok(())
    }

    /// The major version a data directory was created by, from PG_VERSION.
    pub fn data_version(&self) -> Result<Option<u32>, InstanceError> {
        let path = self.pg_version_file();
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok(text.trim().split('.').next().and_then(|v| v.parse().ok())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(InstanceError::io("read", path)(e)),
        }
    }
}

/// Make sure the data directory belongs to this cluster: compare its
/// identity file with `config`, or write the file on first boot. A
/// PostgreSQL data directory without an identity file was not made by
/// Stratum and is refused rather than adopted.
pub fn claim_data_dir(
    layout: &Layout,
    config: &InstanceConfig,
    owner: Option<&RunAs>,
) -> Result<(), InstanceError> {
    let foreign =
        (layout.pg_version_file().exists() && !layout.incomplete_marker().exists()).then(|| {
            format!(
                "{} holds a PostgreSQL data directory",
                layout.pgdata.display()
            )
        });
    identity::claim_volume(
        &layout.data_dir,
        &layout.identity_file(),
        config,
        owner,
        foreign,
    )
}

/// Unix socket paths are limited to 107 bytes; fail early with the reason
/// instead of letting PostgreSQL refuse to start.
pub fn check_socket_path(layout: &Layout, port: u16) -> Result<(), InstanceError> {
    let socket = layout.socket(port);
    let len = socket.as_os_str().len();
    if len > 107 {
        return Err(InstanceError::Settings(format!(
            "the unix socket path {} is {len} bytes, longer than the 107 allowed; use a shorter runDir",
            socket.display()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, Layout, InstanceConfig) {
        let dir = tempfile::tempdir().unwrap();
        let config = InstanceConfig {
            cluster: "simple-pg".into(),
            cluster_id: "uid-1".into(),
            instance: "simple-pg-0".into(),
            data_dir: dir.path().join("data"),
            run_dir: dir.path().join("run"),
            ..Default::default()
        };
        std::fs::create_dir_all(&config.data_dir).unwrap();
        let ctx = InstanceContext {
            run_dir: config.run_dir.clone(),
            config: config.clone(),
        };
        let layout = Layout::new(&ctx, &PostgresInstanceSettings::default());
        (dir, layout, config)
    }

    #[test]
    fn first_claim_writes_identity_and_other_cluster_is_refused() {
        let (_dir, layout, config) = setup();
        claim_data_dir(&layout, &config, None).unwrap();
        claim_data_dir(&layout, &config, None).unwrap();
        let other = InstanceConfig {
            cluster: "other-pg".into(),
            cluster_id: "uid-2".into(),
            ..config
        };
        let err = claim_data_dir(&layout, &other, None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("belongs to cluster simple-pg (id uid-1), this instance is cluster other-pg (id uid-2)"),
            "{err}"
        );
    }

    #[test]
    fn foreign_pgdata_without_identity_is_refused() {
        let (_dir, layout, config) = setup();
        std::fs::create_dir_all(&layout.pgdata).unwrap();
        std::fs::write(layout.pg_version_file(), "15\n").unwrap();
        let err = claim_data_dir(&layout, &config, None).unwrap_err();
        assert!(matches!(err, InstanceError::DataDirectory { .. }), "{err}");
        assert_eq!(layout.data_version().unwrap(), Some(15));
        // Our own half-done initdb is not foreign.
        std::fs::write(layout.incomplete_marker(), "initdb").unwrap();
        claim_data_dir(&layout, &config, None).unwrap();
        assert!(!layout.is_initialised());
    }

    #[test]
    fn long_socket_paths_are_refused() {
        let (_dir, mut layout, _) = setup();
        assert!(check_socket_path(&layout, 5432).is_ok());
        layout.run_dir = PathBuf::from(format!("/{}", "x".repeat(100)));
        assert!(check_socket_path(&layout, 5432).is_err());
    }
}
