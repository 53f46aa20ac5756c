//! What a server process leaves behind, and how it is cleared. Reads
//! `/proc`, sends signals, and keeps one file in the run directory.
//!
//! The manager starts the server as the leader of its own process group.
//! Its helpers live in that group too, but not all of them, and not for
//! ever: MariaDB's SST script (`wsrep_sst_mariabackup`, started by
//! mariadbd) runs `timeout … socat`, and `timeout` moves itself into a
//! group of its own. When the server exits (an abort, a kill -9), these
//! helpers are reparented and keep running: the joiner's script holds its
//! pid file and `socat` its SST port for up to `sst-initial-timeout`
//! (300 s), and every new start of the server aborts on "previous SST
//! script still running" — a member that never rejoins. So, whenever a
//! server ends, every process of its group *and every descendant of
//! those* is killed ([`kill_leftovers`]).
//!
//! A manager killed outright (SIGKILL) cannot do that; the server it
//! started would run on without supervision. The manager therefore
//! records the server it starts ([`SERVER_RECORD`]), and whoever comes
//! next — the manager's next start, or the local runtime that supervised
//! it — stops a recorded server that still runs ([`stop_recorded`]).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// The record of the running server in the run directory: its pid (the
/// leader of its process group), its program and its clean-stop signal
/// (the engine's: SIGINT, a fast shutdown, for PostgreSQL), one per line.
pub const SERVER_RECORD: &str = "server.process";

/// `(ppid, pgid, zombie)` of `pid` from `/proc/<pid>/stat`.
fn stat(pid: i32) -> Option<(i32, i32, bool)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: the fields follow
    // the last ')'.
    let (_, rest) = text.rsplit_once(") ")?;
    let mut f = rest.split_whitespace();
    let state = f.next()?;
    let ppid = f.next()?.parse().ok()?;
    let pgid = f.next()?.parse().ok()?;
    Some((ppid, pgid, state == "Z"))
}

/// Every live process: `(pid, ppid, pgid)` (zombies left out: they are
/// gone, only not reaped yet).
fn processes() -> Vec<(i32, i32, i32)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let (ppid, pgid, zombie) = stat(pid)?;
            (!zombie).then_some((pid, ppid, pgid))
        })
        .collect()
}

/// The live processes of process group `pgid` and all their descendants
/// (followed by parent pid, so helpers that moved to groups of their own
/// are found too), never this process.
pub fn group_and_descendants(pgid: i32) -> Vec<i32> {
    let all = processes();
    let me = std::process::id() as i32;
    let mut found: BTreeSet<i32> = all
        .iter()
        .filter(|(pid, _, g)| *g == pgid && *pid != me)
        .map(|(pid, _, _)| *pid)
        .collect();
    loop {
        let more: Vec<i32> = all
            .iter()
            .filter(|(pid, ppid, _)| found.contains(ppid) && !found.contains(pid) && *pid != me)
            .map(|(pid, _, _)| *pid)
            .collect();
        if more.is_empty() {
            return found.into_iter().collect();
        }
        found.extend(more);
    }
}

/// SIGKILL the processes of group `pgid` and their descendants; repeated
/// (a few rounds) while new ones appear, as a dying script may still
/// fork. Returns how many were signalled.
pub fn kill_leftovers(pgid: i32) -> usize {
    let mut killed = BTreeSet::new();
    for _ in 0..5 {
        let pids: Vec<i32> = group_and_descendants(pgid)
            .into_iter()
            .filter(|p| !killed.contains(p))
            .collect();
        if pids.is_empty() {
            break;
        }
        for pid in pids {
            if kill(Pid::from_raw(pid), Signal::SIGKILL).is_ok() {
                killed.insert(pid);
            }
        }
    }
    reap_adopted(&killed);
    killed.len()
}

