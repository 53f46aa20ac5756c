//! `stratum local up`: validate, prepare the state directory, start the
//! instance managers and the endpoints, then run the decision loop until a
//! signal. Filesystem, process and network IO.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};

use super::apply;
use super::ha::{self, Orchestrator, SwitchoverRequest};
use super::host::{self, DbUser};
use super::input::{self, Accepted};
use super::ports::{self, PlannedPort, PortAllocator};
use super::proxy::{self, Proxy};
use super::state::{self, LocalState, Owner, StateDir, UpLock};
use super::status::{self, Phase, SnapshotInput};
use super::supervisor::{ManagerSpec, Supervisor};
use super::{TICK_ENV, UpArgs};
use crate::api::common::PvcRetention;
use crate::engine::{Election, InstanceContext, InstanceDriver, ReplicationModel, Routing};
use crate::instance::client::InstanceClient;
use crate::instance::config::{InstanceConfig, PeerEndpoint};
use crate::plan::{PlanInput, instance_config};
use crate::registry::EngineRegistry;

/// Default decision-loop period.
const DEFAULT_TICK: Duration = Duration::from_millis(500);

/// Everything decided before the state directory is touched.
struct Prepared {
    dir: StateDir,
    accepted: Accepted,
    names: Vec<String>,
    state: LocalState,
    configs: Vec<InstanceConfig>,
    db_user: Option<DbUser>,
    rw: TcpListener,
    ro: TcpListener,
    /// The HAProxy binary, for multi-writer engines.
    haproxy: Option<std::path::PathBuf>,
    /// How instances are laid out, kept to add instances to a running
    /// cluster.
    layout: Layout,
}

/// What laying out an instance needs beyond the CR and the state: kept by
/// the running `up` so that a scaled-up cluster's new instances are laid
/// out as the first ones were.
#[derive(Clone)]
pub(super) struct Layout {
    args: UpArgs,
    db_user: Option<DbUser>,
}

/// `stratum local up`: see [`super::up`]. Validates and prepares without
/// writing, lays out the state directory under the `up.pid` lock, then
/// serves until a signal.
pub async fn run(registry: &EngineRegistry, args: UpArgs) -> anyhow::Result<()> {
    // `None`: an `up` runs already and took (or refused) the file.
    let Some(prepared) = prepare(registry, &args).await? else {
        return Ok(());
    };
    let lock = write_state_dir(&prepared)?;
    let result = serve(prepared, registry).await;
    drop(lock);
    result
}

