//! The UAPI socket of one interface: `<dir>/<interface>.sock`, mode 0600.
//!
//! Bound as wireguard-go binds it: a socket file that still accepts
//! connections belongs to a live process (an error: two processes cannot
//! both be `wg0`); one that refuses them is stale and replaced; anything
//! that is not a socket is left alone (an error). The mode is set between
//! `bind` and `listen`, so no one connects while it is wider. The file is
//! removed when the server is dropped, if it is still ours.
//!
//! A connection may carry several requests, one after the other (`wg` sends
//! one per connection). Lines, requests, open connections and silence are
//! bounded; a request that breaks a bound is answered with an errno and the
//! connection closed.

use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::{
    format_get, format_get_error, format_set_result, parse, InterfaceState, Request, SetRequest,
    UapiError, MAX_LINE, MAX_REQUEST,
};

/// Connections served at once per socket; more are closed at accept.
const MAX_CONNECTIONS: usize = 16;
/// How long a connection may stay silent (between or inside requests).
const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// `sun_path` holds 108 bytes, the terminating NUL included.
const MAX_SOCKET_PATH: usize = 107;

/// What the server asks of the instance it serves.
#[async_trait::async_trait]
pub trait UapiTarget: Send + Sync + 'static {
    /// The live state; `Err` (e.g. `ENODEV` while the interface restarts)
    /// is answered as the errno.
    fn state(&self) -> Result<InterfaceState, UapiError>;
    /// Applies a `set`, as a reload would; `Err` keeps the old config.
    async fn set(&self, req: SetRequest) -> Result<(), UapiError>;
}

/// A serving socket; stops and removes its file when dropped.
pub struct UapiServer {
    path: PathBuf,
    /// (device, inode) of the socket file we bound.
    file_id: (u64, u64),
    cancel: CancellationToken,
}

impl UapiServer {
    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for UapiServer {
    fn drop(&mut self) {
        self.cancel.cancel();
        // Only our own file: a later process may have replaced a socket it
        // found stale (we may have been stopped, not killed, too late).
        let ours =
            std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.file_id);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn context(e: io::Error, what: String) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// Clears the way for a socket at `path`: nothing there, or a stale socket
/// (removed). A live socket is `AddrInUse`; anything else is left alone.
fn clear_stale(path: &Path) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(context(e, format!("cannot inspect {}", path.display()))),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{} exists and is not a socket; not replacing it",
                path.display()
            ),
        ));
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!(
                "{} is served by another live process (it has an interface of this name)",
                path.display()
            ),
        )),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            tracing::info!(socket = %path.display(), "replacing a stale UAPI socket");
            std::fs::remove_file(path)
                .map_err(|e| context(e, format!("cannot remove stale {}", path.display())))
        }
        Err(e) => Err(context(e, format!("cannot probe {}", path.display()))),
    }
}

/// Binds `path` with mode 0600 before anyone can connect.
fn bind_private(path: &Path) -> io::Result<UnixListener> {
    use socket2::{Domain, SockAddr, Socket, Type};
    let socket = Socket::new(Domain::UNIX, Type::STREAM, None)?;
    socket.bind(&SockAddr::unix(path)?)?;
    // Bound but not listening: connects are refused until listen().
    let listening = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| socket.listen(128))
        .and_then(|()| socket.set_nonblocking(true));
    if let Err(e) = listening {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    UnixListener::from_std(std::os::unix::net::UnixListener::from(socket))
}

/// Binds `dir/<name>.sock` (mode 0600; `dir` is created 0755 if missing) and
/// serves `target` on it. Must run inside a tokio runtime.
pub fn serve(dir: &Path, name: &str, target: Arc<dyn UapiTarget>) -> io::Result<UapiServer> {
    let path = dir.join(format!("{name}.sock"));
    if path.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} is longer than a socket path may be ({MAX_SOCKET_PATH} bytes)",
                path.display()
            ),
        ));
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(|e| context(e, format!("cannot create {}", dir.display())))?;
    clear_stale(&path)?;
    let listener =
        bind_private(&path).map_err(|e| context(e, format!("cannot bind {}", path.display())))?;
    let meta = std::fs::symlink_metadata(&path)?;
    let cancel = CancellationToken::new();
    tokio::spawn(accept_loop(
        listener,
        target,
        cancel.clone(),
        name.to_string(),
    ));
    Ok(UapiServer {
        path,
        file_id: (meta.dev(), meta.ino()),
        cancel,
    })
}

