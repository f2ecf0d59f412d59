//! The policy's config document.

use configstore::Document;
use serde::Deserialize;

use crate::core::config::{parse_document, ConfigError};
use crate::core::spine::policy::{Action, DestMatch, PolicyDoc, ProtoMatch, Rule};

/// `kind: policy` (a tenant may have several; their rules are one set)
///
/// ```yaml
/// kind: policy
/// default: allow             # allow | deny: what no rule matches. With any
///                            # `allow` rule in the tenant, the rest is denied.
/// rules:
///   - name: no-metadata      # required, unique in the document; audit and
///                            # metrics name the rule that decided
///     action: deny           # allow | deny; a matching deny always wins
///     to: [169.254.0.0/16, "*.internal", db.corp]   # CIDR, IP, host, *.suffix
///   - name: alice-db
///     action: allow
///     doors: [socks-eu, http_proxy]   # on-ramp: module name or kind
///     identities: [alice]    # SOCKS/HTTP user, SSH key comment or principal,
///                            # WireGuard peer name; `*` = any identified client
///     from: [10.0.0.0/8]     # client source CIDRs
///     to: [10.1.0.0/16]
///     ports: [5432, "8000-8100"]
///     protocols: [tcp]       # tcp | udp | icmp | ip (any)
///     dry_run: true          # logged and counted, not enforced
/// limits:
///   max_flows: 1000          # flows the tenant may hold at once (default:
///                            # the node's `tenant_max_flows`, 65536); past
///                            # it new flows are denied and counted
/// ```
///
/// Every list is optional; an empty or absent list matches anything. A
/// host name rule matches the name the client asked for; a CIDR matches
/// the address dialed (after the name is resolved), so deny by CIDR.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    default: Option<RawAction>,
    #[serde(default)]
    rules: Vec<RawRule>,
    #[serde(default)]
    limits: Option<RawLimits>,
}

/// `limits:` the tenant's budgets.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    #[serde(default)]
    max_flows: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum RawAction {
    Allow,
    Deny,
}

/// A port (`443`) or a range (`"8000-8100"`); in `to:`, a number or a string.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
enum RawPort {
    One(u32),
    Range(String),
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: String,
    action: RawAction,
    #[serde(default)]
    dry_run: bool,
    #[serde(default)]
    doors: Vec<String>,
    #[serde(default)]
    identities: Vec<String>,
    #[serde(default)]
    from: Vec<String>,
    #[serde(default)]
    to: Vec<RawPort>,
    #[serde(default)]
    ports: Vec<RawPort>,
    #[serde(default)]
    protocols: Vec<String>,
}

fn port(s: &str) -> Result<u16, String> {
    match s.trim().parse::<u32>() {
        Ok(p) if (1..=65535).contains(&p) => Ok(p as u16),
        _ => Err(format!("`{s}`: expected a port 1-65535")),
    }
}

fn parse_port(p: &RawPort) -> Result<(u16, u16), String> {
    match p {
        RawPort::One(n) => port(&n.to_string()).map(|p| (p, p)),
        RawPort::Range(s) => {
            let (lo, hi) = match s.split_once('-') {
                Some((lo, hi)) => (port(lo)?, port(hi)?),
                None => {
                    let p = port(s)?;
                    (p, p)
                }
            };
            if lo > hi {
                return Err(format!("`{s}`: the range's start is above its end"));
            }
            Ok((lo, hi))
        }
    }
}