/// Step 1: read and check everything; change nothing in the state
/// directory. When an `up` runs already, hand it the validated file
/// instead (see [`super::apply`]) and return `None`.
async fn prepare(registry: &EngineRegistry, args: &UpArgs) -> anyhow::Result<Option<Prepared>> {
    let dir = StateDir::new(&args.state_dir)
        .with_context(|| format!("invalid --state-dir {}", args.state_dir.display()))?;
    let file_label = args.manifest_path().display().to_string();
    let text = std::fs::read_to_string(args.manifest_path())
        .with_context(|| format!("failed to read {file_label}"))?;

    let saved = read_saved(&dir)?;
    if let Some(saved) = &saved {
        // Another cluster's state is a different problem from a bad file:
        // say so before validating against the wrong old object.
        // (An unknown kind is reported as such by `accept`.)
        if let Ok(new) = input::parse_yaml(&file_label, &text)
            && let Some(kind) = new.get("kind").and_then(|k| k.as_str())
            && registry.get(kind).is_some()
        {
            input::check_same_cluster(dir.root(), saved, &new)?;
        }
    }
    let accepted = input::accept(registry, &file_label, &text, saved.as_ref())?;
    if let Err(e) = apply::fenced_instances(
        &input::parse_yaml(&file_label, &text)?,
        &accepted.cluster.instance_names(),
    ) {
        anyhow::bail!("{file_label}: {e}");
    }

    if let Some(pid) = state::running_pid(&dir) {
        // The Galera loop takes configuration changes but does not fence
        // members: refuse the annotation here rather than report it
        // applied.
        if accepted.engine.topology(&accepted.cluster, None).model == ReplicationModel::MultiWriter
            && !apply::fenced_instances(
                &input::parse_yaml(&file_label, &text)?,
                &accepted.cluster.instance_names(),
            )
            .unwrap_or_default()
            .is_empty()
        {
            anyhow::bail!(
                "{file_label}: metadata.annotations[{}]: a running {} does not fence members; remove the annotation (stop a member with `stratum local down` of the whole cluster instead)",
                apply::FENCED_ANNOTATION,
                accepted.cluster.meta.kind,
            );
        }
        apply::hand_over(&dir, &accepted, pid).await?;
        return Ok(None);
    }

    let engine = accepted.engine.clone();
    let driver = engine.instance_driver().ok_or_else(|| {
        anyhow::anyhow!("engine {} cannot run instances locally yet", engine.kind())
    })?;

    let previous = state::read_state(&dir)?;
    if let Some(prev) = &previous {
        // `cluster.yaml` is written after `state.json`; an `up` killed in
        // between leaves only the latter to say whose directory this is.
        let meta = &accepted.cluster.meta;
        if !prev.cluster.is_empty() && (prev.kind != meta.kind || prev.cluster != meta.name) {
            anyhow::bail!(
                "{} holds {} {:?}, not {} {:?}; use another --state-dir, or delete that cluster with `stratum local down --purge --state-dir {}`",
                dir.root().display(),
                prev.kind,
                prev.cluster,
                meta.kind,
                meta.name,
                dir.root().display()
            );
        }
    }
    if let Some(prev) = &previous {
        // An `up` killed outright leaves its managers running; stop them so
        // that this one starts from a known state (the failover intent in
        // state.json survives).
        super::down::stop_orphaned_managers(&dir, prev).await;
    }
    // The instances that ran last time start again, even when the file
    // asks for another number: the running loop then adds or removes
    // instances as it does for a live change (a primary being removed is
    // switched over first; new replicas clone from the primary).
    let names = previous
        .as_ref()
        .map(|p| p.ha.members.clone())
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| accepted.cluster.instance_names());
    let listen = args.listen;
    // The engine's non-client ports (Galera replication, IST, SST) get a
    // loopback port per instance, as each pod has its own on Kubernetes.
    let extra_ports: Vec<String> = accepted
        .engine
        .manifest(&accepted.cluster)
        .ports
        .into_iter()
        .filter(|p| !p.client)
        .map(|p| p.name)
        .collect();
    let (plan, reused) = {
        let mut alloc = PortAllocator::new(listen);
        ports::plan_ports(
            previous.as_ref().map(|s| &s.ports),
            &names,
            &extra_ports,
            || alloc.next(),
        )
        .with_context(|| format!("failed to allocate ports on {listen}"))?
    };
    ports::check_free(listen, &reused)?;
    let rw = bind(listen, plan.rw, "rw endpoint").await?;
    let ro = bind(listen, plan.ro, "ro endpoint").await?;

    let db_user = if host::is_root() {
        let user = host::ensure_user(&args.user)?;
        host::check_traversable(dir.root(), &user)?;
        Some(user)
    } else {
        None
    };

    let cluster_id = previous
        .as_ref()
        .map(|s| s.cluster_id.clone())
        .filter(|id| !id.is_empty())
        .unwrap_or_else(state::random_cluster_id);
    let state = LocalState {
        kind: accepted.cluster.meta.kind.clone(),
        cluster: accepted.cluster.meta.name.clone(),
        cluster_id,
        listen: listen.to_string(),
        ports: plan,
        up_pid: Some(std::process::id()),
        managers: Default::default(),
        status: None,
        ha: previous.as_ref().map(|p| p.ha.clone()).unwrap_or_default(),
        galera: previous.as_ref().and_then(|p| p.galera.clone()),
        haproxy: None,
    };
    if let Some(tls) = engine.tls_secret(&accepted.cluster) {
        state::check_tls(&dir, &tls).with_context(|| format!("{file_label}: spec.tls"))?;
    }
    let configs = instance_configs(&dir, &accepted, &state, &names, args, db_user.as_ref())?;
    check_binaries(driver.as_ref(), &configs[0])?;
    // Multi-writer engines (Galera) get their endpoints from HAProxy.
    let haproxy = match engine.topology(&accepted.cluster, None).model {
        ReplicationModel::MultiWriter => Some(super::haproxy::find_binary()?),
        _ => None,
    };

    Ok(Some(Prepared {
        dir,
        accepted,
        names,
        state,
        configs,
        db_user: db_user.clone(),
        rw,
        ro,
        haproxy,
        layout: Layout {
            args: args.clone(),
            db_user,
        },
    }))
}

