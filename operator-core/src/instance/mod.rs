//! The instance side: configuration, the HTTP protocol, and the manager that
//! supervises one database process.

pub mod client;
pub mod config;
pub mod protocol;
