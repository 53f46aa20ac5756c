//! Helpers of the kubelet-tier tests (`tests/k8s_e2e.rs`, `k8s_pg_ha.rs`,
//! `k8s_pxc.rs`, `k8s_reconfigure.rs`, `k8s_rolling.rs`): a database
//! cluster CR created in a namespace of its own with the fake kubelet of
//! [`super::kubelet`] and an operator, waiting on its status, patching its
//! spec and status, its credentials, the pod behind its `-rw` Service,
//! clients of the real PostgreSQL / MariaDB in its pods, and a writer that
//! keeps inserting through `-rw` and counts what was acknowledged. IO: the
//! Kubernetes API, PostgreSQL and MariaDB over TCP at the pods' loopback
//! IPs, and the filesystem (is a database installed).
//!
//! Every helper panics with what it waited for or what was refused: these
//! are test helpers.

use std::future::Future;
use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use serde_json::{Value, json};

use super::kubelet::{Kubelet, service_ips};
use super::{
    OperatorProcess, TestNamespace, admin, api_message, apply, eventually,
    start_operator_with_instance_timeout, stratum_resource,
};

/// Where Debian's PostgreSQL 15 lives.
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// Fail (never skip) with what to install when PostgreSQL 15 is missing.
pub fn require_postgres() {
    assert!(
        Path::new(PG_BIN).join("postgres").is_file(),
        "PostgreSQL 15 not found in {PG_BIN}: install postgresql-15 (scripts/setup.sh; Debian: apt-get install postgresql-15)"
    );
}

/// Fail (never skip) with what to install when MariaDB Galera or the
/// rsync its SST uses here is missing.
pub fn require_galera() {
    for (path, package) in [
        ("/usr/sbin/mariadbd", "mariadb-server"),
        ("/usr/lib/galera/libgalera_smm.so", "galera-4"),
        ("/usr/bin/rsync", "rsync"),
    ] {
        assert!(
            Path::new(path).exists(),
            "{path} is required: install the Debian package {package} (scripts/setup.sh installs mariadb-server galera-4 mariadb-backup rsync)"
        );
    }
}

/// A `PostgresCluster` named `name`: 3 instances of PostgreSQL 15, 1 Gi
/// volumes, `shared_buffers` and `max_connections` small enough for
/// several clusters on one test machine; a test adds what it is about.
pub fn pg_cr(name: &str) -> Value {
    json!({
        "apiVersion": "stratum.dev/v1alpha1",
        "kind": "PostgresCluster",
        "metadata": {"name": name},
        "spec": {
            "instances": 3,
            "version": 15,
            "storage": {"size": "1Gi"},
            "postgresql": {"parameters": {"shared_buffers": "16MB", "max_connections": "40"}},
        },
    })
}

/// [`pg_cr`] in synchronous mode (`ANY 1`): an acknowledged commit is on
/// a replica too.
pub fn pg_cr_synchronous(name: &str) -> Value {
    let mut cr = pg_cr(name);
    cr["spec"]["postgresql"]["synchronous"] = json!({"method": "any", "number": 1});
    cr
}

/// A `PxcCluster` (MariaDB 10.11 Galera) named `name` of `instances`
/// members with the my.cnf `configuration`, set up for the fake kubelet:
/// - `proxy.type: none`: no HAProxy pods run here, `-rw`/`-ro` select the
///   members' route label;
/// - `sstMethod: rsync`: the kubelet runs every pod in this host's network
///   namespace, each on a loopback IP of its own. mariabackup's SST
///   listens with socat on 0.0.0.0:4444, so two members joining at once
///   collide there (seen: the second joiner's server hung after its SST
///   failed), which cannot happen between real pods; rsync's SST daemon
///   binds the joiner's IP. Cluster traffic is encrypted (the default)
///   with the operator's certificate, which names each member's headless
///   DNS name: mariabackup's SST checks the joiner's name and would
///   refuse a loopback IP, rsync's (through stunnel) checks the chain.
pub fn galera_cr(name: &str, instances: u32, configuration: &str) -> Value {
    json!({
        "apiVersion": "stratum.dev/v1alpha1",
        "kind": "PxcCluster",
        "metadata": {"name": name},
        "spec": {
            "instances": instances,
            "flavor": "MariaDB",
            "version": "10.11",
            "storage": {"size": "1Gi"},
            "proxy": {"type": "none"},
            "sstMethod": "rsync",
            "configuration": configuration,
        },
    })
}

