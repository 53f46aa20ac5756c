//! leader: leader election between operator replicas on a
//! `coordination.k8s.io/v1` Lease in the operator's namespace
//! (kube-lease-manager). IO: Kubernetes API (the Lease only).
//!
//! Only the holder of the Lease runs controllers. A replica that loses the
//! Lease (another replica holds it, or it could not confirm a renewal
//! until shortly before the Lease expires, e.g. cut off from the API
//! server) stops with an error instead of reconciling on: two writers of one
//! cluster's children is what the election prevents, and a restart is the
//! simplest way back to a clean follower (controller-runtime does the
//! same). A replica that stops on a signal releases the Lease, and
//! followers notice a released Lease within [`POLL`], so the next one
//! takes over in about a second instead of after the Lease duration.

use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use kube_lease_manager::LeaseManagerBuilder;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Settings of the leader election.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaderElection {
    /// Name of the Lease.
    pub lease_name: String,
    /// Namespace of the Lease: the operator's own.
    pub namespace: String,
    /// This replica's identity in the Lease (`holderIdentity`): its pod
    /// name, unique among the replicas.
    pub identity: String,
    /// How long the Lease stays valid after the last renewal: the longest
    /// time without a leader after the leader dies.
    pub lease_duration: Duration,
    /// How long before expiry the holder renews. A leader that could not
    /// confirm a renewal until half of this before expiry stops leading.
    pub renew_before: Duration,
}

impl LeaderElection {
    /// The Lease `stratum-operator` in `namespace`, 15 s, renewed 5 s
    /// before it expires.
    pub fn new(namespace: impl Into<String>, identity: impl Into<String>) -> Self {
        Self {
            lease_name: "stratum-operator".into(),
            namespace: namespace.into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_before: Duration::from_secs(5),
        }
    }
}

/// How often a follower reads the Lease to notice that its holder released
/// it, and how often the leader checks that it still holds it.
pub const POLL: Duration = Duration::from_secs(1);

/// A held Lease: renewed in the background until dropped or lost.
pub struct Leadership {
    /// kube-lease-manager's view (`None` once stopped).
    state: Option<watch::Receiver<bool>>,
    /// Its renewal task.
    task: Option<JoinHandle<kube_lease_manager::Result<kube_lease_manager::LeaseManager>>>,
    guard: LeaseGuard,
}

/// Wait until this replica holds the Lease. Followers wait here, renewing
/// nothing and reconciling nothing.
///
/// kube-lease-manager lets a follower sleep until the holder's Lease would
/// expire, even when the holder released it on shutdown; so a follower
/// also reads the Lease every [`POLL`] and, when it sees it released,
/// starts its election again, which takes the free Lease at once.
pub async fn acquire(client: Client, settings: &LeaderElection) -> anyhow::Result<Leadership> {
    tracing::info!(lease = %settings.lease_name, namespace = %settings.namespace, identity = %settings.identity, "waiting to become the leader");
    let leases: Api<Lease> = Api::namespaced(client.clone(), &settings.namespace);
    loop {
        let manager = LeaseManagerBuilder::new(client.clone(), &settings.lease_name)
            .with_namespace(&settings.namespace)
            .with_identity(&settings.identity)
            .with_duration(settings.lease_duration.as_secs())
            .with_grace(settings.renew_before.as_secs())
            .build()
            .await
            .with_context(|| {
                format!(
                    "failed to use Lease {}/{} for leader election",
                    settings.namespace, settings.lease_name
                )
            })?;
        let (mut state, task) = manager.watch().await;
        let became = tokio::select! {
            biased;
            result = state.wait_for(|leader| *leader) => {
                result.map(|_| ()).context("leader election stopped before this replica became the leader")?;
                true
            }
            () = released(&leases, &settings.lease_name) => false,
        };
        if became {
            tracing::info!(identity = %settings.identity, "became the leader");
            let guard = LeaseGuard::new(leases, settings);
            return Ok(Leadership {
                state: Some(state),
                task: Some(task),
                guard,
            });
        }
        tracing::info!(lease = %settings.lease_name, "the leader released the Lease; taking it");
        // Stop that manager without its release (it holds nothing, and
        // its cached state may be stale), and start afresh.
        task.abort();
        drop(state);
    }
}

/// Resolves once the Lease, seen held by someone, is seen released.
async fn released(leases: &Api<Lease>, name: &str) {
    let mut seen_held = false;
    loop {
        tokio::time::sleep(POLL).await;
        let Ok(Ok(Some(lease))) = tokio::time::timeout(POLL, leases.get_opt(name)).await else {
            continue;
        };
        match holder_of(&lease) {
            Some(_) => seen_held = true,
            None if seen_held => return,
            None => {}
        }
    }
}

fn holder_of(lease: &Lease) -> Option<&str> {
    lease
        .spec
        .as_ref()?
        .holder_identity
        .as_deref()
        .filter(|h| !h.is_empty())
}

