//! `meshgatectl`: the operator's CLI.
//!
//! ```text
//! meshgatectl genkey                 # a private key, as `wg genkey` prints it
//! meshgatectl pubkey < private.key   # its public key, as `wg pubkey` prints it
//! meshgatectl check DIR              # validate a config directory
//! meshgatectl status                 # node and module table from the admin API
//! meshgatectl flows [--tenant T]     # live flows from the admin API
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
    #[command(subcommand)]
    cmd: Cmd,
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

/// GETs a JSON document from the admin API.
async fn get_json(admin: &str, path: &str) -> Result<Value> {
    let stream = tokio::net::TcpStream::connect(admin)
        .await
        .with_context(|| {
            format!("cannot reach the admin API at {admin} (is meshgate running? see --admin)")
        })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header(hyper::header::HOST, admin)
        .body(Empty::<Bytes>::new())?;
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
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

fn s(v: &Value) -> String {
    match v {
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
    match cli.cmd {
        Cmd::Genkey => println!("{}", PrivateKey::generate().to_base64()),
        Cmd::Pubkey => {
            let mut input = String::new();
            std::io::stdin().read_to_string(&mut input)?;
            let key = PrivateKey::from_base64(&input).context("stdin")?;
            println!("{}", key.public_key());
        }
        Cmd::Check { dir } => match node::check_dir(&dir).await {
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
        },
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
                        (Some(l), Some(r)) => format!("{} -> {}", s(l), s(r)),
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
                    vec![
                        s(&f["id"]),
                        s(&f["tenant"]),
                        s(&f["instance"]),
                        s(&f["protocol"]),
                        s(&f["src"]),
                        s(&f["dst"]),
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
                    "INSTANCE",
                    "PROTO",
                    "SOURCE",
                    "DESTINATION",
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
