//! A fake kubelet for the end-to-end tests (`tests/k8s_e2e.rs`): for one
//! cluster in one test namespace it runs every scheduled instance pod as a
//! real `stratum instance` process (real PostgreSQL / MariaDB underneath)
//! on a loopback IP of its own, and reports the pod's phase, IP and
//! readiness to the API server the way a kubelet does. IO: the Kubernetes
//! API (pods, the cluster's ConfigMap, Secret and StatefulSet, volumes),
//! processes (spawned, polled, SIGKILLed as whole trees), the instance
//! managers' `/readyz` over HTTP, and a temporary directory holding each
//! pod's volumes (kept across pod deletions, like a PVC).
//!
//! What it plays, and how far:
//! - volumes: [`provide_volumes`] for the StatefulSet (the scheduler needs
//!   bound claims); the data itself lives in `<tmp>/<pod>/{data,<volume>}`,
//!   keyed by pod name, so a recreated pod finds its data again;
//! - network: each pod name gets a loopback IP (`127.a.b.<ordinal+1>`,
//!   `a.b` derived from the process id and a per-process kubelet counter,
//!   so tests running side by side never share one), reused when the pod
//!   comes back; every peer host of the instance config (headless DNS
//!   names on a real cluster) is rewritten to the peer's IP, and the
//!   manager listens on the pod's IP with the fixed container ports
//!   ([`POD_API_PORT`]), which is why each pod needs an IP of its own;
//! - containers: `stratum instance --config <tmp>/<pod>/instance.json`, the
//!   ConfigMap's config with this pod's name, addresses and directories;
//!   the credentials Secret written as files, and a Secret volume the
//!   instance config points at (`tlsDir`: the cluster's TLS Secret)
//!   projected into `<tmp>/<pod>/<volume>`; run as root with the
//!   database under an unprivileged user (PostgreSQL refuses root); a
//!   manager that exits is restarted (restartPolicy Always); the run
//!   directory is an emptyDir: emptied when a new pod (UID) starts;
//! - status: phase Running, podIP/podIPs, and Ready following the
//!   manager's readiness endpoint (the pod's readinessProbe path), polled
//!   every 500 ms;
//! - deletion: a pod being deleted has its process tree SIGKILLed (what a
//!   node loss or a fence looks like to the database) and is confirmed
//!   (deleted without grace); the StatefulSet controller recreates it and
//!   it starts again on the same data and IP.
//!
//! Test hooks: [`Kubelet::pod_ip`], [`Kubelet::instance_client`] (the
//! managers' API, as the operator reaches it), [`Kubelet::kill_server`] (kill -9 the
//! postmaster / mariadbd), [`Kubelet::freeze`] and [`Kubelet::thaw`]
//! (SIGSTOP / SIGCONT a pod's manager), [`Kubelet::crash`] and [`Kubelet::recover`]
//! (the node of a pod is lost, with the manager and server, and comes
//! back), [`Kubelet::manager_log`] and [`Kubelet::server_log`]. Dropping
//! the kubelet kills every process it started; when the test is panicking
//! it first prints each pod's manager and server log tails.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use operator_core::build::{CONFIG_KEY, LABEL_CLUSTER, LABEL_KIND, names};
use operator_core::instance::client::InstanceClient;
use operator_core::instance::config::InstanceConfig;
use operator_core::instance::manager::SERVER_LOG;
use operator_core::instance::protocol::{PATH_READYZ, SECRET_KEY_API_TOKEN};
use operator_core::plan::POD_API_PORT;
use serde_json::json;

use super::{api_message, provide_volumes};

/// What kube-proxy would send a connection to `service` to: the IPs of
/// the ready pods its selector picks.
pub async fn service_ips(
    client: &Client,
    ns: &str,
    service: &str,
) -> Result<Vec<Ipv4Addr>, String> {
    let svc = Api::<Service>::namespaced(client.clone(), ns)
        .get(service)
        .await
        .map_err(|e| format!("Service {service}: {}", api_message(&e)))?;
    let selector = svc
        .spec
        .and_then(|s| s.selector)
        .ok_or_else(|| format!("Service {service} has no selector"))?;
    let selector: Vec<String> = selector.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let pods = Api::<Pod>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(&selector.join(",")))
        .await
        .map_err(|e| e.to_string())?
        .items;
    Ok(pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| {
            p.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .filter_map(|p| p.status.as_ref()?.pod_ip.as_ref()?.parse().ok())
        .collect())
}

