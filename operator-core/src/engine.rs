//! The Engine trait: what every database engine answers, and the optional
//! capability groups it may leave unsupported. Pure types; no IO here.
//!
//! Two sides use an engine:
//! - the operator side (controller and local supervisor): `validate`,
//!   `topology`, `manifest`, `instance_settings`, `elect`, `route`;
//! - the instance side (`stratum instance`): [`InstanceDriver`], which owns
//!   the data directory and the database process.
//!
//! Contracts: every pure method is deterministic and cheap (it is called on
//! every reconcile); every async method is idempotent and safe to call again
//! after a crash at any point; "waiting" is reported as
//! [`Progress::Waiting`], never as an error.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde::{Deserialize, Serialize};

use crate::api::common::{ClusterSpecCommon, PodManagementPolicy, StorageSpec};
use crate::error::SpecError;
use crate::instance::config::InstanceConfig;
use crate::instance::protocol::{MemberStatus, Role};

/// Identity of a cluster object, engine-neutral.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterMeta {
    /// CR kind, e.g. `PostgresCluster`.
    pub kind: String,
    /// `metadata.name`.
    pub name: String,
    /// `metadata.namespace` (`default` locally when unset).
    pub namespace: String,
    /// `metadata.uid` on Kubernetes; a generated id locally.
    pub uid: Option<String>,
    /// `metadata.generation`.
    pub generation: Option<i64>,
}

/// A cluster whose spec passed validation. It is the only input to the
/// manifest builders and the local planner, so nothing downstream re-checks
/// the spec.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidatedCluster {
    /// Identity.
    pub meta: ClusterMeta,
    /// The shared spec blocks.
    pub common: ClusterSpecCommon,
    /// The database image to run (spec.image or the engine default).
    pub image: String,
    /// The whole `spec` as JSON, for the engine to read its own block with
    /// [`ValidatedCluster::engine_spec`].
    pub spec: serde_json::Value,
}

impl ValidatedCluster {
    /// Deserialize the engine's typed spec. Engines call this on clusters
    /// they validated themselves, so failure is a programming error reported
    /// as a [`SpecError`] rather than a panic.
    pub fn engine_spec<T: serde::de::DeserializeOwned>(&self) -> Result<T, SpecError> {
        crate::validate::from_json(self.spec.clone(), "spec")
    }

    /// Names of the instances, `<cluster>-<ordinal>` for ordinals
    /// `0..instances` (StatefulSet naming).
    pub fn instance_names(&self) -> Vec<String> {
        (0..self.common.instances.max(0))
            .map(|i| instance_name(&self.meta.name, i as u32))
            .collect()
    }
}

/// `<cluster>-<ordinal>`: the StatefulSet pod name, used everywhere.
pub fn instance_name(cluster: &str, ordinal: u32) -> String {
    format!("{cluster}-{ordinal}")
}

/// Progress of an operation that may have to wait. Waiting is not failure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Progress {
    /// The operation is complete.
    Done,
    /// Not yet: try again after `retry_after`.
    Waiting {
        /// Shown in status and logs.
        reason: String,
        /// When to look again.
        retry_after: Duration,
    },
}

impl Progress {
    /// A waiting result.
    pub fn waiting(reason: impl Into<String>, retry_after: Duration) -> Self {
        Self::Waiting {
            reason: reason.into(),
            retry_after,
        }
    }
}

/// How the members of a cluster relate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topology {
    /// Kind of replication.
    pub model: ReplicationModel,
    /// Instance names in the order a rolling restart visits them: replicas
    /// (highest ordinal first), the primary/writer last. Built from
    /// `current_primary` when known.
    pub update_order: Vec<String>,
    /// Members that vote for quorum (Galera, MongoDB); empty when the engine
    /// has no quorum (PostgreSQL streaming replication).
    pub voters: Vec<String>,
}

/// Replication model of an engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplicationModel {
    /// One primary, streaming replicas (PostgreSQL).
    PrimaryReplica,
    /// Virtually synchronous multi-writer group (Galera); the operator
    /// routes writes to one member at a time.
    MultiWriter,
    /// Replica set with a native election (MongoDB).
    NativeElection,
}

