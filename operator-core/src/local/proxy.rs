//! The `rw` and `ro` endpoints: TCP forwarders on stable loopback ports
//! that follow the routing decision. Network IO (accepts and connects);
//! target choice is pure.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::engine::Routing;

/// How long a new connection waits for a target before it is closed.
const WAIT_FOR_TARGET: Duration = Duration::from_secs(5);
/// Bound on connecting to a member.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the endpoints forward to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Targets {
    /// The write member's database address.
    pub rw: Option<SocketAddr>,
    /// The read members' database addresses.
    pub ro: Vec<SocketAddr>,
}

/// Targets from a routing decision, with `addr` mapping an instance name to
/// its database address (unknown names are skipped). Pure.
pub fn targets(routing: &Routing, addr: impl Fn(&str) -> Option<SocketAddr>) -> Targets {
    Targets {
        rw: routing.rw.as_deref().and_then(&addr),
        ro: routing.ro.iter().filter_map(|n| addr(n)).collect(),
    }
}

/// The target of the `n`-th `ro` connection: round-robin over the read
/// members, the write member when there are none. Pure.
pub fn ro_target(t: &Targets, n: usize) -> Option<SocketAddr> {
    if t.ro.is_empty() {
        t.rw
    } else {
        Some(t.ro[n % t.ro.len()])
    }
}

/// Whether an `rw` connection to `current` must be closed: another member
/// now takes writes, or none does (a failover or switchover stopped
/// writes; the decision loop keeps the target through mere observation
/// blips). Pure.
pub fn rw_moved_away(t: &Targets, current: SocketAddr) -> bool {
    t.rw != Some(current)
}

/// The running endpoints. Dropping it (or [`Proxy::stop`]) stops accepting
/// and closes every forwarded connection.
pub struct Proxy {
    targets: watch::Sender<Targets>,
    tasks: JoinSet<()>,
}

impl Proxy {
    /// Serve `rw` and `ro` on already bound listeners.
    pub fn start(rw: TcpListener, ro: TcpListener) -> Self {
        let (targets, rx) = watch::channel(Targets::default());
        let mut tasks = JoinSet::new();
        tasks.spawn(accept_loop(rw, rx.clone(), Kind::Rw));
        tasks.spawn(accept_loop(ro, rx, Kind::Ro(Arc::new(AtomicUsize::new(0)))));
        Self { targets, tasks }
    }

    /// Point the endpoints at new targets. Open `rw` connections to a member
    /// that no longer takes writes are closed.
    pub fn set(&self, t: Targets) {
        self.targets.send_if_modified(|cur| {
            if *cur == t {
                false
            } else {
                *cur = t;
                true
            }
        });
    }

    /// Stop accepting and close every connection.
    pub async fn stop(mut self) {
        self.tasks.shutdown().await;
    }
}

#[derive(Clone)]
enum Kind {
    Rw,
    Ro(Arc<AtomicUsize>),
}

