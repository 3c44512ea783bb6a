//! The Redis Streams peer: `redis-server` with `appendonly yes` and `appendfsync always`, so a
//! reply means the entry is fsynced, the same durability as a Walden acknowledgement. Spoken to
//! with a minimal pipelined RESP client (XADD, XREAD, XRANGE) to keep the bench lean.

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use bytes::Bytes;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{
        TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
};
use walden_common::test_host::TestHost;

/// A redis-server the bench started, on a private directory and a loopback address of its own
/// (port 6379 there: no port is picked and released for it, and a restart binds the same one).
pub struct RedisServer {
    child: Child,
    pub addr: String,
    host: TestHost,
    _dir: tempfile::TempDir,
}

const PORT: &str = "6379";

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl RedisServer {
    /// Starts `redis-server` with fsync on every write; its data lives under `parent`.
    pub async fn start(parent: &Path) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("walden-bench-redis-")
            .tempdir_in(parent)?;
        let host = TestHost::claim()?;
        let child = spawn(dir.path(), host.ip())?;
        let server = Self {
            child,
            addr: format!("{}:{PORT}", host.ip()),
            host,
            _dir: dir,
        };
        server.wait_ready(Duration::from_secs(60)).await?;
        Ok(server)
    }

    pub fn pid(&self) -> String {
        self.child.id().to_string()
    }

    /// kill -9 and start again on the same data; returns the time until it serves again.
    pub async fn kill_and_restart(&mut self) -> anyhow::Result<Duration> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let started = Instant::now();
        self.child = spawn(self._dir.path(), self.host.ip())?;
        self.wait_ready(Duration::from_secs(600)).await?;
        Ok(started.elapsed())
    }

    async fn wait_ready(&self, limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            // While loading its append-only file Redis answers -LOADING; ready means PONG.
            if let Ok(mut c) = Conn::connect(&self.addr).await
                && c.command(&[b"PING"]).await.is_ok()
            {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "redis-server did not become ready"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn spawn(dir: &Path, ip: &str) -> anyhow::Result<Child> {
    Command::new("redis-server")
        .args([
            "--port",
            PORT,
            "--bind",
            ip,
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--save",
            "",
            "--protected-mode",
            "no",
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
        ])
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting redis-server (install it with scripts/install-bench-peers.sh)")
}

/// A RESP value.
#[derive(Debug)]
pub enum Resp {
    Simple,
    Int,
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Resp>>),
}

/// One pipelined connection.
pub struct Conn {
    r: ConnReader,
    w: ConnWriter,
}

/// The sending half of a connection.
pub struct ConnWriter {
    w: OwnedWriteHalf,
    buf: Vec<u8>,
}

/// The receiving half of a connection: replies, in command order.
pub struct ConnReader {
    r: BufReader<OwnedReadHalf>,
}

impl Conn {
    pub async fn connect(addr: &str) -> anyhow::Result<Self> {
        let s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        let (r, w) = s.into_split();
        Ok(Self {
            r: ConnReader {
                r: BufReader::with_capacity(1 << 16, r),
            },
            w: ConnWriter {
                w,
                buf: Vec::with_capacity(4096),
            },
        })
    }

    /// Sends and receives apart, so replies are read as they arrive while commands are paced.
    pub fn split(self) -> (ConnWriter, ConnReader) {
        (self.w, self.r)
    }

    pub async fn command(&mut self, args: &[&[u8]]) -> anyhow::Result<Resp> {
        self.w.send(args).await?;
        self.r.reply().await
    }
}

impl ConnWriter {
    /// Sends one command without waiting for its reply.
    pub async fn send(&mut self, args: &[&[u8]]) -> anyhow::Result<()> {
        self.buf.clear();
        self.buf
            .extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
        for a in args {
            self.buf
                .extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            self.buf.extend_from_slice(a);
            self.buf.extend_from_slice(b"\r\n");
        }
        self.w.write_all(&self.buf).await?;
        Ok(())
    }

    /// `XADD key * d payload`.
    pub async fn send_xadd(&mut self, key: &[u8], payload: &Bytes) -> anyhow::Result<()> {
        self.send(&[b"XADD", key, b"*", b"d", payload]).await
    }
}

impl ConnReader {
    /// Reads the next reply (replies come in command order).
    pub async fn reply(&mut self) -> anyhow::Result<Resp> {
        Box::pin(read_value(&mut self.r)).await
    }
}

async fn read_line(r: &mut BufReader<OwnedReadHalf>) -> anyhow::Result<Vec<u8>> {
    let mut line = Vec::new();
    let n = r.read_until(b'\n', &mut line).await?;
    if n == 0 {
        bail!("redis closed the connection");
    }
    line.truncate(line.len().saturating_sub(2));
    Ok(line)
}

async fn read_value(r: &mut BufReader<OwnedReadHalf>) -> anyhow::Result<Resp> {
    let line = read_line(r).await?;
    let (kind, rest) = line.split_first().context("empty RESP line")?;
    let num = || -> anyhow::Result<i64> { Ok(std::str::from_utf8(rest)?.parse()?) };
    Ok(match kind {
        b'+' => Resp::Simple,
        b'-' => bail!("redis error: {}", String::from_utf8_lossy(rest)),
        b':' => {
            num()?;
            Resp::Int
        }
        b'$' => {
            let n = num()?;
            if n < 0 {
                Resp::Bulk(None)
            } else {
                let mut data = vec![0u8; n as usize + 2];
                r.read_exact(&mut data).await?;
                data.truncate(n as usize);
                Resp::Bulk(Some(data))
            }
        }
        b'*' => {
            let n = num()?;
            if n < 0 {
                Resp::Array(None)
            } else {
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(Box::pin(read_value(r)).await?);
                }
                Resp::Array(Some(items))
            }
        }
        other => bail!("unexpected RESP type byte {other:#x}"),
    })
}

/// Entries of an XRANGE reply, `[[id, [field, value]], ...]`, as (id, value).
pub fn xrange_entries(v: Resp, out: &mut Vec<(Vec<u8>, Vec<u8>)>) {
    let Resp::Array(Some(items)) = v else { return };
    for item in items {
        let Resp::Array(Some(mut entry)) = item else {
            continue;
        };
        if entry.len() != 2 {
            continue;
        }
        let fields = entry.pop();
        let id = entry.pop();
        if let (Some(Resp::Bulk(Some(id))), Some(Resp::Array(Some(mut fields)))) = (id, fields)
            && fields.len() >= 2
            && let Resp::Bulk(Some(value)) = fields.swap_remove(1)
        {
            out.push((id, value));
        }
    }
}

/// Entries of an XREAD reply, `[[key, [[id, [field, value]], ...]], ...]`.
pub fn xread_entries(v: Resp, out: &mut Vec<(Vec<u8>, Vec<u8>)>) {
    let Resp::Array(Some(streams)) = v else {
        return;
    };
    for stream in streams {
        if let Resp::Array(Some(mut kv)) = stream
            && kv.len() == 2
            && let Some(entries) = kv.pop()
        {
            xrange_entries(entries, out);
        }
    }
}
