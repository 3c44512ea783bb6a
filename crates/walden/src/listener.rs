//! What the gRPC port admits: at most `server.max_connections` connections, a deadline for
//! the HTTP/2 preface, and accept errors (EMFILE, ENFILE, ...) that back off instead of
//! spinning. Without these, ~1 100 idle connections took the process's file descriptors and
//! the accept loop span at 90% CPU with every call, `/healthz` included, timing out.

use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
    time::{Instant, Sleep},
};
use tonic::transport::server::{Connected, TcpConnectInfo};
use tracing::warn;

/// Bytes of the HTTP/2 connection preface a client sends first.
const PREFACE_BYTES: usize = 24;

/// Limits of the gRPC listener.
#[derive(Clone, Copy, Debug)]
pub struct Admission {
    pub max_connections: usize,
    /// A connection that has not sent the HTTP/2 preface by then is closed.
    pub handshake_timeout: Duration,
}

/// Warns at most once per interval, counting what it did not say.
#[derive(Debug)]
struct RateLimited {
    every: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimited {
    fn new(every: Duration) -> Self {
        Self {
            every,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(suppressed since the last one)` when a warning may be logged now.
    fn allow(&mut self) -> Option<u64> {
        self.allow_at(Instant::now())
    }

    fn allow_at(&mut self, now: Instant) -> Option<u64> {
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < self.every)
        {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// The accepted connections, as tonic's incoming stream. Never yields an error: accept errors
/// are logged (rate-limited) and retried after a backoff, so a descriptor shortage cannot turn
/// the loop into a spin.
pub fn incoming(
    listener: TcpListener,
    admission: Admission,
) -> impl futures::Stream<Item = io::Result<Admitted>> {
    struct St {
        listener: TcpListener,
        admission: Admission,
        slots: Arc<Semaphore>,
        refused_log: RateLimited,
        error_log: RateLimited,
    }
    let st = St {
        listener,
        admission,
        slots: Arc::new(Semaphore::new(admission.max_connections)),
        refused_log: RateLimited::new(Duration::from_secs(10)),
        error_log: RateLimited::new(Duration::from_secs(10)),
    };
    futures::stream::unfold(st, |mut st| async move {
        let mut backoff = Duration::from_millis(10);
        loop {
            match st.listener.accept().await {
                Ok((stream, peer)) => {
                    let Ok(permit) = st.slots.clone().try_acquire_owned() else {
                        // Closed at once: the client sees a reset, not a hang.
                        drop(stream);
                        if let Some(more) = st.refused_log.allow() {
                            warn!(
                                %peer,
                                max_connections = st.admission.max_connections,
                                refused_since_last_warning = more,
                                "connection refused: server.max_connections reached"
                            );
                        }
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    let admitted = Admitted {
                        stream,
                        _permit: permit,
                        preface_left: PREFACE_BYTES,
                        deadline: Box::pin(tokio::time::sleep(st.admission.handshake_timeout)),
                    };
                    return Some((Ok(admitted), st));
                }
                Err(e) => {
                    if let Some(more) = st.error_log.allow() {
                        warn!(
                            error = %e,
                            errors_since_last_warning = more,
                            "accept failed; backing off (out of file descriptors?)"
                        );
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    })
}

/// An admitted connection: holds its slot until dropped, and fails its reads if the HTTP/2
/// preface does not arrive in time.
#[derive(Debug)]
pub struct Admitted {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
    /// Preface bytes still expected; 0 once the handshake is under way.
    preface_left: usize,
    deadline: Pin<Box<Sleep>>,
}

impl Connected for Admitted {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Admitted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        let r = Pin::new(&mut this.stream).poll_read(cx, buf);
        if this.preface_left == 0 {
            return r;
        }
        if let Poll::Ready(Ok(())) = &r {
            this.preface_left = this
                .preface_left
                .saturating_sub(buf.filled().len() - before);
            return r;
        }
        if r.is_pending() && this.deadline.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no HTTP/2 preface within server.handshake_timeout_ms",
            )));
        }
        r
    }
}

impl AsyncWrite for Admitted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Raises the soft limit on open files to the hard limit (the soft one is often 1 024 where
/// the hard one is far higher) and returns (soft before, soft now).
pub fn raise_fd_limit() -> io::Result<(u64, u64)> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let lim = getrlimit(Resource::Nofile);
    let before = lim.current.unwrap_or(u64::MAX);
    if lim.current.is_some() && lim.current != lim.maximum {
        let raised = rustix::process::Rlimit {
            current: lim.maximum,
            maximum: lim.maximum,
        };
        setrlimit(Resource::Nofile, raised).map_err(io::Error::from)?;
    }
    let now = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
    Ok((before, now))
}

/// Descriptors kept back from connections: WAL segments, the metastore, the metrics
/// endpoint, logs.
pub const FD_RESERVE: u64 = 128;

/// The connection limit to use: the configured one, lowered so that connections cannot take
/// the descriptors the rest of the server needs.
pub fn effective_max_connections(configured: usize, fd_limit: u64) -> usize {
    let room = fd_limit.saturating_sub(FD_RESERVE).max(1);
    configured
        .min(usize::try_from(room).unwrap_or(usize::MAX))
        .max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_never_get_the_descriptors_the_server_needs() {
        assert_eq!(
            effective_max_connections(10_000, 1024),
            1024 - FD_RESERVE as usize
        );
        assert_eq!(effective_max_connections(100, 1024), 100);
        assert_eq!(effective_max_connections(100, 10), 1);
    }

    #[test]
    fn warnings_are_rate_limited_and_count_what_they_held_back() {
        let mut r = RateLimited::new(Duration::from_secs(10));
        let t = Instant::now();
        assert_eq!(r.allow_at(t), Some(0));
        assert_eq!(r.allow_at(t + Duration::from_secs(1)), None);
        assert_eq!(r.allow_at(t + Duration::from_secs(9)), None);
        assert_eq!(r.allow_at(t + Duration::from_secs(11)), Some(2));
    }
}
