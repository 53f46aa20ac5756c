//! The PostgreSQL instance driver: what `stratum instance` does for a
//! PostgreSQL member. Filesystem IO (data and run directories), process IO
//! (initdb, pg_basebackup, postgres) and SQL to the local server.
//!
//! Layout: PGDATA is `<dataDir>/pgdata`, next to `stratum-cluster.json`
//! (which cluster the directory belongs to). Every configuration file the
//! server reads (`postgresql.conf`, `pg_hba.conf`, `pg_ident.conf`) and the
//! replication password file live in the run directory, so PGDATA's own
//! `postgresql.conf` / `postgresql.auto.conf` stay untouched (pg_rewind and
//! pg_basebackup copy them around). The server runs as
//! `postgres -D <PGDATA> -c config_file=<runDir>/postgresql.conf`.

pub mod binaries;
mod bootstrap;
pub mod conf;
mod ha;
pub mod layout;
pub mod status;

use async_trait::async_trait;
use operator_core::engine::{
    ActionReply, InstanceContext, InstanceDriver, InstanceError, Progress, ServerCommand,
    instance_name,
};
use operator_core::instance::config::{InstanceConfig, PeerEndpoint};
use operator_core::instance::process::{self, RunAs};
use operator_core::instance::protocol::{
    ACTION_DEMOTE, ACTION_FOLLOW, ACTION_PROMOTE, ACTION_RECONFIGURE, ACTION_SLOTS,
    ACTION_SYNC_STANDBYS, MemberStatus, Role,
};
use operator_core::instance::reconfigured;
use serde_json::json;

use self::binaries::BinDir;
use self::conf::{ConfInputs, Upstream};
use self::layout::Layout;
use crate::settings::{PostgresInstanceSettings, secret_keys};

/// Name of the action that runs `CHECKPOINT`.
pub const ACTION_CHECKPOINT: &str = "checkpoint";

/// The PostgreSQL [`InstanceDriver`]. Stateless: everything is read from the
/// [`InstanceContext`] on each call, so one driver may serve several
/// instances (tests, the local runtime).
#[derive(Clone, Debug, Default)]
pub struct PostgresDriver;

impl PostgresDriver {
    /// A driver. Binaries are found from the instance config's `binDir`,
    /// then `$STRATUM_POSTGRES_BIN_DIR`, then `postgres` on `PATH`, then the
    /// highest `/usr/lib/postgresql/<N>/bin`.
    pub fn new() -> Self {
        Self
    }
}

/// The engine block this manager runs with: the instance configuration's,
/// or the one the operator handed it since it started
/// ([`ACTION_RECONFIGURE`], kept in the run directory by
/// [`reconfigured::store`]).
pub fn settings(config: &InstanceConfig) -> Result<PostgresInstanceSettings, InstanceError> {
    serde_json::from_value(reconfigured::effective_engine(config))
        .map_err(|e| InstanceError::Settings(format!("engine block of the instance config: {e}")))
}

/// Parameters a hot standby needs at least as high as its primary's
/// (PostgreSQL refuses to run a standby with less).
const HOT_STANDBY_PARAMETERS: [&str; 5] = [
    "max_connections",
    "max_worker_processes",
    "max_wal_senders",
    "max_prepared_transactions",
    "max_locks_per_transaction",
];

/// The parameters whose value differs between `old` and `new` (added,
/// changed or removed). Pure.
pub fn changed_parameters(
    old: &PostgresInstanceSettings,
    new: &PostgresInstanceSettings,
) -> Vec<String> {
    let keys: std::collections::BTreeSet<&String> =
        old.parameters.keys().chain(new.parameters.keys()).collect();
    keys.into_iter()
        .filter(|k| old.parameters.get(*k) != new.parameters.get(*k))
        .cloned()
        .collect()
}

