//! High availability on the instance side: promotion, following another
//! primary (reload, or pg_rewind and a restart, else a re-clone) and the
//! replication slots a primary keeps for its replicas. Filesystem IO (the
//! run directory's `upstream.json` and `follow.pending`), process IO
//! (pg_rewind) and SQL to the local server.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use operator_core::engine::{
    ActionReply, AfterAction, InstanceContext, InstanceError, InstanceOps, Progress,
};
use operator_core::instance::client::InstanceClient;
use operator_core::instance::config::PeerEndpoint;
use operator_core::instance::process::{self, RunAs};
use operator_core::instance::protocol::Role;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio_postgres::Client;

use super::binaries::BinDir;
use super::conf::{Upstream, conninfo_quote, slot_name};
use super::layout::Layout;
use super::status::{connect_local, describe_error};
use crate::settings::{SUPERUSER, secret_keys};

/// How long a pending rewind waits for an unreachable new primary before
/// starting the server as a standby without rewinding.
const DEFER_AFTER: Duration = Duration::from_secs(15);
/// How long a promotion may take to leave recovery.
const PROMOTE_TIMEOUT: Duration = Duration::from_secs(60);

/// `upstream.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpstreamFile {
    /// The member followed.
    pub primary: String,
    /// Its endpoints as the operator gave them: a member added after this
    /// manager started is not in its member list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<PeerEndpoint>,
}

/// What `upstream.json` says, if anything.
pub fn read_upstream_file(layout: &Layout) -> Option<UpstreamFile> {
    let text = std::fs::read_to_string(layout.upstream_file()).ok()?;
    serde_json::from_str::<UpstreamFile>(&text).ok()
}

fn write_upstream(
    layout: &Layout,
    primary: &str,
    endpoint: Option<&PeerEndpoint>,
) -> Result<(), InstanceError> {
    let body = serde_json::to_vec(&UpstreamFile {
        primary: primary.to_string(),
        endpoint: endpoint.cloned(),
    })
    .unwrap_or_default();
    process::write_file(&layout.upstream_file(), &body, 0o600, None)
}

fn sql_failed(what: &str) -> impl Fn(tokio_postgres::Error) -> InstanceError + '_ {
    move |e| InstanceError::Command {
        command: what.to_string(),
        message: describe_error(&e),
    }
}

/// A superuser connection to the local server.
pub(crate) async fn local_client(
    ctx: &InstanceContext,
    layout: &Layout,
    port: u16,
) -> Result<Client, InstanceError> {
    let config = &ctx.config;
    let password = config
        .read_secret(secret_keys::SUPERUSER_PASSWORD)
        .map_err(InstanceError::io(
            "read secret",
            config.secrets_dir.join(secret_keys::SUPERUSER_PASSWORD),
        ))?;
    connect_local(layout, port, &password, "postgres")
        .await
        .map_err(sql_failed("connect to the local server"))
}

async fn in_recovery(client: &Client) -> Result<bool, InstanceError> {
    Ok(client
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .map_err(sql_failed("pg_is_in_recovery()"))?
        .get(0))
}

/// Create the slots of `replicas` that are missing; drop the other
/// Stratum slots that no replica uses (instances removed from the spec),
/// so WAL does not pile up for them. Returns the slots kept.
pub(crate) async fn ensure_slots(
    client: &Client,
    replicas: &[String],
) -> Result<Vec<String>, InstanceError> {
    let wanted: Vec<String> = replicas.iter().map(|r| slot_name(r)).collect();
    for slot in &wanted {
        client
            .execute(
                "SELECT pg_create_physical_replication_slot($1, true) \
                 WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)",
                &[slot],
            )
            .await
            .map_err(sql_failed("pg_create_physical_replication_slot"))?;
    }
    client
        .execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
             WHERE slot_name LIKE 'stratum\\_%' AND NOT active AND slot_name <> ALL($1)",
            &[&wanted],
        )
        .await
        .map_err(sql_failed("pg_drop_replication_slot"))?;
    Ok(wanted)
}

