//! Who may log in: OpenSSH `authorized_keys` files, with the options
//! meshgate honours, and the server's host key (made on first start).

use std::net::IpAddr;
use std::path::Path;

use crate::core::spine::reject::RejectReason;
use ipnet::IpNet;
use russh::keys::{HashAlg, PrivateKey, PublicKey};

/// A target a key may open (`permitopen="host:port"`, `*` for any port).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PermitOpen {
    /// The host, as written (compared case-insensitively).
    pub host: String,
    /// The port, `None` for `*`.
    pub port: Option<u16>,
}

/// One `authorized_keys` line.
#[derive(Debug, Clone)]
pub struct AuthorizedKey {
    /// The key.
    pub key: PublicKey,
    /// The flow identity: the line's comment, else the key's fingerprint.
    pub identity: String,
    /// `from="..."`: the networks the key may log in from (empty: any).
    pub from: Vec<IpNet>,
    /// Whether `-L`/`-W`/`-D` (direct-tcpip) is allowed.
    pub port_forwarding: bool,
    /// `permitopen=` entries (empty: any target the routes allow).
    pub permit_open: Vec<PermitOpen>,
    /// `permitlisten=` ports for `ssh -R` (empty: any; `None` in the list: `*`).
    pub permit_listen: Vec<Option<u16>>,
    /// `cert-authority`: the key signs user certificates; it never logs
    /// in itself.
    pub cert_authority: bool,
    /// `principals=` (with `cert-authority`): the principals accepted
    /// (empty: the login user name must be one of the certificate's).
    pub principals: Vec<String>,
}

/// Whether `a` and `b` are the same grant: the same key with the same
/// options (the identity a certificate login derives is not compared).
pub fn same_grant(a: &AuthorizedKey, b: &AuthorizedKey) -> bool {
    a.key == b.key
        && a.from == b.from
        && a.port_forwarding == b.port_forwarding
        && a.permit_open == b.permit_open
        && a.permit_listen == b.permit_listen
        && a.cert_authority == b.cert_authority
        && a.principals == b.principals
}

impl AuthorizedKey {
    /// Whether this key may be used from `addr`.
    pub fn allowed_from(&self, addr: IpAddr) -> bool {
        let addr = addr.to_canonical();
        self.from.is_empty() || self.from.iter().any(|n| n.contains(&addr))
    }

    /// Whether this key may publish a remote forward on `port` (0: any
    /// port the gateway picks).
    pub fn may_listen(&self, port: u16) -> bool {
        self.port_forwarding
            && (self.permit_listen.is_empty()
                || self
                    .permit_listen
                    .iter()
                    .any(|p| p.is_none_or(|x| x == port)))
    }

    /// Whether this key may open `host:port`.
    pub fn may_open(&self, host: &str, port: u16) -> bool {
        self.port_forwarding
            && (self.permit_open.is_empty()
                || self
                    .permit_open
                    .iter()
                    .any(|p| p.host.eq_ignore_ascii_case(host) && p.port.is_none_or(|x| x == port)))
    }
}

/// Splits `name="value"` or `name`.
fn option(opt: &str) -> (String, Option<String>) {
    match opt.split_once('=') {
        Some((n, v)) => (
            n.to_ascii_lowercase(),
            Some(v.trim_matches('"').to_string()),
        ),
        None => (opt.to_ascii_lowercase(), None),
    }
}

