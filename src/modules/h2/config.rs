//! The h2 door's config document.

use std::path::PathBuf;
use std::time::Duration;

use configstore::Document;
use serde::Deserialize;

use crate::core::config::{positive, ByteSize, ConfigError};
use crate::core::net::tls::{ClientAuth, DoorTls, DoorTlsKeys, IdentityFrom};
use crate::core::spine::door::{DoorKeys, DoorSettings};
use crate::core::spine::onramp::publish::{PublishKeys, PublishRules, RawPermit};

/// `kind: h2`
///
/// ```yaml
/// kind: h2
/// listen: 0.0.0.0:15008          # HBONE's port
/// vnet: default                  # where CONNECT targets route
/// tls_cert: /etc/meshgate/gw.pem # the door's certificate chain (PEM)
/// tls_key: /etc/meshgate/gw.key  # its private key (PEM)
/// client_ca: /etc/meshgate/ca.pem  # clients' certificates come from this CA
/// client_auth: required          # none | optional | required (default:
///                                #   required with client_ca, else none)
/// identity_from: [spiffe, dns, cn] # the flow's identity: the first the
///                                # client certificate has
/// trust_forwarded: [spiffe://example.org/ns/mesh/sa/gateway]
///                                # identities whose `Forwarded: for=` is the
///                                # flow's source (other gateways)
/// h2c: false                     # plain-text HTTP/2 (no TLS): loopback only
/// stream_window: 4MiB            # flow control, per stream
/// connection_window: 16MiB       # and per connection (at least stream_window)
/// max_frame_size: 1MiB           # 16KiB to 16MiB - 1
/// max_header_list: 64KiB         # a request's headers; larger ones are refused
/// max_streams: 200               # concurrent CONNECTs per connection
/// keepalive: 10s                 # PING this often; `none` for never
/// keepalive_timeout: 20s         # close if a PING is not answered in this
/// connect_timeout: 5s            # 504 when the target does not answer in this
/// handshake_timeout: 10s         # the TLS handshake
/// max_connections: 1024          # TLS connections (each up to max_streams flows)
/// publish:                       # links that may publish ports here (reverse
///   - identity: spiffe://example.org/ns/mesh/sa/west   # forwards), by identity
///     ports: [8081, "9000-9099"]
/// publish_ip: 127.0.0.1          # where published ports listen (default 127.0.0.1)
/// publish_via: wg0               # optional: on a VPN address in this module's network
/// max_published: 32              # ports one connection may publish
/// ```
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    tls_cert: Option<PathBuf>,
    #[serde(default)]
    tls_key: Option<PathBuf>,
    #[serde(default)]
    client_ca: Option<PathBuf>,
    #[serde(default)]
    client_auth: Option<ClientAuth>,
    #[serde(default)]
    identity_from: Option<Vec<IdentityFrom>>,
    #[serde(default)]
    trust_forwarded: Vec<String>,
    #[serde(default)]
    h2c: bool,
    #[serde(default)]
    stream_window: Option<ByteSize>,
    #[serde(default)]
    connection_window: Option<ByteSize>,
    #[serde(default)]
    max_frame_size: Option<ByteSize>,
    #[serde(default)]
    max_header_list: Option<ByteSize>,
    #[serde(default)]
    max_streams: Option<u32>,
    #[serde(default)]
    keepalive: Option<crate::core::config::IdleTimeout>,
    #[serde(default, with = "humantime_serde")]
    keepalive_timeout: Option<Duration>,
    #[serde(default)]
    publish: Vec<RawPermit>,
    #[serde(default)]
    publish_ip: Option<std::net::IpAddr>,
    #[serde(default)]
    publish_via: Option<String>,
    #[serde(default)]
    max_published: Option<usize>,
}

/// The keys `kind: h2` has beside [`DoorSettings`]: the fields of `RawConfig`.
const OWN_KEYS: [&str; 18] = [
    "tls_cert",
    "tls_key",
    "client_ca",
    "client_auth",
    "identity_from",
    "trust_forwarded",
    "h2c",
    "stream_window",
    "connection_window",
    "max_frame_size",
    "max_header_list",
    "max_streams",
    "keepalive",
    "keepalive_timeout",
    "publish",
    "publish_ip",
    "publish_via",
    "max_published",
];

/// The shared key groups `kind: h2` takes: a handshake (TLS within 10 s)
/// and PROXY headers from load balancers. Identities come from client
/// certificates, not users.
const TAKES: DoorKeys = DoorKeys {
    handshake: Some(Duration::from_secs(10)),
    proxy_protocol: true,
    users: false,
};

