//! haproxy_config: the HAProxy configuration pieces shared by the local
//! runtime ([`crate::local::haproxy`]) and the Kubernetes proxy pods
//! ([`crate::build`]), so that the two cannot drift: the health check, the
//! `default-server` line and the `rw`/`ro` sections. Pure: no IO.

use std::fmt::Write as _;
use std::time::Duration;

use crate::instance::protocol::PATH_READYZ;

/// Consecutive failed checks before a server is marked down.
pub const CHECK_FALL: u32 = 2;
/// Consecutive passed checks before a server is marked up.
pub const CHECK_RISE: u32 = 2;

/// One member as an HAProxy server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Server {
    /// Server name (the instance name).
    pub name: String,
    /// Database address as HAProxy reads it (`10.0.0.1:3306`,
    /// `ipv6@::1:3306`, `db-0.db-headless.ns.svc:3306`).
    pub addr: String,
    /// Instance manager API port (`GET /readyz`).
    pub check_port: u16,
}

/// The `default-server` line (with the comment saying why), checking every
/// `inter`; `extra` is appended (e.g. resolver settings).
pub fn default_server(inter: Duration, extra: &str) -> String {
    let inter = inter.as_millis();
    format!(
        "    # Members are checked through their instance manager: 200 only when
    # Synced in a Primary component. A member marked down has its sessions
    # cut so that no client keeps writing to it.
    default-server inter {inter}ms fastinter {inter}ms downinter {inter}ms fall {CHECK_FALL} rise {CHECK_RISE} on-marked-down shutdown-sessions{extra}
"
    )
}

/// The `rw` and `ro` sections. `servers` in ordinal order; `active` is the
/// member `rw` prefers (the others are its `backup` servers, in the order
/// of `servers`, so HAProxy moves new connections to the first healthy
/// one); `host` is the `Host` header of the checks.
pub fn listen_sections(
    out: &mut String,
    rw_bind: &str,
    ro_bind: &str,
    host: &str,
    servers: &[Server],
    active: &str,
) {
    let check = format!(
        "    option httpchk
    http-check send meth GET uri {PATH_READYZ} ver HTTP/1.1 hdr Host {host}
    http-check expect status 200
"
    );
    let _ = write!(
        out,
        "# Writes: one member at a time, the others take over in this order.
listen rw
    bind {rw_bind}
    balance first
{check}"
    );
    let ordered = servers
        .iter()
        .filter(|s| s.name == active)
        .chain(servers.iter().filter(|s| s.name != active));
    for s in ordered {
        let _ = writeln!(
            out,
            "    server {} {} check port {}{}",
            s.name,
            s.addr,
            s.check_port,
            if s.name == active { "" } else { " backup" }
        );
    }
    let _ = write!(
        out,
        "
# Reads: round robin over the healthy members.
listen ro
    bind {ro_bind}
    balance roundrobin
{check}"
    );
    for s in servers {
        let _ = writeln!(
            out,
            "    server {} {} check port {}",
            s.name, s.addr, s.check_port
        );
    }
}
