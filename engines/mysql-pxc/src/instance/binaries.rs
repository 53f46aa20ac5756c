//! Finding the Galera server binaries, the provider library and the SST
//! tool of a flavor. Reads the filesystem only.

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use operator_core::engine::InstanceError;

use crate::api::{Flavor, SstMethod};

/// Environment variable naming the server's binary directory when the
/// instance configuration does not (`binDir`).
pub const ENV_BIN_DIR: &str = "STRATUM_GALERA_BIN_DIR";
/// Environment variable naming the Galera provider library.
pub const ENV_PROVIDER: &str = "STRATUM_GALERA_PROVIDER";

/// Directories searched after `binDir`/`$STRATUM_GALERA_BIN_DIR` and
/// `PATH` (Debian installs the servers in `/usr/sbin`, often not on a
/// non-root `PATH`).
pub const SYSTEM_DIRS: &[&str] = &["/usr/sbin", "/usr/bin", "/usr/local/bin", "/usr/local/sbin"];

/// What to install, per flavor.
pub fn install_hint(flavor: Flavor) -> String {
    match flavor {
        Flavor::MariaDB => format!(
            "install MariaDB with Galera (Debian: apt-get install mariadb-server galera-4 mariadb-backup rsync socat; scripts/setup.sh does it) or set {ENV_BIN_DIR}"
        ),
        Flavor::PerconaXtraDB => format!(
            "install Percona XtraDB Cluster 8.0 (percona-xtradb-cluster from repo.percona.com, which brings percona-xtrabackup-80) or set {ENV_BIN_DIR}"
        ),
    }
}

/// The server binary of a flavor.
pub fn server_binary(flavor: Flavor) -> &'static str {
    match flavor {
        Flavor::MariaDB => "mariadbd",
        Flavor::PerconaXtraDB => "mysqld",
    }
}

/// The Galera provider library's usual locations (Debian's galera-4;
/// Percona's packages).
pub fn provider_candidates(flavor: Flavor) -> &'static [&'static str] {
    match flavor {
        Flavor::MariaDB => &[
            "/usr/lib/galera/libgalera_smm.so",
            "/usr/lib/galera4/libgalera_smm.so",
            "/usr/lib64/galera-4/libgalera_smm.so",
        ],
        Flavor::PerconaXtraDB => &[
            "/usr/lib/galera4/libgalera_smm.so",
            "/usr/lib64/galera4/libgalera_smm.so",
            "/usr/lib/libgalera_smm.so",
        ],
    }
}

/// The binaries the SST method runs on donor and joiner (besides the
/// `wsrep_sst_<method>` script the server package ships).
pub fn sst_tools(method: SstMethod) -> &'static [&'static str] {
    match method {
        SstMethod::Mariabackup => &["mariabackup", "socat"],
        SstMethod::Rsync => &["rsync"],
        SstMethod::XtrabackupV2 => &["xtrabackup", "socat"],
    }
}

/// Resolved binaries of one instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Binaries {
    /// `mariadbd` or `mysqld`.
    pub server: PathBuf,
    /// `mariadb-install-db` (MariaDB); `None` for PerconaXtraDB, which
    /// initialises with `mysqld --initialize-insecure`.
    pub install_db: Option<PathBuf>,
    /// The Galera provider (`wsrep_provider`).
    pub provider: PathBuf,
    /// The directory of the server binary (put first on the server's
    /// `PATH`, so its SST scripts find their siblings).
    pub dir: PathBuf,
    /// How the directory was found (for messages).
    pub source: String,
}

/// Inputs of [`resolve`] (environment and configuration), so that the
/// lookup is testable without touching the process environment.
#[derive(Clone, Debug, Default)]
pub struct Lookup {
    /// The instance configuration's `binDir`.
    pub config_dir: Option<PathBuf>,
    /// `$STRATUM_GALERA_BIN_DIR`.
    pub env_dir: Option<OsString>,
    /// `$STRATUM_GALERA_PROVIDER`.
    pub env_provider: Option<OsString>,
    /// `$PATH`.
    pub path_var: Option<OsString>,
    /// Directories searched last ([`SYSTEM_DIRS`] normally).
    pub system_dirs: Vec<PathBuf>,
    /// Provider locations ([`provider_candidates`] normally).
    pub providers: Vec<PathBuf>,
}