/// The leader's own check that it still holds the Lease, independent of
/// kube-lease-manager, which renews once per period and keeps retrying
/// (and keeps saying "leader") while the API server cannot be reached.
/// The leader reads the Lease every [`POLL`]: another holder in it means
/// the Lease was taken (by force, or after it expired unseen); no
/// successful read showing this replica's renewal until shortly before
/// the Lease expires means it cannot be renewed in time. Either way the
/// replica must stop before another one may start: followers take an
/// expired Lease only after `renewTime + leaseDurationSeconds`.
struct LeaseGuard {
    leases: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
    /// Stop this long before the Lease expires.
    margin: Duration,
}

/// Why a leader stopped leading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lost {
    /// The Lease names another holder.
    TakenBy(String),
    /// No renewal could be confirmed until shortly before expiry.
    NotRenewed {
        /// When the last confirmed renewal would expire.
        expires_in: Duration,
    },
    /// kube-lease-manager reported the Lease lost or stopped renewing.
    Manager,
}

impl std::fmt::Display for Lost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Lost::TakenBy(h) => write!(f, "the Lease is held by {h}"),
            Lost::NotRenewed { expires_in } => write!(
                f,
                "the Lease could not be renewed and expires in {} ms",
                expires_in.as_millis()
            ),
            Lost::Manager => write!(f, "the Lease renewal stopped"),
        }
    }
}

impl LeaseGuard {
    fn new(leases: Api<Lease>, settings: &LeaderElection) -> Self {
        Self {
            leases,
            name: settings.lease_name.clone(),
            identity: settings.identity.clone(),
            duration: settings.lease_duration,
            margin: (settings.renew_before / 2).max(Duration::from_secs(1)),
        }
    }

    /// Resolves when this replica must stop leading.
    async fn lost(&self) -> Lost {
        // Just acquired: the Lease was renewed moments ago.
        let mut expiry = SystemTime::now() + self.duration;
        loop {
            let deadline = expiry
                .checked_sub(self.margin)
                .unwrap_or(SystemTime::UNIX_EPOCH);
            let left = deadline
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO);
            if left.is_zero() {
                return Lost::NotRenewed {
                    expires_in: expiry
                        .duration_since(SystemTime::now())
                        .unwrap_or(Duration::ZERO),
                };
            }
            tokio::time::sleep(POLL.min(left)).await;
            let Ok(Ok(lease)) =
                tokio::time::timeout((2 * POLL).min(left), self.leases.get(&self.name)).await
            else {
                continue;
            };
            match holder_of(&lease) {
                Some(h) if h == self.identity => {}
                Some(h) => return Lost::TakenBy(h.to_string()),
                None => return Lost::TakenBy("nobody (released)".into()),
            }
            let spec = lease.spec.unwrap_or_default();
            if let Some(renewed) = spec.renew_time {
                let duration = spec
                    .lease_duration_seconds
                    .map_or(self.duration, |s| Duration::from_secs(s.max(0) as u64));
                expiry = SystemTime::from(renewed.0) + duration;
            }
        }
    }
}

impl Leadership {
    /// Resolves when the Lease is lost, with why: taken by another
    /// holder, not renewable before it expires, or its renewal stopped.
    pub async fn lost(&mut self) -> Lost {
        let Some(state) = self.state.as_mut() else {
            return Lost::Manager;
        };
        let manager = async {
            let _ = state.wait_for(|leader| !*leader).await;
            Lost::Manager
        };
        tokio::select! {
            lost = manager => lost,
            lost = self.guard.lost() => lost,
        }
    }

    /// Give the Lease up (on shutdown), so another replica takes over
    /// without waiting for it to expire: clear the holder, only if this
    /// replica still holds the Lease and nobody changed it since it was
    /// read (`resourceVersion` precondition). kube-lease-manager's own
    /// release is not used: it decides on its cached state, which may be
    /// seconds old, and would clear another holder's Lease.
    pub async fn release(mut self) {
        self.stop_renewing();
        let guard = &self.guard;
        let result = async {
            let lease = guard.leases.get(&guard.name).await?;
            if holder_of(&lease) != Some(guard.identity.as_str()) {
                return Ok(false);
            }
            let patch = serde_json::json!({
                "metadata": {"resourceVersion": lease.metadata.resource_version},
                "spec": {
                    "holderIdentity": null,
                    "acquireTime": null,
                    "renewTime": null,
                    "leaseDurationSeconds": null,
                },
            });
            guard
                .leases
                .patch(&guard.name, &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
            Ok::<_, kube::Error>(true)
        };
        match tokio::time::timeout(Duration::from_secs(5), result).await {
            Ok(Ok(true)) => tracing::info!("released the leader lease"),
            Ok(Ok(false)) => {
                tracing::warn!("not releasing the leader lease: held by another replica")
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "failed to release the leader lease"),
            Err(_) => tracing::warn!("releasing the leader lease timed out"),
        }
    }

    /// Stop kube-lease-manager's renewal task without letting it release
    /// the Lease (see [`Leadership::release`]). The task is aborted before
    /// its channel closes, so it never runs its release.
    fn stop_renewing(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        self.state = None;
    }
}

impl Drop for Leadership {
    /// A lost Lease is never released: it may be another holder's now.
    fn drop(&mut self) {
        self.stop_renewing();
    }
}
