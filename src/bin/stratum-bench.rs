//! `stratum-bench failover`: the PostgreSQL failover benchmark on the local
//! runtime (not a test). Starts a 3-instance, quorum-synchronous cluster
//! with default settings, writes numbered rows through `rw` without pause,
//! kills the primary's postgres N times (kill -9), switches over M times,
//! and writes a table to docs/benchmarks.md (between the PostgreSQL
//! markers). Run as root or as a user that may run PostgreSQL:
//!
//! ```sh
//! cargo build --release && target/release/stratum-bench failover --kills 20
//! ```

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use serde_json::Value;
use stratum_postgres::tokio_postgres;

#[path = "../bench/local.rs"]
mod local;
#[path = "../bench/report.rs"]
mod report;
use local::{Cluster, kill, machine, port_of, wait_ack_elsewhere};
use report::{date, ms, stats, write_section};

const START: &str = "<!-- postgresql-benchmark:start -->";
const END: &str = "<!-- postgresql-benchmark:end -->";

#[derive(Parser)]
#[command(
    name = "stratum-bench",
    about = "Stratum benchmarks on the local runtime"
)]
enum Cli {
    /// Failover and switchover of a 3-instance PostgreSQL cluster.
    Failover(FailoverArgs),
}

#[derive(clap::Args)]
struct FailoverArgs {
    /// How many times to kill the primary.
    #[arg(long, default_value_t = 20)]
    kills: usize,
    /// How many switchovers.
    #[arg(long, default_value_t = 5)]
    switchovers: usize,
    /// PostgreSQL major version (binaries found as `stratum local up` finds
    /// them).
    #[arg(long, default_value_t = 15)]
    version: u32,
    /// The results file; the PostgreSQL section is replaced.
    #[arg(long, default_value = "docs/benchmarks.md")]
    out: PathBuf,
    /// Do not write the results file, only print the table.
    #[arg(long)]
    dry_run: bool,
}

fn main() -> anyhow::Result<()> {
    let Cli::Failover(args) = Cli::parse();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(failover(args))
}

impl Cluster {
    async fn converged(&self) -> anyhow::Result<Value> {
        self.wait("converged", |s| {
            s["phase"] == "Healthy" && s["step"] == "idle" && s["primary"] == s["currentPrimary"]
        })
        .await
    }

    fn postmaster_pid(&self, instance: &str) -> anyhow::Result<i32> {
        let p = self
            .instance_dir(instance)
            .join("data/pgdata/postmaster.pid");
        let text = std::fs::read_to_string(&p).with_context(|| p.display().to_string())?;
        Ok(text.lines().next().unwrap_or("").trim().parse()?)
    }
}

type Acks = local::Acks<i32>;

async fn connect(endpoint: &str, password: &str) -> Option<tokio_postgres::Client> {
    let (host, port) = endpoint.rsplit_once(':')?;
    let conn = format!(
        "host={host} port={port} user=app password={password} dbname=app connect_timeout=2"
    );
    let (client, connection) = tokio_postgres::connect(&conn, tokio_postgres::NoTls)
        .await
        .ok()?;
    tokio::spawn(connection);
    Some(client)
}

fn writer(
    rw: String,
    password: String,
    stop: Arc<AtomicBool>,
    acks: Acks,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut n = 0i64;
        let mut client = None;
        while !stop.load(Ordering::Relaxed) {
            if client.is_none() {
                client = connect(&rw, &password).await;
                if client.is_none() {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
            }
            let c: &tokio_postgres::Client = client.as_ref().unwrap();
            n += 1;
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&n];
            let insert = c.query_one(
                "INSERT INTO bench_rows (n) VALUES ($1) RETURNING inet_server_port()",
                &params,
            );
            match tokio::time::timeout(Duration::from_secs(5), insert).await {
                Ok(Ok(row)) => acks.lock().unwrap().push((n, Instant::now(), row.get(0))),
                _ => client = None,
            }
        }
    })
}