fn read_saved(dir: &StateDir) -> anyhow::Result<Option<serde_json::Value>> {
    let path = dir.cluster_file();
    match std::fs::read_to_string(&path) {
        Ok(text) => input::parse_yaml(&path.display().to_string(), &text)
            .map(Some)
            .map_err(|e| anyhow::anyhow!("the saved cluster is unreadable:\n{e}")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("failed to read {}", path.display())),
    }
}

async fn bind(ip: IpAddr, port: u16, purpose: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(SocketAddr::new(ip, port))
        .await
        .map_err(|e| {
            ports::in_use_error(
                ip,
                &PlannedPort {
                    port,
                    purpose: purpose.to_string(),
                },
                e,
            )
        })
}

pub(super) fn members(state: &LocalState, names: &[String]) -> Vec<PeerEndpoint> {
    names
        .iter()
        .map(|name| {
            let p = &state.ports.instances[name];
            PeerEndpoint {
                name: name.clone(),
                host: state.listen.clone(),
                db_port: p.db,
                api_port: p.api,
                ports: p.extra.clone(),
            }
        })
        .collect()
}

fn instance_configs(
    dir: &StateDir,
    accepted: &Accepted,
    state: &LocalState,
    names: &[String],
    args: &UpArgs,
    db_user: Option<&DbUser>,
) -> anyhow::Result<Vec<InstanceConfig>> {
    let input = PlanInput {
        cluster: &accepted.cluster,
        engine: accepted.engine.as_ref(),
        cluster_id: state.cluster_id.clone(),
        members: members(state, names),
        listen_address: state.listen.clone(),
        run_as_user: db_user.map(|u| u.name.clone()),
        bin_dir: args.bin_dir.clone(),
    };
    let volumes: Vec<String> = accepted
        .engine
        .manifest(&accepted.cluster)
        .extra_volumes
        .into_iter()
        .map(|v| v.name)
        .collect();
    let tls_dir = accepted
        .engine
        .tls_secret(&accepted.cluster)
        .map(|t| dir.tls_dir(&t.name));
    names
        .iter()
        .map(|name| {
            let paths = crate::plan::InstancePaths {
                tls_dir: tls_dir.clone(),
                ..dir.instance_paths(name, &volumes)
            };
            instance_config(&input, name, paths).map_err(|e| {
                input::InvalidCluster {
                    file: args.manifest_path().display().to_string(),
                    errors: vec![e],
                }
                .into()
            })
        })
        .collect()
}

fn check_binaries(driver: &dyn InstanceDriver, config: &InstanceConfig) -> anyhow::Result<()> {
    let ctx = InstanceContext {
        config: config.clone(),
        run_dir: config.run_dir.clone(),
    };
    driver
        .check_binaries(&ctx)
        .map_err(|e| anyhow::anyhow!("cannot run {} locally: {e}", config.kind))
}

