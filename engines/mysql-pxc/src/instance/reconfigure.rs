//! The `reconfigure` action of a Galera member: take a changed engine block
//! (a new `spec.configuration`) without a restart where MariaDB allows it.
//! Filesystem IO (`my.cnf`, `reconfigured.json` and the pending-restart
//! marker in the run directory) and SQL to the local server (`SET GLOBAL`);
//! [`plan`] and [`sql_value`] are pure.
//!
//! What is applied live: an option of a server group (`[mysqld]`,
//! `[galera]`, …) given a value, whose system variable MariaDB reports as
//! writable (`information_schema.SYSTEM_VARIABLES.READ_ONLY = 'NO'`), set
//! with `SET GLOBAL`. Everything else in a server group — a removed option
//! (its default would have to be worked out), a bare flag, a read-only
//! variable, `wsrep_provider_options`, a value MariaDB refuses, and any
//! change outside `spec.configuration` — waits for the next server start,
//! which reads the rewritten `my.cnf`: the manager reports
//! `pendingRestart` until then. Options of the SST tool groups (`[sst]`,
//! `[mariabackup]`) need nothing: the tools read `my.cnf` at each transfer.

use std::collections::BTreeMap;

use mysql_async::prelude::Queryable;
use operator_core::engine::{ActionReply, InstanceContext, InstanceError};
use operator_core::instance::process::{self, RunAs};
use operator_core::instance::reconfigured;
use serde_json::json;

use super::conf::sql_literal;
use super::{Layout, binaries, live_server_pid, local_conn, settings, write_my_cnf};
use crate::mycnf::{canonical_name, is_server_group};
use crate::settings::PxcInstanceSettings;

/// Marker in the run directory: the running server lacks some of the
/// settings in `my.cnf` (JSON list of the options). Removed by `prepare`,
/// which runs before every server start.
pub const RESTART_PENDING: &str = "restart.pending";

/// What a changed engine block asks of a running server.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Every changed option as `[group] name`, and changed engine fields.
    pub changed: Vec<String>,
    /// Server variables to try with `SET GLOBAL`: canonical name → value
    /// as written in `spec.configuration`.
    pub set: BTreeMap<String, String>,
    /// What only a restart applies, each named.
    pub restart_for: Vec<String>,
}

/// Compare the block a member runs with (`old`) with the `new` one. Pure.
pub fn plan(old: &PxcInstanceSettings, new: &PxcInstanceSettings) -> Plan {
    let mut out = Plan::default();
    let fields = [
        ("flavor", old.flavor != new.flavor),
        ("version", old.version != new.version),
        ("clusterName", old.cluster_name != new.cluster_name),
        ("sstMethod", old.sst_method != new.sst_method),
        ("tls", old.tls != new.tls),
    ];
    for (field, differs) in fields {
        if differs {
            out.changed.push(field.to_string());
            out.restart_for.push(field.to_string());
        }
    }
    let groups: std::collections::BTreeSet<&String> =
        old.my_cnf.keys().chain(new.my_cnf.keys()).collect();
    let empty = BTreeMap::new();
    for group in groups {
        let before = old.my_cnf.get(group).unwrap_or(&empty);
        let after = new.my_cnf.get(group).unwrap_or(&empty);
        let names: std::collections::BTreeSet<&String> =
            before.keys().chain(after.keys()).collect();
        for name in names {
            let (was, now) = (before.get(name), after.get(name));
            if was == now {
                continue;
            }
            let label = format!("[{group}] {name}");
            out.changed.push(label.clone());
            if !is_server_group(group) {
                // Read by the SST tools at each transfer.
                continue;
            }
            let canonical = canonical_name(name);
            match now {
                Some(Some(value)) if canonical != "wsrep_provider_options" => {
                    out.set.insert(canonical, value.clone());
                }
                _ => out.restart_for.push(label),
            }
        }
    }
    out
}

