//! The Galera instance driver: what `stratum instance` does for a
//! PxcCluster member (MariaDB Galera, or Percona XtraDB Cluster). Filesystem
//! IO (data and run directories), process IO (`mariadb-install-db`,
//! `mariadbd --wsrep-recover`, the server), TCP probes of the peers' Galera
//! ports and SQL to the local server.
//!
//! Layout: the server's data directory is `<dataDir>/mysql`, next to
//! `stratum-cluster.json` (which cluster the volume belongs to; kept
//! outside the data directory because an SST replaces its content). The
//! option file, socket, pid file, the pending `bootstrap` order and the
//! last recovered position live in the run directory. The server runs as
//! `mariadbd --defaults-file=<runDir>/my.cnf [--wsrep-new-cluster]
//! [--wsrep_start_position=<uuid:seqno>]`.
//!
//! Start mode, decided by every `prepare` (see docs/engines.md):
//! 1. a pending `bootstrap` order → `safe_to_bootstrap: 1` and
//!    `--wsrep-new-cluster` (the order is consumed by that start);
//! 2. else, when another member's Galera port answers → join it, with the
//!    position recovered after an unclean stop, so that it catches up by
//!    IST instead of a full SST;
//! 3. else wait for the operator to choose the bootstrap member, showing
//!    the recovered position in status.

pub mod binaries;
pub mod conf;
pub mod reconfigure;
pub mod status;

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use mysql_async::prelude::Queryable;
use operator_core::engine::{
    ActionReply, InstanceContext, InstanceDriver, InstanceError, Progress, ServerCommand,
};
use operator_core::instance::config::{InstanceConfig, PeerEndpoint};
use operator_core::instance::identity::{self, IDENTITY_FILE};
use operator_core::instance::manager::SERVER_LOG;
use operator_core::instance::process::{self, RunAs};
use operator_core::instance::protocol::{ACTION_RECONFIGURE, MemberStatus, Position, Role};
use operator_core::instance::reconfigured;
use serde::{Deserialize, Serialize};
use serde_json::json;

use self::binaries::{Binaries, Lookup};
use self::conf::{AccountPasswords, MyCnfInputs, Network, TlsFiles};
use self::status::{GraState, Recovered};
use crate::api::Flavor;
use crate::settings::{PxcInstanceSettings, secret_keys, users};

/// The action that makes this member bootstrap a new primary component.
pub const ACTION_BOOTSTRAP: &str = "bootstrap";
/// How often `prepare` looks again while no member is reachable.
pub const WAIT_RETRY: Duration = Duration::from_millis(500);
/// How long after an unclean stop (the moment its position was recovered)
/// a member waits before it joins again: longer than `evs.inactive_timeout`
/// (PT4S, see `conf::DEFAULT_PROVIDER_OPTIONS`), so that the others have
/// evicted its previous incarnation first. Joining while they still
/// install the view without it made two view changes overlap; under load
/// their install timers expired and every member ended alone and
/// non-Primary (seen once in a full test run on 2 cores).
pub const REJOIN_AFTER_CRASH: Duration = Duration::from_secs(5);
/// Timeout of a TCP probe of a peer's Galera port.
const PROBE_TIMEOUT: Duration = Duration::from_millis(300);
/// How much of the server log is read for the last state transfer.
const LOG_TAIL_BYTES: u64 = 256 * 1024;

/// Name of the server's data directory under the data volume.
pub const DATADIR: &str = "mysql";
/// Present while the data directory is being initialised.
pub const INCOMPLETE_MARKER: &str = "stratum-init.incomplete";
/// Present until the operator's accounts are known to exist on this member.
pub const ACCOUNTS_PENDING: &str = "stratum-accounts.pending";
/// The pending `bootstrap` order (run directory).
pub const BOOTSTRAP_ORDER: &str = "bootstrap.order";
/// The start mode `prepare` chose (run directory), read by `server_command`.
pub const START_FILE: &str = "start.json";
/// The accounts SQL run by the bootstrapping start (run directory); removed
/// once the accounts are seen to exist.
pub const INIT_FILE: &str = "init.sql";
/// The last `--wsrep-recover` result (run directory).
pub const RECOVERED_FILE: &str = "recovered.json";

