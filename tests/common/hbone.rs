//! What the HBONE-style door tests share: a test PKI (a CA, a server
//! certificate, client certificates with SPIFFE IDs, one from another CA),
//! an audit recorder and an in-process echo server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use configstore::MemStore;
use meshgate::core::node::Node;
use meshgate::core::spine::audit::AuditRecord;
use meshgate::core::spine::flow::{Flow, FlowEnd, FlowObserver, Verdict};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A CA and the certificates it issued, as PEM files in a directory.
pub struct Pki {
    dir: tempfile::TempDir,
}

pub const ALICE: &str = "spiffe://example.org/ns/default/sa/alice";
pub const GATEWAY: &str = "spiffe://example.org/ns/mesh/sa/gateway";
pub const MALLORY: &str = "spiffe://example.org/ns/default/sa/mallory";

impl Pki {
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki { dir };
        let (ca, ca_key) = pki.ca("ca");
        pki.leaf(
            "server",
            &ca,
            &ca_key,
            vec![
                rcgen::SanType::DnsName("gw.test".try_into().unwrap()),
                rcgen::SanType::DnsName("localhost".try_into().unwrap()),
                rcgen::SanType::IpAddress("127.0.0.1".parse().unwrap()),
            ],
            None,
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        );
        for (name, uri) in [("alice", ALICE), ("gateway", GATEWAY), ("mallory", MALLORY)] {
            pki.leaf(
                name,
                &ca,
                &ca_key,
                vec![
                    rcgen::SanType::URI(uri.try_into().unwrap()),
                    rcgen::SanType::DnsName(format!("{name}.client.test").try_into().unwrap()),
                ],
                Some(name),
                rcgen::ExtendedKeyUsagePurpose::ClientAuth,
            );
        }
        // A client certificate that names nothing the door takes with
        // `identity_from: [spiffe]`.
        pki.leaf(
            "nameless",
            &ca,
            &ca_key,
            vec![rcgen::SanType::DnsName("nameless.test".try_into().unwrap())],
            None,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        );
        // The same name from another CA.
        let (other, other_key) = pki.ca("other-ca");
        pki.leaf(
            "impostor",
            &other,
            &other_key,
            vec![rcgen::SanType::URI(ALICE.try_into().unwrap())],
            Some("alice"),
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        );
        pki
    }

    fn ca(&self, name: &str) -> (rcgen::Certificate, rcgen::KeyPair) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::default();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        p.distinguished_name
            .push(rcgen::DnType::CommonName, format!("meshgate test {name}"));
        let cert = p.self_signed(&key).unwrap();
        std::fs::write(self.path(&format!("{name}.pem")), cert.pem()).unwrap();
        (cert, key)
    }

    fn leaf(
        &self,
        name: &str,
        ca: &rcgen::Certificate,
        ca_key: &rcgen::KeyPair,
        sans: Vec<rcgen::SanType>,
        cn: Option<&str>,
        usage: rcgen::ExtendedKeyUsagePurpose,
    ) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::default();
        p.subject_alt_names = sans;
        p.distinguished_name = rcgen::DistinguishedName::new();
        if let Some(cn) = cn {
            p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        }
        p.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![usage];
        let cert = p.signed_by(&key, ca, ca_key).unwrap();
        std::fs::write(self.path(&format!("{name}.pem")), cert.pem()).unwrap();
        let key_path = self.path(&format!("{name}.key"));
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    pub fn s(&self, file: &str) -> String {
        self.path(file).display().to_string()
    }

    /// A TLS client trusting the CA, with `who`'s certificate (if any).
    pub fn client(&self, who: Option<&str>) -> rustls::ClientConfig {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(self.path("ca.pem")).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        let b = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots);
        let mut cfg = match who {
            None => b.with_no_client_auth(),
            Some(w) => b
                .with_client_auth_cert(
                    CertificateDer::pem_file_iter(self.path(&format!("{w}.pem")))
                        .unwrap()
                        .map(|c| c.unwrap())
                        .collect(),
                    PrivateKeyDer::from_pem_file(self.path(&format!("{w}.key"))).unwrap(),
                )
                .unwrap(),
        };
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        cfg
    }
}

/// Records every flow's audit record.
#[derive(Default)]
pub struct Audit(pub Mutex<Vec<serde_json::Value>>);

impl FlowObserver for Audit {
    fn on_start(&self, _flow: &Flow) -> Verdict {
        Verdict::Allow
    }
    fn on_end(&self, flow: &Flow, end: &FlowEnd) {
        let r = AuditRecord::new(flow, end, flow.decision());
        self.0
            .lock()
            .unwrap()
            .push(serde_json::to_value(r).unwrap());
    }
}