/// How often pods are listed and readiness is polled.
const TICK: Duration = Duration::from_millis(500);
/// The readiness probe's timeout (the pods' probe says 5 s; shorter here
/// so that one pass of the loop stays short).
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Failed probes in a row that make a Ready pod not ready (the pods'
/// `failureThreshold`).
const PROBE_FAILURES: u32 = 3;
/// Set to keep the kubelet's directory (volumes, logs) after the test.
pub const KEEP_ENV: &str = "STRATUM_KUBELET_KEEP";

static KUBELETS: AtomicU32 = AtomicU32::new(0);

/// The fake kubelet of one cluster; see the module documentation.
pub struct Kubelet {
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

/// What the background loop and the test hooks share.
struct Shared {
    client: Client,
    ns: String,
    cluster: String,
    kind: String,
    /// Holds each pod's volumes, config, secrets and logs; removed on drop
    /// (unless [`KEEP_ENV`] is set).
    root: PathBuf,
    /// `127.a.b` of this kubelet's pod IPs.
    prefix: [u8; 3],
    /// Unix user the databases run as (the tests run as root).
    run_as_user: Option<String>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Running containers, by pod name.
    pods: BTreeMap<String, Container>,
    /// Pods whose node the test crashed: no process, no status updates
    /// until [`Kubelet::recover`].
    crashed: BTreeMap<String, String>,
    /// StatefulSet replicas volumes were provided for.
    volumes_for: Option<i32>,
    /// The kubelet was dropped: a container started concurrently is killed
    /// instead of kept.
    closed: bool,
}

/// One pod's instance manager process.
struct Container {
    uid: String,
    child: Child,
    /// The Ready value last written to the API server.
    ready: Option<bool>,
    /// Failed readiness probes in a row.
    failures: u32,
    /// When the manager exited on its own: restart it after a short delay.
    exited_at: Option<std::time::Instant>,
}

impl Kubelet {
    /// Start the kubelet of `cluster` (a `kind` such as `PostgresCluster`)
    /// in `ns`: from now on every pod of it that the scheduler places is run.
    pub async fn start(client: &Client, ns: &str, cluster: &str, kind: &str) -> Self {
        let n = KUBELETS.fetch_add(1, Ordering::SeqCst);
        // 190 * 256 prefixes from 127.64.0 up; the process id spreads
        // concurrent test binaries, the counter the kubelets of one binary.
        let idx = (std::process::id() * 16 + n) % (190 * 256);
        let prefix = [127, 64 + (idx / 256) as u8, (idx % 256) as u8];
        let root = tempfile::Builder::new()
            .prefix("stratum-kubelet.")
            .tempdir()
            .expect("kubelet temporary directory")
            .keep();
        // The database user must traverse it to its data directory.
        set_mode(&root, 0o755);
        let run_as_user = database_user(kind);
        let shared = Arc::new(Shared {
            client: client.clone(),
            ns: ns.to_string(),
            cluster: cluster.to_string(),
            kind: kind.to_string(),
            root,
            prefix,
            run_as_user,
            state: Mutex::new(State::default()),
        });
        let task = tokio::spawn(run(shared.clone()));
        Self { shared, task }
    }

    /// The loopback IP of pod `pod` (stable for the pod name).
    pub fn pod_ip(&self, pod: &str) -> Ipv4Addr {
        self.shared.ip(pod)
    }

    /// The directory of a pod's volumes, config and logs.
    pub fn pod_dir(&self, pod: &str) -> PathBuf {
        self.shared.pod_dir(pod)
    }

    /// The pid in the database server's pid file of `pod`, if any (the
    /// file may outlive a killed server until the manager restarts it).
    pub fn server_pid(&self, pod: &str) -> Option<i32> {
        std::fs::read_to_string(self.shared.server_pid_file(pod))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }

    /// SIGKILL the database server of `pod` (the postmaster / mariadbd
    /// from its pid file), leaving the instance manager running; returns
    /// the pid killed. Panics when no server runs.
    pub fn kill_server(&self, pod: &str) -> i32 {
        let pid_file = self.shared.server_pid_file(pod);
        let text = std::fs::read_to_string(&pid_file).unwrap_or_else(|e| {
            panic!(
                "no server pid file {} for {pod}: {e}\n{}",
                pid_file.display(),
                self.shared.logs_of(pod)
            )
        });
        let pid: i32 = text
            .lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .unwrap_or_else(|| panic!("{} holds no pid: {text:?}", pid_file.display()));
        kill(Pid::from_raw(pid), Signal::SIGKILL)
            .unwrap_or_else(|e| panic!("kill -9 {pid} (server of {pod}): {e}"));
        pid
    }

    /// The node of `pod` is lost: SIGKILL its manager and server (whole
    /// process tree) and stop reporting the pod (its status stays what it
    /// was, as when a kubelet disappears) until [`Self::recover`]. Deleting
    /// the pod (a test or the controller) confirms it as usual, and the
    /// recreated pod runs again.
    pub fn crash(&self, pod: &str) {
        let mut state = self.shared.state.lock().unwrap();
        let container = state
            .pods
            .remove(pod)
            .unwrap_or_else(|| panic!("{pod} has no running container to crash"));
        kill_tree(container.child);
        state.crashed.insert(pod.to_string(), container.uid);
    }

    /// The node of a crashed pod is back: its container starts again (same
    /// data and IP) and its status is reported again.
    pub fn recover(&self, pod: &str) {
        self.shared.state.lock().unwrap().crashed.remove(pod);
    }

    /// A client of the instance managers' API (status and actions through
    /// `operator_core::engine::InstanceOps`), as the operator has: every
    /// member at its pod IP, authenticated with the cluster's API token.
    /// Panics before the first pod started (the config is not known yet).
    pub fn instance_client(&self) -> InstanceClient {
        let file = std::fs::read_dir(&self.shared.root)
            .ok()
            .and_then(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.path().join("instance.json"))
                    .find(|p| p.is_file())
            })
            .unwrap_or_else(|| panic!("no pod of {} started yet", self.shared.cluster));
        let config: InstanceConfig =
            serde_json::from_slice(&std::fs::read(&file).expect("instance.json"))
                .expect("instance.json");
        let token = config.read_token().expect("API token file");
        InstanceClient::new(
            token,
            config.cluster_id,
            config.members,
            Duration::from_secs(5),
        )
    }

    /// Freeze the instance manager of `pod` (SIGSTOP to its process
    /// only: the database server, in a process group of its own, keeps
    /// running, and connections to the manager hang instead of being
    /// refused); returns its pid. Panics when no manager runs.
    pub fn freeze(&self, pod: &str) -> i32 {
        let pid = self
            .shared
            .state
            .lock()
            .unwrap()
            .pods
            .get(pod)
            .map(|c| c.child.id() as i32)
            .unwrap_or_else(|| panic!("{pod} has no running manager to freeze"));
        kill(Pid::from_raw(pid), Signal::SIGSTOP)
            .unwrap_or_else(|e| panic!("kill -STOP {pid} (manager of {pod}): {e}"));
        pid
    }

    /// Thaw a manager [`Self::freeze`] stopped (SIGCONT to `pid`); whether
    /// it still existed (the pod may have been deleted meanwhile, its
    /// processes killed).
    pub fn thaw(&self, pid: i32) -> bool {
        kill(Pid::from_raw(pid), Signal::SIGCONT).is_ok()
    }

    /// Whether the manager process of `pod` runs now.
    pub fn is_running(&self, pod: &str) -> bool {
        self.shared.state.lock().unwrap().pods.contains_key(pod)
    }

    /// The instance manager's log of `pod` (every start of it, appended).
    pub fn manager_log(&self, pod: &str) -> String {
        std::fs::read_to_string(self.shared.pod_dir(pod).join("manager.log")).unwrap_or_default()
    }

    /// The database server's log of `pod` (current pod only: the run
    /// directory is an emptyDir).
    pub fn server_log(&self, pod: &str) -> String {
        std::fs::read_to_string(self.shared.pod_dir(pod).join("run").join(SERVER_LOG))
            .unwrap_or_default()
    }

    /// Every pod's manager and server log tails (for failure messages).
    pub fn logs(&self) -> String {
        self.shared.all_logs()
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.task.abort();
        if std::thread::panicking() {
            eprintln!("{}", self.shared.all_logs());
        }
        let mut state = self.shared.state.lock().unwrap();
        state.closed = true;
        for (_, container) in std::mem::take(&mut state.pods) {
            kill_tree(container.child);
        }
        if std::env::var_os(KEEP_ENV).is_some() {
            eprintln!("{KEEP_ENV}: kept {}", self.shared.root.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.shared.root);
        }
    }
}

