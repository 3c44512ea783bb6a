//! A real etcd (Debian's `etcd-server`) on free ports of 127.0.0.1, for tests: one member, or a
//! cluster of several (three processes, one raft group). Members can be killed and started
//! again on the same ports and data, to test what an etcd restart, a lost leader and a lost
//! quorum do.

use std::{
    io::{self, Read, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// One etcd process of a cluster.
#[derive(Debug)]
struct Member {
    name: String,
    child: Option<Child>,
    data: PathBuf,
    client_port: u16,
    peer_port: u16,
    /// Another address the client port also listens on (a test network's).
    also_on: Option<String>,
}

/// An etcd cluster of one or more members. Killed when dropped.
#[derive(Debug)]
pub struct EtcdServer {
    members: Vec<Member>,
    _dir: Option<tempfile::TempDir>,
    data: PathBuf,
}

fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Member {
    fn client_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }

    fn spawn(&mut self, initial_cluster: &str) -> io::Result<()> {
        let client = self.client_url();
        let peer = self.peer_url();
        let listen = match &self.also_on {
            Some(ip) => format!("{client},http://{ip}:{}", self.client_port),
            None => client.clone(),
        };
        let log = std::fs::File::create(self.data.with_extension("log"))?;
        let child = Command::new("etcd")
            .arg("--name")
            .arg(&self.name)
            .arg("--data-dir")
            .arg(&self.data)
            .args(["--listen-client-urls", &listen])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", initial_cluster])
            .args(["--initial-cluster-token", "walden-test"])
            // Quick elections, so that a lost leader is replaced within a second or two.
            .args(["--heartbeat-interval", "100", "--election-timeout", "1000"])
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
        Ok(())
    }

    /// Whether this member answers its health check (a committed proposal: false without a
    /// quorum).
    fn healthy(&self) -> bool {
        http(self.client_port, "GET /health HTTP/1.0\r\n\r\n")
            .is_some_and(|b| b.contains("\"health\":\"true\""))
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn exited(&mut self) -> io::Result<Option<std::process::ExitStatus>> {
        match self.child.as_mut() {
            Some(c) => c.try_wait(),
            None => Ok(None),
        }
    }
}

/// One HTTP/1.0 exchange with a member's client port: the whole response, if any.
fn http(port: u16, request: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    s.write_all(request.as_bytes()).ok()?;
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    Some(body)
}

impl EtcdServer {
    /// Starts a one-member etcd in a fresh temporary directory and waits until it is healthy.
    pub fn start() -> io::Result<Self> {
        Self::start_cluster(1)
    }

    /// Starts an etcd cluster of `n` members (one process each) and waits until every member
    /// is healthy.
    pub fn start_cluster(n: usize) -> io::Result<Self> {
        Self::start_cluster_on(n, None)
    }

    /// Like [`EtcdServer::start_cluster`], each member's client port also listening on `ip`
    /// (an address of a test network; see [`EtcdServer::endpoints_on`]).
    pub fn start_cluster_on(n: usize, ip: Option<&str>) -> io::Result<Self> {
        let dir = tempfile::tempdir()?;
        let data = dir.path().join("etcd");
        let mut last = None;
        // Free ports are found by binding and releasing them; another process may take one in
        // between, so a start that fails is tried again on new ports.
        for _ in 0..5 {
            let mut members = Vec::new();
            for i in 0..n {
                members.push(Member {
                    name: format!("walden-test-{i}"),
                    child: None,
                    data: data.with_extension(format!("m{i}")),
                    client_port: free_port()?,
                    peer_port: free_port()?,
                    also_on: ip.map(str::to_owned),
                });
            }
            let mut s = Self {
                members,
                _dir: None,
                data: data.clone(),
            };
            match s.spawn_all() {
                Ok(()) => {
                    s._dir = Some(dir);
                    return Ok(s);
                }
                Err(e) => {
                    s.kill();
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("etcd did not start")))
    }

    fn initial_cluster(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url()))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn spawn_all(&mut self) -> io::Result<()> {
        let initial = self.initial_cluster();
        for m in &mut self.members {
            m.spawn(&initial)?;
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            for m in &mut self.members {
                if let Some(status) = m.exited()? {
                    m.child = None;
                    return Err(io::Error::other(format!(
                        "etcd {} exited at start ({status}); log: {}",
                        m.name,
                        m.data.with_extension("log").display()
                    )));
                }
            }
            if self.members.iter().all(Member::healthy) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(io::Error::other("etcd not healthy within 30 s"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Every member's client URL, comma-separated, as `--etcd` takes them.
    pub fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(Member::client_url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Every member's client URL on `ip` (the address given to
    /// [`EtcdServer::start_cluster_on`]), comma-separated.
    pub fn endpoints_on(&self, ip: &str) -> String {
        self.members
            .iter()
            .map(|m| format!("http://{ip}:{}", m.client_port))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// Whether a running member answers its health check (a committed proposal: false while
    /// the cluster has no quorum).
    pub fn healthy(&self) -> bool {
        self.members
            .iter()
            .any(|m| m.child.is_some() && m.healthy())
    }

    /// The index of the member that leads now, as a running member reports it.
    pub fn leader(&self) -> Option<usize> {
        for m in self.members.iter().filter(|m| m.child.is_some()) {
            let body = "{}";
            let req = format!(
                "POST /v3/maintenance/status HTTP/1.0\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\n\r\n{body}",
                body.len()
            );
            let Some(resp) = http(m.client_port, &req) else {
                continue;
            };
            let json = resp.split_once("\r\n\r\n").map_or("", |x| x.1);
            let Some(leader) = field(json, "\"leader\":\"") else {
                continue;
            };
            let Some(me) = field(json, "\"member_id\":\"") else {
                continue;
            };
            // This member's id is in its header; find the leader among the members by asking
            // each for its own id.
            if leader == me {
                return self.members.iter().position(|x| x.name == m.name);
            }
            for (i, other) in self.members.iter().enumerate() {
                if other.child.is_none() {
                    continue;
                }
                let Some(r) = http(other.client_port, &req) else {
                    continue;
                };
                let j = r.split_once("\r\n\r\n").map_or("", |x| x.1);
                if field(j, "\"member_id\":\"").as_deref() == Some(leader.as_str()) {
                    return Some(i);
                }
            }
        }
        None
    }

    /// kill -9 of member `i`.
    pub fn kill_member(&mut self, i: usize) {
        self.members[i].kill();
    }

    /// Starts member `i` again on its ports and data (after [`EtcdServer::kill_member`]).
    pub fn restart_member(&mut self, i: usize) -> io::Result<()> {
        let initial = self.initial_cluster();
        let m = &mut self.members[i];
        m.kill();
        m.spawn(&initial)
    }

    /// kill -9 of every member.
    pub fn kill(&mut self) {
        for m in &mut self.members {
            m.kill();
        }
    }

    /// Starts every member again on the same ports and data (after [`EtcdServer::kill`]).
    pub fn restart(&mut self) -> io::Result<()> {
        self.kill();
        self.spawn_all()
    }
}

/// The string value after `key` in a flat JSON text.
fn field(json: &str, key: &str) -> Option<String> {
    let rest = &json[json.find(key)? + key.len()..];
    Some(rest[..rest.find('"')?].to_owned())
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
    }
}
