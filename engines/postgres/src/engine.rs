//! The PostgreSQL engine on the operator side: validation, manifests,
//! instance settings, election and routing. Pure, no IO.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use operator_core::engine::{
    Election, Engine, EngineManifest, EnginePort, ExtraVolume, Failover, InstanceDriver,
    InstanceOps, ObservedMember, OpError, Progress, ReplicationModel, Routing, Topology,
    ValidatedCluster,
};
use operator_core::error::SpecError;
use operator_core::instance::protocol::{
    ACTION_FENCE, ACTION_FOLLOW, ACTION_PROMOTE, Position, ProcessState, Role,
};
use operator_core::topology::ordinal;
use operator_core::validate::typed_cluster;

use crate::api::{PostgresCluster, PostgresClusterSpec, SyncMethod};
use crate::settings::{InitDbSettings, PostgresInstanceSettings, SyncSettings, secret_keys};

/// The client port.
pub const POSTGRES_PORT: u16 = 5432;
/// Where the data volume is mounted in the pod.
pub const DATA_MOUNT: &str = "/var/lib/postgresql/data";
/// Where the WAL volume is mounted when `walStorage` is set.
pub const WAL_MOUNT: &str = "/var/lib/postgresql/wal";
/// Name of the WAL volume (claim template and `InstanceConfig::volumes`).
pub const WAL_VOLUME: &str = "wal";
/// UID of the `postgres` user in the official image.
pub const IMAGE_UID: i64 = 999;

/// Parameters the operator sets itself; a CR that sets one is rejected.
pub const OPERATOR_OWNED_PARAMETERS: &[&str] = &[
    "listen_addresses",
    "port",
    "unix_socket_directories",
    "unix_socket_group",
    "unix_socket_permissions",
    "data_directory",
    "config_file",
    "hba_file",
    "ident_file",
    "external_pid_file",
    "cluster_name",
    "wal_level",
    "hot_standby",
    "max_wal_senders",
    "max_replication_slots",
    "wal_log_hints",
    "primary_conninfo",
    "primary_slot_name",
    "promote_trigger_file",
    "recovery_target",
    "recovery_target_lsn",
    "recovery_target_name",
    "recovery_target_time",
    "recovery_target_xid",
    "recovery_target_timeline",
    "restore_command",
    "archive_mode",
    "archive_command",
    "archive_library",
    "synchronous_standby_names",
    "ssl",
    "ssl_cert_file",
    "ssl_key_file",
    "ssl_ca_file",
    "log_destination",
    "logging_collector",
];