impl Shared {
    fn ip(&self, pod: &str) -> Ipv4Addr {
        let ordinal: u8 = pod
            .strip_prefix(&self.cluster)
            .and_then(|s| s.strip_prefix('-'))
            .and_then(|s| s.parse().ok())
            .filter(|o| *o < 254)
            .unwrap_or_else(|| panic!("{pod} is not an instance of {}", self.cluster));
        let [a, b, c] = self.prefix;
        Ipv4Addr::new(a, b, c, ordinal + 1)
    }

    fn pod_dir(&self, pod: &str) -> PathBuf {
        self.root.join(pod)
    }

    fn server_pid_file(&self, pod: &str) -> PathBuf {
        let dir = self.pod_dir(pod);
        let driver = stratum::registry()
            .get(&self.kind)
            .and_then(|e| e.instance_driver())
            .unwrap_or_else(|| panic!("no instance driver for {}", self.kind));
        driver
            .server_pid_file(&dir.join("data"))
            // The Galera driver keeps its pid file in the run directory.
            .unwrap_or_else(|| dir.join("run").join("mysqld.pid"))
    }

    fn logs_of(&self, pod: &str) -> String {
        let dir = self.pod_dir(pod);
        let mut out = String::new();
        for (what, path) in [
            ("manager.log", dir.join("manager.log")),
            ("server.log", dir.join("run").join(SERVER_LOG)),
        ] {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let from = lines.len().saturating_sub(60);
            out += &format!("==== {pod} {what} (tail)\n{}\n", lines[from..].join("\n"));
        }
        out
    }

