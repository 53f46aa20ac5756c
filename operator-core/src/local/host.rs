//! The unix user the database processes run as when `up` runs as root:
//! looks it up, creates it with `useradd` when missing, and checks that it
//! can reach the state directory. Reads the user database and the
//! filesystem; may run `useradd`.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use anyhow::Context;
use nix::unistd::User;

use super::state::Owner;

/// The database user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DbUser {
    /// Login name.
    pub name: String,
    /// Ids.
    pub owner: Owner,
}

/// Whether this process runs as root (and must drop privileges for the
/// databases).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Look `name` up; create it as a system user without a home or shell when
/// missing.
pub fn ensure_user(name: &str) -> anyhow::Result<DbUser> {
    if let Some(u) = lookup(name)? {
        return Ok(u);
    }
    tracing::info!(user = name, "creating the database user");
    let out = Command::new("useradd")
        .args([
            "--system",
            "--user-group",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            name,
        ])
        .output()
        .with_context(|| {
            format!("failed to run useradd to create the database user {name}; create it, or pass --user with an existing user")
        })?;
    if !out.status.success() {
        anyhow::bail!(
            "useradd {name} failed ({}): {}; create the user, or pass --user with an existing user",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    lookup(name)?.ok_or_else(|| anyhow::anyhow!("user {name} still missing after useradd"))
}

fn lookup(name: &str) -> anyhow::Result<Option<DbUser>> {
    let user = User::from_name(name).with_context(|| format!("failed to look up user {name}"))?;
    Ok(user.map(|u| DbUser {
        name: name.to_string(),
        owner: Owner {
            uid: u.uid.as_raw(),
            gid: u.gid.as_raw(),
        },
    }))
}

/// Check that `user` can traverse every existing ancestor of `dir` (the
/// directory itself is made traversable by `up`). The error names the
/// first ancestor in the way and what to do.
pub fn check_traversable(dir: &Path, user: &DbUser) -> anyhow::Result<()> {
    for ancestor in dir.ancestors().skip(1) {
        let Ok(meta) = std::fs::metadata(ancestor) else {
            // Does not exist yet: `up` creates it with mode 0755.
            continue;
        };
        let mode = meta.permissions().mode();
        if !can_search(mode, meta.uid(), meta.gid(), user.owner) {
            anyhow::bail!(
                "the database user {} cannot reach {}: {} (mode {:o}) is not searchable by it; \
                 run `chmod o+x {}` or choose a --state-dir elsewhere",
                user.name,
                dir.display(),
                ancestor.display(),
                mode & 0o7777,
                ancestor.display()
            );
        }
    }
    Ok(())
}

/// Whether `owner` may search a directory with `mode`, owned by
/// `uid:gid`. Pure; supplementary groups and ACLs are not considered.
fn can_search(mode: u32, uid: u32, gid: u32, who: Owner) -> bool {
    if who.uid == uid {
        mode & 0o100 != 0
    } else if who.gid == gid {
        mode & 0o010 != 0
    } else {
        mode & 0o001 != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn search_permission_by_class() {
        let u = Owner { uid: 100, gid: 200 };
        assert!(can_search(0o700, 100, 0, u));
        assert!(!can_search(0o700, 0, 0, u));
        assert!(can_search(0o710, 0, 200, u));
        assert!(!can_search(0o701, 0, 200, u));
        assert!(can_search(0o701, 0, 0, u));
        assert!(can_search(0o1777, 0, 0, u));
    }

    #[test]
    fn traversal_check_names_the_blocking_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let closed = tmp.path().join("closed");
        std::fs::create_dir(&closed).unwrap();
        std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let nobody = DbUser {
            name: "nobody-test".into(),
            owner: Owner {
                uid: 65534,
                gid: 65534,
            },
        };
        let err = check_traversable(&closed.join("state"), &nobody)
            .unwrap_err()
            .to_string();
        assert!(err.contains(&closed.display().to_string()), "{err}");
        assert!(err.contains("chmod o+x"), "{err}");
        std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o711)).unwrap();
        check_traversable(&closed.join("state").join("deeper"), &nobody).unwrap();
    }
}