/// Step 2: lay out the state directory. Returns the `up.pid` lock, held
/// until `up` exits.
fn write_state_dir(p: &Prepared) -> anyhow::Result<UpLock> {
    let owner: Option<Owner> = p.db_user.as_ref().map(|u| u.owner);
    state::create_dir(p.dir.root(), 0o755)?;
    if owner.is_some() {
        state::allow_traverse(p.dir.root())?;
    }
    let lock = UpLock::acquire(&p.dir)?;

    state::write_state(&p.dir, &p.state)?;
    let keys = state::secret_keys(
        &p.accepted
            .engine
            .manifest(&p.accepted.cluster)
            .generated_secrets,
    );
    let created = state::ensure_secrets(&p.dir, &keys, owner)?;
    if !created.is_empty() {
        tracing::info!(keys = ?created, dir = %p.dir.secrets_dir().display(), "generated credentials");
    }
    state::write_atomic(&p.dir.cluster_file(), p.accepted.text.as_bytes(), 0o644)?;
    if let Some(tls) = p.accepted.engine.tls_secret(&p.accepted.cluster) {
        let names = crate::tls::local_names(&p.state.listen);
        if state::ensure_tls(&p.dir, &tls, &p.accepted.cluster.meta.name, &names, owner)? {
            tracing::info!(secret = %tls.name, dir = %p.dir.tls_dir(&tls.name).display(), "generated the TLS CA and certificate");
        }
    }

    lay_out_instances(&p.dir, &p.configs, owner)?;
    Ok(lock)
}

/// Each instance's directories (owned by the database user) and its
/// `instance.json`; existing data is kept, configurations are rewritten.
fn lay_out_instances(
    dir: &StateDir,
    configs: &[InstanceConfig],
    owner: Option<Owner>,
) -> anyhow::Result<()> {
    state::create_dir(&dir.instances_dir(), 0o755)?;
    for config in configs {
        let name = &config.instance;
        state::create_dir(&dir.instance_dir(name), 0o755)?;
        for sub in [&config.data_dir, &config.run_dir] {
            state::create_dir(sub, 0o700)?;
            state::chown(sub, owner)?;
        }
        let mut json = serde_json::to_vec_pretty(config)?;
        json.push(b'\n');
        state::write_atomic(&dir.instance_config_file(name), &json, 0o644)?;
    }
    Ok(())
}

/// A running cluster's instances become `names` (scaled up or down, as
/// `accepted` now says): ports for new instances are planned and saved in
/// `state`, and every instance's `instance.json` is rewritten with the new
/// member list (new instances laid out). Returns the manager specs of
/// `names`. Starting and stopping managers, and the engine's order of
/// doing so, are the caller's.
pub(super) fn resize_instances(
    dir: &StateDir,
    accepted: &Accepted,
    state: &mut LocalState,
    names: &[String],
    layout: &Layout,
) -> anyhow::Result<Vec<ManagerSpec>> {
    let extra_ports: Vec<String> = accepted
        .engine
        .manifest(&accepted.cluster)
        .ports
        .into_iter()
        .filter(|p| !p.client)
        .map(|p| p.name)
        .collect();
    let listen: IpAddr = state
        .listen
        .parse()
        .with_context(|| format!("bad listen address {:?} in the state", state.listen))?;
    let mut alloc = PortAllocator::new(listen);
    let (plan, _) = ports::plan_ports(Some(&state.ports), names, &extra_ports, || alloc.next())
        .with_context(|| format!("failed to allocate ports on {listen}"))?;
    drop(alloc);
    state.ports = plan;
    let configs = instance_configs(
        dir,
        accepted,
        state,
        names,
        &layout.args,
        layout.db_user.as_ref(),
    )?;
    lay_out_instances(dir, &configs, layout.db_user.as_ref().map(|u| u.owner))?;
    state::write_state(dir, state)?;
    Ok(manager_specs(dir, names))
}