async fn accept_loop(listener: TcpListener, rx: watch::Receiver<Targets>, kind: Kind) {
    // Connections live in this set so that stopping the loop closes them.
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((inbound, _)) => {
                    conns.spawn(forward(inbound, rx.clone(), kind.clone()));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

async fn forward(mut inbound: TcpStream, mut rx: watch::Receiver<Targets>, kind: Kind) {
    let pick = |t: &Targets| match &kind {
        Kind::Rw => t.rw,
        Kind::Ro(n) => ro_target(t, n.fetch_add(1, Ordering::Relaxed)),
    };
    let target = {
        let first = pick(&rx.borrow_and_update());
        match first {
            Some(t) => Some(t),
            None => tokio::time::timeout(WAIT_FOR_TARGET, async {
                loop {
                    if rx.changed().await.is_err() {
                        return None;
                    }
                    if let Some(t) = pick(&rx.borrow_and_update()) {
                        return Some(t);
                    }
                }
            })
            .await
            .ok()
            .flatten(),
        }
    };
    let Some(target) = target else {
        tracing::debug!("no member to forward to; closing the connection");
        return;
    };
    let mut outbound = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)).await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(%target, error = %e, "connect failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%target, "connect timed out");
            return;
        }
    };
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    match kind {
        Kind::Rw => {
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                _ = rx.wait_for(|t| rw_moved_away(t, target)) => {
                    tracing::info!(%target, "closing an rw connection: another member takes writes");
                }
            }
        }
        Kind::Ro(_) => {
            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn a(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn target_choice() {
        let routing = Routing {
            rw: Some("p".into()),
            ro: vec!["r1".into(), "gone".into(), "r2".into()],
        };
        let addr = |n: &str| match n {
            "p" => Some(a(1)),
            "r1" => Some(a(2)),
            "r2" => Some(a(3)),
            _ => None,
        };
        let t = targets(&routing, addr);
        assert_eq!(t.rw, Some(a(1)));
        assert_eq!(t.ro, [a(2), a(3)]);
        assert_eq!(
            (0..4).map(|n| ro_target(&t, n)).collect::<Vec<_>>(),
            [Some(a(2)), Some(a(3)), Some(a(2)), Some(a(3))]
        );
        let only_rw = Targets {
            rw: Some(a(1)),
            ro: vec![],
        };
        assert_eq!(ro_target(&only_rw, 5), Some(a(1)));
        assert_eq!(ro_target(&Targets::default(), 0), None);

        assert!(rw_moved_away(&only_rw, a(9)));
        assert!(!rw_moved_away(&only_rw, a(1)));
        // Writes stopped (failover in progress): connections close.
        assert!(rw_moved_away(&Targets::default(), a(1)));
    }

    /// A server that writes its name to each connection and echoes.
    async fn named_server(name: &'static str) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                tokio::spawn(async move {
                    s.write_all(name.as_bytes()).await.unwrap();
                    let mut buf = [0u8; 64];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    }

    async fn hello(addr: SocketAddr) -> (TcpStream, String) {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 2];
        s.read_exact(&mut buf).await.unwrap();
        (s, String::from_utf8_lossy(&buf).into_owned())
    }

    #[tokio::test]
    async fn endpoints_follow_targets_and_close_demoted_rw() {
        let (p1, p2) = (named_server("p1").await, named_server("p2").await);
        let rw = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ro = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (rw_addr, ro_addr) = (rw.local_addr().unwrap(), ro.local_addr().unwrap());
        let proxy = Proxy::start(rw, ro);
        proxy.set(Targets {
            rw: Some(p1),
            ro: vec![],
        });

        let (mut old_rw, name) = hello(rw_addr).await;
        assert_eq!(name, "p1");
        let (mut ro_conn, name) = hello(ro_addr).await;
        assert_eq!(name, "p1", "ro falls back to the rw member");
        old_rw.write_all(b"x").await.unwrap();
        let mut b = [0u8; 1];
        old_rw.read_exact(&mut b).await.unwrap();

        // Failover: p2 takes writes; the old rw connection is closed, the ro
        // one is kept, new rw connections reach p2.
        proxy.set(Targets {
            rw: Some(p2),
            ro: vec![p1],
        });
        let mut rest = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(5), old_rw.read_to_end(&mut rest))
            .await
            .expect("old rw connection closed")
            .unwrap_or(0);
        assert_eq!(n, 0);
        let (_, name) = hello(rw_addr).await;
        assert_eq!(name, "p2");
        ro_conn.write_all(b"y").await.unwrap();
        ro_conn.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"y");

        proxy.stop().await;
        let mut rest = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(5), ro_conn.read_to_end(&mut rest))
            .await
            .expect("stop closes connections")
            .unwrap_or(0);
        assert_eq!(n, 0);
        assert!(TcpStream::connect(rw_addr).await.is_err());
    }

    #[tokio::test]
    async fn new_connections_wait_briefly_for_a_target() {
        let p1 = named_server("p1").await;
        let rw = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ro = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let rw_addr = rw.local_addr().unwrap();
        let proxy = Proxy::start(rw, ro);
        let client = tokio::spawn(hello(rw_addr));
        tokio::time::sleep(Duration::from_millis(200)).await;
        proxy.set(Targets {
            rw: Some(p1),
            ro: vec![],
        });
        let (_, name) = client.await.unwrap();
        assert_eq!(name, "p1");
    }
}
