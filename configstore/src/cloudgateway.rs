//! Cloud-Gateway compatibility: a directory holding Cloud-Gateway's
//! `conf.yaml` is read as it is and served as meshgate documents.
//!
//! ```yaml
//! type: server            # or client
//! name: server
//! public_key: <base64>
//! private_key: <base64>
//! peers:
//!   - name: client-a
//!     public_key: <base64>
//!     endpoint: server.example:8765   # clients name the server's endpoint
//! pipes:
//!   - name: web
//!     port: 8080
//!     remote: nginx:80                # present where the pipe leaves the tunnel
//!     peer: client-a                  # optional: which peer carries it
//! ```
//!
//! Translation (one tenant, `default`):
//! - `wg0` (`kind: wireguard`): the server listens on UDP 8765 (IPv4 and
//!   IPv6), clients on an ephemeral port. Every node's VPN address is derived
//!   from its public key ([`vpn_address`]) in 10.192.0.0/24; the server holds
//!   a `/24` (and so forwards between clients), clients a `/32`. Each peer is
//!   allowed its own derived `/32`; clients keep the server alive every 25 s.
//! - A pipe with `remote` is an exit: it listens on the node's VPN address at
//!   `port` and dials `remote` directly.
//! - A pipe without `remote` is an entry: it listens on `0.0.0.0:port` and
//!   dials `{peer's VPN address}:{port}` through `wg0`; the peer is the
//!   pipe's `peer`, or for a client its (first) server.
//! - On the server every pipe also listens on the other side (host and VPN
//!   address), which is what makes three-hop reverse pipes work:
//!   client → server VPN:port → peer VPN:port → remote.
//! - The node document: metrics/admin on `127.0.0.1:9000` (override with
//!   `MESHGATE_NODE__ADMIN`), log level from `CLOUD_GATEWAY_LOG_LEVEL`.
//!
//! Two nodes whose keys derive the same address are an error naming both:
//! Cloud-Gateway would silently give them one address; a new key for one of
//! them (`meshgatectl genkey`) resolves it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::{ConfigStore, Document, InstanceKey, StoreError, Watch};