/// A port of the database container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnginePort {
    /// Port name, e.g. `postgresql`.
    pub name: String,
    /// Container port.
    pub port: u16,
    /// Whether client traffic goes here (used for the `-rw`/`-ro` Services).
    pub client: bool,
}

/// A second persistent volume (PostgreSQL `walStorage`, a log volume).
#[derive(Clone, Debug, PartialEq)]
pub struct ExtraVolume {
    /// Volume and claim template name.
    pub name: String,
    /// Where it is mounted in the database container.
    pub mount_path: String,
    /// Size and class.
    pub storage: StorageSpec,
}

/// The engine's pieces of the pod; operator-core assembles them into the
/// StatefulSet, Services, ConfigMap and Secret.
#[derive(Clone, Debug, PartialEq)]
pub struct EngineManifest {
    /// Ports of the database server.
    pub ports: Vec<EnginePort>,
    /// Where the data volume is mounted.
    pub data_mount_path: String,
    /// Extra persistent volumes.
    pub extra_volumes: Vec<ExtraVolume>,
    /// UID/GID the database image runs as (e.g. 999 in the official
    /// postgres image); also the pod's `fsGroup`.
    pub run_as_user: Option<i64>,
    /// Directory holding the server binaries inside the image, when not on
    /// PATH.
    pub bin_dir: Option<String>,
    /// Extra environment for the instance manager.
    pub env: BTreeMap<String, String>,
    /// Keys of the generated credentials Secret (each a random password).
    pub generated_secrets: Vec<String>,
}

/// The proxy pods an engine asks for in front of its members on
/// Kubernetes (a Galera cluster's HAProxy): operator-core builds their
/// ConfigMap and Deployment and points the `-rw`/`-ro` Services at them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyPods {
    /// Number of proxy pods (at least 1).
    pub instances: i32,
    /// Image; [`crate::build::DEFAULT_PROXY_IMAGE`] when `None`.
    pub image: Option<String>,
}

/// A Secret of certificates that every instance of a cluster mounts (for
/// the traffic between members: Galera replication, IST, SST). It holds
/// `ca.crt`, `tls.crt` and `tls.key` (the `kubernetes.io/tls` layout plus
/// the CA), see [`crate::build::tls`]. On Kubernetes it is mounted at
/// [`crate::build::TLS_DIR`]; locally its files live in the state
/// directory. Either way the instance finds them in
/// [`InstanceConfig::tls_dir`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsSecret {
    /// The Secret's name.
    pub name: String,
    /// `true`: the operator generates it (a new CA and one certificate for
    /// every member's name) when absent, and never changes it afterwards.
    /// `false`: the user's Secret, used as given.
    pub generate: bool,
}

/// Decision of an election: a pure function of the observed members.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Election {
    /// The current primary is healthy: nothing to do.
    Keep {
        /// The primary.
        primary: String,
    },
    /// Promote this member (failover, or first primary).
    Promote {
        /// The chosen member.
        candidate: String,
        /// Why it was chosen, for Events.
        reason: String,
    },
    /// Nothing safe to do yet (e.g. a replica still reporting).
    Wait {
        /// Why.
        reason: String,
        /// When to look again.
        retry_after: Duration,
    },
    /// No member may safely become primary; a human must decide.
    NoCandidate {
        /// Why.
        reason: String,
    },
    /// The engine elects natively (MongoDB); the operator only observes.
    Native,
}

/// Where client traffic goes now: the `-rw`/`-ro` Services on Kubernetes,
/// the `rw`/`ro` TCP endpoints locally.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Routing {
    /// The member that takes writes, if any is fit.
    pub rw: Option<String>,
    /// Members that take reads.
    pub ro: Vec<String>,
}

/// One member as the operator sees it: the manager's report, or why there
/// is none.
#[derive(Clone, Debug, PartialEq)]
pub struct ObservedMember {
    /// Instance name.
    pub name: String,
    /// The status report, `None` when the instance manager did not answer.
    pub status: Option<MemberStatus>,
    /// Why there is no report.
    pub error: Option<String>,
}

impl ObservedMember {
    /// Role, `Unknown` when unreachable.
    pub fn role(&self) -> Role {
        self.status
            .as_ref()
            .map(|s| s.role)
            .unwrap_or(Role::Unknown)
    }