/// Carry out a [`ha::Resize`] the orchestrator decided: start the added
/// instances' managers (laid out with [`resize_instances`]) or stop the
/// removed ones, rewrite the kept instances' member lists and, with
/// `spec.pvcRetentionPolicy.whenScaled: Delete`, delete a removed
/// instance's directory (kept otherwise: a later scale-up reuses it).
/// `names` becomes the running instances.
async fn carry_out_resize(
    dir: &StateDir,
    accepted: &Accepted,
    state: &mut LocalState,
    names: &mut Vec<String>,
    layout: &Layout,
    supervisor: &mut Supervisor,
    resize: ha::Resize,
) -> anyhow::Result<String> {
    match resize {
        ha::Resize::Add(added) => {
            // An instance added again (its data kept) has saved ports;
            // another process may have taken one since: give it new ones.
            let listen: IpAddr = state.listen.parse().unwrap_or(IpAddr::from([127, 0, 0, 1]));
            for name in &added {
                let Some(p) = state.ports.instances.get(name) else {
                    continue;
                };
                let planned: Vec<PlannedPort> = [p.db, p.api]
                    .into_iter()
                    .chain(p.extra.values().copied())
                    .map(|port| PlannedPort {
                        port,
                        purpose: format!("port of {name}"),
                    })
                    .collect();
                if let Err(e) = ports::check_free(listen, &planned) {
                    tracing::warn!(instance = %name, error = format!("{e:#}"), "a saved port is taken; allocating new ones");
                    state.ports.instances.remove(name);
                }
            }
            let mut all: Vec<String> = names.iter().chain(&added).cloned().collect();
            all.sort_by_key(|n| (crate::topology::ordinal(n), n.clone()));
            all.dedup();
            let specs = resize_instances(dir, accepted, state, &all, layout)?;
            for spec in specs.into_iter().filter(|s| added.contains(&s.name)) {
                supervisor.add(spec);
            }
            *names = all;
            Ok(format!("started {}", added.join(", ")))
        }
        ha::Resize::Remove(removed) => {
            for name in &removed {
                supervisor.remove(name).await;
            }
            names.retain(|n| !removed.contains(n));
            resize_instances(dir, accepted, state, names, layout)?;
            let mut delete = false;
            for name in &removed {
                if delete_scaled_away_data(dir, accepted, name)? {
                    delete = true;
                    state.ports.instances.remove(name);
                }
            }
            if delete {
                state::write_state(dir, state)?;
            }
            Ok(format!(
                "stopped {}; data {}",
                removed.join(", "),
                if delete {
                    "deleted (pvcRetentionPolicy.whenScaled: Delete)"
                } else {
                    "kept for a later scale-up (pvcRetentionPolicy.whenScaled: Retain)"
                }
            ))
        }
    }
}

/// With `spec.pvcRetentionPolicy.whenScaled: Delete`, delete the directory
/// of `name`, an instance scaled away (already gone is fine); true when
/// deleted. With `Retain` it is kept for a later scale-up: false.
pub(super) fn delete_scaled_away_data(
    dir: &StateDir,
    accepted: &Accepted,
    name: &str,
) -> anyhow::Result<bool> {
    if accepted.cluster.common.pvc_retention_policy.when_scaled != PvcRetention::Delete {
        return Ok(false);
    }
    let path = dir.instance_dir(name);
    match std::fs::remove_dir_all(&path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(e).with_context(|| format!("failed to delete {}", path.display())),
    }
}

/// One manager per instance, each with its `instance.json` and log.
pub(super) fn manager_specs(dir: &StateDir, names: &[String]) -> Vec<ManagerSpec> {
    let exe = std::env::current_exe().unwrap_or_else(|_| "stratum".into());
    names
        .iter()
        .map(|name| ManagerSpec {
            name: name.clone(),
            exe: exe.clone(),
            config: dir.instance_config_file(name),
            log: dir.manager_log(name),
            run_dir: dir.instance_paths(name, &[]).run_dir,
        })
        .collect()
}