    fn all_logs(&self) -> String {
        let mut pods: Vec<String> = std::fs::read_dir(&self.root)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        pods.sort();
        pods.iter().map(|p| self.logs_of(p)).collect()
    }

    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    /// Write `pod`'s directories, secrets and instance config; returns the
    /// config file.
    async fn prepare(&self, pod: &str, new_pod: bool) -> Result<PathBuf, String> {
        let cm: ConfigMap = Api::namespaced(self.client.clone(), &self.ns)
            .get(&names::config_map(&self.cluster))
            .await
            .map_err(|e| format!("ConfigMap: {}", api_message(&e)))?;
        let text = cm
            .data
            .as_ref()
            .and_then(|d| d.get(CONFIG_KEY))
            .ok_or_else(|| format!("the ConfigMap has no {CONFIG_KEY}"))?;
        let mut config: InstanceConfig =
            serde_json::from_str(text).map_err(|e| format!("{CONFIG_KEY}: {e}"))?;
        let secret: Secret = Api::namespaced(self.client.clone(), &self.ns)
            .get(&names::credentials_secret(&self.cluster))
            .await
            .map_err(|e| format!("Secret: {}", api_message(&e)))?;

        let dir = self.pod_dir(pod);
        let run = dir.join("run");
        let secrets = dir.join("secrets");
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        set_mode(&dir, 0o755);
        if new_pod && run.exists() {
            // emptyDir: a new pod starts with an empty run directory.
            std::fs::remove_dir_all(&run).map_err(|e| format!("empty {}: {e}", run.display()))?;
        }
        std::fs::create_dir_all(&secrets).map_err(|e| e.to_string())?;
        for (key, value) in secret.data.iter().flatten() {
            std::fs::write(secrets.join(key), &value.0).map_err(|e| e.to_string())?;
        }

        config.instance = pod.to_string();
        config.listen_address = self.ip(pod).to_string();
        for member in &mut config.members {
            member.host = self.ip(&member.name).to_string();
        }
        config.data_dir = dir.join("data");
        for (name, path) in config.volumes.iter_mut() {
            *path = dir.join(name);
        }
        if let Some(mount) = config.tls_dir.clone() {
            config.tls_dir = Some(self.project_secret_volume(pod, &mount, &dir).await?);
        }
        config.run_dir = run;
        config.token_file = secrets.join(SECRET_KEY_API_TOKEN);
        config.secrets_dir = secrets;
        config.run_as_user = self.run_as_user.clone();
        let file = dir.join("instance.json");
        std::fs::write(&file, serde_json::to_vec_pretty(&config).unwrap())
            .map_err(|e| e.to_string())?;
        Ok(file)
    }

