//! The packet-filter rules that steer traffic into a `kind: capture`
//! listener, as shell lines for `iptables`/`ip6tables` (which drive
//! nftables on current systems) and `ip`. `meshgatectl capture rules`
//! prints them and, with `--apply`, runs them.
//!
//! Every rule lives in meshgate's own chain (`MESHGATE` in `nat`,
//! `MESHGATE_TPROXY` in `mangle`), reached by one jump from the hook chain:
//! applying again replaces the chain's rules, `--remove` takes the jump and
//! the chain away, and nothing else on the host is touched. Loopback
//! destinations are never captured, and meshgate's own connections are
//! kept out of the loop by the excluded user.

use super::config::Mode;

/// Whose traffic is steered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Connections arriving on an interface (a veth from an application's
    /// namespace, a bridge): `PREROUTING`.
    Iface(String),
    /// Connections made by a local user's processes: `OUTPUT`.
    Uid(u32),
    /// Connections made by the processes of a cgroup (v2 path): `OUTPUT`.
    Cgroup(String),
    /// Every connection made inside network namespace `NAME`, where
    /// meshgate runs too: `OUTPUT` of that namespace.
    Netns(String),
}

/// What to generate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleSpec {
    /// Whose traffic.
    pub scope: Scope,
    /// The capture listener's port.
    pub port: u16,
    /// REDIRECT or TPROXY.
    pub mode: Mode,
    /// The user meshgate runs as: its own connections are not captured.
    pub exclude_uid: Option<u32>,
    /// Generate the lines that remove the rules instead.
    pub remove: bool,
}

/// The mark and routing table TPROXY uses (`0x4d47` is "MG").
pub const TPROXY_MARK: &str = "0x4d47";
/// The routing table that delivers marked packets locally.
pub const TPROXY_TABLE: u32 = 4747;

