//! The WireGuard module's config document.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use configstore::Document;
use ipnet::IpNet;
use serde::Deserialize;

use crate::core::addr::HostPort;
use crate::core::config::{parse_addresses, parse_document, ConfigError};
use crate::core::keys::{PrivateKey, PublicKey};

/// `kind: wireguard`
///
/// ```yaml
/// kind: wireguard
/// private_key: <base64>          # or private_key_file: /etc/meshgate/wg0.key
/// listen_port: 8765              # omitted: an ephemeral port (clients)
/// share_port: true               # share listen_port with other instances that say so, of any
///                                # tenant (default false): datagrams go to the instance they
///                                # are for by session index, initiations by MAC1
/// address: 10.192.0.1/24         # this node's address(es) in the tenant's network; may be left
///                                # out when `vnet:` names a vnet with `address:` (its stack is used)
/// vnet: sydney                   # optional: the vnet it attaches to (default: the tenant's default)
/// forward: true                  # forward between peers (default: when `address` is a subnet)
/// tcp_keepalive: 30s             # keep-alives on tunnelled TCP connections (0s: off)
/// tcp_timeout: 90s               # a silent peer's TCP connections end after this
/// congestion_control: bbr        # the tunnelled connections' TCP congestion control: engine
///                                # `userspace`: bbr (default) or cubic; `kernel`: any the
///                                # kernel has (default: bbr where the kernel has it)
/// interface: wg0                 # the name `wg` knows it by (default <tenant>-<instance>, 15 chars at most)
/// uapi: auto                     # auto (/var/run/wireguard when usable) | off | a directory
/// peers:
///   - name: client-a
///     public_key: <base64>
///     endpoint: host:port        # optional; names are resolved and re-resolved
///     allowed_ips: [10.192.0.2/32]
///     persistent_keepalive: 25   # optional, seconds
///     preshared_key: <base64>    # optional (or preshared_key_file)
/// ```
/// Holds key text: deliberately not `Debug`.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    private_key: Option<String>,
    private_key_file: Option<PathBuf>,
    listen_port: Option<u16>,
    #[serde(default)]
    share_port: bool,
    #[serde(default)]
    address: serde_json::Value,
    #[serde(default)]
    peers: Vec<RawPeer>,
    #[serde(default)]
    mtu: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    tcp_keepalive: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    tcp_timeout: Option<Duration>,
    #[serde(default)]
    vnet: Option<String>,
    #[serde(default)]
    interface: Option<String>,
    #[serde(default)]
    forward: Option<bool>,
    #[serde(default)]
    uapi: Option<String>,
    #[serde(default)]
    congestion_control: Option<String>,
}

/// Holds key text: deliberately not `Debug`.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeer {
    name: String,
    public_key: String,
    endpoint: Option<HostPort>,
    #[serde(default)]
    allowed_ips: Vec<IpNet>,
    persistent_keepalive: Option<u16>,
    preshared_key: Option<String>,
    preshared_key_file: Option<PathBuf>,
}

/// A checked WireGuard config.
#[derive(Clone)]
pub struct WireGuardConfig {
    /// This node's private key (never logged).
    pub private_key: PrivateKey,
    /// Its public half, derived once here (a derivation is a scalar
    /// multiplication: 100,000 instances did it four times each at start).
    pub public_key: PublicKey,
    /// UDP port to listen on; `None` for an ephemeral port.
    pub listen_port: Option<u16>,
    /// Share `listen_port` with the other instances (of any tenant) that
    /// share it ([`super::port`]).
    pub share_port: bool,
    /// This node's addresses in the virtual network, with prefix length.
    pub addresses: Vec<IpNet>,
    /// The peers, in document order.
    pub peers: Vec<PeerConfig>,
    /// Inner MTU (default 1420).
    pub mtu: usize,
    /// Keep-alive interval of TCP connections carried in the tunnel
    /// (default 30 s; `0s` turns it off).
    pub tcp_keepalive: Option<Duration>,
    /// How long a tunnelled TCP connection may wait for a silent peer before
    /// it is aborted (default 90 s); with keep-alive on, an idle connection
    /// to a vanished peer ends within this time.
    pub tcp_timeout: Duration,
    /// The vnet it attaches to; `None`: the tenant's default vnet.
    pub vnet: Option<String>,
    /// The kernel engine's congestion control for tunnelled sockets
    /// (`None`: BBR where the kernel has it, else its default).
    pub congestion_control: Option<String>,
    /// The interface name `wg` shows (and the UAPI socket's name), if set;
    /// [`WireGuardConfig::interface_names`] gives the default.
    pub interface: Option<String>,
    /// Where the UAPI socket goes.
    pub uapi: super::uapi::UapiDir,
    /// Forward between peers; `None`: when an address is a subnet.
    pub forward: Option<bool>,
}

