//! The `kind: netns` document.

use configstore::Document;
use serde::Deserialize;

use crate::core::config::ConfigError;
use crate::core::spine::door::DoorSettings;

/// `kind: netns`
///
/// ```yaml
/// kind: netns
/// vnet: corp                    # optional: route the namespace's connections in this vnet
/// connect_timeout: 5s
/// idle_timeout: 1h              # or `none`
/// max_connections: 1024
/// ```
///
/// A network namespace of its own (a TUN in an unnamed user + network
/// namespace, as the kernel engine makes) whose only way out is this
/// door. `meshgate run -- CMD` adds one and runs CMD in it; `nsenter
/// --target PID --user --net --preserve-credentials` (PID from the status)
/// enters it by hand. There is no `listen`: the door takes every TCP
/// connection the namespace makes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {}

/// Where the door's own side of the namespace's link is (its DNS server).
pub const GATEWAY: std::net::Ipv4Addr = std::net::Ipv4Addr::new(169, 254, 77, 1);
/// The namespace's address on the link.
pub const INSIDE: std::net::Ipv4Addr = std::net::Ipv4Addr::new(169, 254, 77, 2);
/// The door's IPv6 address on the link (a unique local address).
pub const GATEWAY6: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0xfd6d, 0x6773, 0, 0, 0, 0, 0, 1);
/// The namespace's IPv6 address on the link.
pub const INSIDE6: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0xfd6d, 0x6773, 0, 0, 0, 0, 0, 2);

/// A checked netns config.
#[derive(Debug, Clone, PartialEq)]
pub struct NetnsConfig {
    /// Where connections route, timeouts, the limit (`listen` is the
    /// gateway address, fixed).
    pub door: DoorSettings,
}

impl NetnsConfig {
    /// Parses and validates a `kind: netns` document.
    pub fn from_document(doc: &Document) -> Result<Self, ConfigError> {
        let src = &doc.source;
        for key in ["listen", "listen_via"] {
            if doc.value.get(key).is_some() {
                return Err(ConfigError::key(
                    src,
                    key,
                    "a netns door takes every connection its namespace makes; it has no listen address",
                ));
            }
        }
        let mut with_listen = doc.clone();
        if let Some(map) = with_listen.value.as_object_mut() {
            map.insert("listen".into(), format!("{GATEWAY}:53").into());
        }
        let (door, _): (DoorSettings, RawConfig) = DoorSettings::parse(&with_listen, &[])?;
        Ok(NetnsConfig { door })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: serde_json::Value) -> Result<NetnsConfig, ConfigError> {
        NetnsConfig::from_document(&Document {
            source: "tenants/acme/run.yaml".into(),
            value: v,
        })
    }

    #[test]
    fn defaults_and_refusals() {
        let c = parse(json!({"kind": "netns"})).unwrap();
        assert_eq!(c.door.vnet, None);
        assert_eq!(
            c.door.max_connections,
            DoorSettings::DEFAULT_MAX_CONNECTIONS
        );
        let c = parse(json!({"kind": "netns", "vnet": "corp", "max_connections": 10})).unwrap();
        assert_eq!(
            (c.door.vnet.as_deref(), c.door.max_connections),
            (Some("corp"), 10)
        );
        for (v, key) in [
            (json!({"listen": 1080}), "listen"),
            (json!({"listen_via": "wg0"}), "listen_via"),
            (json!({"vnet": "no/slash"}), "vnet"),
            (json!({"vent": "corp"}), "vent"),
            (json!({"max_connections": 0}), "max_connections"),
        ] {
            let e = parse(v.clone()).unwrap_err();
            assert_eq!(e.key.as_deref(), Some(key), "{v}: {e}");
        }
    }
}
