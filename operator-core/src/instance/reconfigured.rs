//! The engine block an instance manager runs with: the instance config's,
//! or the one the operator handed this manager process since it started
//! (the `reconfigure` action, [`super::protocol::ACTION_RECONFIGURE`]).
//! Filesystem IO: `reconfigured.json` in the run directory.
//!
//! The file is valid for the manager process that wrote it only: a manager
//! started later reads its instance config, which the operator rewrote
//! before sending `reconfigure` (the local runtime's `instance.json`, the
//! `<cluster>-config` ConfigMap on Kubernetes), so a stale file never wins.
//! A process is told apart by a random id drawn at its start rather than by
//! its pid: in a pod the manager is PID 1 every time, and a restarted
//! container keeps the run directory (an `emptyDir`).

use std::sync::OnceLock;

use rand::Rng;
use serde::{Deserialize, Serialize};

use super::config::InstanceConfig;
use super::process::{self, RunAs};
use crate::engine::InstanceError;

/// Name of the file in the run directory.
pub const RECONFIGURED_FILE: &str = "reconfigured.json";

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Reconfigured {
    /// [`manager_run_id`] of the process that wrote it.
    manager_run: String,
    engine: serde_json::Value,
}

/// A random id of this process, drawn once.
fn manager_run_id() -> &'static str {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| {
        let mut rng = rand::rng();
        (0..16)
            .map(|_| format!("{:02x}", rng.random::<u8>()))
            .collect()
    })
}

/// The engine block this manager process runs with: the last one
/// [`store`]d by this process, else the instance config's.
pub fn effective_engine(config: &InstanceConfig) -> serde_json::Value {
    std::fs::read(config.run_dir.join(RECONFIGURED_FILE))
        .ok()
        .and_then(|text| serde_json::from_slice::<Reconfigured>(&text).ok())
        .filter(|file| file.manager_run == manager_run_id())
        .map(|file| file.engine)
        .unwrap_or_else(|| config.engine.clone())
}

/// Persist `engine` as the block this manager process runs with from now
/// on (its server's next start and every later `prepare` use it).
pub fn store(
    config: &InstanceConfig,
    engine: &serde_json::Value,
    run_as: Option<&RunAs>,
) -> Result<(), InstanceError> {
    let file = serde_json::to_vec(&Reconfigured {
        manager_run: manager_run_id().to_string(),
        engine: engine.clone(),
    })
    .unwrap_or_default();
    process::write_file(
        &config.run_dir.join(RECONFIGURED_FILE),
        &file,
        0o600,
        run_as,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_stored_block_wins_for_this_process_only() {
        let dir = tempfile::tempdir().unwrap();
        let config = InstanceConfig {
            run_dir: dir.path().into(),
            engine: json!({"parameters": {"work_mem": "4MB"}}),
            ..Default::default()
        };
        assert_eq!(effective_engine(&config), config.engine);
        let new = json!({"parameters": {"work_mem": "8MB"}});
        store(&config, &new, None).unwrap();
        assert_eq!(effective_engine(&config), new);
        // Written by another manager process (a restarted container keeps
        // the run directory): the instance config wins.
        std::fs::write(
            dir.path().join(RECONFIGURED_FILE),
            serde_json::to_vec(&json!({"managerRun": "another", "engine": new})).unwrap(),
        )
        .unwrap();
        assert_eq!(effective_engine(&config), config.engine);
    }
}
