//! The capture module's config document.

use configstore::Document;
use serde::Deserialize;

use crate::core::config::ConfigError;
use crate::core::spine::door::DoorSettings;

/// How captured connections reach the listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// nftables/iptables `REDIRECT` (NAT): the original destination comes
    /// from `SO_ORIGINAL_DST`. The listener needs no privilege.
    Redirect,
    /// `TPROXY`: the connection keeps its destination, which the
    /// listener (`IP_TRANSPARENT`, needs CAP_NET_ADMIN) accepts as its own.
    Tproxy,
}

/// `kind: capture`
///
/// ```yaml
/// kind: capture
/// listen: 0.0.0.0:15001         # the port the rules send captured connections to
/// mode: redirect                # redirect (default) | tproxy (needs CAP_NET_ADMIN)
/// vnet: corp                    # optional: route captured connections in this vnet
/// connect_timeout: 5s
/// idle_timeout: 1h              # or `none`
/// max_connections: 1024
/// ```
///
/// `meshgatectl capture rules` prints (and with `--apply` installs) the
/// rules that steer an interface, a user or a cgroup here.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default = "default_mode")]
    mode: Mode,
}

/// The keys `kind: capture` has beside [`DoorSettings`].
const OWN_KEYS: [&str; 1] = ["mode"];

fn default_mode() -> Mode {
    Mode::Redirect
}

/// A checked capture config.
#[derive(Debug, Clone, PartialEq)]
pub struct CaptureConfig {
    /// Where the rules send captured connections (always on the host),
    /// where they route, timeouts, the limit.
    pub door: DoorSettings,
    /// REDIRECT or TPROXY.
    pub mode: Mode,
}

impl CaptureConfig {
    /// Parses and validates a `kind: capture` document.
    pub fn from_document(doc: &Document) -> Result<Self, ConfigError> {
        let (door, raw): (DoorSettings, RawConfig) = DoorSettings::parse(doc, &OWN_KEYS)?;
        let src = &doc.source;
        if door.listen_via.is_some() {
            return Err(ConfigError::key(
                src,
                "listen_via",
                "capture listens on the host, where the capture rules send connections",
            ));
        }
        if door.listen.0.port() == 0 {
            return Err(ConfigError::key(
                src,
                "listen",
                "needs a fixed port: the capture rules name it",
            ));
        }
        Ok(CaptureConfig {
            door,
            mode: raw.mode,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: serde_json::Value) -> Result<CaptureConfig, ConfigError> {
        CaptureConfig::from_document(&Document {
            source: "tenants/acme/capture.yaml".into(),
            value: v,
        })
    }

    #[test]
    fn defaults_and_refusals() {
        let c = parse(json!({"kind": "capture", "listen": "0.0.0.0:15001"})).unwrap();
        assert_eq!(c.mode, Mode::Redirect);
        assert_eq!(c.door.listen.0.port(), 15001);
        assert_eq!(
            c.door.max_connections,
            DoorSettings::DEFAULT_MAX_CONNECTIONS
        );
        let c = parse(json!({"listen": 15001, "mode": "tproxy", "vnet": "corp"})).unwrap();
        assert_eq!(
            (c.mode, c.door.vnet.as_deref()),
            (Mode::Tproxy, Some("corp"))
        );
        for (v, key) in [
            (json!({"listen": 0}), "listen"),
            (json!({"listen": 15001, "listen_via": "wg0"}), "listen_via"),
            (json!({"listen": 15001, "mode": "nat"}), "mode"),
            (json!({"listen": 15001, "mdoe": "tproxy"}), "mdoe"),
        ] {
            let e = parse(v.clone()).unwrap_err();
            assert_eq!(e.key.as_deref(), Some(key), "{v}: {e}");
        }
    }
}
