//! The local state directory: paths, `state.json`, generated credentials
//! and the `up.pid` lock. Filesystem IO only (see the layout in the parent
//! module's documentation).

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use nix::fcntl::{Flock, FlockArg};
use rand::Rng;
use serde::{Deserialize, Serialize};

use super::ports::PortPlan;
use super::status::StatusSnapshot;
use crate::instance::protocol::SECRET_KEY_API_TOKEN;
use crate::plan::InstancePaths;

/// The accepted CR.
pub const CLUSTER_FILE: &str = "cluster.yaml";
/// Ids, ports, pids, status.
pub const STATE_FILE: &str = "state.json";
/// Generated credentials.
pub const SECRETS_DIR: &str = "secrets";
/// One directory per instance.
pub const INSTANCES_DIR: &str = "instances";
/// TLS Secrets, one directory each (`tls/<secret>/ca.crt`, `tls.crt`,
/// `tls.key`).
pub const TLS_DIR: &str = "tls";
/// Pid of the running `up`, locked while it runs.
pub const PID_FILE: &str = "up.pid";

/// Entries a state directory may contain; `--purge` refuses a directory
/// with anything else.
const KNOWN_ENTRIES: [&str; 9] = [
    CLUSTER_FILE,
    STATE_FILE,
    SECRETS_DIR,
    INSTANCES_DIR,
    TLS_DIR,
    PID_FILE,
    super::ha::SWITCHOVER_FILE,
    super::haproxy::DIR,
    super::apply::APPLY_FILE,
];

/// Prefix of temporary files written before a rename.
const TMP_PREFIX: &str = ".tmp-";

/// Paths inside one state directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    /// The state directory at `root`, made absolute (instance configs and
    /// status carry these paths; child processes must not depend on the
    /// working directory).
    pub fn new(root: &Path) -> io::Result<Self> {
        Ok(Self {
            root: std::path::absolute(root)?,
        })
    }

    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `cluster.yaml`.
    pub fn cluster_file(&self) -> PathBuf {
        self.root.join(CLUSTER_FILE)
    }

    /// `state.json`.
    pub fn state_file(&self) -> PathBuf {
        self.root.join(STATE_FILE)
    }

    /// `secrets/`.
    pub fn secrets_dir(&self) -> PathBuf {
        self.root.join(SECRETS_DIR)
    }

    /// `secrets/api-token`.
    pub fn token_file(&self) -> PathBuf {
        self.secrets_dir().join(SECRET_KEY_API_TOKEN)
    }

    /// `tls/<secret>/`: the files of the TLS Secret `secret` (what a pod
    /// mounts at `/etc/stratum/tls`).
    pub fn tls_dir(&self, secret: &str) -> PathBuf {
        self.root.join(TLS_DIR).join(secret)
    }

    /// `up.pid`.
    pub fn pid_file(&self) -> PathBuf {
        self.root.join(PID_FILE)
    }

    /// `instances/`.
    pub fn instances_dir(&self) -> PathBuf {
        self.root.join(INSTANCES_DIR)
    }

    /// `instances/<name>/`.
    pub fn instance_dir(&self, name: &str) -> PathBuf {
        self.instances_dir().join(name)
    }

    /// `instances/<name>/instance.json`.
    pub fn instance_config_file(&self, name: &str) -> PathBuf {
        self.instance_dir(name).join("instance.json")
    }

    /// `instances/<name>/manager.log`.
    pub fn manager_log(&self, name: &str) -> PathBuf {
        self.instance_dir(name).join("manager.log")
    }

    /// Where instance `name` keeps its data, extra volumes
    /// (`instances/<name>/volumes/<volume>`), runtime files and credentials.
    pub fn instance_paths(&self, name: &str, volumes: &[String]) -> InstancePaths {
        let dir = self.instance_dir(name);
        InstancePaths {
            data_dir: dir.join("data"),
            volumes: volumes
                .iter()
                .map(|v| (v.clone(), dir.join("volumes").join(v)))
                .collect(),
            run_dir: dir.join("run"),
            secrets_dir: self.secrets_dir(),
            token_file: self.token_file(),
            tls_dir: None,
        }
    }
}