/// Steps 3 and 4: managers, endpoints, the decision loop; until a signal.
async fn serve(p: Prepared, registry: &EngineRegistry) -> anyhow::Result<()> {
    let Prepared {
        dir,
        mut accepted,
        mut names,
        mut state,
        configs: _,
        db_user: _,
        rw,
        ro,
        haproxy,
        layout,
    } = p;
    if let Some(bin) = haproxy {
        // HAProxy binds the endpoints itself.
        drop((rw, ro));
        return super::galera::serve(dir, accepted, names, state, bin, layout).await;
    }
    let mut sigint = signal(SignalKind::interrupt()).context("failed to handle SIGINT")?;
    let mut sigterm = signal(SignalKind::terminate()).context("failed to handle SIGTERM")?;

    let token = std::fs::read_to_string(dir.token_file())
        .with_context(|| format!("failed to read {}", dir.token_file().display()))?
        .trim()
        .to_string();
    std::env::current_exe().context("failed to find the stratum binary")?;
    let specs = manager_specs(&dir, &names);

    let proxy = Proxy::start(rw, ro);
    let mut supervisor = Supervisor::start(specs);
    let client_token = token.clone();
    let mut client = InstanceClient::new(
        token.clone(),
        state.cluster_id.clone(),
        members(&state, &names),
        Duration::from_secs(2),
    );
    let mut orchestrator = Orchestrator::new(
        accepted.engine.clone(),
        accepted.cluster.clone(),
        dir.clone(),
        members(&state, &names),
        token,
        state.cluster_id.clone(),
        state.ha.clone(),
    );
    orchestrator.set_fenced(
        input::parse_yaml("", &accepted.text)
            .ok()
            .and_then(|o| apply::fenced_instances(&o, &names).ok())
            .unwrap_or_default(),
    );
    if !matches!(orchestrator.ha.step, ha::Step::Idle) {
        tracing::info!(step = ?orchestrator.ha.step, "resuming the operation in progress");
    }
    tracing::info!(
        cluster = %state.cluster,
        kind = %state.kind,
        rw = %status::address(&state.listen, state.ports.rw),
        ro = %status::address(&state.listen, state.ports.ro),
        state_dir = %dir.root().display(),
        "local cluster starting"
    );

    // The user-facing lines of a foreground command; logs go to tracing.
    eprintln!(
        "{} {}: rw {}, ro {}; credentials in {}; Ctrl-C or `stratum local down --state-dir {}` stops it",
        state.kind,
        state.cluster,
        status::address(&state.listen, state.ports.rw),
        status::address(&state.listen, state.ports.ro),
        dir.secrets_dir().display(),
        dir.root().display()
    );
    let mut decider = Decider::new();
    state.status = Some(decider.snapshot(&state, &names, &[], None));
    persist(&dir, &state);

    let mut ticker = tokio::time::interval(tick());
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut decisions_paused = false;
    let signal_name = loop {
        tokio::select! {
            _ = ticker.tick() => {
                // The operator away on purpose (ha::PAUSE_FILE): the
                // endpoints keep forwarding, nothing else happens.
                let paused = dir.root().join(ha::PAUSE_FILE).exists();
                if paused != decisions_paused {
                    tracing::warn!(paused, "decision loop {}", if paused { "paused" } else { "resumed" });
                    orchestrator.pause(paused);
                    decisions_paused = paused;
                }
                if paused {
                    continue;
                }
                if let Some((new, change)) =
                    apply::take(registry, &dir, &accepted, &mut orchestrator.ha)
                {
                    accepted = new;
                    orchestrator.set_cluster(accepted.cluster.clone());
                    orchestrator.set_fenced(change.fenced);
                    if !change.reconfigure_for.is_empty() {
                        match accepted.engine.instance_settings(&accepted.cluster) {
                            Ok(engine) => orchestrator.reconfigure(engine),
                            // Validated already; restart as a fallback.
                            Err(_) => orchestrator.roll(&names, false),
                        }
                    }
                }
                let members = client.observe_all().await;
                let request = take_switchover_request(&dir);
                let rw_member = orchestrator.tick(&members, request).await;
                if let Some(resize) = orchestrator.take_resize() {
                    match carry_out_resize(
                        &dir, &accepted, &mut state, &mut names, &layout, &mut supervisor, resize,
                    )
                    .await
                    {
                        Ok(done) => {
                            tracing::info!(managers = ?supervisor.names(), "instances resized");
                            orchestrator.ha.event("Resized", done);
                        }
                        Err(e) => orchestrator.ha.event("ResizeFailed", format!("{e:#}")),
                    }
                    // Observe, route and act on the instances running now
                    // (after a failure too: part of it may have happened).
                    client = InstanceClient::new(
                        client_token.clone(),
                        state.cluster_id.clone(),
                        self::members(&state, &names),
                        Duration::from_secs(2),
                    );
                    orchestrator.set_members(self::members(&state, &names));
                }
                let mut routing = accepted.engine.route(&members);
                // The orchestrator decides where writes go: the primary it
                // recognises, or nowhere during a failover or switchover.
                routing.rw = rw_member;
                routing.ro.retain(|n| Some(n) != routing.rw.as_ref());
                proxy.set(proxy::targets(&routing, |n| decider.addr(&state, n)));
                decider.note_routing(&routing, &state);
                let election = accepted.engine.elect(&accepted.cluster, &members);
                decider.note_election(&election);
                decider.phase =
                    status::compute_phase(&members, routing.rw.is_some(), decider.seen_all_ready);
                if decider.phase == Phase::Healthy && !decider.seen_all_ready {
                    decider.seen_all_ready = true;
                    tracing::info!(cluster = %state.cluster, "every instance is ready");
                    eprintln!("{} {}: every instance is ready", state.kind, state.cluster);
                }
                decider.routing = routing;
                state.managers = supervisor.pids();
                state.ha = orchestrator.ha.clone();
                state.status = Some(decider.snapshot(&state, &names, &members, Some(&election)));
                persist(&dir, &state);
            }
            _ = sigint.recv() => break "SIGINT",
            _ = sigterm.recv() => break "SIGTERM",
        }
    };

    tracing::info!(signal = signal_name, "stopping the local cluster");
    proxy.stop().await;
    supervisor.stop().await;
    state.up_pid = None;
    state.managers.clear();
    state.status = state.status.take().map(status::stopped);
    persist(&dir, &state);
    tracing::info!(state_dir = %dir.root().display(), "local cluster stopped; data kept");
    eprintln!(
        "{} {}: stopped; data kept in {}",
        state.kind,
        state.cluster,
        dir.root().display()
    );
    Ok(())
}

