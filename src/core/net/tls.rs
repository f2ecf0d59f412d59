//! TLS 1.3 for the doors and links that speak it (`kind: h2`, `h2_link`):
//! reading certificates and keys from files (errors name the document's
//! key), server and client configs on aws-lc-rs (the provider SSH already
//! uses; never the process default, so no second provider can make it
//! ambiguous), and a client certificate as a flow's identity.
//!
//! A client certificate names its holder three ways; `identity_from` says
//! which to take, in order:
//!
//! | source | identity | from |
//! |---|---|---|
//! | `spiffe` | `spiffe://trust.domain/path` | a URI SAN starting `spiffe://` |
//! | `dns` | `dns:name` | the first DNS SAN |
//! | `cn` | `cn:name` | the subject's common name |

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;

use crate::core::config::ConfigError;

/// The largest certificate file read (a chain, or a CA bundle).
const MAX_CERT_FILE: u64 = 1 << 20;
/// The largest private key file read.
const MAX_KEY_FILE: u64 = 64 << 10;

/// The crypto every TLS config here is built with.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Whether a door asks for a client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    /// None asked for: flows have no identity from TLS.
    None,
    /// Asked for; a client without one is let in without an identity, a
    /// client with one from another CA is refused.
    Optional,
    /// A certificate from `client_ca` or the handshake fails.
    Required,
}

/// Where a flow's identity comes from in a client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IdentityFrom {
    /// A `spiffe://` URI SAN, as is.
    Spiffe,
    /// The first DNS SAN, as `dns:<name>`.
    Dns,
    /// The subject's common name, as `cn:<name>`.
    Cn,
}

/// The default order: SPIFFE, then DNS, then CN.
pub const IDENTITY_FROM: [IdentityFrom; 3] =
    [IdentityFrom::Spiffe, IdentityFrom::Dns, IdentityFrom::Cn];

/// A file read for a TLS key: capped, with a message naming `key`.
fn read(source: &str, key: &str, path: &Path, max: u64) -> Result<Vec<u8>, ConfigError> {
    let err = |m: String| ConfigError::key(source, key, m);
    let meta =
        std::fs::metadata(path).map_err(|e| err(format!("cannot read {}: {e}", path.display())))?;
    if !meta.is_file() {
        return Err(err(format!("{} is not a file", path.display())));
    }
    if meta.len() > max {
        return Err(err(format!(
            "{} is {} bytes, more than the {max} a PEM file here may have",
            path.display(),
            meta.len()
        )));
    }
    std::fs::read(path).map_err(|e| err(format!("cannot read {}: {e}", path.display())))
}

/// The certificates in a PEM file (`key` names it in errors); at least one.
pub fn certificates(
    source: &str,
    key: &str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let pem = read(source, key, path, MAX_CERT_FILE)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            ConfigError::key(
                source,
                key,
                format!("{}: not PEM certificates: {e}", path.display()),
            )
        })?;
    if certs.is_empty() {
        return Err(ConfigError::key(
            source,
            key,
            format!(
                "{}: no `BEGIN CERTIFICATE` block: expected PEM certificates",
                path.display()
            ),
        ));
    }
    Ok(certs)
}

/// The private key in a PEM file (PKCS#8, SEC1 or PKCS#1), with a warning
/// if other users may read it.
pub fn private_key(
    source: &str,
    key: &str,
    path: &Path,
) -> Result<PrivateKeyDer<'static>, ConfigError> {
    use std::os::unix::fs::PermissionsExt;
    let pem = read(source, key, path, MAX_KEY_FILE)?;
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(file = %path.display(), mode = format!("{:o}", meta.permissions().mode() & 0o777), "private key file is readable by other users; chmod 600 it");
        }
    }
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        ConfigError::key(
            source,
            key,
            format!(
                "{}: no private key ({e}): expected a PEM `PRIVATE KEY`",
                path.display()
            ),
        )
    })
}

/// The CA certificates in a PEM file, as trust roots.
pub fn roots(source: &str, key: &str, path: &Path) -> Result<rustls::RootCertStore, ConfigError> {
    let mut store = rustls::RootCertStore::empty();
    for (i, cert) in certificates(source, key, path)?.into_iter().enumerate() {
        store.add(cert).map_err(|e| {
            ConfigError::key(
                source,
                key,
                format!("{}: certificate {}: {e}", path.display(), i + 1),
            )
        })?;
    }
    Ok(store)
}

/// What a TLS server needs: its certificate chain and key, and the CA its
/// clients' certificates must come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerFiles {
    /// The certificate chain (`tls_cert`).
    pub cert: PathBuf,
    /// Its private key (`tls_key`).
    pub key: PathBuf,
    /// Trusted client CAs (`client_ca`).
    pub client_ca: Option<PathBuf>,
    /// Whether a client certificate is asked for.
    pub client_auth: ClientAuth,
}