/// Which operator runs the cluster of a [`DbCluster`].
pub enum Operator {
    /// In this test process (`start_operator_with_instance_timeout`, once
    /// per process, all namespaces), with the production instance timeout.
    InProcess,
    /// The `stratum controller` binary watching the test's namespace only
    /// ([`OperatorProcess::start_for_instances`]).
    Process,
}

/// A database cluster under test: its namespace, the operator, the fake
/// kubelet running its pods, and its API. Dropped in field order: the
/// kubelet (its processes) first, then the operator process, then the
/// namespace.
pub struct DbCluster {
    /// Admin client.
    pub client: Client,
    /// The test's namespace.
    pub ns: String,
    /// The cluster's name (`metadata.name` of the CR).
    pub name: String,
    /// The API of the cluster's kind in `ns`.
    pub api: Api<DynamicObject>,
    /// Runs the cluster's pods.
    pub kubelet: Kubelet,
    /// The operator process, with [`Operator::Process`] (a test may take
    /// it out to kill it).
    pub operator: Option<OperatorProcess>,
    /// Deleted when dropped, last.
    pub namespace: TestNamespace,
}

impl DbCluster {
    /// Create a namespace `<prefix>-...`, start `operator` and the
    /// kubelet of the CR's cluster, and apply the CR `cr` (its `kind` and
    /// `metadata.name` say which); does not wait for anything.
    pub async fn create(prefix: &str, cr: &Value, operator: Operator) -> Self {
        let kind = cr["kind"].as_str().expect("the CR has a kind").to_string();
        let name = cr["metadata"]["name"]
            .as_str()
            .expect("the CR has a name")
            .to_string();
        let client = admin().await;
        if let Operator::InProcess = operator {
            // A debug-built manager on a loaded machine can take longer
            // than the 500 ms of `start_operator` to answer.
            start_operator_with_instance_timeout(
                operator_core::controller::ControllerOptions::new("test").instance_timeout,
            );
        }
        let namespace = TestNamespace::create(&client, prefix).await;
        let ns = namespace.name.clone();
        let operator = match operator {
            Operator::InProcess => None,
            Operator::Process => {
                Some(OperatorProcess::start_for_instances(&client, Some(&ns)).await)
            }
        };
        let kubelet = Kubelet::start(&client, &ns, &name, &kind).await;
        apply(&client, cr, &ns)
            .await
            .unwrap_or_else(|e| panic!("{name}: {}", api_message(&e)));
        let api = Api::namespaced_with(client.clone(), &ns, &stratum_resource(&kind));
        Self {
            client,
            ns,
            name,
            api,
            kubelet,
            operator,
            namespace,
        }
    }

    /// [`wait_status`] of this cluster.
    pub async fn wait_status(
        &self,
        what: &str,
        timeout: Duration,
        check: impl Fn(&Value) -> bool,
    ) -> Value {
        wait_status(&self.api, &self.name, what, timeout, check).await
    }

    /// [`secret_value`] of this cluster.
    pub async fn secret(&self, key: &str) -> String {
        secret_value(&self.client, &self.ns, &self.name, key).await
    }

    /// [`wait_rw_ip`] of this cluster.
    pub async fn wait_rw_ip(&self, timeout: Duration) -> Ipv4Addr {
        wait_rw_ip(&self.client, &self.ns, &self.name, timeout).await
    }

    /// [`patch_spec`] of this cluster.
    pub async fn patch_spec(&self, spec: &Value) {
        patch_spec(&self.api, &self.name, spec).await
    }

    /// [`request_switchover`] of this cluster.
    pub async fn request_switchover(&self, target: &str) {
        request_switchover(&self.api, &self.name, target).await
    }

    /// PostgreSQL: create the table `t (id int PRIMARY KEY)` of the
    /// application database through `-rw` (waiting up to `timeout` for one
    /// ready pod behind it); the IP it reached.
    pub async fn pg_create_table_t(&self, password: &str, timeout: Duration) -> Ipv4Addr {
        let ip = self.wait_rw_ip(timeout).await;
        pg_connect(ip, password)
            .await
            .unwrap()
            .execute("CREATE TABLE t (id int PRIMARY KEY)", &[])
            .await
            .unwrap();
        ip
    }
}

