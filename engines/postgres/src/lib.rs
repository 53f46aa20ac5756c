//! Stratum engine: PostgreSQL with streaming replication.

pub mod api;
pub mod engine;
pub mod instance;
pub mod settings;

pub use engine::PostgresEngine;

/// The PostgreSQL client the driver uses, for tools built on this crate
/// (the failover benchmark) so that they need no second copy.
pub use tokio_postgres;
