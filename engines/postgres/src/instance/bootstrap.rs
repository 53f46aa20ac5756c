//! Creating a data directory on first boot: `initdb` plus the operator's
//! roles on the first instance, `pg_basebackup` from a peer on the others.
//! Process IO (initdb, a temporary socket-only postgres, pg_basebackup),
//! filesystem IO (PGDATA, password files) and the peer's instance API.

use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use operator_core::engine::{InstanceContext, InstanceError, InstanceOps, Progress};
use operator_core::instance::client::InstanceClient;
use operator_core::instance::config::PeerEndpoint;
use operator_core::instance::process::{self, RunAs, TempFile};
use tokio_postgres::Client;

use super::binaries::BinDir;
use super::conf::{Upstream, primary_conninfo, sql_ident, sql_literal};
use super::layout::Layout;
use super::status::{connect_local, describe_error};
use crate::settings::{PostgresInstanceSettings, REPLICATION_USER, SUPERUSER, secret_keys};

/// How long the temporary bootstrap server may take to start or stop.
const TEMP_SERVER_TIMEOUT: Duration = Duration::from_secs(60);
/// Retry delay while the clone source is not ready.
const SOURCE_RETRY: Duration = Duration::from_secs(2);
/// Retry delay after a failed clone.
const CLONE_RETRY: Duration = Duration::from_secs(5);

/// Everything the bootstrap steps need.
pub(crate) struct Bootstrap<'a> {
    pub ctx: &'a InstanceContext,
    pub settings: &'a PostgresInstanceSettings,
    pub layout: &'a Layout,
    pub bin: &'a BinDir,
    pub run_as: Option<&'a RunAs>,
    pub port: u16,
}

