//! The README is documentation that runs (issue 20, item 10: what a new
//! user hit following it).
//!
//! - Every YAML snippet is laid out as a config directory, each document
//!   where its first comment line puts it (`# tenants/acme/socks.yaml`,
//!   `# DIR/tenants/default/wg0.yaml: a server`, `meshgate.yaml`,
//!   `conf.yaml`; `# client: tenants/default/legacy.yaml` for one node of a
//!   snippet that shows several), together with the documents of other
//!   snippets it names (`via: wg0`, `listen_via: wg0`, `vnets: [sydney]`)
//!   of the same tenant and node, and must pass `meshgate --check`.
//!   Placeholders are filled as a user would: key files made by
//!   `meshgatectl genkey`, README WireGuard keys replaced by real ones,
//!   `ssh-ed25519 AAAA...` by a real SSH key, `...` elisions by what they
//!   leave out.
//! - The error texts the README shows are what the binary prints for the
//!   input the README describes, and so is the `meshgatectl policy test`
//!   answer it shows.
//! - The `ssh_link` example links up between two nodes, with its SSH keys
//!   made by the README's own `ssh-keygen` commands.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_norway::Value;

/// The README's YAML blocks and documents when this test was written:
/// fewer means the extractor stopped finding them, or snippets were lost.
const MIN_YAML_BLOCKS: usize = 10;
const MIN_DOCUMENTS: usize = 20;

/// A real OpenSSH public key for `ssh-ed25519 AAAA...` placeholders.
const SSH_PUB: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl";

/// The peer key written where a `...` elides a peer's keys (replaced by a
/// real one like the README's own keys).
const ELIDED_PEER_KEY: &str = "Ps5LTuWxUWQG7zr9a9hAn9Dqd2i9kAAJFJSZWKRd4xY=";

/// The absolute directories README snippets name; each node's are made
/// under a root of its own in the temp dir.
const ABSOLUTE_DIRS: [&str; 4] = [
    "/etc/meshgate",
    "/var/lib/meshgate",
    "/run/meshgate",
    "/var/log/meshgate",
];

fn readme() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap()
}

/// A fenced block of the README.
struct Fence {
    /// The line (1-based) of its opening fence.
    line: usize,
    /// Its info string: `yaml`, `sh`, or empty.
    lang: String,
    /// Its lines with their line numbers, the fence's indentation removed.
    lines: Vec<(usize, String)>,
}

fn fences(text: &str) -> Vec<Fence> {
    let mut out = Vec::new();
    let mut open: Option<(usize, Fence)> = None;
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        let trimmed = raw.trim_start();
        let indent = raw.len() - trimmed.len();
        match &mut open {
            None => {
                if let Some(lang) = trimmed.strip_prefix("```") {
                    let fence = Fence {
                        line: n,
                        lang: lang.trim().to_string(),
                        lines: Vec::new(),
                    };
                    open = Some((indent, fence));
                }
            }
            Some((fence_indent, fence)) => {
                if trimmed.trim_end() == "```" {
                    out.push(open.take().unwrap().1);
                } else {
                    let cut = indent.min(*fence_indent);
                    fence.lines.push((n, raw[cut..].to_string()));
                }
            }
        }
    }
    if let Some((_, f)) = open {
        panic!("README line {}: a fence that is never closed", f.line);
    }
    out
}

/// One YAML document of a README snippet.
#[derive(Clone, Debug)]
struct Doc {
    /// The index of its block among the README's YAML blocks.
    block: usize,
    /// The README line of its first line.
    line: usize,
    /// The node it is for, when its snippet shows several (`client`,
    /// `server`); empty otherwise.
    node: String,
    /// Its file in a config directory: `tenants/<tenant>/<instance>.yaml`,
    /// `meshgate.yaml` or `conf.yaml`.
    file: String,
    text: String,
}

impl Doc {
    fn tenant_instance(&self) -> Option<(&str, &str)> {
        let (tenant, file) = self.file.strip_prefix("tenants/")?.split_once('/')?;
        let instance = file
            .strip_suffix(".yaml")
            .or_else(|| file.strip_suffix(".yml"))?;
        Some((tenant, instance))
    }

    /// Its `kind:` (empty for node documents).
    fn kind(&self) -> String {
        self.text
            .lines()
            .find_map(|l| l.strip_prefix("kind:"))
            .map(|k| k.split('#').next().unwrap().trim().to_string())
            .unwrap_or_default()
    }

    /// The document as YAML, `...` elisions left out; None if it does not
    /// parse (`--check` then says why).
    fn value(&self) -> Option<Value> {
        let text: String = self
            .text
            .lines()
            .filter(|l| l.trim() != "...")
            .map(|l| format!("{l}\n"))
            .collect();
        serde_norway::from_str(&text).ok()
    }

