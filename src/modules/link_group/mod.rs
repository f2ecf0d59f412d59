//! `kind: link_group`: one route connector over several gateway links
//! (`quic_link`, `h2_link`, `ssh_link`, to one node or to several), for
//! fallback between transports and failover or spreading between nodes.
//!
//! `mode: failover` (the default) tries the links in the order listed: a
//! link that is down answers at once ([`DialError::Down`]) and the next is
//! tried, so a QUIC link whose UDP is blocked gives way to HTTP/2 as soon
//! as it notices (its `keepalive_timeout`), and takes the flows back when
//! it reconnects. Any link but the last gets at most `attempt_timeout` to
//! answer, so a path that died silently costs a flow that long. A refusal
//! by the far side (policy, a target that refuses) is the flow's end: the
//! same request through another link would meet the same answer.
//! `mode: spread` starts at the next link each flow (round robin), with
//! the same moving on.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use configstore::Document;
use serde::Deserialize;

use crate::core::addr::HostPort;
use crate::core::config::{parse_document, positive, ConfigError};
use crate::core::net::dial::{DialError, DialMeta, Dialer};
use crate::core::net::proxy::Stream;
use crate::core::spine::module::{Module, ModuleContext, ModuleError, ModuleFactory, ModulePlan};

/// How a group picks its link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The first link that is up, in the order listed.
    Failover,
    /// Round robin over the links that are up.
    Spread,
}

/// `kind: link_group`
///
/// ```yaml
/// kind: link_group
/// links: [east-quic, east-h2, east-ssh]   # gateway links of this tenant, preferred first
/// mode: failover                          # failover | spread
/// attempt_timeout: 2s                     # the most a link but the last may take to answer
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    links: Vec<String>,
    #[serde(default = "default_mode")]
    mode: Mode,
    #[serde(default = "default_attempt", with = "humantime_serde")]
    attempt_timeout: Duration,
}

fn default_mode() -> Mode {
    Mode::Failover
}
fn default_attempt() -> Duration {
    Duration::from_secs(2)
}

/// A checked `link_group` config.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkGroupConfig {
    /// The links, preferred first.
    pub links: Vec<String>,
    /// How one is picked.
    pub mode: Mode,
    /// The most a link but the last may take to answer.
    pub attempt_timeout: Duration,
}

impl LinkGroupConfig {
    /// Parses and validates a `kind: link_group` document.
    pub fn from_document(doc: &Document) -> Result<Self, ConfigError> {
        let raw: RawConfig = parse_document(doc, &["kind"])?;
        let src = doc.source.as_str();
        crate::core::config::at_least_one(src, "links", raw.links.len())?;
        let mut seen = std::collections::HashSet::new();
        if let Some(dup) = raw.links.iter().find(|l| !seen.insert(*l)) {
            return Err(ConfigError::key(
                src,
                "links",
                format!("`{dup}` is listed twice"),
            ));
        }
        positive(src, "attempt_timeout", raw.attempt_timeout)?;
        Ok(LinkGroupConfig {
            links: raw.links,
            mode: raw.mode,
            attempt_timeout: raw.attempt_timeout,
        })
    }
}

/// Builds link groups.
pub struct LinkGroupFactory;

impl ModuleFactory for LinkGroupFactory {
    fn kind(&self) -> &'static str {
        "link_group"
    }

    fn check(&self, doc: &Document) -> Result<ModulePlan, ConfigError> {
        let cfg = LinkGroupConfig::from_document(doc)?;
        Ok(ModulePlan {
            depends_on: cfg.links,
            ..ModulePlan::default()
        })
    }

    fn build(&self, ctx: ModuleContext, doc: &Document) -> Result<Arc<dyn Module>, ConfigError> {
        let cfg = LinkGroupConfig::from_document(doc)?;
        Ok(Arc::new(LinkGroup(Arc::new(Group {
            ctx,
            cfg: Mutex::new(Arc::new(cfg)),
            next: AtomicUsize::new(0),
            last: Mutex::new(None),
        }))))
    }
}

struct Group {
    ctx: ModuleContext,
    cfg: Mutex<Arc<LinkGroupConfig>>,
    /// Where `spread` starts next.
    next: AtomicUsize,
    /// The link the last flow went through.
    last: Mutex<Option<String>>,
}

/// A running link group.
pub struct LinkGroup(Arc<Group>);

impl Group {
    fn cfg(&self) -> Arc<LinkGroupConfig> {
        self.cfg.lock().expect("poisoned").clone()
    }

    /// The links in the order this flow tries them.
    fn order(&self) -> Vec<String> {
        let cfg = self.cfg();
        let mut links = cfg.links.clone();
        if cfg.mode == Mode::Spread {
            let n = self.next.fetch_add(1, Ordering::Relaxed) % links.len();
            links.rotate_left(n);
        }
        links
    }
}

struct GroupDialer(Arc<Group>);