/// Of `changed`, the hot-standby parameters that `new` sets lower than the
/// server runs with (`running`: name → current setting). Pure.
pub fn lowered_hot_standby_parameters(
    changed: &[String],
    new: &PostgresInstanceSettings,
    running: &std::collections::BTreeMap<String, String>,
) -> Vec<String> {
    changed
        .iter()
        .filter(|n| HOT_STANDBY_PARAMETERS.contains(&n.as_str()))
        .filter(|n| {
            // A removed parameter goes back to PostgreSQL's default, which
            // `running` cannot tell; count it as lowered (the safe order).
            let Some(want) = new.parameters.get(*n) else {
                return true;
            };
            match (
                want.trim().parse::<i64>(),
                running.get(*n).and_then(|v| v.trim().parse::<i64>().ok()),
            ) {
                (Ok(want), Some(now)) => want < now,
                _ => true,
            }
        })
        .cloned()
        .collect()
}

/// Of the parameters a server reports waiting for a restart (`details`,
/// [`status::PENDING_RESTART_DETAIL`]: name → value it runs with), the
/// hot-standby parameters `wanted` sets lower. Pure.
pub fn lowered_pending_parameters(
    details: &serde_json::Value,
    wanted: &PostgresInstanceSettings,
) -> Vec<String> {
    let running: std::collections::BTreeMap<String, String> = details
        .get(status::PENDING_RESTART_DETAIL)
        .and_then(|v| serde_json::from_value(v.clone()).ok())
        .unwrap_or_default();
    let pending: Vec<String> = running.keys().cloned().collect();
    lowered_hot_standby_parameters(&pending, wanted, &running)
}

/// `reconfigure`: write the configuration files for the new engine block,
/// reload the server, and say whether a restart is still needed (a changed
/// parameter of context `postmaster`) and whether the primary must go first
/// (a lowered hot-standby parameter).
async fn reconfigure(
    ctx: &InstanceContext,
    layout: &Layout,
    port: u16,
    body: serde_json::Value,
) -> Result<ActionReply, InstanceError> {
    let config = &ctx.config;
    let engine = body
        .get("engine")
        .cloned()
        .ok_or_else(|| InstanceError::Settings("reconfigure needs {\"engine\": {…}}".into()))?;
    let new: PostgresInstanceSettings = serde_json::from_value(engine.clone())
        .map_err(|e| InstanceError::Settings(format!("reconfigure: engine block: {e}")))?;
    let old = settings(config)?;
    let changed = changed_parameters(&old, &new);
    let run_as = RunAs::for_config(config)?;
    reconfigured::store(config, &engine, None)?;
    let upstream = layout
        .standby_signal()
        .exists()
        .then(|| upstream_member(config, layout).map(|m| upstream_of(&m)))
        .flatten();
    write_config(ctx, &new, layout, run_as.as_ref(), upstream.as_ref())?;
    let Ok(client) = ha::local_client(ctx, layout, port).await else {
        // Not running: it starts with the new files.
        return Ok(ActionReply::done(json!({
            "reloaded": false, "restart": false, "primaryFirst": false, "changed": changed,
        })));
    };
    let sql = |what: &'static str| {
        move |e: tokio_postgres::Error| InstanceError::Command {
            command: what.into(),
            message: status::describe_error(&e),
        }
    };
    let rows = client
        .query(
            "SELECT name, context, setting FROM pg_settings WHERE name = ANY($1)",
            &[&changed],
        )
        .await
        .map_err(sql("pg_settings"))?;
    client
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .map_err(sql("pg_reload_conf"))?;
    let restart_for: Vec<String> = rows
        .iter()
        .filter(|r| r.get::<_, String>(1) == "postmaster")
        .map(|r| r.get(0))
        .collect();
    let running: std::collections::BTreeMap<String, String> =
        rows.iter().map(|r| (r.get(0), r.get(2))).collect();
    let lowered = lowered_hot_standby_parameters(&changed, &new, &running);
    tracing::info!(instance = %config.instance, ?changed, ?restart_for, ?lowered, "configuration reloaded");
    Ok(ActionReply::done(json!({
        "reloaded": true,
        "changed": changed,
        "restart": !restart_for.is_empty(),
        "restartFor": restart_for,
        "primaryFirst": !lowered.is_empty(),
        "lowered": lowered,
    })))
}

