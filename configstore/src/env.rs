//! Environment overrides layered over another store.
//!
//! ```text
//! MESHGATE_NODE__ADMIN=0.0.0.0:9000                      node key `admin`
//! MESHGATE_TENANT__DEFAULT__WEB__LISTEN=127.0.0.1:8081   key `listen` of instance default/web
//! MESHGATE_TENANT__TEAM_A__DB__KIND=pipe                 creates team-a/db (or team_a/db)
//! ```
//!
//! Parts are separated by `__`. Tenant and instance names match
//! case-insensitively, with `_` standing for `_` or `-`; an instance known
//! only from the environment gets the lower-cased name. Keys are lower-cased;
//! nested keys take more `__` parts. Values are read as YAML scalars or flow
//! collections, so `8080` is a number, `true` a boolean and `[a, b]` a list.
//! The environment is read once, when the overlay is built.

use std::collections::BTreeMap;

use async_trait::async_trait;
use serde_json::{Map, Value};

use crate::{check_name, ConfigStore, Document, InstanceKey, StoreError, Watch};

const NODE_PREFIX: &str = "MESHGATE_NODE__";
const TENANT_PREFIX: &str = "MESHGATE_TENANT__";

/// One override: a key path and a value, with the variable it came from.
#[derive(Debug, Clone)]
struct Override {
    var: String,
    path: Vec<String>,
    value: Value,
}

/// A store whose documents are patched by `MESHGATE_...` variables.
pub struct EnvOverlay<S> {
    inner: S,
    node: Vec<Override>,
    /// (normalized tenant, normalized instance) -> overrides
    instances: BTreeMap<(String, String), Vec<Override>>,
}

/// Upper-cases and maps `-` to `_`, the form names take in variable names.
fn normalize(name: &str) -> String {
    name.to_ascii_uppercase().replace('-', "_")
}

fn parse_value(var: &str, raw: &str) -> Result<Value, StoreError> {
    if raw.is_empty() {
        return Ok(Value::String(String::new()));
    }
    serde_norway::from_str::<Value>(raw).map_err(|e| StoreError::Parse {
        source_name: format!("env {var}"),
        message: format!("invalid value: {e}"),
    })
}

impl<S: ConfigStore> EnvOverlay<S> {
    /// Reads the process environment.
    pub fn from_env(inner: S) -> Result<Self, StoreError> {
        Self::from_vars(inner, std::env::vars())
    }

    /// Reads the given variables (for tests and embedding).
    pub fn from_vars(
        inner: S,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, StoreError> {
        let mut node = Vec::new();
        let mut instances: BTreeMap<(String, String), Vec<Override>> = BTreeMap::new();
        for (var, raw) in vars {
            if let Some(rest) = var.strip_prefix(NODE_PREFIX) {
                let path = split_path(&var, rest, 1)?;
                node.push(Override {
                    value: parse_value(&var, &raw)?,
                    var,
                    path,
                });
            } else if let Some(rest) = var.strip_prefix(TENANT_PREFIX) {
                let parts = split_path(&var, rest, 3)?;
                let key = (normalize(&parts[0]), normalize(&parts[1]));
                instances.entry(key).or_default().push(Override {
                    value: parse_value(&var, &raw)?,
                    path: parts[2..].to_vec(),
                    var,
                });
            }
        }
        for list in instances.values_mut() {
            list.sort_by(|a, b| a.var.cmp(&b.var));
        }
        node.sort_by(|a, b| a.var.cmp(&b.var));
        Ok(Self {
            inner,
            node,
            instances,
        })
    }

    /// The tenant names the environment adds, as they would be spelled.
    fn env_tenants(&self) -> impl Iterator<Item = String> + '_ {
        self.instances.keys().map(|(t, _)| t.to_ascii_lowercase())
    }

