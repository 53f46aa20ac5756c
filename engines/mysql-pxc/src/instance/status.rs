//! What a Galera member reports: the live wsrep status of a running server
//! (SQL over the local unix socket, mysql_async), and otherwise what its
//! files say (`grastate.dat`, the last `--wsrep-recover`, the server log).
//! The parsers are pure; [`query`] does network IO to the local server.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use mysql_async::prelude::Queryable;
use operator_core::instance::protocol::{MemberStatus, Position, Role};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::galera::NIL_UUID;

/// Timeout of local status queries (a slow answer means starting or stuck).
pub const LOCAL_TIMEOUT: Duration = Duration::from_secs(3);

/// `grastate.dat`: the position Galera saved on its last clean stop
/// (`seqno: -1` while it runs or after a crash) and whether this member
/// may bootstrap.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GraState {
    /// Cluster state UUID.
    pub uuid: String,
    /// Last committed seqno, -1 when unknown (running or crashed).
    pub seqno: i64,
    /// `safe_to_bootstrap`.
    pub safe_to_bootstrap: bool,
}

/// Parse `grastate.dat`. Pure.
pub fn parse_grastate(text: &str) -> GraState {
    let mut state = GraState {
        seqno: -1,
        ..Default::default()
    };
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match key.trim() {
            "uuid" => state.uuid = value.to_string(),
            "seqno" => state.seqno = value.parse().unwrap_or(-1),
            "safe_to_bootstrap" => state.safe_to_bootstrap = value == "1",
            _ => {}
        }
    }
    state
}

/// `grastate.dat` with `safe_to_bootstrap` set to 1 (the operator decided
/// this member bootstraps; Galera refuses `--wsrep-new-cluster` otherwise).
/// Pure.
pub fn with_safe_to_bootstrap(text: &str) -> String {
    let mut found = false;
    let mut out: Vec<String> = text
        .lines()
        .map(|line| {
            if line.trim_start().starts_with("safe_to_bootstrap:") {
                found = true;
                "safe_to_bootstrap: 1".to_string()
            } else {
                line.to_string()
            }
        })
        .collect();
    if !found {
        out.push("safe_to_bootstrap: 1".into());
    }
    out.join("\n") + "\n"
}

/// A position recovered with `--wsrep-recover` (`<uuid>:<seqno>`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Recovered {
    /// Cluster state UUID.
    pub uuid: String,
    /// Last committed seqno.
    pub seqno: i64,
}

impl Recovered {
    /// The `--wsrep_start_position` value.
    pub fn start_position(&self) -> String {
        format!("{}:{}", self.uuid, self.seqno)
    }
}

/// The position in `--wsrep-recover` output (`... WSREP: Recovered
/// position: 2e1c...:42`); the last one when several. Pure.
pub fn parse_recovered(output: &str) -> Option<Recovered> {
    output.lines().rev().find_map(|line| {
        let rest = line.split("Recovered position:").nth(1)?.trim();
        let (uuid, seqno) = rest.rsplit_once(':')?;
        let seqno: i64 = seqno.trim().parse().ok()?;
        Some(Recovered {
            uuid: uuid.trim().to_string(),
            seqno,
        })
    })
}

/// How this member received its state at its last start, from its server
/// log: `"sst"` when the SST script copied a full snapshot (`<method> SST
/// completed on joiner`; Galera then also replays the write-sets committed
/// meanwhile by IST), `"ist"` when only write-sets were replayed (`IST
/// received`), `None` when it did neither (it bootstrapped, or it is still
/// joining). Only the log since the last provider load counts. Pure.
pub fn last_state_transfer(log: &str) -> Option<&'static str> {
    let since_start = log
        .rfind("WSREP: Loading provider")
        .map_or(log, |i| &log[i..]);
    if since_start.contains(" SST completed on joiner") {
        Some("sst")
    } else if since_start.contains("IST received:") {
        Some("ist")
    } else {
        None
    }
}

/// The last `max` bytes of a file (lossy UTF-8), empty when unreadable.
pub fn read_tail(path: &Path, max: u64) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut file) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(max)));
    let mut buf = Vec::new();
    let _ = file.take(max).read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// The status of a member whose server does not answer: its position from
