//! Engine-neutral core of Stratum: the shared API blocks, the [`engine::Engine`]
//! trait, the generic reconcile, the instance manager and the local runtime.
//! Engines depend on this crate and never on each other.

pub mod api;
pub mod build;
pub mod controller;
pub mod engine;
pub mod error;
pub mod haproxy_config;
pub mod instance;
pub mod local;
pub mod plan;
pub mod registry;
pub mod telemetry;
pub mod tls;
pub mod topology;
pub mod validate;