/// Contents of `state.json`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LocalState {
    /// Cluster kind.
    pub kind: String,
    /// Cluster name.
    pub cluster: String,
    /// Cluster identity handed to every instance (random hex, generated
    /// once).
    pub cluster_id: String,
    /// Address everything listens on.
    pub listen: String,
    /// Ports, reused by every `up`.
    pub ports: PortPlan,
    /// Pid of the running `up`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub up_pid: Option<u32>,
    /// Pids of the running instance managers, by instance.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub managers: BTreeMap<String, u32>,
    /// The last status snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<StatusSnapshot>,
    /// Failover intent and facts (current/target primary, term, step,
    /// events), written before each action.
    #[serde(default)]
    pub ha: super::ha::HaState,
    /// Multi-writer (Galera) clusters: the writer, a pending bootstrap
    /// decision and events, written before each action.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub galera: Option<super::galera::GaleraState>,
    /// Pid of the HAProxy master serving `rw`/`ro` (Galera clusters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub haproxy: Option<u32>,
}

/// Read `state.json`; `None` when there is none yet.
pub fn read_state(dir: &StateDir) -> anyhow::Result<Option<LocalState>> {
    let path = dir.state_file();
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("failed to read {}", path.display())),
    };
    let state = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a Stratum local state file", path.display()))?;
    Ok(Some(state))
}

/// Write `state.json` atomically.
pub fn write_state(dir: &StateDir, state: &LocalState) -> anyhow::Result<()> {
    let mut bytes = serde_json::to_vec_pretty(state)?;
    bytes.push(b'\n');
    write_atomic(&dir.state_file(), &bytes, 0o644)
}

/// Write `path` atomically: a temporary file in the same directory, synced,
/// then renamed over `path`, so readers see the old or the new content.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    let parent = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = parent.join(format!("{TMP_PREFIX}{name}.{}", std::process::id()));
    let write = || -> io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        anyhow::Error::new(e).context(format!("failed to write {}", path.display()))
    })
}

/// Create a directory (and parents) with `mode` when missing.
pub fn create_dir(path: &Path, mode: u32) -> anyhow::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
        .with_context(|| format!("failed to create {}", path.display()))
}

/// Owner applied to files the database user must read or write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

/// Change the owner of `path` when an owner is given.
pub fn chown(path: &Path, owner: Option<Owner>) -> anyhow::Result<()> {
    if let Some(o) = owner {
        std::os::unix::fs::chown(path, Some(o.uid), Some(o.gid))
            .with_context(|| format!("failed to change the owner of {}", path.display()))?;
    }
    Ok(())
}

/// Length of generated credentials.
pub const SECRET_LEN: usize = 32;

/// A random string of URL-safe characters (`A-Za-z0-9-_`).
pub fn random_secret(len: usize) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut rng = rand::rng();
    (0..len)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// A random cluster id: 16 bytes as lower-case hex.
pub fn random_cluster_id() -> String {
    hex::encode(rand::rng().random::<[u8; 16]>())
}

/// Keys to generate: the engine's plus the API token, deduplicated, in a
/// stable order.
pub fn secret_keys(engine_keys: &[String]) -> Vec<String> {
    let mut keys: Vec<String> = engine_keys.to_vec();
    keys.push(SECRET_KEY_API_TOKEN.to_string());
    keys.sort();
    keys.dedup();
    keys
}

/// Create `secrets/` and every missing credential file (mode 0600, owned by
/// `owner`). Existing files are never overwritten. Returns the keys created.
pub fn ensure_secrets(
    dir: &StateDir,
    keys: &[String],
    owner: Option<Owner>,
) -> anyhow::Result<Vec<String>> {
    let secrets = dir.secrets_dir();
    create_dir(&secrets, 0o700)?;
    chown(&secrets, owner)?;
    let mut created = Vec::new();
    for key in keys {
        if key.is_empty() || key.contains('/') || key.starts_with('.') {
            anyhow::bail!("engine asked for a credential named {key:?}, which is not a file name");
        }
        let path = secrets.join(key);
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
        {
            Ok(mut f) => {
                f.write_all(random_secret(SECRET_LEN).as_bytes())
                    .and_then(|()| f.sync_all())
                    .with_context(|| format!("failed to write {}", path.display()))?;
                created.push(key.clone());
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(e).with_context(|| format!("failed to create {}", path.display()));
            }
        }
        chown(&path, owner)?;
    }
    Ok(created)
}

