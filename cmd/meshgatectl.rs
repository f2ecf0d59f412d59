//! `meshgatectl`: the operator's CLI.
//!
//! ```text
//! meshgatectl genkey                 # a private key, as `wg genkey` prints it
//! meshgatectl pubkey < private.key   # its public key, as `wg pubkey` prints it
//! meshgatectl check DIR              # validate a config directory
//! meshgatectl status                 # node and module table from the admin API
//! meshgatectl flows [--tenant T]     # live flows from the admin API
//! meshgatectl wg show [TENANT]       # WireGuard interfaces, in the layout of `wg show`
//! meshgatectl import wg-quick FILE   # a wg-quick config as a module document
//! meshgatectl capture rules --iface veth-app --port 15001 [--mode tproxy] [--apply]
//! ```

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use meshgate::core::keys::PrivateKey;
use meshgate::core::node;
use serde_json::Value;

/// meshgatectl: keys, config checks and status for meshgate.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// Admin API address of the node to talk to.
    #[arg(
        long,
        global = true,
        env = "MESHGATE_ADMIN",
        default_value = "127.0.0.1:9000"
    )]
    admin: String,
    /// A file holding the node's admin token (`admin_token` in its
    /// meshgate.yaml), sent as `Authorization: Bearer`. MESHGATE_ADMIN_TOKEN
    /// gives the token itself.
    #[arg(
        long,
        global = true,
        env = "MESHGATE_ADMIN_TOKEN_FILE",
        value_name = "FILE"
    )]
    admin_token_file: Option<std::path::PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

/// The admin token requests carry, if one was given.
static ADMIN_TOKEN: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();

