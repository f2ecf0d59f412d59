//! The packaging operators deploy with (`deploy/`): the systemd unit and
//! its drop-ins pass `systemd-analyze verify`, and the unit's exposure
//! (`systemd-analyze security --offline`) stays low; the Kubernetes
//! manifests validate against the API's schemas (`kubernetes-validate`
//! from PyPI) and keep every pod to Pod Security "restricted"; the
//! ConfigMap, laid out as the pods mount it, is a config `meshgate
//! --check` accepts.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{have, skip};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap()
}

/// The unit with ExecStart on the binary built here, and `drop_ins`
/// appended as systemd would merge them.
fn unit_with(dir: &Path, drop_ins: &[&str]) -> PathBuf {
    let mut text = read("deploy/systemd/meshgate.service")
        .replace("/usr/local/bin/meshgate", env!("CARGO_BIN_EXE_meshgate"));
    for d in drop_ins {
        text.push('\n');
        text.push_str(&read(&format!("deploy/systemd/meshgate.service.d/{d}")));
    }
    let p = dir.join("meshgate-test.service");
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn the_systemd_unit_verifies_and_exposes_little() {
    if !have("systemd-analyze") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for drop_ins in [&[][..], &["kernel-engine.conf"], &["capture.conf"]] {
        let unit = unit_with(dir.path(), drop_ins);
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&unit)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && text.trim().is_empty(),
            "{drop_ins:?}: {text}"
        );
    }
    let unit = unit_with(dir.path(), &[]);
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&unit)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let exposure: f64 = text
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for meshgate-test.service: ")
                .nth(1)
        })
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{text}"));
    eprintln!("systemd-analyze security: exposure {exposure}");
    assert!(exposure <= 2.0, "{text}");
}

/// `kubernetes-validate` from target/pydeps (scripts/test.sh installs it).
fn kubernetes_validate() -> Option<Command> {
    let deps = root().join("target/pydeps");
    let ok = Command::new("python3")
        .args(["-c", "import kubernetes_validate"])
        .env("PYTHONPATH", &deps)
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        skip("kubernetes-validate from PyPI (scripts/test.sh installs it into target/pydeps)");
        return None;
    }
    let mut c = Command::new("python3");
    c.args(["-m", "kubernetes_validate", "--strict"])
        .env("PYTHONPATH", deps);
    Some(c)
}

fn manifests() -> Vec<(String, serde_json::Value)> {
    manifests_in("deploy/k8s")
}

fn manifests_in(dir: &str) -> Vec<(String, serde_json::Value)> {
    let mut out = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(root().join(dir))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for doc in serde_norway::Deserializer::from_str(&text) {
            let v: serde_json::Value = serde::Deserialize::deserialize(doc).unwrap();
            if !v.is_null() {
                out.push((f.file_name().unwrap().to_string_lossy().into(), v));
            }
        }
    }
    out
}

