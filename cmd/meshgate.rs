//! `meshgate`: the server. Runs every module configured in a config directory.
//!
//! ```text
//! meshgate --config-dir DIR          # or MESHGATE_CONFIG_DIR=DIR meshgate
//! meshgate --config-dir DIR --check  # validate and exit (non-zero on errors)
//! meshgate                           # /etc/meshgate, else /etc/cloudgateway
//! meshgate --store etcd://HOST:2379/meshgate --node-name a   # a fleet's node (feature etcd)
//! meshgate --config-dir DIR run --tenant acme -- curl http://nginx/
//! ```
//!
//! `run` starts one tenant's modules and runs the command in a network
//! namespace of its own whose only way out is the tenant's vnet
//! (`kind: netns`), then exits with the command's status.
//!
//! SIGTERM or SIGINT drains: listeners close at once (new connections are
//! refused), open connections may finish for `drain_timeout`, then the rest
//! are closed. A second signal exits at once.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use meshgate::core::config::{AdminAddr, LogFormat, NodeConfig};
use meshgate::core::node;
use meshgate::core::node::admin;
use meshgate::modules::builtin_factories;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// meshgate: a multi-tenant network gateway.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// The config directory: meshgate.yaml and tenants/<tenant>/<instance>.yaml,
    /// or Cloud-Gateway's conf.yaml. Default: /etc/meshgate, else /etc/cloudgateway.
    #[arg(long, env = "MESHGATE_CONFIG_DIR", value_name = "DIR", global = true)]
    config_dir: Option<PathBuf>,
    /// A shared config store instead of a directory: etcd://HOST:2379/PREFIX
    /// (etcds:// for TLS; MESHGATE_ETCD_USER, _PASSWORD, _CA, _CERT, _KEY).
    #[arg(
        long,
        env = "MESHGATE_STORE",
        value_name = "URL",
        conflicts_with = "config_dir",
        global = true
    )]
    store: Option<String>,
    /// This node's name in a shared store: its document is PREFIX/nodes/NAME,
    /// its status PREFIX/status/NAME. Default: the host name.
    #[arg(long, env = "MESHGATE_NODE_NAME", value_name = "NAME")]
    node_name: Option<String>,
    /// Validate the whole config and exit: 0 if valid, 1 with every error otherwise.
    #[arg(long)]
    check: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Run CMD in a network namespace of its own whose only way out is a
    /// tenant's vnet through meshgate: its TCP connections take the
    /// tenant's routes and policy, its names resolve in the vnet. Needs user
    /// namespaces (or root) and /dev/net/tun; changes nothing on the host's
    /// network. Starts only that tenant's modules; exits with CMD's status.
    Run(RunArgs),
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// The tenant whose vnet CMD's traffic takes.
    #[arg(long, default_value = "default")]
    tenant: String,
    /// The vnet (default: the tenant's default vnet).
    #[arg(long)]
    vnet: Option<String>,
    /// The command and its arguments (after `--`).
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    command: Vec<std::ffi::OsString>,
}

fn init_logging(node: &NodeConfig) {
    let filter = EnvFilter::try_from_env("MESHGATE_LOG")
        .or_else(|_| EnvFilter::try_new(&node.log))
        .unwrap_or_else(|e| {
            eprintln!(
                "warning: invalid log filter `{}` ({e}); using `info`",
                node.log
            );
            EnvFilter::new("info")
        });
    // Colour only for a terminal; every event on one line whatever its
    // fields hold (a client's user name, host name).
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(meshgate::core::logs::OneLine::new(std::io::stderr, ansi));
    match node.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn fail(lines: &[String]) -> ExitCode {
    for l in lines {
        eprintln!("error: {l}");
    }
    ExitCode::FAILURE
}

fn main() -> ExitCode {
    // The kernel engine runs this executable again as its namespace
    // helper; that must happen before any thread exists.
    meshgate::core::engine::kernel::run_if_helper();
    tune_allocator();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return fail(&[format!("cannot start the runtime: {e}")]),
    };
    runtime.block_on(serve())
}

/// glibc gives the top of a heap back to the system once more than 128 KiB
/// of it is free, so a connection that allocates and frees a 32 KiB packet
/// buffer per SSH packet page-faults the same memory in again and again
/// (about 6 % of the SSH door's CPU, and a tenth of its throughput). Keeping
/// up to 4 MiB free per heap stops that; idle memory is still returned.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const KEEP_FREE: libc::c_int = 4 << 20;
        // SAFETY: mallopt only changes a glibc tunable; called before any
        // thread exists.
        if unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, KEEP_FREE) } != 1 {
            eprintln!("meshgate: note: glibc refused M_TRIM_THRESHOLD; continuing");
        }
    }
}

