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
//!     remote: nginx:80                # the service, as the exit resolves it
//!     peer: client-a                  # optional: the node where the pipe exits
//! ```
//!
//! Translation (one tenant, `default`):
//! - `wg0` (`kind: wireguard`, interface name `wg0` for `wg show wg0`): the
//!   server listens on UDP 8765 (IPv4 and IPv6), clients on an ephemeral port. Every node's VPN address is derived
//!   from its public key ([`vpn_address`]) in 10.192.0.0/24; the server holds
//!   a `/24` (and so forwards between clients), clients a `/32`. Each peer is
//!   allowed its own derived `/32`; clients keep the server alive every 25 s.
//! - Pipes. Every pipe has one **exit**, the node where it leaves the tunnel
//!   and dials `remote` (resolved there): the node its `peer` names, or the
//!   server when it names none. Cloud-Gateway writes the same pipe (usually
//!   with `remote`) on every node it crosses; each node works out its part:
//!   - on the exit (the server for a pipe without `peer`, or the node whose
//!     own `name` is the pipe's `peer`), the pipe dials `remote`;
//!   - on any other node it dials the next hop's VPN address at `port`
//!     through `wg0`: a client dials its server (or the peer it names), the
//!     server dials the client the `peer` names. `remote` is then unused.
//!   - Every pipe listens on `port` on all interfaces (`[::]`, IPv4 and
//!     IPv6, as Cloud-Gateway's `*:8080`), and, on the nodes another node
//!     dials (the server, and the exit), also on the node's VPN address
//!     (instance `<pipe>-vpn`).
//!
//!   So the minimal demo is client `[::]:8080` → server VPN:8080 → `nginx:80`
//!   and the reverse demo client-legacy → server VPN:8080 →
//!   client-cloudnative VPN:8080 → `nginx:80`. A `peer` naming neither a peer
//!   nor the node itself is an error naming the pipe and the name.
//! - The node document: metrics/admin on `127.0.0.1:9000` (override with
//!   `MESHGATE_NODE__ADMIN`), log level from `CLOUD_GATEWAY_LOG_LEVEL`.
//! - `CLOUD_GATEWAY_ENGINE`: `boringtun` (or unset) is meshgate's userspace
//!   engine; any other value is an error naming the variable.
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

/// Holds the private key: deliberately not `Debug`.
#[derive(Clone, Deserialize)]
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
        check_engine(std::env::var(ENGINE_VAR).ok().as_deref())?;
        let path = self.root.join(CONF_FILE);
        let text = std::fs::read_to_string(&path).map_err(|source| StoreError::Io {
            path: CONF_FILE.into(),
            source,
        })?;
        let text = quote_ipv6_endpoints(&text);
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

/// `endpoint: [fd00::1]:8765` is how everyone writes an IPv6 endpoint, but
/// it is not valid YAML (a plain value cannot start with `[`). Such a line,
/// and only such a line, is read as if its value were quoted; every other
/// line is left to the YAML parser.
fn quote_ipv6_endpoints(text: &str) -> std::borrow::Cow<'_, str> {
    fn fix(line: &str) -> Option<String> {
        let (key, value) = line.split_once("endpoint:")?;
        let head = key.trim_start().trim_start_matches('-').trim();
        if !head.is_empty() {
            return None;
        }
        let (value, comment) = match value.split_once(" #") {
            Some((v, c)) => (v, Some(c)),
            None => (value, None),
        };
        let v = value.trim();
        let (addr, port) = v.strip_prefix('[')?.split_once("]:")?;
        let addr_ok = addr.contains(':')
            && addr
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, ':' | '.' | '%' | '_' | '-'));
        if !addr_ok || port.is_empty() || !port.chars().all(|c| c.is_ascii_digit()) {
            return None;
        }
        let mut out = format!("{key}endpoint: \"{v}\"");
        if let Some(c) = comment {
            out += " #";
            out += c;
        }
        Some(out)
    }
    if !text.contains("]:") {
        return text.into();
    }
    let mut changed = false;
    let lines: Vec<String> = text
        .lines()
        .map(|l| match fix(l) {
            Some(f) => {
                changed = true;
                f
            }
            None => l.to_string(),
        })
        .collect();
    if !changed {
        return text.into();
    }
    let mut out = lines.join("\n");
    if text.ends_with('\n') {
        out.push('\n');
    }
    out.into()
}

/// Cloud-Gateway's choice of WireGuard implementation.
pub const ENGINE_VAR: &str = "CLOUD_GATEWAY_ENGINE";