    /// Whether the member reported itself ready.
    pub fn ready(&self) -> bool {
        self.status.as_ref().is_some_and(|s| s.ready)
    }
}

/// Names of optional capabilities, as shown in `status.unsupportedCapabilities`.
pub mod capability {
    /// Automatic failover / switchover driven by the operator.
    pub const FAILOVER: &str = "failover";
    /// Users and databases from Secrets.
    pub const ACCOUNTS: &str = "accounts";
    /// Backup and restore.
    pub const BACKUPS: &str = "backups";
    /// Running instances (`stratum instance`, the local runtime).
    pub const INSTANCES: &str = "instances";
}

/// A database engine. Object safe: the controller and the local runtime
/// hold `Arc<dyn Engine>`.
#[async_trait]
pub trait Engine: Send + Sync + 'static {
    /// The cluster kind this engine serves, e.g. `PostgresCluster`.
    fn kind(&self) -> &'static str;

    /// The CustomResourceDefinition of the kind (generated from the Rust
    /// types).
    fn crd(&self) -> CustomResourceDefinition;

    /// Check a cluster object (the whole CR as JSON) beyond what the CRD
    /// schema and CEL rules enforce, and produce the validated form. Pure.
    /// Errors name the field and say what to change.
    fn validate(&self, object: &serde_json::Value) -> Result<ValidatedCluster, SpecError>;

    /// Members, roles and update order. `current_primary` is the primary as
    /// last observed, if any. Pure.
    fn topology(&self, cluster: &ValidatedCluster, current_primary: Option<&str>) -> Topology;

    /// The engine's pieces of the pod template. Pure.
    fn manifest(&self, cluster: &ValidatedCluster) -> EngineManifest;

    /// The engine block of each instance's [`InstanceConfig`]: parameters,
    /// bootstrap settings, replication settings. Pure.
    fn instance_settings(&self, cluster: &ValidatedCluster)
    -> Result<serde_json::Value, SpecError>;

    /// Decide who should be primary from the observed members. Pure;
    /// tested with tables of members.
    fn elect(&self, cluster: &ValidatedCluster, members: &[ObservedMember]) -> Election;

    /// Where reads and writes go, given the observed members. Pure.
    fn route(&self, members: &[ObservedMember]) -> Routing;

    /// The proxy pods in front of the members on Kubernetes, when the
    /// spec asks for them. Default: none (the `-rw`/`-ro` Services select
    /// the members by the operator's route label).
    fn proxy(&self, _cluster: &ValidatedCluster) -> Option<ProxyPods> {
        None
    }

    /// The TLS Secret the instances mount, when the spec asks for
    /// encrypted traffic between members. Default: none.
    fn tls_secret(&self, _cluster: &ValidatedCluster) -> Option<TlsSecret> {
        None
    }

    /// StatefulSet pod management when the spec does not choose one.
    /// Engines whose members must start together to form a quorum (Galera
    /// after a full crash, MongoDB) answer `Parallel`.
    fn default_pod_management_policy(&self) -> PodManagementPolicy {
        PodManagementPolicy::OrderedReady
    }

    /// The instance side, when this engine can run instances.
    fn instance_driver(&self) -> Option<Arc<dyn InstanceDriver>> {
        None
    }

    /// Failover, switchover, fencing and rejoin, when supported.
    fn failover(&self) -> Option<&dyn Failover> {
        None
    }

    /// Users, roles and databases from Secrets, when supported.
    fn accounts(&self) -> Option<&dyn Accounts> {
        None
    }

    /// Backup and restore, when supported.
    fn backups(&self) -> Option<&dyn Backups> {
        None
    }

    /// Names of the capability groups this engine leaves unsupported.
    fn unsupported_capabilities(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        if self.instance_driver().is_none() {
            out.push(capability::INSTANCES);
        }
        if self.failover().is_none() {
            out.push(capability::FAILOVER);
        }
        if self.accounts().is_none() {
            out.push(capability::ACCOUNTS);
        }
        if self.backups().is_none() {
            out.push(capability::BACKUPS);
        }
        out
    }
}