/// A TLS 1.3 server config offering `alpn`, with `key` (read from
/// `files.key` by the caller, which may need it for more).
pub fn server_config(
    source: &str,
    files: &ServerFiles,
    key: PrivateKeyDer<'static>,
    alpn: &[&[u8]],
) -> Result<rustls::ServerConfig, ConfigError> {
    let chain = certificates(source, "tls_cert", &files.cert)?;
    let verifier =
        match (&files.client_ca, files.client_auth) {
            (_, ClientAuth::None) => rustls::server::WebPkiClientVerifier::no_client_auth(),
            (None, _) => return Err(ConfigError::key(
                source,
                "client_auth",
                "a client certificate is asked for, but no `client_ca` says which CA issues them",
            )),
            (Some(ca), auth) => {
                let b = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots(source, "client_ca", ca)?),
                    provider(),
                );
                let b = if auth == ClientAuth::Optional {
                    b.allow_unauthenticated()
                } else {
                    b
                };
                b.build()
                    .map_err(|e| ConfigError::key(source, "client_ca", e.to_string()))?
            }
        };
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ConfigError::doc(source, format!("TLS: {e}")))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| {
            ConfigError::key(
                source,
                "tls_key",
                format!("does not go with `tls_cert`: {e}"),
            )
        })?;
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Ok(cfg)
}

/// A TLS door's own keys, as its document gives them.
#[derive(Debug, Clone, Default)]
pub struct DoorTlsKeys {
    /// `tls_cert`.
    pub tls_cert: Option<PathBuf>,
    /// `tls_key`.
    pub tls_key: Option<PathBuf>,
    /// `client_ca`.
    pub client_ca: Option<PathBuf>,
    /// `client_auth` (default: `required` with `client_ca`, else `none`).
    pub client_auth: Option<ClientAuth>,
    /// `identity_from` (default: [`IDENTITY_FROM`]).
    pub identity_from: Option<Vec<IdentityFrom>>,
    /// `trust_forwarded`.
    pub trust_forwarded: Vec<String>,
}

/// A TLS door's checked keys: its server config and whose identity counts.
#[derive(Clone)]
pub struct DoorTls {
    /// The TLS server (`None`: plain text, where the door allows it).
    pub server: Option<Arc<rustls::ServerConfig>>,
    /// Whether a client certificate is asked for.
    pub client_auth: ClientAuth,
    /// Where the identity comes from in a client certificate, in order.
    pub identity_from: Vec<IdentityFrom>,
    /// Identities whose `Forwarded: for=` is believed.
    pub trust_forwarded: Vec<String>,
    /// A secret derived from the door's private key (SHA-256 with a
    /// label): the same across restarts, known to no one else (a QUIC
    /// door's stateless-reset key).
    pub secret: Option<[u8; 32]>,
}

impl DoorTlsKeys {
    /// Checks the keys and reads the files: a TLS 1.3 server offering
    /// `alpn`, or none when `plain` names the key (`h2c`) that asked for
    /// plain text (then no TLS key may be given).
    pub fn check(
        self,
        src: &str,
        plain: Option<&str>,
        alpn: &[&[u8]],
    ) -> Result<DoorTls, ConfigError> {
        let client_auth = self.client_auth.unwrap_or(if self.client_ca.is_some() {
            ClientAuth::Required
        } else {
            ClientAuth::None
        });
        let mut secret = None;
        let server = if let Some(plain) = plain {
            for (key, set) in [
                ("tls_cert", self.tls_cert.is_some()),
                ("tls_key", self.tls_key.is_some()),
                ("client_ca", self.client_ca.is_some()),
            ] {
                if set {
                    return Err(ConfigError::key(
                        src,
                        key,
                        format!(
                            "given with `{plain}: true`, which has no TLS: drop one of the two"
                        ),
                    ));
                }
            }
            if client_auth != ClientAuth::None {
                return Err(ConfigError::key(
                    src,
                    "client_auth",
                    format!("`{plain}` has no TLS, so no client certificates"),
                ));
            }
            None
        } else {
            let missing = |key: &str| {
                ConfigError::key(
                    src,
                    key,
                    format!(
                        "missing: the door's {} in PEM",
                        if key == "tls_cert" {
                            "certificate chain"
                        } else {
                            "private key"
                        }
                    ),
                )
            };
            let files = ServerFiles {
                cert: self.tls_cert.ok_or_else(|| missing("tls_cert"))?,
                key: self.tls_key.ok_or_else(|| missing("tls_key"))?,
                client_ca: self.client_ca,
                client_auth,
            };
            let key = private_key(src, "tls_key", &files.key)?;
            let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
            ctx.update(b"meshgate door secret v1\0");
            ctx.update(key.secret_der());
            let mut seed = [0u8; 32];
            seed.copy_from_slice(ctx.finish().as_ref());
            secret = Some(seed);
            Some(Arc::new(server_config(src, &files, key, alpn)?))
        };
        let identity_from = self.identity_from.unwrap_or_else(|| IDENTITY_FROM.to_vec());
        if identity_from.is_empty() {
            return Err(ConfigError::key(
                src,
                "identity_from",
                "must name at least one of spiffe, dns, cn",
            ));
        }
        if !self.trust_forwarded.is_empty() && client_auth == ClientAuth::None {
            return Err(ConfigError::key(
                src,
                "trust_forwarded",
                "names identities, but without client certificates (`client_ca`) no client has one",
            ));
        }
        Ok(DoorTls {
            server,
            client_auth,
            identity_from,
            trust_forwarded: self.trust_forwarded,
            secret,
        })
    }
}