fn parse_dest(s: &str) -> Result<DestMatch, String> {
    let t = s.trim();
    if t == "*" {
        return Err("`*`: leave `to:` out to match every destination".into());
    }
    if let Some(suffix) = t.strip_prefix("*.") {
        if suffix.is_empty() || suffix.contains('*') {
            return Err(format!("`{s}`: expected *.suffix, e.g. *.corp.example"));
        }
        return Ok(DestMatch::Suffix(suffix.to_ascii_lowercase()));
    }
    if let Ok(n) = t.parse::<ipnet::IpNet>() {
        return Ok(DestMatch::Cidr(n.trunc()));
    }
    match crate::core::spine::dest::normalize_host(t) {
        crate::core::spine::dest::Host::Ip(ip) => Ok(DestMatch::Cidr(ipnet::IpNet::from(ip))),
        crate::core::spine::dest::Host::Name(n)
            if !n.is_empty()
                && n.split('.').all(|l| {
                    !l.is_empty()
                        && l.chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                }) =>
        {
            Ok(DestMatch::Host(n))
        }
        _ => Err(format!(
            "`{s}`: expected a CIDR, an IP address, a host name or *.suffix"
        )),
    }
}

fn parse_proto(s: &str) -> Result<ProtoMatch, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "tcp" => Ok(ProtoMatch::Tcp),
        "udp" => Ok(ProtoMatch::Udp),
        "icmp" => Ok(ProtoMatch::Icmp),
        "ip" | "any" => Ok(ProtoMatch::Ip),
        _ => Err(format!("`{s}`: expected tcp, udp, icmp or ip")),
    }
}

