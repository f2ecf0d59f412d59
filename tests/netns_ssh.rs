//! The SSH door in network namespaces (root): a client in the cloud-native
//! namespace jumps through meshgate (`ssh -J`) into a real `sshd` in the
//! legacy namespace and runs a command; 100 MB through `ssh -L` arrive
//! intact.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::netns::*;
use common::*;

#[test]
fn ssh_jump_through_meshgate_into_a_real_sshd_and_100mb_through_a_forward() {
    let sshd = Path::new("/usr/sbin/sshd");
    if !can_netns() || !sshd.exists() || !have("ssh") || !have("python3") {
        skip("needs root, sshd, ssh, python3");
        return;
    }
    let cloud = Netns::new("sc");
    let gw = Netns::new("sg");
    let mut legacy = Netns::new("sl");
    link(&cloud, "10.241.1.2/24", &gw, "10.241.1.1/24");
    link(&gw, "10.241.2.1/24", &legacy, "10.241.2.2/24");

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let alice = ssh_keygen(d, "alice").1;
    // A real sshd in the legacy namespace, alice's key for root.
    let _ = ssh_keygen(d, "sshd_host").1;
    std::fs::write(d.join("root_keys"), format!("{alice}\n")).unwrap();
    std::fs::create_dir_all("/run/sshd").unwrap();
    std::fs::write(
        d.join("sshd_config"),
        format!(
            "Port 22\nListenAddress 10.241.2.2\nHostKey {}\nAuthorizedKeysFile {}\nPermitRootLogin prohibit-password\nPasswordAuthentication no\nStrictModes no\nUsePAM no\nPidFile none\n",
            d.join("sshd_host").display(),
            d.join("root_keys").display()
        ),
    )
    .unwrap();
    let mut sshd_cmd = legacy.cmd(sshd);
    sshd_cmd
        .arg("-D")
        .arg("-e")
        .arg("-f")
        .arg(d.join("sshd_config"))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    legacy.spawn(sshd_cmd);

    // meshgate in gw: the SSH door on the cloud side.
    let cfg = tempfile::tempdir().unwrap();
    std::fs::write(
        cfg.path().join("meshgate.yaml"),
        "admin: 127.0.0.1:9000\ndrain_timeout: 1s\n",
    )
    .unwrap();
    std::fs::create_dir_all(cfg.path().join("tenants/acme")).unwrap();
    std::fs::write(
        cfg.path().join("tenants/acme/ssh.yaml"),
        format!(
            "kind: ssh\nlisten: 10.241.1.1:2222\nhost_key_file: {}\nremote_forward_ip: 10.241.2.1\nauthorized_keys:\n  - {alice}\n",
            d.join("mg_host").display()
        ),
    )
    .unwrap();
    let mg = NsMeshgate::start(&gw, cfg.path(), "127.0.0.1:9000");

    // One ssh_config for the client and the jump (ssh -J passes -F on).
    std::fs::write(
        d.join("ssh_config"),
        format!(
            "Host *\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  BatchMode yes\n  IdentitiesOnly yes\n  IdentityFile {}\n  LogLevel ERROR\n  ConnectTimeout 10\n",
            d.join("alice").display()
        ),
    )
    .unwrap();
    let cfg_file = d.join("ssh_config").display().to_string();
    let ok = wait_until(Duration::from_secs(10), || {
        legacy
            .try_sh("ss -ltn | grep -q 10.241.2.2:22")
            .status
            .success()
    });
    assert!(ok, "sshd did not start");
    let out = cloud.try_sh(&format!(
        "ssh -F {cfg_file} -J alice@10.241.1.1:2222 root@10.241.2.2 'echo legacy says hi from $(hostname -I)'"
    ));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("legacy says hi from 10.241.2.2"),
        "{text}{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        mg.log_text()
    );

    // ssh -R from the cloud side publishes a service there to the legacy side.
    let mut cloud = cloud;
    let www = tempfile::tempdir().unwrap();
    std::fs::write(
        www.path().join("index.html"),
        "served from the cloud side\n",
    )
    .unwrap();
    let mut web = cloud.cmd("python3");
    web.args([
        "-m",
        "http.server",
        "8000",
        "--bind",
        "127.0.0.1",
        "--directory",
    ])
    .arg(www.path())
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    cloud.spawn(web);
    let mut r = cloud.cmd("ssh");
    r.args([
        "-F",
        &cfg_file,
        "-N",
        "-o",
        "ExitOnForwardFailure=yes",
        "-R",
        "8081:localhost:8000",
        "-p",
        "2222",
        "alice@10.241.1.1",
    ]);
    let publisher = cloud.spawn(r);
    let reached = wait_until(Duration::from_secs(10), || {
        legacy.curl("http://10.241.2.1:8081/", 3) == (200, "served from the cloud side\n".into())
    });
    assert!(reached, "{}", mg.log_text());
    let _ = publisher.kill();
    let _ = publisher.wait();
    assert!(
        wait_until(Duration::from_secs(5), || legacy
            .curl("http://10.241.2.1:8081/", 2)
            .0
            == 0),
        "the published port outlived the ssh client"
    );

    // 100 MB through ssh -L to a receiver in the legacy namespace: sha256 both ends.
    let mut recv = legacy.cmd("python3");
    recv.args([
        "-c",
        "import hashlib,socket\nsocket.setdefaulttimeout(120)\nl=socket.socket();l.bind(('10.241.2.2',9000));l.listen(1)\nprint('ready',flush=True)\nc,_=l.accept();h=hashlib.sha256();n=0\nwhile True:\n d=c.recv(1<<20)\n if not d: break\n h.update(d);n+=len(d)\nprint(n,h.hexdigest(),flush=True)",
    ])
    .stdout(Stdio::piped());
    let receiver = legacy.spawn(recv);
    let mut lines = BufReader::new(receiver.stdout.take().unwrap());
    let mut line = String::new();
    lines.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    let mut fwd = cloud.cmd("ssh");
    fwd.args([
        "-F",
        &cfg_file,
        "-N",
        "-o",
        "ExitOnForwardFailure=yes",
        "-L",
        "127.0.0.1:7000:10.241.2.2:9000",
        "-p",
        "2222",
        "alice@10.241.1.1",
    ]);
    cloud.spawn(fwd);
    let ok = wait_until(Duration::from_secs(10), || {
        cloud
            .try_sh("ss -ltn | grep -q 127.0.0.1:7000")
            .status
            .success()
    });
    assert!(ok, "the -L forward did not come up");
    let sent = cloud.try_sh(
        "python3 -c \"import hashlib,os,socket\nsocket.setdefaulttimeout(120)\ns=socket.create_connection(('127.0.0.1',7000));h=hashlib.sha256();b=bytearray(os.urandom(1<<20))\nfor i in range(100):\n b[:8]=i.to_bytes(8,'little');s.sendall(b);h.update(b)\ns.shutdown(socket.SHUT_WR);s.recv(1)\nprint(100<<20,h.hexdigest())\"",
    );
    assert!(
        sent.status.success(),
        "{}",
        String::from_utf8_lossy(&sent.stderr)
    );
    line.clear();
    lines.read_line(&mut line).unwrap();
    assert_eq!(
        line.trim(),
        String::from_utf8_lossy(&sent.stdout).trim(),
        "the bytes changed on the way"
    );
}