/// What Pod Security "restricted" (and a read-only root file system)
/// forbids in a pod spec: each violation, named.
fn restricted_violations(spec: &serde_json::Value) -> Vec<String> {
    let mut v = Vec::new();
    let pod = &spec["securityContext"];
    for host in ["hostNetwork", "hostPID", "hostIPC"] {
        if spec[host] == true {
            v.push(format!("{host}: true"));
        }
    }
    for vol in spec["volumes"].as_array().into_iter().flatten() {
        let allowed = [
            "configMap",
            "secret",
            "emptyDir",
            "projected",
            "downwardAPI",
            "persistentVolumeClaim",
            "csi",
            "ephemeral",
        ];
        let kind = vol
            .as_object()
            .unwrap()
            .keys()
            .find(|k| *k != "name")
            .cloned()
            .unwrap_or_default();
        if !allowed.contains(&kind.as_str()) {
            v.push(format!("volume {}: {kind}", vol["name"]));
        }
    }
    for c in spec["containers"].as_array().into_iter().flatten() {
        let sc = &c["securityContext"];
        let name = c["name"].as_str().unwrap_or("?");
        if !(sc["runAsNonRoot"] == true || pod["runAsNonRoot"] == true) {
            v.push(format!("{name}: runAsNonRoot not set"));
        }
        if sc["runAsUser"] == 0 || pod["runAsUser"] == 0 {
            v.push(format!("{name}: runAsUser 0"));
        }
        if sc["privileged"] == true {
            v.push(format!("{name}: privileged"));
        }
        if sc["allowPrivilegeEscalation"] != false {
            v.push(format!("{name}: allowPrivilegeEscalation not false"));
        }
        let drop = sc["capabilities"]["drop"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if !drop.iter().any(|d| d == "ALL") {
            v.push(format!("{name}: capabilities not dropped (ALL)"));
        }
        let add = sc["capabilities"]["add"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if add.iter().any(|a| a != "NET_BIND_SERVICE") {
            v.push(format!("{name}: capabilities added {add:?}"));
        }
        let seccomp = sc["seccompProfile"]["type"]
            .as_str()
            .or(pod["seccompProfile"]["type"].as_str());
        if !matches!(seccomp, Some("RuntimeDefault" | "Localhost")) {
            v.push(format!("{name}: seccompProfile {seccomp:?}"));
        }
        if sc["readOnlyRootFilesystem"] != true {
            v.push(format!("{name}: root file system writable"));
        }
        if c["readinessProbe"].is_null() || c["livenessProbe"].is_null() {
            v.push(format!("{name}: no readiness or liveness probe"));
        }
    }
    v
}

#[test]
fn the_kubernetes_manifests_validate_and_keep_to_pod_security_restricted() {
    let Some(mut validate) = kubernetes_validate() else {
        return;
    };
    let files: Vec<PathBuf> = std::fs::read_dir(root().join("deploy/k8s"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let out = validate.args(&files).output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(!text.contains("ERROR"), "{text}");

    let all = manifests();
    let mut pods = 0;
    for (file, m) in &all {
        let spec = match m["kind"].as_str() {
            Some("Deployment" | "DaemonSet" | "StatefulSet") => &m["spec"]["template"]["spec"],
            Some("Pod") => &m["spec"],
            _ => continue,
        };
        pods += 1;
        let v = restricted_violations(spec);
        assert!(v.is_empty(), "{file}: {v:?}");
        assert_eq!(m["metadata"]["namespace"], "meshgate", "{file}");
    }
    assert!(pods >= 3, "{pods} pod templates");
    let ns = all.iter().find(|(_, m)| m["kind"] == "Namespace").unwrap();
    assert_eq!(
        ns.1["metadata"]["labels"]["pod-security.kubernetes.io/enforce"],
        "restricted"
    );
    // The checker itself: the same pod with one thing loosened fails.
    let (_, d) = all.iter().find(|(f, _)| f == "deployment.yaml").unwrap();
    let mut loose = d["spec"]["template"]["spec"].clone();
    loose["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = true.into();
    loose["containers"][0]["securityContext"]["capabilities"]["add"] =
        serde_json::json!(["NET_ADMIN"]);
    assert_eq!(restricted_violations(&loose).len(), 2);
}

/// The ConfigMap's files where the Deployment mounts them (its `items`),
/// the Secret's where it mounts those: `meshgate --check` accepts them, in
/// a mount namespace where /etc is the pod's.
#[test]
fn the_configmap_is_a_config_meshgate_accepts() {
    if !have("unshare") {
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        skip("needs root (a mount namespace to lay out the pod's /etc)");
        return;
    }
    let all = manifests();
    let find = |kind: &str, file: &str| {
        all.iter()
            .find(|(f, m)| m["kind"] == kind && f == file)
            .map(|(_, m)| m.clone())
            .unwrap()
    };
    let cm = find("ConfigMap", "configmap.yaml");
    let secret = find("Secret", "secret.yaml");
    let deploy = find("Deployment", "deployment.yaml");
    let (ok, text) = check_as_mounted(&cm, &secret, &deploy, 0);
    assert!(ok, "{text}");
    assert!(
        text.contains("config OK (1 tenants, 2 module instances)"),
        "{text}"
    );
}

/// Lays out the ConfigMap's and the Secret's files where container
/// `container` of `deploy` mounts them (under /etc, in a mount namespace
/// with a tmpfs /etc) and runs `meshgate --check` there: (passed, output).
fn check_as_mounted(
    cm: &serde_json::Value,
    secret: &serde_json::Value,
    deploy: &serde_json::Value,
    container: usize,
) -> (bool, String) {
    let etc = tempfile::tempdir().unwrap();
    let spec = &deploy["spec"]["template"]["spec"];
    let mounts = spec["containers"][container]["volumeMounts"]
        .as_array()
        .unwrap();
    for vol in spec["volumes"].as_array().unwrap() {
        let Some(mount) = mounts.iter().find(|m| m["name"] == vol["name"]) else {
            continue;
        };
        let at = mount["mountPath"].as_str().unwrap();
        let Some(rel) = at.strip_prefix("/etc/") else {
            continue;
        };
        let base = etc.path().join(rel);
        if let Some(items) = vol["configMap"]["items"].as_array() {
            for it in items {
                let p = base.join(it["path"].as_str().unwrap());
                std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                std::fs::write(
                    &p,
                    cm["data"][it["key"].as_str().unwrap()].as_str().unwrap(),
                )
                .unwrap();
            }
        } else if vol["secret"].is_object() {
            std::fs::create_dir_all(&base).unwrap();
            for (k, v) in secret["stringData"].as_object().unwrap() {
                let p = base.join(k);
                let mut v = v.as_str().unwrap().to_string();
                // What the manifest tells the operator to put there.
                if v.starts_with("REPLACE with the output of: meshgatectl genkey") {
                    let out = Command::new(env!("CARGO_BIN_EXE_meshgatectl"))
                        .arg("genkey")
                        .output()
                        .unwrap();
                    v = String::from_utf8(out.stdout).unwrap();
                }
                if v.starts_with("REPLACE with the output of: openssl rand -hex 32") {
                    let out = Command::new("openssl")
                        .args(["rand", "-hex", "32"])
                        .output()
                        .unwrap();
                    v = String::from_utf8(out.stdout).unwrap();
                }
                std::fs::write(&p, v).unwrap();
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o400)).unwrap();
            }
        }
    }
    let script = format!(
        "mount -t tmpfs none /etc && cp -a {}/. /etc/ && {} --config-dir /etc/meshgate --check",
        etc.path().display(),
        env!("CARGO_BIN_EXE_meshgate")
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// deploy/pod-egress: the manifests validate; only the init container holds
/// a capability (NET_ADMIN, NET_RAW) and it runs the very rules
/// tests/netns_capture.rs applies; meshgate and the application keep to
/// Pod Security "restricted" as uids 1337 and 1000; the ConfigMap is a
/// config meshgate accepts where the pod mounts it.
#[test]
fn the_pod_egress_recipe_validates_and_only_its_init_step_holds_net_admin() {
    let Some(mut validate) = kubernetes_validate() else {
        return;
    };
    let out = validate
        .arg(root().join("deploy/pod-egress/deployment.yaml"))
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && !text.contains("ERROR"), "{text}");
    let all = manifests_in("deploy/pod-egress");
    let find = |kind: &str| {
        all.iter()
            .find(|(_, m)| m["kind"] == kind)
            .map(|(_, m)| m.clone())
            .unwrap()
    };
    let deploy = find("Deployment");
    let spec = &deploy["spec"]["template"]["spec"];
    assert!(
        restricted_violations(spec).is_empty(),
        "{:?}",
        restricted_violations(spec)
    );
    let uid = |name: &str| {
        spec["containers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap()["securityContext"]["runAsUser"]
            .as_u64()
            .unwrap()
    };
    assert_eq!((uid("meshgate"), uid("app")), (1337, 1000));
    let inits = spec["initContainers"].as_array().unwrap();
    assert_eq!(inits.len(), 1);
    assert_eq!(
        inits[0]["securityContext"]["capabilities"]["add"],
        serde_json::json!(["NET_ADMIN", "NET_RAW"])
    );
    let command: Vec<&str> = inits[0]["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(
        command.join(" "),
        "meshgatectl capture rules --uid 1000 --exclude-uid 1337 --port 15001 --apply"
    );
    // The rules it would apply name those uids and that port.
    let printed = Command::new(env!("CARGO_BIN_EXE_meshgatectl"))
        .args(&command[1..command.len() - 1])
        .output()
        .unwrap();
    let rules = String::from_utf8_lossy(&printed.stdout);
    assert!(
        rules.contains("--uid-owner 1000 -j MESHGATE")
            && rules.contains("--uid-owner 1337 -j RETURN")
            && rules.contains("REDIRECT --to-ports 15001"),
        "{rules}"
    );
    // SAFETY: geteuid has no preconditions.
    if !have("unshare") || unsafe { libc::geteuid() } != 0 {
        return;
    }
    let (ok, text) = check_as_mounted(&find("ConfigMap"), &find("Secret"), &deploy, 0);
    assert!(ok, "{text}");
    assert!(
        text.contains("config OK (1 tenants, 3 module instances)"),
        "{text}"
    );
}