fn bin_dir(config: &InstanceConfig, version: u32) -> Result<BinDir, InstanceError> {
    binaries::resolve(
        config.bin_dir.as_deref(),
        std::env::var_os(binaries::ENV_BIN_DIR).as_deref(),
        version,
        &binaries::version_roots(std::env::var_os("STRATUM_CACHE").as_deref()),
        std::env::var_os("PATH").as_deref(),
    )
}

fn me(config: &InstanceConfig) -> Result<&PeerEndpoint, InstanceError> {
    config.me().ok_or_else(|| {
        InstanceError::Settings(format!(
            "instance {:?} is not among the members of cluster {}",
            config.instance, config.cluster
        ))
    })
}

/// The member a replica clones from and streams from: the one the operator
/// last said to follow (`upstream.json`; its endpoint as the operator gave
/// it when this manager's member list predates that member, after a
/// scale-up), ordinal 0 before any failover.
fn upstream_member(config: &InstanceConfig, layout: &Layout) -> Option<PeerEndpoint> {
    let file = ha::read_upstream_file(layout);
    let name = file
        .as_ref()
        .map(|u| u.primary.clone())
        .unwrap_or_else(|| instance_name(&config.cluster, 0));
    config
        .members
        .iter()
        .find(|m| m.name == name)
        .cloned()
        .or_else(|| file.and_then(|u| u.endpoint).filter(|e| e.name == name))
        .filter(|m| m.name != config.instance)
}

/// The member a new replica clones from: the one it was told to follow,
/// else the member that reports itself a ready primary (after a failover
/// or in a scaled-up cluster that is not always ordinal 0), else ordinal 0.
async fn clone_source(config: &InstanceConfig, layout: &Layout) -> Option<PeerEndpoint> {
    if ha::read_upstream_file(layout).is_some() {
        return upstream_member(config, layout);
    }
    if let Ok(token) = config.read_token() {
        let peers = operator_core::instance::client::InstanceClient::new(
            token,
            config.cluster_id.clone(),
            config.members.clone(),
            std::time::Duration::from_secs(2),
        );
        let primary = peers
            .observe_all()
            .await
            .into_iter()
            .find(|m| {
                m.name != config.instance
                    && m.status
                        .as_ref()
                        .is_some_and(|s| s.role == Role::Primary && s.ready)
            })
            .and_then(|m| config.members.iter().find(|e| e.name == m.name).cloned());
        if primary.is_some() {
            return primary;
        }
    }
    upstream_member(config, layout)
}

fn upstream_of(member: &PeerEndpoint) -> Upstream {
    Upstream {
        host: member.host.clone(),
        port: member.db_port,
    }
}

/// The replicas an action is about: `body.replicas` when the operator
/// names them (its member list is current; this manager's is the one it
/// started with), else every other member of the instance configuration.
fn replicas_of(
    config: &InstanceConfig,
    body: &serde_json::Value,
) -> Result<Vec<String>, InstanceError> {
    match body.get("replicas").filter(|v| !v.is_null()) {
        Some(v) => serde_json::from_value::<Vec<String>>(v.clone())
            .map(|names| {
                names
                    .into_iter()
                    .filter(|n| *n != config.instance)
                    .collect()
            })
            .map_err(|e| {
                InstanceError::Settings(format!(
                    "\"replicas\" must be a list of instance names: {e}"
                ))
            }),
        None => Ok(config
            .members
            .iter()
            .filter(|m| m.name != config.instance)
            .map(|m| m.name.clone())
            .collect()),
    }
}