/// Parses and checks a `kind: policy` document.
pub fn from_document(doc: &Document) -> Result<PolicyDoc, ConfigError> {
    let raw: RawConfig = parse_document(doc, &["kind"])?;
    let src = &doc.source;
    let mut rules = Vec::with_capacity(raw.rules.len());
    let mut names = std::collections::HashSet::new();
    for (i, r) in raw.rules.iter().enumerate() {
        let key = |k: &str| format!("rules[{i}].{k}");
        let name = r.name.trim();
        if name.is_empty()
            || name.len() > 128
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '/'))
        {
            return Err(ConfigError::key(
                src,
                key("name"),
                format!(
                    "`{}`: expected 1-128 letters, digits, and - _ . : /",
                    r.name.escape_debug()
                ),
            ));
        }
        if !names.insert(name.to_string()) {
            return Err(ConfigError::key(
                src,
                key("name"),
                format!("`{name}` names two rules in this document"),
            ));
        }
        let list = |k: &str, items: &[String]| -> Result<Vec<String>, ConfigError> {
            items
                .iter()
                .enumerate()
                .map(|(j, v)| {
                    let v = v.trim();
                    if v.is_empty() {
                        Err(ConfigError::key(
                            src,
                            format!("{}[{j}]", key(k)),
                            "empty: expected a name",
                        ))
                    } else {
                        Ok(v.to_string())
                    }
                })
                .collect()
        };
        let sources = r
            .from
            .iter()
            .enumerate()
            .map(|(j, s)| {
                let t = s.trim();
                t.parse::<ipnet::IpNet>()
                    .map(|n| n.trunc())
                    .or_else(|_| t.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                    .map_err(|_| {
                        ConfigError::key(
                            src,
                            format!("{}[{j}]", key("from")),
                            format!("`{s}`: expected a CIDR or an IP address, e.g. 10.0.0.0/8"),
                        )
                    })
            })
            .collect::<Result<_, _>>()?;
        let destinations = r
            .to
            .iter()
            .map(|t| match t {
                RawPort::One(n) => n.to_string(),
                RawPort::Range(s) => s.clone(),
            })
            .enumerate()
            .map(|(j, s)| {
                parse_dest(&s).map_err(|m| ConfigError::key(src, format!("{}[{j}]", key("to")), m))
            })
            .collect::<Result<_, _>>()?;
        let ports = r
            .ports
            .iter()
            .enumerate()
            .map(|(j, p)| {
                parse_port(p)
                    .map_err(|m| ConfigError::key(src, format!("{}[{j}]", key("ports")), m))
            })
            .collect::<Result<_, _>>()?;
        let protocols = r
            .protocols
            .iter()
            .enumerate()
            .map(|(j, p)| {
                parse_proto(p)
                    .map_err(|m| ConfigError::key(src, format!("{}[{j}]", key("protocols")), m))
            })
            .collect::<Result<_, _>>()?;
        rules.push(Rule {
            name: name.to_string(),
            action: match r.action {
                RawAction::Allow => Action::Allow,
                RawAction::Deny => Action::Deny,
            },
            dry_run: r.dry_run,
            doors: list("doors", &r.doors)?,
            identities: list("identities", &r.identities)?,
            sources,
            destinations,
            ports,
            protocols,
        });
    }
    let max_flows = raw.limits.and_then(|l| l.max_flows);
    if max_flows == Some(0) {
        return Err(ConfigError::key(
            src,
            "limits.max_flows",
            "0: expected at least 1 (leave it out for the node's `tenant_max_flows`)",
        ));
    }
    Ok(PolicyDoc {
        default_deny: raw.default == Some(RawAction::Deny),
        rules,
        max_flows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(yaml: &str) -> Document {
        Document {
            source: "tenants/acme/policy.yaml".into(),
            value: serde_norway::from_str(yaml).unwrap(),
        }
    }

    #[test]
    fn a_full_document() {
        let p = from_document(&doc(
            "kind: policy\ndefault: deny\nrules:\n  - name: a\n    action: allow\n    doors: [socks]\n    identities: [alice]\n    from: [10.0.0.0/8, 192.0.2.1]\n    to: [10.1.0.0/16, '*.corp.example', db.corp, 2130706433]\n    ports: [5432, '8000-8100']\n    protocols: [tcp, UDP]\n    dry_run: true\n",
        ))
        .unwrap();
        assert!(p.default_deny);
        let r = &p.rules[0];
        assert_eq!(r.ports, vec![(5432, 5432), (8000, 8100)]);
        assert_eq!(
            r.destinations,
            vec![
                DestMatch::Cidr("10.1.0.0/16".parse().unwrap()),
                DestMatch::Suffix("corp.example".into()),
                DestMatch::Host("db.corp".into()),
                DestMatch::Cidr("127.0.0.1/32".parse().unwrap()),
            ]
        );
        assert!(r.dry_run);
        assert_eq!(p.max_flows, None);
        let limited = from_document(&doc("kind: policy\nlimits:\n  max_flows: 100\n")).unwrap();
        assert_eq!(limited.max_flows, Some(100));
    }

    #[test]
    fn errors_name_the_file_and_key() {
        for (yaml, want) in [
            (
                "rules:\n  - name: a\n    action: maybe\n",
                "rules[0].action",
            ),
            (
                "rules:\n  - name: a\n    action: deny\n    to: [10.0.0.0/33]\n",
                "rules[0].to[0]",
            ),
            (
                "rules:\n  - name: a\n    action: deny\n    ports: ['90-80']\n",
                "rules[0].ports[0]",
            ),
            (
                "rules:\n  - name: a\n    action: deny\n    ports: [70000]\n",
                "rules[0].ports[0]",
            ),
            (
                "rules:\n  - name: a\n    action: deny\n    protocols: [sctp]\n",
                "rules[0].protocols[0]",
            ),
            (
                "rules:\n  - name: a\n    action: deny\n    from: [nowhere]\n",
                "rules[0].from[0]",
            ),
            (
                "rules:\n  - name: a\n    action: deny\n  - name: a\n    action: allow\n",
                "rules[1].name",
            ),
            (
                "rules:\n  - name: \"a\\nb\"\n    action: deny\n",
                "rules[0].name",
            ),
            (
                "rules:\n  - name: a\n    action: deny\n    too: [x]\n",
                "rules[0].too",
            ),
            ("limits:\n  max_flows: 0\n", "limits.max_flows"),
            ("limits:\n  max_conns: 5\n", "limits.max_conns"),
        ] {
            let e = from_document(&doc(&format!("kind: policy\n{yaml}")))
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("tenants/acme/policy.yaml: key `"), "{e}");
            assert!(e.contains(&format!("`{want}`")), "{want}: {e}");
        }
    }
}
