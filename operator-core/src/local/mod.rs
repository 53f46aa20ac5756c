//! The local runtime: the same cluster YAML and engine code as on
//! Kubernetes, driving real database processes on this machine. Does
//! filesystem, process and network IO (child instance managers, loopback
//! TCP endpoints, HTTP to the managers).
//!
//! `stratum local up -f cluster.yaml` validates the CR exactly as far as the
//! API server and the controller would (CEL rules, transition rules against
//! the previously accepted CR, then `Engine::validate`), starts one
//! `stratum instance` manager per instance as a child process, serves two
//! stable TCP endpoints (`rw`, `ro`) that follow `Engine::route`, and keeps a
//! status snapshot that `stratum local status` prints. `stratum local down`
//! stops it; data stays for the next `up` unless `--purge` is given.
//!
//! # State directory
//!
//! ```text
//! <state-dir>/
//!   cluster.yaml            the last accepted CR, verbatim (the `old` object
//!                           of CEL transition rules on the next `up`)
//!   state.json              cluster id (random hex, generated once), listen
//!                           address, ports, pid of `up`, manager pids, and
//!                           the status snapshot rewritten every tick
//!                           (temp file + rename), and `ha`: the failover
//!                           intent (current/target primary, term, step,
//!                           events), written before each action
//!   secrets/                generated credentials: one file per key of
//!     api-token             `EngineManifest::generated_secrets` (plus
//!     <key>...              `api-token`), 32 URL-safe random characters,
//!                           mode 0600, created once and never overwritten
//!   tls/<secret>/           the engine's TLS Secret (`Engine::tls_secret`) as
//!     ca.crt tls.crt        files: generated once (a CA and a certificate
//!     tls.key               for localhost and the loopback addresses) and
//!                           never overwritten, or the user's, put there
//!                           before `up`; owned by the database user
//!   instances/<name>/
//!     data/                 the instance's data volume
//!     run/                  configuration, sockets, logs outside the data
//!     instance.json         the instance manager's `InstanceConfig`
//!     manager.log           stdout and stderr of the manager (appended)
//!   up.pid                  pid of the running `up`, flock-ed while it runs
//!   switchover.json         a pending `stratum local promote` request,
//!                           consumed by the running `up`
//!   apply.yaml              a changed CR handed to the running `up` by
//!                           `stratum local up -f` (see `apply`)
//!   haproxy/                multi-writer (Galera) clusters: haproxy.cfg,
//!                           haproxy.log, admin.sock, server-state
//! ```
//!
//! Ports (database and manager API of each instance, the `rw` and `ro`
//! endpoints) are allocated once on loopback and reused by every later `up`,
//! so connection strings stay valid. Instances removed from the spec keep
//! their data and ports; adding instances allocates ports for the new ones
//! only.
//!
//! When run as root, the database processes run as `--user` (created when
//! missing), which owns `secrets/` and each instance's `data/` and `run/`.
//!
//! # Endpoints
//!
//! `rw` forwards to the primary the decision loop recognises; when that
//! changes, or when a failover or switchover stops writes, open `rw`
//! connections are closed so that no client keeps writing to a demoted
//! node. A primary that merely stops answering for a moment keeps its
//! connections until the loop declares it failed. `ro` spreads new
//! connections round-robin over the read members and falls back to the `rw`
//! member when there are none (a one-instance cluster still serves reads on
//! `ro`). New connections wait up to a few seconds for a target, then are
//! closed.
//!
//! Multi-writer engines (`Topology.model` `MultiWriter`: Galera) use
//! another decision loop and real HAProxy endpoints instead (see the
//! `galera` and `haproxy` modules): `rw` sends writes to one Synced member
//! and HAProxy fails over to the next by its own health checks; `ro`
//! spreads reads over every Synced member. After a full crash the loop
//! bootstraps the group from the member `Engine::elect` chooses, once.

pub(crate) mod apply;
mod down;
mod galera;
pub(crate) mod ha;
mod haproxy;
mod host;
mod input;
mod ports;
mod promote;
mod proxy;
mod state;
mod status;
mod supervisor;
mod up;

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use crate::registry::EngineRegistry;

pub use ha::{HaState, Step};
pub use input::InvalidCluster;
pub use status::{Phase, StatusSnapshot};

/// Default `--state-dir`, relative to the working directory.
pub const DEFAULT_STATE_DIR: &str = ".stratum";

/// Environment variable overriding the decision-loop period in milliseconds
/// (default 500), for tests.
pub const TICK_ENV: &str = "STRATUM_LOCAL_TICK_MS";

/// `stratum local up`: run a cluster on this machine, in the foreground.
#[derive(Clone, Debug, clap::Args)]
pub struct UpArgs {
    /// The cluster manifest: one cluster object (e.g. a PostgresCluster), as
    /// given to `kubectl apply -f`. Also accepted as the only argument
    /// (`stratum local up cluster.yaml`).
    #[arg(
        short = 'f',
        long = "file",
        value_name = "PATH",
        required_unless_present = "manifest",
        conflicts_with = "manifest"
    )]
    pub file: Option<PathBuf>,

    /// The cluster manifest, given without `-f`.
    #[arg(value_name = "FILE")]
    pub manifest: Option<PathBuf>,

    /// Directory holding the cluster's data, credentials and state.
    #[arg(long, value_name = "DIR", env = "STRATUM_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,

    /// Unix user the database processes run as when `up` runs as root
    /// (created when missing).
    #[arg(long, value_name = "NAME", default_value = "stratum")]
    pub user: String,

    /// Directory of the database server binaries (PATH when unset).
    #[arg(long, value_name = "DIR")]
    pub bin_dir: Option<PathBuf>,

    /// Address the databases, the instance managers and the `rw`/`ro`
    /// endpoints listen on.
    #[arg(long, value_name = "ADDRESS", default_value_t = IpAddr::V4(Ipv4Addr::LOCALHOST))]
    pub listen: IpAddr,
}

