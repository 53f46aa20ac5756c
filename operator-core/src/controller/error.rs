//! Errors of the reconcile steps: one enum per step, one top-level enum with
//! a variant per step. Each knows its PascalCase category (Event reason and
//! metric label) and whether it is permanent (wait for a spec change) or
//! transient (retry with backoff). Pure types.

use crate::build::BuildError;
use crate::error::SpecError;

/// The spec was rejected (permanent until it changes).
#[derive(Debug, thiserror::Error)]
pub enum ValidateError {
    /// The engine rejected the object; the message names the field.
    #[error("invalid spec")]
    Spec(#[source] SpecError),
}

impl ValidateError {
    /// Metric label and Event reason.
    pub fn category(&self) -> &'static str {
        "InvalidSpec"
    }
}

/// Failure to write the desired objects (transient).
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// Server-side apply (or the read before it) failed.
    #[error("failed to apply {kind} {name}")]
    Apply {
        /// Object kind.
        kind: &'static str,
        /// Object name.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// Reading, creating or completing the credentials Secret failed.
    #[error("failed to {action} Secret {name}")]
    Secret {
        /// `read`, `create` or `add missing keys to`.
        action: &'static str,
        /// Secret name.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// A watch cache stopped (the controller is shutting down).
    #[error("the watch cache of the cluster's children stopped")]
    CacheStopped(#[source] kube::runtime::reflector::store::WriterDropped),
    /// Deleting an orphaned child failed.
    #[error("failed to delete orphaned {kind} {name}")]
    DeleteOrphan {
        /// Object kind.
        kind: &'static str,
        /// Object name.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
}

impl ApplyError {
    /// Metric label and Event reason.
    pub fn category(&self) -> &'static str {
        match self {
            Self::Apply { .. } => "ApplyFailed",
            Self::Secret { .. } => "SecretFailed",
            Self::CacheStopped(_) => "CacheFailed",
            Self::DeleteOrphan { .. } => "PruneFailed",
        }
    }
}

/// Failure to act on the decision (transient).
#[derive(Debug, thiserror::Error)]
pub enum DecideError {
    /// Moving the route/role labels of a pod failed.
    #[error("failed to update the route labels of pod {pod}")]
    PatchPodLabels {
        /// Pod name.
        pod: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// Recording the intent of a failover or switchover step in status
    /// (before acting on it) failed; nothing was done.
    #[error("failed to record the {step} intent in the status of {name}")]
    RecordIntent {
        /// Cluster name.
        name: String,
        /// The step, e.g. `promote simple-pg-1`.
        step: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// Deleting the pod of a failed primary (the host-side fence) failed.
    #[error("failed to delete pod {pod} to fence it")]
    DeletePod {
        /// Pod name.
        pod: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
}

impl DecideError {
    /// Metric label and Event reason.
    pub fn category(&self) -> &'static str {
        match self {
            Self::PatchPodLabels { .. } => "RouteUpdateFailed",
            Self::RecordIntent { .. } => "RecordIntentFailed",
            Self::DeletePod { .. } => "FenceFailed",
        }
    }
}

/// Failure to write status (transient).
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// Patching the status subresource failed.
    #[error("failed to patch the status of {kind} {name}")]
    Patch {
        /// Cluster kind.
        kind: String,
        /// Cluster name.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
}

impl StatusError {
    /// Metric label and Event reason.
    pub fn category(&self) -> &'static str {
        "StatusUpdateFailed"
    }
}

/// Failure to add or remove the finalizer (transient).
#[derive(Debug, thiserror::Error)]
pub enum FinalizerError {
    /// Adding the finalizer failed.
    #[error("failed to add the finalizer")]
    Add(#[source] kube::Error),
    /// Removing the finalizer failed.
    #[error("failed to remove the finalizer")]
    Remove(#[source] kube::Error),
    /// The object cannot carry a finalizer (no name).
    #[error("failed to manage the finalizer: {0}")]
    Invalid(String),
}

/// Failure of one reconcile, by step.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// validate.
    #[error(transparent)]
    Validate(#[from] ValidateError),
    /// build.
    #[error(transparent)]
    Build(#[from] BuildError),
    /// apply.
    #[error(transparent)]
    Apply(#[from] ApplyError),
    /// decide.
    #[error(transparent)]
    Decide(#[from] DecideError),
    /// status.
    #[error(transparent)]
    Status(#[from] StatusError),
    /// finalizer bookkeeping.
    #[error(transparent)]
    Finalizer(#[from] FinalizerError),
}

impl ReconcileError {
    /// Short PascalCase category: the Event reason and the `category`
    /// metric label.
    pub fn category(&self) -> &'static str {
        match self {
            Self::Validate(e) => e.category(),
            Self::Build(e) if e.is_permanent() => "InvalidSpec",
            Self::Build(_) => "BuildFailed",
            Self::Apply(e) => e.category(),
            Self::Decide(e) => e.category(),
            Self::Status(e) => e.category(),
            Self::Finalizer(_) => "FinalizerFailed",
        }
    }

    /// Permanent errors wait for the object to change (no requeue);
    /// transient ones are retried with backoff.
    pub fn is_permanent(&self) -> bool {
        match self {
            Self::Validate(_) => true,
            Self::Build(e) => e.is_permanent(),
            _ => false,
        }
    }

    /// Map the finalizer helper's error: the steps' own errors pass
    /// through.
    pub fn from_finalizer(err: kube::runtime::finalizer::Error<ReconcileError>) -> Self {
        use kube::runtime::finalizer::Error as F;
        match err {
            F::ApplyFailed(e) | F::CleanupFailed(e) => e,
            F::AddFinalizer(e) => FinalizerError::Add(e).into(),
            F::RemoveFinalizer(e) => FinalizerError::Remove(e).into(),
            other => FinalizerError::Invalid(other.to_string()).into(),
        }
    }
}

/// The error and its sources, `: `-separated, for Event notes and logs.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let text = s.to_string();
        // Wrappers that print their source inline would repeat it.
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn categories_and_permanence() {
        let invalid: ReconcileError =
            ValidateError::Spec(SpecError::new("spec.instances", "must be odd; got 2")).into();
        assert_eq!(invalid.category(), "InvalidSpec");
        assert!(invalid.is_permanent());
        assert_eq!(
            error_chain(&invalid),
            "invalid spec: spec.instances: must be odd; got 2"
        );

        let missing_uid: ReconcileError = BuildError::MissingUid {
            kind: "FakeCluster".into(),
            name: "simple-pg".into(),
        }
        .into();
        assert!(missing_uid.is_permanent());

        let transient: ReconcileError = FinalizerError::Invalid("object has no name".into()).into();
        assert_eq!(transient.category(), "FinalizerFailed");
        assert!(!transient.is_permanent());
    }

    #[test]
    fn finalizer_errors_unwrap_step_errors() {
        let inner: ReconcileError =
            ValidateError::Spec(SpecError::new("spec.storage.size", "bad")).into();
        let mapped =
            ReconcileError::from_finalizer(kube::runtime::finalizer::Error::ApplyFailed(inner));
        assert_eq!(mapped.category(), "InvalidSpec");
        let mapped = ReconcileError::from_finalizer(
            kube::runtime::finalizer::Error::<ReconcileError>::UnnamedObject,
        );
        assert_eq!(mapped.category(), "FinalizerFailed");
    }
}
