//! The instance side: configuration, the HTTP protocol, and the manager that
//! supervises one database process.

pub mod client;
pub mod config;
pub mod failsafe;
pub mod identity;
pub mod leftovers;
pub mod manager;
pub mod process;
pub mod protocol;
pub mod reconfigured;
pub mod server;
