//! The `PxcCluster` kind: shared blocks from operator-core plus the Galera
//! block. Pure data, no IO. Field names follow the Percona Operator for
//! MySQL based on Percona XtraDB Cluster (`cr.yaml`) where they overlap, so
//! users migrating from it recognise them.

use kube::{CustomResource, KubeSchema};
use operator_core::api::common::{ClusterSpecCommon, RecoverySpec};
use operator_core::api::status::ClusterStatus;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A Galera cluster of MySQL servers (Percona XtraDB Cluster or MariaDB
/// Galera): every instance can take writes; Stratum routes writes to one
/// Synced member at a time and bootstraps the group after a full crash.
#[derive(CustomResource, Clone, Debug, Deserialize, Serialize, KubeSchema, PartialEq)]
#[kube(
    group = "stratum.dev",
    version = "v1alpha1",
    kind = "PxcCluster",
    namespaced,
    status = "ClusterStatus",
    shortname = "pxc",
    category = "stratum",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.ready"}"#,
    printcolumn = r#"{"name":"Primary","type":"string","description":"The current writer","jsonPath":".status.currentPrimary"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(
    "(self.instances >= 3 && self.instances % 2 == 1) || (has(self.unsafeFlags) && has(self.unsafeFlags.pxcSize) && self.unsafeFlags.pxcSize)"
).message(
    "spec.instances must be odd and at least 3 for PxcCluster (Galera needs a quorum to survive the loss of a member); set spec.unsafeFlags.pxcSize: true to run another size"
).field_path(".instances"))]
pub struct PxcClusterSpec {
    /// Shared cluster settings.
    #[serde(flatten)]
    pub common: ClusterSpecCommon,

    /// Server distribution: `PerconaXtraDB` (Percona XtraDB Cluster, the
    /// default) or `MariaDB` (MariaDB with Galera).
    #[serde(default)]
    pub flavor: Flavor,

    /// Server version, used to pick the default image when `image` is
    /// unset: `percona/percona-xtradb-cluster:<version>` or
    /// `mariadb:<version>`. Default `8.0` for PerconaXtraDB, `10.11` for
    /// MariaDB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]+){0,2}$"), length(max = 16))]
    pub version: Option<String>,

    /// Extra server configuration in my.cnf format (like Percona's
    /// `pxc.configuration`), e.g. `[mysqld]\nmax_connections=250`. Allowed
    /// groups: the server groups (`mysqld`, `server`, `galera`, `mariadb`,
    /// `mariadbd`, `client-server` and their `-<version>` forms) and `sst`,
    /// `xtrabackup`, `mariabackup`. Options the operator owns (addresses,
    /// ports, paths, cluster membership, SST method and credentials,
    /// `server_id`, `binlog_format`, `wsrep_on`, …) are rejected with the
    /// name of the option; `!include` directives are not supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub configuration: Option<String>,

    /// The proxy in front of the cluster that sends writes to one member.
    #[serde(default)]
    pub proxy: ProxySpec,

    /// How a joining member receives a full copy of the data (State
    /// Snapshot Transfer): `xtrabackup-v2` (PerconaXtraDB only, its
    /// default), `mariabackup` (MariaDB only, its default) or `rsync`
    /// (MariaDB only; blocks the donor while it copies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sst_method: Option<SstMethod>,

    /// Encryption of the traffic between members (Galera replication,
    /// IST and SST) with certificates signed by one CA. On by default.
    #[serde(default)]
    pub tls: PxcTls,

    /// Checks that can be switched off, at your own risk.
    #[serde(default)]
    pub unsafe_flags: UnsafeFlags,

    /// How the cluster is created (`recovery` from a backup) and recovered
    /// after a full crash (`forceBootstrapFrom`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bootstrap: Option<PxcBootstrap>,
}

impl PxcClusterSpec {
    /// The server version: `spec.version` or the flavor's default.
    pub fn effective_version(&self) -> String {
        self.version
            .clone()
            .unwrap_or_else(|| self.flavor.default_version().to_string())
    }

    /// The SST method: `spec.sstMethod` or the flavor's default.
    pub fn effective_sst_method(&self) -> SstMethod {
        self.sst_method
            .unwrap_or_else(|| self.flavor.default_sst_method())
    }

