//! Why a client was refused before (or instead of) a dial: the closed
//! vocabulary of `meshgate_rejected_total{reason}`. Every door counts its
//! refusals here, so the label values are one documented list (the README's
//! metrics section is checked against [`RejectReason::ALL`]) and a typo is
//! a compile error, not a new series.

use std::fmt;

macro_rules! reasons {
    ($($(#[$doc:meta])* $variant:ident => $label:literal,)*) => {
        /// Why a client, a session, a request or a datagram was refused.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum RejectReason {
            $($(#[$doc])* $variant,)*
        }

        impl RejectReason {
            /// Every reason, in the order the README lists them.
            pub const ALL: &'static [RejectReason] = &[$(RejectReason::$variant,)*];

            /// The metric label.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(RejectReason::$variant => $label,)*
                }
            }
        }
    };
}

reasons! {
    // Admission: before a client says anything.
    /// The on-ramp's `max_connections` are all in use.
    MaxConnections => "max_connections",
    /// A trusted load balancer's connection had no valid PROXY header.
    ProxyProtocol => "proxy_protocol",
    /// Too many clients still in their handshake (`max_startups`).
    MaxStartups => "max_startups",
    /// Too many clients from one address still in their handshake.
    PerSourceMaxStartups => "per_source_max_startups",
    /// The handshake (or login) took longer than `handshake_timeout`.
    HandshakeTimeout => "handshake_timeout",
    /// An SSH session ended before authenticating.
    Unauthenticated => "unauthenticated",
    /// A TLS handshake that failed: no or an untrusted client certificate
    /// where one is required, no protocol in common, not TLS.
    TlsHandshake => "tls_handshake",
    // Authentication.
    /// No credentials where the door requires them (HTTP 407).
    AuthRequired => "auth_required",
    /// Credentials that do not match, or none of the offered methods.
    AuthFailed => "auth_failed",
    /// A user name the door does not know.
    UnknownUser => "unknown_user",
    /// A known user with the wrong password.
    BadPassword => "bad_password",
    /// No identity where the door requires one (HTTP/2 CONNECT: 401).
    IdentityRequired => "identity_required",
    /// A user asking for a vnet it may not use.
    VnetNotAllowed => "vnet_not_allowed",
    /// SSH password authentication (never accepted).
    Password => "password",
    /// No SOCKS authentication method the door accepts.
    NoAcceptableMethod => "no_acceptable_method",
    /// An SSH key the door does not know.
    UnknownKey => "unknown_key",
    /// An SSH key removed from the door while its session was open.
    KeyRevoked => "key_revoked",
    /// An SSH certificate from a CA the door does not trust.
    CertUnknownCa => "cert_unknown_ca",
    /// An SSH certificate that does not verify or is not a user certificate.
    CertInvalid => "cert_invalid",
    /// An SSH certificate outside its validity period.
    CertExpired => "cert_expired",
    /// An SSH certificate without a principal the door maps.
    CertPrincipal => "cert_principal",
    /// An SSH key or certificate used from an address its `from=` excludes.
    FromNotAllowed => "from_not_allowed",
    // Requests.
    /// A malformed request, message or datagram.
    BadRequest => "bad_request",
    /// A SOCKS command the door does not carry (BIND).
    CommandNotSupported => "command_not_supported",
    /// A SOCKS address type the door does not know.
    AddressTypeNotSupported => "address_type_not_supported",
    /// A SOCKS4 request the door refused.
    Socks4Refused => "socks4_refused",
    /// An `ssh -R` port outside the key's `permitlisten`.
    PermitListen => "permitlisten",
    /// An `ssh -L`/`-W` destination outside the key's `permitopen`.
    PermitOpen => "permitopen",
    /// SSH forwarding by a key without `port_forwarding`.
    ForwardingDisabled => "forwarding_disabled",
    /// Unix-socket forwarding on an SSH door without `streamlocal_dir`.
    StreamlocalDisabled => "streamlocal_disabled",
    /// A Unix-socket path outside the door's `streamlocal_dir`.
    StreamlocalPath => "streamlocal_path",
    /// More channels in one SSH session than `max_channels`.
    MaxChannels => "max_channels",
    /// More `ssh -R` listeners in one session than `max_remote_forwards`.
    MaxRemoteForwards => "max_remote_forwards",
    /// An `ssh -R` listener that could not be bound.
    RemoteForwardBind => "remote_forward_bind",
    /// An `ssh -R` publishing a name another session holds.
    NameTaken => "name_taken",
    // Policy.
    /// The policy (a flow-start hook) denied the flow.
    Denied => "denied",
    /// A policy change ended an open flow.
    PolicyRevoked => "policy_revoked",
    // Datagrams.
    /// A UDP session's queue was full: the datagram was dropped.
    UdpQueueFull => "udp_queue_full",
    /// A SOCKS UDP association asked for more destinations than allowed.
    UdpTooManyDestinations => "udp_too_many_destinations",
    /// A datagram to a SOCKS UDP relay from an address not its client's.
    UdpForeignSource => "udp_foreign_source",
    /// A fragmented SOCKS UDP datagram (not carried).
    UdpFragment => "udp_fragment",
    /// A SOCKS UDP association whose relay address could not be named.
    UdpNoRelayAddress => "udp_no_relay_address",
    /// A captured connection whose original destination is not captured.
    NotCaptured => "not_captured",
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_distinct_snake_case() {
        let mut seen = std::collections::HashSet::new();
        for r in RejectReason::ALL {
            let l = r.as_str();
            assert!(seen.insert(l), "{l} twice");
            assert!(
                l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
                "{l}"
            );
        }
        assert!(seen.len() > 30);
    }
}