impl Lookup {
    /// The lookup from this process's environment.
    pub fn from_env(config_dir: Option<&Path>, flavor: Flavor) -> Self {
        Self {
            config_dir: config_dir.map(Path::to_path_buf),
            env_dir: std::env::var_os(ENV_BIN_DIR),
            env_provider: std::env::var_os(ENV_PROVIDER),
            path_var: std::env::var_os("PATH"),
            system_dirs: SYSTEM_DIRS.iter().map(PathBuf::from).collect(),
            providers: provider_candidates(flavor)
                .iter()
                .map(PathBuf::from)
                .collect(),
        }
    }
}

/// Find the server (`binDir`, else `$STRATUM_GALERA_BIN_DIR`, else `PATH`,
/// else the system directories), the initialisation tool next to it or on
/// the search path, the provider and the SST tools. The error names the
/// first thing missing and what to install.
pub fn resolve(lookup: &Lookup, flavor: Flavor, sst: SstMethod) -> Result<Binaries, InstanceError> {
    let hint = install_hint(flavor);
    let server_name = server_binary(flavor);
    let missing = |binary: &str, where_: String| InstanceError::MissingBinary {
        binary: binary.to_string(),
        hint: format!("{where_}; {hint}"),
    };
    // An explicit directory is the only place looked at.
    let explicit = lookup
        .config_dir
        .as_ref()
        .map(|d| (d.clone(), "binDir".to_string()))
        .or_else(|| {
            lookup
                .env_dir
                .as_ref()
                .filter(|d| !d.is_empty())
                .map(|d| (PathBuf::from(d), format!("${ENV_BIN_DIR}")))
        });
    let search: Vec<(PathBuf, String)> = match &explicit {
        Some(found) => vec![found.clone()],
        None => lookup
            .path_var
            .as_ref()
            .map(|p| std::env::split_paths(p).collect::<Vec<_>>())
            .unwrap_or_default()
            .into_iter()
            .map(|d| (d, "PATH".to_string()))
            .chain(
                lookup
                    .system_dirs
                    .iter()
                    .map(|d| (d.clone(), d.display().to_string())),
            )
            .collect(),
    };
    let describe = || match &explicit {
        Some((dir, source)) => format!("no executable {{}} in {} (from {source})", dir.display()),
        None => "{} is not in PATH nor in /usr/sbin, /usr/bin".to_string(),
    };
    let find = |name: &str| {
        search
            .iter()
            .map(|(d, s)| (d.join(name), d, s))
            .find(|(p, _, _)| is_executable(p))
            .map(|(p, d, s)| (p, d.clone(), s.clone()))
    };
    let (server, dir, source) = find(server_name)
        .ok_or_else(|| missing(server_name, describe().replace("{}", server_name)))?;
    let install_db = match flavor {
        Flavor::MariaDB => Some(find("mariadb-install-db").map(|(p, _, _)| p).ok_or_else(
            || {
                missing(
                    "mariadb-install-db",
                    describe().replace("{}", "mariadb-install-db"),
                )
            },
        )?),
        Flavor::PerconaXtraDB => None,
    };
    let provider = match lookup.env_provider.as_ref().filter(|p| !p.is_empty()) {
        Some(p) => {
            let p = PathBuf::from(p);
            if !p.is_file() {
                return Err(missing(
                    "the Galera provider",
                    format!("{} (from ${ENV_PROVIDER}) does not exist", p.display()),
                ));
            }
            p
        }
        None => lookup
            .providers
            .iter()
            .find(|p| p.is_file())
            .cloned()
            .ok_or_else(|| {
                missing(
                    "the Galera provider libgalera_smm.so",
                    format!(
                        "none of {} exists (or set ${ENV_PROVIDER})",
                        lookup
                            .providers
                            .iter()
                            .map(|p| p.display().to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )
            })?,
    };
    // SST tools may live anywhere on the search path or next to the
    // server: the SST script runs them from the server's PATH.
    for tool in sst_tools(sst) {
        let on_path = find(tool).is_some()
            || SYSTEM_DIRS
                .iter()
                .any(|d| is_executable(&Path::new(d).join(tool)));
        if !on_path {
            return Err(missing(
                tool,
                format!(
                    "SST method {} needs {tool}, which is not in {} nor in PATH",
                    sst.as_str(),
                    dir.display()
                ),
            ));
        }
    }
    Ok(Binaries {
        server,
        install_db,
        provider,
        dir,
        source,
    })
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exe(dir: &Path, name: &str) {
        std::fs::create_dir_all(dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn lookup(tmp: &Path, config_dir: Option<&Path>) -> Lookup {
        Lookup {
            config_dir: config_dir.map(Path::to_path_buf),
            system_dirs: vec![tmp.join("sbin")],
            providers: vec![tmp.join("galera/libgalera_smm.so")],
            ..Default::default()
        }
    }

    #[test]
    fn finds_server_tools_and_provider() {
        let tmp = tempfile::tempdir().unwrap();
        let sbin = tmp.path().join("sbin");
        for name in [
            "mariadbd",
            "mariadb-install-db",
            "mariabackup",
            "socat",
            "rsync",
        ] {
            exe(&sbin, name);
        }
        std::fs::create_dir_all(tmp.path().join("galera")).unwrap();
        std::fs::write(tmp.path().join("galera/libgalera_smm.so"), "").unwrap();
        let got = resolve(
            &lookup(tmp.path(), None),
            Flavor::MariaDB,
            SstMethod::Mariabackup,
        )
        .unwrap();
        assert_eq!(got.server, sbin.join("mariadbd"));
        assert_eq!(got.install_db, Some(sbin.join("mariadb-install-db")));
        assert_eq!(got.provider, tmp.path().join("galera/libgalera_smm.so"));
        // PerconaXtraDB looks for mysqld.
        let err = resolve(
            &lookup(tmp.path(), None),
            Flavor::PerconaXtraDB,
            SstMethod::XtrabackupV2,
        )
        .unwrap_err();
        assert!(
            matches!(&err, InstanceError::MissingBinary { binary, .. } if binary == "mysqld"),
            "{err}"
        );
        assert!(err.to_string().contains("Percona XtraDB Cluster"), "{err}");
    }

    #[test]
    fn missing_pieces_name_what_to_install() {
        let tmp = tempfile::tempdir().unwrap();
        let empty = tmp.path().join("empty");
        std::fs::create_dir_all(&empty).unwrap();
        let err = resolve(
            &lookup(tmp.path(), Some(&empty)),
            Flavor::MariaDB,
            SstMethod::Mariabackup,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("mariadbd not found"), "{err}");
        assert!(err.contains(&empty.display().to_string()), "{err}");
        assert!(
            err.contains("apt-get install mariadb-server galera-4"),
            "{err}"
        );

        let sbin = tmp.path().join("sbin");
        exe(&sbin, "mariadbd");
        exe(&sbin, "mariadb-install-db");
        let err = resolve(
            &lookup(tmp.path(), None),
            Flavor::MariaDB,
            SstMethod::Mariabackup,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("libgalera_smm.so"), "{err}");
        std::fs::create_dir_all(tmp.path().join("galera")).unwrap();
        std::fs::write(tmp.path().join("galera/libgalera_smm.so"), "").unwrap();
        // mariabackup may still be found in the real /usr/bin: only check
        // a tool no system has.
        let err = resolve(
            &lookup(tmp.path(), None),
            Flavor::PerconaXtraDB,
            SstMethod::XtrabackupV2,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("mysqld"), "{err}");
    }
}
