//! PostgreSQL high availability on Kubernetes, end to end: the operator
//! (the `stratum controller` binary, watching the test's namespace) on a
//! real control plane, real PostgreSQL 15 instances in the pods run by the
//! fake kubelet of `tests/support/kubelet.rs`. Clients reach the database
//! as they would through the `-rw` Service: at the IP of the one ready pod
//! its selector picks.
//!
//! - a bad switchover target is refused (Event, condition naming it,
//!   `targetPrimary` reset) and the cluster is left untouched;
//! - a switchover through `status.targetPrimary` under a writer;
//! - kill -9 of the primary's postgres under a writer (synchronous mode):
//!   a new primary takes writes, the `-rw` selection moved, every
//!   acknowledged row is there, the old primary rejoins, 3/3 ready;
//! - the operator SIGKILLed in the middle of a failover and started
//!   again: exactly one primary, every acknowledged row there;
//! - the operator away for 20 s: the primary keeps writes on failsafe,
//!   the restarted operator keeps it (no failover).
//!
//! Uses the control plane of `STRATUM_TEST_KUBECONFIG`, or starts one for
//! this binary (scripts/control-plane.sh); fails when it cannot, or when
//! PostgreSQL 15 is not installed.

mod support;

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::{Api, DynamicObject};
use operator_core::engine::InstanceOps;
use serde_json::Value;
use support::k8s_db::{
    self, AckedWriter, DbCluster, Operator, all_rows_present, condition, pg_connect,
    pg_cr_synchronous, pg_writer, request_switchover, require_postgres,
};
use support::kubelet::{Kubelet, service_ips};
use support::*;

/// First boot runs initdb and two pg_basebackups, one pod after the other.
const START: Duration = Duration::from_secs(180);
const WAIT: Duration = Duration::from_secs(90);
const NAMES: [&str; 3] = ["ha-pg-0", "ha-pg-1", "ha-pg-2"];

/// Three instances, synchronous (`ANY 1`): an acknowledged commit is on a
/// replica too.
fn ha_pg() -> Value {
    pg_cr_synchronous("ha-pg")
}

/// The cluster's status once `check` holds.
async fn wait_status(
    api: &Api<DynamicObject>,
    what: &str,
    timeout: Duration,
    check: impl Fn(&Value) -> bool,
) -> Value {
    k8s_db::wait_status(api, "ha-pg", what, timeout, check).await
}

/// The one IP behind `-rw`.
async fn rw_ip(client: &Client, ns: &str) -> Result<Ipv4Addr, String> {
    k8s_db::rw_ip(client, ns, "ha-pg").await
}

/// Inserts ids from 1 000 000 up through `-rw` in a loop (5 ms apart),
/// reconnecting (to whatever `-rw` selects then) after any error; keeps
/// the ids whose commit was acknowledged.
fn start_writer(s: &Setup) -> AckedWriter<i32> {
    pg_writer(
        &s.db,
        &s.password,
        1_000_000,
        Duration::from_millis(5),
        WAIT,
    )
}

/// How many members report themselves primary (asking every manager).
async fn primaries(kubelet: &Kubelet) -> Vec<String> {
    let ops = kubelet.instance_client();
    let mut out = Vec::new();
    for name in NAMES {
        if let Ok(s) = ops.status(name).await
            && s.role == operator_core::instance::protocol::Role::Primary
        {
            out.push(name.to_string());
        }
    }
    out
}

fn healthy_with(primary: &str) -> impl Fn(&Value) -> bool + '_ {
    move |s: &Value| {
        s["phase"] == "Healthy"
            && s["ready"] == "3/3"
            && s["currentPrimary"] == primary
            && s["targetPrimary"] == primary
            && s.get("primaryChange").is_none()
    }
}

/// 3/3 ready, and `name` reports itself a replica.
fn replica_ready(s: &Value, name: &str) -> bool {
    s["ready"] == "3/3"
        && s["instancesStatus"].as_array().is_some_and(|is| {
            is.iter()
                .any(|i| i["name"] == name && i["role"] == "replica" && i["ready"] == true)
        })
}

fn reasons(events: &[k8s_openapi::api::events::v1::Event]) -> Vec<String> {
    events.iter().filter_map(|e| e.reason.clone()).collect()
}

/// A running cluster with its kubelet (the operator is returned apart:
/// tests kill and restart it).
struct Setup {
    db: DbCluster,
    password: String,
}