/// Removes a namespace's own hosts file (`ip netns exec` bind-mounts
/// `/etc/netns/NAME/hosts` over `/etc/hosts`).
struct NsHosts(std::path::PathBuf);
impl NsHosts {
    fn new(ns: &Netns, text: &str) -> NsHosts {
        let dir = Path::new("/etc/netns").join(&ns.name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("hosts"), text).unwrap();
        NsHosts(dir)
    }
}
impl Drop for NsHosts {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Cloud-Gateway's topology without a single pipe: the cloud-native
/// client's meshgate has a WireGuard tunnel to the server, an SSH link to
/// the server's SSH door *through that tunnel*, and a SOCKS door whose vnet
/// routes everything over the link. `curl --socks5-hostname ... http://nginx/`
/// reaches nginx in the legacy network, `nginx` resolved on the server's
/// side (its hosts file), never on the client's.
#[test]
fn socks_on_the_client_reaches_legacy_nginx_by_name_over_ssh_in_wireguard() {
    if !can_netns() || !have("ssh-keygen") || !have("nginx") || !have("curl") {
        skip("needs root, ssh-keygen, nginx, curl");
        return;
    }
    let cloud = Netns::new("cc");
    let server = Netns::new("cs");
    let mut legacy = Netns::new("cl");
    link(&cloud, "10.242.1.2/24", &server, "10.242.1.1/24");
    link(&server, "10.242.2.1/24", &legacy, "10.242.2.10/24");
    let _nginx = nginx_in(&mut legacy, "10.242.2.10:80", "legacy nginx\n");
    let _hosts = NsHosts::new(&server, "127.0.0.1 localhost\n10.242.2.10 nginx\n");
    // The name resolves on the server's side (so the lookup below could
    // succeed), and not on the client's.
    assert!(server.try_sh("getent hosts nginx").status.success());
    assert!(
        !cloud.try_sh("getent hosts nginx").status.success(),
        "the client must not know the name"
    );

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let door_host = ssh_keygen(d, "door_host").1;
    let link_pub = ssh_keygen(d, "link_key").1;
    let (server_key, client_key) = (
        meshgate::core::keys::PrivateKey::generate(),
        meshgate::core::keys::PrivateKey::generate(),
    );
    let srv = tempfile::tempdir().unwrap();
    let sd = srv.path().join("tenants/default");
    std::fs::create_dir_all(&sd).unwrap();
    std::fs::write(
        srv.path().join("meshgate.yaml"),
        "node: server\nadmin: 127.0.0.1:9000\n",
    )
    .unwrap();
    std::fs::write(
        sd.join("wg0.yaml"),
        format!(
            "kind: wireguard\nprivate_key: {}\nlisten_port: 51820\naddress: 10.192.0.1/24\npeers:\n  - name: client\n    public_key: {}\n    allowed_ips: [10.192.0.2/32]\n",
            server_key.to_base64(),
            client_key.public_key()
        ),
    )
    .unwrap();
    std::fs::write(
        sd.join("door.yaml"),
        format!(
            "kind: ssh\nlisten: 10.192.0.1:2222\nlisten_via: wg0\nhost_key_file: {}\nauthorized_keys:\n  - {link_pub}\n",
            d.join("door_host").display()
        ),
    )
    .unwrap();
    let cli = tempfile::tempdir().unwrap();
    let cd = cli.path().join("tenants/default");
    std::fs::create_dir_all(&cd).unwrap();
    std::fs::write(
        cli.path().join("meshgate.yaml"),
        "node: client\nadmin: 127.0.0.1:9000\n",
    )
    .unwrap();
    std::fs::write(
        cd.join("wg0.yaml"),
        format!(
            "kind: wireguard\nprivate_key: {}\naddress: 10.192.0.2/32\npeers:\n  - name: server\n    public_key: {}\n    endpoint: 10.242.1.1:51820\n    allowed_ips: [10.192.0.1/32]\n    persistent_keepalive: 5\n",
            client_key.to_base64(),
            server_key.public_key()
        ),
    )
    .unwrap();
    std::fs::write(
        cd.join("legacy.yaml"),
        format!(
            "kind: ssh_link\nserver: 10.192.0.1:2222\nserver_via: wg0\nhost_key: {door_host}\nkey_file: {}\n",
            d.join("link_key").display()
        ),
    )
    .unwrap();
    std::fs::write(
        cd.join("net.yaml"),
        "kind: vnet\nroutes:\n  - to: \"*\"\n    via: legacy\n",
    )
    .unwrap();
    std::fs::write(
        cd.join("socks.yaml"),
        "kind: socks\nlisten: 127.0.0.1:1080\n",
    )
    .unwrap();
    let mg_server = NsMeshgate::start(&server, srv.path(), "127.0.0.1:9000");
    let mg_client = NsMeshgate::start(&cloud, cli.path(), "127.0.0.1:9000");
    let get = || {
        let out =
            cloud.try_sh("curl -sS --max-time 5 --socks5-hostname 127.0.0.1:1080 http://nginx/");
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    assert!(
        wait_until(Duration::from_secs(20), || get() == "legacy nginx\n"),
        "curl through SOCKS → SSH → WireGuard:\nclient:\n{}\nserver:\n{}",
        mg_client.log_text(),
        mg_server.log_text()
    );
    // The client's audit line names the route over the link; the server's
    // door logged the link in and dialed the name.
    assert!(
        wait_until(Duration::from_secs(3), || mg_client
            .log_text()
            .contains("-> legacy")),
        "{}",
        mg_client.log_text()
    );
    assert!(
        mg_server.log_text().contains("SSH login"),
        "{}",
        mg_server.log_text()
    );
}