async fn accept_loop(
    listener: UnixListener,
    target: Arc<dyn UapiTarget>,
    cancel: CancellationToken,
    name: String,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let conn = tokio::select! {
            _ = cancel.cancelled() => return,
            c = listener.accept() => c,
        };
        match conn {
            Ok((stream, _)) => {
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    tracing::warn!(interface = %name, "too many UAPI connections; closing one");
                    continue;
                };
                let (t, n, c) = (target.clone(), name.clone(), cancel.clone());
                tokio::spawn(async move {
                    let _slot = slot;
                    tokio::select! {
                        _ = c.cancelled() => {}
                        r = serve_conn(stream, t) => if let Err(e) = r {
                            tracing::debug!(interface = %n, error = %e, "UAPI connection ended");
                        }
                    }
                });
            }
            Err(e) => {
                tracing::warn!(interface = %name, error = %e, "UAPI accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// What the next request on a connection is.
enum Next {
    /// A whole request, without its closing empty line.
    Request(Vec<u8>),
    /// A request that broke a bound: answer, then close.
    Refused(UapiError),
    /// The peer closed (or fell silent).
    Closed,
}

async fn read_request<R: tokio::io::AsyncBufRead + Unpin>(r: &mut R) -> io::Result<Next> {
    let mut request = Vec::new();
    loop {
        let mut line = Vec::new();
        let mut limited = (&mut *r).take(MAX_LINE as u64 + 1);
        let n = match tokio::time::timeout(READ_TIMEOUT, limited.read_until(b'\n', &mut line)).await
        {
            Ok(n) => n?,
            Err(_) => return Ok(Next::Closed),
        };
        if n == 0 {
            return Ok(Next::Closed);
        }
        if line.last() != Some(&b'\n') {
            if line.len() > MAX_LINE {
                return Ok(Next::Refused(super::invalid("line too long")));
            }
            return Ok(Next::Closed); // closed mid-line
        }
        if line == b"\n" {
            return Ok(Next::Request(request));
        }
        if request.len() + line.len() > MAX_REQUEST {
            return Ok(Next::Refused(super::invalid("request too long")));
        }
        request.extend_from_slice(&line);
    }
}

/// The answer to one request.
async fn answer(request: &[u8], target: &dyn UapiTarget) -> String {
    let is_get = request.starts_with(b"get=1\n");
    match parse(request) {
        Ok(Request::Get) => match target.state() {
            Ok(s) => format_get(&s),
            Err(e) => format_get_error(&e),
        },
        Ok(Request::Set(req)) => format_set_result(&target.set(req).await),
        Err(e) => {
            tracing::info!(error = %e, "UAPI request refused");
            if is_get {
                format_get_error(&e)
            } else {
                format_set_result(&Err(e))
            }
        }
    }
}

/// Serves requests on one connection until it closes.
async fn serve_conn(stream: tokio::net::UnixStream, target: Arc<dyn UapiTarget>) -> io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    loop {
        match read_request(&mut r).await? {
            Next::Request(req) => {
                let text = answer(&req, target.as_ref()).await;
                w.write_all(text.as_bytes()).await?;
            }
            Next::Refused(e) => {
                tracing::info!(error = %e, "UAPI request refused");
                w.write_all(format_set_result(&Err(e)).as_bytes()).await?;
                return Ok(());
            }
            Next::Closed => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{errno, PeerState};
    use super::*;
    use std::sync::Mutex;
    use tokio::net::UnixStream;

    struct Fake {
        up: Mutex<bool>,
        sets: Mutex<Vec<SetRequest>>,
    }

    #[async_trait::async_trait]
    impl UapiTarget for Fake {
        fn state(&self) -> Result<InterfaceState, UapiError> {
            if !*self.up.lock().unwrap() {
                return Err(UapiError {
                    errno: errno::ENODEV,
                    message: "down".into(),
                });
            }
            Ok(InterfaceState {
                private_key: [1; 32],
                listen_port: 51820,
                peers: vec![PeerState {
                    public_key: [2; 32],
                    preshared_key: None,
                    endpoint: None,
                    last_handshake: None,
                    tx_bytes: 1,
                    rx_bytes: 2,
                    persistent_keepalive: 0,
                    allowed_ips: vec![],
                }],
            })
        }
        async fn set(&self, req: SetRequest) -> Result<(), UapiError> {
            let refuse = req.listen_port == Some(1);
            self.sets.lock().unwrap().push(req);
            if refuse {
                return Err(UapiError {
                    errno: errno::EADDRINUSE,
                    message: "port 1".into(),
                });
            }
            Ok(())
        }
    }

    fn fake() -> Arc<Fake> {
        Arc::new(Fake {
            up: Mutex::new(true),
            sets: Mutex::new(Vec::new()),
        })
    }

    /// Writes `req`, reads one answer (up to its closing empty line).
    async fn ask(s: &mut BufReader<UnixStream>, req: &str) -> String {
        s.get_mut().write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        loop {
            let mut line = String::new();
            if s.read_line(&mut line).await.unwrap() == 0 {
                return out;
            }
            out.push_str(&line);
            if line == "\n" {
                return out;
            }
        }
    }

    #[tokio::test]
    async fn serves_get_and_set_on_a_private_socket() {
        let dir = tempfile::tempdir().unwrap();
        let sock_dir = dir.path().join("run/wireguard");
        let target = fake();
        let server = serve(&sock_dir, "wg0", target.clone()).unwrap();
        let path = sock_dir.join("wg0.sock");
        assert_eq!(server.path(), path);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        // Several requests, one connection.
        let mut s = BufReader::new(UnixStream::connect(&path).await.unwrap());
        let get = ask(&mut s, "get=1\n\n").await;
        assert!(get.starts_with(&format!(
            "private_key={}\nlisten_port=51820\n",
            "01".repeat(32)
        )));
        assert!(get.ends_with("rx_bytes=2\npersistent_keepalive_interval=0\nerrno=0\n\n"));
        let pk = "02".repeat(32);
        assert_eq!(
            ask(
                &mut s,
                &format!("set=1\npublic_key={pk}\nallowed_ip=10.0.0.2/32\n\n")
            )
            .await,
            "errno=0\n\n"
        );
        assert_eq!(
            ask(&mut s, "set=1\nlisten_port=1\n\n").await,
            "errno=-98\n\n"
        );
        // Malformed: an errno, and the connection goes on.
        assert_eq!(ask(&mut s, "set=1\nremove=true\n\n").await, "errno=-22\n\n");
        assert_eq!(ask(&mut s, "set=1\nbogus\n\n").await, "errno=-71\n\n");
        assert_eq!(ask(&mut s, "hello\n\n").await, "errno=-71\n\n");
        assert_eq!(ask(&mut s, "get=1\nx=1\n\n").await, "errno=22\n\n");
        *target.up.lock().unwrap() = false;
        assert_eq!(ask(&mut s, "get=1\n\n").await, "errno=19\n\n");
        assert_eq!(target.sets.lock().unwrap().len(), 2);

        // A line past the bound: refused, then closed.
        let long = format!("set=1\nendpoint={}\n\n", "9".repeat(MAX_LINE + 10));
        assert_eq!(ask(&mut s, &long).await, "errno=-22\n\n");
        let mut rest = String::new();
        assert_eq!(s.read_line(&mut rest).await.unwrap(), 0, "closed");

        // Stop: the socket file goes.
        drop(server);
        assert!(!path.exists());
    }

    #[tokio::test]
    async fn live_stale_and_foreign_files_at_the_socket_path() {
        let dir = tempfile::tempdir().unwrap();
        let first = serve(dir.path(), "wg0", fake()).unwrap();
        // Live: refused, and the live one keeps its file.
        let e = serve(dir.path(), "wg0", fake()).err().unwrap();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse, "{e}");
        assert!(e.to_string().contains("another live process"), "{e}");
        assert!(UnixStream::connect(first.path()).await.is_ok());

        // Stale (its process gone without cleaning up): replaced.
        let stale = dir.path().join("wg1.sock");
        drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
        assert!(stale.exists());
        let second = serve(dir.path(), "wg1", fake()).unwrap();
        let mut s = BufReader::new(UnixStream::connect(&stale).await.unwrap());
        assert!(ask(&mut s, "get=1\n\n").await.ends_with("errno=0\n\n"));

        // Not a socket: left alone.
        let file = dir.path().join("wg2.sock");
        std::fs::write(&file, "keep me").unwrap();
        let e = serve(dir.path(), "wg2", fake()).err().unwrap();
        assert!(e.to_string().contains("not a socket"), "{e}");
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");

        // A file that replaced ours is not removed when we stop.
        std::fs::remove_file(second.path()).unwrap();
        std::fs::write(second.path(), "someone else's").unwrap();
        let path = second.path().to_path_buf();
        drop(second);
        assert!(path.exists());

        // Too long a path for a socket.
        let deep = dir.path().join("d".repeat(120));
        let e = serve(&deep, "wg0", fake()).err().unwrap();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
        drop(first);
    }
}
