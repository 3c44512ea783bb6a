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

use std::{sync::Arc, time::Duration};

use tracing::{info, warn};
use walden_metastore_api::MetaStore;
use walden_object_store::Blobs;
use walden_streaming_node::{
    channel::{Channel, Health},
    manager::WalManager,
    per_channel::PerChannel,
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
    /// Per served pchannel: its flusher, and what it knows.
    running: Arc<PerChannel<Arc<View>>>,
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
            running: Arc::default(),
        }))
    }

    /// Follows `manager`: a flusher for every pchannel it serves, under the term it serves it
    /// with. Ends when the manager's change feed does.
    pub fn follow(self: &Arc<Self>, manager: Arc<WalManager>) -> tokio::task::JoinHandle<()> {
        let ctx = self.ctx.clone();
        self.running.follow(
            manager,
            move |ch| {
                let view = Arc::new(View::default());
                let task = tokio::spawn(supervise(ch.clone(), ctx.clone(), view.clone()));
                (view, task)
            },
            |_| {},
        )
    }

    /// What the flusher of the pchannel holding `vchannel` knows of it, if this node runs one.
    pub(crate) fn view_of(
        &self,
        vchannel: &str,
    ) -> Option<(
        walden_proto::v1::VChannelManifest,
        Vec<walden_proto::v1::SegmentInfo>,
    )> {
        let running = self.running.lock();
        running.values().find_map(|r| {
            r.state
                .vchannels
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(vchannel)
                .cloned()
        })
    }

    /// Whether this node runs the flusher of `pchannel`.
    pub(crate) fn serves(&self, pchannel: &str) -> bool {
        self.running.serves(pchannel)
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