#[async_trait]
impl Dialer for GroupDialer {
    async fn dial_tcp(
        &self,
        target: &HostPort,
        timeout: Duration,
        meta: &DialMeta,
    ) -> Result<Stream, DialError> {
        let group = &self.0;
        let cfg = group.cfg();
        let deadline = tokio::time::Instant::now() + timeout;
        let order = group.order();
        let mut downs = Vec::new();
        for (i, name) in order.iter().enumerate() {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                break;
            }
            let Some(dialer) = group.ctx.find(name).and_then(|m| m.dialer()) else {
                downs.push(format!("`{name}` is not running"));
                continue;
            };
            let last = i + 1 == order.len();
            let budget = if last {
                left
            } else {
                left.min(cfg.attempt_timeout)
            };
            match dialer.dial_tcp(target, budget, meta).await {
                Ok(s) => {
                    *group.last.lock().expect("poisoned") = Some(name.clone());
                    return Ok(s);
                }
                Err(DialError::Down(why)) => downs.push(why),
                // A link that did not answer in its share: the next may.
                Err(DialError::Timeout { .. }) if !last => {
                    downs.push(format!("`{name}` did not answer within {budget:?}"))
                }
                Err(e) => return Err(e),
            }
        }
        Err(DialError::Down(format!(
            "{target}: every link of group `{}` is down: {}",
            group.ctx.instance,
            downs.join("; ")
        )))
    }

    /// Datagrams through the first link, in the group's order, that is up
    /// and carries them (QUIC links do; h2 and SSH links do not).
    async fn bind_udp(
        &self,
        remote: std::net::SocketAddr,
    ) -> Result<Arc<dyn crate::core::net::datagram::DatagramSocket>, DialError> {
        let group = &self.0;
        let mut downs = Vec::new();
        for name in group.order() {
            let Some(dialer) = group.ctx.find(&name).and_then(|m| m.dialer()) else {
                downs.push(format!("`{name}` is not running"));
                continue;
            };
            match dialer.bind_udp(remote).await {
                Ok(s) => {
                    *group.last.lock().expect("poisoned") = Some(name.clone());
                    return Ok(s);
                }
                Err(DialError::Down(why)) | Err(DialError::NoRoute(why)) => downs.push(why),
                Err(e) => return Err(e),
            }
        }
        Err(DialError::Down(format!(
            "{remote}: no link of group `{}` carries datagrams now: {}",
            group.ctx.instance,
            downs.join("; ")
        )))
    }
}

#[async_trait]
impl Module for LinkGroup {
    async fn start(&self) -> Result<(), ModuleError> {
        Ok(())
    }

    async fn reload(&self, doc: &Document) -> Result<(), ModuleError> {
        let cfg = LinkGroupConfig::from_document(doc)?;
        *self.0.cfg.lock().expect("poisoned") = Arc::new(cfg);
        Ok(())
    }

    async fn drain(&self) {}

    async fn stop(&self) {}

    fn status(&self) -> serde_json::Value {
        let cfg = self.0.cfg();
        let links: Vec<serde_json::Value> = cfg
            .links
            .iter()
            .map(|name| {
                let st = self.0.ctx.find(name).map(|m| m.status());
                serde_json::json!({
                    "name": name,
                    "transport": st.as_ref().and_then(|s| s.get("transport").cloned()),
                    "connected": st.as_ref().and_then(|s| s.get("connected").cloned()),
                })
            })
            .collect();
        // The link a failover group uses now: the first one up.
        let active = links
            .iter()
            .find(|l| l["connected"] == true)
            .map(|l| l["name"].clone());
        serde_json::json!({
            "mode": cfg.mode,
            "links": links,
            "active": active,
            "last_used": *self.0.last.lock().expect("poisoned"),
        })
    }

    fn dialer(&self) -> Option<Arc<dyn Dialer>> {
        Some(Arc::new(GroupDialer(self.0.clone())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn config_checks() {
        let doc = |v| Document {
            source: "tenants/west/east.yaml".into(),
            value: v,
        };
        let e = LinkGroupConfig::from_document(&doc(json!({"kind": "link_group", "links": []})))
            .unwrap_err();
        assert_eq!(e.key.as_deref(), Some("links"));
        let e = LinkGroupConfig::from_document(&doc(
            json!({"kind": "link_group", "links": ["a", "a"]}),
        ))
        .unwrap_err();
        assert!(e.message.contains("listed twice"), "{e}");
        let e = LinkGroupConfig::from_document(&doc(
            json!({"kind": "link_group", "links": ["a"], "mode": "random"}),
        ))
        .unwrap_err();
        assert_eq!(e.key.as_deref(), Some("mode"), "{e}");
        let ok = LinkGroupConfig::from_document(&doc(
            json!({"kind": "link_group", "links": ["q", "h"]}),
        ))
        .unwrap();
        assert_eq!(ok.mode, Mode::Failover);
    }
}