/// Wait until the cluster `name`'s status satisfies `check`; returns it
/// (the last status seen is in the panic message if it never does).
pub async fn wait_status(
    api: &Api<DynamicObject>,
    name: &str,
    what: &str,
    timeout: Duration,
    check: impl Fn(&Value) -> bool,
) -> Value {
    eventually(what, timeout, || async {
        let obj = api.get(name).await.map_err(|e| e.to_string())?;
        let status = obj.data.get("status").cloned().unwrap_or_default();
        if check(&status) {
            Ok(status)
        } else {
            Err(status.to_string())
        }
    })
    .await
}

/// The condition of `type_` in a cluster's status, if any.
pub fn condition<'a>(status: &'a Value, type_: &str) -> Option<&'a Value> {
    status["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
}

/// Merge `spec` into the cluster's spec (`kubectl patch --type merge`).
pub async fn patch_spec(api: &Api<DynamicObject>, name: &str, spec: &Value) {
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({ "spec": spec })),
    )
    .await
    .unwrap_or_else(|e| panic!("patch {name}: {}", api_message(&e)));
}

/// Ask for a switchover: set `status.targetPrimary`, as `kubectl patch
/// --subresource=status` does.
pub async fn request_switchover(api: &Api<DynamicObject>, name: &str, target: &str) {
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"targetPrimary": target}})),
    )
    .await
    .unwrap_or_else(|e| panic!("patch targetPrimary of {name}: {}", api_message(&e)));
}

/// A credential (`key`) of the cluster's `<cluster>-credentials` Secret.
pub async fn secret_value(client: &Client, ns: &str, cluster: &str, key: &str) -> String {
    let secret = Api::<Secret>::namespaced(client.clone(), ns)
        .get(&format!("{cluster}-credentials"))
        .await
        .unwrap_or_else(|e| panic!("credentials Secret: {}", api_message(&e)));
    let value = secret.data.unwrap_or_default().remove(key);
    String::from_utf8(value.unwrap_or_else(|| panic!("no {key} in the Secret")).0).unwrap()
}

/// The one IP behind `<cluster>-rw` (what a client of the Service
/// reaches); an error when it selects none or several.
pub async fn rw_ip(client: &Client, ns: &str, cluster: &str) -> Result<Ipv4Addr, String> {
    match service_ips(client, ns, &format!("{cluster}-rw"))
        .await?
        .as_slice()
    {
        [ip] => Ok(*ip),
        other => Err(format!("-rw selects {other:?}")),
    }
}

/// Wait until `<cluster>-rw` selects one ready pod; its IP.
pub async fn wait_rw_ip(client: &Client, ns: &str, cluster: &str, timeout: Duration) -> Ipv4Addr {
    eventually(
        &format!("one ready pod behind {cluster}-rw"),
        timeout,
        || rw_ip(client, ns, cluster),
    )
    .await
}

/// Connect to PostgreSQL at `ip:5432` as `user` to `db` (2 s timeout).
pub async fn pg_connect_as(
    ip: Ipv4Addr,
    user: &str,
    password: &str,
    db: &str,
) -> Result<tokio_postgres::Client, String> {
    let (client, conn) = tokio_postgres::Config::new()
        .host(ip.to_string())
        .port(5432)
        .user(user)
        .password(password)
        .dbname(db)
        .connect_timeout(Duration::from_secs(2))
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(|e| format!("connect to {ip} as {user}: {e}"))?;
    tokio::spawn(conn);
    Ok(client)
}

/// Connect to PostgreSQL at `ip:5432` as the application user `app` to
/// its database `app`.
pub async fn pg_connect(ip: Ipv4Addr, password: &str) -> Result<tokio_postgres::Client, String> {
    pg_connect_as(ip, "app", password, "app").await
}

/// Connect to MariaDB at `ip:3306` as root over TCP (5 s timeout).
pub async fn mariadb_connect(ip: Ipv4Addr, password: &str) -> Result<mysql_async::Conn, String> {
    let opts = mysql_async::OptsBuilder::default()
        .ip_or_hostname(ip.to_string())
        .tcp_port(3306)
        .user(Some("root"))
        .pass(Some(password.to_string()))
        .prefer_socket(false);
    match tokio::time::timeout(Duration::from_secs(5), mysql_async::Conn::new(opts)).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(format!("connect to {ip}:3306: {e}")),
        Err(_) => Err(format!("connecting to {ip}:3306 timed out")),
    }
}

