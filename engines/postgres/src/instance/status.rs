//! What a running PostgreSQL reports: role, WAL position, replication
//! state. Talks to the local server only, over its unix socket.

use std::time::Duration;

use operator_core::instance::protocol::{MemberStatus, Position, Role, parse_lsn};
use serde_json::json;
use tokio_postgres::{Client, NoTls};

use super::layout::Layout;
use crate::settings::SUPERUSER;

/// Connect timeout for local queries (the server is on this machine; a slow
/// answer means it is starting or stuck).
pub const LOCAL_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Connect to the local server over the unix socket in the run directory
/// as the superuser. The connection is driven by a background task that
/// ends when the client is dropped.
pub async fn connect_local(
    layout: &Layout,
    port: u16,
    password: &str,
    dbname: &str,
) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::Config::new()
        .host_path(&layout.run_dir)
        .port(port)
        .user(SUPERUSER)
        .password(password)
        .dbname(dbname)
        .application_name("stratum-instance")
        .connect_timeout(LOCAL_CONNECT_TIMEOUT)
        .connect(NoTls)
        .await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// A tokio-postgres error with its causes (its own Display says only
/// "db error" or "error connecting to server"). Pure.
pub fn describe_error(e: &tokio_postgres::Error) -> String {
    let mut out = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}

/// The timeline in a WAL file name (`000000010000000000000003` → 1). Pure.
pub fn timeline_of_walfile(name: &str) -> Option<u32> {
    u32::from_str_radix(name.get(..8)?, 16).ok()
}

/// Query the server for the status document. `expect_replica` is whether
/// the instance was started as a replica (`standby.signal`): such an
/// instance is ready only while in recovery. Errors are returned for the
/// caller to report as "not ready".
pub async fn query(
    client: &Client,
    expect_replica: bool,
) -> Result<MemberStatus, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT pg_is_in_recovery(), current_setting('server_version')",
            &[],
        )
        .await?;
    let in_recovery: bool = row.get(0);
    let server_version: String = row.get(1);
    let lsn = |s: Option<String>| s.as_deref().and_then(parse_lsn);

    let (role, position, details) = if in_recovery {
        let row = client
            .query_one(
                "SELECT pg_last_wal_receive_lsn()::text, pg_last_wal_replay_lsn()::text, \
                 CASE WHEN pg_last_wal_receive_lsn() IS NOT DISTINCT FROM pg_last_wal_replay_lsn() THEN 0 \
                      ELSE EXTRACT(EPOCH FROM now() - pg_last_xact_replay_timestamp()) END::float8, \
                 pg_wal_lsn_diff(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn())::float8, \
                 (SELECT timeline_id FROM pg_control_checkpoint())",
                &[],
            )
            .await?;
        let received = lsn(row.get(0));
        let replayed = lsn(row.get(1));
        let lag_seconds: Option<f64> = row.get(2);
        let lag_bytes: Option<f64> = row.get(3);
        let checkpoint_tli: Option<i32> = row.get(4);
        let receiver = client
            .query_opt(
                "SELECT status, received_tli, flushed_lsn::text, sender_host, sender_port \
                 FROM pg_stat_wal_receiver",
                &[],
            )
            .await?;
        let (timeline, wal_receiver) = match &receiver {
            Some(r) => {
                let tli: Option<i32> = r.get(1);
                (
                    tli.or(checkpoint_tli),
                    json!({
                        "running": true,
                        "status": r.get::<_, Option<String>>(0),
                        "receivedTimeline": tli,
                        "flushedLsn": r.get::<_, Option<String>>(2),
                        "senderHost": r.get::<_, Option<String>>(3),
                        "senderPort": r.get::<_, Option<i32>>(4),
                    }),
                )
            }
            None => (checkpoint_tli, json!({ "running": false })),
        };
        (
            Role::Replica,
            Position::Wal {
                timeline: timeline.unwrap_or(0).max(0) as u32,
                received_lsn: received,
                replayed_lsn: replayed,
            },
            json!({
                "walReceiver": wal_receiver,
                "replicationLagBytes": lag_bytes,
                "replicationLagSeconds": lag_seconds,
            }),
        )
    } else {
        let row = client
            .query_one(
                "SELECT pg_current_wal_lsn()::text, pg_walfile_name(pg_current_wal_lsn())",
                &[],
            )
            .await?;
        let current = lsn(row.get(0));
        let walfile: String = row.get(1);
        let replicas = client
            .query(
                "SELECT application_name, client_addr::text, state, sync_state, \
                 sent_lsn::text, replay_lsn::text, \
                 pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::float8, \
                 EXTRACT(EPOCH FROM replay_lag)::float8 \
                 FROM pg_stat_replication ORDER BY application_name",
                &[],
            )
            .await?;
        let replicas: Vec<_> = replicas
            .iter()
            .map(|r| {
                json!({
                    "name": r.get::<_, Option<String>>(0),
                    "address": r.get::<_, Option<String>>(1),
                    "state": r.get::<_, Option<String>>(2),
                    "syncState": r.get::<_, Option<String>>(3),
                    "sentLsn": r.get::<_, Option<String>>(4),
                    "replayLsn": r.get::<_, Option<String>>(5),
                    "lagBytes": r.get::<_, Option<f64>>(6),
                    "lagSeconds": r.get::<_, Option<f64>>(7),
                })
            })
            .collect();
        (
            Role::Primary,
            Position::Wal {
                timeline: timeline_of_walfile(&walfile).unwrap_or(0),
                received_lsn: current,
                replayed_lsn: current,
            },
            json!({
                "connectedReplicas": replicas.len(),
                "replicas": replicas,
            }),
        )
    };
    let ready = !expect_replica || in_recovery;
    // PostgreSQL's own account of settings read from the configuration
    // files that need a restart to apply (after a reload): the authority
    // on whether this server runs with what it was given.
    let pending: std::collections::BTreeMap<String, String> = client
        .query(
            "SELECT name, setting FROM pg_settings WHERE pending_restart ORDER BY name",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut details = details;
    if !pending.is_empty()
        && let Some(d) = details.as_object_mut()
    {
        d.insert(PENDING_RESTART_DETAIL.into(), json!(pending));
    }
    Ok(MemberStatus {
        role,
        ready,
        position,
        server_version: Some(server_version),
        message: (!ready)
            .then(|| "started as a replica (standby.signal) but not in recovery".to_string()),
        details,
        pending_restart: !pending.is_empty(),
        ..Default::default()
    })
}

