//! The audit trail: one record per ended flow, refusals included.
//!
//! [`AuditLog`] is the flow observer that writes it. Each record is an
//! [`AuditRecord`] (schema: `docs/audit.schema.json`): tenant, vnet,
//! on-ramp, identity, source, the destination requested and the address
//! dialed, route, verdict and the policy rule, bytes, duration and the end
//! reason. Where it goes is the node's `audit:` ([`AuditTarget`]): the log
//! (target `meshgate::audit`, every client string escaped), a file of JSON
//! lines (reopened by [`AuditLog::reopen`] on SIGHUP, for logrotate), or
//! nowhere. A JSON record cannot be forged by its content: serde escapes
//! every string, and each record is one `write` of one line.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Mutex, RwLock};

use serde::{Deserialize, Serialize};

use crate::core::spine::flow::{Flow, FlowEnd, FlowObserver, Verdict};

/// The schema a record follows (`docs/audit.schema.json`).
pub const SCHEMA: &str = "meshgate.audit/v1";

/// Where audit records go (`audit:` in `meshgate.yaml`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum AuditTarget {
    /// The log, at target `meshgate::audit` (default).
    #[default]
    Log,
    /// Nowhere.
    Off,
    /// JSON lines appended to this file.
    File(PathBuf),
}

impl<'de> Deserialize<'de> for AuditTarget {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match s.trim() {
            "log" => Ok(AuditTarget::Log),
            "off" | "none" => Ok(AuditTarget::Off),
            p if p.starts_with('/') => Ok(AuditTarget::File(PathBuf::from(p))),
            other => Err(serde::de::Error::custom(format!(
                "`{other}`: expected `log`, `off` or an absolute path for JSON lines, e.g. /var/log/meshgate/audit.jsonl"
            ))),
        }
    }
}

/// The on-ramp a flow came in through.
#[derive(Debug, Clone, Serialize)]
pub struct OnRampRef {
    /// Its instance name.
    pub instance: String,
    /// Its kind.
    pub kind: String,
}

/// One audit record.
#[derive(Debug, Clone, Serialize)]
pub struct AuditRecord {
    /// Always [`SCHEMA`].
    pub schema: &'static str,
    /// When the flow ended (RFC 3339, UTC).
    pub time: String,
    /// The flow's id in this process.
    pub flow: u64,
    /// Tenant.
    pub tenant: String,
    /// The vnet the flow was routed in, if routed in one.
    pub vnet: Option<String>,
    /// The on-ramp.
    pub onramp: OnRampRef,
    /// Who, as the on-ramp authenticated the client.
    pub identity: Option<String>,
    /// `tcp`, `udp`, `icmp` or the IP protocol number.
    pub protocol: String,
    /// The client's address.
    pub source: String,
    /// The destination as the client (or config) asked for it.
    pub requested: String,
    /// The address dialed, where one was.
    pub dialed: Option<String>,
    /// The route as the path decided it.
    pub route: Option<String>,
    /// `allow` or `deny`.
    pub verdict: &'static str,
    /// Why it was denied.
    pub verdict_reason: Option<String>,
    /// The policy rule that decided, if one did.
    pub rule: Option<String>,
    /// Bytes client → remote.
    pub bytes_up: u64,
    /// Bytes remote → client.
    pub bytes_down: u64,
    /// How long the flow lived.
    pub duration_ms: u64,
    /// Why it ended (`closed`, `denied`, `forbidden`, `policy_revoked`, ...).
    pub end: &'static str,
    /// What refused it, when `end` is `forbidden` (`loopback`, `admin`, ...).
    pub forbidden: Option<&'static str>,
    /// The W3C `traceparent` the client sent (HTTP/2 CONNECT), if well-formed.
    pub traceparent: Option<String>,
    /// The W3C `baggage` the client sent, if well-formed and short.
    pub baggage: Option<String>,
}