/// `promote`: leave recovery (`pg_promote`, waiting until the server is out
/// of recovery), forget the upstream, create the slots of `replicas`
/// (dropping other unused Stratum slots). Idempotent: a primary answers
/// at once.
pub(crate) async fn promote(
    ctx: &InstanceContext,
    layout: &Layout,
    port: u16,
    replicas: &[String],
) -> Result<ActionReply, InstanceError> {
    let client = local_client(ctx, layout, port).await?;
    let started = Instant::now();
    let was_replica = in_recovery(&client).await?;
    if was_replica {
        tracing::info!(instance = %ctx.config.instance, "promoting (pg_promote)");
        // Without waiting: pg_promote's own wait polls every 100 ms; the
        // loop below notices the end of recovery within 10 ms.
        let ok: bool = client
            .query_one("SELECT pg_promote(false)", &[])
            .await
            .map_err(sql_failed("pg_promote"))?
            .get(0);
        while in_recovery(&client).await? {
            if !ok || started.elapsed() > PROMOTE_TIMEOUT {
                return Err(InstanceError::Command {
                    command: "pg_promote".into(),
                    message: format!("still in recovery after {}s", started.elapsed().as_secs()),
                });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    process::remove_file_if_exists(&layout.upstream_file())?;
    process::remove_file_if_exists(&layout.follow_pending())?;
    let slots = ensure_slots(&client, replicas).await?;
    let timeline: Option<i32> = client
        .query_one(
            "SELECT ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int",
            &[],
        )
        .await
        .ok()
        .map(|r| r.get(0));
    Ok(ActionReply::done(json!({
        "promoted": was_replica,
        "role": Role::Primary.as_str(),
        "timeline": timeline,
        "slots": slots,
        "tookMs": started.elapsed().as_millis() as u64,
    })))
}

/// The body of `follow` / `demote`.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct FollowRequest {
    /// The member to stream from; `null` detaches the replica (it stays in
    /// recovery, streaming from nobody) so that a primary the operator
    /// cannot reach loses its synchronous standbys before a failover.
    primary: Option<String>,
    /// Restart through pg_rewind even if the server runs as a replica
    /// (its timeline diverged from the new primary's).
    #[serde(default)]
    rewind: bool,
    /// The primary's endpoints, for a primary added after this manager
    /// started (not in its member list).
    #[serde(default)]
    endpoint: Option<PeerEndpoint>,
}

/// `follow {primary}` / `demote {primary}`: stream from `primary`. A
/// running replica is repointed with a reload (primary_conninfo and
/// primary_slot_name are reloadable); anything else (a primary, a stopped
/// or fenced server, `rewind: true`) is marked `follow.pending` and
/// restarted: the next `prepare` rewinds it against `primary` (a re-clone
/// when rewind is impossible) and it starts as a standby. Lifts a fence:
/// a standby cannot accept writes.
pub(crate) async fn follow(
    ctx: &InstanceContext,
    layout: &Layout,
    port: u16,
    body: serde_json::Value,
    rewrite_config: impl FnOnce(Option<&Upstream>) -> Result<(), InstanceError>,
) -> Result<ActionReply, InstanceError> {
    let req: FollowRequest = serde_json::from_value(body)
        .map_err(|e| InstanceError::Settings(format!("follow needs {{\"primary\": NAME}}: {e}")))?;
    let config = &ctx.config;
    let Some(primary) = req.primary else {
        write_upstream(layout, "", None)?;
        if let Ok(client) = local_client(ctx, layout, port).await
            && in_recovery(&client).await.unwrap_or(false)
        {
            rewrite_config(None)?;
            client
                .batch_execute("SELECT pg_reload_conf()")
                .await
                .map_err(sql_failed("pg_reload_conf"))?;
        }
        tracing::info!(instance = %config.instance, "detached from the primary");
        return Ok(ActionReply::done(json!({ "following": null })));
    };
    let primary_name = primary;
    if primary_name == config.instance {
        return Err(InstanceError::Settings(format!(
            "{primary_name} cannot follow itself"
        )));
    }
    let known = config.members.iter().find(|m| m.name == primary_name);
    let given = req.endpoint.as_ref().filter(|e| e.name == primary_name);
    let Some(member) = known.or(given) else {
        return Err(InstanceError::Settings(format!(
            "{primary_name} is not a member of cluster {}",
            config.cluster
        )));
    };
    let upstream = Upstream {
        host: member.host.clone(),
        port: member.db_port,
    };
    // Kept only when this manager would not find the member otherwise.
    write_upstream(layout, &primary_name, known.is_none().then_some(member))?;
    if !req.rewind && layout.standby_signal().exists() {
        // Already a standby: primary_conninfo and primary_slot_name are
        // reloadable, so a SIGHUP to the postmaster repoints it (no
        // connection needed, so a busy server is no reason to restart).
        rewrite_config(Some(&upstream))?;
        if let Some(pid) = postmaster_pid(layout) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGHUP,
            );
            tracing::info!(instance = %config.instance, primary = %primary_name, "following a new primary (reload)");
            return Ok(ActionReply::done(json!({
                "following": primary_name,
                "restarted": false,
            })));
        }
        // Not running (fenced, crashed): start it as a standby of the new
        // primary.
        tracing::info!(instance = %config.instance, primary = %primary_name, "following a new primary (start)");
        return Ok(ActionReply {
            body: json!({ "following": primary_name }),
            then: AfterAction::UnfenceAndRestart,
        });
    }
    if layout.is_initialised() {
        process::write_file(
            &layout.follow_pending(),
            primary_name.as_bytes(),
            0o600,
            None,
        )?;
    }
    tracing::info!(instance = %config.instance, primary = %primary_name, "following a new primary (restart through pg_rewind)");
    Ok(ActionReply {
        body: json!({ "following": primary_name }),
        then: AfterAction::UnfenceAndRestart,
    })
}

