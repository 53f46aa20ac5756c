//! `stratum`: one binary for the controller, the instance manager and the
//! local runtime. This file only parses arguments and wires crates together.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use operator_core::instance::config::InstanceConfig;

#[derive(Parser)]
#[command(
    name = "stratum",
    version,
    about = "Stratum: a Kubernetes operator for databases, and its local runtime"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the operator: one controller per cluster kind, on Kubernetes.
    Controller(ControllerArgs),
    /// Run the instance manager of one database instance (PID 1 in a
    /// database pod, or a child process of `stratum local up`).
    Instance(InstanceArgs),
    /// Run clusters on this machine with real database processes, without
    /// Kubernetes.
    Local {
        #[command(subcommand)]
        command: LocalCommand,
    },
    /// Print every CustomResourceDefinition, or regenerate the deploy/
    /// directory with --out.
    Crds {
        /// The deploy/ directory: writes `crds/<crd name>.yaml` and the
        /// `stratum.yaml` bundle (CRDs + operator) instead of printing.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Print the Kubernetes objects the operator would create for a cluster
    /// CR (after the same validation), like `helm template`.
    Render(RenderArgs),
    /// Copy this binary to DEST (the init container of database pods).
    InstallBinary {
        /// Destination path, e.g. /stratum/bin/stratum.
        dest: PathBuf,
    },
}

#[derive(Args)]
struct ControllerArgs {
    /// Address of the /metrics and /healthz server.
    #[arg(long, default_value = "0.0.0.0:9090", env = "STRATUM_METRICS_ADDR")]
    metrics_addr: SocketAddr,
    /// Watch only this namespace (all namespaces when unset).
    #[arg(long, env = "STRATUM_WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// Image whose `stratum` binary database pods run (normally the
    /// operator's own image).
    #[arg(long, env = "STRATUM_OPERATOR_IMAGE")]
    operator_image: String,
    /// Timeout of each request to an instance manager, in milliseconds.
    #[arg(long, default_value_t = 3000)]
    instance_timeout_ms: u64,
    /// Elect a leader among replicas through a Lease; only the leader
    /// reconciles. `false` for a single replica that must not wait.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, env = "STRATUM_LEADER_ELECT")]
    leader_elect: bool,
    /// Name of the leader election Lease.
    #[arg(long, default_value = "stratum-operator")]
    lease_name: String,
    /// Namespace of the Lease: the operator's own (downward API).
    #[arg(long, env = "POD_NAMESPACE", default_value = "stratum-system")]
    lease_namespace: String,
    /// This replica's identity in the Lease, unique among replicas: its
    /// pod name (downward API); the host name and PID when unset.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Seconds the Lease stays valid after the last renewal: the longest
    /// time without a leader after the leader dies.
    #[arg(long, default_value_t = 15)]
    lease_duration_secs: u64,
    /// Log as JSON lines.
    #[arg(long, env = "STRATUM_LOG_JSON")]
    log_json: bool,
}

#[derive(Args)]
struct InstanceArgs {
    /// The instance configuration (JSON), written by the local runtime or
    /// mounted from the cluster's ConfigMap.
    #[arg(long)]
    config: PathBuf,
    /// This instance's name when the configuration leaves it empty (on
    /// Kubernetes: the pod name).
    #[arg(long, env = "STRATUM_INSTANCE")]
    instance: Option<String>,
}

#[derive(Args)]
struct RenderArgs {
    /// The cluster CR (YAML).
    #[arg(short, long)]
    file: PathBuf,
    /// Operator image for the init container.
    #[arg(
        long,
        env = "STRATUM_OPERATOR_IMAGE",
        default_value = "stratum/operator:0.1.0"
    )]
    operator_image: String,
    /// Include the NetworkPolicy.
    #[arg(long)]
    network_policy: bool,
}

#[derive(Subcommand)]
enum LocalCommand {
    /// Start (or restart) a cluster from a CR file, in the foreground.
    Up(operator_core::local::UpArgs),
    /// Show a local cluster's phase, primary, endpoints and instances.
    Status(operator_core::local::StatusArgs),
    /// Stop a running `local up`; --purge also deletes its data.
    Down(operator_core::local::DownArgs),
    /// Switch the primary over to a replica (planned, clean).
    Promote(operator_core::local::PromoteArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crds { out } => crds(out),
        Command::InstallBinary { dest } => install_binary(&dest),
        Command::Render(args) => render(args),
        Command::Controller(args) => runtime()?.block_on(controller(args)),
        Command::Instance(args) => runtime()?.block_on(instance(args)),
        Command::Local { command } => runtime()?.block_on(local(command)),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("failed to start the tokio runtime")
}

async fn controller(args: ControllerArgs) -> anyhow::Result<()> {
    let _telemetry = operator_core::telemetry::init("stratum-operator", args.log_json)?;
    let client = kube::Client::try_default()
        .await
        .context("failed to create a Kubernetes client (in-cluster config or KUBECONFIG)")?;
    let leader_election = args.leader_elect.then(|| {
        let identity = args.identity.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "stratum".into());
            format!("{host}-{}", std::process::id())
        });
        let mut election =
            operator_core::controller::leader::LeaderElection::new(&args.lease_namespace, identity);
        election.lease_name = args.lease_name.clone();
        election.lease_duration = Duration::from_secs(args.lease_duration_secs);
        election.renew_before = election.lease_duration / 3;
        election
    });
    let opts = operator_core::controller::ControllerOptions {
        operator_image: args.operator_image,
        metrics_addr: args.metrics_addr,
        namespace: args.namespace,
        instance_timeout: Duration::from_millis(args.instance_timeout_ms),
        leader_election,
    };
    operator_core::controller::run(client, stratum::registry(), opts).await
}

