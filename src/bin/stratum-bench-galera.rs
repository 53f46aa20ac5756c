//! `stratum-bench-galera`: the Galera benchmark on the local runtime (not a
//! test). Creates a 3-node MariaDB Galera cluster (PxcCluster, flavor
//! MariaDB) behind HAProxy with default settings, writes numbered rows
//! through `rw` without pause, kills the writer's mariadbd N times
//! (SIGKILL), wipes one node's data once (a rejoin by SST), crashes every
//! process M times (SIGKILL to `up`, the managers and every mariadbd) and
//! starts `up` again, then writes a table to docs/benchmarks.md (between
//! the Galera markers). Run as root or as a user that may run MariaDB:
//!
//! ```sh
//! cargo build --release && target/release/stratum-bench-galera --kills 10 --crashes 3
//! ```

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use mysql_async::prelude::*;
use serde_json::Value;

#[path = "../bench/local.rs"]
mod local;
#[path = "../bench/report.rs"]
mod report;
use local::{Cluster, kill, machine, port_of, wait_ack_elsewhere};
use report::{date, ms, stats, write_section};

const START: &str = "<!-- galera-benchmark:start -->";
const END: &str = "<!-- galera-benchmark:end -->";
const CLUSTER: &str = "bench-pxc";
const WAIT: Duration = Duration::from_secs(300);

/// Galera (PxcCluster, flavor MariaDB) on the local runtime: writer kills,
/// full crashes, SST and IST rejoins, creation.
#[derive(Parser)]
#[command(name = "stratum-bench-galera")]
struct Args {
    /// How many times to kill the writer's mariadbd.
    #[arg(long, default_value_t = 10)]
    kills: usize,
    /// How many full crashes (every process killed, `up` started again).
    #[arg(long, default_value_t = 3)]
    crashes: usize,
    /// How many rejoins by SST (a node's data directory wiped).
    #[arg(long, default_value_t = 1)]
    sst: usize,
    /// The results file; the Galera section is replaced.
    #[arg(long, default_value = "docs/benchmarks.md")]
    out: PathBuf,
    /// Do not write the results file, only print the table.
    #[arg(long)]
    dry_run: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(args))
}

impl Cluster {
    /// Every member Synced in a 3-member Primary component, rw routed.
    async fn healthy(&self) -> anyhow::Result<Value> {
        self.wait("Healthy", |s| {
            s["phase"] == "Healthy"
                && s["primary"].is_string()
                && s["instances"].as_array().is_some_and(|a| {
                    a.iter()
                        .all(|i| i["wsrep"]["state"] == "Synced" && i["wsrep"]["clusterSize"] == 3)
                })
        })
        .await
    }

    fn mariadbd_pid(&self, name: &str) -> anyhow::Result<i32> {
        let needle = format!(
            "--defaults-file={}",
            self.instance_dir(name).join("run").display()
        );
        for entry in std::fs::read_dir("/proc")?.flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            let cmd = String::from_utf8_lossy(&cmd);
            let mut args = cmd.split('\0');
            if args.next().is_some_and(|a| a.ends_with("mariadbd"))
                && args.any(|a| a.starts_with(&needle))
            {
                return Ok(pid);
            }
        }
        bail!("no mariadbd running for {name}")
    }
}

async fn connect(address: &str, password: &str) -> Option<mysql_async::Conn> {
    let (host, port) = address.rsplit_once(':')?;
    let opts = mysql_async::OptsBuilder::default()
        .ip_or_hostname(host.to_string())
        .tcp_port(port.parse().ok()?)
        .user(Some("root"))
        .pass(Some(password.to_string()))
        .prefer_socket(false);
    tokio::time::timeout(Duration::from_secs(2), mysql_async::Conn::new(opts))
        .await
        .ok()?
        .ok()
}

type Acks = local::Acks<u16>;