impl Audit {
    /// The first record for `requested`, waiting up to 3 s for it.
    pub async fn of(&self, requested: &str) -> serde_json::Value {
        self.find(|r| r["requested"] == requested).await
    }

    /// The first record `pred` accepts, waiting up to 3 s for it.
    pub async fn find(&self, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        for _ in 0..60 {
            if let Some(r) = self.0.lock().unwrap().iter().find(|r| pred(r)) {
                return r.clone();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let all = self.0.lock().unwrap().clone();
        panic!("no such audit record: {all:?}");
    }
}

pub async fn echo_task() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// Runs a client program; its stdout, or a skip.
pub fn run(cmd: &mut std::process::Command) -> std::process::Output {
    let out = cmd.output().unwrap();
    if !out.status.success() {
        panic!(
            "{:?} failed: {}\n{}",
            cmd,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

pub fn pycurl_path() -> Option<PathBuf> {
    let deps = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/pydeps");
    let ok = std::process::Command::new("python3")
        .args([
            "-c",
            "import pycurl, sys; sys.exit(0 if pycurl.version_info()[2] >= 0x080100 else 1)",
        ])
        .env("PYTHONPATH", &deps)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if ok {
        Some(deps)
    } else {
        super::skip(
            "pycurl with libcurl >= 8.1 (scripts/test.sh installs it into target/pydeps from PyPI)",
        );
        None
    }
}

pub const PYCURL: &str = r#"
import io, sys, pycurl
door, target, ca, cert, key, tp = sys.argv[1:7]
buf = io.BytesIO()
c = pycurl.Curl()
c.setopt(pycurl.URL, "http://" + target + "/")
c.setopt(pycurl.PROXY, "https://gw.test:" + door)
c.setopt(pycurl.PROXYTYPE, getattr(pycurl, "PROXYTYPE_HTTPS2", 3))  # CURLPROXY_HTTPS2
c.setopt(pycurl.HTTPPROXYTUNNEL, 1)
c.setopt(pycurl.RESOLVE, ["gw.test:" + door + ":127.0.0.1"])
c.setopt(pycurl.PROXY_CAINFO, ca)
c.setopt(pycurl.PROXY_SSLCERT, cert)
c.setopt(pycurl.PROXY_SSLKEY, key)
c.setopt(pycurl.PROXY_SSLVERSION, pycurl.SSLVERSION_TLSv1_3)
c.setopt(pycurl.PROXYHEADER, ["traceparent: " + tp, "baggage: client=pycurl"])
c.setopt(pycurl.WRITEDATA, buf)
c.setopt(pycurl.TIMEOUT, 10)
c.setopt(pycurl.VERBOSE, 1)
try:
    c.perform()
    print("status", c.getinfo(pycurl.RESPONSE_CODE))
    print(buf.getvalue().decode())
except pycurl.error as e:
    print("error", e.args[0], e.args[1])
"#;

/// A node over `store` with the built-in kinds, recording into `audit`,
/// started.
pub async fn start(store: &Arc<MemStore>, audit: &Arc<Audit>) -> Node {
    let mut node = Node::new(
        store.clone(),
        meshgate::modules::builtin_factories(),
        vec![audit.clone()],
    );
    node.start().await.unwrap();
    node
}

/// Another tenant's traffic through a node while a test attacks it:
/// round trips through `port` (an echo behind a pipe) every 20 ms.
pub struct Bystander {
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<(u32, u32)>,
}

impl Bystander {
    /// Starts the round trips through `port`.
    pub fn start(port: u16) -> Bystander {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let stop = tokio_util::sync::CancellationToken::new();
        let until = stop.clone();
        let task = tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, 0u32);
            while !until.is_cancelled() {
                let once = async {
                    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
                    s.write_all(b"other tenant").await?;
                    let mut buf = [0u8; 12];
                    s.read_exact(&mut buf).await?;
                    Ok::<_, std::io::Error>(buf == *b"other tenant")
                };
                match tokio::time::timeout(Duration::from_secs(2), once).await {
                    Ok(Ok(true)) => ok += 1,
                    _ => failed += 1,
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (ok, failed)
        });
        Bystander { stop, task }
    }

    /// Stops, and checks every round trip succeeded (at least `min`).
    pub async fn check(self, min: u32) {
        self.stop.cancel();
        let (ok, failed) = self.task.await.unwrap();
        eprintln!("other tenant: {ok} round trips, {failed} failed");
        assert!(ok >= min, "only {ok} round trips");
        assert_eq!(
            failed, 0,
            "{failed} of the other tenant's round trips failed"
        );
    }
}