async fn setup(prefix: &str) -> (Setup, OperatorProcess) {
    require_postgres();
    let mut db = DbCluster::create(prefix, &ha_pg(), Operator::Process).await;
    let operator = db.operator.take().expect("the operator process");
    let status = wait_status(&db.api, "phase Healthy", START, healthy_with("ha-pg-0")).await;
    assert_eq!(
        status["leaseTerm"], 1,
        "adopted, no promotion yet: {status}"
    );
    let password = db.secret("app-password").await;
    let ip = db.pg_create_table_t(&password, WAIT).await;
    assert_eq!(ip, db.kubelet.pod_ip("ha-pg-0"));
    (Setup { db, password }, operator)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchover_refusal_switchover_and_failover_under_writes() {
    let (s, operator) = setup("pg-ha").await;
    let (client, ns, api, kubelet) = (&s.db.client, &s.db.ns, &s.db.api, &s.db.kubelet);

    // (3) A target that does not exist: refused, named, reset; nothing
    // else changes.
    let before = api.get("ha-pg").await.unwrap();
    request_switchover(api, "ha-pg", "ha-pg-9").await;
    let status = wait_status(api, "the bad switchover refused", WAIT, |s| {
        s["targetPrimary"] == "ha-pg-0"
            && condition(s, "Switchover").is_some_and(|c| c["status"] == "False")
    })
    .await;
    let switchover = condition(&status, "Switchover").unwrap();
    assert!(
        switchover["message"]
            .as_str()
            .unwrap()
            .contains("there is no instance \"ha-pg-9\""),
        "{switchover}"
    );
    assert_eq!(status["currentPrimary"], "ha-pg-0");
    assert_eq!(status["phase"], "Healthy");
    assert_eq!(
        status.get("leaseTerm"),
        before.data["status"].get("leaseTerm")
    );
    assert_eq!(rw_ip(client, ns).await.unwrap(), kubelet.pod_ip("ha-pg-0"));
    assert_eq!(primaries(kubelet).await, ["ha-pg-0"]);
    let events = events_about(client, ns, "ha-pg").await;
    assert!(
        events
            .iter()
            .any(|e| e.reason.as_deref() == Some("SwitchoverRefused")
                && e.type_.as_deref() == Some("Warning")
                && e.note.as_deref().is_some_and(|n| n.contains("ha-pg-9"))),
        "{:?}",
        reasons(&events)
    );

    // (2) Switchover to ha-pg-2 under writes.
    let writer = start_writer(&s);
    writer.wait_more(20, "writes before the switchover").await;
    request_switchover(api, "ha-pg", "ha-pg-2").await;
    // The intent patches land before the reconcile's status write: wait
    // for the condition too.
    let switched = healthy_with("ha-pg-2");
    let status = wait_status(api, "switched over to ha-pg-2", WAIT, |s| {
        switched(s) && condition(s, "Switchover").is_some_and(|c| c["status"] == "True")
    })
    .await;
    assert_eq!(status["leaseTerm"], 2, "{status}");
    eventually("-rw selects ha-pg-2", WAIT, || async {
        let ip = rw_ip(client, ns).await?;
        (ip == kubelet.pod_ip("ha-pg-2"))
            .then_some(())
            .ok_or(format!("{ip}"))
    })
    .await;
    writer.wait_more(20, "writes after the switchover").await;
    assert_eq!(primaries(kubelet).await, ["ha-pg-2"]);
    // The old primary back as a replica before the next failure.
    wait_status(api, "ha-pg-0 back as a ready replica", WAIT, |s| {
        replica_ready(s, "ha-pg-0")
    })
    .await;

    // (1) kill -9 the primary's postgres under writes.
    let killed = kubelet.kill_server("ha-pg-2");
    let at = std::time::Instant::now();
    eprintln!("killed the postmaster of ha-pg-2 (pid {killed})");
    let status = wait_status(api, "a new primary after the kill", WAIT, |s| {
        s["currentPrimary"] != "ha-pg-2" && s["currentPrimary"].is_string()
    })
    .await;
    let new_primary = status["currentPrimary"].as_str().unwrap().to_string();
    writer
        .wait_more(1, "a write taken by the new primary")
        .await;
    eprintln!(
        "failover: first acknowledged write through -rw {} ms after the kill (polled)",
        at.elapsed().as_millis()
    );
    writer
        .wait_more(20, "writes taken by the new primary")
        .await;
    let status = wait_status(
        api,
        "3/3 ready after the failover",
        WAIT,
        healthy_with(&new_primary),
    )
    .await;
    assert_eq!(status["leaseTerm"], 3, "{status}");
    assert_eq!(
        rw_ip(client, ns).await.unwrap(),
        kubelet.pod_ip(&new_primary)
    );
    let acked = writer.stop().await;
    all_rows_present(&s.db, &s.password, &acked, WAIT).await;
    eprintln!("{} acknowledged rows, none lost", acked.len());
    // The old primary rejoins as a replica (through pg_rewind).
    wait_status(api, "ha-pg-2 back as a ready replica", WAIT, |s| {
        replica_ready(s, "ha-pg-2")
    })
    .await;
    assert_eq!(primaries(kubelet).await, [new_primary.as_str()]);
    let all = events_about(client, ns, "ha-pg").await;
    for e in &all {
        eprintln!(
            "event {} {} {}",
            e.event_time
                .as_ref()
                .map(|t| t.0.to_string())
                .unwrap_or_default(),
            e.reason.as_deref().unwrap_or_default(),
            e.note.as_deref().unwrap_or_default()
        );
    }
    let events = reasons(&all);
    for want in [
        "SwitchoverStarted",
        "Demoted",
        "Switchover",
        "FailoverStarted",
        "Fenced",
        "Promoted",
    ] {
        assert!(
            events.iter().any(|r| r == want),
            "no {want} Event: {events:?}"
        );
    }
    assert_no_failures(client, ns).await;
    drop(operator);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_killed_mid_failover_leaves_exactly_one_primary() {
    let (s, mut operator) = setup("pg-ha-restart").await;
    let (client, ns, api, kubelet) = (&s.db.client, &s.db.ns, &s.db.api, &s.db.kubelet);
    let writer = start_writer(&s);
    writer.wait_more(20, "writes before the kill").await;

    kubelet.kill_server("ha-pg-0");
    // SIGKILL the operator as soon as it recorded the failover.
    let status = wait_status(api, "the failover recorded", WAIT, |status| {
        status.get("primaryChange").is_some() || status["currentPrimary"] != "ha-pg-0"
    })
    .await;
    operator.kill();
    eprintln!("operator killed at: {status}");
    let operator = OperatorProcess::start_for_instances(client, Some(ns)).await;

    let status = wait_status(api, "a new primary, 3/3 ready", WAIT, |s| {
        s["currentPrimary"] != "ha-pg-0"
            && s["phase"] == "Healthy"
            && s["ready"] == "3/3"
            && s.get("primaryChange").is_none()
    })
    .await;
    let new_primary = status["currentPrimary"].as_str().unwrap().to_string();
    writer.wait_more(20, "writes after the failover").await;
    let acked = writer.stop().await;
    all_rows_present(&s.db, &s.password, &acked, WAIT).await;
    assert_eq!(primaries(kubelet).await, [new_primary.as_str()]);
    assert_eq!(
        rw_ip(client, ns).await.unwrap(),
        kubelet.pod_ip(&new_primary)
    );
    assert_no_failures(client, ns).await;
    drop(operator);
}

/// The primary's node is lost (manager and server killed, the pod still
/// reported Running and Ready): the operator waits until the primary's
/// write lease has certainly expired, deletes its pod (the host-side
/// fence; a lost node confirms nothing, so it stays Terminating),
/// detaches the replicas and promotes. When the node is back the pod is
/// recreated: its volume held a lease, so it waits for one instead of
/// starting as a writer, and rejoins as a replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_whose_node_is_lost_is_replaced_once_its_lease_expired() {
    let (s, operator) = setup("pg-ha-node").await;
    let (client, ns, api, kubelet) = (&s.db.client, &s.db.ns, &s.db.api, &s.db.kubelet);
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let old_uid = pods.get("ha-pg-0").await.unwrap().metadata.uid;
    let writer = start_writer(&s);
    writer.wait_more(20, "writes before the node is lost").await;

    kubelet.crash("ha-pg-0");
    let at = std::time::Instant::now();
    let status = wait_status(api, "a new primary after the node loss", WAIT, |s| {
        s["currentPrimary"] != "ha-pg-0" && s["currentPrimary"].is_string()
    })
    .await;
    let promoted_after = at.elapsed();
    let new_primary = status["currentPrimary"].as_str().unwrap().to_string();
    // Not before the lease (5 s) plus its margin (1 s) ran out.
    assert!(
        promoted_after >= Duration::from_secs(5),
        "promoted {promoted_after:?} after the node loss, before the lease expired"
    );
    writer
        .wait_more(1, "a write taken by the new primary")
        .await;
    eprintln!(
        "node loss: new primary {new_primary} after {} ms, first acknowledged write after {} ms (polled)",
        promoted_after.as_millis(),
        at.elapsed().as_millis()
    );
    // The operator deleted the pod; a lost node confirms nothing, so it
    // stays Terminating until the node is back.
    let pod = pods.get("ha-pg-0").await.unwrap();
    assert!(
        pod.metadata.deletion_timestamp.is_some(),
        "the lost primary's pod was not deleted"
    );
    kubelet.recover("ha-pg-0");
    eventually("ha-pg-0 recreated", WAIT, || async {
        let pod = pods.get("ha-pg-0").await.map_err(|e| e.to_string())?;
        (pod.metadata.uid != old_uid && pod.metadata.deletion_timestamp.is_none())
            .then_some(())
            .ok_or(format!("uid {:?}", pod.metadata.uid))
    })
    .await;
    wait_status(api, "ha-pg-0 back as a ready replica", WAIT, |s| {
        replica_ready(s, "ha-pg-0")
    })
    .await;
    writer.wait_more(20, "writes after the rejoin").await;
    let acked = writer.stop().await;
    all_rows_present(&s.db, &s.password, &acked, WAIT).await;
    assert_eq!(primaries(kubelet).await, [new_primary.as_str()]);
    // The recreated pod waited for a lease rather than start as a writer.
    let log = kubelet.manager_log("ha-pg-0");
    assert!(log.contains("waiting for a write lease"), "{log}");
    let events = events_about(client, ns, "ha-pg").await;
    assert!(
        events.iter().any(|e| e.reason.as_deref() == Some("Fenced")
            && e.note.as_deref().is_some_and(|n| n.contains("pod deleted"))),
        "{:?}",
        reasons(&events)
    );
    assert_no_failures(client, ns).await;
    drop(operator);
}

// ---------------------------------------------------------------------
// Switchover timing; a frozen primary manager (the k8sswitch tests)
// ---------------------------------------------------------------------

/// Milliseconds since midnight UTC now (to place the managers' log lines,
/// stamped in UTC, on the test's time line).
fn ms_of_day() -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    (now.as_millis() % 86_400_000) as u64
}

