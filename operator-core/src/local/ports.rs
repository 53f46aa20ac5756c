//! Port plan of a local cluster: which loopback ports each instance and
//! endpoint uses. The plan itself is pure; allocating and probing bind
//! sockets, and naming who holds a port reads `/proc`.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::{IpAddr, SocketAddr, TcpListener};

use serde::{Deserialize, Serialize};

/// Ports of one instance.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstancePorts {
    /// Database port.
    pub db: u16,
    /// Instance manager API port.
    pub api: u16,
    /// The engine's other ports by name (Galera replication, IST, SST),
    /// from the manifest's non-client ports.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, u16>,
}

/// Every port of a local cluster, persisted in `state.json`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortPlan {
    /// The `rw` endpoint.
    pub rw: u16,
    /// The `ro` endpoint.
    pub ro: u16,
    /// Per instance, including instances no longer in the spec (their
    /// data is kept, and so are their ports).
    pub instances: BTreeMap<String, InstancePorts>,
}

impl PortPlan {
    fn used(&self) -> BTreeSet<u16> {
        let mut s: BTreeSet<u16> = [self.rw, self.ro].into_iter().collect();
        for p in self.instances.values() {
            s.insert(p.db);
            s.insert(p.api);
            s.extend(p.extra.values().copied());
        }
        s.remove(&0);
        s
    }
}

/// A port to check or bind, with what it is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedPort {
    /// The port.
    pub port: u16,
    /// What uses it, e.g. `database port of simple-pg-0`.
    pub purpose: String,
}

/// Extend `existing` (the plan of a previous `up`, if any) so that the
/// endpoints and every instance in `instances` have ports (database, API,
/// and one per name in `extra`), allocating only missing ones with
/// `alloc`. Pure apart from `alloc`. Returns the plan and
/// the ports that were already planned (to check they are still free).
pub fn plan_ports(
    existing: Option<&PortPlan>,
    instances: &[String],
    extra: &[String],
    mut alloc: impl FnMut() -> io::Result<u16>,
) -> io::Result<(PortPlan, Vec<PlannedPort>)> {
    let mut plan = existing.cloned().unwrap_or_default();
    let mut reused = Vec::new();
    let mut used = plan.used();
    let mut fresh = |used: &mut BTreeSet<u16>| -> io::Result<u16> {
        // The allocator holds what it returned, but a port may also be in
        // an old plan; skip those rather than share one.
        for _ in 0..64 {
            let p = alloc()?;
            if p != 0 && used.insert(p) {
                return Ok(p);
            }
        }
        Err(io::Error::new(
            io::ErrorKind::AddrNotAvailable,
            "could not find a free port",
        ))
    };
    // The endpoints are bound by `up` itself, which reports a busy one.
    for port in [&mut plan.rw, &mut plan.ro] {
        if *port == 0 {
            *port = fresh(&mut used)?;
        }
    }
    for name in instances {
        match plan.instances.get(name) {
            Some(p) => {
                reused.push(PlannedPort {
                    port: p.db,
                    purpose: format!("database port of {name}"),
                });
                reused.push(PlannedPort {
                    port: p.api,
                    purpose: format!("instance manager port of {name}"),
                });
                for (what, port) in &p.extra {
                    reused.push(PlannedPort {
                        port: *port,
                        purpose: format!("{what} port of {name}"),
                    });
                }
            }
            None => {
                let db = fresh(&mut used)?;
                let api = fresh(&mut used)?;
                plan.instances.insert(
                    name.clone(),
                    InstancePorts {
                        db,
                        api,
                        extra: BTreeMap::new(),
                    },
                );
            }
        }
        // Ports an engine added later (or a plan from before extra ports).
        for what in extra {
            if !plan.instances[name].extra.contains_key(what) {
                let port = fresh(&mut used)?;
                plan.instances
                    .get_mut(name)
                    .expect("planned above")
                    .extra
                    .insert(what.clone(), port);
            }
        }
    }
    Ok((plan, reused))
}

/// Hands out free ports on one address by binding port 0, holding each
/// socket until dropped so that no port is handed out twice.
pub struct PortAllocator {
    ip: IpAddr,
    held: Vec<TcpListener>,
}

impl PortAllocator {
    /// An allocator on `ip`.
    pub fn new(ip: IpAddr) -> Self {
        Self {
            ip,
            held: Vec::new(),
        }
    }

    /// A free port.
    pub fn next(&mut self) -> io::Result<u16> {
        let l = TcpListener::bind(SocketAddr::new(self.ip, 0))?;
        let port = l.local_addr()?.port();
        self.held.push(l);
        Ok(port)
    }
}

/// Check that each port can be bound on `ip`; the error names the port, its
/// purpose and, when `/proc` tells, the process holding it.
pub fn check_free(ip: IpAddr, ports: &[PlannedPort]) -> anyhow::Result<()> {
    for p in ports {
        if let Err(e) = TcpListener::bind(SocketAddr::new(ip, p.port)) {
            return Err(in_use_error(ip, p, e));
        }
    }
    Ok(())
}

/// The error for a port that cannot be bound.
pub fn in_use_error(ip: IpAddr, p: &PlannedPort, e: io::Error) -> anyhow::Error {
    let addr = SocketAddr::new(ip, p.port);
    let who = if e.kind() == io::ErrorKind::AddrInUse {
        match who_listens(p.port) {
            Some(w) => format!(" by {w}"),
            None => " by another process".to_string(),
        }
    } else {
        String::new()
    };
    anyhow::anyhow!(
        "port {} ({}) on {addr} is in use{who}: {e}; stop that process (`stratum local down` stops what a killed `up` left running), or start over with new ports after `stratum local down --purge`",
        p.port,
        p.purpose
    )
}