/// Check, before anything is written, that the engine's TLS Secret can be
/// used: a user's Secret (`generate: false`) must be in
/// `tls/<secret>/` with every key; a generated one must be complete or not
/// there at all (it is then generated by [`ensure_tls`]). The error names
/// the Secret and the missing key.
pub fn check_tls(dir: &StateDir, secret: &crate::engine::TlsSecret) -> anyhow::Result<()> {
    let path = dir.tls_dir(&secret.name);
    let untouched = secret.generate
        && crate::tls::KEYS
            .iter()
            .all(|k| fs::symlink_metadata(path.join(k)).is_err());
    if untouched {
        return Ok(());
    }
    crate::tls::check_dir(&path, &secret.name).map_err(|e| {
        let what = if secret.generate {
            "it was generated by an earlier `up` and is incomplete; restore the file, or delete the directory to generate a new CA (every member then restarts with it)"
        } else {
            "locally a Secret is a directory of files: put the Secret's ca.crt, tls.crt and tls.key there"
        };
        anyhow::anyhow!("{e}; {what}")
    })
}

/// Make the files of the engine's TLS Secret ready for the instances: a
/// generated Secret gets a new CA and a certificate for `names` the first
/// time (never overwritten afterwards, so it is kept across restarts); a
/// user's Secret is used as given. Files and directory are given to
/// `owner` (the database user reads them). Returns whether files were
/// generated. Fails as [`check_tls`] does on an incomplete Secret.
pub fn ensure_tls(
    dir: &StateDir,
    secret: &crate::engine::TlsSecret,
    cluster: &str,
    names: &[String],
    owner: Option<Owner>,
) -> anyhow::Result<bool> {
    // Complete, or (generated) not there at all: never overwritten.
    check_tls(dir, secret)?;
    let path = dir.tls_dir(&secret.name);
    create_dir(&dir.root().join(TLS_DIR), 0o755)?;
    create_dir(&path, 0o700)?;
    chown(&path, owner)?;
    let generated = secret.generate && crate::tls::check_dir(&path, &secret.name).is_err();
    if generated {
        let files = crate::tls::generate(cluster, names)?;
        for (key, text) in files.entries() {
            write_atomic(&path.join(key), text.as_bytes(), 0o600)?;
        }
    }
    for key in crate::tls::KEYS {
        chown(&path.join(key), owner)?;
    }
    Ok(generated)
}

/// Why the `up.pid` lock was not taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another `up` holds it.
    #[error(
        "another `stratum local up` (pid {pid}) is running on {dir}; stop it with `stratum local down --state-dir {dir}`"
    )]
    Held {
        /// Its pid, as written in the file (0 when unreadable).
        pid: u32,
        /// The state directory.
        dir: String,
    },
    /// Filesystem error.
    #[error("failed to lock {path}: {source}")]
    Io {
        /// `up.pid`.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// The `up.pid` file, exclusively flock-ed for as long as `up` runs. The
/// lock (not the pid) is what says "running": it is released when the
/// process dies however it dies, and cannot be confused with a reused pid.
/// Dropping it removes the file.
#[derive(Debug)]
pub struct UpLock {
    path: PathBuf,
    _lock: Flock<File>,
}

impl UpLock {
    /// Take the lock and write our pid. Retries briefly, as `status` takes
    /// a shared lock for an instant to test it.
    pub fn acquire(dir: &StateDir) -> Result<Self, LockError> {
        let path = dir.pid_file();
        let io_err = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        for attempt in 0..10 {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o644)
                .open(&path)
                .map_err(io_err)?;
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(mut lock) => {
                    // The file may have been removed by the previous owner
                    // between our open and our lock: only the inode still at
                    // `path` counts.
                    let ours = lock.metadata().map_err(io_err)?;
                    match fs::metadata(&path) {
                        Ok(m) if m.ino() == ours.ino() && m.dev() == ours.dev() => {}
                        _ => continue,
                    }
                    lock.set_len(0).map_err(io_err)?;
                    writeln!(lock, "{}", std::process::id()).map_err(io_err)?;
                    lock.sync_all().map_err(io_err)?;
                    return Ok(Self { path, _lock: lock });
                }
                Err((_, nix::errno::Errno::EWOULDBLOCK)) if attempt < 9 => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err((_, nix::errno::Errno::EWOULDBLOCK)) => break,
                Err((_, errno)) => return Err(io_err(io::Error::from(errno))),
            }
        }
        Err(LockError::Held {
            pid: read_pid(&path).unwrap_or(0),
            dir: dir.root().display().to_string(),
        })
    }
}