/// One peer.
#[derive(Clone)]
pub struct PeerConfig {
    /// Operator's name for the peer (metrics label, logs).
    pub name: String,
    /// Its public key.
    pub public_key: PublicKey,
    /// Where to send to until the peer is heard from.
    pub endpoint: Option<HostPort>,
    /// Inner source addresses it may use, and destinations routed to it.
    pub allowed_ips: Vec<IpNet>,
    /// Keepalive interval.
    pub persistent_keepalive: Option<Duration>,
    /// Optional preshared key.
    pub preshared_key: Option<[u8; 32]>,
}

impl PeerConfig {
    /// The peer's own VPN address: the first of its `allowed_ips` that is
    /// one address (/32, /128). A pipe's `peer:` dials it; a network such as
    /// `10.192.0.0/24` names no host, so it is never guessed from one.
    pub fn address(&self) -> Option<std::net::IpAddr> {
        self.allowed_ips
            .iter()
            .find(|n| n.prefix_len() == n.max_prefix_len())
            .map(|n| n.addr())
    }

    /// Why [`PeerConfig::address`] is `None`, for errors.
    pub fn no_address_reason(&self) -> String {
        format!(
            "its allowed_ips ({}) hold no single address (a /32 or /128) to dial: \
             give the pipe `remote: <the peer's VPN address>:<port>`, or list that \
             address in the peer's allowed_ips",
            if self.allowed_ips.is_empty() {
                "none".to_string()
            } else {
                self.allowed_ips
                    .iter()
                    .map(|n| n.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        )
    }
}

impl std::fmt::Debug for WireGuardConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WireGuardConfig")
            .field("public_key", &self.public_key)
            .field("listen_port", &self.listen_port)
            .field("addresses", &self.addresses)
            .field(
                "peers",
                &self.peers.iter().map(|p| &p.name).collect::<Vec<_>>(),
            )
            .finish()
    }
}

pub use crate::core::engine::{DEFAULT_TCP_KEEPALIVE, DEFAULT_TCP_TIMEOUT};

/// Reads a key given inline or in a file (exactly one of the two).
fn key_text(
    source: &str,
    key: &str,
    inline: Option<String>,
    file: Option<PathBuf>,
    required: bool,
) -> Result<Option<String>, ConfigError> {
    crate::core::config::secret_text(
        source,
        key,
        inline,
        file,
        required,
        "base64, as `wg genkey` prints",
    )
}

/// A Linux interface name: 1-15 characters, no `/`, whitespace or `:`.
fn check_interface_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '=' | '+'));
    if ok && name != "." && name != ".." {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not an interface name: 1-15 letters, digits, `_`, `-`, `.`, `=` or `+`"
        ))
    }
}

/// The networks routed to the peers: every peer's allowed IPs.
pub fn routed_nets(peers: &[PeerConfig]) -> Vec<IpNet> {
    peers
        .iter()
        .flat_map(|p| p.allowed_ips.iter().copied())
        .collect()
}