    /// The database image: `spec.image` or the flavor's image for the
    /// version.
    pub fn effective_image(&self) -> String {
        self.common
            .image
            .clone()
            .unwrap_or_else(|| self.flavor.default_image(&self.effective_version()))
    }

    /// The Secret of the members' certificates when cluster traffic is
    /// encrypted: `spec.tls.secretName`, or the generated
    /// `<cluster>-ssl-internal`.
    pub fn tls_secret_name(&self, cluster: &str) -> Option<String> {
        self.tls.encrypt_cluster_traffic.then(|| {
            self.tls
                .secret_name
                .clone()
                .unwrap_or_else(|| generated_tls_secret_name(cluster))
        })
    }

    /// `spec.bootstrap.forceBootstrapFrom`, if set.
    pub fn force_bootstrap_from(&self) -> Option<&str> {
        self.bootstrap
            .as_ref()
            .and_then(|b| b.force_bootstrap_from.as_deref())
    }
}

/// Name of the TLS Secret the operator generates when
/// `spec.tls.secretName` is unset (the Percona operator's name for the
/// certificates of cluster traffic).
pub fn generated_tls_secret_name(cluster: &str) -> String {
    format!("{cluster}-ssl-internal")
}

/// Encryption of the traffic between members (Percona XtraDB Cluster's
/// `pxc-encrypt-cluster-traffic`, on by default in 8.0): Galera
/// replication and IST over TLS, and SST through an encrypted stream. Every
/// member presents the same certificate, signed by the CA in the Secret,
/// and accepts only peers signed by that CA. Changing this block on a
/// running cluster needs every member restarted with the new settings
/// (members with and without encryption, or with different CAs, cannot
/// talk to each other).
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PxcTls {
    /// Encrypt Galera replication, IST and SST between members. Default
    /// true. With false, members talk in clear text (PerconaXtraDB gets
    /// `pxc-encrypt-cluster-traffic=OFF`): only on a network nobody else
    /// can reach.
    #[serde(default = "default_true")]
    pub encrypt_cluster_traffic: bool,

    /// A Secret in the cluster's namespace with the members' certificate:
    /// `ca.crt` (the CA that signed it, which peers must be signed by),
    /// `tls.crt` and `tls.key` (PEM), the layout of a `kubernetes.io/tls`
    /// Secret such as cert-manager writes. Its certificate should name
    /// every member (`<cluster>-<n>.<cluster>-headless.<namespace>.svc`,
    /// or a wildcard `*.<cluster>-headless.<namespace>.svc`): the SST
    /// donor checks the joiner's name. Used as given; a missing key stops
    /// each instance with an error naming the Secret and the key. When
    /// unset, the operator creates `<cluster>-ssl-internal` once with a new
    /// CA and such a certificate, and never changes it (delete it to get
    /// a new one; every member then needs a restart). Locally
    /// (`stratum local up`) a Secret is the directory
    /// `<state-dir>/tls/<name>/` holding the three files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"),
        length(min = 1, max = 253)
    )]
    pub secret_name: Option<String>,
}

impl Default for PxcTls {
    fn default() -> Self {
        Self {
            encrypt_cluster_traffic: true,
            secret_name: None,
        }
    }
}

fn default_true() -> bool {
    true
}

/// Server distribution of a Galera cluster.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub enum Flavor {
    /// Percona XtraDB Cluster (`percona/percona-xtradb-cluster` images).
    #[default]
    PerconaXtraDB,
    /// MariaDB with Galera (`mariadb` images).
    MariaDB,
}

impl Flavor {
    /// The name used in the spec.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PerconaXtraDB => "PerconaXtraDB",
            Self::MariaDB => "MariaDB",
        }
    }

    /// Version used when `spec.version` is unset.
    pub fn default_version(self) -> &'static str {
        match self {
            Self::PerconaXtraDB => "8.0",
            Self::MariaDB => "10.11",
        }
    }

    /// SST method used when `spec.sstMethod` is unset.
    pub fn default_sst_method(self) -> SstMethod {
        match self {
            Self::PerconaXtraDB => SstMethod::XtrabackupV2,
            Self::MariaDB => SstMethod::Mariabackup,
        }
    }

    /// SST methods this flavor's images ship.
    pub fn supported_sst_methods(self) -> &'static [SstMethod] {
        match self {
            // PXC 8.0 removed rsync and mysqldump SST.
            Self::PerconaXtraDB => &[SstMethod::XtrabackupV2],
            Self::MariaDB => &[SstMethod::Mariabackup, SstMethod::Rsync],
        }
    }

    /// The default image for a version.
    pub fn default_image(self, version: &str) -> String {
        match self {
            Self::PerconaXtraDB => format!("percona/percona-xtradb-cluster:{version}"),
            Self::MariaDB => format!("mariadb:{version}"),
        }
    }

    /// UID (and GID) the flavor's image runs the server as.
    pub fn run_as_user(self) -> i64 {
        match self {
            Self::PerconaXtraDB => 1001,
            Self::MariaDB => 999,
        }
    }
}