impl Drop for UpLock {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

fn read_pid(path: &Path) -> Option<u32> {
    let mut s = String::new();
    File::open(path).ok()?.read_to_string(&mut s).ok()?;
    s.trim().parse().ok()
}

/// The pid of the `up` running on `dir`, if one is: `up.pid` exists and is
/// locked. Read-only (a shared lock is taken and dropped at once when
/// nobody holds it).
pub fn running_pid(dir: &StateDir) -> Option<u32> {
    let path = dir.pid_file();
    let file = File::open(&path).ok()?;
    match Flock::lock(file, FlockArg::LockSharedNonblock) {
        Ok(_unlocked) => None,
        Err(_) => Some(read_pid(&path).unwrap_or(0)),
    }
}

/// Check that `dir` looks like a state directory before `--purge` deletes
/// it: it holds `state.json` or `cluster.yaml` and nothing we did not put
/// there.
pub fn check_purgeable(dir: &Path) -> anyhow::Result<()> {
    let entries = fs::read_dir(dir)
        .with_context(|| format!("failed to read {}", dir.display()))?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<io::Result<Vec<_>>>()
        .with_context(|| format!("failed to read {}", dir.display()))?;
    purgeable(&entries).map_err(|why| {
        anyhow::anyhow!(
            "refusing to purge {}: {why}; it does not look like a Stratum state directory",
            dir.display()
        )
    })
}

fn purgeable(entries: &[String]) -> Result<(), String> {
    if !entries.iter().any(|e| e == STATE_FILE || e == CLUSTER_FILE) {
        return Err(format!("it has neither {STATE_FILE} nor {CLUSTER_FILE}"));
    }
    if let Some(other) = entries
        .iter()
        .find(|e| !KNOWN_ENTRIES.contains(&e.as_str()) && !e.starts_with(TMP_PREFIX))
    {
        return Err(format!(
            "it contains {other:?}, which Stratum did not create"
        ));
    }
    Ok(())
}

/// Make `dir` traversable by other users (`o+x`), for a database user that
/// must reach its instance directory below it.
pub fn allow_traverse(dir: &Path) -> anyhow::Result<()> {
    let meta = fs::metadata(dir).with_context(|| format!("failed to stat {}", dir.display()))?;
    let mode = meta.permissions().mode();
    if mode & 0o001 == 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode((mode | 0o001) & 0o7777))
            .with_context(|| format!("failed to chmod o+x {}", dir.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_tls_secret_is_made_once_and_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::new(tmp.path()).unwrap();
        let secret = crate::engine::TlsSecret {
            name: "simple-pxc-ssl-internal".into(),
            generate: true,
        };
        check_tls(&dir, &secret).unwrap();
        let names = crate::tls::local_names("127.0.0.1");
        assert!(ensure_tls(&dir, &secret, "simple-pxc", &names, None).unwrap());
        let path = dir.tls_dir(&secret.name);
        let ca = fs::read(path.join("ca.crt")).unwrap();
        let mode = fs::metadata(path.join("tls.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // The next `up`: the same CA.
        check_tls(&dir, &secret).unwrap();
        assert!(!ensure_tls(&dir, &secret, "simple-pxc", &names, None).unwrap());
        assert_eq!(fs::read(path.join("ca.crt")).unwrap(), ca);
        // Part of it lost: an error naming the key, nothing regenerated.
        fs::remove_file(path.join("tls.key")).unwrap();
        let err = format!("{:#}", check_tls(&dir, &secret).unwrap_err());
        assert!(
            err.contains("TLS Secret simple-pxc-ssl-internal has no key tls.key"),
            "{err}"
        );
        assert!(ensure_tls(&dir, &secret, "simple-pxc", &names, None).is_err());
        assert_eq!(fs::read(path.join("ca.crt")).unwrap(), ca);
        check_purgeable(tmp.path()).unwrap_err(); // no state.json: not a state dir
        fs::write(dir.state_file(), "{}").unwrap();
        check_purgeable(tmp.path()).unwrap();
    }

    #[test]
    fn a_users_tls_secret_must_be_complete() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::new(tmp.path()).unwrap();
        let secret = crate::engine::TlsSecret {
            name: "my-certs".into(),
            generate: false,
        };
        let err = format!("{:#}", check_tls(&dir, &secret).unwrap_err());
        assert!(
            err.contains("TLS Secret my-certs has no key ca.crt"),
            "{err}"
        );
        assert!(err.contains("tls/my-certs/ca.crt"), "{err}");
        let path = dir.tls_dir("my-certs");
        create_dir(&path, 0o700).unwrap();
        fs::write(path.join("ca.crt"), "ca").unwrap();
        fs::write(path.join("tls.crt"), "crt").unwrap();
        let err = format!("{:#}", check_tls(&dir, &secret).unwrap_err());
        assert!(err.contains("has no key tls.key"), "{err}");
        fs::write(path.join("tls.key"), "key").unwrap();
        check_tls(&dir, &secret).unwrap();
        // Used as given, never replaced.
        assert!(!ensure_tls(&dir, &secret, "c", &[], None).unwrap());
        assert_eq!(fs::read_to_string(path.join("tls.key")).unwrap(), "key");
    }

    #[test]
    fn secrets_are_url_safe_and_random() {
        let a = random_secret(SECRET_LEN);
        let b = random_secret(SECRET_LEN);
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
        assert!(
            a.bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        );
        let id = random_cluster_id();
        assert_eq!(id.len(), 32);
        assert!(id.bytes().all(|c| c.is_ascii_hexdigit()));
    }

    #[test]
    fn secret_keys_always_include_the_api_token() {
        let keys = secret_keys(&["app-password".into(), "api-token".into()]);
        assert_eq!(keys, ["api-token", "app-password"]);
    }

    #[test]
    fn secrets_are_created_once_with_mode_0600() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::new(tmp.path()).unwrap();
        let keys = secret_keys(&["app-password".into()]);
        let created = ensure_secrets(&dir, &keys, None).unwrap();
        assert_eq!(created.len(), 2);
        let path = dir.secrets_dir().join("app-password");
        let first = fs::read_to_string(&path).unwrap();
        assert_eq!(first.len(), SECRET_LEN);
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(ensure_secrets(&dir, &keys, None).unwrap().is_empty());
        assert_eq!(fs::read_to_string(&path).unwrap(), first);
        assert!(ensure_secrets(&dir, &["../x".into()], None).is_err());
    }

    #[test]
    fn lock_is_exclusive_and_removed_on_drop() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::new(tmp.path()).unwrap();
        assert_eq!(running_pid(&dir), None);
        let lock = UpLock::acquire(&dir).unwrap();
        assert_eq!(running_pid(&dir), Some(std::process::id()));
        match UpLock::acquire(&dir) {
            Err(LockError::Held { pid, .. }) => assert_eq!(pid, std::process::id()),
            other => panic!("{other:?}"),
        }
        drop(lock);
        assert!(!dir.pid_file().exists());
        assert_eq!(running_pid(&dir), None);
        // A stale file left by a killed `up` is not "running".
        fs::write(dir.pid_file(), "999999\n").unwrap();
        assert_eq!(running_pid(&dir), None);
        drop(UpLock::acquire(&dir).unwrap());
    }

    #[test]
    fn purge_guard() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert!(purgeable(&s(&["state.json", "secrets", "instances", "up.pid"])).is_ok());
        assert!(purgeable(&s(&["cluster.yaml", ".tmp-state.json.12"])).is_ok());
        assert!(purgeable(&s(&[])).is_err());
        let err = purgeable(&s(&["state.json", "Documents"])).unwrap_err();
        assert!(err.contains("Documents"), "{err}");
        assert!(purgeable(&s(&["notes.txt"])).is_err());
    }

    #[test]
    fn state_round_trips_atomically() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::new(tmp.path()).unwrap();
        assert_eq!(read_state(&dir).unwrap(), None);
        let st = LocalState {
            kind: "FakeCluster".into(),
            cluster: "simple-fake".into(),
            cluster_id: "ab".into(),
            listen: "127.0.0.1".into(),
            ..Default::default()
        };
        write_state(&dir, &st).unwrap();
        assert_eq!(read_state(&dir).unwrap(), Some(st));
        let names: Vec<_> = fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["state.json"]);
    }
}