/// Raises the soft limit on open files to the hard limit: every connection
/// and socket is a descriptor, and the common soft limit (1024) would let a
/// busy tenant starve the others (issue: a budget for every resource).
/// Returns (soft before, soft now, hard).
fn raise_fd_limit() -> Option<(u64, u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return None;
    }
    let before = lim.rlim_cur;
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads one rlimit from a struct we own.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim.rlim_cur = lim.rlim_max;
        }
    }
    Some((before, lim.rlim_cur, lim.rlim_max))
}

async fn serve() -> ExitCode {
    let mut args = Args::parse();
    let command = args.command.take();
    if args.check && command.is_some() {
        return fail(&["--check and `run` do not go together".into()]);
    }
    if let Some(url) = &args.store {
        let name = match args
            .node_name
            .clone()
            .map_or_else(node::default_node_name, Ok)
        {
            Ok(n) => n,
            Err(e) => return fail(&[e]),
        };
        let store = match node::open_etcd(url, &name, args.check).await {
            Ok(s) => s,
            Err(e) => return fail(&[e]),
        };
        if args.check {
            return match node::check_store(store, builtin_factories()).await {
                Ok(s) => {
                    println!(
                        "{url}: config OK for node {name} ({} tenants, {} module instances)",
                        s.tenants, s.instances
                    );
                    ExitCode::SUCCESS
                }
                Err(errors) => fail(&errors),
            };
        }
        return match command {
            Some(Command::Run(r)) => run_command(store, r).await,
            None => run(store, None).await,
        };
    }
    let (config_dir, defaulted) = match args.config_dir {
        Some(d) => (d, false),
        None => match node::default_config_dir(Path::is_dir) {
            Ok(d) => (d, true),
            Err(e) => return fail(&[e]),
        },
    };
    // Absolute from here on: the file watcher reports absolute paths, and
    // a relative directory (`./rl`) never matched them, so edits were
    // silently ignored.
    let config_dir = std::path::absolute(&config_dir).unwrap_or(config_dir);
    if args.check {
        // What the server would warn about at start (a secret file others
        // may read, a door without authentication off loopback) shows here
        // too, on stderr; the check still passes.
        tracing_subscriber::fmt()
            .with_env_filter(EnvFilter::new("warn"))
            .without_time()
            .with_target(false)
            .with_ansi(false)
            .with_writer(meshgate::core::logs::OneLine::new(std::io::stderr, false))
            .init();
        if defaulted {
            eprintln!("config directory: {} (the default)", config_dir.display());
        }
        return match node::check_dir(&config_dir, builtin_factories()).await {
            Ok(s) => {
                println!(
                    "{}: config OK ({} tenants, {} module instances)",
                    config_dir.display(),
                    s.tenants,
                    s.instances
                );
                ExitCode::SUCCESS
            }
            Err(errors) => fail(&errors),
        };
    }
    let store = match node::open_store(&config_dir) {
        Ok(s) => s,
        Err(e) => return fail(&[e]),
    };
    match command {
        Some(Command::Run(r)) => run_command(store, r).await,
        None => run(store, defaulted.then_some(config_dir)).await,
    }
}

/// A node on `store` set up as `meshgate.yaml` says: the default engine,
/// each tenant's flow budget, and where audit records go (before any flow
/// exists).
fn new_node(
    store: std::sync::Arc<dyn configstore::ConfigStore>,
    node_cfg: &NodeConfig,
) -> Result<node::Node, String> {
    let node = node::Node::new(store, builtin_factories(), Vec::new());
    let registry = node.registry();
    registry.set_default_engine(node_cfg.engine);
    registry
        .flows()
        .set_tenant_max_flows(node_cfg.tenant_max_flows);
    if let Some(audit) = registry.audit() {
        audit
            .set_target(node_cfg.audit.clone())
            .map_err(|e| format!("meshgate.yaml: key `audit`: {e}"))?;
    }
    Ok(node)
}

