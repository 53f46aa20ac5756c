//! `stratum local down`: stop the `up` running on a state directory, and
//! optionally delete the directory. Signals processes and removes files.

use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::DownArgs;
use super::state::{self, StateDir};
use super::supervisor::STOP_TIMEOUT;

/// How long `down` waits for `up` to exit: its managers get
/// [`STOP_TIMEOUT`], plus slack for the endpoints and the last snapshot.
const WAIT_FOR_UP: Duration = Duration::from_secs(STOP_TIMEOUT.as_secs() + 15);

/// `stratum local down`: see [`super::down`].
pub async fn run(args: DownArgs) -> anyhow::Result<()> {
    let dir = StateDir::new(&args.state_dir)?;
    if !dir.root().is_dir() {
        anyhow::bail!(
            "no Stratum cluster in {}: the directory does not exist",
            dir.root().display()
        );
    }
    let state = state::read_state(&dir)?;
    if state.is_none() && !dir.cluster_file().exists() {
        anyhow::bail!("no Stratum cluster in {}", dir.root().display());
    }

    match state::running_pid(&dir) {
        Some(pid) => stop_up(&dir, pid).await?,
        None => tracing::info!(state_dir = %dir.root().display(), "not running"),
    }
    if let Some(state) = state::read_state(&dir)? {
        stop_orphaned_managers(&dir, &state).await;
    }

    if args.purge {
        state::check_purgeable(dir.root())?;
        std::fs::remove_dir_all(dir.root())
            .map_err(|e| anyhow::anyhow!("failed to delete {}: {e}", dir.root().display()))?;
        eprintln!("deleted {}", dir.root().display());
    }
    Ok(())
}

/// Stop the managers an `up` that was killed outright left running (they
/// hold the ports and the data directories); they are recognised by their
/// config path inside this state directory. SIGTERM stops their databases
/// cleanly. Then the servers whose managers are gone too (each manager
/// records its server in its run directory).
pub(super) async fn stop_orphaned_managers(dir: &StateDir, state: &state::LocalState) {
    super::haproxy::stop_orphaned(dir, state.haproxy).await;
    let stops = state
        .managers
        .iter()
        .filter(|(name, pid)| is_our_manager(**pid, &dir.instance_config_file(name)))
        .map(|(name, pid)| {
            tracing::warn!(instance = %name, pid, "stopping an orphaned instance manager");
            stop_pid(*pid, STOP_TIMEOUT)
        });
    futures::future::join_all(stops).await;
    // Servers whose managers were killed outright (SIGKILL, with `up`)
    // run on unsupervised; each manager recorded the one it started.
    let servers = state.ports.instances.keys().map(|name| async move {
        let run_dir = dir.instance_paths(name, &[]).run_dir;
        if let Some(what) = crate::instance::leftovers::stop_recorded(&run_dir, STOP_TIMEOUT).await
        {
            tracing::warn!(instance = %name, "stopped a server left without its manager: {what}");
        }
    });
    futures::future::join_all(servers).await;
}

async fn stop_up(dir: &StateDir, pid: u32) -> anyhow::Result<()> {
    if pid == 0 {
        anyhow::bail!(
            "{} is locked by a running `stratum local up` whose pid is unreadable; stop it by hand",
            dir.pid_file().display()
        );
    }
    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
    let deadline = Instant::now() + WAIT_FOR_UP;
    // Gone means the lock is released: a zombie `up` (not yet reaped by its
    // parent) has already closed its files.
    while state::running_pid(dir).is_some() {
        if Instant::now() >= deadline {
            anyhow::bail!(
                "`stratum local up` (pid {pid}) did not stop within {}s",
                WAIT_FOR_UP.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "stopped `stratum local up` (pid {pid}) on {}",
        dir.root().display()
    );
    Ok(())
}

/// Whether `pid` runs `stratum instance --config <config>`.
pub(super) fn is_our_manager(pid: u32, config: &std::path::Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let config = config.as_os_str().as_encoded_bytes();
    args.windows(3)
        .any(|w| w[0] == b"instance" && w[1] == b"--config" && w[2] == config)
}

async fn stop_pid(pid: u32, timeout: Duration) {
    let raw = Pid::from_raw(pid as i32);
    let _ = kill(raw, Signal::SIGTERM);
    let deadline = Instant::now() + timeout;
    while kill(raw, None).is_ok() && !is_zombie(pid) {
        if Instant::now() >= deadline {
            let _ = nix::sys::signal::killpg(raw, Signal::SIGKILL);
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| rest.starts_with('Z')))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn down_on_a_stopped_cluster_succeeds_and_purge_is_guarded() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("state");
        let args = |purge| DownArgs {
            state_dir: root.clone(),
            purge,
        };
        assert!(run(args(false)).await.is_err(), "no directory");
        std::fs::create_dir(&root).unwrap();
        assert!(run(args(false)).await.is_err(), "no cluster");
        std::fs::write(root.join("cluster.yaml"), "kind: FakeCluster\n").unwrap();
        std::fs::write(root.join("notes.txt"), "mine").unwrap();
        run(args(false)).await.unwrap();
        let err = run(args(true)).await.unwrap_err().to_string();
        assert!(
            err.contains("refusing to purge") && err.contains("notes.txt"),
            "{err}"
        );
        std::fs::remove_file(root.join("notes.txt")).unwrap();
        run(args(true)).await.unwrap();
        assert!(!root.exists());
    }

    #[test]
    fn managers_are_recognised_by_their_config_path() {
        assert!(!is_our_manager(
            std::process::id(),
            std::path::Path::new("/x/instance.json")
        ));
        assert!(!is_our_manager(u32::MAX, std::path::Path::new("/x")));
    }
}