/// `CLOUD_GATEWAY_ENGINE`: `boringtun` is what meshgate runs (userspace
/// WireGuard, userspace engine); no other engine exists yet.
fn check_engine(value: Option<&str>) -> Result<(), StoreError> {
    match value.map(str::trim) {
        None | Some("") => Ok(()),
        Some(v) if v.eq_ignore_ascii_case("boringtun") => Ok(()),
        Some(v) => Err(StoreError::Parse {
            source_name: format!("env {ENGINE_VAR}"),
            message: format!(
                "unsupported engine `{v}`: meshgate runs WireGuard in userspace (boringtun, no TUN device); set {ENGINE_VAR}=boringtun or leave it unset"
            ),
        }),
    }
}

fn err(message: String) -> StoreError {
    StoreError::Parse {
        source_name: CONF_FILE.into(),
        message,
    }
}

/// Where one node's part of a pipe sends its connections.
#[derive(Debug, Clone, PartialEq, Eq)]
enum NextHop<'a> {
    /// This node is the pipe's exit: dial `remote` from here.
    Remote(&'a str),
    /// Dial this peer's VPN address at the pipe's port, through `wg0`.
    Peer(&'a str),
}

/// Decides, for this node, where `pipe` goes next and whether other nodes
/// dial this node's VPN address for it (the rule in the module docs).
fn plan_pipe<'a>(
    c: &'a Conf,
    pipe: &'a ConfPipe,
    peers: &BTreeMap<&str, std::net::Ipv4Addr>,
) -> Result<(NextHop<'a>, bool), StoreError> {
    let server = c.kind == NodeType::Server;
    if let Some(p) = pipe.peer.as_deref() {
        if p != c.name && !peers.contains_key(p) {
            return Err(err(format!(
                "pipe {}: `peer: {p}` names neither a peer of this node ({}) nor this node (`{}`)",
                pipe.name,
                if peers.is_empty() {
                    "it has none".to_string()
                } else {
                    peers.keys().copied().collect::<Vec<_>>().join(", ")
                },
                c.name
            )));
        }
    }
    let exit = match pipe.peer.as_deref() {
        Some(p) => p == c.name,
        None => server,
    };
    if exit {
        let remote = pipe.remote.as_deref().ok_or_else(|| {
            err(format!(
                "pipe {}: this node is the pipe's exit ({}) and needs `remote: HOST:PORT`, the service to reach from here",
                pipe.name,
                match pipe.peer {
                    Some(_) => "its `peer` names this node",
                    None => "a server pipe without `peer`",
                }
            ))
        })?;
        // Other nodes dial an exit's VPN address: clients always dial the
        // server, and the server dials the client a pipe's `peer` names.
        return Ok((NextHop::Remote(remote), true));
    }
    let hop = match (pipe.peer.as_deref(), c.kind) {
        // The server relays to the peer; a client that names a peer of its
        // own (its server) dials it.
        (Some(p), _) => p,
        (None, NodeType::Client) => c.peers.first().map(|p| p.name.as_str()).ok_or_else(|| {
            err(format!(
                "pipe {}: a client needs its server under `peers` to carry the pipe",
                pipe.name
            ))
        })?,
        (None, NodeType::Server) => unreachable!("a server pipe without peer is an exit"),
    };
    // The server also listens on its VPN address: clients dial it there.
    Ok((NextHop::Peer(hop), server))
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
        if p.name == c.name {
            return Err(err(format!(
                "peer {}: has this node's own name; peer names must differ from `name`",
                p.name
            )));
        }
        if addr_of.insert(p.name.as_str(), a).is_some() {
            return Err(err(format!("peer {}: named twice under `peers`", p.name)));
        }
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
        "interface": WG_INSTANCE,
        "private_key": c.private_key,
        "address": format!("{own}/{}", if server { 24 } else { 32 }),
        "peers": peers,
    });
    if server {
        wg["listen_port"] = json!(SERVER_PORT);
    }
    let mut docs = BTreeMap::new();
    docs.insert(WG_INSTANCE.to_string(), wg);
    let mut insert = |name: String, doc: Value, pipe: &ConfPipe| {
        if docs.insert(name.clone(), doc).is_some() {
            return Err(err(format!(
                "pipe {}: its instance name `{name}` is already taken (pipe names must be unique, and `<pipe>-vpn` and `{WG_INSTANCE}` are reserved)",
                pipe.name
            )));
        }
        Ok(())
    };
    for pipe in &c.pipes {
        let (hop, vpn_listener) = plan_pipe(c, pipe, &addr_of)?;
        let out = match hop {
            NextHop::Remote(r) => json!({ "remote": r }),
            NextHop::Peer(p) => json!({ "via": WG_INSTANCE, "peer": p }),
        };
        let with = |mut base: Value| {
            for (k, v) in out.as_object().expect("object") {
                base[k] = v.clone();
            }
            base
        };
        insert(
            pipe.name.clone(),
            with(json!({ "kind": "pipe", "listen": format!("[::]:{}", pipe.port) })),
            pipe,
        )?;
        if vpn_listener {
            insert(
                format!("{}-vpn", pipe.name),
                with(json!({
                    "kind": "pipe",
                    "listen": format!("{own}:{}", pipe.port),
                    "listen_via": WG_INSTANCE,
                })),
                pipe,
            )?;
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

    /// A third key whose derived address differs from S's and C's.
    const L: &str = "ZmFrZS1rZXktZm9yLWNsaWVudC1sZWdhY3ktbm9kZQ==";

    /// A node's conf.yaml around pipe snippets quoted from the seed verbatim.
    fn node(kind: &str, name: &str, key: &str, peers: &[(&str, &str)], pipes: &[&str]) -> Conf {
        let mut y =
            format!("type: {kind}\nname: {name}\npublic_key: {key}\nprivate_key: x\npeers:\n");
        for (n, k) in peers {
            y += &format!("  - name: {n}\n    public_key: {k}\n");
            if kind == "client" {
                y += "    endpoint: server:8765\n";
            }
        }
        y += "pipes:\n";
        for p in pipes {
            for (i, line) in p.trim().lines().enumerate() {
                y += if i == 0 { "  - " } else { "    " };
                y += line;
                y += "\n";
            }
        }
        conf(&y)
    }

    /// The pipe as the seed's minimal demo writes it, on both nodes (and on
    /// the reverse demo's client-legacy).
    const SEED_PIPE: &str = "name: nginx\nport: 8080\nremote: nginx:80\n";
    /// The pipe as the seed's reverse demo writes it on the server and on
    /// client-cloudnative.
    const SEED_REVERSE_PIPE: &str =
        "name: nginx\nport: 8080\nremote: nginx:80\npeer: client-cloudnative\n";

    fn addr(key: &str) -> String {
        vpn_address(key).to_string()
    }

    #[test]
    fn minimal_demo_as_the_seed_writes_it() {
        let server =
            translate(&node("server", "server", S, &[("client", C)], &[SEED_PIPE])).unwrap();
        assert_eq!(server["wg0"]["listen_port"], 8765);
        assert_eq!(server["wg0"]["interface"], "wg0");
        assert_eq!(server["wg0"]["address"], "10.192.0.121/24");
        assert_eq!(
            server["wg0"]["peers"][0]["allowed_ips"][0],
            "10.192.0.245/32"
        );
        // The server is the exit: host and VPN listeners dial nginx:80.
        assert_eq!(server["nginx"]["listen"], "[::]:8080");
        assert_eq!(server["nginx"]["remote"], "nginx:80");
        assert!(server["nginx"].get("via").is_none());
        assert_eq!(server["nginx-vpn"]["listen"], "10.192.0.121:8080");
        assert_eq!(server["nginx-vpn"]["listen_via"], "wg0");
        assert_eq!(server["nginx-vpn"]["remote"], "nginx:80");

        let client =
            translate(&node("client", "client", C, &[("server", S)], &[SEED_PIPE])).unwrap();
        assert_eq!(client["wg0"]["address"], "10.192.0.245/32");
        assert!(client["wg0"].get("listen_port").is_none());
        assert_eq!(client["wg0"]["peers"][0]["endpoint"], "server:8765");
        assert_eq!(client["wg0"]["peers"][0]["persistent_keepalive"], 25);
        // The client is not the exit: it dials the server's VPN address at
        // the pipe's port, and `remote` is not used for dialing here.
        assert_eq!(client["nginx"]["listen"], "[::]:8080");
        assert_eq!(client["nginx"]["via"], "wg0");
        assert_eq!(client["nginx"]["peer"], "server");
        assert!(client["nginx"].get("remote").is_none());
        assert!(!client.contains_key("nginx-vpn"), "nobody dials the client");
    }

    #[test]
    fn reverse_demo_as_the_seed_writes_it() {
        let server = translate(&node(
            "server",
            "server",
            S,
            &[("client-cloudnative", C), ("client-legacy", L)],
            &[SEED_REVERSE_PIPE],
        ))
        .unwrap();
        // The server relays to client-cloudnative, on the host and on its VPN address.
        for inst in ["nginx", "nginx-vpn"] {
            assert_eq!(server[inst]["via"], "wg0", "{inst}");
            assert_eq!(server[inst]["peer"], "client-cloudnative", "{inst}");
            assert!(server[inst].get("remote").is_none(), "{inst}");
        }
        assert_eq!(server["nginx"]["listen"], "[::]:8080");
        assert_eq!(server["nginx-vpn"]["listen"], format!("{}:8080", addr(S)));

        // client-cloudnative is the pipe's peer, so it is the exit.
        let cloudnative = translate(&node(
            "client",
            "client-cloudnative",
            C,
            &[("server", S)],
            &[SEED_REVERSE_PIPE],
        ))
        .unwrap();
        assert_eq!(cloudnative["nginx"]["listen"], "[::]:8080");
        assert_eq!(cloudnative["nginx"]["remote"], "nginx:80");
        assert!(cloudnative["nginx"].get("via").is_none());
        assert_eq!(
            cloudnative["nginx-vpn"]["listen"],
            format!("{}:8080", addr(C))
        );
        assert_eq!(cloudnative["nginx-vpn"]["listen_via"], "wg0");
        assert_eq!(cloudnative["nginx-vpn"]["remote"], "nginx:80");

        // client-legacy's pipe is the minimal demo's: it dials the server.
        let legacy = translate(&node(
            "client",
            "client-legacy",
            L,
            &[("server", S)],
            &[SEED_PIPE],
        ))
        .unwrap();
        assert_eq!(legacy["nginx"]["listen"], "[::]:8080");
        assert_eq!(legacy["nginx"]["via"], "wg0");
        assert_eq!(legacy["nginx"]["peer"], "server");
        assert!(!legacy.contains_key("nginx-vpn"));
    }

    #[test]
    fn an_exit_without_remote_and_an_unknown_peer_are_errors() {
        let e = translate(&node(
            "server",
            "server",
            S,
            &[("client", C)],
            &["name: web\nport: 1\n"],
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("pipe web: this node is the pipe's exit"), "{e}");
        assert!(e.contains("needs `remote"), "{e}");
        let e = translate(&node(
            "client",
            "client-legacy",
            L,
            &[("server", S)],
            &[SEED_REVERSE_PIPE],
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("pipe nginx: `peer: client-cloudnative` names neither a peer of this node (server) nor this node (`client-legacy`)"),
            "{e}"
        );
        let e = translate(&node("client", "c", C, &[], &[SEED_PIPE]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs its server under `peers`"), "{e}");
        let e = translate(&node(
            "server",
            "server",
            S,
            &[("client", C)],
            &[SEED_PIPE, "name: nginx-vpn\nport: 9\nremote: x:1\n"],
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("`nginx-vpn` is already taken"), "{e}");
    }

    #[test]
    fn ipv6_endpoints_are_read_quoted_or_not() {
        for endpoint in ["[fd00::1]:8765", "\"[fd00::1]:8765\"", "'[fd00::1]:8765'"] {
            let text = format!(
                "type: client\nname: c\npublic_key: {C}\nprivate_key: x\npeers:\n  - name: server\n    public_key: {S}\n    endpoint: {endpoint}   # the server\n"
            );
            let fixed = quote_ipv6_endpoints(&text);
            let c: Conf =
                serde_norway::from_str(&fixed).unwrap_or_else(|e| panic!("{endpoint}: {e}"));
            assert_eq!(c.peers[0].endpoint.as_deref(), Some("[fd00::1]:8765"));
        }
        // Only endpoint lines of that exact shape are touched.
        for other in [
            "remote: [fd00::1]:80\n",
            "endpoint: [a, b]\n",
            "endpoint: host:1\n",
        ] {
            assert_eq!(quote_ipv6_endpoints(other), other);
        }
    }

    #[test]
    fn engine_boringtun_is_accepted_and_others_are_named() {
        assert!(check_engine(None).is_ok());
        assert!(check_engine(Some("boringtun")).is_ok());
        assert!(check_engine(Some("")).is_ok());
        let e = check_engine(Some("wireguard-go")).unwrap_err().to_string();
        assert!(
            e.starts_with("env CLOUD_GATEWAY_ENGINE: unsupported engine `wireguard-go`"),
            "{e}"
        );
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
        assert!(e.contains("pipe web: `peer: nobody` names neither"), "{e}");
    }
}