    /// A key's string value, e.g. `key_file`.
    fn string(&self, key: &str) -> Option<String> {
        self.value()?.get(key)?.as_str().map(str::to_string)
    }

    fn origin(&self) -> String {
        let node = if self.node.is_empty() {
            String::new()
        } else {
            format!("{}: ", self.node)
        };
        format!("{node}{} (README line {})", self.file, self.line)
    }
}

fn is_name(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// The node and file a document's first comment line names:
/// `# [NODE: ][DIR/]tenants/<tenant>/<instance>.yaml[: what it is]`,
/// `meshgate.yaml` or `conf.yaml`.
fn file_named(comment: &str) -> Option<(String, String)> {
    let c = comment.trim_start_matches('#').trim();
    let (node, rest) = match c.split_once(": ") {
        Some((n, r)) if is_name(n) => (n.to_string(), r),
        _ => (String::new(), c),
    };
    let word = rest
        .split_whitespace()
        .next()?
        .trim_end_matches([':', ',', ';']);
    let path = word.strip_prefix("DIR/").unwrap_or(word);
    let ok = match path {
        "meshgate.yaml" | "conf.yaml" => true,
        _ => {
            let parts: Vec<&str> = path.split('/').collect();
            parts.len() == 3
                && parts[0] == "tenants"
                && is_name(parts[1])
                && parts[2]
                    .strip_suffix(".yaml")
                    .or_else(|| parts[2].strip_suffix(".yml"))
                    .is_some_and(is_name)
        }
    };
    ok.then(|| (node, path.to_string()))
}

/// Every document of every YAML block, and the number of blocks.
fn documents(text: &str) -> (usize, Vec<Doc>) {
    let blocks: Vec<Fence> = fences(text)
        .into_iter()
        .filter(|f| f.lang == "yaml" || f.lang == "yml")
        .collect();
    let mut docs = Vec::new();
    for (b, fence) in blocks.iter().enumerate() {
        let mut parts: Vec<Vec<(usize, String)>> = vec![Vec::new()];
        for (n, l) in &fence.lines {
            if l.trim_end() == "---" {
                parts.push(Vec::new());
            } else {
                parts.last_mut().unwrap().push((*n, l.clone()));
            }
        }
        for part in parts {
            let lines: Vec<&(usize, String)> = part
                .iter()
                .skip_while(|(_, l)| l.trim().is_empty())
                .collect();
            let Some((first, head)) = lines.first().map(|(n, l)| (*n, l.as_str())) else {
                panic!(
                    "README line {}: an empty YAML document in the block",
                    fence.line
                );
            };
            let Some((node, file)) = head.starts_with('#').then(|| file_named(head)).flatten()
            else {
                panic!(
                    "README line {first}: a YAML snippet's first line must name its file \
                     (`# tenants/<tenant>/<instance>.yaml`, `# client: tenants/...` for one \
                     node of several, `# meshgate.yaml`, `# conf.yaml`), so that users and this \
                     test know where it goes; it is: {head}"
                );
            };
            let text = lines.iter().map(|(_, l)| format!("{l}\n")).collect();
            docs.push(Doc {
                block: b,
                line: first,
                node,
                file,
                text,
            });
        }
    }
    (blocks.len(), docs)
}

/// The instances a document refers to by name: `via`, `listen_via`,
/// `server_via`, `remote_forward_via`, `vnet`, `vnets`, at any depth.
fn references(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Mapping(m) => {
            for (k, val) in m {
                match (k.as_str(), val) {
                    (
                        Some("via" | "listen_via" | "server_via" | "remote_forward_via" | "vnet"),
                        Value::String(s),
                    ) if s != "direct" && s != "reject" => out.push(s.clone()),
                    (Some("vnets"), Value::Sequence(list)) => {
                        out.extend(list.iter().filter_map(|x| x.as_str().map(str::to_string)))
                    }
                    _ => {}
                }
                references(val, out);
            }
        }
        Value::Sequence(s) => s.iter().for_each(|x| references(x, out)),
        _ => {}
    }
}