/// The file name Cloud-Gateway reads.
pub const CONF_FILE: &str = "conf.yaml";
/// The only tenant of a Cloud-Gateway node.
pub const TENANT: &str = "default";
/// The WireGuard instance's name.
pub const WG_INSTANCE: &str = "wg0";
/// The server's UDP port.
pub const SERVER_PORT: u16 = 8765;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Conf {
    #[serde(rename = "type")]
    kind: NodeType,
    name: String,
    public_key: String,
    private_key: String,
    #[serde(default)]
    peers: Vec<ConfPeer>,
    #[serde(default)]
    pipes: Vec<ConfPipe>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum NodeType {
    Server,
    Client,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfPeer {
    name: String,
    public_key: String,
    #[serde(default)]
    endpoint: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfPipe {
    name: String,
    port: u16,
    #[serde(default)]
    remote: Option<String>,
    #[serde(default)]
    peer: Option<String>,
}

/// Cloud-Gateway's VPN address for a public key: FNV-1a (32 bit) of the
/// base64 text, modulo 253, plus 1, as the last octet of 10.192.0.0/24.
pub fn vpn_address(public_key_base64: &str) -> std::net::Ipv4Addr {
    let mut h: u32 = 0x811c_9dc5;
    for b in public_key_base64.trim().bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    std::net::Ipv4Addr::new(10, 192, 0, (h % 253 + 1) as u8)
}

/// A Cloud-Gateway directory served as meshgate documents.
#[derive(Debug, Clone)]
pub struct CloudGatewayStore {
    root: PathBuf,
}

impl CloudGatewayStore {
    /// True if `dir` looks like a Cloud-Gateway config directory.
    pub fn detect(dir: &Path) -> bool {
        dir.join(CONF_FILE).is_file() && !dir.join("tenants").exists()
    }

    /// A store reading `dir/conf.yaml`.
    pub fn open(dir: impl Into<PathBuf>) -> Self {
        Self { root: dir.into() }
    }

    fn read(&self) -> Result<Conf, StoreError> {
        let path = self.root.join(CONF_FILE);
        let text = std::fs::read_to_string(&path).map_err(|source| StoreError::Io {
            path: CONF_FILE.into(),
            source,
        })?;
        serde_norway::from_str(&text).map_err(|e| StoreError::Parse {
            source_name: CONF_FILE.into(),
            message: format!("invalid Cloud-Gateway config: {e}"),
        })
    }

    /// Every document, by instance name.
    fn documents(&self) -> Result<BTreeMap<String, Value>, StoreError> {
        translate(&self.read()?)
    }
}

fn err(message: String) -> StoreError {
    StoreError::Parse {
        source_name: CONF_FILE.into(),
        message,
    }
}

fn translate(c: &Conf) -> Result<BTreeMap<String, Value>, StoreError> {
    let own = vpn_address(&c.public_key);
    let mut seen: BTreeMap<std::net::Ipv4Addr, String> = BTreeMap::new();
    seen.insert(own, format!("this node ({})", c.name));
    let mut peers = Vec::new();
    let mut addr_of: BTreeMap<&str, std::net::Ipv4Addr> = BTreeMap::new();
    for p in &c.peers {
        let a = vpn_address(&p.public_key);
        if let Some(other) = seen.insert(a, format!("peer {}", p.name)) {
            return Err(err(format!(
                "peer {} and {other} both derive the VPN address {a} from their public keys; give one of them a new key",
                p.name
            )));
        }
        addr_of.insert(p.name.as_str(), a);
        let mut peer = json!({
            "name": p.name,
            "public_key": p.public_key,
            "allowed_ips": [format!("{a}/32")],
        });
        if let Some(ep) = &p.endpoint {
            peer["endpoint"] = json!(ep);
        }
        if c.kind == NodeType::Client {
            peer["persistent_keepalive"] = json!(25);
        }
        peers.push(peer);
    }
    let server = c.kind == NodeType::Server;
    let mut wg = json!({
        "kind": "wireguard",
        "private_key": c.private_key,
        "address": format!("{own}/{}", if server { 24 } else { 32 }),
        "peers": peers,
    });
    if server {
        wg["listen_port"] = json!(SERVER_PORT);
    }
    let mut docs = BTreeMap::new();
    docs.insert(WG_INSTANCE.to_string(), wg);
    for pipe in &c.pipes {
        let target_peer = match (&pipe.peer, c.kind) {
            (Some(p), _) => Some(p.as_str()),
            (None, NodeType::Client) => c.peers.first().map(|p| p.name.as_str()),
            (None, NodeType::Server) => None,
        };
        if let Some(p) = target_peer {
            if !addr_of.contains_key(p) {
                return Err(err(format!("pipe {}: no peer named `{p}`", pipe.name)));
            }
        }
        let host_listen = format!("0.0.0.0:{}", pipe.port);
        let vpn_listen = format!("{own}:{}", pipe.port);
        // Where connections leave: the remote, directly; or the peer's pipe.
        let out = match (&pipe.remote, target_peer) {
            (Some(r), _) => json!({ "remote": r }),
            (None, Some(p)) => json!({ "via": WG_INSTANCE, "peer": p }),
            (None, None) => {
                return Err(err(format!(
                    "pipe {}: a server pipe needs `remote` or `peer`",
                    pipe.name
                )))
            }
        };
        let with = |mut base: Value| {
            for (k, v) in out.as_object().expect("object") {
                base[k] = v.clone();
            }
            base
        };
        let entry = pipe.remote.is_none();
        if server || entry {
            docs.insert(
                pipe.name.clone(),
                with(json!({ "kind": "pipe", "listen": host_listen })),
            );
        }
        if server || !entry {
            let name = if server {
                format!("{}-vpn", pipe.name)
            } else {
                pipe.name.clone()
            };
            docs.insert(
                name,
                with(json!({ "kind": "pipe", "listen": vpn_listen, "listen_via": WG_INSTANCE })),
            );
        }
    }
    Ok(docs)
}

#[async_trait]
impl ConfigStore for CloudGatewayStore {
    fn describe(&self) -> String {
        format!(
            "Cloud-Gateway config {}",
            self.root.join(CONF_FILE).display()
        )
    }

    async fn node(&self) -> Result<Option<Document>, StoreError> {
        let c = self.read()?;
        let log = std::env::var("CLOUD_GATEWAY_LOG_LEVEL")
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "info".into());
        Ok(Some(Document {
            source: CONF_FILE.into(),
            value: json!({ "node": c.name, "admin": "127.0.0.1:9000", "log": log }),
        }))
    }

    async fn tenants(&self) -> Result<Vec<String>, StoreError> {
        Ok(vec![TENANT.into()])
    }

    async fn instances(&self, tenant: &str) -> Result<Vec<String>, StoreError> {
        if tenant != TENANT {
            return Ok(Vec::new());
        }
        Ok(self.documents()?.into_keys().collect())
    }

    async fn get(&self, key: &InstanceKey) -> Result<Option<Document>, StoreError> {
        if key.tenant != TENANT {
            return Ok(None);
        }
        Ok(self
            .documents()?
            .remove(&key.instance)
            .map(|value| Document {
                source: format!("{CONF_FILE} ({})", key.instance),
                value,
            }))
    }

    fn watch(&self) -> Result<Option<Watch>, StoreError> {
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_match_cloud_gateway() {
        assert_eq!(
            vpn_address("2o3hItYcvPrcmDMog6rOhmdzZd6PH+QIZtCvZnVrslU="),
            std::net::Ipv4Addr::new(10, 192, 0, 121)
        );
        assert_eq!(
            vpn_address("QqdKxpGpG1TTuyjCayMpRRKwLm5kjyIKZybxjv8oDnQ="),
            std::net::Ipv4Addr::new(10, 192, 0, 245)
        );
    }

    const S: &str = "2o3hItYcvPrcmDMog6rOhmdzZd6PH+QIZtCvZnVrslU=";
    const C: &str = "QqdKxpGpG1TTuyjCayMpRRKwLm5kjyIKZybxjv8oDnQ=";

    fn conf(yaml: &str) -> Conf {
        serde_norway::from_str(yaml).unwrap()
    }

    #[test]
    fn server_and_client_translate() {
        let server = translate(&conf(&format!(
            "type: server\nname: server\npublic_key: {S}\nprivate_key: x\npeers:\n  - name: client\n    public_key: {C}\npipes:\n  - name: web\n    port: 8080\n    remote: nginx:80\n"
        )))
        .unwrap();
        assert_eq!(server["wg0"]["listen_port"], 8765);
        assert_eq!(server["wg0"]["address"], "10.192.0.121/24");
        assert_eq!(
            server["wg0"]["peers"][0]["allowed_ips"][0],
            "10.192.0.245/32"
        );
        assert_eq!(server["web"]["listen"], "0.0.0.0:8080");
        assert_eq!(server["web"]["remote"], "nginx:80");
        assert_eq!(server["web-vpn"]["listen"], "10.192.0.121:8080");
        assert_eq!(server["web-vpn"]["listen_via"], "wg0");

        let client = translate(&conf(&format!(
            "type: client\nname: client\npublic_key: {C}\nprivate_key: x\npeers:\n  - name: server\n    public_key: {S}\n    endpoint: server:8765\npipes:\n  - name: web\n    port: 8080\n"
        )))
        .unwrap();
        assert_eq!(client["wg0"]["address"], "10.192.0.245/32");
        assert!(client["wg0"].get("listen_port").is_none());
        assert_eq!(client["wg0"]["peers"][0]["endpoint"], "server:8765");
        assert_eq!(client["wg0"]["peers"][0]["persistent_keepalive"], 25);
        assert_eq!(client["web"]["listen"], "0.0.0.0:8080");
        assert_eq!(client["web"]["via"], "wg0");
        assert_eq!(client["web"]["peer"], "server");
    }

    #[test]
    fn collisions_and_unknown_peers_are_errors() {
        let e = translate(&conf(&format!(
            "type: server\nname: s\npublic_key: {S}\nprivate_key: x\npeers:\n  - name: twin\n    public_key: {S}\n"
        )))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("both derive the VPN address 10.192.0.121"),
            "{e}"
        );
        let e = translate(&conf(&format!(
            "type: server\nname: s\npublic_key: {S}\nprivate_key: x\npipes:\n  - name: web\n    port: 1\n    peer: nobody\n"
        )))
        .unwrap_err()
        .to_string();
        assert!(e.contains("no peer named `nobody`"), "{e}");
    }
}
