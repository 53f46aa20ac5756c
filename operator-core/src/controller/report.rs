//! report: the one place results are reported — a structured `tracing`
//! event plus a Kubernetes Event (reason: PascalCase category, note: the
//! message or error chain truncated to 1 KiB). IO: creates/patches Events,
//! in background tasks: a reconcile never waits for its Events.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::Client;
use kube::runtime::events::{Event, EventType, Recorder, Reporter as EventReporter};
use tokio::sync::{Notify, Semaphore};

use super::error::{ReconcileError, error_chain};
use super::metrics::{Metrics, Step};
use super::status::StateChange;

/// The Events reporter name (`reportingController`).
pub const REPORTER: &str = "stratum-operator";
/// Longest Event note the API server accepts.
pub const MAX_NOTE: usize = 1024;

/// Truncate `note` to at most `max` bytes on a character boundary.
pub fn truncate_note(note: &str, max: usize) -> String {
    if note.len() <= max {
        return note.to_string();
    }
    let ellipsis = "…";
    let mut end = max.saturating_sub(ellipsis.len());
    while !note.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{ellipsis}", &note[..end])
}

/// The Event `action` of everything the reconcile reports, unless said
/// otherwise.
pub const ACTION: &str = "Reconcile";

/// The pod of `instance` (same namespace as the cluster `object`): the
/// related object of an Event about one instance.
pub fn pod_reference(object: &ObjectReference, instance: &str) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        namespace: object.namespace.clone(),
        name: Some(instance.to_string()),
        ..Default::default()
    }
}

/// Events sent to the API server at once; the rest wait in their tasks.
/// Bounded so that a burst of new clusters (two or three Events each)
/// does not add hundreds of concurrent requests to the API server's load.
pub const EVENT_CONCURRENCY: usize = 4;

/// Publishes results for cluster objects. The tracing event is written at
/// once; the Kubernetes Event is sent by a background task (at most
/// [`EVENT_CONCURRENCY`] at a time), so a reconcile does not wait one
/// round trip per Event. Events are best effort either way: a failed one
/// is logged, never retried, and never fails a reconcile.
#[derive(Clone)]
pub struct Reporter {
    recorder: Recorder,
    metrics: Arc<Metrics>,
    slots: Arc<Semaphore>,
    pending: Arc<Pending>,
}

/// Events queued or in flight, for [`Reporter::flush`].
#[derive(Default)]
struct Pending {
    count: AtomicUsize,
    done: Notify,
}

impl Reporter {
    /// A reporter publishing as [`REPORTER`], instance `POD_NAME` when set,
    /// timing each Event in `metrics` (step `event`).
    pub fn new(client: Client, metrics: Arc<Metrics>) -> Self {
        let reporter = EventReporter {
            controller: REPORTER.into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Self {
            recorder: Recorder::new(client, reporter),
            metrics,
            slots: Arc::new(Semaphore::new(EVENT_CONCURRENCY)),
            pending: Arc::default(),
        }
    }

    /// Report a state change (phase transition, new primary, rejected spec,
    /// a Galera member joining or leaving). A change about one instance
    /// names its pod as the Event's related object.
    pub fn state_change(&self, object: &ObjectReference, change: &StateChange) {
        let type_ = if change.is_warning() {
            EventType::Warning
        } else {
            EventType::Normal
        };
        let related = change.instance().map(|i| pod_reference(object, i));
        self.publish(
            object,
            related,
            ACTION,
            type_,
            change.reason(),
            change.note(),
        );
    }

    /// Report a failed reconcile: reason = the error's category.
    pub fn error(&self, object: &ObjectReference, err: &ReconcileError) {
        self.publish(
            object,
            None,
            ACTION,
            EventType::Warning,
            err.category(),
            error_chain(err),
        );
    }

    /// Report anything else worth an Event.
    pub fn note(&self, object: &ObjectReference, warning: bool, reason: &str, note: String) {
        let type_ = if warning {
            EventType::Warning
        } else {
            EventType::Normal
        };
        self.publish(object, None, ACTION, type_, reason, note);
    }

    /// Report something the operator did to one instance of the cluster:
    /// its pod is the Event's related object, and `action` says what was
    /// done (e.g. `BootstrapFromPosition`). Events with the same reason,
    /// action and related object within a few minutes are one series (a
    /// count, the first note), so both tell different happenings apart.
    pub fn note_about(
        &self,
        object: &ObjectReference,
        instance: &str,
        action: &str,
        warning: bool,
        reason: &str,
        note: String,
    ) {
        let type_ = if warning {
            EventType::Warning
        } else {
            EventType::Normal
        };
        let related = Some(pod_reference(object, instance));
        self.publish(object, related, action, type_, reason, note);
    }

    /// Wait until every Event reported so far was sent (or failed). For
    /// tests and shutdown; reconciles never wait.
    pub async fn flush(&self) {
        loop {
            let done = self.pending.done.notified();
            if self.pending.count.load(Ordering::Acquire) == 0 {
                return;
            }
            done.await;
        }
    }

    fn publish(
        &self,
        object: &ObjectReference,
        related: Option<ObjectReference>,
        action: &str,
        type_: EventType,
        reason: &str,
        note: String,
    ) {
        let note = truncate_note(&note, MAX_NOTE);
        let name = object.name.as_deref().unwrap_or_default();
        let namespace = object.namespace.as_deref().unwrap_or_default();
        let kind = object.kind.as_deref().unwrap_or_default();
        match type_ {
            EventType::Warning => {
                tracing::warn!(kind, namespace, name, reason, note = %note, "cluster event")
            }
            EventType::Normal => {
                tracing::info!(kind, namespace, name, reason, note = %note, "cluster event")
            }
        }
        let event = Event {
            type_,
            reason: reason.to_string(),
            note: Some(note),
            action: action.into(),
            secondary: related,
        };
        let (recorder, metrics, slots, pending) = (
            self.recorder.clone(),
            self.metrics.clone(),
            self.slots.clone(),
            self.pending.clone(),
        );
        let object = object.clone();
        pending.count.fetch_add(1, Ordering::AcqRel);
        tokio::spawn(async move {
            // The semaphore is never closed.
            let _slot = slots.acquire().await;
            let started = Instant::now();
            let result = recorder.publish(&event, &object).await;
            let kind = object.kind.as_deref().unwrap_or_default();
            metrics.record_step(kind, Step::Event, started.elapsed());
            if let Err(e) = result {
                let name = object.name.as_deref().unwrap_or_default();
                let namespace = object.namespace.as_deref().unwrap_or_default();
                tracing::warn!(kind, namespace, name, error = %e, "failed to publish event");
            }
            if pending.count.fetch_sub(1, Ordering::AcqRel) == 1 {
                pending.done.notify_waiters();
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_are_cut_to_one_kib() {
        assert_eq!(truncate_note("short", MAX_NOTE), "short");
        let long = "ü".repeat(1000);
        let cut = truncate_note(&long, MAX_NOTE);
        assert!(cut.len() <= MAX_NOTE, "{}", cut.len());
        assert!(cut.ends_with('…'));
    }
}