/// the last recovery (state `Recovered`) or from `grastate.dat` when that
/// holds a clean stop's seqno, else what is known with state `Down`: the
/// cluster UUID with seqno -1 after an unclean stop not yet recovered, the
/// nil UUID for a member that never joined a group (which
/// [`crate::galera::elect`] counts as "no state"). Pure.
pub fn offline_position(grastate: Option<&GraState>, recovered: Option<&Recovered>) -> Position {
    if let Some(r) = recovered {
        return Position::Galera {
            cluster_uuid: r.uuid.clone(),
            seqno: r.seqno,
            state: "Recovered".into(),
        };
    }
    match grastate {
        Some(g) if g.seqno >= 0 && g.uuid != NIL_UUID && !g.uuid.is_empty() => Position::Galera {
            cluster_uuid: g.uuid.clone(),
            seqno: g.seqno,
            state: "Recovered".into(),
        },
        Some(g) if !g.uuid.is_empty() => Position::Galera {
            cluster_uuid: g.uuid.clone(),
            seqno: g.seqno,
            state: "Down".into(),
        },
        _ => Position::Galera {
            cluster_uuid: NIL_UUID.into(),
            seqno: -1,
            state: "Down".into(),
        },
    }
}

/// The status variables a running member is judged by.
pub const STATUS_VARIABLES: &[&str] = &[
    "wsrep_cluster_state_uuid",
    "wsrep_last_committed",
    "wsrep_local_state_comment",
    "wsrep_local_state",
    "wsrep_cluster_status",
    "wsrep_cluster_size",
    "wsrep_ready",
    "wsrep_connected",
    "wsrep_flow_control_paused",
];

/// Build the status document from `SHOW GLOBAL STATUS` values. Ready only
/// when Synced, in a Primary component, and `wsrep_ready=ON`. Pure.
pub fn from_variables(vars: &BTreeMap<String, String>, server_version: String) -> MemberStatus {
    let get = |k: &str| vars.get(k).map(String::as_str).unwrap_or("");
    let state = get("wsrep_local_state_comment").to_string();
    let primary = get("wsrep_cluster_status") == "Primary";
    let wsrep_ready = get("wsrep_ready") == "ON";
    let synced = state == "Synced";
    let ready = synced && primary && wsrep_ready;
    let message = (!ready).then(|| {
        format!(
            "wsrep state {}, cluster status {}, wsrep_ready {}",
            if state.is_empty() { "?" } else { &state },
            get("wsrep_cluster_status"),
            get("wsrep_ready")
        )
    });
    let number = |k: &str| get(k).parse::<f64>().ok();
    MemberStatus {
        role: if primary { Role::Member } else { Role::Unknown },
        ready,
        position: Position::Galera {
            cluster_uuid: get("wsrep_cluster_state_uuid").to_string(),
            seqno: get("wsrep_last_committed").parse().unwrap_or(-1),
            state,
        },
        server_version: Some(server_version),
        message,
        details: json!({
            "wsrepClusterSize": number("wsrep_cluster_size").map(|n| n as i64),
            "wsrepClusterStatus": get("wsrep_cluster_status"),
            "wsrepLocalState": number("wsrep_local_state").map(|n| n as i64),
            "wsrepFlowControlPaused": number("wsrep_flow_control_paused"),
            "wsrepReady": wsrep_ready,
            "wsrepConnected": get("wsrep_connected") == "ON",
        }),
        ..Default::default()
    }
}

/// Options to reach the local server over its unix socket as `user`.
pub fn local_opts(socket: &Path, user: &str, password: &str) -> mysql_async::Opts {
    mysql_async::OptsBuilder::default()
        .socket(Some(socket.display().to_string()))
        .user(Some(user))
        .pass(Some(password))
        .prefer_socket(true)
        .into()
}

/// Connect to the local server (bounded by [`LOCAL_TIMEOUT`]).
pub async fn connect(opts: mysql_async::Opts) -> Result<mysql_async::Conn, String> {
    match tokio::time::timeout(LOCAL_TIMEOUT, mysql_async::Conn::new(opts)).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {}s", LOCAL_TIMEOUT.as_secs())),
    }
}

