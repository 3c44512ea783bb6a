//! The machine's own limits: the disk's `write` + `fdatasync`, and a loopback round trip.

use super::*;

#[derive(Debug, Clone)]
pub(super) struct DiskResult {
    pub(super) size: usize,
    pub(super) ops: u64,
    pub(super) elapsed: Duration,
    pub(super) hist: Histogram<u64>,
}

impl DiskResult {
    pub(super) fn mib_per_s(&self) -> f64 {
        (self.ops * self.size as u64) as f64 / self.elapsed.as_secs_f64() / (1 << 20) as f64
    }
    pub(super) fn ms(&self, q: f64) -> f64 {
        ms(&self.hist, q)
    }
    pub(super) fn to_json(&self) -> Value {
        json!({
            "write_bytes": self.size,
            "syncs_per_s": round(self.ops as f64 / self.elapsed.as_secs_f64()),
            "mib_per_s": round(self.mib_per_s()),
            "latency_ms": {
                "p50": round(self.ms(0.5)), "p99": round(self.ms(0.99)),
                "p999": round(self.ms(0.999)), "max": round(self.hist.max() as f64 / 1000.0),
            },
        })
    }
    pub(super) fn table_row(&self, name: &str) -> String {
        let per_s = self.ops as f64 / self.elapsed.as_secs_f64();
        table_row(name, per_s, self.mib_per_s(), &self.hist, 0)
    }
}

/// Round trips over TCP on 127.0.0.1 for `duration`: `size` bytes out, an acknowledgement of a
/// produce result's size back, one at a time, blocking threads with `TCP_NODELAY` (no runtime,
/// no framing): what one append in flight pays for the network at best on this machine.
pub(super) fn loopback_probe(size: usize, duration: Duration) -> anyhow::Result<Histogram<u64>> {
    use std::io::{Read, Write};
    const ACK: usize = 40;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = listener.accept()?;
        s.set_nodelay(true)?;
        let mut buf = vec![0u8; size];
        let ack = [0u8; ACK];
        loop {
            match s.read_exact(&mut buf) {
                Ok(()) => s.write_all(&ack)?,
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    });
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    let out = vec![0x5au8; size];
    let mut ack = [0u8; ACK];
    let mut hist = new_hist();
    let start = Instant::now();
    while start.elapsed() < duration {
        let t = Instant::now();
        s.write_all(&out)?;
        s.read_exact(&mut ack)?;
        let _ = hist.record((t.elapsed().as_micros() as u64).max(1));
    }
    drop(s);
    echo.join()
        .map_err(|_| anyhow::anyhow!("the loopback probe's echo thread panicked"))??;
    Ok(hist)
}

/// Writes `size` bytes and `fdatasync`s, in a loop, for `duration`: what a log that syncs every
/// commit of that size can do at best on this file system (one file, one writer). Like the
/// WAL, it writes into space zero-filled a few MiB ahead, so that a sync changes no file size
/// (about half the cost of a sync that appends, on ext4 here): the fastest way we know to make
/// `size` bytes durable, and so the honest limit to compare with.
pub(super) fn disk_probe(
    dir: &Path,
    size: usize,
    duration: Duration,
) -> anyhow::Result<DiskResult> {
    use std::os::unix::fs::FileExt;
    const AHEAD: u64 = 4 << 20;
    let path = dir.join(format!(".walden-disk-probe-{}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    let buf = vec![0xa5u8; size];
    let zeros = vec![0u8; AHEAD as usize];
    let mut hist = new_hist();
    let start = Instant::now();
    let mut ops = 0u64;
    let mut written = 0u64;
    let mut zeroed = 0u64;
    while start.elapsed() < duration {
        let t = Instant::now();
        while written + size as u64 > zeroed {
            f.write_all_at(&zeros, zeroed)?;
            zeroed += AHEAD;
        }
        f.write_all_at(&buf, written)?;
        f.sync_data()?;
        let _ = hist.record((t.elapsed().as_micros() as u64).max(1));
        ops += 1;
        written += size as u64;
        // Keep the file bounded, like a log that rolls segments.
        if written > 256 << 20 {
            f.set_len(0)?;
            written = 0;
            zeroed = 0;
        }
    }
    let elapsed = start.elapsed();
    drop(f);
    let _ = std::fs::remove_file(&path);
    Ok(DiskResult {
        size,
        ops,
        elapsed,
        hist,
    })
}