impl DoorTls {
    /// The identity a client's certificate chain gives, and whether it
    /// presented one.
    pub fn identity(
        &self,
        certs: Option<&[rustls::pki_types::CertificateDer<'_>]>,
    ) -> (Option<String>, bool) {
        let cert = certs.and_then(|c| c.first());
        (
            cert.and_then(|c| identity_of(c, &self.identity_from)),
            cert.is_some(),
        )
    }

    /// `client_auth` as the status shows it.
    pub fn client_auth_name(&self) -> &'static str {
        match self.client_auth {
            ClientAuth::None => "none",
            ClientAuth::Optional => "optional",
            ClientAuth::Required => "required",
        }
    }
}

/// What a TLS client needs: the CA that issues the server's certificate,
/// and its own certificate and key (if the server asks for one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientFiles {
    /// Trusted server CAs (`ca`).
    pub ca: PathBuf,
    /// Our certificate chain (`tls_cert`) and key (`tls_key`).
    pub identity: Option<(PathBuf, PathBuf)>,
}

/// A gateway link's TLS keys, as its document gives them.
#[derive(Debug, Clone)]
pub struct LinkTlsKeys {
    /// `server_name` (default: the server's host).
    pub server_name: Option<String>,
    /// `ca`.
    pub ca: PathBuf,
    /// `tls_cert`.
    pub tls_cert: Option<PathBuf>,
    /// `tls_key`.
    pub tls_key: Option<PathBuf>,
}

/// A gateway link's checked TLS: its client config and the name the
/// server's certificate must have.
#[derive(Clone)]
pub struct LinkTls {
    /// The TLS 1.3 client.
    pub config: Arc<rustls::ClientConfig>,
    /// The server's name, as the handshake checks it.
    pub server_name: rustls::pki_types::ServerName<'static>,
    /// The same, as text.
    pub name: String,
    /// The files read (a reload that changes them connects again).
    pub files: ClientFiles,
}

impl LinkTlsKeys {
    /// Checks the keys and reads the files, for a link to `host`,
    /// offering `alpn`.
    pub fn check(self, src: &str, host: &str, alpn: &[&[u8]]) -> Result<LinkTls, ConfigError> {
        let name = self.server_name.clone().unwrap_or_else(|| host.to_string());
        let server_name = rustls::pki_types::ServerName::try_from(name.clone()).map_err(|_| {
            ConfigError::key(
                src,
                if self.server_name.is_some() {
                    "server_name"
                } else {
                    "server"
                },
                format!("`{name}` is not a DNS name or IP address a certificate can be for"),
            )
        })?;
        let identity = match (self.tls_cert, self.tls_key) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            (Some(_), None) => {
                return Err(ConfigError::key(
                    src,
                    "tls_key",
                    "missing: `tls_cert` needs its key",
                ))
            }
            (None, Some(_)) => {
                return Err(ConfigError::key(
                    src,
                    "tls_cert",
                    "missing: `tls_key` needs its certificate",
                ))
            }
        };
        let files = ClientFiles {
            ca: self.ca,
            identity,
        };
        Ok(LinkTls {
            config: Arc::new(client_config(src, &files, alpn)?),
            server_name,
            name,
            files,
        })
    }
}

/// A TLS 1.3 client config offering `alpn`.
pub fn client_config(
    source: &str,
    files: &ClientFiles,
    alpn: &[&[u8]],
) -> Result<rustls::ClientConfig, ConfigError> {
    let b = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ConfigError::doc(source, format!("TLS: {e}")))?
        .with_root_certificates(roots(source, "ca", &files.ca)?);
    let mut cfg = match &files.identity {
        None => b.with_no_client_auth(),
        Some((cert, key)) => b
            .with_client_auth_cert(
                certificates(source, "tls_cert", cert)?,
                private_key(source, "tls_key", key)?,
            )
            .map_err(|e| {
                ConfigError::key(
                    source,
                    "tls_key",
                    format!("does not go with `tls_cert`: {e}"),
                )
            })?,
    };
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Ok(cfg)
}