/// Render and write the run directory's configuration files.
pub(crate) fn write_config(
    ctx: &InstanceContext,
    settings: &PostgresInstanceSettings,
    layout: &Layout,
    run_as: Option<&RunAs>,
    upstream: Option<&Upstream>,
) -> Result<(), InstanceError> {
    let config = &ctx.config;
    let port = me(config)?.db_port;
    let conf = conf::render_postgresql_conf(&ConfInputs {
        settings,
        cluster: &config.cluster,
        instance: &config.instance,
        listen_address: &config.listen_address,
        port,
        run_dir: &layout.run_dir,
        upstream,
    });
    process::write_file(&layout.conf_file(), conf.as_bytes(), 0o600, run_as)?;
    let hba = conf::render_pg_hba(&settings.pg_hba);
    process::write_file(&layout.hba_file(), hba.as_bytes(), 0o600, run_as)?;
    process::write_file(
        &layout.ident_file(),
        conf::render_pg_ident().as_bytes(),
        0o600,
        run_as,
    )?;
    let replication_password = config
        .read_secret(secret_keys::REPLICATION_PASSWORD)
        .map_err(InstanceError::io(
            "read secret",
            config.secrets_dir.join(secret_keys::REPLICATION_PASSWORD),
        ))?;
    let pgpass = conf::render_pgpass(&replication_password);
    process::write_file(&layout.passfile(), pgpass.as_bytes(), 0o600, run_as)
}

/// Give PGDATA (and the WAL directory) to the database user when another
/// user owns them (a volume from another image, a changed `runAsUser`):
/// PostgreSQL refuses a data directory it does not own.
fn hand_over(layout: &Layout, user: &RunAs) -> Result<(), InstanceError> {
    use std::os::unix::fs::MetadataExt;
    for dir in [Some(&layout.pgdata), layout.wal_dir.as_ref()]
        .into_iter()
        .flatten()
    {
        if let Ok(meta) = std::fs::symlink_metadata(dir)
            && meta.uid() != user.uid.as_raw()
        {
            tracing::warn!(dir = %dir.display(), user = %user.name, "data owned by uid {}; changing the owner", meta.uid());
            process::chown_tree(dir, user)?;
        }
    }
    Ok(())
}

#[async_trait]
impl InstanceDriver for PostgresDriver {
    fn check_binaries(&self, ctx: &InstanceContext) -> Result<(), InstanceError> {
        let settings = settings(&ctx.config)?;
        let bin = bin_dir(&ctx.config, settings.version)?;
        let found = binaries::major_version(&bin)?;
        binaries::check_version(&bin, found, settings.version)?;
        tracing::info!(dir = %bin.dir.display(), source = %bin.source, version = found, "PostgreSQL binaries");
        Ok(())
    }

