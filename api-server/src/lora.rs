//! The LoRA adapters the deployment serves: what a request's `model` may name besides the
//! served model.
//!
//! Workers load adapters (`worker --lora-modules NAME=DIR`) and list them in their heartbeats;
//! the registry keeps this directory to the adapters its live workers list, so a request
//! naming one is validated here and routed only to workers that serve it
//! ([`crate::router::WorkerRegistry`]), and `/v1/models` lists each with the served model
//! as its parent.

use std::collections::BTreeSet;
use std::sync::{Arc, RwLock};

/// The adapters' names, shared by the registry (which writes them) and request validation
/// and `/v1/models` (which read them).
#[derive(Debug, Clone, Default)]
pub struct ServedAdapters(Arc<RwLock<BTreeSet<String>>>);

impl ServedAdapters {
    /// Replaces the names (those the live workers list now); returns whether they changed.
    pub fn set(&self, names: BTreeSet<String>) -> bool {
        let mut current = self.0.write().unwrap_or_else(|p| p.into_inner());
        if *current == names {
            return false;
        }
        *current = names;
        true
    }

    pub fn contains(&self, name: &str) -> bool {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(name)
    }

    /// The names, in order.
    pub fn names(&self) -> Vec<String> {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }
}
