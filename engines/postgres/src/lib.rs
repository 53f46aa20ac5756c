//! Stratum engine: PostgreSQL with streaming replication.

pub mod api;
pub mod engine;
pub mod instance;
pub mod settings;

pub use engine::PostgresEngine;