/// Paths of one Galera instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// The data volume.
    pub volume: PathBuf,
    /// The server's data directory (`<volume>/mysql`).
    pub datadir: PathBuf,
    /// The run directory.
    pub run_dir: PathBuf,
}

impl Layout {
    /// The layout of the instance in `ctx`.
    pub fn new(ctx: &InstanceContext) -> Self {
        Self {
            volume: ctx.config.data_dir.clone(),
            datadir: ctx.config.data_dir.join(DATADIR),
            run_dir: ctx.run_dir.clone(),
        }
    }
    /// `<runDir>/my.cnf`.
    pub fn my_cnf(&self) -> PathBuf {
        self.run_dir.join("my.cnf")
    }
    /// The server's unix socket.
    pub fn socket(&self) -> PathBuf {
        self.run_dir.join("mysqld.sock")
    }
    /// The server's pid file.
    pub fn pid_file(&self) -> PathBuf {
        self.run_dir.join("mysqld.pid")
    }
    /// `grastate.dat`.
    pub fn grastate(&self) -> PathBuf {
        self.datadir.join("grastate.dat")
    }
    /// The server log the manager writes.
    pub fn server_log(&self) -> PathBuf {
        self.run_dir.join(SERVER_LOG)
    }
    fn run(&self, name: &str) -> PathBuf {
        self.run_dir.join(name)
    }
    fn vol(&self, name: &str) -> PathBuf {
        self.volume.join(name)
    }
    /// Whether the data directory holds a complete initialisation.
    pub fn is_initialised(&self) -> bool {
        self.datadir.join("mysql").is_dir() && !self.vol(INCOMPLETE_MARKER).exists()
    }
    /// `grastate.dat`, parsed, when present.
    pub fn read_grastate(&self) -> Option<GraState> {
        std::fs::read_to_string(self.grastate())
            .ok()
            .map(|t| status::parse_grastate(&t))
    }
    /// The last recovered position, when still current: recorded after the
    /// server last wrote `grastate.dat` (a server start rewrites it, which
    /// makes an older recovery stale).
    pub fn current_recovery(&self) -> Option<Recovered> {
        let path = self.run(RECOVERED_FILE);
        let recovered_at = std::fs::metadata(&path).and_then(|m| m.modified()).ok()?;
        if let Ok(grastate_at) = std::fs::metadata(self.grastate()).and_then(|m| m.modified())
            && grastate_at > recovered_at
        {
            return None;
        }
        serde_json::from_slice(&std::fs::read(path).ok()?).ok()
    }

    /// How long ago the current recovered position was recorded.
    pub fn recovered_age(&self) -> Option<Duration> {
        let at = std::fs::metadata(self.run(RECOVERED_FILE))
            .and_then(|m| m.modified())
            .ok()?;
        Some(at.elapsed().unwrap_or_default())
    }
}

/// How the next server start runs (`start.json`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StartMode {
    /// `--wsrep-new-cluster`.
    pub new_cluster: bool,
    /// `--wsrep_start_position`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_position: Option<String>,
    /// `--init-file` with the operator's accounts.
    #[serde(default)]
    pub init_file: bool,
}

/// The Galera [`InstanceDriver`]. Stateless: everything is read from the
/// [`InstanceContext`] and the run directory, so one driver may serve
/// several instances.
#[derive(Clone, Debug, Default)]
pub struct PxcDriver;

impl PxcDriver {
    /// A driver. Binaries are found from `binDir`, then
    /// `$STRATUM_GALERA_BIN_DIR`, then `PATH`, then `/usr/sbin` and
    /// `/usr/bin`; the provider from `$STRATUM_GALERA_PROVIDER` or the
    /// distribution's location.
    pub fn new() -> Self {
        Self
    }
}

/// The engine block this manager runs with: the instance configuration's,
/// or the one the operator handed it since it started
/// ([`ACTION_RECONFIGURE`], see [`reconfigure`]).
pub fn settings(config: &InstanceConfig) -> Result<PxcInstanceSettings, InstanceError> {
    serde_json::from_value(reconfigured::effective_engine(config))
        .map_err(|e| InstanceError::Settings(format!("engine block of the instance config: {e}")))
}