/// `meshgate run`: the tenant's modules and a netns door, CMD in its
/// namespace; CMD's exit status (128 + the signal that killed it).
async fn run_command(
    store: std::sync::Arc<dyn configstore::ConfigStore>,
    args: RunArgs,
) -> ExitCode {
    use meshgate::core::node::run::{nsswitch_conf, resolv_conf, OneTenant, INSTANCE};
    let node_cfg = match node::node_config(store.as_ref()).await {
        Ok(n) => n,
        Err(e) => return fail(&[e]),
    };
    // Quiet unless asked (MESHGATE_LOG): the terminal is CMD's.
    let mut quiet = node_cfg.clone();
    quiet.log = "warn".into();
    init_logging(&quiet);
    raise_fd_limit();
    let store: std::sync::Arc<dyn configstore::ConfigStore> =
        match OneTenant::new(store, &args.tenant, args.vnet.as_deref()).await {
            Ok(s) => std::sync::Arc::new(s),
            Err(e) => return fail(&[e.to_string()]),
        };
    let mut node = match new_node(store, &node_cfg) {
        Ok(n) => n,
        Err(e) => return fail(&[e]),
    };
    let registry = node.registry().clone();
    if let Err(lines) = node.start().await {
        return fail(&lines);
    }
    let door = registry
        .status()
        .await
        .into_iter()
        .find(|s| s.tenant == args.tenant && s.instance == INSTANCE);
    let pid = door.as_ref().and_then(|d| d.details["pid"].as_u64());
    let Some(pid) = pid.and_then(|p| u32::try_from(p).ok()) else {
        let why = door
            .and_then(|d| d.last_error)
            .unwrap_or_else(|| "the namespace did not start".into());
        node.shutdown(Duration::from_secs(1)).await;
        return fail(&[format!("cannot run {:?}: {why}", args.command[0])]);
    };
    // The namespace's resolv.conf and nsswitch.conf, bind-mounted over
    // the host's for CMD alone; gone when it ends.
    let files = match tempfile::Builder::new().prefix("meshgate-run-").tempdir() {
        Ok(d) => d,
        Err(e) => {
            return fail(&[format!(
                "cannot make a directory for the namespace's resolv.conf: {e}"
            )])
        }
    };
    let mut binds = Vec::new();
    let resolv = files.path().join("resolv.conf");
    if let Err(e) = std::fs::write(&resolv, resolv_conf()) {
        return fail(&[format!("{}: {e}", resolv.display())]);
    }
    if std::fs::metadata("/etc/resolv.conf").is_ok() {
        binds.push((resolv, PathBuf::from("/etc/resolv.conf")));
    } else {
        tracing::warn!(
            "/etc/resolv.conf does not exist here: CMD resolves names from /etc/hosts only"
        );
    }
    if let Some(text) = std::fs::read_to_string("/etc/nsswitch.conf")
        .ok()
        .and_then(|t| nsswitch_conf(&t))
    {
        let ns = files.path().join("nsswitch.conf");
        if let Err(e) = std::fs::write(&ns, text) {
            return fail(&[format!("{}: {e}", ns.display())]);
        }
        binds.push((ns, PathBuf::from("/etc/nsswitch.conf")));
    }
    let mut cmd = std::process::Command::new(&args.command[0]);
    cmd.args(&args.command[1..]);
    if let Err(e) = meshgate::core::engine::kernel::enter_namespace(&mut cmd, pid, &binds) {
        node.shutdown(Duration::from_secs(1)).await;
        return fail(&[format!("cannot enter the namespace: {e}")]);
    }
    let mut child = match tokio::process::Command::from(cmd).spawn() {
        Ok(c) => c,
        Err(e) => {
            node.shutdown(Duration::from_secs(1)).await;
            fail(&[format!("cannot run {:?}: {e}", args.command[0])]);
            // As a shell (and `env`) says it: 127 not found, 126 not runnable.
            return ExitCode::from(match e.kind() {
                std::io::ErrorKind::NotFound => 127,
                _ => 126,
            });
        }
    };
    tracing::info!(pid = ?child.id(), namespace = pid, "running");
    // Ctrl-C reaches CMD from the terminal; a SIGTERM or SIGHUP sent to
    // meshgate is passed on. Either way meshgate waits for CMD.
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    let mut hup = signal(SignalKind::hangup()).expect("install SIGHUP handler");
    let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
    let status = loop {
        let forward = tokio::select! {
            s = child.wait() => break s,
            _ = term.recv() => libc::SIGTERM,
            _ = hup.recv() => libc::SIGHUP,
            _ = int.recv() => continue,
        };
        if let Some(id) = child.id() {
            // SAFETY: kill only sends a signal to our own child.
            unsafe { libc::kill(id as libc::pid_t, forward) };
        }
    };
    node.shutdown(Duration::from_secs(1)).await;
    drop(files);
    match status {
        Ok(s) => {
            use std::os::unix::process::ExitStatusExt;
            let code = s
                .code()
                .or_else(|| s.signal().map(|n| 128 + n))
                .unwrap_or(1);
            ExitCode::from(u8::try_from(code).unwrap_or(1))
        }
        Err(e) => fail(&[format!("waiting for {:?}: {e}", args.command[0])]),
    }
}

