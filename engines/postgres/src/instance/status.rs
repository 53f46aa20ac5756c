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
    Ok(MemberStatus {
        role,
        ready,
        position,
        server_version: Some(server_version),
        message: (!ready)
            .then(|| "started as a replica (standby.signal) but not in recovery".to_string()),
        details,
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeline_from_walfile_name() {
        assert_eq!(timeline_of_walfile("000000010000000000000003"), Some(1));
        assert_eq!(timeline_of_walfile("0000000A0000000000000003"), Some(10));
        assert_eq!(timeline_of_walfile("xyz"), None);
    }
}
