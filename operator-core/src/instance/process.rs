//! Process and filesystem helpers for instance drivers: runs one-shot
//! commands (as the database user when the manager is root), changes file
//! ownership, creates directories and private files. Does local process and
//! filesystem IO only.

use std::ffi::OsStr;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use nix::unistd::{Gid, Uid, User};

use super::config::InstanceConfig;
use crate::engine::InstanceError;

/// How many trailing lines of a failed command's output go into its error.
const ERROR_OUTPUT_LINES: usize = 20;

/// The unprivileged Unix user database processes run as when the manager
/// runs as root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunAs {
    /// User name.
    pub name: String,
    /// User id.
    pub uid: Uid,
    /// Primary group id.
    pub gid: Gid,
}

impl RunAs {
    /// Look `name` up in the user database.
    pub fn lookup(name: &str) -> Result<Self, InstanceError> {
        match User::from_name(name) {
            Ok(Some(user)) => Ok(Self {
                name: user.name,
                uid: user.uid,
                gid: user.gid,
            }),
            Ok(None) => Err(InstanceError::Settings(format!(
                "runAsUser {name:?} does not exist on this machine; create it (useradd --system {name}) or change runAsUser"
            ))),
            Err(e) => Err(InstanceError::Settings(format!(
                "failed to look up runAsUser {name:?}: {e}"
            ))),
        }
    }

    /// The user to drop to for `config`: `Some` only when this process runs
    /// as root and `run_as_user` is set. Otherwise commands run as the
    /// current user.
    pub fn for_config(config: &InstanceConfig) -> Result<Option<Self>, InstanceError> {
        match &config.run_as_user {
            Some(name) if running_as_root() => Self::lookup(name).map(Some),
            _ => Ok(None),
        }
    }
}

/// Whether this process has root privileges (effective uid 0).
pub fn running_as_root() -> bool {
    Uid::effective().is_root()
}

/// A command for `program` that runs as `run_as` when given (uid, gid; the
/// standard library drops supplementary groups), in its own process group,
/// with stdin closed, working directory `/` (the user may not be allowed
/// into ours), and killed when the handle is dropped (so a cancelled
/// `prepare` leaves nothing behind).
pub fn command(program: impl AsRef<OsStr>, run_as: Option<&RunAs>) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(program);
    cmd.stdin(Stdio::null())
        .current_dir("/")
        .process_group(0)
        .kill_on_drop(true);
    if let Some(user) = run_as {
        cmd.uid(user.uid.as_raw()).gid(user.gid.as_raw());
    }
    cmd
}

