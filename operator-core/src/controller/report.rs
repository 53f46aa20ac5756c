//! report: the one place results are reported — a structured `tracing`
//! event plus a Kubernetes Event (reason: PascalCase category, note: the
//! message or error chain truncated to 1 KiB). IO: creates/patches Events.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::Client;
use kube::runtime::events::{Event, EventType, Recorder, Reporter as EventReporter};

use super::error::{ReconcileError, error_chain};
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

/// Publishes results for cluster objects.
#[derive(Clone)]
pub struct Reporter {
    recorder: Recorder,
}

impl Reporter {
    /// A reporter publishing as [`REPORTER`], instance `POD_NAME` when set.
    pub fn new(client: Client) -> Self {
        let reporter = EventReporter {
            controller: REPORTER.into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Self {
            recorder: Recorder::new(client, reporter),
        }
    }

    /// Report a state change (phase transition, new primary, rejected spec).
    pub async fn state_change(&self, object: &ObjectReference, change: &StateChange) {
        let type_ = if change.is_warning() {
            EventType::Warning
        } else {
            EventType::Normal
        };
        self.publish(object, type_, change.reason(), change.note())
            .await;
    }

    /// Report a failed reconcile: reason = the error's category.
    pub async fn error(&self, object: &ObjectReference, err: &ReconcileError) {
        self.publish(object, EventType::Warning, err.category(), error_chain(err))
            .await;
    }

    /// Report anything else worth an Event.
    pub async fn note(&self, object: &ObjectReference, warning: bool, reason: &str, note: String) {
        let type_ = if warning {
            EventType::Warning
        } else {
            EventType::Normal
        };
        self.publish(object, type_, reason, note).await;
    }

    async fn publish(
        &self,
        object: &ObjectReference,
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
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, object).await {
            // Events are best effort: never fail a reconcile over one.
            tracing::warn!(kind, namespace, name, error = %e, "failed to publish event");
        }
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