impl AuditRecord {
    /// The record of `flow`, which ended as `end` with decision `d`
    /// ([`Flow::decision`]).
    pub fn new(flow: &Flow, end: &FlowEnd, d: crate::core::spine::flow::Decision) -> Self {
        let (verdict, verdict_reason) = match d.verdict {
            Verdict::Allow => ("allow", None),
            Verdict::Deny(r) => ("deny", Some(r)),
        };
        let protocol = match flow.ctx.protocol {
            crate::core::spine::flow::Protocol::Tcp => "tcp".to_string(),
            crate::core::spine::flow::Protocol::Udp => "udp".to_string(),
            crate::core::spine::flow::Protocol::Icmp => "icmp".to_string(),
            crate::core::spine::flow::Protocol::Other(n) => n.to_string(),
        };
        AuditRecord {
            schema: SCHEMA,
            time: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            flow: flow.id,
            tenant: flow.ctx.tenant.clone(),
            vnet: d
                .route
                .as_deref()
                .and_then(|r| r.split_once(": "))
                .map(|(v, _)| v)
                .filter(|v| *v != "pinned" && !v.contains(' '))
                .map(str::to_string),
            onramp: OnRampRef {
                instance: flow.ctx.instance.clone(),
                kind: flow.ctx.kind.clone(),
            },
            identity: flow.ctx.identity.clone(),
            protocol,
            source: flow.ctx.src.to_string(),
            requested: flow.ctx.dst.clone(),
            dialed: flow.ctx.dialed.map(|a| a.to_string()),
            route: d.route,
            verdict,
            verdict_reason,
            rule: d.rule,
            bytes_up: end.bytes_up,
            bytes_down: end.bytes_down,
            duration_ms: end.duration.as_millis() as u64,
            end: end.reason.as_str(),
            forbidden: match end.reason {
                crate::core::spine::flow::EndReason::Forbidden(w) => Some(w.as_str()),
                _ => None,
            },
            traceparent: flow.ctx.trace.as_ref().and_then(|t| t.traceparent.clone()),
            baggage: flow.ctx.trace.as_ref().and_then(|t| t.baggage.clone()),
        }
    }
}

/// An open audit file.
#[derive(Debug)]
struct AuditFile {
    path: PathBuf,
    file: Option<File>,
}

fn open_append(path: &PathBuf) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
}

/// Writes an audit record for every ended flow (a [`FlowObserver`]).
#[derive(Debug, Default)]
pub struct AuditLog {
    target: RwLock<AuditTarget>,
    file: Mutex<Option<AuditFile>>,
}

impl AuditLog {
    /// Sends records to `target` from now on (opening the file first: an
    /// error leaves the old target in place).
    pub fn set_target(&self, target: AuditTarget) -> std::io::Result<()> {
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        *file = match &target {
            AuditTarget::File(path) => Some(AuditFile {
                file: Some(open_append(path)?),
                path: path.clone(),
            }),
            _ => None,
        };
        *self.target.write().unwrap_or_else(|e| e.into_inner()) = target;
        Ok(())
    }

    /// Opens the audit file again (after logrotate moved it: SIGHUP).
    pub fn reopen(&self) -> std::io::Result<()> {
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = file.as_mut() {
            f.file = None;
            f.file = Some(open_append(&f.path)?);
        }
        Ok(())
    }

    fn write_file(&self, record: &AuditRecord) {
        let mut line = match serde_json::to_vec(record) {
            Ok(l) => l,
            Err(_) => return,
        };
        line.push(b'\n');
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let Some(f) = file.as_mut() else { return };
        let ok = match f.file.as_mut() {
            Some(file) => file.write_all(&line).is_ok(),
            None => false,
        };
        if !ok {
            if let Some(suppressed) = crate::core::logs::allow("audit.write") {
                tracing::error!(path = %f.path.display(), suppressed, "cannot write the audit file; records are lost until it is writable (SIGHUP reopens it)");
            }
        }
    }
}

impl FlowObserver for AuditLog {
    fn on_end(&self, flow: &Flow, end: &FlowEnd) {
        // Which sink, read without copying its path per flow (and the lock
        // let go before the file's: set_target takes them the other way).
        let (to_log, to_file) = match &*self.target.read().unwrap_or_else(|e| e.into_inner()) {
            AuditTarget::Off => (false, false),
            AuditTarget::File(_) => (false, true),
            // Nothing is built for a log that drops the record (`log: warn`).
            AuditTarget::Log => (
                tracing::enabled!(target: "meshgate::audit", tracing::Level::INFO),
                false,
            ),
        };
        if !to_log && !to_file {
            return;
        }
        let decision = flow.decision();
        let verdict = decision.verdict.to_string();
        let r = AuditRecord::new(flow, end, decision);
        if to_file {
            self.write_file(&r);
        }
        if to_log {
            // Every string a client controls is a Debug (escaped) field.
            tracing::info!(
                target: "meshgate::audit",
                flow = r.flow,
                tenant = %r.tenant,
                vnet = ?r.vnet,
                instance = %r.onramp.instance,
                kind = %r.onramp.kind,
                identity = r.identity.as_deref().unwrap_or("-"),
                protocol = %r.protocol,
                src = %r.source,
                dst = ?r.requested,
                dialed = ?r.dialed,
                verdict = %verdict,
                rule = ?r.rule,
                route = r.route.as_deref().unwrap_or("-"),
                reason = %r.end,
                forbidden = ?r.forbidden,
                duration_ms = r.duration_ms,
                bytes_up = r.bytes_up,
                bytes_down = r.bytes_down,
                "flow ended"
            );
        }
    }
}