fn writer(
    rw: String,
    password: String,
    stop: Arc<AtomicBool>,
    acks: Acks,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut n = 0i64;
        let mut conn: Option<(mysql_async::Conn, u16)> = None;
        while !stop.load(Ordering::Relaxed) {
            if conn.is_none() {
                let Some(mut c) = connect(&rw, &password).await else {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                };
                match c.query_first::<u16, _>("SELECT @@port").await {
                    Ok(Some(p)) => conn = Some((c, p)),
                    _ => continue,
                }
            }
            let (c, port) = conn.as_mut().unwrap();
            let port = *port;
            n += 1;
            let insert = c.exec_drop("INSERT INTO bench.rows_acked (n) VALUES (?)", (n,));
            match tokio::time::timeout(Duration::from_secs(10), insert).await {
                Ok(Ok(())) => acks.lock().unwrap().push((n, Instant::now(), port)),
                _ => conn = None,
            }
        }
    })
}

fn names() -> Vec<String> {
    (0..3).map(|i| format!("{CLUSTER}-{i}")).collect()
}

/// Wait until the client's writes are acknowledged by the writer (`port`)
/// before a kill: a kill measures nothing when the client's `rw` session
/// is on another node (`rw` had two writers before the local runtime cut
/// sessions off the writer), so that is an error, not a fast failover.
async fn on_writer(acks: &Acks, writer: &str, port: u16) -> anyhow::Result<()> {
    let t = Instant::now();
    loop {
        let last = acks.lock().unwrap().last().map(|(_, at, p)| (*at, *p));
        if let Some((at, p)) = last
            && p == port
            && at.elapsed() < Duration::from_secs(1)
        {
            return Ok(());
        }
        if t.elapsed() > Duration::from_secs(30) {
            anyhow::bail!(
                "the client's rw writes are not acknowledged by the writer {writer} (port {port}) after 30 s; last acknowledgement: {last:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Wait until `name` is Synced again after `t` (it was seen not Synced),
/// returning the time and its last state transfer.
async fn rejoined(c: &Cluster, name: &str, t: Instant) -> anyhow::Result<(Duration, String)> {
    c.wait(&format!("{name} not Synced"), |s| {
        s["instances"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|i| i["name"] == name && i["wsrep"]["state"] != "Synced")
    })
    .await?;
    let s = c.healthy().await?;
    let transfer = s["instances"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|i| i["name"] == name)
        .and_then(|i| i["wsrep"]["lastStateTransfer"].as_str())
        .unwrap_or("?")
        .to_string();
    Ok((t.elapsed(), transfer))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let yaml = format!(
        "apiVersion: stratum.dev/v1alpha1
kind: PxcCluster
metadata:
  name: {CLUSTER}
spec:
  instances: 3
  flavor: MariaDB
  version: \"10.11\"
  storage:
    size: 1Gi
"
    );
    let mut cluster = Cluster::create("stratum-bench-galera", "bench-pxc.yaml", &yaml, WAIT)?;
    let created = Instant::now();
    cluster.start()?;
    let s = cluster.healthy().await?;
    let create_time = created.elapsed();
    eprintln!("3 nodes Synced in {}", ms(create_time));
    let rw = s["endpoints"]["rw"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let password = cluster.secret("root-password")?;
    let mut c = connect(&rw, &password).await.context("connect to rw")?;
    c.query_drop(
        "CREATE DATABASE bench; CREATE TABLE bench.rows_acked (n BIGINT PRIMARY KEY) ENGINE=InnoDB",
    )
    .await?;
    let server_version: String = c.query_first("SELECT @@version").await?.unwrap_or_default();
    let galera_version: String = c
        .query_first::<(String, String), _>("SHOW GLOBAL STATUS LIKE 'wsrep_provider_version'")
        .await?
        .map(|(_, v)| v)
        .unwrap_or_default();
    drop(c);

    let stop = Arc::new(AtomicBool::new(false));
    let acks: Acks = Arc::default();
    let task = writer(rw.clone(), password.clone(), stop.clone(), acks.clone());

    // Writer kills.
    let mut unavailable = Vec::new();
    let mut ist = Vec::new();
    let mut transfers = Vec::new();
    for i in 0..args.kills {
        let s = cluster.healthy().await?;
        let old = s["galera"]["writer"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let old_port: u16 = port_of(&s, &old);
        on_writer(&acks, &old, old_port).await?;
        let pid = cluster.mariadbd_pid(&old)?;
        let t = Instant::now();
        kill(pid, "KILL")?;
        let gap = wait_ack_elsewhere(&acks, t, old_port, "another node", WAIT).await?;
        let (rejoin, transfer) = rejoined(&cluster, &old, t).await?;
        eprintln!(
            "kill {}/{}: {old} → writes acknowledged by another node after {}, {old} Synced again after {} ({transfer})",
            i + 1,
            args.kills,
            ms(gap),
            ms(rejoin)
        );
        unavailable.push(gap);
        ist.push(rejoin);
        transfers.push(transfer);
    }

    // Rejoin by SST: a non-writer's manager and server killed while `up`
    // is paused (so it is not restarted meanwhile), its data wiped.
    let mut sst = Vec::new();
    for i in 0..args.sst {
        let s = cluster.healthy().await?;
        let writer_name = s["galera"]["writer"].as_str().unwrap_or_default();
        let victim = names()
            .into_iter()
            .find(|n| n != writer_name)
            .context("a non-writer")?;
        let up_pid = cluster.up_pid()?;
        let (m, p) = (
            cluster.manager_pid(&victim)?,
            cluster.mariadbd_pid(&victim)?,
        );
        kill(up_pid, "STOP")?;
        let t = Instant::now();
        kill(m, "KILL")?;
        kill(p, "KILL")?;
        let data = cluster.instance_dir(&victim).join("data");
        for entry in std::fs::read_dir(&data)?.flatten() {
            let path = entry.path();
            if path.is_dir() {
                std::fs::remove_dir_all(&path)?;
            } else {
                std::fs::remove_file(&path)?;
            }
        }
        kill(up_pid, "CONT")?;
        let (rejoin, transfer) = rejoined(&cluster, &victim, t).await?;
        eprintln!(
            "sst {}/{}: {victim} wiped, Synced again after {} ({transfer})",
            i + 1,
            args.sst,
            ms(rejoin)
        );
        sst.push(rejoin);
        transfers.push(transfer);
    }

    stop.store(true, Ordering::Relaxed);
    let _ = task.await;

    // Full crashes: every process killed at once, then `up` again.
    let mut writable = Vec::new();
    let mut synced = Vec::new();
    for i in 0..args.crashes {
        cluster.healthy().await?;
        // Rows written just before the crash must survive it.
        let mut c = connect(&rw, &password).await.context("connect to rw")?;
        let base = 1_000_000_000 * (i as i64 + 1);
        for n in base..base + 200 {
            c.exec_drop("INSERT INTO bench.rows_acked (n) VALUES (?)", (n,))
                .await?;
            acks.lock().unwrap().push((n, Instant::now(), 0));
        }
        drop(c);
        let mut victims = vec![cluster.up_pid()?];
        for n in names() {
            victims.push(cluster.manager_pid(&n)?);
            victims.push(cluster.mariadbd_pid(&n)?);
        }
        for pid in victims {
            kill(pid, "KILL")?;
        }
        if let Some(mut up) = cluster.up.take() {
            let _ = up.wait();
        }
        let t = Instant::now();
        cluster.start()?;
        let first = loop {
            if let Some(mut c) = connect(&rw, &password).await
                && c.exec_drop("INSERT INTO bench.rows_acked (n) VALUES (?)", (base + 500,))
                    .await
                    .is_ok()
            {
                acks.lock().unwrap().push((base + 500, Instant::now(), 0));
                break t.elapsed();
            }
            if t.elapsed() > WAIT {
                bail!("not writable within {}s after a full crash", WAIT.as_secs());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        cluster.healthy().await?;
        let all = t.elapsed();
        eprintln!(
            "crash {}/{}: writable {} after up, all Synced after {}",
            i + 1,
            args.crashes,
            ms(first),
            ms(all)
        );
        writable.push(first);
        synced.push(all);
    }

    let s = cluster.healthy().await?;
    let mut c = connect(s["endpoints"]["rw"].as_str().unwrap_or_default(), &password)
        .await
        .context("connect to rw")?;
    let present: BTreeSet<i64> = c
        .query::<i64, _>("SELECT n FROM bench.rows_acked")
        .await?
        .into_iter()
        .collect();
    let (acked, lost) = local::lost(&acks, &present);
    let bootstraps = cluster.state_json()["galera"]["bootstraps"]
        .as_u64()
        .unwrap_or(0);

    let (u50, u95, umax) = stats(unavailable);
    let (i50, _, imax) = stats(ist);
    let (s50, _, smax) = stats(sst);
    let (w50, _, wmax) = stats(writable);
    let (a50, _, amax) = stats(synced);
    let ist_count = transfers.iter().filter(|t| *t == "ist").count();
    let (cores, mem_gib) = machine();
    let haproxy = Command::new("haproxy")
        .arg("-v")
        .output()
        .ok()
        .and_then(|o| {
            // "HAProxy version 2.6.12-1+deb12u4 2026/10/17 - https://…"
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .nth(2)
                .map(|v| format!("HAProxy {v}"))
        })
        .unwrap_or_default();
    let table = format!(
        "{START}
Measured {date} with `stratum-bench-galera --kills {kills} --crashes {crashes} --sst {sstn}`
(default settings: 500 ms decision loop, HAProxy checks every 500 ms with
fall 2 / rise 2, the driver's Galera timeouts) on {cores} cores, {mem_gib:.0} GiB
RAM, MariaDB {server_version} with Galera {galera_version}, {haproxy}; a debug
build unless stated. Cluster: 3 nodes (PxcCluster, flavor MariaDB); one client
inserts numbered rows through `rw` without pause during the kills; each kill
is SIGKILL of the writer's mariadbd, which its manager restarts; a full crash
is SIGKILL of `up`, the three managers and the three mariadbd at once, then
`up` again.

| Metric | Median | Max | Target |
|---|---|---|---|
| Write unavailability through `rw`: kill → first write acknowledged by another node ({kills} kills) | {u50} (p95 {u95}) | {umax} | < 6 s |
| Killed writer Synced again (from the kill; {ist_count} of {transfers} rejoins by IST) | {i50} | {imax} | |
| Rejoin by SST of a wiped node (from the kill; {sstn} round(s)) | {s50} | {smax} | |
| Full crash: `up` → first write through `rw` ({crashes} crashes) | {w50} | {wmax} | < 15 s |
| Full crash: `up` → all 3 Synced | {a50} | {amax} | |
| Create a 3-node cluster (`up` → all Synced) | {create} | | |
| Acknowledged writes lost ({acked} acknowledged) | {lost} | | 0 |
| Bootstrap decisions (1 at creation + 1 per full crash) | {bootstraps} | | {expected} |
{END}",
        date = date(),
        kills = args.kills,
        crashes = args.crashes,
        sstn = args.sst,
        u50 = ms(u50),
        u95 = ms(u95),
        umax = ms(umax),
        i50 = ms(i50),
        imax = ms(imax),
        transfers = args.kills + args.sst,
        s50 = ms(s50),
        smax = ms(smax),
        w50 = ms(w50),
        wmax = ms(wmax),
        a50 = ms(a50),
        amax = ms(amax),
        create = ms(create_time),
        acked = acked,
        expected = 1 + args.crashes,
    );
    println!("{table}");
    if !args.dry_run {
        write_section(
            &args.out,
            START,
            END,
            "Galera (PxcCluster, MariaDB) on the local runtime",
            &table,
        )?;
        eprintln!("wrote {}", args.out.display());
    }
    if lost > 0 {
        bail!("{lost} acknowledged writes were lost");
    }
    Ok(())
}