/// The SQL literal for `value` (as written in an option file) of a system
/// variable of MariaDB type `var_type` (`information_schema`'s
/// `VARIABLE_TYPE`): integers with their option-file suffix (`K`, `M`,
/// `G`, `T`, `P`, `E`) multiplied out, which `SET` does not accept;
/// `DOUBLE` as a number; anything else as a string. `None` when an integer
/// or double does not parse. Pure.
pub fn sql_value(value: &str, var_type: &str) -> Option<String> {
    let v = value.trim();
    let unquoted = v
        .strip_prefix('"')
        .and_then(|x| x.strip_suffix('"'))
        .or_else(|| v.strip_prefix('\'').and_then(|x| x.strip_suffix('\'')))
        .unwrap_or(v);
    let ty = var_type.to_ascii_uppercase();
    if ty.contains("INT") {
        let (digits, factor) = match unquoted.chars().last()?.to_ascii_uppercase() {
            'K' => (&unquoted[..unquoted.len() - 1], 1u64 << 10),
            'M' => (&unquoted[..unquoted.len() - 1], 1 << 20),
            'G' => (&unquoted[..unquoted.len() - 1], 1 << 30),
            'T' => (&unquoted[..unquoted.len() - 1], 1 << 40),
            'P' => (&unquoted[..unquoted.len() - 1], 1 << 50),
            'E' => (&unquoted[..unquoted.len() - 1], 1 << 60),
            _ => (unquoted, 1),
        };
        if let Ok(n) = digits.trim().parse::<u64>() {
            return n.checked_mul(factor).map(|n| n.to_string());
        }
        return digits
            .trim()
            .parse::<i64>()
            .ok()
            .filter(|_| factor == 1)
            .map(|n| n.to_string());
    }
    if ty == "DOUBLE" {
        return unquoted
            .parse::<f64>()
            .ok()
            .filter(|f| f.is_finite())
            .map(|f| f.to_string());
    }
    Some(sql_literal(unquoted))
}

/// The options the running server lacks, when it lacks any.
pub fn pending(layout: &Layout) -> Option<Vec<String>> {
    let text = std::fs::read(layout.run_dir.join(RESTART_PENDING)).ok()?;
    Some(serde_json::from_slice(&text).unwrap_or_default())
}

/// `reconfigure`: keep the new block for this manager's later starts,
/// rewrite `my.cnf`, set what MariaDB takes live, and say whether a
/// restart is still needed.
pub(super) async fn reconfigure(
    ctx: &InstanceContext,
    body: serde_json::Value,
) -> Result<ActionReply, InstanceError> {
    let config = &ctx.config;
    let engine = body
        .get("engine")
        .cloned()
        .ok_or_else(|| InstanceError::Settings("reconfigure needs {\"engine\": {…}}".into()))?;
    let new: PxcInstanceSettings = serde_json::from_value(engine.clone())
        .map_err(|e| InstanceError::Settings(format!("reconfigure: engine block: {e}")))?;
    let old = settings(config)?;
    let plan = plan(&old, &new);
    let run_as = RunAs::for_config(config)?;
    let bin = binaries(config, &new)?;
    let layout = Layout::new(ctx);
    write_my_cnf(ctx, &new, &layout, &bin, run_as.as_ref())?;
    reconfigured::store(config, &engine, None)?;
    let name = &config.instance;
    let mut restart_for = plan.restart_for.clone();
    let mut applied = Vec::new();
    let mut running = true;
    match local_conn(ctx).await {
        Ok(mut conn) => {
            for (var, value) in &plan.set {
                match set_global(&mut conn, var, value).await {
                    Ok(()) => applied.push(var.clone()),
                    Err(why) => {
                        tracing::info!(instance = %name, variable = %var, "not set live: {why}");
                        restart_for.push(format!("{var} ({why})"));
                    }
                }
            }
            let _ = conn.disconnect().await;
        }
        Err(e) if live_server_pid(&layout).is_some() => {
            // Starting or joining: it may have read the old my.cnf.
            tracing::info!(instance = %name, "server runs but does not answer ({e}); the new settings wait for its next start");
            restart_for.extend(plan.set.keys().cloned());
        }
        // Not running: its next start reads the new my.cnf.
        Err(_) => {
            restart_for.clear();
            running = false;
        }
    }
    // Merged with what an earlier reconfigure left pending: the running
    // server still lacks that too.
    let mut still = if running {
        pending(&layout).unwrap_or_default()
    } else {
        Vec::new()
    };
    for r in &restart_for {
        if !still.contains(r) {
            still.push(r.clone());
        }
    }
    let marker = layout.run_dir.join(RESTART_PENDING);
    if still.is_empty() {
        process::remove_file_if_exists(&marker)?;
    } else {
        let text = serde_json::to_vec(&still).unwrap_or_default();
        process::write_file(&marker, &text, 0o600, None)?;
    }
    tracing::info!(instance = %name, changed = ?plan.changed, set = ?applied, restart_for = ?still, "reconfigured");
    Ok(ActionReply::done(json!({
        "changed": plan.changed,
        "set": applied,
        "restart": !still.is_empty(),
        "restartFor": still,
        // Galera members have no primary.
        "primaryFirst": false,
    })))
}

