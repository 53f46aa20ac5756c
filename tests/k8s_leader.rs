//! Two operator replicas (the `stratum controller` binary, each under the
//! operator's own ServiceAccount from deploy/) elect a leader on a Lease:
//! only the leader reconciles; when it is killed, the other takes over
//! within the Lease duration and reconciles a new cluster.
//!
//! Needs the control plane of scripts/test.sh (`STRATUM_TEST_KUBECONFIG`);
//! fails without it.

mod support;

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;
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

async fn holder(leases: &Api<Lease>, name: &str) -> Option<String> {
    leases
        .get_opt(name)
        .await
        .ok()
        .flatten()
        .and_then(|l| l.spec?.holder_identity)
        .filter(|h| !h.is_empty())
}

fn cluster(name: &str) -> Value {
    let mut doc = yaml_docs(&repo_path("deploy/examples/postgres-single.yaml")).remove(0);
    doc["metadata"]["name"] = json!(name);
    doc
}

#[tokio::test]
async fn only_the_leader_reconciles_and_the_other_takes_over() {
    let client = admin().await;
    let ns = TestNamespace::create(&client, "leader").await;
    let lease = format!("stratum-{}", ns.name);
    let leases: Api<Lease> = Api::namespaced(client.clone(), OPERATOR_NAMESPACE);
    let sts_api: Api<StatefulSet> = Api::namespaced(client.clone(), &ns.name);

    // First replica: it finds the Lease free and leads.
    let mut first =
        OperatorProcess::start_with_lease(&client, Some(&ns.name), &lease, "replica-a").await;
    eventually("replica-a holds the Lease", WAIT, || async {
        match holder(&leases, &lease).await.as_deref() {
            Some("replica-a") => Ok(()),
            other => Err(format!("holder {other:?}; log: {}", first.log())),
        }
    })
    .await;
    let second =
        OperatorProcess::start_with_lease(&client, Some(&ns.name), &lease, "replica-b").await;

    apply(&client, &cluster("leader-pg-one"), &ns.name)
        .await
        .unwrap();
    eventually("the StatefulSet of leader-pg-one", WAIT, || async {
        sts_api
            .get("leader-pg-one")
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    })
    .await;
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
    eventually(
        "replica-b holds the Lease",
        LEASE_DURATION + WAIT,
        || async {
            match holder(&leases, &lease).await.as_deref() {
                Some("replica-b") => Ok(()),
                other => Err(format!("holder {other:?}")),
            }
        },
    )
    .await;
    let takeover = killed.elapsed();
    println!("takeover after {:.1} s", takeover.as_secs_f64());
    // The Lease duration, plus one renewal period of the follower's
    // polling and a margin for a loaded machine.
    assert!(
        takeover < LEASE_DURATION + Duration::from_secs(10),
        "replica-b took over only after {takeover:?}; log: {}",
        second.log()
    );

    apply(&client, &cluster("leader-pg-two"), &ns.name)
        .await
        .unwrap();
    eventually("the StatefulSet of leader-pg-two", WAIT, || async {
        sts_api
            .get("leader-pg-two")
            .await
            .map(|_| ())
            .map_err(|e| format!("{e}; log: {}", second.log()))
    })
    .await;
    assert!(reconciles(second.port).await > 0.0);
    assert_no_failures(&client, &ns.name).await;
}