/// Reap those of `pids` that are this process's children: as a pod's PID 1
/// the manager adopts the orphans of its server, and nobody else would
/// collect their exit. Only these pids are waited for, never `-1`, which
/// would take the exit status of a child tokio waits for.
fn reap_adopted(pids: &BTreeSet<i32>) {
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    let me = std::process::id() as i32;
    let deadline = Instant::now() + Duration::from_millis(500);
    for pid in pids {
        if stat(*pid).is_none_or(|(ppid, _, _)| ppid != me) {
            continue;
        }
        while let Ok(WaitStatus::StillAlive) =
            waitpid(Pid::from_raw(*pid), Some(WaitPidFlag::WNOHANG))
        {
            if Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Record the server just started (see [`SERVER_RECORD`]).
pub fn record(run_dir: &Path, pid: i32, program: &Path, stop_signal: i32) -> std::io::Result<()> {
    std::fs::write(
        run_dir.join(SERVER_RECORD),
        format!("{pid}\n{}\n{stop_signal}\n", program.display()),
    )
}

/// Forget the recorded server (it is gone).
pub fn forget(run_dir: &Path) {
    let _ = std::fs::remove_file(run_dir.join(SERVER_RECORD));
}

/// The recorded server's pid, program and stop signal (SIGTERM when the
/// record does not say).
fn read_record(run_dir: &Path) -> Option<(i32, PathBuf, Signal)> {
    let text = std::fs::read_to_string(run_dir.join(SERVER_RECORD)).ok()?;
    let mut lines = text.lines();
    let pid = lines.next()?.trim().parse().ok()?;
    let program = PathBuf::from(lines.next()?.trim());
    let signal = lines
        .next()
        .and_then(|l| l.trim().parse::<i32>().ok())
        .and_then(|n| Signal::try_from(n).ok())
        .unwrap_or(Signal::SIGTERM);
    Some((pid, program, signal))
}

/// Whether `pid` is alive, leads its process group and runs `program`
/// (so a pid reused since the record was written is never signalled).
fn is_recorded_server(pid: i32, program: &Path) -> bool {
    let Some((_, pgid, zombie)) = stat(pid) else {
        return false;
    };
    if zombie || pgid != pid {
        return false;
    }
    let Ok(exe) = std::fs::read_link(format!("/proc/{pid}/exe")) else {
        return false;
    };
    let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    canon(&exe) == canon(program)
}

/// Stop a server recorded in `run_dir` that still runs although the
/// manager that started it is gone: its recorded stop signal (a clean
/// stop), up to `grace` to exit, then SIGKILL to what is left of its group
/// and their descendants. Helpers of a recorded server that itself is gone
/// are killed too. The record is removed. Returns what was done, `None`
/// when nothing was left.
pub async fn stop_recorded(run_dir: &Path, grace: Duration) -> Option<String> {
    let (pid, program, signal) = read_record(run_dir)?;
    let mut what = None;
    if is_recorded_server(pid, &program) {
        let _ = kill(Pid::from_raw(pid), signal);
        let deadline = Instant::now() + grace;
        while is_recorded_server(pid, &program) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        what = Some(if is_recorded_server(pid, &program) {
            format!(
                "{} (pid {pid}) did not stop within {}s after {signal}; killed",
                program.display(),
                grace.as_secs()
            )
        } else {
            format!("{} (pid {pid}) stopped with {signal}", program.display())
        });
    }
    let n = kill_leftovers(pid);
    if n > 0 && what.is_none() {
        what = Some(format!(
            "{n} leftover process(es) of {} (pid {pid}, gone) killed",
            program.display()
        ));
    }
    forget(run_dir);
    what
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A shell in its own group that starts a helper in yet another group
    /// (`setsid` stands in for `timeout`'s own group) and then exits, as an
    /// aborting server leaves its SST script: the helper is still found
    /// through the orphaned middle process and killed.
    #[tokio::test]
    async fn helpers_in_other_groups_are_found_and_killed() {
        let mut cmd = tokio::process::Command::new("sh");
        cmd.args(["-c", "sh -c 'setsid sleep 300 & wait' & sleep 300"])
            .process_group(0);
        let mut child = cmd.spawn().unwrap();
        let leader = child.id().unwrap() as i32;
        let deadline = Instant::now() + Duration::from_secs(5);
        while group_and_descendants(leader).len() < 3 {
            assert!(
                Instant::now() < deadline,
                "{:?}",
                group_and_descendants(leader)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The leader dies alone (as a server killed by a signal).
        kill(Pid::from_raw(leader), Signal::SIGKILL).unwrap();
        child.wait().await.unwrap();
        let left = group_and_descendants(leader);
        assert!(left.len() >= 2, "the orphaned helpers: {left:?}");
        assert!(kill_leftovers(leader) >= 2);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !group_and_descendants(leader).is_empty() {
            assert!(
                Instant::now() < deadline,
                "{:?}",
                group_and_descendants(leader)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn a_recorded_server_is_stopped_and_a_reused_pid_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let sleep = PathBuf::from("/bin/sleep");
        let mut cmd = tokio::process::Command::new(&sleep);
        cmd.arg("300").process_group(0);
        let mut child = cmd.spawn().unwrap();
        let pid = child.id().unwrap() as i32;
        // A record naming another program is a reused pid: left alone.
        record(dir.path(), pid, Path::new("/usr/sbin/mariadbd"), 15).unwrap();
        assert!(!is_recorded_server(pid, Path::new("/usr/sbin/mariadbd")));
        record(dir.path(), pid, &sleep, Signal::SIGINT as i32).unwrap();
        let what = stop_recorded(dir.path(), Duration::from_secs(5))
            .await
            .unwrap();
        assert!(what.contains("stopped with SIGINT"), "{what}");
        child.wait().await.unwrap();
        assert!(!dir.path().join(SERVER_RECORD).exists());
        assert_eq!(stop_recorded(dir.path(), Duration::ZERO).await, None);
    }
}
