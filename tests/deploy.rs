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
    let mut out = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(root().join("deploy/k8s"))
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
    let etc = tempfile::tempdir().unwrap();
    let spec = &deploy["spec"]["template"]["spec"];
    let mounts = spec["containers"][0]["volumeMounts"].as_array().unwrap();
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
                std::fs::write(&p, v.as_str().unwrap()).unwrap();
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
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("config OK (1 tenants, 2 module instances)"),
        "{text}"
    );
}