/// Every id of `acked` is in the table `t` of the application database,
/// read through `<cluster>-rw` (waiting up to `timeout` for one ready pod
/// behind it); panics listing the first ones lost.
pub async fn all_rows_present(db: &DbCluster, password: &str, acked: &[i32], timeout: Duration) {
    let ip = db.wait_rw_ip(timeout).await;
    let c = pg_connect(ip, password).await.unwrap();
    let rows = c.query("SELECT id FROM t", &[]).await.unwrap();
    let have: std::collections::BTreeSet<i32> = rows.iter().map(|r| r.get(0)).collect();
    let lost: Vec<&i32> = acked.iter().filter(|id| !have.contains(id)).collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged rows lost: {:?}",
        lost.len(),
        acked.len(),
        &lost[..lost.len().min(20)]
    );
}

/// A client task inserting numbered rows and recording the ones whose
/// commit was acknowledged (an insert whose outcome is unknown is not);
/// how it connects and inserts is the caller's loop, given the stop flag
/// and the list to push acknowledged ids to.
pub struct AckedWriter<T> {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<T>>>,
    task: tokio::task::JoinHandle<String>,
    /// How long [`Self::wait_more`] waits.
    wait: Duration,
}

impl<T: Clone + Send + 'static> AckedWriter<T> {
    /// Spawn `body(stop, acked)`, which inserts until `stop` is set,
    /// pushes acknowledged ids to `acked` and returns why it ended.
    pub fn spawn<F, Fut>(wait: Duration, body: F) -> Self
    where
        F: FnOnce(Arc<AtomicBool>, Arc<Mutex<Vec<T>>>) -> Fut,
        Fut: Future<Output = String> + Send + 'static,
    {
        let stop = Arc::new(AtomicBool::new(false));
        let acked: Arc<Mutex<Vec<T>>> = Arc::default();
        let task = tokio::spawn(body(stop.clone(), acked.clone()));
        Self {
            stop,
            acked,
            task,
            wait,
        }
    }

    /// How many commits were acknowledged so far.
    pub fn count(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    /// Wait until `more` more commits were acknowledged (polled every
    /// 20 ms; panics after the writer's wait).
    pub async fn wait_more(&self, more: usize, what: &str) {
        let from = self.count();
        let started = Instant::now();
        while self.count() < from + more {
            assert!(
                started.elapsed() <= self.wait,
                "timed out after {:?} waiting for {what}: {} acknowledged since, {more} wanted",
                self.wait,
                self.count() - from
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stop the loop; the acknowledged ids and why the loop ended.
    pub async fn stop_with_reason(self) -> (Vec<T>, String) {
        self.stop.store(true, Ordering::SeqCst);
        let end = self.task.await.unwrap_or_else(|e| e.to_string());
        let acked = self.acked.lock().unwrap().clone();
        (acked, end)
    }

    /// Stop the loop; the acknowledged ids.
    pub async fn stop(self) -> Vec<T> {
        self.stop_with_reason().await.0
    }
}

/// Inserts ids from `first` up into the table `t` through
/// `<cluster>-rw`, one at a time with `pause` between them, reconnecting
/// (to whatever `-rw` selects then) after any error or an insert not
/// answered within 5 s; [`AckedWriter::wait_more`] waits up to `wait`.
pub fn pg_writer(
    db: &DbCluster,
    password: &str,
    first: i32,
    pause: Duration,
    wait: Duration,
) -> AckedWriter<i32> {
    let (client, ns, cluster) = (db.client.clone(), db.ns.clone(), db.name.clone());
    let password = password.to_string();
    AckedWriter::spawn(wait, move |stop, acked| async move {
        let mut next = first;
        while !stop.load(Ordering::SeqCst) {
            let Ok(ip) = rw_ip(&client, &ns, &cluster).await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let Ok(c) = pg_connect(ip, &password).await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            while !stop.load(Ordering::SeqCst) {
                let id = next;
                next += 1;
                let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&id];
                let insert = c.execute("INSERT INTO t VALUES ($1)", &params);
                match tokio::time::timeout(Duration::from_secs(5), insert).await {
                    Ok(Ok(_)) => acked.lock().unwrap().push(id),
                    // Unknown outcome: not acknowledged; a new connection
                    // to what -rw selects now.
                    _ => break,
                }
                tokio::time::sleep(pause).await;
            }
        }
        "stopped".into()
    })
}