/// Failover and switchover, driven by the operator through the instance
/// managers. Every method is idempotent.
#[async_trait]
pub trait Failover: Send + Sync {
    /// Make sure `instance` cannot accept writes (stop it, or mark it so
    /// that its manager refuses to run it as primary).
    async fn fence(&self, ops: &dyn InstanceOps, instance: &str) -> Result<Progress, OpError>;
    /// Promote `instance` to primary.
    async fn promote(&self, ops: &dyn InstanceOps, instance: &str) -> Result<Progress, OpError>;
    /// Bring a former primary back as a replica of `primary` (pg_rewind,
    /// IST/SST, resync).
    async fn rejoin(
        &self,
        ops: &dyn InstanceOps,
        instance: &str,
        primary: &str,
    ) -> Result<Progress, OpError>;
}

/// Users and databases from Secrets.
#[async_trait]
pub trait Accounts: Send + Sync {
    /// Create or update the declared users so that they match the spec.
    async fn reconcile_accounts(
        &self,
        ops: &dyn InstanceOps,
        cluster: &ValidatedCluster,
    ) -> Result<Progress, OpError>;
}

/// Backup and restore.
#[async_trait]
pub trait Backups: Send + Sync {
    /// Methods offered, e.g. `full`, `wal`, `snapshot`.
    fn methods(&self) -> Vec<&'static str>;
    /// Start or continue a backup on `instance`.
    async fn backup(
        &self,
        ops: &dyn InstanceOps,
        instance: &str,
        backup_name: &str,
    ) -> Result<Progress, OpError>;
}

/// How the operator side reaches instance managers (HTTP on Kubernetes and
/// locally, a fake in unit tests).
#[async_trait]
pub trait InstanceOps: Send + Sync {
    /// GET the status of one instance.
    async fn status(&self, instance: &str) -> Result<MemberStatus, OpError>;
    /// POST an action (`promote`, `fence`, `demote`, …) with a JSON body.
    async fn action(
        &self,
        instance: &str,
        action: &str,
        body: serde_json::Value,
    ) -> Result<serde_json::Value, OpError>;
}

/// Failure of an operation on an instance (transient unless stated).
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    /// The instance manager did not answer.
    #[error("instance {instance} is unreachable: {message}")]
    Unreachable {
        /// Instance name.
        instance: String,
        /// Transport error.
        message: String,
    },
    /// The instance manager refused the request.
    #[error("instance {instance} refused {action}: {message}")]
    Refused {
        /// Instance name.
        instance: String,
        /// The action.
        action: String,
        /// Its explanation.
        message: String,
    },
}

/// Context of one instance, on the instance side.
#[derive(Clone, Debug)]
pub struct InstanceContext {
    /// The instance's configuration.
    pub config: InstanceConfig,
    /// Directory for files kept outside the data directory (rendered server
    /// configuration, sockets, logs, fence marker).
    pub run_dir: PathBuf,
}

/// How to run the database server in the foreground.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerCommand {
    /// Program path.
    pub program: PathBuf,
    /// Arguments.
    pub args: Vec<String>,
    /// Extra environment.
    pub env: BTreeMap<String, String>,
    /// Signal for a clean, fast stop (PostgreSQL: SIGINT, "fast" shutdown).
    pub stop_signal: i32,
}