    /// Variable names cannot tell `team-a` from `team_a`: an override that
    /// matches two tenants (or two instances) of the store is an error
    /// naming both, never a silent patch of either.
    async fn check_unambiguous(&self, key: &InstanceKey, o: &[Override]) -> Result<(), StoreError> {
        let var = o.first().map(|o| o.var.clone()).unwrap_or_default();
        let twin = |names: Vec<String>, mine: &str| {
            names
                .into_iter()
                .find(|n| n != mine && normalize(n) == normalize(mine))
        };
        let what = if let Some(t) = twin(self.inner.tenants().await?, &key.tenant) {
            Some(format!("tenants `{}` and `{t}`", key.tenant))
        } else {
            twin(self.inner.instances(&key.tenant).await?, &key.instance).map(|i| {
                format!(
                    "instances `{}` and `{i}` of tenant `{}`",
                    key.instance, key.tenant
                )
            })
        };
        match what {
            None => Ok(()),
            Some(both) => Err(StoreError::Name {
                source_name: format!("env {var}"),
                message: format!(
                    "matches both {both} (variable names do not tell `-` from `_`); rename one of them"
                ),
            }),
        }
    }

    fn overrides_for(&self, key: &InstanceKey) -> Option<&Vec<Override>> {
        self.instances
            .get(&(normalize(&key.tenant), normalize(&key.instance)))
    }
}

/// Splits `A__B__C` (lower-cased) and requires at least `min` parts.
fn split_path(var: &str, rest: &str, min: usize) -> Result<Vec<String>, StoreError> {
    let parts: Vec<String> = rest.split("__").map(|p| p.to_ascii_lowercase()).collect();
    if parts.len() < min || parts.iter().any(|p| p.is_empty()) {
        let expected = if min == 1 {
            "MESHGATE_NODE__<KEY>[__<SUBKEY>...]"
        } else {
            "MESHGATE_TENANT__<TENANT>__<INSTANCE>__<KEY>[__<SUBKEY>...]"
        };
        return Err(StoreError::Name {
            source_name: format!("env {var}"),
            message: format!("expected {expected}"),
        });
    }
    Ok(parts)
}

/// Applies overrides to a document (creating it if there was none).
fn apply(doc: Option<Document>, overrides: &[Override], fallback_source: String) -> Document {
    let mut doc = doc.unwrap_or(Document {
        source: fallback_source,
        value: Value::Object(Map::new()),
    });
    for o in overrides {
        let mut cur = &mut doc.value;
        for (i, k) in o.path.iter().enumerate() {
            if !cur.is_object() {
                *cur = Value::Object(Map::new());
            }
            let map = cur.as_object_mut().expect("just made an object");
            if i + 1 == o.path.len() {
                map.insert(k.clone(), o.value.clone());
                break;
            }
            cur = map.entry(k.clone()).or_insert(Value::Object(Map::new()));
        }
    }
    if !overrides.is_empty() {
        let vars: Vec<&str> = overrides.iter().map(|o| o.var.as_str()).collect();
        doc.source = format!("{} + env {}", doc.source, vars.join(", "));
    }
    doc
}

#[async_trait]
impl<S: ConfigStore> ConfigStore for EnvOverlay<S> {
    fn describe(&self) -> String {
        if self.node.is_empty() && self.instances.is_empty() {
            self.inner.describe()
        } else {
            format!(
                "{} with MESHGATE_ environment overrides",
                self.inner.describe()
            )
        }
    }

    fn unread(&self) -> Vec<String> {
        self.inner.unread()
    }

    async fn node(&self) -> Result<Option<Document>, StoreError> {
        let doc = self.inner.node().await?;
        if self.node.is_empty() {
            return Ok(doc);
        }
        Ok(Some(apply(doc, &self.node, "environment".into())))
    }

    async fn tenants(&self) -> Result<Vec<String>, StoreError> {
        let mut out = self.inner.tenants().await?;
        for t in self.env_tenants() {
            if !out.iter().any(|o| normalize(o) == normalize(&t)) {
                check_name(&t).map_err(|message| StoreError::Name {
                    source_name: "environment".into(),
                    message,
                })?;
                out.push(t);
            }
        }
        out.sort();
        Ok(out)
    }

    async fn instances(&self, tenant: &str) -> Result<Vec<String>, StoreError> {
        let mut out = self.inner.instances(tenant).await?;
        let nt = normalize(tenant);
        for (t, i) in self.instances.keys() {
            if *t == nt && !out.iter().any(|o| normalize(o) == *i) {
                out.push(i.to_ascii_lowercase());
            }
        }
        out.sort();
        Ok(out)
    }