/// `SET GLOBAL var = value` when MariaDB has such a writable variable.
async fn set_global(conn: &mut mysql_async::Conn, var: &str, value: &str) -> Result<(), String> {
    let row: Option<(String, String)> = conn
        .exec_first(
            "SELECT VARIABLE_TYPE, READ_ONLY FROM information_schema.SYSTEM_VARIABLES \
             WHERE VARIABLE_NAME = ?",
            (var.to_ascii_uppercase(),),
        )
        .await
        .map_err(|e| format!("cannot look the variable up: {e}"))?;
    let Some((var_type, read_only)) = row else {
        return Err("not a system variable".into());
    };
    if read_only.eq_ignore_ascii_case("YES") {
        return Err("read-only while the server runs".into());
    }
    let literal =
        sql_value(value, &var_type).ok_or_else(|| format!("{value:?} is not a {var_type}"))?;
    // `var` is a canonical option name ([a-z0-9_.]), checked by
    // validation and found among the server's variables just now.
    conn.query_drop(format!("SET GLOBAL {var} = {literal}"))
        .await
        .map_err(|e| format!("SET GLOBAL refused: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{Flavor, SstMethod};

    fn settings(my_cnf: &str) -> PxcInstanceSettings {
        PxcInstanceSettings {
            flavor: Flavor::MariaDB,
            version: "10.11".into(),
            cluster_name: "simple-pxc".into(),
            sst_method: SstMethod::Rsync,
            my_cnf: crate::mycnf::render(&crate::mycnf::parse(my_cnf).unwrap()),
            tls: None,
        }
    }

    #[test]
    fn dynamic_candidates_and_restarts_are_told_apart() {
        let old = settings(
            "[mysqld]\nmax_connections=100\nskip-name-resolve\nlong_query_time=2\n\
             wsrep_provider_options=\"gcache.size=64M\"\n[sst]\nprogress=1\n",
        );
        let new = settings(
            "[mysqld]\nmax-connections=250\nwait_timeout=600\n\
             wsrep_provider_options=\"gcache.size=128M\"\nlog_bin\n[sst]\nprogress=0\n",
        );
        let p = plan(&old, &new);
        assert_eq!(
            p.set,
            BTreeMap::from([
                ("max_connections".to_string(), "250".to_string()),
                ("wait_timeout".to_string(), "600".to_string()),
            ])
        );
        // Removed, bare and provider options wait for a restart; [sst]
        // needs nothing.
        assert_eq!(
            p.restart_for,
            [
                "[mysqld] log_bin",
                "[mysqld] long_query_time",
                "[mysqld] skip_name_resolve",
                "[mysqld] wsrep_provider_options",
            ]
        );
        assert!(p.changed.contains(&"[sst] progress".to_string()));
        assert_eq!(plan(&new, &new), Plan::default());
    }

    #[test]
    fn engine_fields_need_a_restart() {
        let old = settings("[mysqld]\nmax_connections=100\n");
        let new = PxcInstanceSettings {
            sst_method: SstMethod::Mariabackup,
            ..old.clone()
        };
        let p = plan(&old, &new);
        assert_eq!(p.restart_for, ["sstMethod"]);
        assert!(p.set.is_empty());
    }

    #[test]
    fn values_become_sql_literals_by_type() {
        assert_eq!(
            sql_value("64M", "BIGINT UNSIGNED").as_deref(),
            Some("67108864")
        );
        assert_eq!(sql_value("1k", "INT UNSIGNED").as_deref(), Some("1024"));
        assert_eq!(sql_value("250", "INT UNSIGNED").as_deref(), Some("250"));
        assert_eq!(sql_value("-1", "BIGINT").as_deref(), Some("-1"));
        assert_eq!(sql_value("lots", "BIGINT UNSIGNED"), None);
        assert_eq!(sql_value("2.5", "DOUBLE").as_deref(), Some("2.5"));
        assert_eq!(sql_value("x", "DOUBLE"), None);
        assert_eq!(sql_value("ON", "BOOLEAN").as_deref(), Some("'ON'"));
        assert_eq!(
            sql_value("\"it's\"", "VARCHAR").as_deref(),
            Some("'it\\'s'")
        );
        assert_eq!(sql_value("99999999E", "BIGINT UNSIGNED"), None, "overflow");
    }
}