/// HTTP/2 settings: ztunnel's defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct H2Limits {
    /// Initial flow-control window of each stream.
    pub stream_window: u32,
    /// Initial flow-control window of the connection.
    pub connection_window: u32,
    /// The largest frame we accept.
    pub max_frame_size: u32,
    /// The largest header list we accept.
    pub max_header_list: u32,
    /// Concurrent streams per connection.
    pub max_streams: u32,
    /// PING interval (`None`: no keep-alive).
    pub keepalive: Option<Duration>,
    /// How long a PING may go unanswered.
    pub keepalive_timeout: Duration,
}

impl Default for H2Limits {
    fn default() -> Self {
        H2Limits {
            stream_window: 4 << 20,
            connection_window: 16 << 20,
            max_frame_size: 1 << 20,
            max_header_list: 64 << 10,
            max_streams: 200,
            keepalive: Some(Duration::from_secs(10)),
            keepalive_timeout: Duration::from_secs(20),
        }
    }
}

/// The HTTP/2 keys a door or a link's document gives (absent: the default).
#[derive(Debug, Default)]
pub(super) struct LimitKeys {
    pub stream_window: Option<ByteSize>,
    pub connection_window: Option<ByteSize>,
    pub max_frame_size: Option<ByteSize>,
    pub max_header_list: Option<ByteSize>,
    pub max_streams: Option<u32>,
    pub keepalive: Option<crate::core::config::IdleTimeout>,
    pub keepalive_timeout: Option<Duration>,
}

impl H2Limits {
    /// Checks the keys: sizes within RFC 9113's bounds (frames of 2^14 to
    /// 2^24-1 bytes, windows up to 2^31-1), a connection window at least
    /// the stream window, timeouts above zero.
    pub(super) fn read(src: &str, k: LimitKeys) -> Result<H2Limits, ConfigError> {
        let d = H2Limits::default();
        let max_window = (1u64 << 31) - 1;
        let limits = H2Limits {
            stream_window: within(
                src,
                "stream_window",
                k.stream_window,
                d.stream_window,
                1 << 16,
                max_window,
            )?,
            connection_window: within(
                src,
                "connection_window",
                k.connection_window,
                d.connection_window,
                1 << 16,
                max_window,
            )?,
            max_frame_size: within(
                src,
                "max_frame_size",
                k.max_frame_size,
                d.max_frame_size,
                1 << 14,
                (1 << 24) - 1,
            )?,
            max_header_list: within(
                src,
                "max_header_list",
                k.max_header_list,
                d.max_header_list,
                1 << 10,
                1 << 20,
            )?,
            max_streams: k.max_streams.unwrap_or(d.max_streams),
            keepalive: match k.keepalive {
                None => d.keepalive,
                Some(crate::core::config::IdleTimeout::Off) => None,
                Some(crate::core::config::IdleTimeout::After(t)) => {
                    positive(src, "keepalive", t)?;
                    Some(t)
                }
            },
            keepalive_timeout: k.keepalive_timeout.unwrap_or(d.keepalive_timeout),
        };
        if limits.max_streams == 0 {
            return Err(ConfigError::key(src, "max_streams", "must be at least 1"));
        }
        positive(src, "keepalive_timeout", limits.keepalive_timeout)?;
        if limits.connection_window < limits.stream_window {
            return Err(ConfigError::key(
                src,
                "connection_window",
                format!(
                    "{} is smaller than stream_window ({}): one stream could stall the connection",
                    ByteSize(limits.connection_window.into()),
                    ByteSize(limits.stream_window.into())
                ),
            ));
        }
        Ok(limits)
    }
}

/// A checked h2 door config.
#[derive(Clone)]
pub struct H2Config {
    /// Where it listens, where flows route, timeouts, limits.
    pub door: DoorSettings,
    /// TLS and identities (no server config: `h2c`, plain text on loopback).
    pub tls: DoorTls,
    /// HTTP/2 settings.
    pub limits: H2Limits,
    /// Who may publish which ports here.
    pub publish: PublishRules,
}

/// A window or frame key in bytes: within `lo..=hi`.
fn within(
    src: &str,
    key: &str,
    v: Option<ByteSize>,
    default: u32,
    lo: u64,
    hi: u64,
) -> Result<u32, ConfigError> {
    let Some(ByteSize(n)) = v else {
        return Ok(default);
    };
    if n < lo || n > hi {
        return Err(ConfigError::key(
            src,
            key,
            format!(
                "{} is outside {} to {}",
                ByteSize(n),
                ByteSize(lo),
                ByteSize(hi)
            ),
        ));
    }
    Ok(n as u32)
}

