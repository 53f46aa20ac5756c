//! observe: reads the cluster's pods and credentials Secret from the
//! Kubernetes API and asks each running instance manager for its status
//! over HTTP. IO: Kubernetes API (read-only) and instance managers.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::Client;
use kube::api::{Api, ListParams};

use super::decide::PodInfo;
use super::error::ObserveError;
use crate::build::{names, selector_labels};
use crate::engine::{EngineManifest, ObservedMember, ValidatedCluster};
use crate::instance::client::InstanceClient;
use crate::instance::protocol::SECRET_KEY_API_TOKEN;
use crate::plan;

/// What observe saw.
#[derive(Clone, Debug, Default)]
pub struct Observation {
    /// The cluster's instance pods (names within the spec's instances).
    pub pods: Vec<PodInfo>,
    /// One entry per instance name: the manager's report or why none.
    pub members: Vec<ObservedMember>,
}

/// List the pods, then query the managers of running pods concurrently
/// (each bounded by `timeout`). Managers that do not answer are recorded
/// with their error: in a test API server without kubelets, or while pods
/// start, that is normal.
pub async fn observe(
    client: &Client,
    cluster: &ValidatedCluster,
    kind: &str,
    manifest: &EngineManifest,
    timeout: Duration,
) -> Result<Observation, ObserveError> {
    let ns = &cluster.meta.namespace;
    let name = &cluster.meta.name;
    let pods_api: Api<Pod> = Api::namespaced(client.clone(), ns);
    let selector = selector_labels(name, kind)
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let instance_names = cluster.instance_names();
    let pods: Vec<PodInfo> = pods_api
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(|source| ObserveError::ListPods {
            cluster: name.clone(),
            source,
        })?
        .items
        .iter()
        .map(PodInfo::from_pod)
        .filter(|p| instance_names.contains(&p.name))
        .collect();

    let all_members = plan::kubernetes_members(cluster, manifest);
    let reachable: Vec<_> = all_members
        .iter()
        .filter(|m| pods.iter().any(|p| p.name == m.name && p.reachable()))
        .cloned()
        .collect();
    let mut reports = Vec::new();
    if !reachable.is_empty() {
        match read_token(client, ns, name).await? {
            Some(token) => {
                let uid = cluster.meta.uid.clone().unwrap_or_default();
                reports = InstanceClient::new(token, uid, reachable, timeout)
                    .observe_all()
                    .await;
            }
            None => tracing::debug!("no {SECRET_KEY_API_TOKEN} in the credentials Secret yet"),
        }
    }
    let members = instance_names
        .iter()
        .map(|n| {
            reports
                .iter()
                .find(|r| &r.name == n)
                .cloned()
                .unwrap_or_else(|| ObservedMember {
                    name: n.clone(),
                    status: None,
                    error: Some(if pods.iter().any(|p| &p.name == n && p.reachable()) {
                        format!("no {SECRET_KEY_API_TOKEN} to authenticate with")
                    } else {
                        "pod is not running".to_string()
                    }),
                })
        })
        .collect();
    Ok(Observation { pods, members })
}

/// The instance API token from the credentials Secret, if present.
async fn read_token(
    client: &Client,
    ns: &str,
    cluster: &str,
) -> Result<Option<String>, ObserveError> {
    let secret_name = names::credentials_secret(cluster);
    let secret = Api::<Secret>::namespaced(client.clone(), ns)
        .get_opt(&secret_name)
        .await
        .map_err(|source| ObserveError::ReadToken {
            name: secret_name.clone(),
            source,
        })?;
    Ok(secret
        .and_then(|s| s.data)
        .and_then(|d| d.get(SECRET_KEY_API_TOKEN).cloned())
        .and_then(|b| String::from_utf8(b.0).ok())
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty()))
}
