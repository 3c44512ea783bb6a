//! Opens the node's pchannels and keeps them served.
//!
//! Each open takes a new term: the term is incremented in the metastore with a compare-and-swap
//! before the WAL is opened under it, so a term is never used twice, even across crashes. A
//! channel whose storage fails is closed and reopened (recovering its WAL) under the next term.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use tracing::{info, warn};
use walden_common::Term;
use walden_metastore_api::{MetaStore, increment};
use walden_wal_api::WalStorage;

use crate::{
    NodeConfig, NodeError,
    channel::{Channel, Health},
    metrics::Metrics,
    tso::Tso,
};

/// Metastore key of a pchannel's last term.
pub fn term_key(pchannel: &str) -> String {
    format!("walden/pchannel/{pchannel}/term")
}

/// The pchannels this node serves.
#[derive(Debug)]
pub struct WalManager {
    storage: Arc<dyn WalStorage>,
    meta: Arc<dyn MetaStore>,
    tso: Arc<Tso>,
    config: NodeConfig,
    metrics: Metrics,
    channels: RwLock<HashMap<String, Arc<Channel>>>,
}

impl WalManager {
    /// Opens every configured pchannel (recovering each) and starts supervising them.
    pub async fn start(
        storage: Arc<dyn WalStorage>,
        meta: Arc<dyn MetaStore>,
        config: NodeConfig,
        metrics: Metrics,
    ) -> Result<Arc<Self>, NodeError> {
        config.validate().map_err(NodeError::InvalidArgument)?;
        let started = Instant::now();
        let tso = Arc::new(Tso::open(&*meta, Duration::from_millis(config.tso_window_ms)).await?);
        let manager = Arc::new(Self {
            storage,
            meta,
            tso,
            config,
            metrics,
            channels: RwLock::new(HashMap::new()),
        });
        // One task per pchannel: replay is CPU work, and this way it uses every core.
        let opens = manager.config.pchannel_names().into_iter().map(|name| {
            let m = manager.clone();
            tokio::spawn(async move { m.open_channel(&name).await })
        });
        for r in futures::future::join_all(opens).await {
            let channel =
                r.map_err(|e| NodeError::Internal(format!("opening a pchannel: {e}")))??;
            tokio::spawn(supervise(Arc::downgrade(&manager), channel));
        }
        info!(
            pchannels = manager.config.pchannels,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "all pchannels ready"
        );
        tokio::spawn(extend_tso(Arc::downgrade(&manager)));
        Ok(manager)
    }

    async fn next_term(&self, pchannel: &str) -> Result<Term, NodeError> {
        Ok(Term(increment(&*self.meta, &term_key(pchannel)).await?))
    }

    async fn open_channel(self: &Arc<Self>, name: &str) -> Result<Arc<Channel>, NodeError> {
        let started = Instant::now();
        let term = self.next_term(name).await?;
        let wal = self.storage.open(name, term).await?;
        let channel = Channel::start(
            wal,
            self.tso.clone(),
            self.meta.clone(),
            self.config.clone(),
            self.metrics.clone(),
        );
        let recovered = channel.recover_state().await?;
        channel.write_first_time_tick().await?;
        let rolled_back = channel.rollback_open_txns().await?;
        let took = started.elapsed();
        channel.set_recovery_time(took);
        info!(
            pchannel = name,
            %term,
            recovery_ms = took.as_millis() as u64,
            replayed_messages = recovered.replayed,
            transactions_rolled_back = rolled_back,
            replay_from = %recovered.from,
            idempotent_messages_recognised = recovered.producer_messages,
            "pchannel ready"
        );
        self.channels
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_owned(), channel.clone());
        Ok(channel)
    }

    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    /// The channel serving `pchannel`; `term` 0 accepts any term.
    pub fn get(&self, pchannel: &str, term: u64) -> Result<Arc<Channel>, NodeError> {
        let ch = self
            .channels
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(pchannel)
            .cloned()
            .ok_or_else(|| NodeError::ChannelNotFound(pchannel.to_owned()))?;
        if term != 0 && Term(term) != ch.term() {
            return Err(NodeError::TermMismatch {
                pchannel: pchannel.to_owned(),
                requested: Term(term),
                current: ch.term(),
            });
        }
        Ok(ch)
    }

    /// Refreshes the gauges that are read, not pushed (buffer sizes, fsync counts).
    pub fn refresh_metrics(&self) {
        for c in self.channels() {
            let _ = c.status();
        }
        if let Some(n) = self.storage.sync_count() {
            self.metrics.wal_storage_syncs.set(n as i64);
        }
    }

    /// Every channel, by name.
    pub fn channels(&self) -> Vec<Arc<Channel>> {
        let mut v: Vec<_> = self
            .channels
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        v.sort_by(|a, b| a.name().cmp(b.name()));
        v
    }

    /// Closes every channel once what is queued is durable.
    pub async fn shutdown(&self) {
        let channels: Vec<_> = self
            .channels
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .map(|(_, c)| c)
            .collect();
        futures::future::join_all(channels.iter().map(|c| c.close())).await;
    }
}

/// Watches one pchannel; when its storage fails, closes it and reopens it (recovering the WAL)
/// under a new term, with backoff, then goes on watching the new incarnation.
async fn supervise(manager: std::sync::Weak<WalManager>, mut channel: Arc<Channel>) {
    loop {
        let mut health = channel.health();
        let why = loop {
            let state = health.borrow_and_update().clone();
            match state {
                Health::Serving => {
                    if health.changed().await.is_err() {
                        return;
                    }
                }
                Health::Closed => return,
                Health::Failed(why) => break why,
            }
        };
        let name = channel.name().to_owned();
        warn!(pchannel = %name, reason = %why, "reopening the pchannel");
        channel.close().await;
        let mut backoff = Duration::from_millis(100);
        channel = loop {
            let Some(m) = manager.upgrade() else { return };
            match m.open_channel(&name).await {
                Ok(c) => break c,
                Err(e) => warn!(pchannel = %name, error = %e, "reopen failed; retrying"),
            }
            drop(m);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        };
    }
}

/// Keeps the timestamp oracle's persisted window ahead of the clock.
async fn extend_tso(manager: std::sync::Weak<WalManager>) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        let Some(m) = manager.upgrade() else { return };
        if m.tso.wants_extension()
            && let Err(e) = m.tso.extend(&*m.meta).await
        {
            warn!(error = %e, "extending the timestamp window failed");
        }
    }
}