/// The lines of a `stratum` log (tracing's default format, possibly with
/// ANSI colours) that contain `needle`, as (ms since midnight UTC, line).
fn log_lines(log: &str, needle: &str) -> Vec<(u64, String)> {
    let ansi = |s: &str| {
        let mut out = String::new();
        let mut chars = s.chars();
        while let Some(c) = chars.next() {
            if c == '\u{1b}' {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            } else {
                out.push(c);
            }
        }
        out
    };
    log.lines()
        .filter(|l| l.contains(needle))
        .filter_map(|l| {
            let l = ansi(l);
            // 2026-11-26T02:50:44.123456Z
            let t = l.get(11..23)?;
            let (h, rest) = t.split_once(':')?;
            let (m, rest) = rest.split_once(':')?;
            let (s, frac) = rest.split_once('.')?;
            let ms = ((h.parse::<u64>().ok()? * 60 + m.parse::<u64>().ok()?) * 60
                + s.parse::<u64>().ok()?)
                * 1000
                + frac.get(..3)?.parse::<u64>().ok()?;
            Some((ms, l))
        })
        .collect()
}

/// A step of a [`TimedWriter`]: when, towards which pod IP, what.
type Step = (std::time::Instant, Ipv4Addr, &'static str);

/// A writer through `-rw` like [`start_writer`], that keeps when each commit was
/// acknowledged and by which pod, and looks `-rw` up again 20 ms after a
/// failure (a client retrying its connection), so that the write
/// unavailability it sees is the cluster's, not its own back-off.
struct TimedWriter {
    stop: Arc<AtomicBool>,
    acks: Arc<Mutex<Vec<(std::time::Instant, Ipv4Addr, i32)>>>,
    /// When it first found each new address behind `-rw`, and when a
    /// connection to it was up (where its own part of a gap goes).
    steps: Arc<Mutex<Vec<Step>>>,
    task: tokio::task::JoinHandle<()>,
}

impl TimedWriter {
    fn start(client: Client, ns: String, password: String) -> Self {
        Self::start_at(client, ns, password, None, 2_000_000)
    }

    /// Writes to `fixed` (a client connected to one pod's own IP, not
    /// through `-rw`) when given; ids from `first`.
    fn start_at(
        client: Client,
        ns: String,
        password: String,
        fixed: Option<Ipv4Addr>,
        first: i32,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let acks: Arc<Mutex<Vec<(std::time::Instant, Ipv4Addr, i32)>>> = Arc::default();
        let steps: Arc<Mutex<Vec<Step>>> = Arc::default();
        let (s, a, st) = (stop.clone(), acks.clone(), steps.clone());
        let task = tokio::spawn(async move {
            let mut next = first;
            let mut last_seen = None;
            while !s.load(Ordering::SeqCst) {
                let ip = match fixed {
                    Some(ip) => Ok(ip),
                    None => rw_ip(&client, &ns).await,
                };
                let Ok(ip) = ip else {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                };
                if last_seen != Some(ip) {
                    last_seen = Some(ip);
                    st.lock()
                        .unwrap()
                        .push((std::time::Instant::now(), ip, "found behind -rw"));
                }
                let Ok(c) = pg_connect(ip, &password).await else {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                };
                st.lock()
                    .unwrap()
                    .push((std::time::Instant::now(), ip, "connected"));
                while !s.load(Ordering::SeqCst) {
                    let id = next;
                    next += 1;
                    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&id];
                    let insert = c.execute("INSERT INTO t VALUES ($1)", &params);
                    match tokio::time::timeout(Duration::from_secs(5), insert).await {
                        Ok(Ok(_)) => a.lock().unwrap().push((std::time::Instant::now(), ip, id)),
                        _ => break,
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        });
        Self {
            stop,
            acks,
            steps,
            task,
        }
    }

    /// Its own steps towards `ip` after `after` (ms after `after`).
    fn steps_to(&self, ip: Ipv4Addr, after: std::time::Instant) -> Vec<(u64, &'static str)> {
        let steps = self.steps.lock().unwrap();
        steps
            .iter()
            .filter(|(t, by, _)| *t > after && *by == ip)
            .map(|(t, _, what)| (t.duration_since(after).as_millis() as u64, *what))
            .collect()
    }

    /// The first commit acknowledged by `ip` after `after`, and the one
    /// acknowledged just before it (by anyone).
    fn first_on(
        &self,
        ip: Ipv4Addr,
        after: std::time::Instant,
    ) -> Option<(std::time::Instant, Option<std::time::Instant>)> {
        let acks = self.acks.lock().unwrap();
        let i = acks.iter().position(|(t, by, _)| *t > after && *by == ip)?;
        Some((acks[i].0, i.checked_sub(1).map(|j| acks[j].0)))
    }

    fn count(&self) -> usize {
        self.acks.lock().unwrap().len()
    }

    /// When commits were acknowledged by `ip`.
    fn acked_by(&self, ip: Ipv4Addr) -> Vec<std::time::Instant> {
        let acks = self.acks.lock().unwrap();
        acks.iter()
            .filter(|(_, by, _)| *by == ip)
            .map(|(t, ..)| *t)
            .collect()
    }

    async fn wait_more(&self, n: usize, what: &str) {
        let from = self.count();
        eventually(what, WAIT, || async {
            let now = self.count();
            (now >= from + n)
                .then_some(())
                .ok_or(format!("{} acknowledged since", now - from))
        })
        .await;
    }

    async fn stop(self) -> Vec<i32> {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.task.await;
        self.acks
            .lock()
            .unwrap()
            .iter()
            .map(|(_, _, id)| *id)
            .collect()
    }
}

/// When each milestone of a switchover was first seen from outside,
/// polling every 20 ms (ms after the request).
#[derive(Debug, Default, Clone)]
struct Milestones {
    /// `status.primaryChange` recorded.
    change_recorded: Option<u64>,
    /// `-rw` selects no ready pod.
    rw_empty: Option<u64>,
    /// `status.currentPrimary` is the target.
    primary_recorded: Option<u64>,
    /// `-rw` selects the target (label moved, pod Ready).
    rw_on_target: Option<u64>,
}

/// Poll status and `-rw` until `stop`.
fn watch_milestones(
    client: Client,
    ns: String,
    api: Api<DynamicObject>,
    target: String,
    target_ip: Ipv4Addr,
    t0: std::time::Instant,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Milestones> {
    tokio::spawn(async move {
        let mut m = Milestones::default();
        while !stop.load(Ordering::SeqCst) {
            let at = || t0.elapsed().as_millis() as u64;
            let (status, ips) =
                tokio::join!(api.get("ha-pg"), service_ips(&client, &ns, "ha-pg-rw"));
            if let Ok(o) = status {
                let s = &o.data["status"];
                if m.change_recorded.is_none()
                    && s.get("primaryChange").is_some_and(|c| !c.is_null())
                {
                    m.change_recorded = Some(at());
                }
                if m.primary_recorded.is_none() && s["currentPrimary"] == target.as_str() {
                    m.primary_recorded = Some(at());
                }
            }
            if let Ok(ips) = ips {
                if m.rw_empty.is_none() && ips.is_empty() {
                    m.rw_empty = Some(at());
                }
                if m.rw_on_target.is_none() && ips == [target_ip] {
                    m.rw_on_target = Some(at());
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        m
    })
}

fn median(v: &mut [u64]) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

/// Switchovers under a writer, timed from outside: from the status patch
/// to the first commit the new primary acknowledged through `-rw`, and
/// the writer's longest gap between two acknowledged commits (its write
/// unavailability), with the milestones between (status, `-rw`, the
/// writer's own steps, the managers' and the operator's log lines; not
/// the EndpointSlice: it refuses the fake kubelet's loopback pod IPs).
/// Asserts what a user checks: each switchover lands on the target, no
/// acknowledged row is lost, one primary. `STRATUM_SWITCHOVER_RUNS`
/// (default 3) switchovers, round the three instances; with
/// `STRATUM_SWITCHOVER_OPERATOR_LOG=FILE` the operator's log is kept
/// there. Numbers are printed, not asserted (a shared machine).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchover_under_writes_timed() {
    let runs: usize = std::env::var("STRATUM_SWITCHOVER_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let (s, operator) = setup("pg-ha-sw").await;
    let (client, ns, api, kubelet) = (&s.db.client, &s.db.ns, &s.db.api, &s.db.kubelet);
    let writer = TimedWriter::start(client.clone(), ns.clone(), s.password.clone());
    let ops = kubelet.instance_client();
    let mut primary = "ha-pg-0".to_string();
    let (mut first_writes, mut windows) = (Vec::new(), Vec::new());
    for run in 0..runs {
        let target = NAMES[(run + 1) % NAMES.len()].to_string();
        // Every run starts alike: healthy, both replicas streaming.
        wait_status(api, "healthy before the switchover", WAIT, |st| {
            healthy_with(&primary)(st)
                && NAMES
                    .iter()
                    .filter(|n| **n != primary)
                    .all(|n| replica_ready(st, n))
        })
        .await;
        eventually("both replicas streaming", WAIT, || async {
            let st = ops.status(&primary).await.map_err(|e| e.to_string())?;
            let streaming = operator_core::topology::streaming_replicas(&st);
            (streaming.len() == 2)
                .then_some(())
                .ok_or(format!("streaming: {streaming:?}"))
        })
        .await;
        writer.wait_more(20, "writes before the switchover").await;
        let target_ip = kubelet.pod_ip(&target);
        let stop = Arc::new(AtomicBool::new(false));
        let (t0, wall0) = (std::time::Instant::now(), ms_of_day());
        let watcher = watch_milestones(
            client.clone(),
            ns.clone(),
            api.clone(),
            target.clone(),
            target_ip,
            t0,
            stop.clone(),
        );
        request_switchover(api, "ha-pg", &target).await;
        let (first, before) =
            eventually("a write acknowledged by the new primary", WAIT, || async {
                writer
                    .first_on(target_ip, t0)
                    .ok_or_else(|| format!("none by {target} yet"))
            })
            .await;
        stop.store(true, Ordering::SeqCst);
        let milestones = watcher.await.unwrap();
        let first_write = first.duration_since(t0).as_millis() as u64;
        let window = before.map_or(first_write, |b| first.duration_since(b).as_millis() as u64);
        eprintln!(
            "switchover {run} {primary} -> {target}: first write through -rw after {first_write} ms; writer saw no commit for {window} ms; milestones after the request (ms): {milestones:?}; the writer's steps (ms): {:?}",
            writer.steps_to(target_ip, t0)
        );
        // The managers' own account (their log lines, same time line).
        for (pod, needle) in [
            (primary.as_str(), "on request (fence)"),
            (primary.as_str(), "server stopped"),
            (target.as_str(), "promoting (pg_promote)"),
        ] {
            for (ms, line) in log_lines(&kubelet.manager_log(pod), needle) {
                if ms >= wall0 {
                    eprintln!(
                        "  +{} ms {pod}: {}",
                        ms - wall0,
                        line.get(28..).unwrap_or(&line).trim()
                    );
                }
            }
        }
        for pod in NAMES {
            for (ms, _) in log_lines(&kubelet.manager_log(pod), "following a new primary") {
                if ms >= wall0 && ms < wall0 + 10_000 {
                    eprintln!("  +{} ms {pod}: told to follow", ms - wall0);
                }
            }
        }
        for (ms, line) in log_lines(&operator.log(), "ha-pg") {
            if ms >= wall0 && ms < wall0 + first_write + 2_000 {
                // The Event's reason and note, or the message.
                let text = line
                    .find("reason=")
                    .map(|i| &line[i..])
                    .or_else(|| line.find("ha: ").map(|i| &line[i + 4..]))
                    .unwrap_or(&line);
                eprintln!("  +{} ms operator: {}", ms - wall0, text.trim());
            }
        }
        first_writes.push(first_write);
        windows.push(window);
        {
            let switched = healthy_with(&target);
            wait_status(api, "switched over", WAIT, |st| {
                switched(st) && condition(st, "Switchover").is_some_and(|c| c["status"] == "True")
            })
            .await;
        }
        primary = target;
    }
    let acked = writer.stop().await;
    all_rows_present(&s.db, &s.password, &acked, WAIT).await;
    assert_eq!(primaries(kubelet).await, [primary.as_str()]);
    eprintln!(
        "{runs} switchovers: first write through -rw median {} ms (all {first_writes:?}); write unavailability median {} ms (all {windows:?}); {} acknowledged rows, none lost",
        median(&mut first_writes.clone()),
        median(&mut windows.clone()),
        acked.len()
    );
    if let Some(path) = std::env::var_os("STRATUM_SWITCHOVER_OPERATOR_LOG") {
        std::fs::write(&path, operator.log()).expect("write the operator's log");
    }
    assert_no_failures(client, ns).await;
    drop(operator);
}

/// The instances' positions in status (`tl N lsn …`), by name.
fn positions(st: &Value) -> Vec<(String, String)> {
    st["instancesStatus"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|i| {
            (
                i["name"].as_str().unwrap_or_default().to_string(),
                i["position"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// The primary's instance manager freezes (SIGSTOP; its PostgreSQL keeps
/// running and requests to the manager hang) after a switchover made
/// timeline 2, under a writer through `-rw` and a client connected to the
/// primary's own pod IP. The operator fails over: no commit is
/// acknowledged by the old primary once the new one took one (never two
/// writable primaries), every acknowledged row is there, the
/// `FailoverCandidate` Event names the timeline the replicas streamed on
/// (2, not their control files' stale 1). The manager is thawed as soon
/// as the failover is recorded: either it answers again and is fenced
/// through its manager, or its pod was already deleted (lease expired)
/// and is recreated; either way the old primary rejoins as a replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_primary_manager_is_failed_over_and_rejoins_when_thawed() {
    let (s, operator) = setup("pg-ha-frozen").await;
    let (client, ns, api, kubelet) = (&s.db.client, &s.db.ns, &s.db.api, &s.db.kubelet);
    let writer = TimedWriter::start(client.clone(), ns.clone(), s.password.clone());
    writer.wait_more(20, "writes before the switchover").await;
    request_switchover(api, "ha-pg", "ha-pg-1").await;
    wait_status(
        api,
        "switched over to ha-pg-1",
        WAIT,
        healthy_with("ha-pg-1"),
    )
    .await;
    // Both replicas streaming on timeline 2, as the operator saw them
    // (a standby reports its receiver's timeline while it streams).
    let ops = kubelet.instance_client();
    eventually("both replicas streaming from ha-pg-1", WAIT, || async {
        let st = ops.status("ha-pg-1").await.map_err(|e| e.to_string())?;
        let streaming = operator_core::topology::streaming_replicas(&st);
        (streaming.len() == 2)
            .then_some(())
            .ok_or(format!("streaming: {streaming:?}"))
    })
    .await;
    wait_status(api, "both replicas on timeline 2 in status", WAIT, |st| {
        let p = positions(st);
        ["ha-pg-0", "ha-pg-2"]
            .iter()
            .all(|n| p.iter().any(|(m, pos)| m == n && pos.starts_with("tl 2 ")))
    })
    .await;
    let old_ip = kubelet.pod_ip("ha-pg-1");
    let direct = TimedWriter::start_at(
        client.clone(),
        ns.clone(),
        s.password.clone(),
        Some(old_ip),
        3_000_000,
    );
    direct.wait_more(5, "writes straight to ha-pg-1").await;
    writer.wait_more(20, "writes before the freeze").await;

    let pid = kubelet.freeze("ha-pg-1");
    let at = std::time::Instant::now();
    eprintln!("froze the manager of ha-pg-1 (pid {pid})");
    wait_status(api, "the failover from ha-pg-1 recorded", WAIT, |st| {
        st["primaryChange"]["from"] == "ha-pg-1" || st["currentPrimary"] != "ha-pg-1"
    })
    .await;
    let thawed = kubelet.thaw(pid);
    eprintln!(
        "failover recorded {} ms after the freeze; manager thawed: {thawed}",
        at.elapsed().as_millis()
    );
    let status = wait_status(api, "a new primary after the freeze", WAIT, |st| {
        st["currentPrimary"] != "ha-pg-1"
            && st["currentPrimary"].is_string()
            && st.get("primaryChange").is_none()
    })
    .await;
    let new_primary = status["currentPrimary"].as_str().unwrap().to_string();
    let new_ip = kubelet.pod_ip(&new_primary);
    writer
        .wait_more(20, "writes taken by the new primary")
        .await;
    eprintln!(
        "frozen manager: new primary {new_primary} took writes {} ms after the freeze",
        at.elapsed().as_millis()
    );
    wait_status(api, "ha-pg-1 back as a ready replica", WAIT, |st| {
        replica_ready(st, "ha-pg-1")
    })
    .await;
    eventually("one primary", WAIT, || async {
        let p = primaries(kubelet).await;
        (p == [new_primary.as_str()])
            .then_some(())
            .ok_or(format!("{p:?}"))
    })
    .await;
    let direct_acked = direct.acked_by(old_ip);
    let rw_acked_old = writer.acked_by(old_ip);
    let first_new = writer
        .acked_by(new_ip)
        .into_iter()
        .find(|t| *t > at)
        .expect("a commit acknowledged by the new primary");
    let late: Vec<_> = direct_acked
        .iter()
        .chain(&rw_acked_old)
        .filter(|t| **t >= first_new)
        .collect();
    assert!(
        late.is_empty(),
        "{} commits acknowledged by the old primary after the new one took writes",
        late.len()
    );
    let mut acked = writer.stop().await;
    acked.extend(direct.stop().await);
    all_rows_present(&s.db, &s.password, &acked, WAIT).await;
    eprintln!(
        "{} acknowledged rows ({} straight to ha-pg-1), none lost",
        acked.len(),
        direct_acked.len()
    );
    let events = events_about(client, ns, "ha-pg").await;
    for e in &events {
        eprintln!(
            "event {} {}",
            e.reason.as_deref().unwrap_or_default(),
            e.note.as_deref().unwrap_or_default()
        );
    }
    let candidate = events
        .iter()
        .find(|e| e.reason.as_deref() == Some("FailoverCandidate"))
        .and_then(|e| e.note.clone())
        .unwrap_or_else(|| panic!("no FailoverCandidate Event: {:?}", reasons(&events)));
    assert!(
        candidate.contains(&format!("promoting {new_primary}"))
            && candidate.contains("timeline 2,"),
        "{candidate}"
    );
    assert_no_failures(client, ns).await;
    drop(operator);
}

/// The operator away for 20 s (SIGKILLed; a new one started after 20 s,
/// longer than its leader Lease's 15 s) under a writer through `-rw`: the
/// primary keeps its write lease on failsafe (both replicas acknowledge
/// it), writes go on with no pause over a second, and the restarted
/// operator keeps the same primary (same lease term, no failover),
/// Healthy, and reports how long writes ran on failsafe (Event
/// `FailsafeEnded`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_away_for_20_s_the_primary_keeps_writes_on_failsafe() {
    let (s, mut operator) = setup("pg-ha-away").await;
    let (client, ns, api, kubelet) = (&s.db.client, &s.db.ns, &s.db.api, &s.db.kubelet);
    let writer = start_writer(&s);
    writer
        .wait_more(20, "writes before the operator goes away")
        .await;

    let before = writer.count();
    operator.kill();
    let away = std::time::Instant::now();
    let (mut last, mut last_change, mut longest) = (writer.count(), away, Duration::ZERO);
    while away.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = writer.count();
        if now > last {
            (last, last_change) = (now, std::time::Instant::now());
        }
        longest = longest.max(last_change.elapsed());
    }
    eprintln!(
        "operator away 20 s: {} writes acknowledged meanwhile, longest pause {} ms",
        writer.count() - before,
        longest.as_millis()
    );
    assert!(
        longest < Duration::from_millis(1100),
        "writes paused {} ms while the operator was away",
        longest.as_millis()
    );
    let status = kubelet.instance_client().status("ha-pg-0").await.unwrap();
    assert!(status.on_failsafe, "{status:?}");
    assert!(
        status.failsafe_kept_ms.is_some_and(|k| k > 10_000),
        "{status:?}"
    );

    let operator = OperatorProcess::start_for_instances(client, Some(ns)).await;
    let status = wait_status(
        api,
        "Healthy with the same primary",
        WAIT,
        healthy_with("ha-pg-0"),
    )
    .await;
    assert_eq!(status["leaseTerm"], 1, "no promotion: {status}");
    let note = eventually("a FailsafeEnded Event", WAIT, || async {
        let events = events_about(client, ns, "ha-pg").await;
        events
            .iter()
            .find(|e| e.reason.as_deref() == Some("FailsafeEnded"))
            .and_then(|e| e.note.clone())
            .ok_or(format!("{:?}", reasons(&events)))
    })
    .await;
    assert!(
        note.contains("primary ha-pg-0 kept writes on failsafe for"),
        "{note}"
    );
    eprintln!("{note}");
    let events = events_about(client, ns, "ha-pg").await;
    assert!(
        !reasons(&events).iter().any(|r| r == "FailoverStarted"),
        "{:?}",
        reasons(&events)
    );
    writer
        .wait_more(20, "writes after the operator is back")
        .await;
    let acked = writer.stop().await;
    all_rows_present(&s.db, &s.password, &acked, WAIT).await;
    assert_eq!(primaries(kubelet).await, ["ha-pg-0"]);
    assert!(
        !kubelet
            .instance_client()
            .status("ha-pg-0")
            .await
            .unwrap()
            .on_failsafe
    );
    assert_no_failures(client, ns).await;
    drop(operator);
}
