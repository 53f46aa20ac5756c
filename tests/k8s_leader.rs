//! Operator replicas (the `stratum controller` binary, each under the
//! operator's own ServiceAccount from deploy/) elect a leader on a Lease:
//! only the leader reconciles; when it is killed, another takes over
//! within the Lease duration and reconciles a new cluster; when it is
//! stopped with SIGTERM, it releases the Lease and another takes over in
//! about a second. A leader whose Lease is taken by another holder, or
//! that cannot reach the API server to renew it, exits before another
//! replica may lead.
//!
//! Needs the control plane of scripts/test.sh (`STRATUM_TEST_KUBECONFIG`);
//! fails without it.

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use serde_json::{Value, json};
use support::*;

const WAIT: Duration = Duration::from_secs(60);
/// The `stratum controller` default (`--lease-duration-secs`).
const LEASE_DURATION: Duration = Duration::from_secs(15);

/// Reconciles counted by an operator's /metrics (0 before the first).
async fn reconciles(port: u16) -> f64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("metrics server");
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out.lines()
        .filter(|l| l.starts_with("stratum_reconciles_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Wait until the operator on `port` counted a finished reconcile: the
/// StatefulSet exists while the reconcile that created it is still
/// writing the status, so its count may lag a moment.
async fn has_reconciled(port: u16) {
    eventually("a finished reconcile", WAIT, || async {
        match reconciles(port).await {
            n if n > 0.0 => Ok(()),
            _ => Err("no reconcile counted".to_string()),
        }
    })
    .await;
}

async fn holder(leases: &Api<Lease>, name: &str) -> Option<String> {
    leases
        .get_opt(name)
        .await
        .ok()
        .flatten()
        .and_then(|l| l.spec?.holder_identity)
        .filter(|h| !h.is_empty())
}

/// Wait until `identity` holds the Lease `lease`; the last holder seen
/// (and the log of `process`, when given) is in the panic message.
async fn wait_holder(
    leases: &Api<Lease>,
    lease: &str,
    identity: &str,
    timeout: Duration,
    process: Option<&OperatorProcess>,
) {
    eventually(&format!("{identity} holds the Lease"), timeout, || async {
        match holder(leases, lease).await {
            Some(h) if h == identity => Ok(()),
            other => Err(match process {
                Some(p) => format!("holder {other:?}; log: {}", p.log()),
                None => format!("holder {other:?}"),
            }),
        }
    })
    .await;
}

fn cluster(name: &str) -> Value {
    let mut doc = yaml_docs(&repo_path("deploy/examples/postgres-single.yaml")).remove(0);
    doc["metadata"]["name"] = json!(name);
    doc
}

/// Apply the cluster `name` into `ns` and wait for its StatefulSet (which
/// only a leading operator creates); the log of `process`, when given, is
/// in the panic message.
async fn create_cluster(client: &Client, ns: &str, name: &str, process: Option<&OperatorProcess>) {
    apply(client, &cluster(name), ns).await.unwrap();
    let sts_api: Api<StatefulSet> = Api::namespaced(client.clone(), ns);
    eventually(&format!("the StatefulSet of {name}"), WAIT, || async {
        sts_api
            .get(name)
            .await
            .map(|_| ())
            .map_err(|e| match process {
                Some(p) => format!("{e}; log: {}", p.log()),
                None => e.to_string(),
            })
    })
    .await;
}

/// A namespace of one test, the name of the Lease its operators elect on
/// (`stratum-<namespace>`), and the API of Leases in the operator's
/// namespace.
async fn lease_setup(prefix: &str) -> (Client, TestNamespace, String, Api<Lease>) {
    let client = admin().await;
    let ns = TestNamespace::create(&client, prefix).await;
    let lease = format!("stratum-{}", ns.name);
    let leases: Api<Lease> = Api::namespaced(client.clone(), OPERATOR_NAMESPACE);
    (client, ns, lease, leases)
}

#[tokio::test]
async fn only_the_leader_reconciles_and_the_other_takes_over() {
    let (client, ns, lease, leases) = lease_setup("leader").await;

    // First replica: it finds the Lease free and leads.
    let mut first =
        OperatorProcess::start_with_lease(&client, Some(&ns.name), &lease, "replica-a").await;
    wait_holder(&leases, &lease, "replica-a", WAIT, Some(&first)).await;
    let second =
        OperatorProcess::start_with_lease(&client, Some(&ns.name), &lease, "replica-b").await;

    create_cluster(&client, &ns.name, "leader-pg-one", None).await;
    // Give the follower every chance to do something wrong.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        reconciles(first.port).await > 0.0,
        "the leader reconciled nothing"
    );
    assert_eq!(
        reconciles(second.port).await,
        0.0,
        "the follower reconciled; log: {}",
        second.log()
    );
    assert_eq!(holder(&leases, &lease).await.as_deref(), Some("replica-a"));

    // The leader dies without releasing the Lease: the follower takes over
    // once it expires.
    first.kill();
    let killed = Instant::now();
    wait_holder(&leases, &lease, "replica-b", LEASE_DURATION + WAIT, None).await;
    let takeover = killed.elapsed();
    println!("takeover after {:.1} s", takeover.as_secs_f64());
    // The Lease duration, plus one renewal period of the follower's
    // polling and a margin for a loaded machine.
    assert!(
        takeover < LEASE_DURATION + Duration::from_secs(10),
        "replica-b took over only after {takeover:?}; log: {}",
        second.log()
    );

    create_cluster(&client, &ns.name, "leader-pg-two", Some(&second)).await;
    has_reconciled(second.port).await;

    // A stopped leader (SIGTERM, as Kubernetes stops a pod) releases the
    // Lease on its way out: the next replica takes over at once, not
    // after the Lease duration.
    let mut second = second;
    let third =
        OperatorProcess::start_with_lease(&client, Some(&ns.name), &lease, "replica-c").await;
    // replica-c is a follower that has read the Lease at least once.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(holder(&leases, &lease).await.as_deref(), Some("replica-b"));
    second.terminate();
    let terminated = Instant::now();
    let status = second
        .exited_within(Duration::from_secs(30))
        .await
        .unwrap_or_else(|| panic!("replica-b did not stop on SIGTERM; log: {}", second.log()));
    assert!(
        status.success(),
        "SIGTERM is a clean stop, got {status}; log: {}",
        second.log()
    );
    let stopped = terminated.elapsed();
    wait_holder(&leases, &lease, "replica-c", WAIT, None).await;
    let graceful = terminated.elapsed();
    println!(
        "takeover after SIGKILL {:.1} s, after SIGTERM {:.1} s (the leader stopped in {:.1} s)",
        takeover.as_secs_f64(),
        graceful.as_secs_f64(),
        stopped.as_secs_f64()
    );
    // The follower reads the Lease every second; a loaded machine may add
    // a few seconds, still well under the Lease duration.
    assert!(
        graceful < Duration::from_secs(6),
        "replica-c took over only {graceful:?} after SIGTERM; log: {}",
        third.log()
    );
    create_cluster(&client, &ns.name, "leader-pg-three", Some(&third)).await;
    has_reconciled(third.port).await;
    assert_no_failures(&client, &ns.name).await;
}

/// Wait for `process` to exit because it lost the Lease; returns when.
async fn exits_for_lost_lease(process: &mut OperatorProcess, limit: Duration) -> Instant {
    let status = process
        .exited_within(limit)
        .await
        .unwrap_or_else(|| panic!("the replica kept running; log: {}", process.log()));
    let at = Instant::now();
    assert!(
        !status.success(),
        "losing the Lease is an error exit, got {status}"
    );
    let log = process.log();
    assert!(log.contains("lost the leader Lease"), "log: {log}");
    at
}

#[tokio::test]
async fn a_leader_whose_lease_is_taken_exits() {
    let (client, ns, lease, leases) = lease_setup("leader-taken").await;
    let mut leader =
        OperatorProcess::start_with_lease(&client, Some(&ns.name), &lease, "replica-a").await;
    wait_holder(&leases, &lease, "replica-a", WAIT, Some(&leader)).await;

    // Someone else takes the valid Lease by force (an operator with
    // another identity, or an admin): replica-a must stop at once rather
    // than at its next renewal, 10 s away.
    let spec = LeaseSpec {
        holder_identity: Some("intruder".into()),
        renew_time: Some(MicroTime(k8s_openapi::jiff::Timestamp::now())),
        lease_duration_seconds: Some(60),
        ..Default::default()
    };
    leases
        .patch(
            &lease,
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": spec })),
        )
        .await
        .unwrap();
    let taken = Instant::now();
    let exited = exits_for_lost_lease(&mut leader, Duration::from_secs(15)).await;
    println!(
        "replica-a exited {:.1} s after its Lease was taken",
        (exited - taken).as_secs_f64()
    );
    assert!(
        leader.log().contains("intruder"),
        "the log names the holder: {}",
        leader.log()
    );
    assert!(exited - taken < Duration::from_secs(5));
    // It left the Lease to its holder.
    assert_eq!(holder(&leases, &lease).await.as_deref(), Some("intruder"));
}

/// A TCP proxy to the API server that the test can cut: afterwards every
/// open connection is closed and new ones are refused.
struct Proxy {
    addr: std::net::SocketAddr,
    accept: tokio::task::JoinHandle<()>,
    connections: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Proxy {
    async fn start(upstream: String) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let conns = connections.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let upstream = upstream.clone();
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(&upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                conns.lock().unwrap().push(task);
            }
        });
        Self {
            addr,
            accept,
            connections,
        }
    }

    fn cut(&self) {
        self.accept.abort();
        for c in self.connections.lock().unwrap().drain(..) {
            c.abort();
        }
    }
}

