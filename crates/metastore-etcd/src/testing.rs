//! A real etcd (Debian's `etcd-server`) on free ports of 127.0.0.1, for tests. It can be killed
//! and started again on the same ports and data, to test what an etcd restart does.

use std::{
    io::{self, Read, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// One single-member etcd. Killed when dropped.
#[derive(Debug)]
pub struct EtcdServer {
    child: Option<Child>,
    _dir: Option<tempfile::TempDir>,
    data: PathBuf,
    client_port: u16,
    peer_port: u16,
}

fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl EtcdServer {
    /// Starts etcd in a fresh temporary directory and waits until it is healthy.
    pub fn start() -> io::Result<Self> {
        let dir = tempfile::tempdir()?;
        let data = dir.path().join("etcd");
        let mut last = None;
        // Free ports are found by binding and releasing them; another process may take one in
        // between, so a start that fails is tried again on new ports.
        for _ in 0..5 {
            let mut s = Self {
                child: None,
                _dir: None,
                data: data.clone(),
                client_port: free_port()?,
                peer_port: free_port()?,
            };
            match s.spawn() {
                Ok(()) => {
                    s._dir = Some(dir);
                    return Ok(s);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("etcd did not start")))
    }

    /// The client URL, as `--etcd` takes it.
    pub fn endpoints(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    fn spawn(&mut self) -> io::Result<()> {
        let client = self.endpoints();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::File::create(self.data.with_extension("log"))?;
        let child = Command::new("etcd")
            .arg("--name")
            .arg("walden-test")
            .arg("--data-dir")
            .arg(&self.data)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .arg("--initial-cluster")
            .arg(format!("walden-test={peer}"))
            .args(["--log-level", "warn", "--logger", "zap"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("starting etcd (Debian package etcd-server; scripts/install-test-deps.sh installs it): {e}"),
                )
            })?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(c) = self.child.as_mut()
                && let Some(status) = c.try_wait()?
            {
                self.child = None;
                return Err(io::Error::other(format!(
                    "etcd exited at start ({status}); log: {}",
                    self.data.with_extension("log").display()
                )));
            }
            if self.healthy() {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.kill();
                return Err(io::Error::other("etcd not healthy within 20 s"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether etcd answers its health check (a committed proposal).
    pub fn healthy(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.client_port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        if s.write_all(b"GET /health HTTP/1.0\r\n\r\n").is_err() {
            return false;
        }
        let mut body = String::new();
        let _ = s.read_to_string(&mut body);
        body.contains("\"health\":\"true\"")
    }

    /// kill -9.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same ports and data (after [`EtcdServer::kill`]).
    pub fn restart(&mut self) -> io::Result<()> {
        self.kill();
        self.spawn()
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
    }
}