    /// Write the Secret volume the pod mounts at `mount` (e.g. the
    /// cluster's TLS Secret) into `<pod dir>/<volume name>` as a kubelet
    /// projects it; returns that directory.
    async fn project_secret_volume(
        &self,
        pod: &str,
        mount: &Path,
        dir: &Path,
    ) -> Result<PathBuf, String> {
        let spec = self
            .pods()
            .get(pod)
            .await
            .map_err(|e| format!("pod {pod}: {}", api_message(&e)))?
            .spec
            .ok_or_else(|| format!("pod {pod} has no spec"))?;
        let volume = spec
            .containers
            .iter()
            .flat_map(|c| c.volume_mounts.iter().flatten())
            .find(|m| Path::new(&m.mount_path) == mount)
            .map(|m| m.name.clone())
            .ok_or_else(|| format!("pod {pod} mounts nothing at {}", mount.display()))?;
        let secret_name = spec
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == volume)
            .and_then(|v| v.secret.as_ref()?.secret_name.clone())
            .ok_or_else(|| format!("volume {volume} of pod {pod} is not a Secret"))?;
        let secret: Secret = Api::namespaced(self.client.clone(), &self.ns)
            .get(&secret_name)
            .await
            .map_err(|e| format!("Secret {secret_name}: {}", api_message(&e)))?;
        let out = dir.join(&volume);
        std::fs::create_dir_all(&out).map_err(|e| e.to_string())?;
        for (key, value) in secret.data.iter().flatten() {
            std::fs::write(out.join(key), &value.0).map_err(|e| e.to_string())?;
        }
        // The database user reads them (a kubelet projects with fsGroup).
        set_mode(&out, 0o755);
        for entry in std::fs::read_dir(&out).map_err(|e| e.to_string())? {
            let path = entry.map_err(|e| e.to_string())?.path();
            set_mode(&path, 0o644);
        }
        Ok(out)
    }

    /// Start `pod`'s instance manager.
    async fn start(&self, pod: &str, uid: &str, new_pod: bool) -> Result<Child, String> {
        let config = self.prepare(pod, new_pod).await?;
        let dir = self.pod_dir(pod);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("manager.log"))
            .map_err(|e| e.to_string())?;
        use std::io::Write;
        let _ = writeln!(&log, "==== kubelet: starting {pod} (pod uid {uid})");
        use std::os::unix::process::CommandExt;
        Command::new(env!("CARGO_BIN_EXE_stratum"))
            .args(["instance", "--config"])
            .arg(&config)
            .env("STRATUM_INSTANCE", pod)
            .env("POD_NAME", pod)
            .env("POD_IP", self.ip(pod).to_string())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            // A process group of its own: SIGKILL reaches the whole
            // "container" (the server runs in a group of its own too, see
            // kill_tree).
            .process_group(0)
            .spawn()
            .map_err(|e| format!("start stratum instance for {pod}: {e}"))
    }

    async fn patch_status(&self, pod: &str, ready: bool) -> Result<(), String> {
        let ip = self.ip(pod).to_string();
        let status = if ready { "True" } else { "False" };
        let patch = json!({"status": {
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "hostIP": "127.0.0.1",
            "conditions": [
                {"type": "Initialized", "status": "True"},
                {"type": "ContainersReady", "status": status},
                {"type": "Ready", "status": status},
            ],
        }});
        self.pods()
            .patch_status(pod, &PatchParams::default(), &Patch::Strategic(&patch))
            .await
            .map(|_| ())
            .map_err(|e| format!("status of {pod}: {}", api_message(&e)))
    }

    /// One pass: volumes, deletions, starts, restarts, readiness.
    async fn tick(&self, http: &reqwest::Client) -> Result<(), String> {
        self.provide_volumes().await?;
        let selector = format!(
            "{LABEL_CLUSTER}={},{LABEL_KIND}={}",
            self.cluster, self.kind
        );
        let list = self
            .pods()
            .list(&ListParams::default().labels(&selector))
            .await
            .map_err(|e| format!("list pods: {}", api_message(&e)))?
            .items;

        // Gone or being deleted: kill, forget, confirm.
        let live: BTreeMap<String, String> = list
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .map(|p| (p.name_any(), p.uid().unwrap_or_default()))
            .collect();
        let stale: Vec<Container> = {
            let mut state = self.state.lock().unwrap();
            let names: Vec<String> = state
                .pods
                .iter()
                .filter(|(name, c)| live.get(*name) != Some(&c.uid))
                .map(|(name, _)| name.clone())
                .collect();
            // A crashed node's pod that was deleted: the recreated pod runs.
            state
                .crashed
                .retain(|name, uid| live.get(name).is_none_or(|u| u == uid));
            names.iter().filter_map(|n| state.pods.remove(n)).collect()
        };
        for container in stale {
            kill_tree(container.child);
        }
        for pod in list
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_some())
        {
            let crashed = self
                .state
                .lock()
                .unwrap()
                .crashed
                .contains_key(&pod.name_any());
            // A lost node confirms nothing (force deletion does).
            if !crashed {
                let _ = self
                    .pods()
                    .delete(&pod.name_any(), &DeleteParams::default().grace_period(0))
                    .await;
            }
        }

        for pod in &list {
            let name = pod.name_any();
            let uid = pod.uid().unwrap_or_default();
            let scheduled = pod
                .spec
                .as_ref()
                .and_then(|s| s.node_name.as_ref())
                .is_some();
            if pod.metadata.deletion_timestamp.is_some() || !scheduled {
                continue;
            }
            let (running, exited_long_ago, crashed) = {
                let mut state = self.state.lock().unwrap();
                let crashed = state.crashed.contains_key(&name);
                match state.pods.get_mut(&name) {
                    Some(c) => {
                        if c.exited_at.is_none()
                            && let Ok(Some(_)) = c.child.try_wait()
                        {
                            c.exited_at = Some(std::time::Instant::now());
                        }
                        let restart = c
                            .exited_at
                            .is_some_and(|t| t.elapsed() > Duration::from_secs(1));
                        (true, restart, crashed)
                    }
                    None => (false, false, crashed),
                }
            };
            if crashed {
                continue;
            }
            if !running || exited_long_ago {
                // A pod seen before under this name with the same UID is a
                // container restart; else a new pod (fresh emptyDir).
                let new_pod = !running;
                let child = self.start(&name, &uid, new_pod).await?;
                let mut state = self.state.lock().unwrap();
                if state.closed {
                    kill_tree(child);
                    return Ok(());
                }
                if let Some(old) = state.pods.insert(
                    name.clone(),
                    Container {
                        uid: uid.clone(),
                        child,
                        ready: None,
                        failures: 0,
                        exited_at: None,
                    },
                ) {
                    kill_tree(old.child);
                }
            }
        }

        // Readiness, as the readinessProbe would see it.
        let probes: Vec<String> = self.state.lock().unwrap().pods.keys().cloned().collect();
        let mut checks = tokio::task::JoinSet::new();
        for name in probes {
            let url = format!("http://{}:{POD_API_PORT}{PATH_READYZ}", self.ip(&name));
            let http = http.clone();
            checks.spawn(async move {
                let ready = http
                    .get(&url)
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success());
                (name, ready)
            });
        }
        while let Some(Ok((name, ok))) = checks.join_next().await {
            // As the readinessProbe: Ready after one success, not ready
            // after failureThreshold failures in a row (or before the first
            // success).
            let (changed, ready) = {
                let mut state = self.state.lock().unwrap();
                match state.pods.get_mut(&name) {
                    Some(c) => {
                        c.failures = if ok { 0 } else { c.failures + 1 };
                        let ready = ok || (c.ready == Some(true) && c.failures < PROBE_FAILURES);
                        (c.ready != Some(ready), ready)
                    }
                    None => (false, false),
                }
            };
            if changed {
                self.patch_status(&name, ready).await?;
                if let Some(c) = self.state.lock().unwrap().pods.get_mut(&name) {
                    c.ready = Some(ready);
                }
            }
        }
        Ok(())
    }

    /// Volumes for the StatefulSet's claims, whenever its replicas change.
    async fn provide_volumes(&self) -> Result<(), String> {
        let sts = match Api::<StatefulSet>::namespaced(self.client.clone(), &self.ns)
            .get_opt(&self.cluster)
            .await
        {
            Ok(Some(sts)) => sts,
            Ok(None) => return Ok(()),
            Err(e) => return Err(format!("StatefulSet: {}", api_message(&e))),
        };
        let replicas = sts.spec.as_ref().and_then(|s| s.replicas);
        if self.state.lock().unwrap().volumes_for != replicas {
            provide_volumes(&self.client, &sts).await;
            self.state.lock().unwrap().volumes_for = replicas;
        }
        Ok(())
    }
}

