//! Stratum engine: PostgreSQL with streaming replication.

pub mod api;
pub mod settings;