/// The identity a certificate (DER) gives, trying `from` in order; `None`
/// if it names none of them (or does not parse).
pub fn identity_of(der: &[u8], from: &[IdentityFrom]) -> Option<String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let san = cert.subject_alternative_name().ok().flatten();
    let names: &[GeneralName<'_>] = san.as_ref().map_or(&[], |s| &s.value.general_names);
    from.iter().find_map(|f| match f {
        IdentityFrom::Spiffe => names.iter().find_map(|n| match n {
            GeneralName::URI(u) if u.starts_with("spiffe://") => Some(u.to_string()),
            _ => None,
        }),
        IdentityFrom::Dns => names.iter().find_map(|n| match n {
            GeneralName::DNSName(d) => Some(format!("dns:{d}")),
            _ => None,
        }),
        IdentityFrom::Cn => cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(|cn| format!("cn:{cn}")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(sans: Vec<rcgen::SanType>, cn: Option<&str>) -> Vec<u8> {
        let mut p = rcgen::CertificateParams::default();
        p.subject_alt_names = sans;
        p.distinguished_name = rcgen::DistinguishedName::new();
        if let Some(cn) = cn {
            p.distinguished_name
                .push(rcgen::DnType::CommonName, cn.to_string());
        }
        let key = rcgen::KeyPair::generate().unwrap();
        p.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn identity_follows_the_order_asked() {
        let both = cert(
            vec![
                rcgen::SanType::DnsName("alice.test".try_into().unwrap()),
                rcgen::SanType::URI("https://not-spiffe.example".try_into().unwrap()),
                rcgen::SanType::URI("spiffe://example.org/ns/a/sa/alice".try_into().unwrap()),
            ],
            Some("alice"),
        );
        assert_eq!(
            identity_of(&both, &IDENTITY_FROM).as_deref(),
            Some("spiffe://example.org/ns/a/sa/alice")
        );
        assert_eq!(
            identity_of(&both, &[IdentityFrom::Dns, IdentityFrom::Spiffe]).as_deref(),
            Some("dns:alice.test")
        );
        assert_eq!(
            identity_of(&both, &[IdentityFrom::Cn]).as_deref(),
            Some("cn:alice")
        );
        let cn_only = cert(vec![], Some("bob"));
        assert_eq!(
            identity_of(&cn_only, &IDENTITY_FROM).as_deref(),
            Some("cn:bob")
        );
        assert_eq!(identity_of(&cn_only, &[IdentityFrom::Spiffe]), None);
        let nothing = cert(vec![], None);
        assert_eq!(identity_of(&nothing, &IDENTITY_FROM), None);
        assert_eq!(identity_of(b"not a certificate", &IDENTITY_FROM), None);
    }

    #[test]
    fn file_errors_name_the_key_and_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let e = certificates("t/h2.yaml", "tls_cert", &missing).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("tls_cert"));
        assert!(e.message.contains("missing.pem"), "{e}");
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "hello\n").unwrap();
        let e = certificates("t/h2.yaml", "client_ca", &junk).unwrap_err();
        assert!(e.message.contains("no `BEGIN CERTIFICATE`"), "{e}");
        let e = private_key("t/h2.yaml", "tls_key", &junk).unwrap_err();
        assert!(e.message.contains("PRIVATE KEY"), "{e}");
        // A key that is not the certificate's.
        let key = rcgen::KeyPair::generate().unwrap();
        let other = rcgen::KeyPair::generate().unwrap();
        let c = rcgen::CertificateParams::new(vec!["gw.test".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(dir.path().join("c.pem"), c.pem()).unwrap();
        std::fs::write(dir.path().join("k.pem"), other.serialize_pem()).unwrap();
        let files = ServerFiles {
            cert: dir.path().join("c.pem"),
            key: dir.path().join("k.pem"),
            client_ca: None,
            client_auth: ClientAuth::None,
        };
        let read = |f: &ServerFiles| private_key("t/h2.yaml", "tls_key", &f.key).unwrap();
        let e = server_config("t/h2.yaml", &files, read(&files), &[b"h2"]).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("tls_key"), "{e}");
        std::fs::write(dir.path().join("k.pem"), key.serialize_pem()).unwrap();
        server_config("t/h2.yaml", &files, read(&files), &[b"h2"]).unwrap();
        let e = server_config(
            "t/h2.yaml",
            &ServerFiles {
                client_auth: ClientAuth::Required,
                ..files.clone()
            },
            read(&files),
            &[b"h2"],
        )
        .unwrap_err();
        assert_eq!(e.key.as_deref(), Some("client_auth"), "{e}");
    }
}