    async fn prepare(&self, ctx: &InstanceContext) -> Result<Progress, InstanceError> {
        let config = &ctx.config;
        let settings = settings(config)?;
        if process::running_as_root() && config.run_as_user.is_none() {
            return Err(InstanceError::Settings(
                "PostgreSQL refuses to run as root: set runAsUser (e.g. postgres) in the instance configuration".into(),
            ));
        }
        if let Some(volume) = &settings.wal_volume
            && !config.volumes.contains_key(volume)
        {
            return Err(InstanceError::Settings(format!(
                "the WAL volume {volume:?} is not among the instance's volumes {:?}",
                config.volumes.keys().collect::<Vec<_>>()
            )));
        }
        let run_as = RunAs::for_config(config)?;
        let bin = bin_dir(config, settings.version)?;
        let port = me(config)?.db_port;
        let layout = Layout::new(ctx, &settings);
        layout::check_socket_path(&layout, port)?;
        layout::claim_data_dir(&layout, config, run_as.as_ref())?;

        if !layout.is_initialised() {
            let ordinal = config.ordinal().ok_or_else(|| {
                InstanceError::Settings(format!(
                    "instance name {:?} does not end in -<ordinal>",
                    config.instance
                ))
            })?;
            let boot = bootstrap::Bootstrap {
                ctx,
                settings: &settings,
                layout: &layout,
                bin: &bin,
                run_as: run_as.as_ref(),
                port,
            };
            // Ordinal 0 creates the cluster, unless it was told to follow
            // another member (its data was lost after a failover).
            if ordinal == 0 && !layout.upstream_file().exists() {
                write_config(ctx, &settings, &layout, run_as.as_ref(), None)?;
                boot.init_primary().await?;
            } else {
                let source = clone_source(config, &layout).await.ok_or_else(|| {
                    InstanceError::Settings(format!(
                        "no member {} to clone from",
                        instance_name(&config.cluster, 0)
                    ))
                })?;
                let upstream = upstream_of(&source);
                write_config(ctx, &settings, &layout, run_as.as_ref(), Some(&upstream))?;
                if let waiting @ Progress::Waiting { .. } = boot.clone_from(&source).await? {
                    return Ok(waiting);
                }
            }
        }

        if let Some(user) = &run_as {
            hand_over(&layout, user)?;
        }
        match layout.data_version()? {
            Some(v) if v == settings.version => {}
            found => {
                return Err(InstanceError::DataDirectory {
                    path: layout.pgdata.clone(),
                    reason: format!(
                        "it was created by PostgreSQL {}, this cluster runs version {} (major upgrades are not supported yet)",
                        found.map(|v| v.to_string()).unwrap_or_else(|| "?".into()),
                        settings.version
                    ),
                });
            }
        }
        if layout.standby_signal().exists()
            && !layout.follow_pending().exists()
            && let Some(line) = status::diverged(&layout.run_dir)
            && let Some(source) = upstream_member(config, &layout)
        {
            // The last run could not follow its upstream (history
            // diverged): rewind now instead of failing the same way again.
            tracing::warn!(instance = %config.instance, upstream = %source.name, "the last start could not follow the upstream; rewinding: {line}");
            process::write_file(
                &layout.follow_pending(),
                source.name.as_bytes(),
                0o600,
                None,
            )?;
        }
        if layout.follow_pending().exists() {
            let source = upstream_member(config, &layout).ok_or_else(|| {
                InstanceError::Settings("follow is pending but names no other member".into())
            })?;
            let upstream = upstream_of(&source);
            write_config(ctx, &settings, &layout, run_as.as_ref(), Some(&upstream))?;
            let boot = bootstrap::Bootstrap {
                ctx,
                settings: &settings,
                layout: &layout,
                bin: &bin,
                run_as: run_as.as_ref(),
                port,
            };
            let progress = ha::rewind(ctx, &layout, &bin, run_as.as_ref(), &source, async || {
                boot.clone_from(&source).await
            })
            .await?;
            if let waiting @ Progress::Waiting { .. } = progress {
                return Ok(waiting);
            }
            if let Some(user) = &run_as {
                hand_over(&layout, user)?;
            }
        }
        let standby = layout.standby_signal().exists();
        if standby {
            // A choice of synchronous standbys made when this instance was
            // primary is stale: start (and, promoted, begin) with the
            // spec's value until the operator chooses again.
            process::remove_file_if_exists(&layout.run_dir.join(conf::SYNCHRONOUS_CONF))?;
        }
        let upstream = standby
            .then(|| upstream_member(config, &layout).map(|m| upstream_of(&m)))
            .flatten();
        let mut settings = settings;
        if standby {
            ha::keep_control_file_minimums(
                ctx,
                &layout,
                &bin,
                run_as.as_ref(),
                &mut settings.parameters,
            )
            .await;
        }
        write_config(ctx, &settings, &layout, run_as.as_ref(), upstream.as_ref())?;
        Ok(Progress::Done)
    }

    fn server_command(&self, ctx: &InstanceContext) -> Result<ServerCommand, InstanceError> {
        let settings = settings(&ctx.config)?;
        let bin = bin_dir(&ctx.config, settings.version)?;
        let layout = Layout::new(ctx, &settings);
        Ok(ServerCommand {
            program: bin.bin("postgres"),
            args: vec![
                "-D".into(),
                layout.pgdata.display().to_string(),
                "-c".into(),
                format!("config_file={}", layout.conf_file().display()),
            ],
            env: bin.library_env(),
            stop_signal: nix::sys::signal::Signal::SIGINT as i32,
        })
    }

