//! A real etcd (Debian's `etcd-server`) for tests: one member, or a cluster of several (three
//! processes, one raft group). Each member listens on etcd's usual ports (2379, 2380) at a
//! loopback address of its own ([`TestHost`]), so no port is picked and released for it.
//! Members can be killed and started again on the same addresses and data, to test what an
//! etcd restart, a lost leader and a lost quorum do.

use std::{
    io::{self, Read, Write},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use walden_common::test_host::TestHost;

/// etcd's client and peer ports, on each member's own address.
const CLIENT_PORT: u16 = 2379;
const PEER_PORT: u16 = 2380;

/// One etcd process of a cluster.
#[derive(Debug)]
struct Member {
    name: String,
    child: Option<Child>,
    data: PathBuf,
    host: TestHost,
    /// Another address (a test network's) and port the member also serves clients on.
    also_on: Option<(String, u16)>,
}

/// An etcd cluster of one or more members. Killed when dropped.
#[derive(Debug)]
pub struct EtcdServer {
    members: Vec<Member>,
    _dir: Option<tempfile::TempDir>,
    data: PathBuf,
}

impl Member {
    fn client_url(&self) -> String {
        format!("http://{}:{CLIENT_PORT}", self.host.ip())
    }

    fn peer_url(&self) -> String {
        format!("http://{}:{PEER_PORT}", self.host.ip())
    }

    fn spawn(&mut self, initial_cluster: &str) -> io::Result<()> {
        let client = self.client_url();
        let peer = self.peer_url();
        let listen = match &self.also_on {
            Some((ip, port)) => format!("{client},http://{ip}:{port}"),
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
        http(self.host.ip(), "GET /health HTTP/1.0\r\n\r\n")
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

/// One HTTP/1.0 exchange with the member at `ip`: the whole response, if any.
fn http(ip: &str, request: &str) -> Option<String> {
    let mut s = TcpStream::connect((ip, CLIENT_PORT)).ok()?;
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

    /// Like [`EtcdServer::start_cluster`], each member also serving clients on `ip` (an
    /// address of a test network, which the test owns; member `i` on port 2379 + `i` there; see
    /// [`EtcdServer::endpoints_on`]).
    pub fn start_cluster_on(n: usize, ip: Option<&str>) -> io::Result<Self> {
        let dir = tempfile::tempdir()?;
        let data = dir.path().join("etcd");
        let mut members = Vec::new();
        for i in 0..n {
            members.push(Member {
                name: format!("walden-test-{i}"),
                child: None,
                data: data.with_extension(format!("m{i}")),
                host: TestHost::claim()?,
                also_on: ip.map(|ip| (ip.to_owned(), also_on_port(i))),
            });
        }
        let mut s = Self {
            members,
            _dir: Some(dir),
            data,
        };
        s.spawn_all()?;
        Ok(s)
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
            .enumerate()
            .map(|(i, _)| format!("http://{ip}:{}", also_on_port(i)))
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
            let Some(resp) = http(m.host.ip(), &req) else {
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
                let Some(r) = http(other.host.ip(), &req) else {
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

    /// Starts member `i` again on its address and data (after [`EtcdServer::kill_member`]).
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

    /// Starts every member again on the same addresses and data (after [`EtcdServer::kill`]).
    pub fn restart(&mut self) -> io::Result<()> {
        self.kill();
        self.spawn_all()
    }
}

/// Where member `i` also serves clients on a test network's address.
fn also_on_port(i: usize) -> u16 {
    CLIENT_PORT + u16::try_from(i).unwrap_or(0)
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