/// The kubelet's loop: a failed pass (API server busy, ConfigMap not there
/// yet) is retried on the next tick and reported once it persists.
async fn run(shared: Arc<Shared>) {
    let http = reqwest::Client::builder()
        .timeout(PROBE_TIMEOUT)
        .build()
        .expect("HTTP client");
    let mut failing_since: Option<std::time::Instant> = None;
    loop {
        match shared.tick(&http).await {
            Ok(()) => failing_since = None,
            Err(e) => {
                let since = *failing_since.get_or_insert_with(std::time::Instant::now);
                if since.elapsed() > Duration::from_secs(10) {
                    eprintln!("kubelet of {}/{}: {e}", shared.ns, shared.cluster);
                    failing_since = Some(std::time::Instant::now());
                }
            }
        }
        tokio::time::sleep(TICK).await;
    }
}

/// The unprivileged user the databases run as when the tests run as root:
/// the distribution's user of the engine (`postgres`, `mysql`), else
/// `stratum` (created).
fn database_user(kind: &str) -> Option<String> {
    if !nix::unistd::Uid::effective().is_root() {
        return None;
    }
    let preferred = match kind {
        "PostgresCluster" => "postgres",
        "PxcCluster" => "mysql",
        _ => "stratum",
    };
    for name in [preferred, "stratum"] {
        if nix::unistd::User::from_name(name).ok().flatten().is_some() {
            return Some(name.into());
        }
    }
    let status = Command::new("useradd")
        .args([
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
        ])
        .arg("stratum")
        .status()
        .expect("run useradd");
    assert!(
        status.success()
            || nix::unistd::User::from_name("stratum")
                .ok()
                .flatten()
                .is_some(),
        "cannot create the user stratum to run the databases as (useradd: {status})"
    );
    Some("stratum".into())
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", path.display()));
}