/// Run `cmd` to completion, capturing its output. Returns stdout. On a
/// non-zero exit the error names `what` and carries the exit status and the
/// last lines of stderr and stdout.
pub async fn run_captured(
    mut cmd: tokio::process::Command,
    what: &str,
) -> Result<String, InstanceError> {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let output = cmd.output().await.map_err(|e| InstanceError::Command {
        command: what.to_string(),
        message: format!("could not start: {e}"),
    })?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if output.status.success() {
        return Ok(stdout);
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let mut message = format!("{}", output.status);
    for (name, text) in [("stderr", stderr.as_ref()), ("stdout", stdout.as_str())] {
        let tail = tail_lines(text, ERROR_OUTPUT_LINES);
        if !tail.is_empty() {
            message.push_str(&format!("\n{name}:\n{tail}"));
        }
    }
    Err(InstanceError::Command {
        command: what.to_string(),
        message,
    })
}

/// The last `n` non-empty lines of `text`, joined by newlines.
pub fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Create `path` and its missing parents; set `mode` on `path` itself
/// (whether it was created now or existed).
pub fn create_dir_with_mode(path: &Path, mode: u32) -> Result<(), InstanceError> {
    fs::create_dir_all(path).map_err(InstanceError::io("create directory", path))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(InstanceError::io("set permissions of", path))
}

/// Change the owner of `path` and everything below it to `user`, like
/// `chown -R`. Symbolic links are changed themselves and never followed, so
/// a link cannot hand the user a file outside the tree.
pub fn chown_tree(path: &Path, user: &RunAs) -> Result<(), InstanceError> {
    let mut stack: Vec<PathBuf> = vec![path.to_path_buf()];
    while let Some(p) = stack.pop() {
        chown_one(&p, user)?;
        let meta = fs::symlink_metadata(&p).map_err(InstanceError::io("inspect", &p))?;
        if meta.is_dir() {
            for entry in fs::read_dir(&p).map_err(InstanceError::io("read directory", &p))? {
                let entry = entry.map_err(InstanceError::io("read directory", &p))?;
                stack.push(entry.path());
            }
        }
    }
    Ok(())
}

/// Change the owner of `path` alone (not following a symbolic link).
pub fn chown_one(path: &Path, user: &RunAs) -> Result<(), InstanceError> {
    std::os::unix::fs::lchown(path, Some(user.uid.as_raw()), Some(user.gid.as_raw()))
        .map_err(InstanceError::io("change owner of", path))
}

/// Write `contents` to `path` atomically (temporary file and rename) with
/// `mode`, owned by `owner` when given. Used for rendered configuration and
/// password files, which must never be seen half-written or with a looser
/// mode.
pub fn write_file(
    path: &Path,
    contents: &[u8],
    mode: u32,
    owner: Option<&RunAs>,
) -> Result<(), InstanceError> {
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{file_name}.tmp"));
    let _ = fs::remove_file(&tmp);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(InstanceError::io("create", &tmp))?;
    // The umask may have narrowed the mode at creation; make it exact.
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(InstanceError::io("set permissions of", &tmp))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(InstanceError::io("write", &tmp))?;
    if let Some(user) = owner {
        chown_one(&tmp, user)?;
    }
    fs::rename(&tmp, path).map_err(InstanceError::io("rename into place", path))
}

/// Remove `path` (a file) when it exists.
pub fn remove_file_if_exists(path: &Path) -> Result<(), InstanceError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(InstanceError::io("remove", path)(e))
        }
        _ => Ok(()),
    }
}

/// Remove the directory tree at `path` when it exists.
pub fn remove_dir_if_exists(path: &Path) -> Result<(), InstanceError> {
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(InstanceError::io("remove", path)(e))
        }
        _ => Ok(()),
    }
}

/// A file deleted when this guard is dropped (temporary password files).
#[derive(Debug)]
pub struct TempFile {
    path: PathBuf,
}

impl TempFile {
    /// Write a private file (mode 0600, owned by `owner`) removed on drop.
    pub fn private(
        path: PathBuf,
        contents: &[u8],
        owner: Option<&RunAs>,
    ) -> Result<Self, InstanceError> {
        write_file(&path, contents, 0o600, owner)?;
        Ok(Self { path })
    }

    /// Where the file is.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_last_non_empty_lines() {
        assert_eq!(tail_lines("a\n\nb\nc\n\n", 2), "b\nc");
        assert_eq!(tail_lines("a", 5), "a");
        assert_eq!(tail_lines("", 5), "");
    }

    #[test]
    fn write_file_sets_exact_mode_and_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("secret");
        write_file(&p, b"one", 0o600, None).unwrap();
        write_file(&p, b"two", 0o640, None).unwrap();
        assert_eq!(fs::read_to_string(&p).unwrap(), "two");
        let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
    }

    #[test]
    fn temp_file_is_removed_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pw");
        {
            let f = TempFile::private(p.clone(), b"x", None).unwrap();
            assert!(f.path().exists());
        }
        assert!(!p.exists());
    }

    #[test]
    fn create_dir_sets_mode_on_existing_dir() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a/b");
        create_dir_with_mode(&p, 0o755).unwrap();
        create_dir_with_mode(&p, 0o700).unwrap();
        let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }

    #[tokio::test]
    async fn failed_command_reports_status_and_output() {
        let mut cmd = command("sh", None);
        cmd.args(["-c", "echo out; echo boom >&2; exit 3"]);
        let err = run_captured(cmd, "sh test").await.unwrap_err().to_string();
        assert!(err.starts_with("sh test failed: exit status: 3"), "{err}");
        assert!(err.contains("boom") && err.contains("out"), "{err}");
    }
}