fn check_name(what: &str, v: &str, max: usize) -> Result<(), String> {
    let ok = !v.is_empty()
        && v.len() <= max
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '@' | ':'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{v}` is not a valid {what} (1-{max} of letters, digits, _ - . @ :)"
        ))
    }
}

/// The shell lines for `spec`, in order.
pub fn commands(spec: &RuleSpec) -> Result<Vec<String>, String> {
    match &spec.scope {
        Scope::Iface(i) => check_name("interface name", i, 15)?,
        Scope::Netns(n) => check_name("namespace name", n, 64)?,
        Scope::Cgroup(p) => {
            if p.is_empty() || p.contains(['\'', '\n', ' ']) {
                return Err(format!("`{p}` is not a cgroup path"));
            }
        }
        Scope::Uid(_) => {}
    }
    if spec.port == 0 {
        return Err("--port must name the capture listener's port".into());
    }
    if spec.mode == Mode::Tproxy && !matches!(spec.scope, Scope::Iface(_)) {
        return Err("TPROXY steers connections arriving on an interface (--iface); for local processes (--uid, --cgroup, --netns) use --mode redirect".into());
    }
    // Rules on local processes (OUTPUT) must never catch meshgate's own
    // dials: they would come back to the capture listener, forever.
    if matches!(
        spec.scope,
        Scope::Netns(_) | Scope::Uid(_) | Scope::Cgroup(_)
    ) && spec.exclude_uid.is_none()
        && !spec.remove
    {
        return Err("rules for local processes (--uid, --cgroup, --netns) must exclude meshgate's own connections: give --exclude-uid with the user meshgate runs as (meshgatectl asks the node's admin API for it when it is reachable)".into());
    }
    if let (Scope::Uid(u), Some(x)) = (&spec.scope, spec.exclude_uid) {
        if *u == x {
            return Err(format!(
                "uid {u} is both captured and excluded: run meshgate as another user"
            ));
        }
    }
    let prefix = match &spec.scope {
        Scope::Netns(n) => format!("ip netns exec {n} "),
        _ => String::new(),
    };
    let mut out = Vec::new();
    for (tool, loopback, any) in [
        ("iptables", "127.0.0.0/8", "0.0.0.0/0"),
        ("ip6tables", "::1/128", "::/0"),
    ] {
        let t = format!("{prefix}{tool}");
        let (table, chain, hook) = match spec.mode {
            Mode::Redirect => (
                "nat",
                "MESHGATE",
                match &spec.scope {
                    Scope::Iface(_) => "PREROUTING",
                    _ => "OUTPUT",
                },
            ),
            Mode::Tproxy => ("mangle", "MESHGATE_TPROXY", "PREROUTING"),
        };
        let selector = match &spec.scope {
            // TPROXY takes UDP too: the chain picks the protocols.
            Scope::Iface(i) if spec.mode == Mode::Tproxy => format!("-i {i}"),
            Scope::Iface(i) => format!("-i {i} -p tcp"),
            Scope::Uid(u) => format!("-p tcp -m owner --uid-owner {u}"),
            Scope::Cgroup(p) => format!("-p tcp -m cgroup --path '{p}'"),
            Scope::Netns(_) => "-p tcp".to_string(),
        };
        let jump = format!("-t {table} {{}} {hook} {selector} -j {chain}");
        if spec.remove {
            out.push(format!(
                "{t} {} 2>/dev/null || true",
                jump.replace("{}", "-D")
            ));
            out.push(format!("{t} -t {table} -F {chain} 2>/dev/null || true"));
            out.push(format!("{t} -t {table} -X {chain} 2>/dev/null || true"));
            if spec.mode == Mode::Tproxy {
                let ip = if tool == "iptables" { "ip" } else { "ip -6" };
                out.push(format!("{prefix}{ip} rule del fwmark {TPROXY_MARK} lookup {TPROXY_TABLE} 2>/dev/null || true"));
                out.push(format!("{prefix}{ip} route del local {any} dev lo table {TPROXY_TABLE} 2>/dev/null || true"));
            }
            continue;
        }
        out.push(format!("{t} -t {table} -N {chain} 2>/dev/null || true"));
        out.push(format!("{t} -t {table} -F {chain}"));
        out.push(format!("{t} -t {table} -A {chain} -d {loopback} -j RETURN"));
        if let Some(x) = spec.exclude_uid {
            if hook == "OUTPUT" {
                out.push(format!(
                    "{t} -t {table} -A {chain} -m owner --uid-owner {x} -j RETURN"
                ));
            }
        }
        match spec.mode {
            Mode::Redirect => out.push(format!(
                "{t} -t {table} -A {chain} -p tcp -j REDIRECT --to-ports {}",
                spec.port
            )),
            Mode::Tproxy => {
                for proto in ["tcp", "udp"] {
                    out.push(format!(
                        "{t} -t {table} -A {chain} -p {proto} -j TPROXY --on-port {} --tproxy-mark {TPROXY_MARK}/0xffffffff",
                        spec.port
                    ));
                }
            }
        }
        out.push(format!(
            "{t} {} 2>/dev/null || {t} {}",
            jump.replace("{}", "-C"),
            jump.replace("{}", "-A")
        ));
        if spec.mode == Mode::Tproxy {
            let ip = if tool == "iptables" { "ip" } else { "ip -6" };
            out.push(format!("{prefix}{ip} rule show | grep -q 'fwmark {TPROXY_MARK} lookup {TPROXY_TABLE}' || {prefix}{ip} rule add fwmark {TPROXY_MARK} lookup {TPROXY_TABLE}"));
            out.push(format!(
                "{prefix}{ip} route replace local {any} dev lo table {TPROXY_TABLE}"
            ));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(scope: Scope, mode: Mode) -> RuleSpec {
        RuleSpec {
            scope,
            port: 15001,
            mode,
            exclude_uid: Some(999),
            remove: false,
        }
    }

    #[test]
    fn redirect_for_an_interface_and_a_user() {
        let l = commands(&spec(Scope::Iface("veth-app".into()), Mode::Redirect)).unwrap();
        assert!(
            l.contains(
                &"iptables -t nat -A MESHGATE -p tcp -j REDIRECT --to-ports 15001".to_string()
            ),
            "{l:#?}"
        );
        assert!(l
            .iter()
            .any(|x| x.contains("-A PREROUTING -i veth-app -p tcp -j MESHGATE")));
        assert!(l
            .iter()
            .any(|x| x.starts_with("ip6tables -t nat -A MESHGATE -d ::1/128")));
        // PREROUTING has no owner: the exclusion is only for OUTPUT.
        assert!(!l.iter().any(|x| x.contains("--uid-owner")));
        let l = commands(&spec(Scope::Uid(1000), Mode::Redirect)).unwrap();
        assert!(l
            .iter()
            .any(|x| x.contains("-A OUTPUT -p tcp -m owner --uid-owner 1000 -j MESHGATE")));
        assert!(l
            .iter()
            .any(|x| x.contains("-A MESHGATE -m owner --uid-owner 999 -j RETURN")));
        let l = commands(&spec(Scope::Netns("app".into()), Mode::Redirect)).unwrap();
        assert!(
            l.iter().all(|x| x.starts_with("ip netns exec app ")),
            "{l:#?}"
        );
    }

    #[test]
    fn tproxy_and_refusals() {
        let l = commands(&spec(Scope::Iface("eth1".into()), Mode::Tproxy)).unwrap();
        for proto in ["tcp", "udp"] {
            assert!(l.iter().any(|x| x.contains(&format!(
                "-p {proto} -j TPROXY --on-port 15001 --tproxy-mark 0x4d47/0xffffffff"
            ))));
        }
        assert!(l
            .iter()
            .any(|x| x == "ip route replace local 0.0.0.0/0 dev lo table 4747"));
        assert!(l
            .iter()
            .any(|x| x == "ip -6 route replace local ::/0 dev lo table 4747"));
        assert!(commands(&spec(Scope::Uid(1), Mode::Tproxy))
            .unwrap_err()
            .contains("--mode redirect"));
        for scope in [
            Scope::Netns("app".into()),
            Scope::Uid(1000),
            Scope::Cgroup("/app.slice".into()),
        ] {
            let mut s = spec(scope, Mode::Redirect);
            s.exclude_uid = None;
            assert!(commands(&s).unwrap_err().contains("--exclude-uid"));
        }
        assert!(commands(&spec(Scope::Iface("a;rm -rf /".into()), Mode::Redirect)).is_err());
        assert!(commands(&spec(Scope::Uid(999), Mode::Redirect)).is_err());
        let mut r = spec(Scope::Iface("eth1".into()), Mode::Tproxy);
        r.remove = true;
        let l = commands(&r).unwrap();
        assert!(l
            .iter()
            .any(|x| x.contains("-D PREROUTING -i eth1 -j MESHGATE_TPROXY")));
        assert!(l.iter().any(|x| x.contains("-X MESHGATE_TPROXY")));
    }
}