/// Operator defaults for the settings it owns (cluster-wide ones; the
/// instance side adds addresses, ports and paths).
fn operator_parameters(cluster: &str) -> BTreeMap<String, String> {
    [
        ("cluster_name", cluster),
        ("wal_level", "replica"),
        ("hot_standby", "on"),
        ("max_wal_senders", "10"),
        ("max_replication_slots", "10"),
        ("wal_log_hints", "on"),
        ("log_destination", "stderr"),
        ("logging_collector", "off"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// The PostgreSQL engine.
#[derive(Clone, Default)]
pub struct PostgresEngine {
    driver: Option<Arc<dyn InstanceDriver>>,
}

impl PostgresEngine {
    /// The engine without an instance side (operator only).
    pub fn new() -> Self {
        Self::default()
    }

    /// The engine with its instance side.
    pub fn with_driver(driver: Arc<dyn InstanceDriver>) -> Self {
        Self {
            driver: Some(driver),
        }
    }
}

/// Validate a typed spec beyond the schema. Pure.
pub fn check_spec(spec: &PostgresClusterSpec) -> Result<(), SpecError> {
    if spec.common.instances < 1 {
        return Err(SpecError::new(
            "spec.instances",
            format!("must be at least 1; got {}", spec.common.instances),
        ));
    }
    if !(13..=18).contains(&spec.version) {
        return Err(SpecError::new(
            "spec.version",
            format!("PostgreSQL {} is not supported; use 13 to 18", spec.version),
        ));
    }
    if let Some(pg) = &spec.postgresql {
        for name in pg.parameters.keys() {
            if OPERATOR_OWNED_PARAMETERS.contains(&name.as_str()) {
                return Err(SpecError::new(
                    format!("spec.postgresql.parameters.{name}"),
                    format!(
                        "{name} is managed by the operator and cannot be set; remove it from spec.postgresql.parameters"
                    ),
                ));
            }
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
            {
                return Err(SpecError::new(
                    format!("spec.postgresql.parameters.{name}"),
                    "parameter names are letters, digits, '_' and '.'",
                ));
            }
        }
        if let Some(sync) = &pg.synchronous {
            if sync.number >= spec.common.instances {
                return Err(SpecError::new(
                    "spec.postgresql.synchronous.number",
                    format!(
                        "must be less than spec.instances ({}); got {} (the primary cannot be its own synchronous standby)",
                        spec.common.instances, sync.number
                    ),
                ));
            }
            if let Some(min) = sync.min_sync_replicas
                && min > sync.number
            {
                return Err(SpecError::new(
                    "spec.postgresql.synchronous.minSyncReplicas",
                    format!(
                        "must not exceed synchronous.number ({}); got {min} (it is how far the number may drop while replicas are missing)",
                        sync.number
                    ),
                ));
            }
            if let Some(max) = sync.max_sync_replicas
                && max < sync.number
            {
                return Err(SpecError::new(
                    "spec.postgresql.synchronous.maxSyncReplicas",
                    format!(
                        "must be at least synchronous.number ({}); got {max}",
                        sync.number
                    ),
                ));
            }
        }
    }
    if let Some(bootstrap) = &spec.bootstrap {
        if bootstrap.initdb.is_some() && bootstrap.recovery.is_some() {
            return Err(SpecError::new(
                "spec.bootstrap",
                "set only one of bootstrap.initdb and bootstrap.recovery",
            ));
        }
        if let Some(initdb) = &bootstrap.initdb {
            for (field, value) in [("database", &initdb.database), ("owner", &initdb.owner)] {
                if !is_identifier(value) {
                    return Err(SpecError::new(
                        format!("spec.bootstrap.initdb.{field}"),
                        format!(
                            "{value:?} must be a plain SQL identifier: lower-case letters, digits and '_', starting with a letter, at most 63 characters"
                        ),
                    ));
                }
            }
            if initdb.owner == crate::settings::SUPERUSER
                || initdb.owner == crate::settings::REPLICATION_USER
            {
                return Err(SpecError::new(
                    "spec.bootstrap.initdb.owner",
                    format!(
                        "{} is reserved for the operator; choose another owner",
                        initdb.owner
                    ),
                ));
            }
        }
        if bootstrap.recovery.is_some() {
            return Err(SpecError::new(
                "spec.bootstrap.recovery",
                "recovery from a backup is not implemented yet; use bootstrap.initdb",
            ));
        }
    }
    Ok(())
}

fn is_identifier(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.as_bytes()[0].is_ascii_lowercase()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// `synchronous_standby_names` for a cluster (CloudNativePG semantics): the
/// standbys are every instance; the primary never connects as a standby so
/// listing it is harmless. Empty when asynchronous.
pub fn synchronous_standby_names(spec: &PostgresClusterSpec, instances: &[String]) -> String {
    let Some(sync) = spec
        .postgresql
        .as_ref()
        .and_then(|p| p.synchronous.as_ref())
    else {
        return String::new();
    };
    let mut names: Vec<&String> = instances.iter().collect();
    if let Some(max) = sync.max_sync_replicas {
        // One of the listed names is the primary; keep max standbys besides it.
        names.truncate((max as usize).saturating_add(1));
    }
    let list = names
        .iter()
        .map(|n| format!("\"{n}\""))
        .collect::<Vec<_>>()
        .join(",");
    let method = match sync.method {
        SyncMethod::Any => "ANY",
        SyncMethod::First => "FIRST",
    };
    format!("{method} {} ({list})", sync.number)
}

fn wal_position(m: &ObservedMember) -> Option<(u32, u64, u64)> {
    match m.status.as_ref().map(|s| &s.position) {
        Some(Position::Wal {
            timeline,
            received_lsn,
            replayed_lsn,
        }) => Some((
            *timeline,
            received_lsn.unwrap_or(0),
            replayed_lsn.unwrap_or(0),
        )),
        _ => None,
    }
}

/// Choose the primary from observed members. Pure.
///
/// - exactly one ready primary: keep it;
/// - two or more primaries: refuse to pick (the caller fences; routing
///   sends writes nowhere meanwhile);
/// - a primary that reports itself but is not ready yet: wait;
/// - no primary: promote the replica on the newest timeline with the
///   highest received LSN, then replayed LSN, then the lowest ordinal; replicas that did not report are
///   not candidates. On a new cluster (nobody has data yet) wait.
pub fn elect(members: &[ObservedMember]) -> Election {
    let primaries: Vec<&ObservedMember> = members
        .iter()
        .filter(|m| m.role() == Role::Primary)
        .collect();
    match primaries.as_slice() {
        [p] if p.ready() => {
            return Election::Keep {
                primary: p.name.clone(),
            };
        }
        [p] => {
            return Election::Wait {
                reason: format!("primary {} is not ready yet", p.name),
                retry_after: std::time::Duration::from_secs(1),
            };
        }
        [] => {}
        many => {
            return Election::NoCandidate {
                reason: format!(
                    "{} instances report themselves primary ({}); fence all but one",
                    many.len(),
                    many.iter()
                        .map(|m| m.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            };
        }
    }
    let mut candidates: Vec<(&ObservedMember, (u32, u64, u64))> = members
        .iter()
        .filter(|m| {
            m.role() == Role::Replica
                && m.status
                    .as_ref()
                    .is_some_and(|s| s.process == ProcessState::Running)
        })
        .filter_map(|m| wal_position(m).map(|p| (m, p)))
        .collect();
    if candidates.is_empty() {
        let preparing = members
            .iter()
            .filter(|m| {
                m.status.as_ref().is_some_and(|s| {
                    matches!(s.process, ProcessState::Preparing | ProcessState::Starting)
                })
            })
            .count();
        return if preparing > 0 {
            Election::Wait {
                reason: format!("{preparing} instance(s) still starting"),
                retry_after: std::time::Duration::from_secs(1),
            }
        } else {
            Election::NoCandidate {
                reason: "no primary and no running replica reported its position".into(),
            }
        };
    }
    // The newest timeline first: a stale member (an old primary started
    // as a standby) may show a higher LSN on a timeline that was abandoned.
    candidates.sort_by(|(a, pa), (b, pb)| {
        pb.0.cmp(&pa.0)
            .then(pb.1.cmp(&pa.1))
            .then(pb.2.cmp(&pa.2))
            .then(ordinal(&a.name).cmp(&ordinal(&b.name)))
    });
    let (best, (tl, received, replayed)) = candidates[0];
    Election::Promote {
        candidate: best.name.clone(),
        reason: format!(
            "most advanced replica: timeline {tl}, received {}, replayed {}",
            operator_core::instance::protocol::format_lsn(received),
            operator_core::instance::protocol::format_lsn(replayed)
        ),
    }
}

/// In synchronous mode (`number` = n of the other members), every
/// acknowledged commit is on at least n replicas, so a promotion is safe
/// only when the candidates compared include at least `replicas - n + 1`
/// of them; otherwise the unreachable ones may hold commits the candidate
/// lacks, and the election waits. Pure.
pub fn guard_synchronous(election: Election, members: &[ObservedMember], number: i32) -> Election {
    let Election::Promote { .. } = &election else {
        return election;
    };
    let standbys = members.len().saturating_sub(1);
    let need = standbys
        .saturating_sub(number.max(0) as usize)
        .saturating_add(1)
        .max(1);
    let reported = members
        .iter()
        .filter(|m| {
            m.role() == Role::Replica
                && m.status
                    .as_ref()
                    .is_some_and(|s| s.process == ProcessState::Running)
                && wal_position(m).is_some()
        })
        .count();
    if reported >= need {
        election
    } else {
        Election::Wait {
            reason: format!(
                "synchronous replication: {reported} of {standbys} replicas reported their position, {need} needed so that the promoted one holds every acknowledged commit"
            ),
            retry_after: std::time::Duration::from_millis(500),
        }
    }
}

/// Where reads and writes go. Pure. Writes go to the one ready primary, or
/// nowhere when zero or several members claim to be primary.
pub fn route(members: &[ObservedMember]) -> Routing {
    let primaries: Vec<&ObservedMember> = members
        .iter()
        .filter(|m| m.role() == Role::Primary && m.ready())
        .collect();
    let rw = match primaries.as_slice() {
        [p] => Some(p.name.clone()),
        _ => None,
    };
    let ro = members
        .iter()
        .filter(|m| m.role() == Role::Replica && m.ready())
        .map(|m| m.name.clone())
        .collect();
    Routing { rw, ro }
}

/// Failover on the operator side: the instance manager's actions (see
/// `docs/failover.md`). The controller and the local runtime drive the
/// steps themselves (leases, slots and synchronous standbys ride along);
/// this group says the engine supports them, and serves callers that need
/// only the plain steps.
#[async_trait::async_trait]
impl Failover for PostgresEngine {
    async fn fence(&self, ops: &dyn InstanceOps, instance: &str) -> Result<Progress, OpError> {
        ops.action(instance, ACTION_FENCE, serde_json::json!({}))
            .await
            .map(|_| Progress::Done)
    }

    async fn promote(&self, ops: &dyn InstanceOps, instance: &str) -> Result<Progress, OpError> {
        ops.action(instance, ACTION_PROMOTE, serde_json::json!({}))
            .await
            .map(|_| Progress::Done)
    }

    async fn rejoin(
        &self,
        ops: &dyn InstanceOps,
        instance: &str,
        primary: &str,
    ) -> Result<Progress, OpError> {
        // pg_rewind (or a re-clone) happens on the instance side when the
        // history diverged.
        ops.action(
            instance,
            ACTION_FOLLOW,
            serde_json::json!({ "primary": primary, "rewind": true }),
        )
        .await
        .map(|_| Progress::Done)
    }
}

impl Engine for PostgresEngine {
    fn kind(&self) -> &'static str {
        "PostgresCluster"
    }

    fn crd(&self) -> CustomResourceDefinition {
        PostgresCluster::crd()
    }

    fn validate(&self, object: &serde_json::Value) -> Result<ValidatedCluster, SpecError> {
        let (meta, spec, spec_json): (_, PostgresClusterSpec, _) =
            typed_cluster(self.kind(), &self.crd(), object)?;
        check_spec(&spec)?;
        let image = spec
            .common
            .image
            .clone()
            .unwrap_or_else(|| format!("postgres:{}", spec.version));
        Ok(ValidatedCluster {
            meta,
            common: spec.common.clone(),
            image,
            spec: spec_json,
        })
    }

    fn topology(&self, cluster: &ValidatedCluster, current_primary: Option<&str>) -> Topology {
        let mut update_order: Vec<String> = cluster
            .instance_names()
            .into_iter()
            .filter(|n| Some(n.as_str()) != current_primary)
            .collect();
        update_order.sort_by_key(|n| std::cmp::Reverse(ordinal(n)));
        if let Some(p) = current_primary
            && cluster.instance_names().iter().any(|n| n == p)
        {
            update_order.push(p.to_string());
        }
        Topology {
            model: ReplicationModel::PrimaryReplica,
            update_order,
            voters: Vec::new(),
        }
    }

    fn manifest(&self, cluster: &ValidatedCluster) -> EngineManifest {
        let spec: Option<PostgresClusterSpec> = cluster.engine_spec().ok();
        let version = spec.as_ref().map(|s| s.version).unwrap_or(17);
        let extra_volumes = spec
            .and_then(|s| s.wal_storage)
            .map(|storage| ExtraVolume {
                name: WAL_VOLUME.into(),
                mount_path: WAL_MOUNT.into(),
                storage,
            })
            .into_iter()
            .collect();
        EngineManifest {
            ports: vec![EnginePort {
                name: "postgresql".into(),
                port: POSTGRES_PORT,
                client: true,
            }],
            data_mount_path: DATA_MOUNT.into(),
            extra_volumes,
            run_as_user: Some(IMAGE_UID),
            bin_dir: Some(format!("/usr/lib/postgresql/{version}/bin")),
            env: BTreeMap::new(),
            generated_secrets: vec![
                secret_keys::SUPERUSER_PASSWORD.into(),
                secret_keys::REPLICATION_PASSWORD.into(),
                secret_keys::APP_PASSWORD.into(),
                secret_keys::API_TOKEN.into(),
            ],
        }
    }

    fn instance_settings(
        &self,
        cluster: &ValidatedCluster,
    ) -> Result<serde_json::Value, SpecError> {
        let spec: PostgresClusterSpec = cluster.engine_spec()?;
        let mut parameters = spec
            .postgresql
            .as_ref()
            .map(|p| p.parameters.clone())
            .unwrap_or_default();
        parameters.extend(operator_parameters(&cluster.meta.name));
        let initdb = spec
            .bootstrap
            .as_ref()
            .and_then(|b| b.initdb.clone())
            .unwrap_or_default();
        let settings = PostgresInstanceSettings {
            version: spec.version,
            parameters,
            pg_hba: spec
                .postgresql
                .as_ref()
                .map(|p| p.pg_hba.clone())
                .unwrap_or_default(),
            initdb: InitDbSettings {
                database: initdb.database,
                owner: initdb.owner,
                data_checksums: initdb.data_checksums,
                encoding: initdb.encoding,
            },
            synchronous_standby_names: synchronous_standby_names(&spec, &cluster.instance_names()),
            synchronous: spec
                .postgresql
                .as_ref()
                .and_then(|p| p.synchronous.as_ref())
                .map(|s| SyncSettings {
                    method: match s.method {
                        SyncMethod::Any => "ANY",
                        SyncMethod::First => "FIRST",
                    }
                    .into(),
                    number: s.number.max(0) as u32,
                    min_sync_replicas: s.min_sync_replicas.map(|v| v.max(0) as u32),
                    max_sync_replicas: s.max_sync_replicas.map(|v| v.max(0) as u32),
                }),
            wal_volume: spec.wal_storage.as_ref().map(|_| WAL_VOLUME.into()),
        };
        serde_json::to_value(settings).map_err(|e| SpecError::new("spec", e.to_string()))
    }

    fn elect(&self, cluster: &ValidatedCluster, members: &[ObservedMember]) -> Election {
        let election = elect(members);
        let sync = cluster
            .engine_spec::<PostgresClusterSpec>()
            .ok()
            .and_then(|s| s.postgresql)
            .and_then(|p| p.synchronous);
        match sync {
            // Commits may have waited for only minSyncReplicas standbys
            // while others were missing: the guard counts on that many.
            Some(sync) => guard_synchronous(
                election,
                members,
                sync.min_sync_replicas
                    .map_or(sync.number, |m| m.min(sync.number)),
            ),
            None => election,
        }
    }

    fn route(&self, members: &[ObservedMember]) -> Routing {
        route(members)
    }

    fn instance_driver(&self) -> Option<Arc<dyn InstanceDriver>> {
        self.driver.clone()
    }

    fn failover(&self) -> Option<&dyn Failover> {
        Some(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use operator_core::instance::protocol::MemberStatus;

    fn object(yaml: &str) -> serde_json::Value {
        serde_yaml::from_str(yaml).unwrap()
    }

    const SIMPLE: &str = r#"
apiVersion: stratum.dev/v1alpha1
kind: PostgresCluster
metadata:
  name: simple-pg
spec:
  instances: 3
  version: 15
  storage:
    size: 1Gi
  postgresql:
    parameters:
      max_connections: "50"
    synchronous:
      method: any
      number: 1
"#;

    fn with(patch: &str) -> serde_json::Value {
        let mut base = object(SIMPLE);
        let patch: serde_json::Value = object(patch);
        merge(&mut base, patch);
        base
    }

    fn merge(a: &mut serde_json::Value, b: serde_json::Value) {
        match (a, b) {
            (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
                for (k, v) in b {
                    merge(a.entry(k).or_insert(serde_json::Value::Null), v);
                }
            }
            (a, b) => *a = b,
        }
    }

    #[test]
    fn accepts_simple_cluster() {
        let c = PostgresEngine::new().validate(&object(SIMPLE)).unwrap();
        assert_eq!(c.meta.name, "simple-pg");
        assert_eq!(c.image, "postgres:15");
        assert_eq!(
            c.instance_names(),
            ["simple-pg-0", "simple-pg-1", "simple-pg-2"]
        );
        let s: PostgresInstanceSettings =
            serde_json::from_value(PostgresEngine::new().instance_settings(&c).unwrap()).unwrap();
        assert_eq!(s.parameters["max_connections"], "50");
        assert_eq!(s.parameters["wal_level"], "replica");
        assert_eq!(
            s.synchronous_standby_names,
            r#"ANY 1 ("simple-pg-0","simple-pg-1","simple-pg-2")"#
        );
        assert_eq!(s.initdb.database, "app");
    }

    #[test]
    fn rejects_bad_input_naming_the_field() {
        let cases = [
            ("spec:\n  instances: 0", "spec.instances"),
            (
                "spec:\n  postgresql:\n    parameters:\n      port: '6000'",
                "spec.postgresql.parameters.port",
            ),
            (
                "spec:\n  postgresql:\n    synchronous:\n      number: 3",
                "spec.postgresql.synchronous.number",
            ),
            (
                "spec:\n  postgresql:\n    synchronous:\n      number: 1\n      minSyncReplicas: 2",
                "spec.postgresql.synchronous.minSyncReplicas",
            ),
            ("spec:\n  storage:\n    size: lots", "spec.storage.size"),
            ("spec:\n  instances: three", "spec.instances"),
            ("spec:\n  version: 9", "spec.version"),
            (
                "spec:\n  bootstrap:\n    initdb:\n      owner: Robert'); DROP",
                "spec.bootstrap.initdb.owner",
            ),
            ("metadata:\n  name: Simple_PG", "metadata.name"),
        ];
        for (patch, field) in cases {
            let err = PostgresEngine::new().validate(&with(patch)).unwrap_err();
            assert!(
                err.field.starts_with(field),
                "patch {patch:?}: expected field {field}, got {err}"
            );
        }
    }

    fn member(name: &str, role: Role, ready: bool, received: u64, replayed: u64) -> ObservedMember {
        ObservedMember {
            name: name.into(),
            status: Some(MemberStatus {
                name: name.into(),
                role,
                ready,
                process: ProcessState::Running,
                position: Position::Wal {
                    timeline: 1,
                    received_lsn: Some(received),
                    replayed_lsn: Some(replayed),
                },
                ..Default::default()
            }),
            error: None,
        }
    }

    fn down(name: &str) -> ObservedMember {
        ObservedMember {
            name: name.into(),
            status: None,
            error: Some("connection refused".into()),
        }
    }

    #[test]
    fn election_table() {
        use Role::{Primary, Replica};
        type Check = Box<dyn Fn(&Election) -> bool>;
        fn promote(c: &'static str) -> impl Fn(&Election) -> bool {
            move |e| matches!(e, Election::Promote { candidate, .. } if candidate == c)
        }
        let cases: Vec<(&str, Vec<ObservedMember>, Check)> = vec![
            (
                "healthy primary kept",
                vec![
                    member("c-0", Primary, true, 10, 10),
                    member("c-1", Replica, true, 9, 9),
                ],
                Box::new(|e| matches!(e, Election::Keep { primary } if primary == "c-0")),
            ),
            (
                "most advanced received wins",
                vec![
                    down("c-0"),
                    member("c-1", Replica, true, 9, 9),
                    member("c-2", Replica, true, 12, 8),
                ],
                Box::new(promote("c-2")),
            ),
            (
                "replayed breaks received tie",
                vec![
                    down("c-0"),
                    member("c-1", Replica, true, 12, 9),
                    member("c-2", Replica, true, 12, 11),
                ],
                Box::new(promote("c-2")),
            ),
            (
                "full tie goes to lowest ordinal",
                vec![
                    down("c-0"),
                    member("c-10", Replica, true, 12, 12),
                    member("c-2", Replica, true, 12, 12),
                ],
                Box::new(promote("c-2")),
            ),
            (
                "unreachable replicas are not candidates",
                vec![
                    down("c-0"),
                    down("c-1"),
                    member("c-2", Replica, false, 3, 3),
                ],
                Box::new(promote("c-2")),
            ),
            (
                "newest timeline wins over a higher LSN on an abandoned one",
                vec![
                    down("c-0"),
                    {
                        let mut stale = member("c-1", Replica, true, 90, 90);
                        if let Some(Position::Wal { timeline, .. }) =
                            stale.status.as_mut().map(|s| &mut s.position)
                        {
                            *timeline = 1;
                        }
                        stale
                    },
                    {
                        let mut fresh = member("c-2", Replica, true, 50, 50);
                        if let Some(Position::Wal { timeline, .. }) =
                            fresh.status.as_mut().map(|s| &mut s.position)
                        {
                            *timeline = 2;
                        }
                        fresh
                    },
                ],
                Box::new(promote("c-2")),
            ),
            (
                "two primaries: no candidate",
                vec![
                    member("c-0", Primary, true, 10, 10),
                    member("c-1", Primary, true, 11, 11),
                ],
                Box::new(|e| matches!(e, Election::NoCandidate { .. })),
            ),
            (
                "nobody reported",
                vec![down("c-0"), down("c-1")],
                Box::new(|e| matches!(e, Election::NoCandidate { .. })),
            ),
            (
                "primary starting: wait",
                vec![
                    member("c-0", Primary, false, 1, 1),
                    member("c-1", Replica, true, 1, 1),
                ],
                Box::new(|e| matches!(e, Election::Wait { .. })),
            ),
        ];
        for (name, members, check) in cases {
            let e = elect(&members);
            assert!(check(&e), "{name}: got {e:?}");
        }
    }

    #[test]
    fn synchronous_promotion_needs_enough_reports() {
        use Role::Replica;
        let promote = Election::Promote {
            candidate: "c-1".into(),
            reason: String::new(),
        };
        // 1 of 2 standbys synchronous: one report is not enough (the other
        // may hold the only copy of a commit), two are.
        let one = [down("c-0"), member("c-1", Replica, true, 5, 5), down("c-2")];
        assert!(matches!(
            guard_synchronous(promote.clone(), &one, 1),
            Election::Wait { .. }
        ));
        let both = [
            down("c-0"),
            member("c-1", Replica, true, 5, 5),
            member("c-2", Replica, true, 4, 4),
        ];
        assert_eq!(guard_synchronous(promote.clone(), &both, 1), promote);
        // 2 of 2: every standby has every commit; one report suffices.
        assert_eq!(guard_synchronous(promote.clone(), &one, 2), promote);
    }

    #[test]
    fn routing_never_sends_writes_to_two_primaries() {
        use Role::{Primary, Replica};
        let r = route(&[
            member("c-0", Primary, true, 1, 1),
            member("c-1", Replica, true, 1, 1),
            member("c-2", Replica, false, 1, 1),
        ]);
        assert_eq!(r.rw.as_deref(), Some("c-0"));
        assert_eq!(r.ro, ["c-1"]);
        let r = route(&[
            member("c-0", Primary, true, 1, 1),
            member("c-1", Primary, true, 1, 1),
        ]);
        assert_eq!(r.rw, None);
    }

    #[test]
    fn update_order_puts_primary_last() {
        let c = PostgresEngine::new().validate(&object(SIMPLE)).unwrap();
        let t = PostgresEngine::new().topology(&c, Some("simple-pg-1"));
        assert_eq!(
            t.update_order,
            ["simple-pg-2", "simple-pg-0", "simple-pg-1"]
        );
    }

    #[test]
    fn wal_storage_becomes_an_extra_volume() {
        let c = PostgresEngine::new()
            .validate(&with("spec:\n  walStorage:\n    size: 2Gi"))
            .unwrap();
        let m = PostgresEngine::new().manifest(&c);
        assert_eq!(m.extra_volumes.len(), 1);
        assert_eq!(m.extra_volumes[0].mount_path, WAL_MOUNT);
        assert!(m.generated_secrets.contains(&"api-token".to_string()));
    }
}