impl WireGuardConfig {
    /// The interface names this instance may take, best first: the
    /// configured `interface`, else `<tenant>-<instance>` when it fits in
    /// the 15 characters Linux allows, then names of its first 10
    /// characters and a 4-digit hash of the whole (`a-very-lon-3f2a`), so
    /// two long names sharing a prefix do not collide.
    pub fn interface_names(&self, tenant: &str, instance: &str) -> Vec<String> {
        if let Some(n) = &self.interface {
            return vec![n.clone()];
        }
        let full = format!("{tenant}-{instance}");
        let mut names = Vec::new();
        if full.chars().count() <= 15 {
            names.push(full.clone());
        }
        let prefix: String = full.chars().take(10).collect();
        for salt in 0u64..8 {
            // FNV-1a: stable across runs and builds.
            let h = full
                .bytes()
                .chain(salt.to_le_bytes())
                .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                    (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
                });
            names.push(format!("{prefix}-{:04x}", h & 0xffff));
        }
        names
    }

    /// The networks routed to this instance in its vnet: every peer's allowed IPs.
    pub fn routed_nets(&self) -> Vec<IpNet> {
        routed_nets(&self.peers)
    }

    /// Parses and validates a `kind: wireguard` document.
    pub fn from_document(doc: &Document) -> Result<Self, ConfigError> {
        let raw: RawConfig = parse_document(doc, &["kind"])?;
        let src = doc.source.as_str();
        let pk = key_text(
            src,
            "private_key",
            raw.private_key,
            raw.private_key_file,
            true,
        )?
        .expect("required");
        let private_key = PrivateKey::from_base64(&pk)
            .map_err(|e| ConfigError::key(src, "private_key", e.to_string()))?;
        // Attached to a vnet, the interface may use the vnet's addresses.
        let addresses = match (&raw.address, &raw.vnet) {
            (serde_json::Value::Null, Some(_)) => Vec::new(),
            (v, _) => parse_addresses(src, "address", v)?,
        };
        if let Some(name) = &raw.interface {
            check_interface_name(name).map_err(|m| ConfigError::key(src, "interface", m))?;
        }
        let uapi = match raw.uapi.as_deref().map(str::trim) {
            None | Some("auto") => super::uapi::UapiDir::Auto,
            Some("off") => super::uapi::UapiDir::Off,
            Some(d) if d.starts_with('/') => super::uapi::UapiDir::Dir(PathBuf::from(d)),
            Some(d) => {
                return Err(ConfigError::key(
                    src,
                    "uapi",
                    format!("`{d}`: expected `auto`, `off` or an absolute directory such as /var/run/wireguard"),
                ))
            }
        };
        if let Some(v) = &raw.vnet {
            configstore::check_name(v).map_err(|m| ConfigError::key(src, "vnet", m))?;
        }
        let mtu = raw.mtu.unwrap_or(1420);
        let tcp_keepalive = match raw.tcp_keepalive {
            None => Some(DEFAULT_TCP_KEEPALIVE),
            Some(d) if d.is_zero() => None,
            Some(d) => Some(d),
        };
        let tcp_timeout = raw.tcp_timeout.unwrap_or(DEFAULT_TCP_TIMEOUT);
        if tcp_timeout < Duration::from_secs(1)
            || tcp_keepalive.is_some_and(|k| tcp_timeout < 2 * k)
        {
            return Err(ConfigError::key(
                src,
                "tcp_timeout",
                "must be at least 1s and at least twice tcp_keepalive",
            ));
        }
        if let Some(cc) = &raw.congestion_control {
            let valid = !cc.is_empty()
                && cc.len() < 16
                && cc
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            if !valid {
                return Err(ConfigError::key(
                    src,
                    "congestion_control",
                    format!("`{cc}` is not a congestion control name: expected e.g. `bbr`, `cubic` or `reno` (see /proc/sys/net/ipv4/tcp_available_congestion_control)"),
                ));
            }
        }
        if !(576..=9000).contains(&mtu) {
            return Err(ConfigError::key(src, "mtu", "expected 576-9000"));
        }
        let own_public = private_key.public_key();
        let mut names: HashMap<String, usize> = HashMap::new();
        let mut keys: HashMap<PublicKey, usize> = HashMap::new();
        let mut nets: HashMap<IpNet, usize> = HashMap::new();
        let mut peers = Vec::new();
        for (i, p) in raw.peers.into_iter().enumerate() {
            let at = |k: &str| format!("peers[{i}].{k}");
            configstore::check_name(&p.name).map_err(|m| ConfigError::key(src, at("name"), m))?;
            if let Some(prev) = names.insert(p.name.clone(), i) {
                return Err(ConfigError::key(
                    src,
                    at("name"),
                    format!("`{}` is also the name of peers[{prev}]", p.name),
                ));
            }
            let public_key = PublicKey::from_base64(&p.public_key)
                .map_err(|e| ConfigError::key(src, at("public_key"), e.to_string()))?;
            if public_key == own_public {
                return Err(ConfigError::key(
                    src,
                    at("public_key"),
                    "is this node's own public key",
                ));
            }
            if let Some(prev) = keys.insert(public_key, i) {
                return Err(ConfigError::key(
                    src,
                    at("public_key"),
                    format!("same key as peers[{prev}]"),
                ));
            }
            for net in &p.allowed_ips {
                if let Some(prev) = nets.insert(net.trunc(), i) {
                    return Err(ConfigError::key(
                        src,
                        at("allowed_ips"),
                        format!("{net} is also allowed for peers[{prev}]: each network routes to one peer"),
                    ));
                }
            }
            let psk = key_text(
                src,
                &at("preshared_key"),
                p.preshared_key,
                p.preshared_key_file,
                false,
            )?
            .map(|t| {
                PrivateKey::from_base64(&t)
                    .map(|k| *k.as_bytes())
                    .map_err(|e| ConfigError::key(src, at("preshared_key"), e.to_string()))
            })
            .transpose()?;
            peers.push(PeerConfig {
                name: p.name,
                public_key,
                endpoint: p.endpoint,
                allowed_ips: p.allowed_ips.iter().map(|n| n.trunc()).collect(),
                persistent_keepalive: p
                    .persistent_keepalive
                    .filter(|s| *s > 0)
                    .map(|s| Duration::from_secs(s.into())),
                preshared_key: psk,
            });
        }
        if raw.share_port && raw.listen_port.is_none_or(|p| p == 0) {
            return Err(ConfigError::key(
                src,
                "share_port",
                "needs a `listen_port` (the port to share): an ephemeral port is nobody else's",
            ));
        }
        Ok(WireGuardConfig {
            private_key,
            public_key: own_public,
            listen_port: raw.listen_port,
            share_port: raw.share_port,
            addresses,
            peers,
            mtu,
            tcp_keepalive,
            tcp_timeout,
            vnet: raw.vnet,
            congestion_control: raw.congestion_control,
            interface: raw.interface,
            uapi,
            forward: raw.forward,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const K1: &str = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";
    const P2: &str = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";
    const P3: &str = "TrMvSoP4jYQlY6RIzBgbssQqY3vxI2Pi+y71lOWWXX0=";

    fn doc(v: serde_json::Value) -> Document {
        Document {
            source: "tenants/t/wg0.yaml".into(),
            value: v,
        }
    }

    #[test]
    fn parses_a_server() {
        let c = WireGuardConfig::from_document(&doc(json!({
            "kind": "wireguard", "private_key": K1, "listen_port": 8765, "address": "10.192.0.1/24",
            "peers": [{"name": "a", "public_key": P2, "allowed_ips": ["10.192.0.2/32"], "persistent_keepalive": 25},
                      {"name": "b", "public_key": P3, "endpoint": "example.com:51820", "allowed_ips": ["10.192.0.3/32", "10.5.0.0/16"]}]
        })))
        .unwrap();
        assert_eq!(c.listen_port, Some(8765));
        assert_eq!(c.addresses, vec!["10.192.0.1/24".parse::<IpNet>().unwrap()]);
        assert_eq!(c.peers.len(), 2);
        assert_eq!(
            c.peers[0].persistent_keepalive,
            Some(Duration::from_secs(25))
        );
        assert_eq!(c.peers[1].endpoint.as_ref().unwrap().port, 51820);
        assert!(!format!("{c:?}").contains(K1), "private key in Debug");
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            (json!({"address": "10.0.0.1/24"}), "private_key", "missing"),
            (
                json!({"private_key": "nope", "address": "10.0.0.1/24"}),
                "private_key",
                "invalid key",
            ),
            (
                json!({"private_key": K1, "address": "10.0.0.300/24"}),
                "address",
                "not an address",
            ),
            (
                json!({"private_key": K1, "address": []}),
                "address",
                "at least one",
            ),
            (
                json!({"private_key": K1, "address": "10.0.0.1/24", "share_port": true}),
                "share_port",
                "needs a `listen_port`",
            ),
            (
                json!({"private_key": K1, "address": "10.0.0.1/24", "peers": [{"name": "a", "public_key": "x", "allowed_ips": []}]}),
                "peers[0].public_key",
                "invalid key",
            ),
            (
                json!({"private_key": K1, "address": "10.0.0.1/24", "peers": [
                {"name": "a", "public_key": P2, "allowed_ips": ["10.0.0.2/32"]},
                {"name": "b", "public_key": P3, "allowed_ips": ["10.0.0.2/32"]}]}),
                "peers[1].allowed_ips",
                "also allowed",
            ),
            (
                json!({"private_key": K1, "address": "10.0.0.1/24", "peers": [
                {"name": "a", "public_key": P2}, {"name": "a", "public_key": P3}]}),
                "peers[1].name",
                "also the name",
            ),
            (
                json!({"private_key": K1, "address": "10.0.0.1/24", "peers": [{"name": "a", "public_key": P2, "endpoint": "host"}]}),
                "peers[0].endpoint",
                "missing port",
            ),
            (
                json!({"private_key": K1, "address": "10.0.0.1/24", "peers": [{"name": "a", "public_key": P2, "alowed_ips": []}]}),
                "peers[0].alowed_ips",
                "unknown field",
            ),
            (
                json!({"private_key": K1, "private_key_file": "/x", "address": "10.0.0.1/24"}),
                "private_key",
                "not both",
            ),
            (
                json!({"private_key_file": "/nonexistent/key", "address": "10.0.0.1/24"}),
                "private_key_file",
                "cannot read",
            ),
        ];
        for (v, key, msg) in cases {
            let e = WireGuardConfig::from_document(&doc(v)).unwrap_err();
            assert_eq!(e.key.as_deref(), Some(key), "{e}");
            assert!(e.message.contains(msg), "{e}");
        }
    }

    #[test]
    fn interface_names_and_uapi_settings() {
        use crate::modules::wireguard::uapi::UapiDir;
        let with = |extra: serde_json::Value| {
            let mut v = json!({"private_key": K1, "address": "10.0.0.1/24"});
            v.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            WireGuardConfig::from_document(&doc(v))
        };
        let c = with(json!({})).unwrap();
        assert_eq!(c.uapi, UapiDir::Auto);
        assert_eq!(c.interface_names("acme", "wg0")[0], "acme-wg0");
        // Long names sharing 15 characters: their first choices differ,
        // each fits Linux's 15 characters, and is stable.
        let a = c.interface_names("a-very-long-tenant", "wg0");
        let b = c.interface_names("a-very-long-tenant", "wg1");
        assert_ne!(a[0], b[0]);
        assert!(a[0].starts_with("a-very-lon-"), "{}", a[0]);
        assert_eq!(a, c.interface_names("a-very-long-tenant", "wg0"));
        assert!(a.iter().chain(&b).all(|n| check_interface_name(n).is_ok()));
        assert_eq!(
            a.iter().collect::<std::collections::HashSet<_>>().len(),
            a.len(),
            "the fallbacks are distinct"
        );
        for good in ["wg0", "a.b-c_d=e+f", "x", "123456789012345"] {
            let c = with(json!({"interface": good})).unwrap();
            assert_eq!(c.interface_names("t", "i"), vec![good.to_string()]);
        }
        for bad in [
            "",
            "1234567890123456",
            "a/b",
            "wg 0",
            "wg:0",
            ".",
            "..",
            "wg0\n",
            "wgé",
        ] {
            let e = with(json!({"interface": bad})).unwrap_err();
            assert_eq!(e.key.as_deref(), Some("interface"), "{bad:?}: {e}");
        }
        assert_eq!(with(json!({"uapi": "off"})).unwrap().uapi, UapiDir::Off);
        assert_eq!(with(json!({"uapi": "auto"})).unwrap().uapi, UapiDir::Auto);
        assert_eq!(
            with(json!({"uapi": "/run/meshgate"})).unwrap().uapi,
            UapiDir::Dir("/run/meshgate".into())
        );
        let e = with(json!({"uapi": "run/meshgate"})).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("uapi"), "{e}");
        assert!(e.message.contains("absolute"), "{e}");
        let e = with(json!({"uapi_dir": "/x"})).unwrap_err();
        assert!(e.message.contains("unknown field"), "{e}");
    }

    #[test]
    fn key_from_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("k");
        std::fs::write(&p, format!("{K1}\n")).unwrap();
        let c = WireGuardConfig::from_document(&doc(
            json!({"private_key_file": p, "address": ["10.0.0.1/24", "fd00::1/64"]}),
        ))
        .unwrap();
        assert_eq!(c.private_key.to_base64(), K1);
        assert_eq!(c.addresses.len(), 2);
        assert_eq!(c.listen_port, None);
    }
}