/// Read and remove a switchover request left by `stratum local promote`.
fn take_switchover_request(dir: &StateDir) -> Option<SwitchoverRequest> {
    let path = dir.root().join(ha::SWITCHOVER_FILE);
    let text = std::fs::read_to_string(&path).ok()?;
    let _ = std::fs::remove_file(&path);
    match serde_json::from_str(&text) {
        Ok(req) => Some(req),
        Err(e) => {
            tracing::warn!(error = %e, path = %path.display(), "ignoring an unreadable switchover request");
            None
        }
    }
}

pub(super) fn persist(dir: &StateDir, state: &LocalState) {
    if let Err(e) = state::write_state(dir, state) {
        tracing::warn!(
            error = format!("{e:#}"),
            "failed to write the status snapshot"
        );
    }
}

pub(super) fn tick() -> Duration {
    std::env::var(TICK_ENV)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|ms| *ms > 0)
        .map(Duration::from_millis)
        .unwrap_or(DEFAULT_TICK)
}

/// What the decision loop remembers between ticks.
struct Decider {
    phase: Phase,
    seen_all_ready: bool,
    routing: Routing,
    last_election: Option<Election>,
    pid: u32,
}

impl Decider {
    fn new() -> Self {
        Self {
            phase: Phase::Creating,
            seen_all_ready: false,
            routing: Routing::default(),
            last_election: None,
            pid: std::process::id(),
        }
    }

