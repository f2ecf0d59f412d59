//! An in-memory store: documents set by code, changes announced to watchers.
//!
//! For tests and for embedding meshgate: the registry's reconcile and reload
//! paths run against it exactly as against a directory, without files.

use std::collections::BTreeMap;
use std::sync::Mutex;

use async_trait::async_trait;
use serde_json::Value;

use crate::{ConfigStore, Document, InstanceKey, StoreError, StoreEvent, Watch};

/// Documents in memory. Every change is sent to every watcher as one event.
#[derive(Default)]
pub struct MemStore {
    node: Mutex<Option<Value>>,
    docs: Mutex<BTreeMap<InstanceKey, Value>>,
    watchers: crate::Watchers,
}

impl MemStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn announce(&self, event: StoreEvent) {
        self.watchers
            .lock()
            .expect("mem store poisoned")
            .retain(|w| w.send(vec![event.clone()]).is_ok());
    }

    /// Sets the node document.
    pub fn set_node(&self, value: Value) {
        *self.node.lock().expect("mem store poisoned") = Some(value);
        self.announce(StoreEvent::Node);
    }

    /// Creates or replaces one instance's document.
    pub fn set(&self, tenant: &str, instance: &str, value: Value) {
        let key = InstanceKey::new(tenant, instance);
        self.docs
            .lock()
            .expect("mem store poisoned")
            .insert(key.clone(), value);
        self.announce(StoreEvent::Instance(key));
    }

    /// Removes one instance's document.
    pub fn remove(&self, tenant: &str, instance: &str) {
        let key = InstanceKey::new(tenant, instance);
        self.docs.lock().expect("mem store poisoned").remove(&key);
        self.announce(StoreEvent::Instance(key));
    }

    fn source(key: &InstanceKey) -> String {
        format!("memory {key}")
    }
}

#[async_trait]
impl ConfigStore for MemStore {
    fn describe(&self) -> String {
        "memory".into()
    }

    async fn node(&self) -> Result<Option<Document>, StoreError> {
        Ok(self
            .node
            .lock()
            .expect("mem store poisoned")
            .clone()
            .map(|value| Document {
                source: "memory node".into(),
                value,
            }))
    }

    async fn tenants(&self) -> Result<Vec<String>, StoreError> {
        let docs = self.docs.lock().expect("mem store poisoned");
        let mut t: Vec<String> = docs.keys().map(|k| k.tenant.clone()).collect();
        t.dedup();
        Ok(t)
    }

    async fn instances(&self, tenant: &str) -> Result<Vec<String>, StoreError> {
        let docs = self.docs.lock().expect("mem store poisoned");
        Ok(docs
            .keys()
            .filter(|k| k.tenant == tenant)
            .map(|k| k.instance.clone())
            .collect())
    }

    async fn get(&self, key: &InstanceKey) -> Result<Option<Document>, StoreError> {
        Ok(self
            .docs
            .lock()
            .expect("mem store poisoned")
            .get(key)
            .cloned()
            .map(|value| Document {
                source: Self::source(key),
                value,
            }))
    }

    fn watch(&self) -> Result<Option<Watch>, StoreError> {
        Ok(Some(Watch::subscribe(&self.watchers)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[tokio::test]
    async fn lists_reads_and_announces() {
        let s = MemStore::new();
        let mut w = s.watch().unwrap().unwrap();
        s.set("b", "x", json!({"kind": "pipe"}));
        s.set("a", "y", json!({"kind": "pipe"}));
        s.set("a", "x", json!({"kind": "vnet"}));
        assert_eq!(s.tenants().await.unwrap(), ["a", "b"]);
        assert_eq!(s.instances("a").await.unwrap(), ["x", "y"]);
        let d = s.get(&InstanceKey::new("a", "x")).await.unwrap().unwrap();
        assert_eq!(d.value["kind"], "vnet");
        assert_eq!(d.source, "memory a/x");
        s.remove("a", "x");
        assert!(s.get(&InstanceKey::new("a", "x")).await.unwrap().is_none());
        let mut seen = Vec::new();
        for _ in 0..4 {
            seen.extend(w.events.recv().await.unwrap());
        }
        assert_eq!(seen[0], StoreEvent::Instance(InstanceKey::new("b", "x")));
        assert_eq!(seen[3], StoreEvent::Instance(InstanceKey::new("a", "x")));
    }
}