/// Reads the admin token from `--admin-token-file` or MESHGATE_ADMIN_TOKEN.
fn load_admin_token(file: Option<&std::path::Path>) -> Result<()> {
    let token = match file {
        Some(f) => Some(
            std::fs::read_to_string(f)
                .with_context(|| format!("--admin-token-file {}", f.display()))?
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string(),
        ),
        None => std::env::var("MESHGATE_ADMIN_TOKEN").ok(),
    };
    let _ = ADMIN_TOKEN.set(token.filter(|t| !t.is_empty()));
    Ok(())
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Print a new private key (base64, as `wg genkey`).
    Genkey,
    /// Read a private key on stdin, print its public key (as `wg pubkey`).
    Pubkey,
    /// Validate a config directory; exits non-zero with every error found.
    Check {
        /// The config directory.
        dir: PathBuf,
    },
    /// Show the node and its module instances.
    Status {
        /// Print the raw JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// WireGuard interfaces.
    Wg {
        #[command(subcommand)]
        cmd: WgCmd,
    },
    /// Convert other tools' configs into module documents (printed as YAML).
    Import {
        #[command(subcommand)]
        what: ImportCmd,
    },
    /// Transparent capture (`kind: capture`).
    Capture {
        #[command(subcommand)]
        cmd: CaptureCmd,
    },
    /// Tenants' policies (`kind: policy`).
    Policy {
        #[command(subcommand)]
        cmd: PolicyCmd,
    },
    /// Check a config directory as `check` does, then write it to etcd in
    /// one transaction (all or nothing; what the directory no longer has is
    /// deleted). DIR/tenants/... as for a node; DIR/nodes/NAME.yaml are the
    /// fleet's node documents.
    Apply {
        /// The config directory.
        dir: PathBuf,
        /// The store: etcd://HOST:2379/PREFIX.
        #[arg(long, alias = "store", env = "MESHGATE_STORE")]
        etcd: String,
        /// Show what would change, write nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Drain a node of a fleet: the tenants it holds with `replicas` move
    /// to other eligible nodes and it runs nothing from `tenants/` until
    /// `undrain` (feature `etcd`).
    Drain {
        /// The node's name.
        node: String,
        /// The store: etcd://HOST:2379/PREFIX.
        #[arg(long, env = "MESHGATE_STORE")]
        store: String,
    },
    /// Undo `drain`: the node takes tenants again (those that moved away
    /// stay where they are).
    Undrain {
        /// The node's name.
        node: String,
        /// The store: etcd://HOST:2379/PREFIX.
        #[arg(long, env = "MESHGATE_STORE")]
        store: String,
    },
    /// A fleet of nodes sharing an etcd store (feature `etcd`).
    Fleet {
        #[command(subcommand)]
        cmd: FleetCmd,
    },
    /// Show live flows.
    Flows {
        /// Only this tenant's flows.
        #[arg(long)]
        tenant: Option<String>,
        /// Print the raw JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum FleetCmd {
    /// Each node: alive (its status key held), drained, the revision it
    /// applied, the `replicas` tenants it holds, the documents it refused.
    Status {
        /// The store: etcd://HOST:2379/PREFIX (MESHGATE_ETCD_* for TLS and users).
        #[arg(long, env = "MESHGATE_STORE")]
        store: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum PolicyCmd {
    /// Which rule of TENANT's policy decides a flow, and why (names are
    /// matched as asked, not resolved).
    Test {
        /// The tenant.
        tenant: String,
        /// The client's address (IP or IP:PORT).
        #[arg(long)]
        from: String,
        /// The destination, HOST:PORT.
        #[arg(long)]
        to: String,
        /// The client's identity (SOCKS/HTTP user, SSH key, WireGuard peer).
        #[arg(long)]
        user: Option<String>,
        /// The on-ramp: a module instance name of the tenant (or a kind).
        #[arg(long)]
        door: Option<String>,
        /// tcp, udp or icmp.
        #[arg(long, default_value = "tcp")]
        protocol: String,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `s` for a URL query value.
fn query_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b':' => {
                (b as char).to_string()
            }
            b => format!("%{b:02X}"),
        })
        .collect()
}

#[derive(Subcommand, Debug)]
enum WgCmd {
    /// Interfaces and peers in the layout of `wg show`.
    Show {
        /// Only this tenant's interfaces.
        tenant: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
enum CaptureCmd {
    /// Print the iptables/ip6tables rules that steer traffic into a capture
    /// listener (and run them with --apply; needs CAP_NET_ADMIN).
    Rules {
        /// Connections arriving on this interface (PREROUTING).
        #[arg(long, group = "scope")]
        iface: Option<String>,
        /// Connections made by this user's processes (OUTPUT).
        #[arg(long, group = "scope")]
        uid: Option<u32>,
        /// Connections made by this cgroup's processes (v2 path; OUTPUT).
        #[arg(long, group = "scope")]
        cgroup: Option<String>,
        /// Every connection made inside this network namespace (where meshgate runs too).
        #[arg(long, group = "scope")]
        netns: Option<String>,
        /// The capture listener's port (its `listen:`).
        #[arg(long)]
        port: u16,
        /// `redirect` (NAT, SO_ORIGINAL_DST) or `tproxy` (IP_TRANSPARENT listener).
        #[arg(long, default_value = "redirect")]
        mode: String,
        /// The user meshgate runs as: its own connections are not captured.
        /// Required for --uid, --cgroup and --netns; asked of the node's
        /// admin API (--admin) when not given.
        #[arg(long)]
        exclude_uid: Option<u32>,
        /// The lines that remove the rules instead.
        #[arg(long)]
        remove: bool,
        /// Run the lines (with `sh -e`) instead of only printing them.
        #[arg(long)]
        apply: bool,
    },
}

#[derive(Subcommand, Debug)]
enum ImportCmd {
    /// A wg-quick config (`/etc/wireguard/wg0.conf`) → a `kind: wireguard` document.
    WgQuick {
        /// The wg-quick file.
        file: PathBuf,
    },
}

/// `wg`'s duration style: "1 minute, 5 seconds".
fn wg_duration(mut secs: u64) -> String {
    let mut parts = Vec::new();
    for (unit, size) in [
        ("day", 86_400),
        ("hour", 3_600),
        ("minute", 60),
        ("second", 1),
    ] {
        let n = secs / size;
        secs %= size;
        if n > 0 {
            parts.push(format!("{n} {unit}{}", if n == 1 { "" } else { "s" }));
        }
    }
    parts.join(", ")
}

/// `wg`'s byte style: "948 B", "1.07 KiB".
fn wg_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.2} {}", UNITS[u])
}

/// Prints the WireGuard interfaces (of `tenant`, if given); returns how
/// many.
fn print_wg_show(modules: &Value, tenant: Option<&str>) -> usize {
    let mut first = true;
    let mut shown = 0;
    for m in modules.as_array().map(|a| a.as_slice()).unwrap_or_default() {
        if m["kind"] != "wireguard" || tenant.is_some_and(|t| m["tenant"] != t) {
            continue;
        }
        if !first {
            println!();
        }
        first = false;
        shown += 1;
        let d = &m["details"];
        println!("interface: {}/{}", s(&m["tenant"]), s(&m["instance"]));
        println!("  public key: {}", s(&d["public_key"]));
        println!("  private key: (hidden)");
        println!("  listening port: {}", s(&d["listen_port"]));
        for p in d["peers"]
            .as_array()
            .map(|a| a.as_slice())
            .unwrap_or_default()
        {
            println!();
            println!("peer: {}", s(&p["public_key"]));
            println!("  name: {}", s(&p["name"]));
            if let Some(ep) = p["endpoint"].as_str() {
                println!("  endpoint: {ep}");
            }
            let ips: Vec<String> = p["allowed_ips"]
                .as_array()
                .map(|a| a.iter().map(s).collect())
                .unwrap_or_default();
            println!(
                "  allowed ips: {}",
                if ips.is_empty() {
                    "(none)".into()
                } else {
                    ips.join(", ")
                }
            );
            if let Some(h) = p["latest_handshake_secs"].as_u64() {
                if h == 0 {
                    println!("  latest handshake: Now");
                } else {
                    println!("  latest handshake: {} ago", wg_duration(h));
                }
            }
            let (rx, tx) = (
                p["rx_bytes"].as_u64().unwrap_or(0),
                p["tx_bytes"].as_u64().unwrap_or(0),
            );
            if rx > 0 || tx > 0 {
                println!(
                    "  transfer: {} received, {} sent",
                    wg_bytes(rx),
                    wg_bytes(tx)
                );
            }
            if let Some(k) = p["persistent_keepalive"].as_u64() {
                println!("  persistent keepalive: every {}", wg_duration(k));
            }
        }
    }
    shown
}

/// GETs a JSON document from the admin API.
async fn get_json(admin: &str, path: &str) -> Result<Value> {
    let stream = tokio::net::TcpStream::connect(admin)
        .await
        .with_context(|| {
            format!("cannot reach the admin API at {admin} (is meshgate running? see --admin)")
        })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let mut req = hyper::Request::get(path).header(hyper::header::HOST, admin);
    if let Some(Some(token)) = ADMIN_TOKEN.get() {
        req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let req = req.body(Empty::<Bytes>::new())?;
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    if status == hyper::StatusCode::UNAUTHORIZED {
        bail!("{path}: the node asks for its admin token: give --admin-token-file FILE or MESHGATE_ADMIN_TOKEN");
    }
    if !status.is_success() {
        bail!("{path}: HTTP {status}: {}", String::from_utf8_lossy(&body));
    }
    serde_json::from_slice(&body).with_context(|| format!("{path}: not JSON"))
}

/// Prints rows as aligned columns under a header.
fn table(header: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        let parts: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r);
    }
}

/// A JSON value for a table cell; control characters in strings (a
/// client's user or host name) are shown escaped, never sent to the terminal.
fn s(v: &Value) -> String {
    match v {
        Value::String(s) if s.chars().any(char::is_control) => s
            .chars()
            .map(|c| {
                if c.is_control() {
                    c.escape_default().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect(),
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

async fn run(cli: Cli) -> Result<ExitCode> {
    load_admin_token(cli.admin_token_file.as_deref())?;
    match cli.cmd {
        Cmd::Genkey => println!("{}", PrivateKey::generate().to_base64()),
        Cmd::Pubkey => {
            let mut input = String::new();
            std::io::stdin().read_to_string(&mut input)?;
            let key = PrivateKey::from_base64(&input).context("stdin")?;
            println!("{}", key.public_key());
        }
        Cmd::Check { dir } => {
            match node::check_dir(&dir, meshgate::modules::builtin_factories()).await {
                Ok(s) => println!(
                    "{}: config OK ({} tenants, {} module instances)",
                    dir.display(),
                    s.tenants,
                    s.instances
                ),
                Err(errors) => {
                    for e in errors {
                        eprintln!("error: {e}");
                    }
                    return Ok(ExitCode::FAILURE);
                }
            }
        }
        Cmd::Status { json } => {
            let node = get_json(&cli.admin, "/api/v1/node").await?;
            let modules = get_json(&cli.admin, "/api/v1/modules").await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &serde_json::json!({"node": node, "modules": modules})
                    )?
                );
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "node {}  version {}  uptime {}s  {}",
                s(&node["node"]),
                s(&node["version"]),
                s(&node["uptime_secs"]),
                if node["ready"] == Value::Bool(true) {
                    "ready"
                } else {
                    "NOT READY"
                }
            );
            let rows = modules
                .as_array()
                .map(|a| a.as_slice())
                .unwrap_or_default()
                .iter()
                .map(|m| {
                    let d = &m["details"];
                    let detail = match (d.get("listen"), d.get("remote")) {
                        // A gateway link: transport, server, state.
                        _ if d.get("server").is_some() && d.get("connected").is_some() => {
                            let mut t = format!(
                                "{} {} {}",
                                d.get("transport").map(s).unwrap_or_else(|| "ssh".into()),
                                s(&d["server"]),
                                if d["connected"] == Value::Bool(true) {
                                    "up"
                                } else {
                                    "DOWN"
                                }
                            );
                            if let Some(rtt) = d["rtt_ms"].as_f64() {
                                t.push_str(&format!(" rtt {rtt:.1}ms"));
                            }
                            if let Some(n) = d["reconnects"].as_u64().filter(|n| *n > 0) {
                                t.push_str(&format!(" reconnects {n}"));
                            }
                            if d["connected"] != Value::Bool(true) {
                                if let Some(e) = d["last_error"].as_str() {
                                    t.push_str(&format!(" ({e})"));
                                }
                            }
                            t
                        }
                        // A link group: the link in use.
                        _ if d.get("links").is_some() && d.get("active").is_some() => format!(
                            "{} via {}",
                            s(&d["mode"]),
                            d["active"].as_str().unwrap_or("(none up)")
                        ),
                        (Some(l), Some(r)) => format!("{} -> {}", s(l), s(r)),
                        (Some(l), None) => match d.get("mode") {
                            Some(mode) => format!("{} ({})", s(l), s(mode)),
                            None => s(l),
                        },
                        _ => String::new(),
                    };
                    vec![
                        s(&m["tenant"]),
                        s(&m["instance"]),
                        s(&m["kind"]),
                        s(&m["state"]),
                        s(&m["active_flows"]),
                        detail,
                        m["last_error"]
                            .as_str()
                            .map(|e| format!("rejected change: {e}"))
                            .unwrap_or_default(),
                    ]
                })
                .collect();
            table(
                &[
                    "TENANT", "INSTANCE", "KIND", "STATE", "FLOWS", "DETAILS", "NOTE",
                ],
                rows,
            );
        }
        Cmd::Wg {
            cmd: WgCmd::Show { tenant },
        } => {
            let modules = get_json(&cli.admin, "/api/v1/modules").await?;
            if print_wg_show(&modules, tenant.as_deref()) == 0 {
                if let Some(t) = tenant {
                    // Say what there is instead of printing nothing.
                    let mut with: Vec<String> = modules
                        .as_array()
                        .map(|a| a.as_slice())
                        .unwrap_or_default()
                        .iter()
                        .filter(|m| m["kind"] == "wireguard")
                        .map(|m| s(&m["tenant"]))
                        .collect();
                    with.sort();
                    with.dedup();
                    let have = if with.is_empty() {
                        "no tenant has one".to_string()
                    } else {
                        format!("tenants with one: {}", with.join(", "))
                    };
                    bail!(
                        "tenant `{}` has no WireGuard interface ({have})",
                        t.escape_debug()
                    );
                }
            }
        }
        Cmd::Import {
            what: ImportCmd::WgQuick { file },
        } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let imported = meshgate::modules::wireguard::wgquick::import(&text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            for w in &imported.warnings {
                eprintln!("warning: {}: {w}", file.display());
            }
            print!("{}", serde_norway::to_string(&imported.document)?);
        }
        Cmd::Capture {
            cmd:
                CaptureCmd::Rules {
                    iface,
                    uid,
                    cgroup,
                    netns,
                    port,
                    mode,
                    exclude_uid,
                    remove,
                    apply,
                },
        } => {
            use meshgate::modules::capture::{rules, Mode};
            let scope = match (iface, uid, cgroup, netns) {
                (Some(i), None, None, None) => rules::Scope::Iface(i),
                (None, Some(u), None, None) => rules::Scope::Uid(u),
                (None, None, Some(c), None) => rules::Scope::Cgroup(c),
                (None, None, None, Some(n)) => rules::Scope::Netns(n),
                _ => {
                    bail!("say whose traffic to capture: one of --iface, --uid, --cgroup, --netns")
                }
            };
            let mode = match mode.as_str() {
                "redirect" => Mode::Redirect,
                "tproxy" => Mode::Tproxy,
                other => bail!("--mode `{other}`: expected redirect or tproxy"),
            };
            // Rules on local processes exclude the user meshgate runs as:
            // asked of the node when not given.
            let local = !matches!(scope, rules::Scope::Iface(_));
            let mut exclude_uid = exclude_uid;
            if local && exclude_uid.is_none() && !remove {
                if let Ok(node) = get_json(&cli.admin, "/api/v1/node").await {
                    if let Some(u) = node["uid"].as_u64().and_then(|u| u32::try_from(u).ok()) {
                        println!("# meshgate at {} runs as uid {u}: its own connections are not captured", cli.admin);
                        exclude_uid = Some(u);
                    }
                }
            }
            let lines = rules::commands(&rules::RuleSpec {
                scope,
                port,
                mode,
                exclude_uid,
                remove,
            })
            .map_err(|e| anyhow::anyhow!(e))?;
            let script = lines.join("\n") + "\n";
            print!("{script}");
            if apply {
                let status = std::process::Command::new("sh")
                    .arg("-ec")
                    .arg(&script)
                    .status()
                    .context("cannot run sh")?;
                if !status.success() {
                    bail!("applying the rules failed ({status}); they need CAP_NET_ADMIN and iptables");
                }
            }
        }
        Cmd::Policy {
            cmd:
                PolicyCmd::Test {
                    tenant,
                    from,
                    to,
                    user,
                    door,
                    protocol,
                    json,
                },
        } => {
            let mut path = format!(
                "/api/v1/policy/test?tenant={}&from={}&to={}&protocol={}",
                query_escape(&tenant),
                query_escape(&from),
                query_escape(&to),
                query_escape(&protocol)
            );
            if let Some(u) = &user {
                path.push_str(&format!("&user={}", query_escape(u)));
            }
            if let Some(d) = &door {
                path.push_str(&format!("&door={}", query_escape(d)));
            }
            let v = get_json(&cli.admin, &path).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("{}: {}", s(&v["verdict"]), s(&v["reason"]));
                println!("rule:  {}", s(&v["rule"]));
                if let Some(d) = v["dry_run"].as_object() {
                    println!("dry run: rule `{}` would {}", s(&d["rule"]), s(&d["would"]));
                }
                println!("route: {}", s(&v["route"]));
                println!(
                    "(tenant {}, {} rule(s); door {}, kind {})",
                    s(&v["tenant"]),
                    s(&v["policy_rules"]),
                    s(&v["door"]),
                    s(&v["kind"])
                );
            }
            // Scripts can branch on the verdict: 0 allow, 3 deny.
            if v["verdict"] == "deny" {
                return Ok(ExitCode::from(3));
            }
        }
        Cmd::Fleet {
            cmd: FleetCmd::Status { store, json },
        } => return Ok(fleet_status(&store, json).await),
        Cmd::Apply { dir, etcd, dry_run } => return Ok(apply(&dir, &etcd, dry_run).await),
        Cmd::Drain { node, store } => return Ok(drain(&store, &node, true).await),
        Cmd::Undrain { node, store } => return Ok(drain(&store, &node, false).await),
        Cmd::Flows { tenant, json } => {
            let path = match &tenant {
                Some(t) => format!("/api/v1/flows?tenant={t}"),
                None => "/api/v1/flows".into(),
            };
            let flows = get_json(&cli.admin, &path).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&flows)?);
                return Ok(ExitCode::SUCCESS);
            }
            let rows = flows
                .as_array()
                .map(|a| a.as_slice())
                .unwrap_or_default()
                .iter()
                .map(|f| {
                    let verdict = match (s(&f["verdict"]).as_str(), &f["reason"]) {
                        (v, Value::String(r)) => format!("{v}: {r}"),
                        (v, _) => v.to_string(),
                    };
                    vec![
                        s(&f["id"]),
                        s(&f["tenant"]),
                        s(&f["instance"]),
                        s(&f["identity"]),
                        s(&f["protocol"]),
                        s(&f["src"]),
                        s(&f["dst"]),
                        s(&f["route"]),
                        verdict,
                        s(&f["rule"]),
                        format!("{:.0}s", f["age_secs"].as_f64().unwrap_or(0.0)),
                        human_bytes(f["bytes_up"].as_u64().unwrap_or(0)),
                        human_bytes(f["bytes_down"].as_u64().unwrap_or(0)),
                    ]
                })
                .collect();
            table(
                &[
                    "ID",
                    "TENANT",
                    "DOOR",
                    "IDENTITY",
                    "PROTO",
                    "SOURCE",
                    "DESTINATION",
                    "ROUTE",
                    "VERDICT",
                    "RULE",
                    "AGE",
                    "UP",
                    "DOWN",
                ],
                rows,
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `meshgatectl fleet status`.
#[cfg(feature = "etcd")]
async fn fleet_status(store: &str, json: bool) -> ExitCode {
    use configstore::etcd::{fleet_status, EtcdAuth, EtcdUrl};
    let url = match EtcdUrl::parse(store) {
        Ok(u) => u,
        Err(e) => {
            eprintln!("error: --store: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (revision, nodes) = match fleet_status(&url, &EtcdAuth::from_env()).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    if json {
        let v = serde_json::json!({
            "revision": revision,
            "nodes": nodes.iter().map(|n| serde_json::json!({
                "node": n.node, "alive": n.alive, "drained": n.drained, "revision": n.revision,
                "holds": n.holds,
                "rejected": n.rejected.iter().map(|(k, e)| serde_json::json!({"instance": k, "error": e})).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        });
        println!("{v:#}");
        return ExitCode::SUCCESS;
    }
    println!("etcd revision {revision}");
    println!(
        "{:<16} {:<14} {:>9}  {:<24} REJECTED",
        "NODE", "STATE", "APPLIED", "HOLDS"
    );
    for n in &nodes {
        let rejected = if n.rejected.is_empty() {
            "-".to_string()
        } else {
            n.rejected
                .iter()
                .map(|(k, e)| format!("{k} ({})", e.escape_debug()))
                .collect::<Vec<_>>()
                .join("; ")
        };
        let state = match (n.alive, n.drained) {
            (true, false) => "alive",
            (true, true) => "alive,drained",
            (false, false) => "down",
            (false, true) => "down,drained",
        };
        let holds = if n.holds.is_empty() {
            "-".to_string()
        } else {
            n.holds.join(",")
        };
        println!(
            "{:<16} {:<14} {:>9}  {holds:<24} {rejected}",
            n.node,
            state,
            n.revision.map_or("-".to_string(), |r| r.to_string()),
        );
    }
    ExitCode::SUCCESS
}

/// `meshgatectl drain NODE` / `undrain NODE`.
#[cfg(feature = "etcd")]
async fn drain(store: &str, node: &str, on: bool) -> ExitCode {
    use configstore::etcd::{drain, EtcdAuth, EtcdUrl};
    let url = match EtcdUrl::parse(store) {
        Ok(u) => u,
        Err(e) => {
            eprintln!("error: --store: {e}");
            return ExitCode::FAILURE;
        }
    };
    match drain(&url, &EtcdAuth::from_env(), node, on).await {
        Ok(changed) => {
            let what = if on { "drained" } else { "undrained" };
            if changed {
                println!("{node}: {what}");
            } else {
                println!("{node}: already {what}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Without the `etcd` feature.
#[cfg(not(feature = "etcd"))]
async fn drain(store: &str, _node: &str, _on: bool) -> ExitCode {
    eprintln!("error: --store {store}: this meshgatectl was built without the etcd store (cargo build --features etcd)");
    ExitCode::FAILURE
}

/// `meshgatectl apply DIR --etcd URL`.
#[cfg(feature = "etcd")]
async fn apply(dir: &std::path::Path, store: &str, dry_run: bool) -> ExitCode {
    use configstore::etcd::{apply, dir_documents, EtcdAuth, EtcdUrl};
    let fail = |e: String| {
        eprintln!("error: {e}");
        ExitCode::FAILURE
    };
    let url = match EtcdUrl::parse(store) {
        Ok(u) => u,
        Err(e) => return fail(format!("--etcd: {e}")),
    };
    // The same checks as `meshgate --check` on the directory first.
    if let Err(errors) = node::check_dir(dir, meshgate::modules::builtin_factories()).await {
        for e in errors {
            eprintln!("error: {e}");
        }
        eprintln!("nothing was written to etcd");
        return ExitCode::FAILURE;
    }
    let docs = match dir_documents(dir) {
        Ok(d) => d,
        Err(e) => return fail(e),
    };
    match apply(&url, &EtcdAuth::from_env(), &docs, dry_run).await {
        Ok(a) => {
            let (put, del) = if dry_run {
                ("would put", "would delete")
            } else {
                ("put", "deleted")
            };
            for k in &a.put {
                println!("{put} {}/{k}", url.prefix);
            }
            for k in &a.deleted {
                println!("{del} {}/{k}", url.prefix);
            }
            println!(
                "{} {}, {} deleted, {} unchanged; etcd revision {}",
                if dry_run { "dry run:" } else { "applied:" },
                format_args!("{} written", a.put.len()),
                a.deleted.len(),
                docs.len() - a.put.len(),
                a.revision
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

/// Without the `etcd` feature.
#[cfg(not(feature = "etcd"))]
async fn apply(_dir: &std::path::Path, store: &str, _dry_run: bool) -> ExitCode {
    eprintln!("error: --etcd {store}: this meshgatectl was built without the etcd store (cargo build --features etcd)");
    ExitCode::FAILURE
}

/// Without the `etcd` feature.
#[cfg(not(feature = "etcd"))]
async fn fleet_status(store: &str, _json: bool) -> ExitCode {
    eprintln!("error: --store {store}: this meshgatectl was built without the etcd store (cargo build --features etcd)");
    ExitCode::FAILURE
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    match run(Cli::parse()).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wg_style_formatting() {
        assert_eq!(wg_duration(154), "2 minutes, 34 seconds");
        assert_eq!(wg_duration(3601), "1 hour, 1 second");
        assert_eq!(wg_bytes(948), "948 B");
        assert_eq!(wg_bytes(1096), "1.07 KiB");
        assert_eq!(wg_bytes(5 * 1024 * 1024), "5.00 MiB");
    }
}