/// `group` (one node's documents of one snippet) with the documents it
/// names from other snippets: of the same tenant and instance name, for the
/// same node (else for no node in particular); two such candidates are an
/// error, as the README would then not say which it means.
fn with_companions(group: Vec<Doc>, all: &[Doc]) -> Vec<Doc> {
    let node = group[0].node.clone();
    let mut docs = group;
    let mut i = 0;
    while i < docs.len() {
        let d = docs[i].clone();
        i += 1;
        let Some((tenant, _)) = d.tenant_instance() else {
            continue;
        };
        let mut refs = Vec::new();
        if let Some(v) = d.value() {
            references(&v, &mut refs);
        }
        for r in refs {
            let named = |x: &&Doc| x.tenant_instance() == Some((tenant, r.as_str()));
            if docs.iter().any(|x| named(&x)) {
                continue;
            }
            let same_node: Vec<&Doc> = all
                .iter()
                .filter(named)
                .filter(|x| !node.is_empty() && x.node == node)
                .collect();
            let any_node: Vec<&Doc> = all
                .iter()
                .filter(named)
                .filter(|x| x.node.is_empty())
                .collect();
            let found = if same_node.is_empty() {
                any_node
            } else {
                same_node
            };
            match found.as_slice() {
                [] => {} // `--check` says what is missing.
                [one] => docs.push((*one).clone()),
                many => panic!(
                    "{} names `{r}`, which several README snippets define: {}",
                    d.origin(),
                    many.iter()
                        .map(|x| x.origin())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            }
        }
    }
    docs
}

/// `text` with the README's absolute directories (`/etc/meshgate`, ...)
/// moved under `root`. Only whole path components are moved.
fn remap(text: &str, root: &Path) -> String {
    let mut out = text.to_string();
    for dir in ABSOLUTE_DIRS {
        let mut result = String::new();
        let mut done = 0;
        for (at, _) in out.match_indices(dir) {
            let before = out[..at].chars().last();
            let after = out[at + dir.len()..].chars().next();
            let starts = before.is_none_or(|c| !(c.is_alphanumeric() || "/._-".contains(c)));
            let ends = after.is_none_or(|c| !(c.is_alphanumeric() || "._-".contains(c)));
            if starts && ends {
                result.push_str(&out[done..at]);
                result.push_str(&root.display().to_string());
                done = at;
            }
        }
        result.push_str(&out[done..]);
        out = result;
    }
    out
}

fn meshgatectl(args: &[&str], input: Option<&str>) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_meshgatectl"));
    cmd.args(args);
    let out = match input {
        Some(i) => common::run_with_stdin(&mut cmd, i.as_bytes()),
        None => cmd.output().unwrap(),
    };
    assert!(
        out.status.success(),
        "meshgatectl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A new WireGuard key pair from `meshgatectl`: (private, public).
fn wg_keypair() -> (String, String) {
    let private = meshgatectl(&["genkey"], None);
    let public = meshgatectl(&["pubkey"], Some(&private));
    (private, public)
}

fn write_secret(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// Makes the files a document names under `root` that a user would have
/// made before starting: WireGuard keys (`meshgatectl genkey`), password
/// files, an authorized_keys file. SSH key files are left to meshgate,
/// which makes them on first start.
fn make_files(v: &Value, root: &Path, doc: &Doc) {
    match v {
        Value::Mapping(m) => {
            // TLS files (`kind: h2`): a certificate and its key, a CA.
            let path_of = |k: &str| match m.get(k) {
                Some(Value::String(p))
                    if Path::new(p).starts_with(root) && !Path::new(p).exists() =>
                {
                    Some(PathBuf::from(p))
                }
                _ => None,
            };
            if let (Some(cert), Some(key)) = (path_of("tls_cert"), path_of("tls_key")) {
                let pair = rcgen::generate_simple_self_signed(vec!["gw.example".into()]).unwrap();
                write_secret(&cert, &pair.cert.pem());
                write_secret(&key, &pair.key_pair.serialize_pem());
            }
            for k in ["client_ca", "ca"] {
                if let Some(ca) = path_of(k) {
                    let key = rcgen::KeyPair::generate().unwrap();
                    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
                    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
                    write_secret(&ca, &p.self_signed(&key).unwrap().pem());
                }
            }
            for (k, val) in m {
                if let (Some(k), Value::String(path)) = (k.as_str(), val) {
                    if k.ends_with("_file") {
                        let path = Path::new(path);
                        if path.starts_with(root) && !path.exists() {
                            match k {
                                "private_key_file" | "preshared_key_file" => {
                                    write_secret(path, &format!("{}\n", wg_keypair().0))
                                }
                                "password_file" => write_secret(path, "secret\n"),
                                "authorized_keys_file" => {
                                    write_secret(path, &format!("{SSH_PUB} readme\n"))
                                }
                                "host_key_file" | "key_file" => {}
                                _ => panic!(
                                    "{}: `{k}`: teach tests/readme.rs what file to make",
                                    doc.origin()
                                ),
                            }
                        }
                    }
                }
                make_files(val, root, doc);
            }
        }
        Value::Sequence(s) => s.iter().for_each(|x| make_files(x, root, doc)),
        _ => {}
    }
}

/// `doc` as a user would write it: `...` elisions filled, `ssh-ed25519
/// AAAA...` made a real key, the README's absolute paths moved under
/// `root` (and the key and password files they name made there), the
/// README's WireGuard public keys replaced by real ones (the same real key
/// for the same README key) when `keys` is given.
fn fill(doc: &Doc, root: &Path, keys: Option<&mut HashMap<String, String>>) -> String {
    let kind = doc.kind();
    let has_top = |k: &str| doc.text.lines().any(|l| l.starts_with(&format!("{k}:")));
    let mut text = String::new();
    for (i, line) in doc.text.lines().enumerate() {
        if line.trim() != "..." {
            text.push_str(line);
            text.push('\n');
            continue;
        }
        let at = doc.line + i;
        assert_eq!(
            kind, "wireguard",
            "README line {at}: cannot fill `...` in a `kind: {kind}` document; teach tests/readme.rs"
        );
        let indent = line.len() - line.trim_start().len();
        if indent == 0 {
            // The instance's own keys: a key, an address, a peer.
            if !doc.text.contains("private_key") {
                text.push_str("private_key_file: /etc/meshgate/elided.key\n");
            }
            if !has_top("address") {
                text.push_str("address: 10.255.0.1/32\n");
            }
            if !has_top("peers") {
                text.push_str(&format!(
                    "peers:\n  - name: elided\n    public_key: {ELIDED_PEER_KEY}\n    allowed_ips: [10.255.255.0/24]\n"
                ));
            }
        } else if !doc.text.contains("public_key:") {
            // A peer's keys.
            text.push_str(&format!(
                "{}public_key: {ELIDED_PEER_KEY}\n",
                " ".repeat(indent)
            ));
        }
    }
    let text = text.replace("ssh-ed25519 AAAA...", SSH_PUB);
    assert!(
        !text.contains("AAAA..."),
        "{}: a placeholder tests/readme.rs does not fill:\n{text}",
        doc.origin()
    );
    let mut text = remap(&text, root);
    let Ok(value) = serde_norway::from_str::<Value>(&text) else {
        return text; // `--check` says why.
    };
    make_files(&value, root, doc);
    if let Some(keys) = keys {
        let mut readme_keys = Vec::new();
        if let Some(peers) = value.get("peers").and_then(Value::as_sequence) {
            for p in peers {
                if let Some(k) = p.get("public_key").and_then(Value::as_str) {
                    readme_keys.push(k.to_string());
                }
            }
        }
        for k in readme_keys {
            let real = keys.entry(k.clone()).or_insert_with(|| wg_keypair().1);
            text = text.replace(&k, real);
        }
    }
    text
}

/// Writes `docs` into `config` as their files say; `root` takes the files
/// they name.
fn lay_out(
    docs: &[Doc],
    config: &Path,
    root: &Path,
    mut keys: Option<&mut HashMap<String, String>>,
) -> Vec<(String, String)> {
    let mut written: Vec<(String, String)> = Vec::new();
    for d in docs {
        let text = fill(d, root, keys.as_deref_mut());
        if let Some((_, other)) = written.iter().find(|(f, _)| *f == d.file) {
            assert_eq!(
                other,
                &text,
                "{}: two documents for one file in one config directory",
                d.origin()
            );
            continue;
        }
        let path = config.join(&d.file);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &text).unwrap();
        written.push((d.file.clone(), text));
    }
    written
}

#[test]
fn every_yaml_snippet_passes_check() {
    let text = readme();
    let (blocks, docs) = documents(&text);
    assert!(
        blocks >= MIN_YAML_BLOCKS && docs.len() >= MIN_DOCUMENTS,
        "found {blocks} YAML blocks and {} documents in README.md, expected at least \
         {MIN_YAML_BLOCKS} and {MIN_DOCUMENTS}: the extractor no longer finds them, or \
         snippets were removed (then lower the counts here)",
        docs.len()
    );
    let mut groups: BTreeMap<(usize, String), Vec<Doc>> = BTreeMap::new();
    for d in &docs {
        groups
            .entry((d.block, d.node.clone()))
            .or_default()
            .push(d.clone());
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut keys = HashMap::new();
    let mut failures = Vec::new();
    let mut checked = 0;
    for ((block, node), group) in groups {
        // QUIC kinds exist in builds with the `quic` feature (CI's).
        if !cfg!(feature = "quic")
            && group
                .iter()
                .any(|d| matches!(d.kind().as_str(), "quic" | "quic_link"))
        {
            eprintln!("skipped without the quic feature: block {block}");
            continue;
        }
        let own = group.len();
        let members = with_companions(group, &docs);
        let name = format!(
            "block{block}-{}",
            if node.is_empty() { "all" } else { &node }
        );
        let config = tmp.path().join(&name).join("config");
        let root = tmp.path().join(&name).join("root");
        std::fs::create_dir_all(&config).unwrap();
        let written = lay_out(&members, &config, &root, Some(&mut keys));
        let out = common::check(&config);
        let origins: Vec<String> = members.iter().map(Doc::origin).collect();
        let (snippet, companions) = origins.split_at(own);
        eprintln!(
            "{}: {}{}",
            if out.status.success() { "ok" } else { "FAILED" },
            snippet.join(", "),
            if companions.is_empty() {
                String::new()
            } else {
                format!(" (with {})", companions.join(", "))
            }
        );
        checked += members.len();
        if !out.status.success() {
            failures.push(format!(
                "README snippet {} (with {}) fails `meshgate --check`:\n{}\nas written:\n{}",
                snippet.join(", "),
                if companions.is_empty() {
                    "nothing else".to_string()
                } else {
                    companions.join(", ")
                },
                String::from_utf8_lossy(&out.stderr),
                written
                    .iter()
                    .map(|(f, t)| format!("--- {f}\n{t}"))
                    .collect::<String>()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    eprintln!(
        "{} README documents in {blocks} YAML blocks pass --check ({checked} laid out with companions)",
        docs.len()
    );
}

/// The README's `tenants/default/web.yaml` pipe, whose mistakes its error
/// examples show.
fn web_example(docs: &[Doc]) -> &Doc {
    docs.iter()
        .find(|d| d.file == "tenants/default/web.yaml" && d.node.is_empty() && d.kind() == "pipe")
        .expect("the README's tenants/default/web.yaml pipe example")
}

fn replace_once(text: &str, from: &str, to: &str) -> String {
    assert_eq!(text.matches(from).count(), 1, "`{from}` once in:\n{text}");
    text.replacen(from, to, 1)
}

#[test]
fn the_error_texts_shown_are_what_meshgate_prints() {
    let text = readme();
    let (_, docs) = documents(&text);
    let shown: Vec<(usize, String)> = fences(&text)
        .into_iter()
        .filter(|f| f.lang.is_empty())
        .flat_map(|f| f.lines)
        .filter(|(_, l)| l.starts_with("error: "))
        .collect();
    assert!(
        shown.len() >= 4,
        "the README's error examples: found {shown:?}"
    );
    let web = web_example(&docs);
    let port = web
        .text
        .lines()
        .find_map(|l| l.strip_prefix("remote: "))
        .and_then(|r| r.rsplit_once(':'))
        .expect("the web example's remote")
        .1;
    // (the README line's start, the file, its text: the web example with
    // the mistake the line is about)
    let scenarios = [
        (
            "error: tenants/default/web.yaml: key `remot`: unknown field",
            "tenants/default/web.yaml",
            replace_once(&web.text, "\nremote:", "\nremot:"),
        ),
        (
            "error: tenants/default/web.yaml: key `remote`: invalid port 70000",
            "tenants/default/web.yaml",
            replace_once(&web.text, &format!(":{port}\n"), ":70000\n"),
        ),
        (
            "error: tenants/default/db.yaml: key `kind`: unknown kind `pype`",
            "tenants/default/db.yaml",
            replace_once(&web.text, "kind: pipe", "kind: pype"),
        ),
    ];
    let kernel = "error: tenants/acme/wg0.yaml: cannot start acme/wg0: engine `kernel`:";
    for (n, line) in &shown {
        if line.starts_with(kernel) {
            kernel_engine_error(*n, line, &docs);
            continue;
        }
        let Some((_, file, input)) = scenarios.iter().find(|(p, ..)| line.starts_with(p)) else {
            panic!(
                "README line {n} shows an error tests/readme.rs does not reproduce (add its input):\n{line}"
            );
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(file);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, input).unwrap();
        let out = common::check(dir.path());
        assert!(!out.status.success(), "{file}:\n{input}");
        // The README shows the full build (`--all-features`, as CI tests);
        // a build without `quic` lists two kinds fewer.
        let line = if cfg!(feature = "quic") {
            line.to_string()
        } else {
            line.replace(" quic, quic_link,", "")
        };
        assert_eq!(
            String::from_utf8_lossy(&out.stderr).trim_end(),
            line,
            "README line {n} shows another error than `meshgate --check` prints for {file}:\n{input}"
        );
    }
    for (start, ..) in &scenarios {
        assert!(
            shown.iter().any(|(_, l)| l.starts_with(start)),
            "the README no longer shows `{start}...`: {shown:?}"
        );
    }
}

/// The kernel engine's error as the README shows it: meshgate started as
/// uid 65534 (`nobody`), where `/dev/net/tun` is root's with mode 0600,
/// on the README's `wg0.yaml` in tenant `acme`.
fn kernel_engine_error(n: usize, line: &str, docs: &[Doc]) {
    let tun_as_shown = std::fs::metadata("/dev/net/tun")
        .is_ok_and(|m| m.mode() & 0o7777 == 0o600 && m.uid() == 0 && m.gid() == 0);
    if !common::netns::can_netns_quiet() || !tun_as_shown || !common::have("runuser") {
        common::skip(&format!(
            "README line {n} (the kernel engine's error) needs root, runuser and a \
             /dev/net/tun of mode 0600 owned by root, as in the example"
        ));
        return;
    }
    let wg0 = docs
        .iter()
        .find(|d| d.file == "tenants/default/wg0.yaml" && d.node.is_empty())
        .expect("the README's server wg0.yaml");
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path();
    std::fs::set_permissions(base, std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = base.join("meshgate");
    std::fs::copy(env!("CARGO_BIN_EXE_meshgate"), &bin).unwrap();
    let config = base.join("config");
    let root = base.join("root");
    let mut doc = wg0.clone();
    doc.file = "tenants/acme/wg0.yaml".into();
    lay_out(&[doc], &config, &root, None);
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = udp.local_addr().unwrap().port();
    drop(udp);
    let wg_path = config.join("tenants/acme/wg0.yaml");
    let wg_text = std::fs::read_to_string(&wg_path).unwrap();
    std::fs::write(
        &wg_path,
        wg_text.replace("listen_port: 8765", &format!("listen_port: {port}")),
    )
    .unwrap();
    std::fs::write(
        config.join("meshgate.yaml"),
        format!(
            "node: readme\nadmin: 127.0.0.1:{}\nengine: kernel\n",
            common::free_port()
        ),
    )
    .unwrap();
    // Readable by nobody: the directories, and the key file (its own, 0600).
    let ok = Command::new("chmod")
        .arg("-R")
        .arg("a+rX")
        .arg(base)
        .status()
        .unwrap()
        .success();
    assert!(ok);
    for e in walk(&root) {
        if e.is_file() {
            std::os::unix::fs::chown(&e, Some(65534), Some(65534)).unwrap();
            std::fs::set_permissions(&e, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
    }
    let log = base.join("stderr");
    let mut child = Command::new("runuser")
        .args(["-u", "nobody", "--"])
        .arg(&bin)
        .arg("--config-dir")
        .arg(&config)
        .current_dir(base)
        .env_remove("MESHGATE_LOG")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let exited = common::wait_until(Duration::from_secs(10), || {
        matches!(child.try_wait(), Ok(Some(_)))
    });
    if !exited {
        common::stop_gracefully(&mut child);
    }
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert!(
        exited,
        "meshgate as nobody with engine kernel kept running:\n{stderr}"
    );
    assert!(
        stderr.lines().any(|l| l == line),
        "README line {n} shows another error than meshgate prints:\nREADME: {line}\nmeshgate:\n{}",
        stderr
            .lines()
            .filter(|l| l.starts_with("error"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            }
            out.push(p);
        }
    }
    out
}

#[test]
fn the_policy_test_answer_shown_is_what_meshgatectl_prints() {
    let text = readme();
    let (_, docs) = documents(&text);
    let (command, answer) = fences(&text)
        .into_iter()
        .filter(|f| f.lang == "sh")
        .find_map(|f| {
            f.lines.windows(2).find_map(|w| {
                let cmd = w[0].1.strip_prefix("meshgatectl policy test ")?;
                let answer = w[1].1.strip_prefix("# ")?;
                Some((cmd.to_string(), answer.to_string()))
            })
        })
        .expect("the README's `meshgatectl policy test` example and its answer");
    let (expected, exit) = answer.split_once("   (").expect("`ANSWER   (exit ...)`");
    let policy = docs
        .iter()
        .find(|d| d.kind() == "policy")
        .expect("the README's policy example");
    let cfg = common::ConfigDir::new();
    let root = tempfile::tempdir().unwrap();
    lay_out(std::slice::from_ref(policy), cfg.path(), root.path(), None);
    let _mg = common::Meshgate::start(&cfg);
    let out = Command::new(env!("CARGO_BIN_EXE_meshgatectl"))
        .arg("--admin")
        .arg(format!("127.0.0.1:{}", cfg.admin_port))
        .args(["policy", "test"])
        .args(command.split_whitespace())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.lines().next().unwrap_or_default(),
        expected.trim(),
        "`meshgatectl policy test {command}` on the README's policy:\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let code = if expected.starts_with("allow") { 0 } else { 3 };
    assert!(exit.starts_with(&format!("exit {code}")), "{answer}");
    assert_eq!(out.status.code(), Some(code), "{stdout}");
}

/// The `ssh_link` example between two real nodes on loopback: its SSH keys
/// made beforehand by the README's `ssh-keygen` commands (each on the node
/// its `# on the <node>` comment names), their public lines filled in
/// where the example has `ssh-ed25519 AAAA...`; the WireGuard keys paired,
/// and host ports made free ones. The link must log in.
#[test]
fn the_ssh_link_example_links_up_with_keys_made_as_shown() {
    if !common::have("ssh-keygen") {
        return;
    }
    let text = readme();
    let (_, docs) = documents(&text);
    let link = docs
        .iter()
        .find(|d| d.kind() == "ssh_link")
        .expect("the README's ssh_link example");
    let door = docs
        .iter()
        .find(|d| d.block == link.block && d.kind() == "ssh")
        .expect("the ssh_link example's door");
    assert!(
        !link.node.is_empty() && !door.node.is_empty() && link.node != door.node,
        "the ssh_link example shows the link and the door on two nodes: {} and {}",
        link.origin(),
        door.origin()
    );
    let tmp = tempfile::tempdir().unwrap();
    let roots: HashMap<&str, PathBuf> = [link.node.as_str(), door.node.as_str()]
        .into_iter()
        .map(|n| (n, tmp.path().join(format!("{n}-root"))))
        .collect();

    // The README's ssh-keygen commands.
    let keygen = fences(&text)
        .into_iter()
        .find(|f| {
            f.lang == "sh"
                && f.line > link.line
                && f.lines.iter().any(|(_, l)| l.contains("ssh-keygen"))
        })
        .expect("the README's ssh-keygen commands after the ssh_link example");
    let mut public: HashMap<PathBuf, String> = HashMap::new();
    let mut on: Option<String> = None;
    for (n, l) in &keygen.lines {
        let l = l.trim();
        if let Some(rest) = l.strip_prefix("# on the ") {
            let mut node =
                rest.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'));
            on = Some(node.next().unwrap().to_string());
            continue;
        }
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let node = on
            .as_deref()
            .unwrap_or_else(|| panic!("README line {n}: a command before `# on the <node>`"));
        let root = roots
            .get(node)
            .unwrap_or_else(|| panic!("README line {n}: no node `{node}` in the example"));
        let cmd = remap(l, root);
        let code = cmd.split('#').next().unwrap();
        for word in code.split_whitespace().filter(|w| w.starts_with('/')) {
            assert!(
                Path::new(word).starts_with(root),
                "README line {n}: `{word}` is outside the directories tests/readme.rs maps"
            );
        }
        let out = Command::new("sh").arg("-c").arg(&cmd).output().unwrap();
        assert!(
            out.status.success(),
            "README line {n}: `{cmd}`: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if code.contains("ssh-keygen -y") {
            let words: Vec<&str> = code.split_whitespace().collect();
            let file = words
                .iter()
                .position(|w| *w == "-f")
                .and_then(|i| words.get(i + 1))
                .unwrap_or_else(|| panic!("README line {n}: `ssh-keygen -y` without `-f FILE`"));
            public.insert(
                PathBuf::from(file),
                String::from_utf8_lossy(&out.stdout).trim().to_string(),
            );
        }
    }
    let key_of = |node: &str, doc: &Doc, key: &str| -> String {
        let path = remap(&doc.string(key).expect(key), &roots[node]);
        let line = public.get(Path::new(&path)).unwrap_or_else(|| {
            panic!(
                "the README's ssh-keygen commands print no public line for {} `{key}` ({path})",
                doc.origin()
            )
        });
        line.split_whitespace().nth(1).unwrap().to_string()
    };
    let link_key = key_of(&link.node, link, "key_file");
    let door_host_key = key_of(&door.node, door, "host_key_file");

    // Each node's documents (with the server's wg0.yaml from its own
    // snippet), WireGuard keys paired, host ports free.
    let nodes: Vec<(String, Vec<Doc>)> = [link.node.clone(), door.node.clone()]
        .into_iter()
        .map(|n| {
            let own: Vec<Doc> = docs
                .iter()
                .filter(|d| d.block == link.block && d.node == n)
                .cloned()
                .collect();
            (n, with_companions(own, &docs))
        })
        .collect();
    let wg = |docs: &[Doc]| -> Doc {
        let wg: Vec<&Doc> = docs.iter().filter(|d| d.kind() == "wireguard").collect();
        assert_eq!(wg.len(), 1, "one WireGuard instance per node: {wg:?}");
        wg[0].clone()
    };
    let wg_port = {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        udp.local_addr().unwrap().port()
    };
    let mut wg_public = HashMap::new();
    for (n, members) in &nodes {
        let doc = wg(members);
        let path = remap(
            &doc.string("private_key_file").expect("private_key_file"),
            &roots[n.as_str()],
        );
        let (private, public) = wg_keypair();
        write_secret(Path::new(&path), &format!("{private}\n"));
        wg_public.insert(n.clone(), public);
    }
    let readme_listen_port = nodes
        .iter()
        .find_map(|(_, m)| wg(m).value()?.get("listen_port")?.as_u64())
        .expect("the server's listen_port");
    let mut configs = Vec::new();
    for (n, members) in &nodes {
        let other = nodes.iter().find(|(o, _)| o != n).unwrap().0.clone();
        let cfg = common::ConfigDir::new();
        let filled: Vec<Doc> = members
            .iter()
            .map(|d| {
                let mut d = d.clone();
                match d.kind().as_str() {
                    "ssh_link" => {
                        d.text = replace_once(&d.text, "ssh-ed25519 AAAA...", &format!("ssh-ed25519 {door_host_key}"))
                    }
                    "ssh" => {
                        d.text = replace_once(&d.text, "ssh-ed25519 AAAA...", &format!("ssh-ed25519 {link_key}"))
                    }
                    "wireguard" => {
                        let v = d.value().unwrap();
                        let peers = v["peers"].as_sequence().expect("peers");
                        assert_eq!(peers.len(), 1, "{}: one peer, the other node", d.origin());
                        let readme_key = peers[0]["public_key"].as_str().unwrap();
                        d.text = replace_once(&d.text, readme_key, &wg_public[&other]);
                        if let Some(p) = v.get("listen_port").and_then(Value::as_u64) {
                            d.text = replace_once(&d.text, &format!("listen_port: {p}\n"), &format!("listen_port: {wg_port}\n"));
                        }
                        if let Some(e) = peers[0].get("endpoint").and_then(Value::as_str) {
                            assert!(
                                e.ends_with(&format!(":{readme_listen_port}")),
                                "{}: the endpoint {e} is not the server's listen_port {readme_listen_port}",
                                d.origin()
                            );
                            d.text = replace_once(&d.text, e, &format!("127.0.0.1:{wg_port}"));
                        }
                        // Not the host's /var/run/wireguard, which other
                        // tests' interfaces may use.
                        d.text.push_str("uapi: off\n");
                    }
                    _ => {}
                }
                let v = d.value().unwrap();
                if let (Some(listen), None) = (v.get("listen").and_then(Value::as_str), v.get("listen_via")) {
                    d.text = replace_once(
                        &d.text,
                        &format!("listen: {listen}"),
                        &format!("listen: 127.0.0.1:{}", common::free_port()),
                    );
                }
                d
            })
            .collect();
        lay_out(&filled, cfg.path(), &roots[n.as_str()], None);
        configs.push((n.clone(), cfg));
    }
    let mut running = Vec::new();
    for (n, cfg) in &configs {
        let out = common::check(cfg.path());
        assert!(
            out.status.success(),
            "{n}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        running.push((n.clone(), common::Meshgate::start(cfg)));
    }
    let (_, link_node) = running.iter().find(|(n, _)| *n == link.node).unwrap();
    let instance = link.tenant_instance().unwrap().1;
    let status = || {
        link_node
            .json("/api/v1/modules")
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["instance"] == instance)
            .unwrap()["details"]
            .clone()
    };
    let logs = || {
        running
            .iter()
            .map(|(n, m)| format!("--- {n}\n{}", m.log_text()))
            .collect::<String>()
    };
    assert!(
        common::wait_until(Duration::from_secs(20), || status()["connected"] == true),
        "the README's ssh_link did not link up: {}\n{}",
        status(),
        logs()
    );
    assert_eq!(
        status()["public_key"]
            .as_str()
            .unwrap()
            .split_whitespace()
            .nth(1),
        Some(link_key.as_str()),
        "the link uses the key the README's ssh-keygen made"
    );
}

#[test]
fn every_refusal_reason_has_a_row_in_the_readme() {
    let text = readme();
    let rows: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("| `") && l.split('|').count() == 4)
        .collect();
    for r in meshgate::core::spine::reject::RejectReason::ALL {
        let cell = format!("| `{}` |", r.as_str());
        let n = rows.iter().filter(|l| l.starts_with(&cell)).count();
        assert!(
            n >= 1,
            "README has no row for meshgate_rejected_total{{reason=\"{r}\"}}"
        );
    }
}