/// Key in [`MemberStatus::details`] of the parameters waiting for a
/// restart: name → the value the server runs with now.
pub const PENDING_RESTART_DETAIL: &str = "pendingRestartFor";

/// What PostgreSQL logs when this data directory's history diverged from
/// the upstream it was told to follow (the old primary wrote past the
/// point where the new primary's timeline forked off): the server then
/// never streams again, and either exits at start, keeps waiting for WAL
/// that does not exist (never consistent, so never accepting
/// connections), or runs without streaming. Only pg_rewind (or a new
/// clone) helps.
const DIVERGED: [&str; 4] = [
    // The startup process, at start: exits.
    "is not a child of this server's history",
    // The startup process, on a new timeline: waits forever.
    "forked off current database system timeline",
    // The WAL receiver: retries forever.
    "is not in this server's history",
    // The WAL receiver of a replica that was away longer than the
    // primary keeps WAL (a scaled-down instance's data reused, its slot
    // dropped): pg_rewind finds nothing to undo, so it is cloned again.
    "has already been removed",
];

/// How much of the end of the server log [`diverged`] reads.
const LOG_TAIL_BYTES: u64 = 64 * 1024;

/// The line of `log` (server output) saying that the history diverged from
/// the upstream's, looking only at the output of the last start (after
/// the last `starting PostgreSQL`). Pure.
pub fn diverged_in(log: &str) -> Option<String> {
    let since = log
        .rfind("starting PostgreSQL")
        .map(|i| &log[i..])
        .unwrap_or(log);
    since
        .lines()
        .find(|l| DIVERGED.iter().any(|needle| l.contains(needle)))
        .map(|l| l.trim().to_string())
}

/// [`diverged_in`] on the end of the server log in `run_dir` (written by
/// the instance manager).
pub fn diverged(run_dir: &std::path::Path) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file =
        std::fs::File::open(run_dir.join(operator_core::instance::manager::SERVER_LOG)).ok()?;
    let len = file.metadata().ok()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL_BYTES)))
        .ok()?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).ok()?;
    diverged_in(&String::from_utf8_lossy(&bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diverged_history_from_the_last_start_only() {
        let old = "2026-11-25 18:26:16.297 GMT [7175] FATAL:  requested timeline 3 is not a child of this server's history\n";
        let start =
            "2026-11-25 18:26:20.349 GMT [7530] LOG:  starting PostgreSQL 15.18 on x86_64\n";
        assert!(diverged_in(old).unwrap().contains("not a child"));
        assert_eq!(diverged_in(&format!("{old}{start}")), None);
        let waiting = "2026-11-25 18:26:21.1 GMT [7531] LOG:  new timeline 4 forked off current database system timeline 3 before current recovery point 0/5027938\n";
        assert!(
            diverged_in(&format!("{old}{start}{waiting}"))
                .unwrap()
                .contains("new timeline 4")
        );
        let receiver = "FATAL:  could not receive data from WAL stream: ERROR:  requested starting point 0/6000000 on timeline 2 is not in this server's history\n";
        assert!(diverged_in(&format!("{start}{receiver}")).is_some());
        let gone = "FATAL:  could not receive data from WAL stream: ERROR:  requested WAL segment 000000010000000000000003 has already been removed\n";
        assert!(diverged_in(&format!("{start}{gone}")).is_some());
        assert_eq!(
            diverged_in(&format!("{start}LOG:  database system is ready\n")),
            None
        );
    }

    #[test]
    fn timeline_from_walfile_name() {
        assert_eq!(timeline_of_walfile("000000010000000000000003"), Some(1));
        assert_eq!(timeline_of_walfile("0000000A0000000000000003"), Some(10));
        assert_eq!(timeline_of_walfile("xyz"), None);
    }
}
