//! leader: leader election between operator replicas on a
//! `coordination.k8s.io/v1` Lease in the operator's namespace
//! (kube-lease-manager). IO: Kubernetes API (the Lease only).
//!
//! Only the holder of the Lease runs controllers. A replica that loses the
//! Lease (it could not renew in time, e.g. cut off from the API server)
//! stops with an error instead of reconciling on: two writers of one
//! cluster's children is what the election prevents, and a restart is the
//! simplest way back to a clean follower (controller-runtime does the
//! same). A replica that stops on a signal releases the Lease, so the next
//! one takes over at once instead of after the Lease duration.

use std::time::Duration;

use anyhow::Context as _;
use kube::Client;
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
    /// How long before expiry the holder renews.
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

/// A held Lease: renewed in the background until dropped or lost.
pub struct Leadership {
    state: watch::Receiver<bool>,
    task: JoinHandle<kube_lease_manager::Result<kube_lease_manager::LeaseManager>>,
}

/// Wait until this replica holds the Lease. Followers wait here, renewing
/// nothing and reconciling nothing.
pub async fn acquire(client: Client, settings: &LeaderElection) -> anyhow::Result<Leadership> {
    let manager = LeaseManagerBuilder::new(client, &settings.lease_name)
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
    tracing::info!(lease = %settings.lease_name, namespace = %settings.namespace, identity = %settings.identity, "waiting to become the leader");
    state
        .wait_for(|leader| *leader)
        .await
        .context("leader election stopped before this replica became the leader")?;
    tracing::info!(identity = %settings.identity, "became the leader");
    Ok(Leadership { state, task })
}

impl Leadership {
    /// Resolves when the Lease is lost (or its renewal stopped).
    pub async fn lost(&mut self) {
        let _ = self.state.wait_for(|leader| !*leader).await;
    }

    /// Give the Lease up (on shutdown), so another replica takes over
    /// without waiting for it to expire.
    pub async fn release(self) {
        let Self { state, task } = self;
        // Closing the channel makes the renewal task release and return.
        drop(state);
        match tokio::time::timeout(Duration::from_secs(5), task).await {
            Ok(Ok(Ok(_))) => tracing::info!("released the leader lease"),
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "failed to release the leader lease"),
            Ok(Err(e)) => tracing::warn!(error = %e, "leader lease task failed"),
            Err(_) => tracing::warn!("releasing the leader lease timed out"),
        }
    }
}