/// `name (pid N)` of a process listening on TCP `port`, from `/proc`.
pub fn who_listens(port: u16) -> Option<String> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        if let Ok(text) = std::fs::read_to_string(table) {
            inodes.extend(listening_inodes(&text, port));
        }
    }
    if inodes.is_empty() {
        return None;
    }
    let wanted: Vec<String> = inodes.iter().map(|i| format!("socket:[{i}]")).collect();
    for proc_entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = proc_entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(proc_entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path())
                && wanted.iter().any(|w| target.as_os_str() == w.as_str())
            {
                let comm = std::fs::read_to_string(proc_entry.path().join("comm"))
                    .map(|s| s.trim().to_string())
                    .unwrap_or_else(|_| "?".into());
                return Some(format!("{comm} (pid {pid})"));
            }
        }
    }
    Some("a process this user cannot inspect".to_string())
}

/// Inodes of sockets listening on `port` in a `/proc/net/tcp{,6}` table.
/// Pure.
pub fn listening_inodes(table: &str, port: u16) -> Vec<u64> {
    const LISTEN: &str = "0A";
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let local = cols.get(1)?;
            let (_, hex_port) = local.rsplit_once(':')?;
            let p = u16::from_str_radix(hex_port, 16).ok()?;
            (p == port && *cols.get(3)? == LISTEN).then(|| cols.get(9)?.parse().ok())?
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counter(start: u16) -> impl FnMut() -> io::Result<u16> {
        let mut n = start;
        move || {
            n += 1;
            Ok(n)
        }
    }

    #[test]
    fn first_plan_allocates_everything() {
        let names = vec!["simple-pg-0".to_string(), "simple-pg-1".to_string()];
        let (plan, reused) = plan_ports(None, &names, &[], counter(40000)).unwrap();
        assert_eq!((plan.rw, plan.ro), (40001, 40002));
        assert_eq!(
            plan.instances["simple-pg-0"],
            InstancePorts {
                db: 40003,
                api: 40004,
                extra: Default::default(),
            }
        );
        assert_eq!(
            plan.instances["simple-pg-1"],
            InstancePorts {
                db: 40005,
                api: 40006,
                extra: Default::default(),
            }
        );
        assert!(reused.is_empty());
    }

    #[test]
    fn engine_ports_are_planned_per_instance_and_kept() {
        let names = vec!["simple-pxc-0".to_string()];
        let (first, _) = plan_ports(None, &names, &[], counter(40000)).unwrap();
        assert!(first.instances["simple-pxc-0"].extra.is_empty());
        // An engine port added later (or a plan from before extra ports)
        // gets a port; the others stay.
        let extra = vec!["galera".to_string(), "ist".to_string()];
        let (second, reused) = plan_ports(Some(&first), &names, &extra, counter(41000)).unwrap();
        let p = &second.instances["simple-pxc-0"];
        assert_eq!((p.db, p.api), (40003, 40004));
        assert_eq!(p.extra.len(), 2);
        assert!(p.extra.values().all(|port| *port > 41000));
        assert_eq!(reused.len(), 2);
        let (third, reused) = plan_ports(Some(&second), &names, &extra, counter(42000)).unwrap();
        assert_eq!(third, second);
        assert!(
            reused
                .iter()
                .any(|r| r.purpose == "galera port of simple-pxc-0")
        );
    }

    #[test]
    fn later_plans_keep_ports_and_allocate_new_instances_only() {
        let names = vec!["simple-pg-0".to_string()];
        let (first, _) = plan_ports(None, &names, &[], counter(40000)).unwrap();
        let names = vec!["simple-pg-0".to_string(), "simple-pg-1".to_string()];
        // The allocator hands out a port the old plan already uses first.
        let (second, reused) = plan_ports(Some(&first), &names, &[], counter(40002)).unwrap();
        assert_eq!(second.rw, first.rw);
        assert_eq!(
            second.instances["simple-pg-0"],
            first.instances["simple-pg-0"]
        );
        assert_eq!(
            second.instances["simple-pg-1"],
            InstancePorts {
                db: 40005,
                api: 40006,
                extra: Default::default(),
            }
        );
        assert_eq!(
            reused.iter().map(|p| p.port).collect::<Vec<_>>(),
            [40003, 40004]
        );
        assert_eq!(reused[0].purpose, "database port of simple-pg-0");
        // Scaling down keeps the removed instance's ports.
        let (third, _) = plan_ports(Some(&second), &names[..1], &[], counter(50000)).unwrap();
        assert_eq!(third, second);
    }

    #[test]
    fn allocator_gives_distinct_ports_and_busy_ports_are_named() {
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let mut a = PortAllocator::new(ip);
        let (p1, p2) = (a.next().unwrap(), a.next().unwrap());
        assert_ne!(p1, p2);
        let busy = PlannedPort {
            port: p1,
            purpose: "rw endpoint".into(),
        };
        let err = check_free(ip, std::slice::from_ref(&busy))
            .unwrap_err()
            .to_string();
        assert!(err.contains(&format!("port {p1} (rw endpoint)")), "{err}");
        assert!(
            err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        drop(a);
        check_free(ip, &[busy]).unwrap();
    }

    #[test]
    fn proc_net_tcp_parsing() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12345 1 0000000000000000 100 0 0 10 0\n\
   1: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 999 1 0000000000000000 100 0 0 10 0\n";
        assert_eq!(listening_inodes(table, 8080), [12345]);
        assert!(listening_inodes(table, 8081).is_empty());
    }
}
