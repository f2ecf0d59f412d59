//! The on-ramp's path end to end, in process.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::core::addr::HostPort;
use crate::core::metrics::Metrics;
use crate::core::net::dial::DialFailure;
use crate::core::net::proxy::Stream;
use crate::core::spine::audit::AuditLog;
use crate::core::spine::dest::ChosenBy;
use crate::core::spine::flow::{EndReason, Verdict};
use crate::core::spine::flow::{Flow, FlowEnd, FlowObserver, FlowTable};
use crate::core::spine::module::ModuleDirectory;
use crate::core::spine::router::Connector;
use crate::core::spine::tenant::Tenant;
use std::sync::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Denies one identity, and records every flow's end.
#[derive(Default)]
struct Policy(Mutex<Vec<String>>);

impl FlowObserver for Policy {
    fn on_start(&self, flow: &Flow) -> Verdict {
        match flow.ctx.identity.as_deref() {
            Some("mallory") => Verdict::Deny("mallory may not leave".into()),
            _ => Verdict::Allow,
        }
    }
    fn on_end(&self, flow: &Flow, end: &FlowEnd) {
        let d = flow.decision();
        self.0.lock().unwrap().push(format!(
            "{} {} {} {}",
            flow.ctx.identity.as_deref().unwrap_or("-"),
            d.verdict,
            d.route.unwrap_or_default(),
            end.reason
        ));
    }
}

/// A `Write` that appends to a shared buffer (the captured log).
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl io::Write for Captured {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A client stream accepted from a local socket pair.
async fn client_pair() -> (tokio::net::TcpStream, Stream, SocketAddr) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let c = tokio::net::TcpStream::connect(l.local_addr().unwrap())
        .await
        .unwrap();
    let (s, src) = l.accept().await.unwrap();
    (c, Stream::Tcp(s), src)
}

#[tokio::test]
async fn a_hook_denies_by_identity_counted_and_audited_with_the_route() {
    let log = Captured::default();
    let w = log.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || w.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let policy = Arc::new(Policy::default());
    let flows = Arc::new(FlowTable::new(vec![
        policy.clone(),
        Arc::new(AuditLog::default()),
    ]));
    let metrics = Arc::new(Metrics::new());
    let dir = ModuleDirectory::default();
    let ctx = ModuleContext::new(
        Arc::new(Tenant::new("acme")),
        "door",
        metrics.clone(),
        flows,
        &dir,
    );
    let onramp = OnRamp::new(ctx);
    // An echo backend.
    let backend = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target: HostPort = backend.local_addr().unwrap().to_string().parse().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = backend.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let req = |identity: &str| ConnectRequest {
        src: "127.0.0.1:1".parse().unwrap(),
        target: Target::Addr(target.clone()),
        identity: Some(identity.into()),
        via: RouteVia::Vnet(None),
        connect_timeout: Duration::from_secs(2),
        idle_timeout: None,
        client_dst: None,
        proxy_protocol: None,
        chosen_by: ChosenBy::Operator,
        trace: None,
    };

    let (_c, client, _) = client_pair().await;
    assert_eq!(
        onramp.connect(client, req("mallory")).await,
        EndReason::Denied
    );

    let (mut c, client, _) = client_pair().await;
    let allowed = tokio::spawn({
        let onramp = onramp.clone();
        let r = req("alice");
        async move { onramp.connect(client, r).await }
    });
    c.write_all(b"hello").await.unwrap();
    let mut buf = [0u8; 5];
    c.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"hello");
    c.shutdown().await.unwrap();
    drop(c);
    assert_eq!(allowed.await.unwrap(), EndReason::Closed);

    let route = "default: 127.0.0.0/8 -> direct";
    assert_eq!(
        *policy.0.lock().unwrap(),
        vec![
            format!("mallory deny (mallory may not leave) {route} denied"),
            format!("alice allow {route} closed"),
        ]
    );
    let text = metrics.encode();
    assert!(
        text.contains(
            r#"meshgate_rejected_total{tenant="acme",instance="door",reason="denied"} 1"#
        ),
        "{text}"
    );
    let log = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
    let audit: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("meshgate::audit"))
        .collect();
    assert_eq!(audit.len(), 2, "{log}");
    assert!(audit[0].contains("identity=\"mallory\""), "{}", audit[0]);
    assert!(
        audit[0].contains("verdict=deny (mallory may not leave)"),
        "{}",
        audit[0]
    );
    assert!(
        audit[0].contains(&format!("route=\"{route}\"")),
        "{}",
        audit[0]
    );
    assert!(audit[0].contains("reason=denied"), "{}", audit[0]);
}