impl H2Config {
    /// Parses and validates a `kind: h2` document (reading its certificate
    /// files: a reload takes new ones for new connections).
    pub fn from_document(doc: &Document) -> Result<Self, ConfigError> {
        let src = doc.source.as_str();
        let (door, raw): (DoorSettings, RawConfig) =
            DoorSettings::parse_taking(doc, TAKES, &OWN_KEYS)?;
        let limits = H2Limits::read(
            src,
            LimitKeys {
                stream_window: raw.stream_window,
                connection_window: raw.connection_window,
                max_frame_size: raw.max_frame_size,
                max_header_list: raw.max_header_list,
                max_streams: raw.max_streams,
                keepalive: raw.keepalive,
                keepalive_timeout: raw.keepalive_timeout,
            },
        )?;
        if raw.h2c && (door.exposed() || door.listen_via.is_some()) {
            return Err(ConfigError::key(
                src,
                "h2c",
                format!(
                    "plain-text HTTP/2 is only served on a loopback address, not {}{}: drop `h2c` and give `tls_cert` and `tls_key`",
                    door.listen,
                    door.listen_via.as_ref().map(|v| format!(" via {v}")).unwrap_or_default()
                ),
            ));
        }
        let tls = DoorTlsKeys {
            tls_cert: raw.tls_cert,
            tls_key: raw.tls_key,
            client_ca: raw.client_ca,
            client_auth: raw.client_auth,
            identity_from: raw.identity_from,
            trust_forwarded: raw.trust_forwarded,
        }
        .check(src, raw.h2c.then_some("h2c"), &[b"h2"])?;
        let publish = PublishKeys {
            publish: raw.publish,
            publish_ip: raw.publish_ip,
            publish_via: raw.publish_via,
            max_published: raw.max_published,
        }
        .check(src)?;
        if door.exposed() && tls.client_auth == ClientAuth::None {
            tracing::warn!(source = %doc.source, listen = %door.listen, "h2 door without client certificates on a non-loopback address: anyone who reaches it can use the tenant's routes");
        }
        Ok(H2Config {
            door,
            tls,
            limits,
            publish,
        })
    }

    /// The instances this door needs started first.
    pub fn depends_on(&self) -> Vec<String> {
        self.door.depends_on(self.publish.via.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn doc(v: serde_json::Value) -> Document {
        Document {
            source: "tenants/acme/h2.yaml".into(),
            value: v,
        }
    }

    #[test]
    fn checks_name_the_key() {
        let e = |v| H2Config::from_document(&doc(v)).err().unwrap();
        let err = e(json!({"kind": "h2", "listen": "0.0.0.0:15008", "h2c": true}));
        assert_eq!(err.key.as_deref(), Some("h2c"), "{err}");
        let err = e(json!({"kind": "h2", "listen": 15008}));
        assert_eq!(err.key.as_deref(), Some("tls_cert"), "{err}");
        let err = e(json!({"kind": "h2", "listen": 15008, "h2c": true, "max_frame_size": "16MiB"}));
        assert_eq!(err.key.as_deref(), Some("max_frame_size"), "{err}");
        assert!(err.message.contains("16MiB is outside 16KiB to"), "{err}");
        let err = e(
            json!({"kind": "h2", "listen": 15008, "h2c": true, "stream_window": "8MiB", "connection_window": "4MiB"}),
        );
        assert_eq!(err.key.as_deref(), Some("connection_window"), "{err}");
        let err = e(json!({"kind": "h2", "listen": 15008, "h2c": true, "trust_forwarded": ["x"]}));
        assert_eq!(err.key.as_deref(), Some("trust_forwarded"), "{err}");
        let err = e(json!({"kind": "h2", "listen": 15008, "h2c": true, "users": []}));
        assert!(err.message.contains("unknown field `users`"), "{err}");
        let ok = H2Config::from_document(&doc(
            json!({"kind": "h2", "listen": 15008, "h2c": true, "stream_window": "1MiB"}),
        ))
        .unwrap();
        assert_eq!(ok.limits.stream_window, 1 << 20);
        assert_eq!(ok.limits.connection_window, 16 << 20);
        assert!(ok.tls.server.is_none());
    }
}
