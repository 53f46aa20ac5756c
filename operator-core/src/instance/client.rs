//! Operator-side client of the instance manager API: talks to instance
//! managers only (HTTP), implements [`InstanceOps`].

use std::time::Duration;

use async_trait::async_trait;

use super::config::PeerEndpoint;
use super::protocol::{HEADER_CLUSTER_ID, MemberStatus, PATH_ACTIONS, PATH_STATUS};
use crate::engine::{InstanceOps, ObservedMember, OpError};

/// Reaches the instance managers of one cluster.
#[derive(Clone)]
pub struct InstanceClient {
    http: reqwest::Client,
    token: String,
    cluster_id: String,
    members: Vec<PeerEndpoint>,
}

impl InstanceClient {
    /// A client for `members`, authenticating with `token`. `timeout`
    /// bounds each request (observe must not hang on a dead host).
    pub fn new(
        token: String,
        cluster_id: String,
        members: Vec<PeerEndpoint>,
        timeout: Duration,
    ) -> Self {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .no_proxy()
            .build()
            .expect("a reqwest client without TLS always builds");
        Self {
            http,
            token,
            cluster_id,
            members,
        }
    }

    /// The members this client reaches.
    pub fn members(&self) -> &[PeerEndpoint] {
        &self.members
    }

    fn endpoint(&self, instance: &str) -> Result<&PeerEndpoint, OpError> {
        self.members
            .iter()
            .find(|m| m.name == instance)
            .ok_or_else(|| OpError::Unreachable {
                instance: instance.to_string(),
                message: "not a member of this cluster".into(),
            })
    }

    fn url(ep: &PeerEndpoint, path: &str) -> String {
        let host = if ep.host.contains(':') {
            format!("[{}]", ep.host)
        } else {
            ep.host.clone()
        };
        format!("http://{host}:{}{path}", ep.api_port)
    }

    /// Observe every member concurrently.
    pub async fn observe_all(&self) -> Vec<ObservedMember> {
        let futs = self.members.iter().map(|m| async move {
            match self.status(&m.name).await {
                Ok(status) => ObservedMember {
                    name: m.name.clone(),
                    status: Some(status),
                    error: None,
                },
                Err(e) => ObservedMember {
                    name: m.name.clone(),
                    status: None,
                    error: Some(e.to_string()),
                },
            }
        });
        futures::future::join_all(futs).await
    }
}

#[async_trait]
impl InstanceOps for InstanceClient {
    async fn status(&self, instance: &str) -> Result<MemberStatus, OpError> {
        let ep = self.endpoint(instance)?;
        let unreachable = |e: reqwest::Error| OpError::Unreachable {
            instance: instance.to_string(),
            message: e.to_string(),
        };
        let resp = self
            .http
            .get(Self::url(ep, PATH_STATUS))
            .bearer_auth(&self.token)
            .header(HEADER_CLUSTER_ID, &self.cluster_id)
            .send()
            .await
            .map_err(unreachable)?;
        if !resp.status().is_success() {
            let code = resp.status();
            let body = resp.text().await.unwrap_or_default();
            return Err(OpError::Refused {
                instance: instance.to_string(),
                action: "status".into(),
                message: format!("{code}: {body}"),
            });
        }
        resp.json().await.map_err(unreachable)
    }

    async fn action(
        &self,
        instance: &str,
        action: &str,
        body: serde_json::Value,
    ) -> Result<serde_json::Value, OpError> {
        let ep = self.endpoint(instance)?;
        let resp = self
            .http
            .post(Self::url(ep, &format!("{PATH_ACTIONS}{action}")))
            .bearer_auth(&self.token)
            .header(HEADER_CLUSTER_ID, &self.cluster_id)
            .json(&body)
            .send()
            .await
            .map_err(|e| OpError::Unreachable {
                instance: instance.to_string(),
                message: e.to_string(),
            })?;
        let code = resp.status();
        let text = resp.text().await.unwrap_or_default();
        if !code.is_success() {
            return Err(OpError::Refused {
                instance: instance.to_string(),
                action: action.to_string(),
                message: format!("{code}: {text}"),
            });
        }
        Ok(serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)))
    }
}
