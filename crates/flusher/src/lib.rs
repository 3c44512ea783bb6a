//! Recovery storage, historical half: what turns streaming data into historical data.
//!
//! Every pchannel a node serves gets a flusher ([`pchannel`]), which reads the pchannel like
//! any consumer and, for each sealed segment, writes its rows as Parquet files to the object
//! store ([`files`]), and the vchannel's deletes as delta files. A segment becomes part of
//! its collection only when its vchannel's manifest in the metastore names it ([`manifest`]):
//! that compare-and-swap, guarded by the pchannel's term, is the only commit point. The
//! flusher also saves each vchannel's flushed-through position, truncates the WAL behind the
//! lowest of them (and the retention floor, [`retention`]), deletes files no manifest names,
//! and compacts small segments and delete logs.
//!
//! [`Flushers`] follows what a [`WalManager`] serves: a flusher starts when a pchannel opens
//! (after a restart or a move) and stops when it closes. [`service`] answers what the
//! flushers know (`walden segments`, `walden flush --wait`).

mod compact;
mod config;
mod error;
pub mod manifest;
mod metrics;
mod pchannel;
pub mod retention;
pub mod service;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use tracing::{info, warn};
use walden_common::Term;
use walden_metastore_api::MetaStore;
use walden_object_store::Blobs;
use walden_streaming_node::{
    channel::{Channel, Health},
    manager::WalManager,
};

pub use config::{CompactionConfig, FlushConfig, RetentionConfig};
pub use error::FlushError;
pub use metrics::Metrics;
pub use pchannel::vchannel_prefix;
/// The file format the flusher writes.
pub use walden_segment_format as files;

use pchannel::{Ctx, View};

/// The flushers of one node's pchannels.
#[derive(Debug)]
pub struct Flushers {
    ctx: Arc<Ctx>,
    /// Per served pchannel: the term its flusher runs under, and what it knows.
    running: Mutex<HashMap<String, Running>>,
}

#[derive(Debug)]
struct Running {
    term: Term,
    view: Arc<View>,
    task: tokio::task::AbortHandle,
}

impl Flushers {
    pub fn new(
        meta: Arc<dyn MetaStore>,
        blobs: Arc<dyn Blobs>,
        config: FlushConfig,
        retention: RetentionConfig,
        metrics: Metrics,
    ) -> Result<Arc<Self>, FlushError> {
        config.validate().map_err(FlushError::Format)?;
        Ok(Arc::new(Self {
            ctx: Arc::new(Ctx {
                meta,
                blobs,
                config,
                retention,
                metrics,
            }),
            running: Mutex::new(HashMap::new()),
        }))
    }

    /// Follows `manager`: a flusher for every pchannel it serves, under the term it serves it
    /// with. Ends when the manager's change feed does.
    pub fn follow(self: &Arc<Self>, manager: Arc<WalManager>) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let mut changes = manager.changes();
            loop {
                this.reconcile(&manager.channels());
                if changes.changed().await.is_err() {
                    break;
                }
            }
            this.stop_all();
        })
    }

    fn reconcile(&self, channels: &[Arc<Channel>]) {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        running.retain(|name, r| {
            let keep = channels
                .iter()
                .any(|c| c.name() == name && c.term() == r.term)
                && !r.task.is_finished();
            if !keep {
                r.task.abort();
            }
            keep
        });
        for ch in channels {
            if running.contains_key(ch.name()) || *ch.health().borrow() != Health::Serving {
                continue;
            }
            let view = Arc::new(View::default());
            let task = tokio::spawn(supervise(ch.clone(), self.ctx.clone(), view.clone()));
            running.insert(
                ch.name().to_owned(),
                Running {
                    term: ch.term(),
                    view,
                    task: task.abort_handle(),
                },
            );
        }
    }

    fn stop_all(&self) {
        for (_, r) in self
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
        {
            r.task.abort();
        }
    }

    /// What the flusher of the pchannel holding `vchannel` knows of it, if this node runs one.
    pub(crate) fn view_of(
        &self,
        vchannel: &str,
    ) -> Option<(
        walden_proto::v1::VChannelManifest,
        Vec<walden_proto::v1::SegmentInfo>,
    )> {
        let running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        running.values().find_map(|r| {
            r.view
                .vchannels
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(vchannel)
                .cloned()
        })
    }

    /// Whether this node runs the flusher of `pchannel`.
    pub(crate) fn serves(&self, pchannel: &str) -> bool {
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(pchannel)
    }

    pub(crate) fn blobs(&self) -> &Arc<dyn Blobs> {
        &self.ctx.blobs
    }
}

/// Runs a pchannel's flusher while the channel serves, starting it again (from the
/// manifests) after a failure, with backoff.
async fn supervise(ch: Arc<Channel>, ctx: Arc<Ctx>, view: Arc<View>) {
    let mut backoff = Duration::from_millis(200);
    loop {
        if *ch.health().borrow() != Health::Serving {
            return;
        }
        match pchannel::run(ch.clone(), ctx.clone(), view.clone()).await {
            Ok(()) => return,
            Err(e) if !e.is_retryable() => {
                info!(pchannel = ch.name(), error = %e, "flusher stopped");
                return;
            }
            Err(e) => {
                warn!(pchannel = ch.name(), error = %e, retry_in = ?backoff, "flusher failed; starting again from the manifests");
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}