/// Query a running server's wsrep status.
pub async fn query(conn: &mut mysql_async::Conn) -> Result<MemberStatus, String> {
    let work = async {
        let list = STATUS_VARIABLES
            .iter()
            .map(|v| format!("'{v}'"))
            .collect::<Vec<_>>()
            .join(",");
        let rows: Vec<(String, String)> = conn
            .query(format!(
                "SHOW GLOBAL STATUS WHERE Variable_name IN ({list})"
            ))
            .await?;
        let version: Option<String> = conn.query_first("SELECT VERSION()").await?;
        Ok::<_, mysql_async::Error>((rows, version))
    };
    let (rows, version) = tokio::time::timeout(LOCAL_TIMEOUT, work)
        .await
        .map_err(|_| format!("status query took over {}s", LOCAL_TIMEOUT.as_secs()))?
        .map_err(|e| e.to_string())?;
    let vars = rows
        .into_iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v))
        .collect();
    Ok(from_variables(&vars, version.unwrap_or_default()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRASTATE: &str = "# GALERA saved state\nversion: 2.1\nuuid:    6f2d6c9e-ca5f-11f0-8e3a-3f0b1e7c2a11\nseqno:   -1\nsafe_to_bootstrap: 0\n";

    #[test]
    fn grastate_parse_and_safe_to_bootstrap() {
        let g = parse_grastate(GRASTATE);
        assert_eq!(g.uuid, "6f2d6c9e-ca5f-11f0-8e3a-3f0b1e7c2a11");
        assert_eq!(g.seqno, -1);
        assert!(!g.safe_to_bootstrap);
        let set = with_safe_to_bootstrap(GRASTATE);
        assert!(parse_grastate(&set).safe_to_bootstrap);
        assert_eq!(parse_grastate(&set).uuid, g.uuid);
        assert!(parse_grastate(&with_safe_to_bootstrap("version: 2.1\n")).safe_to_bootstrap);
    }

    #[test]
    fn recovered_position_from_server_output() {
        let out = "2026-11-25 18:00:00 0 [Note] InnoDB: Starting\n\
                   2026-11-25 18:00:01 0 [Note] WSREP: Recovered position: 6f2d6c9e-ca5f-11f0-8e3a-3f0b1e7c2a11:42\n";
        let r = parse_recovered(out).unwrap();
        assert_eq!(r.uuid, "6f2d6c9e-ca5f-11f0-8e3a-3f0b1e7c2a11");
        assert_eq!(r.seqno, 42);
        assert_eq!(
            r.start_position(),
            "6f2d6c9e-ca5f-11f0-8e3a-3f0b1e7c2a11:42"
        );
        assert_eq!(parse_recovered("nothing here"), None);
    }

    #[test]
    fn offline_positions() {
        let crashed = parse_grastate(GRASTATE);
        assert_eq!(
            offline_position(Some(&crashed), None),
            Position::Galera {
                cluster_uuid: crashed.uuid.clone(),
                seqno: -1,
                state: "Down".into()
            }
        );
        let r = Recovered {
            uuid: crashed.uuid.clone(),
            seqno: 7,
        };
        assert!(matches!(
            offline_position(Some(&crashed), Some(&r)),
            Position::Galera { seqno: 7, ref state, .. } if state == "Recovered"
        ));
        assert_eq!(
            offline_position(None, None),
            Position::Galera {
                cluster_uuid: NIL_UUID.into(),
                seqno: -1,
                state: "Down".into()
            }
        );
    }

    #[test]
    fn state_transfer_kind_from_log() {
        assert_eq!(last_state_transfer("x"), None);
        let sst = "WSREP: Loading provider x\nWSREP_SST: [INFO] mariabackup SST completed on joiner\n\
                   WSREP: SST received: u:3\nWSREP: IST received: u:5\n";
        assert_eq!(last_state_transfer(sst), Some("sst"));
        let ist = format!(
            "{sst}WSREP: Loading provider x\nWSREP_SST: [INFO] mariabackup IST completed on joiner\n\
             WSREP: SST received: u:5\nWSREP: IST received: u:9\n"
        );
        assert_eq!(last_state_transfer(&ist), Some("ist"));
        let bootstrapped =
            format!("{ist}WSREP: Loading provider x\nWSREP: Bootstrapping a new cluster\n");
        assert_eq!(last_state_transfer(&bootstrapped), None);
    }

    #[test]
    fn readiness_needs_synced_primary_and_wsrep_ready() {
        let vars = |state: &str, status: &str, ready: &str| {
            [
                ("wsrep_local_state_comment", state),
                ("wsrep_cluster_status", status),
                ("wsrep_ready", ready),
                ("wsrep_cluster_state_uuid", "u"),
                ("wsrep_last_committed", "12"),
                ("wsrep_cluster_size", "3"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>()
        };
        let s = from_variables(&vars("Synced", "Primary", "ON"), "10.11".into());
        assert!(s.ready);
        assert_eq!(s.role, Role::Member);
        assert_eq!(s.details["wsrepClusterSize"], 3);
        assert!(matches!(s.position, Position::Galera { seqno: 12, .. }));
        let s = from_variables(&vars("Donor/Desynced", "Primary", "ON"), "10.11".into());
        assert!(!s.ready);
        assert_eq!(s.role, Role::Member);
        let s = from_variables(&vars("Synced", "non-Primary", "OFF"), "10.11".into());
        assert!(!s.ready);
        assert_eq!(s.role, Role::Unknown);
        assert!(s.message.unwrap().contains("non-Primary"));
    }
}