/// Splits a line into its options (commas outside quotes) and the key
/// (`type base64 [comment]`). A line has options when its first field is
/// not a key type, as OpenSSH reads it.
fn split_options(line: &str) -> (Vec<&str>, &str) {
    let is_key_type =
        |t: &str| t.starts_with("ssh-") || t.starts_with("ecdsa-") || t.starts_with("sk-");
    let first_end = {
        let mut quoted = false;
        line.char_indices()
            .find(|(_, c)| {
                if *c == '"' {
                    quoted = !quoted;
                }
                c.is_whitespace() && !quoted
            })
            .map(|(i, _)| i)
            .unwrap_or(line.len())
    };
    let first = &line[..first_end];
    if is_key_type(first) {
        return (Vec::new(), line);
    }
    let mut opts = Vec::new();
    let (mut start, mut quoted) = (0, false);
    for (i, c) in first.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => {
                opts.push(&first[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    opts.push(&first[start..]);
    (opts, line[first_end..].trim_start())
}

/// Parses an `authorized_keys` file. An option meshgate cannot honour is an
/// error naming the line, never silently ignored.
pub fn parse_authorized_keys(text: &str) -> Result<Vec<AuthorizedKey>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (opts, key_text) = split_options(line);
        let key = PublicKey::from_openssh(key_text)
            .map_err(|e| format!("line {n}: not an authorized_keys entry: {e}"))?;
        let comment = key.comment().as_str_lossy().trim().to_string();
        let identity = if comment.is_empty() {
            key.fingerprint(HashAlg::Sha256).to_string()
        } else {
            comment
        };
        let mut ak = AuthorizedKey {
            key,
            identity,
            from: Vec::new(),
            port_forwarding: true,
            permit_open: Vec::new(),
            permit_listen: Vec::new(),
            cert_authority: false,
            principals: Vec::new(),
        };
        let mut restrict = false;
        let mut reenable_forwarding = false;
        for opt in opts {
            let (name, value) = option(opt);
            match (name.as_str(), value) {
                ("restrict", None) => restrict = true,
                ("cert-authority", None) => ak.cert_authority = true,
                ("principals", Some(v)) => {
                    ak.principals = v.split(',').map(|p| p.trim().to_string()).filter(|p| !p.is_empty()).collect();
                }
                ("no-port-forwarding", None) => ak.port_forwarding = false,
                ("port-forwarding", None) => reenable_forwarding = true,
                ("no-pty" | "no-agent-forwarding" | "no-x11-forwarding" | "no-user-rc", None) => {}
                ("from", Some(v)) => {
                    for p in v.split(',') {
                        let p = p.trim();
                        let net = p
                            .parse::<IpNet>()
                            .or_else(|_| p.parse::<IpAddr>().map(IpNet::from))
                            .map_err(|_| {
                                format!("line {n}: from=\"{p}\": meshgate takes IP addresses and CIDRs here (no host name patterns)")
                            })?;
                        ak.from.push(net);
                    }
                }
                ("permitopen", Some(v)) => {
                    let (host, port) = v.rsplit_once(':').ok_or_else(|| {
                        format!("line {n}: permitopen=\"{v}\": expected host:port")
                    })?;
                    let port = match port {
                        "*" => None,
                        p => Some(p.parse::<u16>().map_err(|_| {
                            format!("line {n}: permitopen=\"{v}\": bad port `{p}`")
                        })?),
                    };
                    ak.permit_open.push(PermitOpen {
                        host: host.trim_matches(['[', ']']).to_string(),
                        port,
                    });
                }
                ("permitlisten", Some(v)) => {
                    // `port` or `host:port`; the gateway decides the host.
                    let port = v.rsplit_once(':').map_or(v.as_str(), |(_, p)| p);
                    ak.permit_listen.push(match port {
                        "*" => None,
                        p => Some(p.parse::<u16>().map_err(|_| {
                            format!("line {n}: permitlisten=\"{v}\": bad port `{p}`")
                        })?),
                    });
                }
                (other, _) => {
                    return Err(format!(
                        "line {n}: option `{other}` is not supported by meshgate (supported: cert-authority, principals=, restrict, from=, permitopen=, permitlisten=, no-port-forwarding, port-forwarding, no-pty, no-agent-forwarding, no-X11-forwarding, no-user-rc)"
                    ))
                }
            }
        }
        if restrict && !reenable_forwarding {
            ak.port_forwarding = false;
        }
        if !ak.principals.is_empty() && !ak.cert_authority {
            return Err(format!(
                "line {n}: principals= applies to cert-authority lines only"
            ));
        }
        out.push(ak);
    }
    Ok(out)
}

/// Checks a user certificate against the `cert-authority` lines of
/// `keys`, at `now` (Unix seconds), for login name `user` from `peer`.
/// Returns the line's settings with the identity set to the principal, or
/// the reason for the refusal (a metric label).
pub fn check_certificate(
    keys: &[AuthorizedKey],
    cert: &russh::keys::Certificate,
    user: &str,
    peer: IpAddr,
    now: u64,
) -> Result<AuthorizedKey, RejectReason> {
    use russh::keys::ssh_key::certificate::CertType;
    let ca = keys
        .iter()
        .find(|k| k.cert_authority && k.key.key_data() == cert.signature_key())
        .ok_or(RejectReason::CertUnknownCa)?;
    if cert.cert_type() != CertType::User {
        return Err(RejectReason::CertInvalid);
    }
    let fp = ca.key.fingerprint(HashAlg::Sha256);
    if cert.validate_at(now, [&fp]).is_err() {
        // Signature and CA were checked first; what is left is the time.
        return Err(if cert.valid_before() <= now || cert.valid_after() > now {
            RejectReason::CertExpired
        } else {
            RejectReason::CertInvalid
        });
    }
    if !ca.allowed_from(peer) {
        return Err(RejectReason::FromNotAllowed);
    }
    for (name, value) in cert.critical_options().iter() {
        match name.as_str() {
            // meshgate runs no commands: nothing to force.
            "force-command" => {}
            "source-address" => {
                let ok = value.split(',').any(|p| {
                    let p = p.trim();
                    p.parse::<IpNet>()
                        .map(|n| n.contains(&peer.to_canonical()))
                        .or_else(|_| p.parse::<IpAddr>().map(|a| a == peer.to_canonical()))
                        .unwrap_or(false)
                });
                if !ok {
                    return Err(RejectReason::FromNotAllowed);
                }
            }
            _ => return Err(RejectReason::CertInvalid),
        }
    }
    let principals = cert.valid_principals();
    let principal = if ca.principals.is_empty() {
        principals.iter().find(|p| *p == user)
    } else {
        principals.iter().find(|p| ca.principals.contains(p))
    }
    .ok_or(RejectReason::CertPrincipal)?;
    let mut out = ca.clone();
    out.identity = principal.clone();
    // Extensions grant, as OpenSSH reads them: a certificate without
    // `permit-port-forwarding` (`ssh-keygen -O clear`) forwards nothing.
    out.port_forwarding =
        ca.port_forwarding && cert.extensions().contains_key("permit-port-forwarding");
    Ok(out)
}

/// The key at `path` (a host key, a link's own key: `what`), made
/// (Ed25519, mode 0600) if there is none yet.
pub fn load_or_create_key(path: &Path, what: &str) -> Result<PrivateKey, String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if path.exists() {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let key = PrivateKey::from_openssh(text.as_bytes())
            .map_err(|e| format!("{} is not an OpenSSH private key: {e}", path.display()))?;
        if key.is_encrypted() {
            // Accepted, it would fail every handshake later with a message
            // about the key's algorithm; meshgate has nobody to ask.
            return Err(format!(
                "{} is protected by a passphrase, which meshgate cannot ask for: remove it with `ssh-keygen -p -N '' -f {}`",
                path.display(),
                path.display()
            ));
        }
        return Ok(key);
    }
    let mut seed = [0u8; 32];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut seed);
    let pair = russh::keys::ssh_key::private::Ed25519Keypair::from_seed(&seed);
    let key = PrivateKey::from(pair);
    let text = key
        .to_openssh(russh::keys::ssh_key::LineEnding::LF)
        .map_err(|e| format!("cannot encode the host key: {e}"))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    f.write_all(text.as_bytes())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    tracing::info!(path = %path.display(), fingerprint = %key.fingerprint(HashAlg::Sha256), "{what} created");
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl";

    #[test]
    fn options_are_honoured_or_refused() {
        let keys = parse_authorized_keys(&format!(
            "# comment\n{KEY} alice@laptop\nrestrict,permitopen=\"nginx:80\",permitopen=\"10.1.0.10:*\",port-forwarding,from=\"10.0.0.0/8,192.0.2.7\" {KEY} bob\nno-port-forwarding {KEY}\n"
        ))
        .unwrap();
        assert_eq!(keys.len(), 3);
        assert_eq!(keys[0].identity, "alice@laptop");
        assert!(keys[0].may_open("anything", 1));
        let bob = &keys[1];
        assert!(bob.may_open("NGINX", 80) && !bob.may_open("nginx", 81));
        assert!(bob.may_open("10.1.0.10", 5432));
        assert!(bob.allowed_from("10.9.9.9".parse().unwrap()));
        assert!(bob.allowed_from("::ffff:192.0.2.7".parse().unwrap()));
        assert!(!bob.allowed_from("192.0.2.8".parse().unwrap()));
        assert!(keys[2].identity.starts_with("SHA256:"));
        assert!(!keys[2].may_open("nginx", 80));
        let l = parse_authorized_keys(&format!(
            "permitlisten=\"8081\",permitlisten=\"localhost:9000\" {KEY} x\n"
        ))
        .unwrap();
        assert!(l[0].may_listen(8081) && l[0].may_listen(9000) && !l[0].may_listen(0));
        assert!(keys[0].may_listen(0), "no permitlisten: any port");
        assert!(!keys[2].may_listen(8081), "no-port-forwarding covers -R");
        let restricted = parse_authorized_keys(&format!("restrict {KEY} x\n")).unwrap();
        assert!(!restricted[0].may_open("nginx", 80));
        for (line, want) in [
            (format!("command=\"ls\" {KEY}"), "line 1: option `command`"),
            (
                format!("from=\"*.example.com\" {KEY}"),
                "no host name patterns",
            ),
            (format!("permitopen=\"nginx\" {KEY}"), "expected host:port"),
            (
                "ssh-ed25519 garbage".to_string(),
                "line 1: not an authorized_keys entry",
            ),
        ] {
            let e = parse_authorized_keys(&line).unwrap_err();
            assert!(e.contains(want), "{line}: {e}");
        }
    }

    #[test]
    fn host_key_is_made_once_with_mode_0600() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("keys/host");
        let a = load_or_create_key(&p, "SSH host key").unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let b = load_or_create_key(&p, "SSH host key").unwrap();
        assert_eq!(a.public_key(), b.public_key());
    }
}