impl UpArgs {
    /// The manifest, from `-f PATH` or the positional `FILE` (clap
    /// requires exactly one of them).
    pub fn manifest_path(&self) -> &Path {
        self.file
            .as_deref()
            .or(self.manifest.as_deref())
            .unwrap_or(Path::new("-"))
    }
}

/// Output format of `stratum local status`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// A small table.
    #[default]
    Text,
    /// One JSON object (see [`StatusSnapshot`]).
    Json,
}

/// `stratum local status`: print the phase, endpoints and instances.
#[derive(Clone, Debug, clap::Args)]
pub struct StatusArgs {
    /// Directory holding the cluster's data, credentials and state.
    #[arg(long, value_name = "DIR", env = "STRATUM_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,

    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

/// `stratum local down`: stop a running `up` (data is kept).
#[derive(Clone, Debug, clap::Args)]
pub struct DownArgs {
    /// Directory holding the cluster's data, credentials and state.
    #[arg(long, value_name = "DIR", env = "STRATUM_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,

    /// Also delete the state directory: data, credentials and all.
    #[arg(long)]
    pub purge: bool,
}

/// `stratum local promote`: a planned switchover to a replica.
#[derive(Clone, Debug, clap::Args)]
pub struct PromoteArgs {
    /// Directory holding the cluster's data, credentials and state.
    #[arg(long, value_name = "DIR", env = "STRATUM_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,

    /// The replica to promote, e.g. `simple-pg-1`.
    #[arg(value_name = "INSTANCE")]
    pub instance: String,

    /// How long to wait for the switchover, in seconds.
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
}

/// Switch the primary of the running cluster in `args.state_dir` over to
/// `args.instance`: the old primary stops cleanly, the target catches up
/// and is promoted, the others follow it. A missing instance, or one that
/// is not a ready replica, is refused before anything changes.
pub async fn promote(args: PromoteArgs) -> anyhow::Result<()> {
    promote::run(args).await
}

/// Run the cluster described by `args.file` until SIGINT or SIGTERM.
///
/// Nothing in the state directory is created or changed unless the file
/// parses, names a kind in `registry`, passes the CRD's CEL rules (with the
/// previously accepted CR as the old object) and `Engine::validate`; an
/// invalid file fails with an [`InvalidCluster`] listing every error as
/// `<file>: <field>: <message>`. Returns `Ok` after a clean shutdown.
pub async fn up(registry: &EngineRegistry, args: UpArgs) -> anyhow::Result<()> {
    up::run(registry, args).await
}

/// Print the status of the cluster in `args.state_dir` to stdout. Fails when
/// the directory holds no cluster.
pub async fn status(args: StatusArgs) -> anyhow::Result<()> {
    status::run(args)
}

/// Stop the `up` running on `args.state_dir` (SIGTERM, bounded wait), then
/// delete the directory with `--purge`. Stopping a stopped cluster
/// succeeds.
pub async fn down(args: DownArgs) -> anyhow::Result<()> {
    down::run(args).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: Cmd,
    }

    #[derive(clap::Subcommand)]
    enum Cmd {
        Up(UpArgs),
        Status(StatusArgs),
        Down(DownArgs),
        Promote(PromoteArgs),
    }

    #[test]
    fn args_parse_with_defaults() {
        let cli = Cli::try_parse_from(["x", "up", "-f", "c.yaml", "--state-dir", "/s"]).unwrap();
        let Cmd::Up(up) = cli.cmd else { panic!() };
        assert_eq!(up.manifest_path(), Path::new("c.yaml"));
        assert_eq!(up.user, "stratum");
        assert_eq!(up.listen.to_string(), "127.0.0.1");
        assert_eq!(up.bin_dir, None);

        // As in docs: the manifest as the only argument.
        let cli = Cli::try_parse_from(["x", "up", "c.yaml"]).unwrap();
        let Cmd::Up(up) = cli.cmd else { panic!() };
        assert_eq!(up.manifest_path(), Path::new("c.yaml"));
        // Neither, or both: refused by clap.
        assert!(Cli::try_parse_from(["x", "up"]).is_err());
        assert!(Cli::try_parse_from(["x", "up", "-f", "a.yaml", "b.yaml"]).is_err());

        let cli = Cli::try_parse_from(["x", "status", "--state-dir", "/s", "-o", "json"]).unwrap();
        let Cmd::Status(st) = cli.cmd else { panic!() };
        assert_eq!(st.output, OutputFormat::Json);

        let cli = Cli::try_parse_from(["x", "down", "--state-dir", "/s", "--purge"]).unwrap();
        let Cmd::Down(d) = cli.cmd else { panic!() };
        assert!(d.purge);
        assert!(Cli::try_parse_from(["x", "up", "--state-dir", "/s"]).is_err());
        let cli =
            Cli::try_parse_from(["x", "promote", "--state-dir", "/s", "simple-pg-1"]).unwrap();
        let Cmd::Promote(p) = cli.cmd else { panic!() };
        assert_eq!(p.instance, "simple-pg-1");
        assert_eq!(p.timeout, 60);
    }
}
