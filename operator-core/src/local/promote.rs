//! `stratum local promote`: ask the running `up` for a switchover and wait
//! for it. Reads the state directory, writes the request file
//! (`switchover.json`), polls `state.json`.

use std::time::{Duration, Instant};

use anyhow::Context;

use super::PromoteArgs;
use super::ha::{SWITCHOVER_FILE, SwitchoverRequest};
use super::state::{self, StateDir};
use crate::instance::protocol::Role;

/// Check the target against the last snapshot, hand the request to `up`,
/// and wait until the target is the current primary (or `up` refuses).
pub async fn run(args: PromoteArgs) -> anyhow::Result<()> {
    let dir = StateDir::new(&args.state_dir)?;
    let Some(st) = state::read_state(&dir)? else {
        anyhow::bail!("no Stratum cluster in {}", dir.root().display());
    };
    if state::running_pid(&dir).is_none() {
        anyhow::bail!(
            "the cluster in {} is not running; start it with `stratum local up`",
            dir.root().display()
        );
    }
    let snap = st.status.clone().unwrap_or_default();
    let target = args.instance.as_str();
    let Some(instance) = snap.instances.iter().find(|i| i.name == target) else {
        anyhow::bail!(
            "there is no instance {target:?} in cluster {}; instances are {}",
            st.cluster,
            snap.instances
                .iter()
                .map(|i| i.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    };
    if st.ha.current_primary.as_deref() == Some(target) {
        anyhow::bail!("{target} is already the primary");
    }
    if instance.role != Role::Replica || !instance.ready {
        anyhow::bail!(
            "{target} is not a ready replica (role {}, ready {}); only a streaming replica can be promoted",
            instance.role.as_str(),
            instance.ready
        );
    }
    let events_before = st.ha.events.len();
    let last_event = st.ha.events.last().cloned();
    let body = serde_json::to_vec(&SwitchoverRequest {
        target: target.to_string(),
    })?;
    let path = dir.root().join(SWITCHOVER_FILE);
    state::write_atomic(&path, &body, 0o600)
        .with_context(|| format!("failed to write {}", path.display()))?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.timeout);
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if let Some(st) = state::read_state(&dir)? {
            if st.ha.current_primary.as_deref() == Some(target) {
                println!(
                    "{target} is the primary (timeline {}), after {}ms",
                    st.ha
                        .timeline
                        .map(|t| t.to_string())
                        .unwrap_or_else(|| "?".into()),
                    started.elapsed().as_millis()
                );
                return Ok(());
            }
            // Events added since the request (the list is bounded, so
            // compare from the last one seen).
            let start = last_event
                .as_ref()
                .and_then(|l| st.ha.events.iter().rposition(|e| e == l).map(|i| i + 1))
                .unwrap_or(events_before.min(st.ha.events.len()));
            if let Some(refused) = st.ha.events[start..]
                .iter()
                .find(|e| e.contains("SwitchoverRefused"))
            {
                let _ = std::fs::remove_file(&path);
                anyhow::bail!("the switchover was refused: {refused}");
            }
        }
        if Instant::now() > deadline {
            let _ = std::fs::remove_file(&path);
            anyhow::bail!(
                "{target} did not become the primary within {}s; see `stratum local status --state-dir {}`",
                args.timeout,
                dir.root().display()
            );
        }
    }
}