/// Wait until the primary behind `rw` has `n` streaming standbys
/// (including `must`, when given).
async fn wait_streaming(
    rw: &str,
    superuser: &str,
    n: i64,
    must: Option<&str>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let (host, port) = rw.rsplit_once(':').context("rw address")?;
    loop {
        let conn = format!(
            "host={host} port={port} user=postgres password={superuser} dbname=postgres connect_timeout=2"
        );
        if let Ok((client, connection)) =
            tokio_postgres::connect(&conn, tokio_postgres::NoTls).await
        {
            tokio::spawn(connection);
            if let Ok(rows) = client
                .query(
                    "SELECT application_name FROM pg_stat_replication WHERE state = 'streaming'",
                    &[],
                )
                .await
            {
                let names: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
                if names.len() as i64 >= n && must.is_none_or(|m| names.iter().any(|x| x == m)) {
                    return Ok(());
                }
            }
        }
        if Instant::now() > deadline {
            bail!("the primary has not {n} streaming standbys within 120s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn failover(args: FailoverArgs) -> anyhow::Result<()> {
    let yaml = format!(
        "apiVersion: stratum.dev/v1alpha1
kind: PostgresCluster
metadata:
  name: bench-pg
spec:
  instances: 3
  version: {}
  storage:
    size: 1Gi
  postgresql:
    synchronous:
      method: any
      number: 1
",
        args.version
    );
    let mut cluster = Cluster::create(
        "stratum-bench",
        "bench-pg.yaml",
        &yaml,
        Duration::from_secs(120),
    )?;
    let created = Instant::now();
    cluster.start()?;
    let s = cluster.converged().await?;
    let create_time = created.elapsed();
    eprintln!("3 instances ready in {}", ms(create_time));
    let rw = s["endpoints"]["rw"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let password = cluster.secret("app-password")?;
    let client = connect(&rw, &password).await.context("connect to rw")?;
    client
        .batch_execute("CREATE TABLE bench_rows (n bigint PRIMARY KEY)")
        .await?;
    let server_version: String = client.query_one("SHOW server_version", &[]).await?.get(0);
    drop(client);

    let stop = Arc::new(AtomicBool::new(false));
    let acks: Acks = Arc::default();
    let task = writer(rw.clone(), password.clone(), stop.clone(), acks.clone());

    let mut failovers = Vec::new();
    let mut rejoins = Vec::new();
    let superuser = cluster.secret("superuser-password")?;
    for i in 0..args.kills {
        let s = cluster.converged().await?;
        // Steady state: both replicas stream from the primary.
        wait_streaming(&rw, &superuser, 2, None).await?;
        let old = s["currentPrimary"].as_str().unwrap_or_default().to_string();
        let old_port: i32 = port_of(&s, &old);
        let pid = cluster.postmaster_pid(&old)?;
        let t = Instant::now();
        kill(pid, "KILL")?;
        let first = wait_ack_elsewhere(
            &acks,
            t,
            old_port,
            "a new primary",
            Duration::from_secs(120),
        )
        .await?;
        wait_streaming(&rw, &superuser, 2, Some(&old)).await?;
        let rejoin = t.elapsed();
        eprintln!(
            "kill {}/{}: {old} → first write on the new primary after {}, old primary streaming from it after {}",
            i + 1,
            args.kills,
            ms(first),
            ms(rejoin)
        );
        failovers.push(first);
        rejoins.push(rejoin);
    }

    let mut switchovers = Vec::new();
    for i in 0..args.switchovers {
        let s = cluster.converged().await?;
        wait_streaming(&rw, &superuser, 2, None).await?;
        let target = s["instances"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|i| i["role"] == "replica")
            .and_then(|i| i["name"].as_str())
            .unwrap_or_default()
            .to_string();
        let t = Instant::now();
        let out = Command::new(&cluster.stratum)
            .args(["local", "promote", "--state-dir"])
            .arg(&cluster.state)
            .arg(&target)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "promote {target}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let acked = acks.lock().unwrap();
        let times: Vec<Instant> = acked
            .iter()
            .map(|(_, at, _)| *at)
            .filter(|at| *at > t)
            .collect();
        let gap = times
            .windows(2)
            .map(|w| w[1] - w[0])
            .chain(times.first().map(|f| *f - t))
            .max()
            .unwrap_or_default();
        drop(acked);
        eprintln!(
            "switchover {}/{} to {target}: writes unavailable for {}",
            i + 1,
            args.switchovers,
            ms(gap)
        );
        switchovers.push(gap);
    }

    stop.store(true, Ordering::Relaxed);
    let _ = task.await;
    let s = cluster.converged().await?;
    let client = connect(s["endpoints"]["rw"].as_str().unwrap_or_default(), &password)
        .await
        .context("connect to rw")?;
    let present: std::collections::BTreeSet<i64> = client
        .query("SELECT n FROM bench_rows", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let (acked, lost) = local::lost(&acks, &present);

    let (f50, f95, fmax) = stats(failovers);
    let (s50, _, smax) = stats(switchovers.clone());
    let (r50, r95, rmax) = stats(rejoins);
    let (cores, mem_gib) = machine();
    let table = format!(
        "{START}
Measured {date} with `stratum-bench failover --kills {kills} --switchovers {sw}`
(default settings: 500 ms decision loop, 5 s write lease, `failoverDelay` 0) on
{cores} cores, {mem_gib:.0} GiB RAM, PostgreSQL {server_version}, a debug build
unless stated. Cluster: 3 instances, `synchronous: {{method: any, number: 1}}`;
one client inserts numbered rows through `rw` without pause; each round
kills the primary's postmaster with SIGKILL.

| Metric | Median | p95 | Max | Target |
|---|---|---|---|---|
| Failover: kill → first write acknowledged by the new primary through `rw` ({kills} kills) | {f50} | {f95} | {fmax} | median < 2 s, p95 < 5 s |
| Acknowledged writes lost ({acked} acknowledged) | {lost} | | | 0 |
| Switchover write unavailability ({sw} switchovers) | {s50} | | {smax} | < 1 s |
| Old primary streams from the new primary again (from the kill) | {r50} | {r95} | {rmax} | |
| Create a 3-instance cluster (up → Healthy) | {create} | | | |
{END}",
        date = date(),
        kills = args.kills,
        sw = args.switchovers,
        f50 = ms(f50),
        f95 = ms(f95),
        fmax = ms(fmax),
        acked = acked,
        s50 = ms(s50),
        smax = ms(smax),
        r50 = ms(r50),
        r95 = ms(r95),
        rmax = ms(rmax),
        create = ms(create_time),
    );
    println!("{table}");
    if !args.dry_run {
        write_section(
            &args.out,
            START,
            END,
            "PostgreSQL failover (local runtime)",
            &table,
        )?;
        eprintln!("wrote {}", args.out.display());
    }
    if lost > 0 {
        bail!("{lost} acknowledged writes were lost");
    }
    Ok(())
}
