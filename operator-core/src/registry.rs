//! The set of engines one binary serves, looked up by cluster kind. Pure.

use std::sync::Arc;

use crate::engine::Engine;

/// Engines by kind. The `stratum` binary builds one with every engine; tests
/// build one with a fake.
#[derive(Clone, Default)]
pub struct EngineRegistry {
    engines: Vec<Arc<dyn Engine>>,
}

impl EngineRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add an engine (builder style).
    pub fn with(mut self, engine: Arc<dyn Engine>) -> Self {
        self.engines.push(engine);
        self
    }

    /// The engine serving `kind`.
    pub fn get(&self, kind: &str) -> Option<Arc<dyn Engine>> {
        self.engines.iter().find(|e| e.kind() == kind).cloned()
    }

    /// Every engine, in registration order.
    pub fn all(&self) -> &[Arc<dyn Engine>] {
        &self.engines
    }

    /// Kinds served, for error messages.
    pub fn kinds(&self) -> Vec<&'static str> {
        self.engines.iter().map(|e| e.kind()).collect()
    }
}