/// How a joining member receives a full copy of the data (State Snapshot
/// Transfer, `wsrep_sst_method`): `xtrabackup-v2` (PerconaXtraDB only, its
/// default), `mariabackup` (MariaDB only, its default) or `rsync` (MariaDB
/// only; blocks the donor while it copies).
//
// This text is also the `spec.sstMethod` description: kube's schema
// transform for `Option<enum>` keeps the enum's description, not the
// field's.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
pub enum SstMethod {
    /// Percona XtraBackup (Percona XtraDB Cluster).
    #[serde(rename = "xtrabackup-v2")]
    XtrabackupV2,
    /// Mariabackup (MariaDB).
    #[serde(rename = "mariabackup")]
    Mariabackup,
    /// rsync of the data directory (MariaDB); the donor blocks writes while
    /// it copies.
    #[serde(rename = "rsync")]
    Rsync,
}

impl SstMethod {
    /// The `wsrep_sst_method` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::XtrabackupV2 => "xtrabackup-v2",
            Self::Mariabackup => "mariabackup",
            Self::Rsync => "rsync",
        }
    }
}

/// The proxy in front of the cluster. Locally (`stratum local up`) one
/// HAProxy serves the `rw`/`ro` endpoints whatever this says. On Kubernetes,
/// `haproxy` runs a Deployment `<cluster>-haproxy` of `instances` HAProxy
/// pods: writes go to one member at a time (the first member, in ordinal
/// order, whose instance manager reports it Synced in a Primary component;
/// the others are backups in that order), reads round robin over the
/// healthy members; the `-rw` and `-ro` Services select the HAProxy pods.
/// With `none` the Deployment is deleted and `-rw`
/// sends writes to the one member the operator labels as writer (a Synced
/// member, kept while it stays Synced), `-ro` to the other Synced members.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ProxySpec {
    /// `haproxy` (default): HAProxy pods send writes to one Synced member
    /// and reads to every Synced member; `none`: the `-rw`/`-ro` Services
    /// select the members themselves.
    #[serde(default, rename = "type")]
    pub type_: ProxyType,

    /// Number of HAProxy pods on Kubernetes (Percona's `haproxy.size`).
    /// Default 2.
    #[serde(default = "default_proxy_instances")]
    #[schemars(range(min = 0))]
    pub instances: i32,

    /// Proxy image; `haproxy:2.8` when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

impl Default for ProxySpec {
    fn default() -> Self {
        Self {
            type_: ProxyType::default(),
            instances: default_proxy_instances(),
            image: None,
        }
    }
}

fn default_proxy_instances() -> i32 {
    2
}

/// Kind of proxy.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ProxyType {
    /// HAProxy.
    #[default]
    Haproxy,
    /// No proxy.
    #[serde(rename = "none")]
    Disabled,
}

/// Checks that can be switched off (Percona's `unsafeFlags`).
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct UnsafeFlags {
    /// Allow an even number of instances, or fewer than 3. Such a cluster
    /// loses its quorum (and stops taking writes) when one member fails or
    /// is partitioned away.
    #[serde(default)]
    pub pxc_size: bool,
}

/// How the cluster is created and recovered.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PxcBootstrap {
    /// Create the cluster from a backup (point-in-time recovery).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery: Option<RecoverySpec>,

    /// After a full crash (no member running), bootstrap the group from
    /// this instance (e.g. `mydb-1`) instead of the one with the highest
    /// recovered seqno. Use it when members cannot report their positions
    /// or disagree on the cluster UUID; transactions only other members
    /// had are lost. Ignored while any member is running in the group.
    /// Must name an existing instance. Remove it once the cluster is back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub force_bootstrap_from: Option<String>,
}