fn binaries(config: &InstanceConfig, s: &PxcInstanceSettings) -> Result<Binaries, InstanceError> {
    binaries::resolve(
        &Lookup::from_env(config.bin_dir.as_deref(), s.flavor),
        s.flavor,
        s.sst_method,
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

fn port(member: &PeerEndpoint, name: &str) -> Result<u16, InstanceError> {
    member.port(name).ok_or_else(|| {
        InstanceError::Settings(format!(
            "member {} has no {name:?} port in the instance configuration (members[].ports.{name})",
            member.name
        ))
    })
}

fn secret(config: &InstanceConfig, key: &str) -> Result<String, InstanceError> {
    config.read_secret(key).map_err(InstanceError::io(
        "read secret",
        config.secrets_dir.join(key),
    ))
}

fn sst_user(flavor: Flavor) -> &'static str {
    match flavor {
        Flavor::MariaDB => users::MARIABACKUP,
        Flavor::PerconaXtraDB => users::XTRABACKUP,
    }
}

/// The TLS files of cluster traffic, when encrypted: the TLS Secret's
/// files in `tlsDir`, every one of them present. A user's Secret is
/// mounted as given, so what it lacks is named here rather than left to
/// the server or the SST script to fail on a path.
fn tls_files(
    config: &InstanceConfig,
    s: &PxcInstanceSettings,
) -> Result<Option<TlsFiles>, InstanceError> {
    let Some(t) = &s.tls else {
        return Ok(None);
    };
    let dir = config.tls_dir.as_deref().ok_or_else(|| {
        InstanceError::Settings(format!(
            "cluster traffic is encrypted with TLS Secret {} but the instance configuration has no tlsDir",
            t.secret_name
        ))
    })?;
    operator_core::tls::check_dir(dir, &t.secret_name)
        .map_err(|e| InstanceError::Settings(e.to_string()))?;
    Ok(Some(TlsFiles::in_dir(dir)))
}

/// Render and write `my.cnf` into the run directory.
fn write_my_cnf(
    ctx: &InstanceContext,
    s: &PxcInstanceSettings,
    layout: &Layout,
    bin: &Binaries,
    run_as: Option<&RunAs>,
) -> Result<(), InstanceError> {
    let config = &ctx.config;
    let me = me(config)?;
    let peers = config
        .members
        .iter()
        .map(|m| Ok(format!("{}:{}", m.host, port(m, "galera")?)))
        .collect::<Result<Vec<_>, InstanceError>>()?;
    let sst_auth = match s.flavor {
        Flavor::MariaDB => Some(format!(
            "{}:{}",
            sst_user(s.flavor),
            secret(config, s.sst_password_key())?
        )),
        // PXC 8.0 removed wsrep_sst_auth: it creates its SST user itself.
        Flavor::PerconaXtraDB => None,
    };
    let tls = tls_files(config, s)?;
    let text = conf::render_my_cnf(&MyCnfInputs {
        settings: s,
        instance: &config.instance,
        server_id: config.ordinal().unwrap_or(0) + 1,
        datadir: &layout.datadir,
        run_dir: &layout.run_dir,
        provider: &bin.provider,
        network: Network {
            listen_address: &config.listen_address,
            host: &me.host,
            db_port: me.db_port,
            galera_port: port(me, "galera")?,
            ist_port: port(me, "ist")?,
            sst_port: port(me, "sst")?,
            peers,
        },
        sst_auth,
        tls,
    });
    process::write_file(&layout.my_cnf(), text.as_bytes(), 0o600, run_as)
}

/// Make sure the volume belongs to this cluster (write the identity on
/// first boot; refuse another cluster's volume or a data directory Stratum
/// did not create).
fn claim_volume(
    layout: &Layout,
    config: &InstanceConfig,
    owner: Option<&RunAs>,
) -> Result<(), InstanceError> {
    let foreign = layout
        .is_initialised()
        .then(|| format!("{} holds a MySQL data directory", layout.datadir.display()));
    identity::claim_volume(
        &layout.volume,
        &layout.vol(IDENTITY_FILE),
        config,
        owner,
        foreign,
    )
}

/// Initialise an empty data directory (`mariadb-install-db`, or
/// `mysqld --initialize-insecure` for Percona) as the database user.
async fn initialise(
    layout: &Layout,
    s: &PxcInstanceSettings,
    bin: &Binaries,
    run_as: Option<&RunAs>,
    instance: &str,
) -> Result<(), InstanceError> {
    tracing::info!(instance, datadir = %layout.datadir.display(), "initialising a new data directory");
    let marker = layout.vol(INCOMPLETE_MARKER);
    process::write_file(&marker, b"install-db", 0o600, run_as)?;
    process::remove_dir_if_exists(&layout.datadir)?;
    let (cmd, what) = match s.flavor {
        Flavor::MariaDB => {
            let program = bin.install_db.as_ref().unwrap_or(&bin.server);
            let mut cmd = process::command(program, run_as);
            cmd.arg("--no-defaults")
                .arg(format!("--datadir={}", layout.datadir.display()))
                .arg("--auth-root-authentication-method=socket")
                .arg("--skip-test-db")
                .arg("--skip-name-resolve")
                .arg(format!("--tmpdir={}", layout.run_dir.display()));
            (cmd, "mariadb-install-db")
        }
        Flavor::PerconaXtraDB => {
            let mut cmd = process::command(&bin.server, run_as);
            cmd.arg("--no-defaults")
                .arg("--initialize-insecure")
                .arg(format!("--datadir={}", layout.datadir.display()))
                .arg(format!("--tmpdir={}", layout.run_dir.display()));
            (cmd, "mysqld --initialize-insecure")
        }
    };
    process::run_captured(cmd, what).await?;
    process::write_file(&layout.vol(ACCOUNTS_PENDING), b"", 0o600, run_as)?;
    process::remove_file_if_exists(&marker)
}

/// `--wsrep-recover`: the last committed position of a data directory
/// whose server did not stop cleanly (`grastate.dat` says seqno -1).
/// Recorded in the run directory, so waiting does not repeat it.
async fn recover(
    layout: &Layout,
    bin: &Binaries,
    run_as: Option<&RunAs>,
    instance: &str,
) -> Result<Option<Recovered>, InstanceError> {
    if let Some(found) = layout.current_recovery() {
        return Ok(Some(found));
    }
    let log = layout.run("wsrep-recover.log");
    process::remove_file_if_exists(&log)?;
    tracing::info!(
        instance,
        "recovering the last committed position (--wsrep-recover)"
    );
    let mut cmd = process::command(&bin.server, run_as);
    cmd.arg(format!("--defaults-file={}", layout.my_cnf().display()))
        .arg("--wsrep-recover")
        .arg(format!("--log-error={}", log.display()));
    let result = process::run_captured(cmd, "--wsrep-recover").await;
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    result.map_err(|e| InstanceError::Command {
        command: format!("{} --wsrep-recover", bin.server.display()),
        message: format!("{e}\n{}", process::tail_lines(&text, 15)),
    })?;
    let Some(found) = status::parse_recovered(&text) else {
        tracing::warn!(
            instance,
            "--wsrep-recover printed no position:\n{}",
            process::tail_lines(&text, 10)
        );
        return Ok(None);
    };
    let json = serde_json::to_vec(&found).expect("position serializes");
    process::write_file(&layout.run(RECOVERED_FILE), &json, 0o600, None)?;
    tracing::info!(instance, position = %found.start_position(), "recovered position");
    Ok(Some(found))
}

/// The first other member whose Galera port accepts a TCP connection.
async fn reachable_peer(config: &InstanceConfig) -> Option<String> {
    for m in config.members.iter().filter(|m| m.name != config.instance) {
        let Some(p) = m.port("galera") else { continue };
        let connect = tokio::net::TcpStream::connect((m.host.as_str(), p));
        if let Ok(Ok(_)) = tokio::time::timeout(PROBE_TIMEOUT, connect).await {
            return Some(m.name.clone());
        }
    }
    None
}

/// Give the data directory to the database user when another user owns it.
fn hand_over(layout: &Layout, user: &RunAs) -> Result<(), InstanceError> {
    use std::os::unix::fs::MetadataExt;
    if let Ok(meta) = std::fs::symlink_metadata(&layout.datadir)
        && meta.uid() != user.uid.as_raw()
    {
        tracing::warn!(dir = %layout.datadir.display(), user = %user.name, "data owned by uid {}; changing the owner", meta.uid());
        process::chown_tree(&layout.datadir, user)?;
    }
    Ok(())
}

/// Connect to the local server as the operator's account.
async fn local_conn(ctx: &InstanceContext) -> Result<mysql_async::Conn, String> {
    let layout = Layout::new(ctx);
    let password = ctx
        .config
        .read_secret(secret_keys::OPERATOR_PASSWORD)
        .map_err(|e| format!("cannot read the operator password: {e}"))?;
    status::connect(status::local_opts(
        &layout.socket(),
        users::OPERATOR,
        &password,
    ))
    .await
}

#[async_trait]
impl InstanceDriver for PxcDriver {
    fn check_binaries(&self, ctx: &InstanceContext) -> Result<(), InstanceError> {
        let s = settings(&ctx.config)?;
        let bin = binaries(&ctx.config, &s)?;
        tracing::info!(server = %bin.server.display(), provider = %bin.provider.display(), source = %bin.source, "Galera binaries");
        Ok(())
    }

    async fn prepare(&self, ctx: &InstanceContext) -> Result<Progress, InstanceError> {
        let config = &ctx.config;
        let s = settings(config)?;
        if process::running_as_root() && config.run_as_user.is_none() {
            return Err(InstanceError::Settings(format!(
                "{} must not run as root: set runAsUser (e.g. mysql) in the instance configuration",
                binaries::server_binary(s.flavor)
            )));
        }
        let run_as = RunAs::for_config(config)?;
        let bin = binaries(config, &s)?;
        let layout = Layout::new(ctx);
        claim_volume(&layout, config, run_as.as_ref())?;
        if !layout.is_initialised() {
            initialise(&layout, &s, &bin, run_as.as_ref(), &config.instance).await?;
        }
        if let Some(user) = &run_as {
            hand_over(&layout, user)?;
        }
        write_my_cnf(ctx, &s, &layout, &bin, run_as.as_ref())?;
        // The server about to start reads every setting from this my.cnf.
        process::remove_file_if_exists(&layout.run(reconfigure::RESTART_PENDING))?;

        // The position to start from after an unclean stop.
        let grastate = layout.read_grastate();
        let recovered = match &grastate {
            Some(g) if g.seqno < 0 => {
                recover(&layout, &bin, run_as.as_ref(), &config.instance).await?
            }
            _ => None,
        };
        let start_position = recovered.as_ref().map(Recovered::start_position);

        let order = layout.run(BOOTSTRAP_ORDER);
        let mode = if order.exists() {
            if grastate.is_some() {
                let text = std::fs::read_to_string(layout.grastate())
                    .map_err(InstanceError::io("read", layout.grastate()))?;
                process::write_file(
                    &layout.grastate(),
                    status::with_safe_to_bootstrap(&text).as_bytes(),
                    0o660,
                    run_as.as_ref(),
                )?;
            }
            let init_file = layout.vol(ACCOUNTS_PENDING).exists();
            if init_file {
                let pw = AccountPasswords {
                    root: secret(config, secret_keys::ROOT_PASSWORD)?,
                    operator: secret(config, secret_keys::OPERATOR_PASSWORD)?,
                    monitor: secret(config, secret_keys::MONITOR_PASSWORD)?,
                    sst: secret(config, s.sst_password_key())?,
                };
                process::write_file(
                    &layout.run(INIT_FILE),
                    conf::accounts_sql(s.flavor, &pw).as_bytes(),
                    0o600,
                    run_as.as_ref(),
                )?;
            }
            tracing::info!(instance = %config.instance, position = ?start_position, "bootstrapping a new primary component (--wsrep-new-cluster), as ordered");
            StartMode {
                new_cluster: true,
                start_position,
                init_file,
            }
        } else if let Some(peer) = reachable_peer(config).await {
            if let Some(wait) = recovered
                .as_ref()
                .and_then(|_| layout.recovered_age())
                .and_then(|age| REJOIN_AFTER_CRASH.checked_sub(age))
                .filter(|w| !w.is_zero())
            {
                return Ok(Progress::waiting(
                    format!(
                        "stopped uncleanly; waiting {} ms for the group to evict this member's previous incarnation before joining {peer}",
                        wait.as_millis()
                    ),
                    wait.min(WAIT_RETRY),
                ));
            }
            tracing::info!(instance = %config.instance, %peer, position = ?start_position, "joining the group");
            StartMode {
                new_cluster: false,
                start_position,
                init_file: false,
            }
        } else {
            let known = match status::offline_position(grastate.as_ref(), recovered.as_ref()) {
                Position::Galera {
                    cluster_uuid,
                    seqno,
                    ..
                } if cluster_uuid != crate::galera::NIL_UUID => {
                    format!(" (recovered position {cluster_uuid}:{seqno})")
                }
                _ => " (no Galera state yet)".into(),
            };
            return Ok(Progress::waiting(
                format!(
                    "no member of the group is reachable; waiting for the operator to choose the bootstrap member{known}"
                ),
                WAIT_RETRY,
            ));
        };
        let json = serde_json::to_vec(&mode).expect("start mode serializes");
        process::write_file(&layout.run(START_FILE), &json, 0o600, None)?;
        // The order is consumed by this start: a later restart joins.
        process::remove_file_if_exists(&order)?;
        Ok(Progress::Done)
    }

    fn server_command(&self, ctx: &InstanceContext) -> Result<ServerCommand, InstanceError> {
        let s = settings(&ctx.config)?;
        let bin = binaries(&ctx.config, &s)?;
        let layout = Layout::new(ctx);
        let mode: StartMode = std::fs::read(layout.run(START_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        // --defaults-file must come first.
        let mut args = vec![format!("--defaults-file={}", layout.my_cnf().display())];
        if mode.new_cluster {
            args.push("--wsrep-new-cluster".into());
        }
        if let Some(p) = &mode.start_position {
            args.push(format!("--wsrep_start_position={p}"));
        }
        if mode.init_file {
            args.push(format!("--init-file={}", layout.run(INIT_FILE).display()));
        }
        // The SST scripts run from the server's PATH: the server's own
        // directory first, then the system's.
        let path = std::env::var("PATH").unwrap_or_default();
        let mut env = std::collections::BTreeMap::new();
        env.insert(
            "PATH".to_string(),
            format!("{}:{path}:/usr/sbin:/usr/bin:/sbin:/bin", bin.dir.display()),
        );
        Ok(ServerCommand {
            program: bin.server,
            args,
            env,
            stop_signal: nix::sys::signal::Signal::SIGTERM as i32,
        })
    }

    async fn status(&self, ctx: &InstanceContext, running: bool) -> MemberStatus {
        let config = &ctx.config;
        let layout = Layout::new(ctx);
        let grastate = layout.read_grastate();
        let transfer =
            status::last_state_transfer(&status::read_tail(&layout.server_log(), LOG_TAIL_BYTES));
        let base = MemberStatus {
            name: config.instance.clone(),
            cluster_id: config.cluster_id.clone(),
            address: config
                .me()
                .map(|m| format!("{}:{}", m.host, m.db_port))
                .unwrap_or_default(),
            ..Default::default()
        };
        let mut details = json!({
            "safeToBootstrap": grastate.as_ref().map(|g| g.safe_to_bootstrap),
            "lastStateTransfer": transfer,
        });
        let offline = |message: String| {
            let mut position =
                status::offline_position(grastate.as_ref(), layout.current_recovery().as_ref());
            if running && let Position::Galera { state, .. } = &mut position {
                *state = "Starting".into();
            }
            MemberStatus {
                role: Role::Unknown,
                ready: false,
                position,
                message: Some(message),
                details: details.clone(),
                ..base.clone()
            }
        };
        if !running {
            return offline("server not running".into());
        }
        let found = async {
            let mut conn = local_conn(ctx).await?;
            let found = status::query(&mut conn).await;
            let _ = conn.disconnect().await;
            found
        }
        .await;
        match found {
            Ok(found) => {
                // The accounts exist (the operator just logged in): the
                // marker and the init file with their passwords can go.
                let _ = process::remove_file_if_exists(&layout.vol(ACCOUNTS_PENDING));
                let _ = process::remove_file_if_exists(&layout.run(INIT_FILE));
                if let (Some(obj), Some(extra)) =
                    (details.as_object_mut(), found.details.as_object())
                {
                    for (k, v) in extra {
                        obj.insert(k.clone(), v.clone());
                    }
                }
                let pending = reconfigure::pending(&layout);
                if let (Some(obj), Some(p)) = (details.as_object_mut(), &pending) {
                    obj.insert("pendingRestartFor".into(), json!(p));
                }
                MemberStatus {
                    details,
                    pending_restart: pending.is_some(),
                    ..MemberStatus {
                        name: base.name,
                        cluster_id: base.cluster_id,
                        address: base.address,
                        ..found
                    }
                }
            }
            Err(e) => offline(format!("cannot query the server: {e}")),
        }
    }

    async fn action(
        &self,
        ctx: &InstanceContext,
        action: &str,
        body: serde_json::Value,
    ) -> Result<Option<ActionReply>, InstanceError> {
        if action == ACTION_RECONFIGURE {
            return reconfigure::reconfigure(ctx, body).await.map(Some);
        }
        if action != ACTION_BOOTSTRAP {
            return Ok(None);
        }
        let layout = Layout::new(ctx);
        let name = &ctx.config.instance;
        // A running member: refuse in a Primary component, otherwise make
        // its component primary in place (a survivor after quorum loss).
        if let Ok(mut conn) = local_conn(ctx).await {
            let found = status::query(&mut conn)
                .await
                .map_err(|e| InstanceError::Command {
                    command: "SHOW GLOBAL STATUS".into(),
                    message: e,
                })?;
            if found.role == Role::Member {
                let _ = conn.disconnect().await;
                return Err(InstanceError::Refused(format!(
                    "{name} is already in a Primary component (cluster size {}); bootstrapping it would split the cluster",
                    found.details["wsrepClusterSize"]
                )));
            }
            tracing::warn!(instance = %name, "bootstrap ordered on a running non-Primary member: pc.bootstrap=YES");
            conn.query_drop("SET GLOBAL wsrep_provider_options='pc.bootstrap=YES'")
                .await
                .map_err(|e| InstanceError::Command {
                    command: "SET GLOBAL wsrep_provider_options='pc.bootstrap=YES'".into(),
                    message: e.to_string(),
                })?;
            let _ = conn.disconnect().await;
            return Ok(Some(ActionReply::done(
                json!({ "action": ACTION_BOOTSTRAP, "bootstrap": "pc.bootstrap" }),
            )));
        }
        // A server that runs but does not answer is starting or joining
        // (an SST can take minutes): an order recorded now would make its
        // next restart bootstrap a second component from whatever state it
        // has then.
        if let Some(pid) = live_server_pid(&layout) {
            return Err(InstanceError::Refused(format!(
                "{name}'s server (pid {pid}) is running but does not answer SQL yet (starting or joining); bootstrap a member whose server is down, or retry once it answers"
            )));
        }
        process::write_file(
            &layout.run(BOOTSTRAP_ORDER),
            format!("ordered at {}\n", unix_ms()).as_bytes(),
            0o600,
            None,
        )?;
        tracing::info!(instance = %name, "bootstrap ordered; the next start bootstraps a new primary component");
        Ok(Some(ActionReply::done(
            json!({ "action": ACTION_BOOTSTRAP, "bootstrap": "pending" }),
        )))
    }
}

/// The pid in the server's pid file when that process is alive.
fn live_server_pid(layout: &Layout) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(layout.pid_file())
        .ok()?
        .trim()
        .parse()
        .ok()?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None)
        .is_ok()
        .then_some(pid)
}

fn unix_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, Layout, InstanceConfig) {
        let dir = tempfile::tempdir().unwrap();
        let config = InstanceConfig {
            cluster: "simple-pxc".into(),
            cluster_id: "uid-1".into(),
            instance: "simple-pxc-0".into(),
            data_dir: dir.path().join("data"),
            run_dir: dir.path().join("run"),
            ..Default::default()
        };
        std::fs::create_dir_all(&config.data_dir).unwrap();
        std::fs::create_dir_all(&config.run_dir).unwrap();
        let ctx = InstanceContext {
            run_dir: config.run_dir.clone(),
            config: config.clone(),
        };
        (dir, Layout::new(&ctx), config)
    }

    #[test]
    fn volume_identity_is_claimed_once_and_other_clusters_refused() {
        let (_dir, layout, config) = setup();
        claim_volume(&layout, &config, None).unwrap();
        claim_volume(&layout, &config, None).unwrap();
        let other = InstanceConfig {
            cluster: "other".into(),
            cluster_id: "uid-2".into(),
            ..config
        };
        let err = claim_volume(&layout, &other, None).unwrap_err().to_string();
        assert!(
            err.contains("belongs to cluster simple-pxc (id uid-1), this instance is cluster other (id uid-2)"),
            "{err}"
        );
    }

    #[test]
    fn a_tls_secret_missing_a_key_names_the_secret_and_the_key() {
        let (dir, _, config) = setup();
        let tls = dir.path().join("tls");
        std::fs::create_dir_all(&tls).unwrap();
        std::fs::write(tls.join("ca.crt"), "ca").unwrap();
        std::fs::write(tls.join("tls.key"), "key").unwrap();
        let mut s = PxcInstanceSettings {
            flavor: Flavor::MariaDB,
            version: "10.11".into(),
            cluster_name: "simple-pxc".into(),
            sst_method: crate::api::SstMethod::Mariabackup,
            my_cnf: Default::default(),
            tls: None,
        };
        assert_eq!(tls_files(&config, &s).unwrap(), None);
        s.tls = Some(crate::settings::TlsSettings {
            secret_name: "my-certs".into(),
        });
        let err = tls_files(&config, &s).unwrap_err().to_string();
        assert!(
            err.contains("TLS Secret my-certs") && err.contains("no tlsDir"),
            "{err}"
        );
        let config = InstanceConfig {
            tls_dir: Some(tls.clone()),
            ..config
        };
        let err = tls_files(&config, &s).unwrap_err().to_string();
        assert!(
            err.contains("TLS Secret my-certs has no key tls.crt")
                && err.contains(&tls.join("tls.crt").display().to_string()),
            "{err}"
        );
        std::fs::write(tls.join("tls.crt"), "crt").unwrap();
        assert_eq!(
            tls_files(&config, &s).unwrap(),
            Some(TlsFiles::in_dir(&tls))
        );
    }

    #[test]
    fn a_foreign_data_directory_is_refused() {
        let (_dir, layout, config) = setup();
        std::fs::create_dir_all(layout.datadir.join("mysql")).unwrap();
        let err = claim_volume(&layout, &config, None).unwrap_err();
        assert!(matches!(err, InstanceError::DataDirectory { .. }), "{err}");
        assert!(err.to_string().contains("Stratum did not create"), "{err}");
    }

    #[test]
    fn a_recovery_is_stale_once_the_server_rewrote_grastate() {
        let (_dir, layout, _) = setup();
        std::fs::create_dir_all(&layout.datadir).unwrap();
        std::fs::write(layout.grastate(), "uuid: u\nseqno: -1\n").unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let found = Recovered {
            uuid: "u".into(),
            seqno: 9,
        };
        std::fs::write(
            layout.run(RECOVERED_FILE),
            serde_json::to_vec(&found).unwrap(),
        )
        .unwrap();
        assert_eq!(layout.current_recovery(), Some(found));
        // A server start rewrites grastate.dat: the recovery is history.
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(layout.grastate(), "uuid: u\nseqno: -1\n").unwrap();
        assert_eq!(layout.current_recovery(), None);
    }
}
