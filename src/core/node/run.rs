//! `meshgate run -- CMD`: one tenant's modules from a config store, plus a
//! `kind: netns` door ([`crate::modules::netns`]) that `CMD` runs behind.
//!
//! [`OneTenant`] shows the node only that tenant (so another node serving
//! the same directory keeps its ports: nothing of the other tenants is
//! started) and adds the door as instance [`INSTANCE`]. What the
//! namespace's programs read instead of the host's files comes from
//! [`resolv_conf`] and [`nsswitch_conf`].

use std::sync::Arc;

use async_trait::async_trait;
use configstore::{ConfigStore, Document, InstanceKey, NodeReport, StoreError, Watch};

/// The instance name of the door `meshgate run` adds.
pub const INSTANCE: &str = "meshgate-run";

/// A store that shows one tenant of another, with the run door added.
pub struct OneTenant {
    inner: Arc<dyn ConfigStore>,
    tenant: String,
    door: Document,
}

/// Why `meshgate run` cannot use a tenant.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The store has no such tenant.
    #[error("{store} has no tenant `{tenant}` (it has: {known})")]
    NoTenant {
        /// The store, described.
        store: String,
        /// The tenant asked for.
        tenant: String,
        /// The tenants it has.
        known: String,
    },
    /// The tenant already has an instance of that name.
    #[error("tenant `{tenant}` already has an instance named `{INSTANCE}`, the name `meshgate run` uses for its door")]
    Taken {
        /// The tenant.
        tenant: String,
    },
    /// The store could not be read.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl OneTenant {
    /// `tenant` of `inner`, with a `kind: netns` door routing in `vnet`
    /// (`None`: the tenant's default).
    pub async fn new(
        inner: Arc<dyn ConfigStore>,
        tenant: &str,
        vnet: Option<&str>,
    ) -> Result<Self, RunError> {
        let tenants = inner.tenants().await?;
        if !tenants.iter().any(|t| t == tenant) {
            return Err(RunError::NoTenant {
                store: inner.describe(),
                tenant: tenant.to_string(),
                known: if tenants.is_empty() {
                    "none".into()
                } else {
                    tenants.join(", ")
                },
            });
        }
        if inner.instances(tenant).await?.iter().any(|i| i == INSTANCE) {
            return Err(RunError::Taken {
                tenant: tenant.to_string(),
            });
        }
        let mut value = serde_json::json!({"kind": "netns"});
        if let Some(v) = vnet {
            value["vnet"] = v.into();
        }
        Ok(OneTenant {
            inner,
            tenant: tenant.to_string(),
            door: Document {
                source: format!("meshgate run (tenant {tenant})"),
                value,
            },
        })
    }
}

#[async_trait]
impl ConfigStore for OneTenant {
    fn describe(&self) -> String {
        format!("{}, tenant {} only", self.inner.describe(), self.tenant)
    }
    fn unread(&self) -> Vec<String> {
        self.inner.unread()
    }

    async fn node(&self) -> Result<Option<Document>, StoreError> {
        self.inner.node().await
    }
    async fn tenants(&self) -> Result<Vec<String>, StoreError> {
        Ok(vec![self.tenant.clone()])
    }
    async fn instances(&self, tenant: &str) -> Result<Vec<String>, StoreError> {
        if tenant != self.tenant {
            return Ok(Vec::new());
        }
        let mut out = self.inner.instances(tenant).await?;
        out.push(INSTANCE.to_string());
        out.sort();
        Ok(out)
    }
    async fn get(&self, key: &InstanceKey) -> Result<Option<Document>, StoreError> {
        if key.tenant != self.tenant {
            return Ok(None);
        }
        if key.instance == INSTANCE {
            return Ok(Some(self.door.clone()));
        }
        self.inner.get(key).await
    }
    fn watch(&self) -> Result<Option<Watch>, StoreError> {
        self.inner.watch()
    }
    async fn report(&self, report: &NodeReport) {
        self.inner.report(report).await
    }
    async fn close(&self) {
        self.inner.close().await
    }
}