    async fn get(&self, key: &InstanceKey) -> Result<Option<Document>, StoreError> {
        let doc = self.inner.get(key).await?;
        match self.overrides_for(key) {
            None => Ok(doc),
            Some(o) => {
                self.check_unambiguous(key, o).await?;
                Ok(Some(apply(doc, o, "environment".into())))
            }
        }
    }

    fn watch(&self) -> Result<Option<Watch>, StoreError> {
        self.inner.watch()
    }

    async fn report(&self, report: &crate::NodeReport) {
        self.inner.report(report).await
    }

    async fn close(&self) {
        self.inner.close().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DirStore;

    fn vars(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[tokio::test]
    async fn an_override_matching_two_tenants_is_an_error_naming_both() {
        let d = tempfile::tempdir().unwrap();
        for t in ["team-a", "team_a"] {
            std::fs::create_dir_all(d.path().join(format!("tenants/{t}"))).unwrap();
            std::fs::write(
                d.path().join(format!("tenants/{t}/web.yaml")),
                "kind: pipe\nlisten: 127.0.0.1:1\n",
            )
            .unwrap();
        }
        let s = EnvOverlay::from_vars(
            DirStore::open(d.path()).unwrap(),
            vars(&[("MESHGATE_TENANT__TEAM_A__WEB__LISTEN", "127.0.0.1:2")]),
        )
        .unwrap();
        let e = s
            .get(&InstanceKey::new("team-a", "web"))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("env MESHGATE_TENANT__TEAM_A__WEB__LISTEN: matches both tenants `team-a` and `team_a`"), "{e}");
    }

    #[tokio::test]
    async fn overrides_and_creates() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("tenants/team-a")).unwrap();
        std::fs::write(
            d.path().join("tenants/team-a/web.yaml"),
            "kind: pipe\nlisten: 127.0.0.1:1\n",
        )
        .unwrap();
        std::fs::write(d.path().join("meshgate.yaml"), "node: gw1\n").unwrap();
        let s = EnvOverlay::from_vars(
            DirStore::open(d.path()).unwrap(),
            vars(&[
                ("MESHGATE_TENANT__TEAM_A__WEB__LISTEN", "127.0.0.1:2"),
                ("MESHGATE_TENANT__TEAM_A__WEB__MAX_CONNECTIONS", "10"),
                ("MESHGATE_TENANT__OTHER__DB__KIND", "pipe"),
                ("MESHGATE_NODE__ADMIN", "127.0.0.1:9999"),
                ("UNRELATED", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(s.tenants().await.unwrap(), vec!["other", "team-a"]);
        assert_eq!(s.instances("other").await.unwrap(), vec!["db"]);
        let web = s
            .get(&InstanceKey::new("team-a", "web"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(web.value["listen"], "127.0.0.1:2");
        assert_eq!(web.value["max_connections"], 10);
        assert!(web.source.starts_with("tenants/team-a/web.yaml + env "));
        let db = s
            .get(&InstanceKey::new("other", "db"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(db.value["kind"], "pipe");
        let node = s.node().await.unwrap().unwrap();
        assert_eq!(node.value["node"], "gw1");
        assert_eq!(node.value["admin"], "127.0.0.1:9999");
    }

    #[test]
    fn malformed_variables_are_named() {
        let d = tempfile::tempdir().unwrap();
        let e = EnvOverlay::from_vars(
            DirStore::open(d.path()).unwrap(),
            vars(&[("MESHGATE_TENANT__A__LISTEN", "x")]),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("env MESHGATE_TENANT__A__LISTEN"), "{e}");
        assert!(e.contains("<INSTANCE>"), "{e}");
        let e = EnvOverlay::from_vars(
            DirStore::open(d.path()).unwrap(),
            vars(&[("MESHGATE_NODE__ADMIN", "[unclosed")]),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("env MESHGATE_NODE__ADMIN: invalid value"), "{e}");
    }
}
