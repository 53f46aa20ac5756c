//! Stratum engine: MongoDB replica sets (operator side). Pure: the
//! `MongoCluster` kind, mongod option checking and routing; MongoDB elects
//! its primary natively; no instance driver yet.
//!
//! ```
//! use std::sync::Arc;
//! use operator_core::engine::Engine;
//! let engine: Arc<dyn Engine> = Arc::new(stratum_mongodb::MongoEngine);
//! assert_eq!(engine.kind(), "MongoCluster");
//! ```

pub mod api;
pub mod engine;
pub mod mongod;
pub mod replset;
pub mod settings;

pub use api::{MongoCluster, MongoClusterSpec};
pub use engine::MongoEngine;