    async fn status(&self, ctx: &InstanceContext, running: bool) -> MemberStatus {
        let config = &ctx.config;
        let mut status = MemberStatus {
            name: config.instance.clone(),
            cluster_id: config.cluster_id.clone(),
            address: config
                .me()
                .map(|m| format!("{}:{}", m.host, m.db_port))
                .unwrap_or_default(),
            ..Default::default()
        };
        let diverged = || {
            settings(config)
                .ok()
                .and_then(|s| status::diverged(&Layout::new(ctx, &s).run_dir))
        };
        if !running {
            status.message = Some("server not running".into());
            if let Some(line) = diverged() {
                status.details = json!({ "diverged": line });
            }
            return status;
        }
        let result = async {
            let settings = settings(config).map_err(|e| e.to_string())?;
            let layout = Layout::new(ctx, &settings);
            let port = me(config).map_err(|e| e.to_string())?.db_port;
            let password = config
                .read_secret(secret_keys::SUPERUSER_PASSWORD)
                .map_err(|e| format!("cannot read the superuser password: {e}"))?;
            let client = status::connect_local(&layout, port, &password, "postgres")
                .await
                .map_err(|e| {
                    format!(
                        "cannot connect to PostgreSQL: {}",
                        status::describe_error(&e)
                    )
                })?;
            status::query(&client, layout.standby_signal().exists())
                .await
                .map_err(|e| format!("status query failed: {}", status::describe_error(&e)))
        }
        .await;
        match result {
            Ok(mut found) => {
                // A replica whose WAL receiver does not stream may be
                // unable to: say so, so that the operator rewinds it now.
                let streaming = found.details["walReceiver"]["status"] == "streaming";
                if found.role == Role::Replica
                    && !streaming
                    && let Some(line) = diverged()
                    && let Some(d) = found.details.as_object_mut()
                {
                    d.insert("diverged".into(), json!(line));
                }
                found.restart_primary_first = found.role == Role::Primary
                    && found.pending_restart
                    && settings(config)
                        .is_ok_and(|s| !lowered_pending_parameters(&found.details, &s).is_empty());
                MemberStatus {
                    name: status.name,
                    cluster_id: status.cluster_id,
                    address: status.address,
                    ..found
                }
            }
            Err(message) => {
                status.role = Role::Unknown;
                status.message = Some(message);
                if let Some(line) = diverged() {
                    status.details = json!({ "diverged": line });
                }
                status
            }
        }
    }

    async fn action(
        &self,
        ctx: &InstanceContext,
        action: &str,
        body: serde_json::Value,
    ) -> Result<Option<ActionReply>, InstanceError> {
        let config = &ctx.config;
        let settings = settings(config)?;
        let layout = Layout::new(ctx, &settings);
        let port = me(config)?.db_port;
        match action {
            ACTION_CHECKPOINT => {
                let client = ha::local_client(ctx, &layout, port).await?;
                client
                    .batch_execute("CHECKPOINT")
                    .await
                    .map_err(|e| InstanceError::Command {
                        command: "CHECKPOINT".into(),
                        message: status::describe_error(&e),
                    })?;
                Ok(Some(ActionReply::done(
                    json!({ "action": ACTION_CHECKPOINT, "done": true }),
                )))
            }
            ACTION_RECONFIGURE => reconfigure(ctx, &layout, port, body).await.map(Some),
            ACTION_PROMOTE => {
                let replicas = replicas_of(config, &body)?;
                ha::promote(ctx, &layout, port, &replicas).await.map(Some)
            }
            ACTION_FOLLOW | ACTION_DEMOTE => {
                let run_as = RunAs::for_config(config)?;
                ha::follow(ctx, &layout, port, body, |upstream| {
                    write_config(ctx, &settings, &layout, run_as.as_ref(), upstream)
                })
                .await
                .map(Some)
            }
            ACTION_SYNC_STANDBYS => {
                let available: Vec<String> = body
                    .get("available")
                    .map(|v| serde_json::from_value(v.clone()))
                    .transpose()
                    .map_err(|e| {
                        InstanceError::Settings(format!(
                            "syncStandbys needs {{\"available\": [NAME]}}: {e}"
                        ))
                    })?
                    .unwrap_or_default();
                let Some(sync) = &settings.synchronous else {
                    return Ok(Some(ActionReply::done(
                        json!({ "synchronousStandbyNames": "" }),
                    )));
                };
                // The operator names the current replicas: this manager's
                // member list is the one it started with (instances may
                // have been added or removed since).
                let replicas = replicas_of(config, &body)?;
                let names = sync.standby_names(&replicas, &available);
                let run_as = RunAs::for_config(config)?;
                let line = format!(
                    "# Written by the operator's syncStandbys action.\nsynchronous_standby_names = {}\n",
                    conf::conf_quote(&names)
                );
                process::write_file(
                    &layout.run_dir.join(conf::SYNCHRONOUS_CONF),
                    line.as_bytes(),
                    0o600,
                    run_as.as_ref(),
                )?;
                let client = ha::local_client(ctx, &layout, port).await?;
                client
                    .batch_execute("SELECT pg_reload_conf()")
                    .await
                    .map_err(|e| InstanceError::Command {
                        command: "pg_reload_conf".into(),
                        message: status::describe_error(&e),
                    })?;
                tracing::info!(instance = %config.instance, %names, "synchronous standbys chosen");
                Ok(Some(ActionReply::done(
                    json!({ "synchronousStandbyNames": names }),
                )))
            }
            ACTION_SLOTS => {
                let replicas = replicas_of(config, &body)?;
                let client = ha::local_client(ctx, &layout, port).await?;
                let slots = ha::ensure_slots(&client, &replicas).await?;
                Ok(Some(ActionReply::done(json!({ "slots": slots }))))
            }
            _ => Ok(None),
        }
    }