/// The pid of the running postmaster, from `postmaster.pid`, when alive.
fn postmaster_pid(layout: &Layout) -> Option<i32> {
    let text = std::fs::read_to_string(layout.pgdata.join("postmaster.pid")).ok()?;
    let pid: i32 = text.lines().next()?.trim().parse().ok()?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None)
        .is_ok()
        .then_some(pid)
}

/// Whether a pg_rewind failure means rewinding cannot work (the WAL it
/// needs is gone, no common history) rather than a passing condition (the
/// source busy, a killed postmaster still exiting). Pure.
pub fn rewind_impossible(stderr: &str) -> bool {
    [
        "could not find previous WAL record",
        "could not find common ancestor",
        "could not open file",
        "from different systems",
        "is not compatible",
        "could not read WAL record",
    ]
    .iter()
    .any(|needle| stderr.contains(needle))
}

/// Make a just promoted source's control file name its new timeline:
/// pg_rewind reads the source's timeline from there, and until the first
/// checkpoint after a promotion it still holds the old one, so pg_rewind
/// would find "no rewind required" and leave a diverged data directory
/// that can never follow (the pg_rewind documentation asks for a
/// CHECKPOINT on a newly promoted source). Best effort: a failure shows up
/// as a failed rewind, retried.
async fn checkpoint_after_promotion(source: &PeerEndpoint, password: &str) {
    let result = async {
        let (client, connection) = tokio_postgres::Config::new()
            .host(&source.host)
            .port(source.db_port)
            .user(SUPERUSER)
            .password(password)
            .dbname("postgres")
            .application_name("stratum-rewind")
            .connect_timeout(Duration::from_secs(5))
            .connect(tokio_postgres::NoTls)
            .await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let row = client
            .query_one(
                "SELECT (SELECT timeline_id FROM pg_control_checkpoint()), \
                 ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int",
                &[],
            )
            .await?;
        let (control, current): (Option<i32>, Option<i32>) = (row.get(0), row.get(1));
        if control != current {
            tracing::info!(source = %source.name, ?control, ?current, "checkpoint on the newly promoted source before pg_rewind");
            client.batch_execute("CHECKPOINT").await?;
        }
        Ok::<_, tokio_postgres::Error>(())
    }
    .await;
    if let Err(e) = result {
        tracing::warn!(source = %source.name, error = %describe_error(&e), "could not check the source's checkpoint timeline");
    }
}

