//! The SSH door's and links' metrics, registered under `meshgate_ssh_`
//! once per node: sessions (logins) per identity, and channels per identity
//! and type. Refusals (auth failures by reason) are the core's
//! `meshgate_rejected_total{reason}`; bytes are the flows'.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::core::metrics::{registered, Subsystem};

/// `tenant`, `instance`, `identity`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IdentityLabels {
    /// Tenant name.
    pub tenant: String,
    /// The door's (or link's) instance name.
    pub instance: String,
    /// The key's identity (its comment, or a certificate's principal).
    pub identity: String,
}

/// `tenant`, `instance`, `identity`, `type`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ChannelLabels {
    /// Tenant name.
    pub tenant: String,
    /// The door's instance name.
    pub instance: String,
    /// The key's identity.
    pub identity: String,
    /// `session`, `direct-tcpip`, `forwarded-tcpip`, `tcpip-forward`,
    /// `streamlocal-forward` or `forwarded-streamlocal`.
    pub r#type: String,
}

/// The SSH families of the node.
pub struct SshMetrics {
    /// Logins, per identity.
    pub sessions: Family<IdentityLabels, Counter>,
    /// Channels (and `ssh -R` forwards) opened, per identity and type.
    pub channels: Family<ChannelLabels, Counter>,
}

impl Subsystem for SshMetrics {
    const PREFIX: &'static str = "ssh";

    fn register(registry: &mut Registry) -> Self {
        SshMetrics {
            sessions: registered(registry, "sessions", "SSH logins, per identity"),
            channels: registered(
                registry,
                "channels",
                "SSH channels and remote forwards opened, per identity and type",
            ),
        }
    }
}

impl SshMetrics {
    /// Counts a login.
    pub fn session(&self, tenant: &str, instance: &str, identity: &str) {
        self.sessions
            .get_or_create(&IdentityLabels {
                tenant: tenant.into(),
                instance: instance.into(),
                identity: identity.into(),
            })
            .inc();
    }

    /// Counts a channel of `kind`.
    pub fn channel(&self, tenant: &str, instance: &str, identity: &str, kind: &str) {
        self.channels
            .get_or_create(&ChannelLabels {
                tenant: tenant.into(),
                instance: instance.into(),
                identity: identity.into(),
                r#type: kind.into(),
            })
            .inc();
    }
}
