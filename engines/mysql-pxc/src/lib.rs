//! Stratum engine: Percona XtraDB Cluster and MariaDB Galera (operator
//! and instance side): the `PxcCluster` kind, my.cnf checking, Galera
//! elections and routing (pure), and the instance driver ([`instance`],
//! which runs the server).
//!
//! ```
//! use std::sync::Arc;
//! use operator_core::engine::Engine;
//! let engine: Arc<dyn Engine> = Arc::new(stratum_mysql_pxc::PxcEngine);
//! assert_eq!(engine.kind(), "PxcCluster");
//! ```

pub mod api;
pub mod engine;
pub mod galera;
pub mod instance;
pub mod mycnf;
pub mod settings;

pub use api::{PxcCluster, PxcClusterSpec};
pub use engine::PxcEngine;