/// The hot-standby parameters as `pg_controldata` prints them (the values
/// of the primary the data directory last replayed an announcement from),
/// their names, and PostgreSQL's defaults (the operator's own default for
/// `max_wal_senders`, 10, is the same).
const CONTROL_FILE_SETTINGS: [(&str, &str, i64); 5] = [
    ("max_connections setting", "max_connections", 100),
    ("max_worker_processes setting", "max_worker_processes", 8),
    ("max_wal_senders setting", "max_wal_senders", 10),
    ("max_prepared_xacts setting", "max_prepared_transactions", 0),
    (
        "max_locks_per_xact setting",
        "max_locks_per_transaction",
        64,
    ),
];

/// The hot-standby parameters' values recorded in a control file, from
/// `pg_controldata`'s output (C locale). Pure.
pub fn control_file_settings(output: &str) -> BTreeMap<String, i64> {
    output
        .lines()
        .filter_map(|line| {
            let (label, value) = line.split_once(':')?;
            let (_, name, _) = CONTROL_FILE_SETTINGS
                .iter()
                .find(|(l, _, _)| *l == label.trim())?;
            Some((name.to_string(), value.trim().parse().ok()?))
        })
        .collect()
}

/// Raise the hot-standby parameters of `parameters` (the user's; unset
/// ones run with PostgreSQL's default) that are below what the control
/// file requires (`required`, from [`control_file_settings`]). Returns the
/// raised ones as `name: configured -> required`. A value that is not a
/// plain number is left alone (PostgreSQL says what is wrong with it).
/// Pure.
pub fn raise_to_control_file(
    parameters: &mut BTreeMap<String, String>,
    required: &BTreeMap<String, i64>,
) -> Vec<String> {
    let mut raised = Vec::new();
    for (_, name, default) in CONTROL_FILE_SETTINGS {
        let Some(need) = required.get(name).copied() else {
            continue;
        };
        let configured = match parameters.get(name) {
            Some(v) => match v.trim().parse::<i64>() {
                Ok(v) => v,
                Err(_) => continue,
            },
            None => default,
        };
        if configured < need {
            parameters.insert(name.to_string(), need.to_string());
            raised.push(format!("{name}: {configured} -> {need}"));
        }
    }
    raised
}

/// Before a start as a standby: keep the hot-standby parameters at least
/// as high as the data directory's control file records for its primary.
/// PostgreSQL refuses to start a standby below those values ("recovery
/// aborted because of insufficient parameter settings"), and the control
/// file learns a lowered value only by replaying the primary's
/// announcement of it, so a standby started with a lowered configuration
/// too early (every instance started at once, as by an `up` restarted in
/// the middle of a primary-first rolling restart) would not start at all.
/// The operator restarts it again once it replayed past the primary's
/// restart; then the control file allows the configured value. Best
/// effort: when `pg_controldata` fails, nothing is raised.
pub(crate) async fn keep_control_file_minimums(
    ctx: &InstanceContext,
    layout: &Layout,
    bin: &BinDir,
    run_as: Option<&RunAs>,
    parameters: &mut BTreeMap<String, String>,
) {
    let mut cmd = process::command(bin.bin("pg_controldata"), run_as);
    cmd.arg("-D")
        .arg(&layout.pgdata)
        .envs(bin.library_env())
        .env("LC_ALL", "C");
    let output = match process::run_captured(cmd, "pg_controldata").await {
        Ok(out) => out,
        Err(e) => {
            tracing::warn!(instance = %ctx.config.instance, error = %e, "could not read the control file's parameter settings");
            return;
        }
    };
    let raised = raise_to_control_file(parameters, &control_file_settings(&output));
    if !raised.is_empty() {
        tracing::warn!(
            instance = %ctx.config.instance,
            raised = %raised.join(", "),
            "starting as a standby with the hot-standby parameters its control file requires (the primary's last announced values); the operator restarts it with the configured values once it has replayed the primary's lower ones"
        );
    }
}

