//! Importing wg-quick configs (`/etc/wireguard/wg0.conf`) as module documents.
//!
//! `[Interface]` `PrivateKey`, `ListenPort`, `Address`, `MTU` and every
//! `[Peer]`'s `PublicKey`, `PresharedKey`, `AllowedIPs`, `Endpoint`,
//! `PersistentKeepalive` carry over. Keys meshgate has no use for (`DNS`,
//! `Table`, `PostUp`, ...) are reported as warnings: meshgate runs no
//! commands and touches no host routing. Peers are named `peer-1`,
//! `peer-2`, ... unless a `# Name = x` comment precedes their section's keys.

use serde_json::{json, Map, Value};

/// The document, plus warnings about what was left out.
#[derive(Debug)]
pub struct Imported {
    /// A `kind: wireguard` document.
    pub document: Value,
    /// One line per ignored key.
    pub warnings: Vec<String>,
}

fn list(v: &str) -> Vec<Value> {
    v.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| Value::String(s.to_string()))
        .collect()
}

fn number(line: usize, key: &str, v: &str) -> Result<Value, String> {
    v.parse::<u64>().map(Value::from).map_err(|_| {
        format!("line {line}: {key}: expected a number (the value is not shown: it may be a key)")
    })
}

/// Parses wg-quick text.
pub fn import(text: &str) -> Result<Imported, String> {
    let mut iface = Map::new();
    iface.insert("kind".into(), json!("wireguard"));
    let mut peers: Vec<Map<String, Value>> = Vec::new();
    let mut warnings = Vec::new();
    #[derive(PartialEq)]
    enum Section {
        None,
        Interface,
        Peer,
    }
    let mut section = Section::None;
    for (i, raw) in text.lines().enumerate() {
        let line_no = i + 1;
        let line = raw.trim();
        if let Some(comment) = line.strip_prefix('#') {
            if section == Section::Peer {
                if let Some((k, v)) = comment.split_once('=') {
                    if k.trim().eq_ignore_ascii_case("name") {
                        let p = peers.last_mut().expect("in a peer section");
                        p.insert("name".into(), json!(v.trim()));
                    }
                }
            }
            continue;
        }
        if line.is_empty() {
            continue;
        }
        if line.eq_ignore_ascii_case("[interface]") {
            section = Section::Interface;
            continue;
        }
        if line.eq_ignore_ascii_case("[peer]") {
            section = Section::Peer;
            peers.push(Map::new());
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .map(|(k, v)| (k.trim(), v.trim()))
            .ok_or_else(|| {
                format!("line {line_no}: expected `Key = Value` (the line is not shown: it may hold a key)")
            })?;
        let key = k.to_ascii_lowercase();
        match (&section, key.as_str()) {
            (Section::None, _) => {
                return Err(format!("line {line_no}: `{k}` before any [Interface] or [Peer] section"))
            }
            (Section::Interface, "privatekey") => {
                iface.insert("private_key".into(), json!(v));
            }
            (Section::Interface, "listenport") => {
                iface.insert("listen_port".into(), number(line_no, k, v)?);
            }
            (Section::Interface, "address") => {
                iface.insert("address".into(), Value::Array(list(v)));
            }
            (Section::Interface, "mtu") => {
                iface.insert("mtu".into(), number(line_no, k, v)?);
            }
            (Section::Peer, k2) => {
                let p = peers.last_mut().expect("in a peer section");
                match k2 {
                    "publickey" => p.insert("public_key".into(), json!(v)),
                    "presharedkey" => p.insert("preshared_key".into(), json!(v)),
                    "allowedips" => p.insert("allowed_ips".into(), Value::Array(list(v))),
                    "endpoint" => p.insert("endpoint".into(), json!(v)),
                    "persistentkeepalive" => {
                        let n = if v.eq_ignore_ascii_case("off") {
                            json!(0)
                        } else {
                            number(line_no, k, v)?
                        };
                        p.insert("persistent_keepalive".into(), n)
                    }
                    _ => {
                        warnings.push(format!("line {line_no}: [Peer] {k} is not supported; ignored"));
                        None
                    }
                };
            }
            (Section::Interface, _) => warnings.push(format!(
                "line {line_no}: [Interface] {k} ignored: meshgate runs no commands and changes no host routing or DNS"
            )),
        }
    }
    if !iface.contains_key("private_key") {
        return Err("no PrivateKey in [Interface]".into());
    }
    if !iface.contains_key("address") {
        return Err("no Address in [Interface]: meshgate needs this node's VPN address".into());
    }
    let mut out = Vec::new();
    for (i, mut p) in peers.into_iter().enumerate() {
        if !p.contains_key("public_key") {
            return Err(format!("[Peer] #{}: no PublicKey", i + 1));
        }
        if !p.contains_key("name") {
            p.insert("name".into(), json!(format!("peer-{}", i + 1)));
        }
        // Put the name first for readability.
        let mut ordered = Map::new();
        ordered.insert("name".into(), p.remove("name").expect("set above"));
        ordered.extend(p);
        out.push(Value::Object(ordered));
    }
    iface.insert("peers".into(), Value::Array(out));
    Ok(Imported {
        document: Value::Object(iface),
        warnings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use configstore::Document;

    const CONF: &str = "[Interface]
# a comment
PrivateKey = yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=
ListenPort = 51820
Address = 10.0.0.1/24, fd00::1/64
DNS = 1.1.1.1
PostUp = iptables -A FORWARD -i %i -j ACCEPT

[Peer]
# Name = laptop
PublicKey = xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=
AllowedIPs = 10.0.0.2/32
Endpoint = 192.0.2.7:51820
PersistentKeepalive = 25

[Peer]
PublicKey = TrMvSoP4jYQlY6RIzBgbssQqY3vxI2Pi+y71lOWWXX0=
AllowedIPs = 10.0.0.3/32, 10.5.0.0/16
";

    #[test]
    fn imports_and_validates() {
        let imp = import(CONF).unwrap();
        let d = &imp.document;
        assert_eq!(d["listen_port"], 51820);
        assert_eq!(d["address"][1], "fd00::1/64");
        assert_eq!(d["peers"][0]["name"], "laptop");
        assert_eq!(d["peers"][1]["name"], "peer-2");
        assert_eq!(d["peers"][1]["allowed_ips"][1], "10.5.0.0/16");
        assert_eq!(imp.warnings.len(), 2);
        assert!(imp.warnings[1].contains("PostUp"));
        // The result is a valid module document.
        let doc = Document {
            source: "imported".into(),
            value: imp.document.clone(),
        };
        let cfg = super::super::WireGuardConfig::from_document(&doc).unwrap();
        assert_eq!(cfg.peers.len(), 2);
    }

    #[test]
    fn errors_point_at_lines() {
        assert!(import("PrivateKey = x").unwrap_err().contains("line 1"));
        // A malformed line holding a key is never echoed.
        let secret = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";
        let e = import(&format!("[Interface]\nPrivateKey {secret}\n")).unwrap_err();
        assert!(!e.contains(secret), "{e}");
        let e = import(&format!("[Interface]\nListenPort = {secret}\n")).unwrap_err();
        assert!(!e.contains(secret), "{e}");
        assert!(import("[Interface]\nListenPort = abc\n")
            .unwrap_err()
            .contains("line 2"));
        assert!(import("[Interface]\nAddress = 10.0.0.1/24\n")
            .unwrap_err()
            .contains("PrivateKey"));
        assert!(import("[Interface]\ngarbage\n")
            .unwrap_err()
            .contains("Key = Value"));
    }
}
