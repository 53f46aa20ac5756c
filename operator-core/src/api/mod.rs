//! The `stratum.dev/v1alpha1` API: shared spec blocks, status, and the
//! engine-neutral `Backup` and `ScheduledBackup` kinds. Pure data.

pub mod backup;
pub mod common;
pub mod status;

/// API group of every Stratum kind.
pub const GROUP: &str = "stratum.dev";
/// API version of every Stratum kind.
pub const VERSION: &str = "v1alpha1";