#[tokio::test]
async fn refusals_end_typed_and_are_counted() {
    let metrics = Arc::new(Metrics::new());
    let tenant = Arc::new(Tenant::new("acme"));
    tenant.vnets.set(crate::core::spine::vnet::Vnet {
        name: "corp".into(),
        default: true,
        engine: Default::default(),
        routes: crate::core::spine::router::Router::new(vec![crate::core::spine::router::Route {
            matches: crate::core::spine::router::Match::Cidr("10.9.0.0/16".parse().unwrap()),
            connector: Connector::Reject,
        }]),
        hosts: Default::default(),
        dns: None,
    });
    let ctx = ModuleContext::new(
        tenant,
        "door",
        metrics.clone(),
        Arc::new(FlowTable::new(vec![])),
        &ModuleDirectory::default(),
    );
    let onramp = OnRamp::new(ctx);
    for (target, end) in [
        ("10.9.1.1:80", EndReason::Rejected),
        ("192.0.2.1:80", EndReason::NoRoute),
    ] {
        let (_c, client, src) = client_pair().await;
        let req = ConnectRequest {
            src,
            target: Target::Addr(target.parse().unwrap()),
            identity: None,
            via: RouteVia::Vnet(None),
            connect_timeout: Duration::from_secs(1),
            idle_timeout: None,
            client_dst: None,
            proxy_protocol: None,
            chosen_by: ChosenBy::Client,
            trace: None,
        };
        assert_eq!(onramp.connect(client, req).await, end, "{target}");
    }
    let (_c, client, src) = client_pair().await;
    let req = ConnectRequest {
        src,
        target: Target::Addr("10.1.1.1:80".parse().unwrap()),
        identity: None,
        via: RouteVia::Vnet(Some("nope".into())),
        connect_timeout: Duration::from_secs(1),
        idle_timeout: None,
        client_dst: None,
        proxy_protocol: None,
        chosen_by: ChosenBy::Client,
        trace: None,
    };
    assert_eq!(onramp.connect(client, req).await, EndReason::NoRoute);
    let text = metrics.encode();
    for reason in ["rejected", "no_route", "no_vnet"] {
        let series = format!(
            r#"meshgate_dial_errors_total{{tenant="acme",instance="door",reason="{reason}"}} 1"#
        );
        assert!(text.contains(&series), "{series}\n{text}");
    }
}

/// A DNS server on loopback (TCP) that answers every A query with 127.0.0.1.
async fn dns_server() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                loop {
                    let mut len = [0u8; 2];
                    if s.read_exact(&mut len).await.is_err() {
                        return;
                    }
                    let mut q = vec![0u8; u16::from_be_bytes(len) as usize];
                    if s.read_exact(&mut q).await.is_err() {
                        return;
                    }
                    let name_known = q.windows(7).any(|w| w == b"backend");
                    let mut r = q.clone();
                    r[2] = 0x81;
                    r[3] = if name_known { 0x80 } else { 0x83 };
                    let is_a = q[q.len() - 3] == 1;
                    if name_known && is_a {
                        r[7] = 1;
                        r.extend_from_slice(&[
                            0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 5, 0, 4, 127, 0, 0, 1,
                        ]);
                    }
                    let mut out = (r.len() as u16).to_be_bytes().to_vec();
                    out.extend_from_slice(&r);
                    if s.write_all(&out).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn names_resolve_by_the_vnets_dns_server_never_the_host() {
    let dns = dns_server().await;
    let backend = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = backend.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = backend.accept().await {
            let _ = s.write_all(b"hi").await;
        }
    });
    let tenant = Arc::new(Tenant::new("acme"));
    tenant.vnets.set(crate::core::spine::vnet::Vnet {
        name: "lab".into(),
        default: true,
        engine: Default::default(),
        routes: crate::core::spine::router::Router::new(vec![crate::core::spine::router::Route {
            matches: crate::core::spine::router::Match::Cidr("127.0.0.0/8".parse().unwrap()),
            connector: Connector::Direct,
        }]),
        hosts: Default::default(),
        dns: Some(dns),
    });
    let policy = Arc::new(Policy::default());
    let metrics = Arc::new(Metrics::new());
    let ctx = ModuleContext::new(
        tenant,
        "door",
        metrics.clone(),
        Arc::new(FlowTable::new(vec![policy.clone()])),
        &ModuleDirectory::default(),
    );
    let onramp = OnRamp::new(ctx);
    let req = |host: &str| ConnectRequest {
        src: "127.0.0.1:1".parse().unwrap(),
        target: Target::Addr(HostPort {
            host: host.into(),
            port,
        }),
        identity: Some("alice".into()),
        via: RouteVia::Vnet(None),
        connect_timeout: Duration::from_secs(2),
        idle_timeout: None,
        client_dst: None,
        proxy_protocol: None,
        chosen_by: ChosenBy::Client,
        trace: None,
    };
    let (mut c, client, _) = client_pair().await;
    let run = tokio::spawn({
        let o = onramp.clone();
        let r = req("backend.lab");
        async move { o.connect(client, r).await }
    });
    let mut buf = [0u8; 2];
    c.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"hi");
    drop(c);
    run.await.unwrap();
    // A name the server does not know: refused as a resolve failure,
    // even though the host's resolver knows `localhost`.
    let (_c, client, _) = client_pair().await;
    assert_eq!(
        onramp.connect(client, req("localhost")).await,
        EndReason::DialFailed(DialFailure::Resolve)
    );
    let ends = policy.0.lock().unwrap().clone();
    assert!(
        ends[0].contains("lab: 127.0.0.0/8 -> direct (backend.lab = 127.0.0.1 by dns"),
        "{ends:?}"
    );
    assert!(
        ends[1].contains("cannot resolve localhost by the DNS server"),
        "{ends:?}"
    );
    assert!(ends[1].contains("no such name"), "{ends:?}");
    assert!(metrics.encode().contains(
        r#"meshgate_dial_errors_total{tenant="acme",instance="door",reason="resolve"} 1"#
    ));
}