/// What pg_rewind says when the target's history is already part of the
/// source's.
const NO_REWIND_REQUIRED: &str = "no rewind required";

/// Run pg_rewind; its standard output and error together on success (it
/// reports on standard error), the error of [`process::run_captured`]
/// otherwise.
async fn run_rewind(mut cmd: tokio::process::Command) -> Result<String, InstanceError> {
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let output = cmd.output().await.map_err(|e| InstanceError::Command {
        command: "pg_rewind".into(),
        message: format!("could not start: {e}"),
    })?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    if output.status.success() {
        return Ok(format!("{stdout}{stderr}"));
    }
    let mut message = output.status.to_string();
    for (name, text) in [("stderr", stderr.as_ref()), ("stdout", stdout.as_ref())] {
        let tail = process::tail_lines(text, 20);
        if !tail.is_empty() {
            message.push_str(&format!("\n{name}:\n{tail}"));
        }
    }
    Err(InstanceError::Command {
        command: "pg_rewind".into(),
        message,
    })
}

/// What `prepare` does for a pending `follow`: rewind the data directory
/// against `source` (a ready primary) and make it a standby; when rewind is
/// impossible, wipe and clone again.
pub(crate) async fn rewind(
    ctx: &InstanceContext,
    layout: &Layout,
    bin: &BinDir,
    run_as: Option<&RunAs>,
    source: &PeerEndpoint,
    reclone: impl AsyncFnOnce() -> Result<Progress, InstanceError>,
) -> Result<Progress, InstanceError> {
    let config = &ctx.config;
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
    let not_ready = match peers.status(&source.name).await {
        Ok(s) if s.ready && s.role == Role::Primary => None,
        Ok(s) if s.role == Role::Primary => {
            return Ok(Progress::waiting(
                format!("waiting for the new primary {} to be ready", source.name),
                Duration::from_millis(200),
            ));
        }
        Ok(s) => Some(s.message.unwrap_or_else(|| s.role.as_str().to_string())),
        // Unreachable for a moment is common right after a promotion on a
        // busy machine: wait, and give up on it only after a while.
        Err(e) => {
            let pending_for = std::fs::metadata(layout.follow_pending())
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .unwrap_or_default();
            if pending_for < DEFER_AFTER {
                return Ok(Progress::waiting(
                    format!("waiting for {} before rewinding: {e}", source.name),
                    Duration::from_millis(300),
                ));
            }
            Some(e.to_string())
        }
    };
    if let Some(why) = not_ready {
        // The new primary failed too. Start as a standby without rewinding
        // (read-only, so safe): this instance then reports its position and
        // takes part in the next election; the rewind stays pending for the
        // next `follow`.
        tracing::warn!(
            instance = %config.instance,
            source = %source.name,
            "{} is not a ready primary ({why}); starting as a standby, rewind deferred",
            source.name
        );
        process::write_file(&layout.standby_signal(), b"", 0o600, run_as)?;
        return Ok(Progress::Done);
    }
    let password = config
        .read_secret(secret_keys::SUPERUSER_PASSWORD)
        .map_err(InstanceError::io(
            "read secret",
            config.secrets_dir.join(secret_keys::SUPERUSER_PASSWORD),
        ))?;
    let source_server = [
        ("host", source.host.clone()),
        ("port", source.db_port.to_string()),
        ("user", SUPERUSER.to_string()),
        ("dbname", "postgres".to_string()),
        ("connect_timeout", "5".to_string()),
    ]
    .iter()
    .map(|(k, v)| format!("{k}={}", conninfo_quote(v)))
    .collect::<Vec<_>>()
    .join(" ");
    checkpoint_after_promotion(source, &password).await;
    let started = Instant::now();
    // What the last start logged, before pg_rewind's own single-user run
    // adds to the data directory's history.
    let could_not_follow = super::status::diverged(&layout.run_dir);
    // pg_rewind finishes an interrupted server's crash recovery in
    // single-user mode, which refuses standby mode: rewind it as a plain
    // data directory and make it a standby again afterwards.
    process::remove_file_if_exists(&layout.standby_signal())?;
    let mut cmd = process::command(bin.bin("pg_rewind"), run_as);
    cmd.arg("--target-pgdata")
        .arg(&layout.pgdata)
        .arg(format!("--source-server={source_server}"))
        .env("PGPASSWORD", password)
        .envs(bin.library_env());
    match run_rewind(cmd).await {
        Ok(out) if out.contains(NO_REWIND_REQUIRED) && could_not_follow.is_some() => {
            // pg_rewind sees nothing to undo, yet the last start could not
            // follow this history (a standby stopped before it reached
            // consistency on a timeline that was then abandoned): only a
            // new copy helps.
            tracing::warn!(
                instance = %config.instance,
                source = %source.name,
                "pg_rewind found nothing to rewind but the last start could not follow ({}); cloning the data directory again",
                could_not_follow.unwrap_or_default()
            );
            if let waiting @ Progress::Waiting { .. } = reclone().await? {
                return Ok(waiting);
            }
        }
        Ok(out) => {
            tracing::info!(
                instance = %config.instance,
                source = %source.name,
                took_ms = started.elapsed().as_millis() as u64,
                "pg_rewind done: {}",
                process::tail_lines(&out, 2).replace('\n', " | ")
            );
            process::write_file(&layout.standby_signal(), b"", 0o600, run_as)?;
        }
        Err(e) if rewind_impossible(&e.to_string()) => {
            tracing::warn!(instance = %config.instance, source = %source.name, error = %e, "pg_rewind cannot work; cloning the data directory again");
            if let waiting @ Progress::Waiting { .. } = reclone().await? {
                return Ok(waiting);
            }
        }
        Err(e) => {
            process::write_file(&layout.standby_signal(), b"", 0o600, run_as)?;
            return Ok(Progress::waiting(
                format!("pg_rewind failed, retrying: {e}"),
                Duration::from_secs(1),
            ));
        }
    }
    process::remove_file_if_exists(&layout.follow_pending())?;
    Ok(Progress::Done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standby_parameters_never_below_the_control_file() {
        let output = "pg_control version number:            1300\n\
            Database cluster state:               shut down in recovery\n\
            wal_level setting:                    replica\n\
            max_connections setting:              100\n\
            max_worker_processes setting:         8\n\
            max_wal_senders setting:              12\n\
            max_prepared_xacts setting:           0\n\
            max_locks_per_xact setting:           64\n";
        let required = control_file_settings(output);
        assert_eq!(required.len(), 5, "{required:?}");
        assert_eq!(required["max_connections"], 100);
        assert_eq!(required["max_prepared_transactions"], 0);
        // A lowered max_connections, an unset max_wal_senders (default 10)
        // below the primary's 12: both raised; a higher value and a value
        // that is no number stay.
        let mut params: BTreeMap<String, String> = [
            ("max_connections", "90"),
            ("max_worker_processes", "16"),
            ("max_locks_per_transaction", "lots"),
            ("work_mem", "8MB"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let raised = raise_to_control_file(&mut params, &required);
        assert_eq!(
            raised,
            ["max_connections: 90 -> 100", "max_wal_senders: 10 -> 12"]
        );
        assert_eq!(params["max_connections"], "100");
        assert_eq!(params["max_wal_senders"], "12");
        assert_eq!(params["max_worker_processes"], "16");
        assert_eq!(params["max_locks_per_transaction"], "lots");
        // Nothing to raise: nothing changes.
        let before = params.clone();
        assert!(raise_to_control_file(&mut params, &required).is_empty());
        assert_eq!(params, before);
        assert!(control_file_settings("garbage").is_empty());
    }

    #[test]
    fn rewind_failures_that_need_a_clone() {
        assert!(rewind_impossible(
            "pg_rewind: error: could not find previous WAL record at 0/60088E0"
        ));
        assert!(!rewind_impossible(
            "FATAL:  lock file \"postmaster.pid\" already exists\nHINT:  Is another postmaster (PID 982) running"
        ));
        assert!(!rewind_impossible(
            "connection to server failed: Connection refused"
        ));
    }
}