    fn server_pid_file(&self, data_dir: &std::path::Path) -> Option<std::path::PathBuf> {
        Some(data_dir.join(layout::PGDATA).join("postmaster.pid"))
    }

    fn needs_write_lease(&self, ctx: &InstanceContext) -> bool {
        let Ok(settings) = settings(&ctx.config) else {
            return false;
        };
        let layout = Layout::new(ctx, &settings);
        layout.is_initialised()
            && !layout.standby_signal().exists()
            && !layout.follow_pending().exists()
    }

    fn following(&self, ctx: &InstanceContext) -> Option<String> {
        let settings = settings(&ctx.config).ok()?;
        let layout = Layout::new(ctx, &settings);
        (layout.is_initialised()
            && layout.standby_signal().exists()
            && !layout.follow_pending().exists())
        .then(|| upstream_member(&ctx.config, &layout).map(|m| m.name))
        .flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(params: &[(&str, &str)]) -> PostgresInstanceSettings {
        PostgresInstanceSettings {
            parameters: params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_pending_lowered_hot_standby_parameter_is_found() {
        let details = json!({
            status::PENDING_RESTART_DETAIL: {"max_connections": "100", "shared_buffers": "2048"}
        });
        let wanted = with(&[("max_connections", "90"), ("shared_buffers", "32MB")]);
        assert_eq!(
            lowered_pending_parameters(&details, &wanted),
            ["max_connections"]
        );
        let raised = with(&[("max_connections", "150"), ("shared_buffers", "32MB")]);
        assert!(lowered_pending_parameters(&details, &raised).is_empty());
        assert!(lowered_pending_parameters(&json!({}), &wanted).is_empty());
    }

    #[test]
    fn changed_and_lowered_parameters() {
        let old = with(&[("work_mem", "4MB"), ("max_connections", "100")]);
        let new = with(&[("work_mem", "8MB"), ("max_wal_senders", "12")]);
        let changed = changed_parameters(&old, &new);
        assert_eq!(changed, ["max_connections", "max_wal_senders", "work_mem"]);
        let running: std::collections::BTreeMap<String, String> = [
            ("max_connections", "100"),
            ("max_wal_senders", "10"),
            ("work_mem", "4096"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        // max_connections removed (back to a default we cannot compare):
        // lowered; max_wal_senders raised; work_mem is no hot-standby one.
        assert_eq!(
            lowered_hot_standby_parameters(&changed, &new, &running),
            ["max_connections"]
        );
        let lower = with(&[("max_connections", "90")]);
        assert_eq!(
            lowered_hot_standby_parameters(&["max_connections".into()], &lower, &running),
            ["max_connections"]
        );
        let higher = with(&[("max_connections", "150")]);
        assert!(
            lowered_hot_standby_parameters(&["max_connections".into()], &higher, &running)
                .is_empty()
        );
    }
}
