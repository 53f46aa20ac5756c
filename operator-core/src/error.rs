//! Errors of the pure steps that users can act on. Display strings say which
//! field is wrong and what to change.

/// An invalid spec: permanent until the spec changes.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SpecError {
    /// JSON path of the offending field, e.g. `spec.instances`.
    pub field: String,
    /// What is wrong and what to change.
    pub message: String,
}

impl SpecError {
    /// A new error about `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }

    /// One error from several: the first, with the others appended to its
    /// message (so a user sees every problem at once).
    pub fn combine(errors: Vec<SpecError>) -> SpecError {
        let mut iter = errors.into_iter();
        let Some(mut first) = iter.next() else {
            return SpecError::new("spec", "failed validation");
        };
        for e in iter {
            first.message.push_str(&format!("; also {e}"));
        }
        first
    }
}
