//! Per-object exponential backoff for transient reconcile errors. In-memory
//! state only; no IO.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

/// First retry delay.
pub const BACKOFF_BASE: Duration = Duration::from_secs(5);
/// Longest retry delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(300);

/// Delay before retry number `failures` (1 = first failure): 5 s, 10 s,
/// 20 s, … capped at 5 min.
pub fn backoff_delay(failures: u32) -> Duration {
    let exponent = failures.saturating_sub(1).min(16);
    BACKOFF_BASE
        .saturating_mul(1u32 << exponent)
        .min(BACKOFF_MAX)
}

/// Consecutive failures per object (key: `kind/namespace/name`).
#[derive(Debug, Default)]
pub struct Backoff {
    failures: Mutex<HashMap<String, u32>>,
}

impl Backoff {
    /// Record a failure of `key` and return how long to wait.
    pub fn next(&self, key: &str) -> Duration {
        let mut map = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(key.to_string()).or_insert(0);
        *n = n.saturating_add(1);
        backoff_delay(*n)
    }

    /// Forget `key` after a success (or when the object is gone).
    pub fn reset(&self, key: &str) {
        self.failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_five_minutes() {
        let secs: Vec<u64> = (1..=8).map(|n| backoff_delay(n).as_secs()).collect();
        assert_eq!(secs, [5, 10, 20, 40, 80, 160, 300, 300]);
        assert_eq!(backoff_delay(u32::MAX), BACKOFF_MAX);
    }

    #[test]
    fn per_object_and_reset_on_success() {
        let b = Backoff::default();
        assert_eq!(b.next("FakeCluster/a/simple-pg").as_secs(), 5);
        assert_eq!(b.next("FakeCluster/a/simple-pg").as_secs(), 10);
        assert_eq!(b.next("FakeCluster/a/other-pg").as_secs(), 5);
        b.reset("FakeCluster/a/simple-pg");
        assert_eq!(b.next("FakeCluster/a/simple-pg").as_secs(), 5);
    }
}