impl Bootstrap<'_> {
    fn secret(&self, key: &str) -> Result<String, InstanceError> {
        let config = &self.ctx.config;
        config.read_secret(key).map_err(InstanceError::io(
            "read secret",
            config.secrets_dir.join(key),
        ))
    }

    /// Start marking the data directory as half-done and clear what a
    /// previous attempt left.
    fn begin(&self, what: &str) -> Result<(), InstanceError> {
        process::write_file(
            &self.layout.incomplete_marker(),
            what.as_bytes(),
            0o600,
            None,
        )?;
        self.layout.wipe()?;
        if let Some(wal) = &self.layout.wal_dir
            && let Some(parent) = wal.parent()
        {
            if !parent.exists() {
                process::create_dir_with_mode(parent, 0o700)?;
            }
            if let Some(user) = self.run_as {
                process::chown_one(parent, user)?;
            }
        }
        Ok(())
    }

    fn finish(&self) -> Result<(), InstanceError> {
        process::remove_file_if_exists(&self.layout.incomplete_marker())
    }

    /// initdb, then create the replication role, the application owner and
    /// database with a temporary server that listens on the socket only.
    pub async fn init_primary(&self) -> Result<(), InstanceError> {
        tracing::info!(instance = %self.ctx.config.instance, "initialising a new data directory (initdb)");
        self.begin("initdb")?;
        let superuser_password = self.secret(secret_keys::SUPERUSER_PASSWORD)?;
        let pwfile = TempFile::private(
            self.layout.run_dir.join("initdb.pwfile"),
            format!("{superuser_password}\n").as_bytes(),
            self.run_as,
        )?;
        let initdb = &self.settings.initdb;
        let mut cmd = process::command(self.bin.bin("initdb"), self.run_as);
        cmd.arg("-D")
            .arg(&self.layout.pgdata)
            .arg(format!("--username={SUPERUSER}"))
            .arg(format!("--pwfile={}", pwfile.path().display()))
            .arg("--auth=scram-sha-256")
            .arg("--locale=C")
            .arg(format!(
                "--encoding={}",
                if initdb.encoding.is_empty() {
                    "UTF8"
                } else {
                    &initdb.encoding
                }
            ));
        if initdb.data_checksums {
            cmd.arg("--data-checksums");
        }
        if let Some(wal) = &self.layout.wal_dir {
            cmd.arg(format!("--waldir={}", wal.display()));
        }
        process::run_captured(cmd, "initdb").await?;
        drop(pwfile);
        self.create_roles(&superuser_password).await?;
        self.finish()
    }

    async fn create_roles(&self, superuser_password: &str) -> Result<(), InstanceError> {
        let log_path = self.layout.run_dir.join("bootstrap.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(InstanceError::io("open", &log_path))?;
        let log_err = log
            .try_clone()
            .map_err(InstanceError::io("open", &log_path))?;
        let mut cmd = process::command(self.bin.bin("postgres"), self.run_as);
        cmd.arg("-D")
            .arg(&self.layout.pgdata)
            .arg("-c")
            .arg(format!("config_file={}", self.layout.conf_file().display()))
            // Socket only, and no synchronous standby to wait for.
            .args([
                "-c",
                "listen_addresses=",
                "-c",
                "synchronous_standby_names=",
            ])
            .stdout(log)
            .stderr(log_err);
        let mut child = cmd.spawn().map_err(|e| InstanceError::Command {
            command: "postgres (bootstrap)".into(),
            message: e.to_string(),
        })?;
        let failed = |message: String| InstanceError::Command {
            command: "postgres (bootstrap)".into(),
            message: format!("{message}\n{}", log_tail(&log_path)),
        };

        let deadline = Instant::now() + TEMP_SERVER_TIMEOUT;
        let result = async {
            let client = loop {
                if let Some(exit) = child.try_wait().map_err(|e| failed(e.to_string()))? {
                    return Err(failed(format!("exited during start ({exit})")));
                }
                match connect_local(self.layout, self.port, superuser_password, "postgres").await {
                    Ok(client) => break client,
                    Err(e) if Instant::now() > deadline => {
                        return Err(failed(format!(
                            "did not accept connections within {}s: {}",
                            TEMP_SERVER_TIMEOUT.as_secs(),
                            describe_error(&e)
                        )));
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            };
            self.create_roles_sql(&client).await
        }
        .await;

        // Fast shutdown, whatever happened: a half-configured server must
        // not keep running.
        if let Some(pid) = child.id() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGINT);
        }
        let stopped = match tokio::time::timeout(TEMP_SERVER_TIMEOUT, child.wait()).await {
            Ok(Ok(exit)) if exit.success() => Ok(()),
            Ok(Ok(exit)) => Err(failed(format!("stopped with {exit}"))),
            Ok(Err(e)) => Err(failed(e.to_string())),
            Err(_) => {
                let _ = child.kill().await;
                Err(failed("did not stop in time; killed".into()))
            }
        };
        result.and(stopped)
    }

    async fn create_roles_sql(&self, client: &Client) -> Result<(), InstanceError> {
        let sql_failed = |what: &str, e: tokio_postgres::Error| InstanceError::Command {
            command: what.to_string(),
            message: describe_error(&e),
        };
        let replication_password = self.secret(secret_keys::REPLICATION_PASSWORD)?;
        client
            .batch_execute(&format!(
                "CREATE ROLE {} WITH LOGIN REPLICATION PASSWORD {}",
                sql_ident(REPLICATION_USER),
                sql_literal(&replication_password)
            ))
            .await
            .map_err(|e| sql_failed("CREATE ROLE streaming_replica", e))?;
        let initdb = &self.settings.initdb;
        let owner = if initdb.owner.is_empty() {
            SUPERUSER
        } else {
            initdb.owner.as_str()
        };
        if owner != SUPERUSER {
            let app_password = self.secret(secret_keys::APP_PASSWORD)?;
            client
                .batch_execute(&format!(
                    "CREATE ROLE {} WITH LOGIN PASSWORD {}",
                    sql_ident(owner),
                    sql_literal(&app_password)
                ))
                .await
                .map_err(|e| sql_failed("CREATE ROLE (application owner)", e))?;
        }
        if !initdb.database.is_empty() && initdb.database != "postgres" {
            client
                .batch_execute(&format!(
                    "CREATE DATABASE {} OWNER {}",
                    sql_ident(&initdb.database),
                    sql_ident(owner)
                ))
                .await
                .map_err(|e| sql_failed("CREATE DATABASE", e))?;
        }
        // The replicas' slots exist before any replica clones, so the first
        // replicas stream through them without waiting for the operator.
        let config = &self.ctx.config;
        let others: Vec<String> = config
            .members
            .iter()
            .filter(|m| m.name != config.instance)
            .map(|m| m.name.clone())
            .collect();
        super::ha::ensure_slots(client, &others).await?;
        Ok(())
    }

    /// Clone the data directory from `source` with pg_basebackup and make
    /// it a replica (`standby.signal`; `primary_conninfo` is in the run
    /// directory's configuration). Waits while `source` is not ready.
    pub async fn clone_from(&self, source: &PeerEndpoint) -> Result<Progress, InstanceError> {
        let config = &self.ctx.config;
        let token = config
            .read_token()
            .map_err(InstanceError::io("read the API token", &config.token_file))?;
        let mut members = config.members.clone();
        if !members.iter().any(|m| m.name == source.name) {
            members.push(source.clone());
        }
        let peers = InstanceClient::new(
            token,
            config.cluster_id.clone(),
            members,
            Duration::from_secs(3),
        );
        let waiting = |detail: String| {
            Progress::waiting(
                format!(
                    "waiting for {} to accept connections ({detail})",
                    source.name
                ),
                SOURCE_RETRY,
            )
        };
        match peers.status(&source.name).await {
            Ok(status) if status.ready => {}
            Ok(status) => {
                return Ok(waiting(
                    status
                        .message
                        .unwrap_or_else(|| format!("{:?}", status.process)),
                ));
            }
            Err(e) => return Ok(waiting(e.to_string())),
        }

        tracing::info!(instance = %config.instance, source = %source.name, "cloning the data directory (pg_basebackup)");
        self.begin("clone")?;
        let upstream = Upstream {
            host: source.host.clone(),
            port: source.db_port,
        };
        let mut cmd = process::command(self.bin.bin("pg_basebackup"), self.run_as);
        cmd.arg("-D")
            .arg(&self.layout.pgdata)
            .args(["-X", "stream", "-c", "fast", "--no-password"])
            .arg(format!(
                "--dbname={}",
                primary_conninfo(&upstream, &self.layout.passfile(), &config.instance)
            ));
        if let Some(wal) = &self.layout.wal_dir {
            cmd.arg(format!("--waldir={}", wal.display()));
        }
        if let Err(e) = process::run_captured(cmd, "pg_basebackup").await {
            tracing::warn!(instance = %config.instance, error = %e, "clone failed; will retry");
            self.layout.wipe()?;
            return Ok(Progress::waiting(
                format!("cloning from {} failed, retrying: {e}", source.name),
                CLONE_RETRY,
            ));
        }
        process::write_file(&self.layout.standby_signal(), b"", 0o600, self.run_as)?;
        self.finish()?;
        Ok(Progress::Done)
    }
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    format!("{}:\n{}", path.display(), process::tail_lines(&text, 15))
}
