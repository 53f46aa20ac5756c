//! The headless Service and the `-rw`/`-ro`/`-r` client Services. Pure.
//! `-rw`/`-ro` select the members by the operator's route label, or the
//! HAProxy pods when the cluster has them.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::meta::MetaBuilder;
use super::proxy::{RO_PORT_NAME, RW_PORT_NAME, proxy_selector};
use super::{API_PORT_NAME, LABEL_ROUTE, ROUTE_RO, ROUTE_RW, names};
use crate::engine::{EngineManifest, EnginePort};
use crate::plan::POD_API_PORT;

/// With `proxy`, `-rw` and `-ro` go to the HAProxy pods' `rw` and `ro`
/// ports, both exposed on the client port so that clients see no
/// difference.
pub(super) fn services(meta: &MetaBuilder, manifest: &EngineManifest, proxy: bool) -> Vec<Service> {
    let mut all_ports: Vec<ServicePort> = manifest.ports.iter().map(service_port).collect();
    all_ports.push(service_port(&EnginePort {
        name: API_PORT_NAME.into(),
        port: POD_API_PORT,
        client: false,
    }));
    let mut client_ports: Vec<ServicePort> = manifest
        .ports
        .iter()
        .filter(|p| p.client)
        .map(service_port)
        .collect();
    if client_ports.is_empty() {
        client_ports.extend(manifest.ports.first().map(service_port));
    }

    let headless = Service {
        metadata: meta.object_meta(names::headless_service(&meta.cluster)),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            // Peers must resolve each other while they bootstrap, before
            // any of them is ready.
            publish_not_ready_addresses: Some(true),
            selector: Some(meta.selector()),
            ports: Some(all_ports),
            ..Default::default()
        }),
        status: None,
    };
    let routed = |name: String, route: Option<&str>| {
        let mut selector = meta.selector();
        if let Some(route) = route {
            selector.insert(LABEL_ROUTE.to_string(), route.to_string());
        }
        client_service(meta, name, selector, client_ports.clone())
    };
    let proxied = |name: String, target: &str| {
        let ports = client_ports
            .iter()
            .take(1)
            .map(|p| ServicePort {
                target_port: Some(IntOrString::String(target.to_string())),
                ..p.clone()
            })
            .collect();
        client_service(meta, name, proxy_selector(&meta.cluster), ports)
    };
    let (rw, ro) = if proxy {
        (
            proxied(names::rw_service(&meta.cluster), RW_PORT_NAME),
            proxied(names::ro_service(&meta.cluster), RO_PORT_NAME),
        )
    } else {
        (
            routed(names::rw_service(&meta.cluster), Some(ROUTE_RW)),
            routed(names::ro_service(&meta.cluster), Some(ROUTE_RO)),
        )
    };
    vec![
        headless,
        rw,
        ro,
        routed(names::r_service(&meta.cluster), None),
    ]
}

fn client_service(
    meta: &MetaBuilder,
    name: String,
    selector: BTreeMap<String, String>,
    ports: Vec<ServicePort>,
) -> Service {
    Service {
        metadata: meta.object_meta(name),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            selector: Some(selector),
            ports: Some(ports),
            ..Default::default()
        }),
        status: None,
    }
}

fn service_port(p: &EnginePort) -> ServicePort {
    ServicePort {
        name: Some(p.name.clone()),
        port: i32::from(p.port),
        target_port: Some(IntOrString::String(p.name.clone())),
        protocol: Some("TCP".into()),
        ..Default::default()
    }
}