/// Failure on the instance side.
#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    /// A binary is missing; the message says what to install.
    #[error("{binary} not found: {hint}")]
    MissingBinary {
        /// Binary name.
        binary: String,
        /// What to install, or which variable to set.
        hint: String,
    },
    /// The data directory belongs to another cluster or is unusable.
    #[error("data directory {path} cannot be used: {reason}")]
    DataDirectory {
        /// The directory.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A command failed.
    #[error("{command} failed: {message}")]
    Command {
        /// What ran.
        command: String,
        /// Its output or error.
        message: String,
    },
    /// Bad engine settings in the instance config.
    #[error("invalid instance settings: {0}")]
    Settings(String),
    /// An action refused in the instance's current state (e.g. a Galera
    /// `bootstrap` on a member already in a Primary component); the API
    /// answers 409.
    #[error("{0}")]
    Refused(String),
    /// Filesystem error.
    #[error("failed to {action} {path}: {source}")]
    Io {
        /// What was attempted.
        action: &'static str,
        /// On what.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

impl InstanceError {
    /// Wrap an IO error with what was attempted on which path.
    pub fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io {
            action,
            path,
            source,
        }
    }
}

/// The instance side of an engine: owns the data directory and the server
/// process of one instance. The generic instance manager calls it.
#[async_trait]
pub trait InstanceDriver: Send + Sync {
    /// Check that the server binaries exist; the error says what to
    /// install.
    fn check_binaries(&self, ctx: &InstanceContext) -> Result<(), InstanceError>;

    /// Make the data directory ready to start: initialise it on first boot
    /// (initdb, clone from a peer, restore), check it belongs to this
    /// cluster, write configuration outside it. Idempotent; `Waiting` when a
    /// peer it needs is not there yet.
    async fn prepare(&self, ctx: &InstanceContext) -> Result<Progress, InstanceError>;

    /// The server command to supervise.
    fn server_command(&self, ctx: &InstanceContext) -> Result<ServerCommand, InstanceError>;

    /// Query the running server (or report it down). Never fails: what
    /// cannot be read is reported in the status.
    async fn status(&self, ctx: &InstanceContext, running: bool) -> MemberStatus;

    /// Engine-specific actions (`promote`, `follow`, …) posted to the
    /// manager. Unknown actions return `Ok(None)` (404). Every action is
    /// idempotent. The manager handles `fence`, `unfence`, `lease`,
    /// `failsafe`, `revoke` and `restart` itself and never passes them here.
    async fn action(
        &self,
        _ctx: &InstanceContext,
        _action: &str,
        _body: serde_json::Value,
    ) -> Result<Option<ActionReply>, InstanceError> {
        Ok(None)
    }

    /// Whether the server, started now from the data directory as it is,
    /// would accept writes (a PostgreSQL data directory without
    /// `standby.signal`). Once this instance has been granted a write lease,
    /// the manager starts such a server only while the lease is valid, and
    /// stops it when the lease expires (see `docs/failover.md`). Engines
    /// with native elections keep the default, `false`.
    fn needs_write_lease(&self, _ctx: &InstanceContext) -> bool {
        false
    }

    /// The pid file the server keeps under the instance's data volume
    /// `data_dir` (PostgreSQL's `<data_dir>/pgdata/postmaster.pid`): its
    /// first line is the server's pid, and the server runs with the file's
    /// directory as its working directory. The local runtime, which is the
    /// host, kills that server (its process group) when a failed primary's
    /// instance manager does not answer a fence, e.g. a frozen manager (see
    /// `docs/failover.md`). `None` (the default): no such file.
    fn server_pid_file(&self, _data_dir: &std::path::Path) -> Option<std::path::PathBuf> {
        None
    }

    /// The primary this instance runs as a standby of, as its data and
    /// run directories say now (PostgreSQL: `standby.signal` present, no
    /// rewind pending, the upstream the operator last named, ordinal 0
    /// before any failover); `None` when it is not a standby or is
    /// detached. The manager acknowledges a primary's failsafe request
    /// only from a standby of that primary (see `docs/failover.md`).
    /// The default, `None`: the engine's replicas never acknowledge, so
    /// its primaries never run on failsafe.
    fn following(&self, _ctx: &InstanceContext) -> Option<String> {
        None
    }
}

/// What an [`InstanceDriver::action`] answers, and what the manager must do
/// with the server afterwards.
#[derive(Clone, Debug, PartialEq)]
pub struct ActionReply {
    /// The JSON answer.
    pub body: serde_json::Value,
    /// Follow-up by the manager before it answers.
    pub then: AfterAction,
}

impl ActionReply {
    /// An answer that needs nothing more.
    pub fn done(body: serde_json::Value) -> Self {
        Self {
            body,
            then: AfterAction::Nothing,
        }
    }
}

/// Follow-up of an action, done by the manager.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AfterAction {
    /// Nothing.
    #[default]
    Nothing,
    /// Stop the server, `prepare` again (which applies what the action
    /// recorded, e.g. a rewind) and start it.
    Restart,
    /// As `Restart`, and lift a fence first: the action made the instance
    /// safe to run (it now follows a primary).
    UnfenceAndRestart,
}