#[tokio::test]
async fn a_leader_cut_off_from_the_api_server_exits_before_its_lease_expires() {
    let (client, ns, lease, leases) = lease_setup("leader-cut").await;
    let kubeconfig = kube::config::Kubeconfig::read_from(kubeconfig_path()).unwrap();
    let server = kubeconfig.clusters[0]
        .cluster
        .as_ref()
        .and_then(|c| c.server.clone())
        .unwrap();
    let upstream = server
        .trim_start_matches("https://")
        .trim_end_matches('/')
        .to_string();
    let proxy = Proxy::start(upstream).await;
    let via = format!("https://{}", proxy.addr);
    let mut cut_off =
        OperatorProcess::start_via(&client, Some(&ns.name), &lease, "replica-a", Some(&via)).await;
    wait_holder(&leases, &lease, "replica-a", WAIT, Some(&cut_off)).await;
    let follower =
        OperatorProcess::start_with_lease(&client, Some(&ns.name), &lease, "replica-b").await;
    create_cluster(&client, &ns.name, "cut-pg-one", Some(&cut_off)).await;

    proxy.cut();
    let cut = Instant::now();
    // The Lease as last renewed: replica-a can renew it no more.
    let spec = leases.get(&lease).await.unwrap().spec.unwrap();
    assert_eq!(spec.holder_identity.as_deref(), Some("replica-a"));
    let expiry = SystemTime::from(spec.renew_time.unwrap().0)
        + Duration::from_secs(spec.lease_duration_seconds.unwrap() as u64);

    let exited = exits_for_lost_lease(&mut cut_off, LEASE_DURATION + WAIT).await;
    let exited_at = SystemTime::now();
    println!(
        "replica-a exited {:.1} s after the cut, {:.1} s before its Lease expired",
        (exited - cut).as_secs_f64(),
        expiry
            .duration_since(exited_at)
            .unwrap_or_default()
            .as_secs_f64()
    );
    assert!(
        exited_at < expiry,
        "replica-a stopped only after its Lease expired; log: {}",
        cut_off.log()
    );

    // The follower takes the expired Lease, after replica-a stopped.
    wait_holder(
        &leases,
        &lease,
        "replica-b",
        LEASE_DURATION + WAIT,
        Some(&follower),
    )
    .await;
    create_cluster(&client, &ns.name, "cut-pg-two", Some(&follower)).await;
    assert_no_failures(&client, &ns.name).await;
}