/// SIGKILL a container: the manager and every descendant (the server runs
/// in a process group of its own, so one group is not enough). The tree is
/// stopped first (SIGSTOP until no new descendant appears), so nothing
/// forks or is reparented away between listing and killing.
fn kill_tree(mut child: Child) {
    let root = child.id() as i32;
    let mut stopped: Vec<i32> = Vec::new();
    loop {
        let tree = descendants(root);
        let new: Vec<i32> = std::iter::once(root)
            .chain(tree)
            .filter(|p| !stopped.contains(p))
            .collect();
        if new.is_empty() {
            break;
        }
        for pid in new {
            let _ = kill(Pid::from_raw(pid), Signal::SIGSTOP);
            stopped.push(pid);
        }
    }
    for pid in &stopped {
        let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
    }
    let _ = child.wait();
}

/// Every descendant of `root`, from /proc.
fn descendants(root: i32) -> Vec<i32> {
    let parents: Vec<(i32, i32)> = std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
                .filter_map(|pid| {
                    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
                    // "pid (comm) state ppid ...": comm may hold spaces.
                    let after = &stat[stat.rfind(')')? + 2..];
                    let ppid = after.split_whitespace().nth(1)?.parse().ok()?;
                    Some((pid, ppid))
                })
                .collect()
        })
        .unwrap_or_default();
    let mut out = Vec::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for (pid, ppid) in &parents {
            if *ppid == p && !out.contains(pid) {
                out.push(*pid);
                frontier.push(*pid);
            }
        }
    }
    out
}