    fn addr(&self, state: &LocalState, name: &str) -> Option<SocketAddr> {
        let ip: IpAddr = state.listen.parse().ok()?;
        Some(SocketAddr::new(ip, state.ports.instances.get(name)?.db))
    }

    fn note_routing(&self, routing: &Routing, state: &LocalState) {
        if routing.rw != self.routing.rw {
            let to = routing.rw.as_deref().unwrap_or("nobody");
            let addr = routing
                .rw
                .as_deref()
                .and_then(|n| self.addr(state, n))
                .map(|a| a.to_string())
                .unwrap_or_default();
            tracing::info!(from = ?self.routing.rw, to, %addr, "rw endpoint target changed");
        }
        if routing.ro != self.routing.ro {
            tracing::info!(ro = ?routing.ro, "ro endpoint targets changed");
        }
    }

    /// Logged when it changes; the orchestrator acts on it.
    fn note_election(&mut self, election: &Election) {
        if self.last_election.as_ref() != Some(election) {
            tracing::info!(decision = %status::describe_election(election), "election");
            self.last_election = Some(election.clone());
        }
    }

    fn snapshot(
        &self,
        state: &LocalState,
        names: &[String],
        members: &[crate::engine::ObservedMember],
        election: Option<&Election>,
    ) -> status::StatusSnapshot {
        status::snapshot(SnapshotInput {
            kind: &state.kind,
            cluster: &state.cluster,
            listen: &state.listen,
            ports: &state.ports,
            instances: names,
            members,
            routing: &self.routing,
            phase: self.phase,
            election,
            pid: Some(self.pid),
            ha: Some(&state.ha),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::local::input::tests::{manifest, registry};

    fn args(dir: &std::path::Path, file: &std::path::Path) -> UpArgs {
        UpArgs {
            file: Some(file.to_path_buf()),
            manifest: None,
            state_dir: dir.to_path_buf(),
            user: "stratum-test".into(),
            bin_dir: None,
            listen: "127.0.0.1".parse().unwrap(),
        }
    }

    #[tokio::test]
    async fn nothing_is_written_when_up_cannot_start() {
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path().join("state");
        let file = tmp.path().join("c.yaml");

        std::fs::write(&file, manifest("0", "1Gi")).unwrap();
        let err = run(&registry(), args(&state, &file)).await.unwrap_err();
        let inv = err
            .downcast_ref::<input::InvalidCluster>()
            .expect("InvalidCluster");
        assert_eq!(inv.errors[0].field, "spec.instances");
        assert!(
            err.to_string()
                .starts_with(&format!("{}: spec.instances: ", file.display()))
        );
        assert!(!state.exists());

        // Valid, but the fake engine has no instance side.
        std::fs::write(&file, manifest("1", "1Gi")).unwrap();
        let err = run(&registry(), args(&state, &file)).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "engine FakeCluster cannot run instances locally yet"
        );
        assert!(!state.exists());

        let missing = tmp.path().join("missing.yaml");
        let err = run(&registry(), args(&state, &missing)).await.unwrap_err();
        assert!(err.to_string().contains("missing.yaml"), "{err}");
    }

    #[tokio::test]
    async fn a_state_dir_of_another_cluster_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path().join("state");
        std::fs::create_dir(&state).unwrap();
        std::fs::write(
            state.join("cluster.yaml"),
            manifest("1", "1Gi").replace("simple-fake", "other-fake"),
        )
        .unwrap();
        let file = tmp.path().join("c.yaml");
        std::fs::write(&file, manifest("1", "1Gi")).unwrap();
        let err = run(&registry(), args(&state, &file))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("FakeCluster \"other-fake\", not FakeCluster \"simple-fake\""),
            "{err}"
        );
    }
}