/// The namespace's `/etc/resolv.conf`: the door's DNS stub, no search
/// domains (the host's would leak its names into queries).
pub fn resolv_conf() -> String {
    format!(
        "# meshgate run: names are answered by the tenant's vnet through meshgate\nnameserver {}\noptions timeout:2 attempts:2\n",
        crate::modules::netns::GATEWAY
    )
}

/// The namespace's `/etc/nsswitch.conf`: the host's, with `hosts:` as
/// `files dns`, so no lookup goes around DNS to a resolver on the host
/// (`resolve` asks systemd-resolved over a Unix socket, which a network
/// namespace does not stop). `None`: the host's already says that.
pub fn nsswitch_conf(host: &str) -> Option<String> {
    let mut changed = false;
    let mut out = String::with_capacity(host.len());
    let mut saw_hosts = false;
    for line in host.lines() {
        let key = line.split(':').next().unwrap_or("").trim();
        if key == "hosts" && !line.trim_start().starts_with('#') {
            saw_hosts = true;
            let wanted = "hosts: files dns";
            let sources: Vec<&str> = line
                .split_once(':')
                .map(|(_, v)| v.split_whitespace().collect())
                .unwrap_or_default();
            if sources != ["files", "dns"] {
                changed = true;
            }
            out.push_str(wanted);
        } else {
            out.push_str(line);
        }
        out.push('\n');
    }
    if !saw_hosts {
        out.push_str("hosts: files dns\n");
        changed = true;
    }
    changed.then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nsswitch_keeps_everything_but_hosts() {
        let host = "passwd: files systemd\n# hosts: nis\nhosts: files mdns4_minimal [NOTFOUND=return] resolve [!UNAVAIL=return] dns myhostname\nnetworks: files\n";
        let got = nsswitch_conf(host).unwrap();
        assert_eq!(
            got,
            "passwd: files systemd\n# hosts: nis\nhosts: files dns\nnetworks: files\n"
        );
        assert_eq!(nsswitch_conf("hosts:   files dns\n"), None);
        assert_eq!(
            nsswitch_conf("passwd: files\n").unwrap(),
            "passwd: files\nhosts: files dns\n"
        );
        assert!(resolv_conf().contains("nameserver 169.254.77.1\n"));
        assert!(!resolv_conf().contains("search"));
    }

    #[tokio::test]
    async fn one_tenant_shows_only_it_and_the_door() {
        let mem = configstore::MemStore::new();
        for (t, i) in [("acme", "wg0"), ("acme", "corp"), ("other", "web")] {
            mem.set(t, i, serde_json::json!({"kind": "pipe"}));
        }
        let inner: Arc<dyn ConfigStore> = Arc::new(mem);
        let s = OneTenant::new(inner.clone(), "acme", Some("corp"))
            .await
            .unwrap();
        assert_eq!(s.tenants().await.unwrap(), vec!["acme"]);
        assert_eq!(
            s.instances("acme").await.unwrap(),
            vec!["corp", INSTANCE, "wg0"]
        );
        assert!(s.instances("other").await.unwrap().is_empty());
        let key = |t: &str, i: &str| InstanceKey {
            tenant: t.into(),
            instance: i.into(),
        };
        assert!(s.get(&key("other", "web")).await.unwrap().is_none());
        let door = s.get(&key("acme", INSTANCE)).await.unwrap().unwrap();
        assert_eq!(
            door.value,
            serde_json::json!({"kind": "netns", "vnet": "corp"})
        );
        let e = OneTenant::new(inner.clone(), "nobody", None)
            .await
            .err()
            .unwrap();
        assert!(
            e.to_string()
                .contains("no tenant `nobody` (it has: acme, other)"),
            "{e}"
        );
    }
}
