//! The PodDisruptionBudget and the optional NetworkPolicy. Pure.

use std::collections::BTreeMap;

use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::meta::MetaBuilder;
use super::{OPERATOR_APP_NAME, names};
use crate::engine::EngineManifest;
use crate::plan::POD_API_PORT;

/// `maxUnavailable: 1` over every instance: drains take one instance at a
/// time. Built for every cluster, a single-instance one included: there it
/// does not block a drain (one disruption is allowed), which is the
/// intended trade-off for a cluster that chose no redundancy — a budget
/// that blocks drains forever would be worse.
pub(super) fn pod_disruption_budget(meta: &MetaBuilder) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: meta.object_meta(names::stateful_set(&meta.cluster)),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(meta.label_selector()),
            ..Default::default()
        }),
        status: None,
    }
}

/// Ingress to the client ports from any pod of the namespace; to the
/// instance API and the replication ports only from the cluster's own pods
/// and the operator (pods labelled `app.kubernetes.io/name: stratum` in any
/// namespace, as the operator usually runs in its own). Kubelet probes are
/// not affected by NetworkPolicies in common CNIs.
/// With `proxy`, the HAProxy pods may also reach the instance API (their
/// `/readyz` health checks).
pub(super) fn network_policy(
    meta: &MetaBuilder,
    manifest: &EngineManifest,
    proxy: bool,
) -> NetworkPolicy {
    let port = |p: u16| NetworkPolicyPort {
        port: Some(IntOrString::Int(i32::from(p))),
        protocol: Some("TCP".into()),
        end_port: None,
    };
    let client_ports: Vec<_> = manifest
        .ports
        .iter()
        .filter(|p| p.client)
        .map(|p| port(p.port))
        .collect();
    let mut internal_ports: Vec<_> = manifest
        .ports
        .iter()
        .filter(|p| !p.client)
        .map(|p| port(p.port))
        .collect();
    internal_ports.push(port(POD_API_PORT));

    let mut ingress = Vec::new();
    if !client_ports.is_empty() {
        ingress.push(NetworkPolicyIngressRule {
            ports: Some(client_ports),
            from: Some(vec![NetworkPolicyPeer {
                // An empty pod selector: every pod of this namespace.
                pod_selector: Some(LabelSelector::default()),
                ..Default::default()
            }]),
        });
    }
    if proxy {
        ingress.push(NetworkPolicyIngressRule {
            ports: Some(vec![port(POD_API_PORT)]),
            from: Some(vec![NetworkPolicyPeer {
                pod_selector: Some(LabelSelector {
                    match_labels: Some(super::proxy_selector(&meta.cluster)),
                    match_expressions: None,
                }),
                ..Default::default()
            }]),
        });
    }
    ingress.push(NetworkPolicyIngressRule {
        ports: Some(internal_ports),
        from: Some(vec![
            NetworkPolicyPeer {
                pod_selector: Some(meta.label_selector()),
                ..Default::default()
            },
            NetworkPolicyPeer {
                namespace_selector: Some(LabelSelector::default()),
                pod_selector: Some(LabelSelector {
                    match_labels: Some(BTreeMap::from([(
                        "app.kubernetes.io/name".to_string(),
                        OPERATOR_APP_NAME.to_string(),
                    )])),
                    match_expressions: None,
                }),
                ..Default::default()
            },
        ]),
    });
    NetworkPolicy {
        metadata: meta.object_meta(names::stateful_set(&meta.cluster)),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(meta.label_selector()),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(ingress),
            egress: None,
        }),
    }
}