/// Runs the node on `store` until a signal (`defaulted`: the config
/// directory chosen by default, to say so).
async fn run(
    store: std::sync::Arc<dyn configstore::ConfigStore>,
    defaulted: Option<PathBuf>,
) -> ExitCode {
    let node_cfg = match node::node_config(store.as_ref()).await {
        Ok(n) => n,
        Err(e) => return fail(&[e]),
    };
    init_logging(&node_cfg);
    tracing::info!(node = %node_cfg.node, store = %store.describe(), version = env!("CARGO_PKG_VERSION"), "meshgate starting");
    node::warn_unread(store.as_ref());
    match raise_fd_limit() {
        Some((before, now, hard)) if now < 4096 => tracing::warn!(soft_before = before, soft = now, hard, "few file descriptors allowed (RLIMIT_NOFILE): every connection and socket takes one; raise the hard limit (LimitNOFILE= in systemd)"),
        Some((before, now, hard)) if before < now => tracing::info!(soft_before = before, soft = now, hard, "open files limit (RLIMIT_NOFILE) raised to the hard limit"),
        Some((_, now, hard)) => tracing::info!(soft = now, hard, "open files limit (RLIMIT_NOFILE) already at the hard limit"),
        None => tracing::warn!("cannot read RLIMIT_NOFILE"),
    }
    if let Some(dir) = defaulted {
        tracing::info!(dir = %dir.display(), "config directory chosen by default: no --config-dir or MESHGATE_CONFIG_DIR given");
    }

    let mut node = match new_node(store.clone(), &node_cfg) {
        Ok(n) => n,
        Err(e) => return fail(&[e]),
    };
    let registry = node.registry().clone();
    // Bind the admin API first: a taken admin port is a start-up error, not a
    // surprise after the data plane is live.
    let shutdown = CancellationToken::new();
    let admin_listener = match node_cfg.admin {
        AdminAddr::On(addr) => match admin::bind(addr.0).await {
            Ok(l) => Some(l),
            Err(e) => return fail(&[format!("meshgate.yaml: key `admin`: {e}")]),
        },
        AdminAddr::Off => None,
    };
    // Doors' users never reach the admin API through a `direct` route.
    let admin_addr = admin_listener.as_ref().and_then(|l| l.local_addr().ok());
    let _admin_registered = admin_addr.map(|a| {
        registry
            .host_listeners()
            .register(meshgate::core::net::listen::Owner::Node, a)
    });
    if let Some(l) = admin_listener {
        tracing::info!(addr = ?admin_addr, "admin API listening");
        let a = admin::Admin::with_token(
            registry.clone(),
            node_cfg.node.clone(),
            node_cfg.admin_token.clone(),
            node_cfg.metrics_need_token,
        );
        if let Err(e) = admin::spawn_on_own_runtime(l, a, shutdown.clone()) {
            return fail(&[format!("admin API: {e}")]);
        }
    }

    // SIGHUP reopens the audit file (logrotate).
    if let Some(audit) = registry.audit() {
        if let meshgate::core::spine::audit::AuditTarget::File(path) = &node_cfg.audit {
            tracing::info!(path = %path.display(), "audit records go to a file (SIGHUP reopens it)");
            let mut hup = signal(SignalKind::hangup()).expect("install SIGHUP handler");
            tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    match audit.reopen() {
                        Ok(()) => tracing::info!("SIGHUP: audit file reopened"),
                        Err(e) => {
                            tracing::error!(error = %e, "SIGHUP: cannot reopen the audit file")
                        }
                    }
                }
            });
        }
    }

    if let Err(lines) = node.start().await {
        for l in &lines {
            tracing::error!(error = %l, "cannot start");
        }
        return fail(&lines);
    }
    tracing::info!("all modules started");

    wait_for_signal().await;
    tracing::info!(timeout = ?node_cfg.drain_timeout, "draining: new connections are refused, open ones may finish");
    // The registry waits on nobody past this: whatever clients do, the
    // process exits within `drain_timeout` + 1 s.
    let limit = node_cfg.drain_timeout + Duration::from_secs(1);
    tokio::select! {
        r = tokio::time::timeout(limit, node.shutdown(node_cfg.drain_timeout)) => match r {
            Ok(()) => tracing::info!("stopped"),
            Err(_) => tracing::warn!(?limit, "modules still stopping after drain_timeout + 1 s: exiting anyway"),
        },
        _ = wait_for_signal() => tracing::warn!("second signal: exiting now"),
    }
    shutdown.cancel();
    ExitCode::SUCCESS
}

async fn wait_for_signal() {
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