async fn instance(args: InstanceArgs) -> anyhow::Result<()> {
    let _telemetry = operator_core::telemetry::init("stratum-instance", false)?;
    let text = std::fs::read_to_string(&args.config)
        .with_context(|| format!("failed to read {}", args.config.display()))?;
    let mut config: InstanceConfig = serde_json::from_str(&text).with_context(|| {
        format!(
            "{} is not a valid instance configuration",
            args.config.display()
        )
    })?;
    if config.instance.is_empty() {
        config.instance = args.instance.context(
            "the configuration names no instance: pass --instance or set STRATUM_INSTANCE",
        )?;
    }
    let registry = stratum::registry();
    let engine = registry.get(&config.kind).with_context(|| {
        format!(
            "no engine serves kind {:?}; this build serves {:?}",
            config.kind,
            registry.kinds()
        )
    })?;
    let driver = engine
        .instance_driver()
        .with_context(|| format!("the {} engine cannot run instances yet", config.kind))?;
    operator_core::instance::manager::run(config, driver).await
}

async fn local(command: LocalCommand) -> anyhow::Result<()> {
    match command {
        LocalCommand::Up(args) => {
            let _telemetry = operator_core::telemetry::init("stratum-local", false)?;
            operator_core::local::up(&stratum::registry(), args).await
        }
        LocalCommand::Status(args) => operator_core::local::status(args).await,
        LocalCommand::Down(args) => operator_core::local::down(args).await,
        LocalCommand::Promote(args) => operator_core::local::promote(args).await,
    }
}

fn crds(out: Option<PathBuf>) -> anyhow::Result<()> {
    let crds = stratum::crds();
    match out {
        Some(dir) => {
            std::fs::create_dir_all(dir.join("crds"))?;
            for (file, yaml) in crds {
                std::fs::write(dir.join("crds").join(file), yaml)?;
            }
            std::fs::write(dir.join("stratum.yaml"), stratum::bundle())?;
        }
        None => {
            let docs: Vec<String> = crds.into_iter().map(|(_, y)| y).collect();
            print!("{}", docs.join("---\n"));
        }
    }
    Ok(())
}

/// Validate the cluster CRs in a file and print the objects the controller
/// would apply for each. Documents of other kinds (a Secret next to the CR)
/// are skipped. A CR without `metadata.uid` (never stored by an API server)
/// gets a placeholder so that owner references can be shown.
fn render(args: RenderArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("failed to read {}", args.file.display()))?;
    let registry = stratum::registry();
    let mut docs = Vec::new();
    for document in serde_yaml::Deserializer::from_str(&text) {
        let mut object: serde_json::Value = serde::Deserialize::deserialize(document)
            .with_context(|| format!("{} is not valid YAML", args.file.display()))?;
        let kind = object["kind"].as_str().unwrap_or_default().to_string();
        let Some(engine) = registry.get(&kind) else {
            continue;
        };
        if object.pointer("/metadata/uid").is_none()
            && let Some(meta) = object.get_mut("metadata").and_then(|m| m.as_object_mut())
        {
            meta.insert("uid".into(), "00000000-0000-0000-0000-000000000000".into());
        }
        let cluster = engine
            .validate(&object)
            .map_err(|e| anyhow::anyhow!("{}: {e}", args.file.display()))?;
        let mut ctx = operator_core::build::BuildContext::new(args.operator_image.clone());
        ctx.network_policy = args.network_policy;
        let objects = operator_core::build::build(&cluster, engine.as_ref(), &ctx)?;
        docs.push(serde_yaml::to_string(&objects.stateful_set)?);
        docs.push(serde_yaml::to_string(&objects.config_map)?);
        for service in &objects.services {
            docs.push(serde_yaml::to_string(service)?);
        }
        docs.push(serde_yaml::to_string(&objects.pod_disruption_budget)?);
        if let Some(policy) = &objects.network_policy {
            docs.push(serde_yaml::to_string(policy)?);
        }
        docs.push(format!(
            "# Created once if absent, never overwritten; the values are examples.\n{}",
            serde_yaml::to_string(&objects.secret_if_absent)?
        ));
        if let Some(tls) = &objects.tls_secret_if_absent {
            docs.push(format!(
                "# Created once if absent, never changed; the certificates are examples.\n{}",
                serde_yaml::to_string(tls)?
            ));
        }
    }
    anyhow::ensure!(
        !docs.is_empty(),
        "{} holds no cluster of a kind this build serves ({:?})",
        args.file.display(),
        registry.kinds()
    );
    print!("{}", docs.join("---\n"));
    Ok(())
}

/// Copy ourselves to `dest`, executable, atomically (write then rename), so
/// that a database pod can run the instance manager from a shared volume.
fn install_binary(dest: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let me = std::env::current_exe().context("failed to locate the running binary")?;
    let dir = dest
        .parent()
        .with_context(|| format!("{} has no parent directory", dest.display()))?;
    std::fs::create_dir_all(dir).with_context(|| format!("failed to create {}", dir.display()))?;
    let tmp = dir.join(".stratum.tmp");
    std::fs::copy(&me, &tmp)
        .with_context(|| format!("failed to copy {} to {}", me.display(), tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
    std::fs::rename(&tmp, dest).with_context(|| format!("failed to install {}", dest.display()))?;
    println!("installed {}", dest.display());
    Ok(())
}
