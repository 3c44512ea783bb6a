//! The pchannels this node serves, each under the term it was assigned.
//!
//! The manager never chooses a pchannel or a term: whoever assigns does (the coordinator in a
//! cluster, [`crate::assigner`] in standalone). Opening under a term fences the storage with it
//! (an older writer can no longer append), recovers the state, and writes the fence TimeTick;
//! only then is the channel served. An assignment with a term below the one served is refused.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
    time::Instant,
};

use tracing::{error, info};
use walden_common::{HasErrorCode, Term};
use walden_metastore_api::MetaStore;
use walden_tso::TickSource;
use walden_wal_api::WalStorage;

use crate::{
    NodeConfig, NodeError,
    channel::{Channel, Health},
    metrics::Metrics,
};

/// The pchannels this node serves.
#[derive(Debug)]
pub struct WalManager {
    storage: Arc<dyn WalStorage>,
    meta: Arc<dyn MetaStore>,
    ticks: Arc<dyn TickSource>,
    config: NodeConfig,
    metrics: Metrics,
    channels: RwLock<HashMap<String, Arc<Channel>>>,
    /// Pchannels assigned here that could not be opened, with the last error.
    unopened: RwLock<HashMap<String, String>>,
    /// One open or close at a time per pchannel.
    opening: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    shutting_down: std::sync::atomic::AtomicBool,
    /// Bumped whenever the served set or a pchannel's open failure changes.
    changes: tokio::sync::watch::Sender<u64>,
}

impl WalManager {
    /// A manager serving nothing yet; pchannels come with [`WalManager::assign`].
    pub fn new(
        storage: Arc<dyn WalStorage>,
        meta: Arc<dyn MetaStore>,
        ticks: Arc<dyn TickSource>,
        config: NodeConfig,
        metrics: Metrics,
    ) -> Result<Arc<Self>, NodeError> {
        config.validate().map_err(NodeError::InvalidArgument)?;
        Ok(Arc::new(Self {
            storage,
            meta,
            ticks,
            config,
            metrics,
            channels: RwLock::new(HashMap::new()),
            unopened: RwLock::new(HashMap::new()),
            opening: std::sync::Mutex::new(HashMap::new()),
            shutting_down: std::sync::atomic::AtomicBool::new(false),
            changes: tokio::sync::watch::channel(0).0,
        }))
    }

    /// Standalone: a manager with its own timestamp oracle that serves every configured
    /// pchannel, raising their terms itself ([`crate::assigner`]).
    pub async fn start(
        storage: Arc<dyn WalStorage>,
        meta: Arc<dyn MetaStore>,
        config: NodeConfig,
        metrics: Metrics,
    ) -> Result<Arc<Self>, NodeError> {
        config.validate().map_err(NodeError::InvalidArgument)?;
        let window = std::time::Duration::from_millis(config.tso_window_ms);
        let oracle = Arc::new(walden_tso::Oracle::open(meta.clone(), window).await?);
        let ticks = Arc::new(walden_tso::LocalTicks::new(oracle));
        let names = config.pchannel_names();
        let manager = Self::new(storage, meta.clone(), ticks, config, metrics)?;
        crate::assigner::serve_locally(&manager, meta, names).await;
        Ok(manager)
    }

    /// Where this node's ticks come from (standalone: its own oracle, which also hands out
    /// tick batches to clients; see [`TickSource::server`]).
    pub fn ticks(&self) -> &Arc<dyn TickSource> {
        &self.ticks
    }

    pub(crate) fn set_unopened(&self, pchannel: &str, why: Option<String>) {
        let mut u = self.unopened.write().unwrap_or_else(|e| e.into_inner());
        let changed = match why {
            Some(w) => u.insert(pchannel.to_owned(), w).is_none(),
            None => u.remove(pchannel).is_some(),
        };
        drop(u);
        if changed {
            self.changed();
        }
    }

    fn changed(&self) {
        self.changes.send_modify(|n| *n += 1);
    }

    /// Resolves at each change of what this node serves (a pchannel opened, closed, or failed
    /// to open), so a watcher need not poll [`WalManager::statuses`].
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Every pchannel's status, those that could not be opened included (state `failed`).
    pub fn statuses(&self) -> Vec<walden_proto::v1::PChannelStatus> {
        let mut v: Vec<_> = self.channels().iter().map(|c| c.status()).collect();
        for (name, why) in self.unopened() {
            if !v.iter().any(|p| p.name == name) {
                v.push(walden_proto::v1::PChannelStatus {
                    name,
                    state: "failed".into(),
                    state_detail: why,
                    ..Default::default()
                });
            }
        }
        v.sort_by(|a, b| a.name.cmp(&b.name));
        for p in &mut v {
            p.wal_storage = self.storage.name().into();
        }
        v
    }

    /// Pchannels that are not open, with why (the last failure to open them).
    pub fn unopened(&self) -> Vec<(String, String)> {
        let mut v: Vec<_> = self
            .unopened
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        v.sort();
        v
    }

    fn pchannel_lock(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.opening
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(name.to_owned())
            .or_default()
            .clone()
    }

    fn serving(&self, name: &str) -> Option<Arc<Channel>> {
        self.channels
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    /// Serves `name` under `term`: a no-op if it is served under that term already; an older
    /// incarnation here is closed first. Returns once the channel is ready (or failed to open,
    /// which is also recorded for the status).
    pub async fn assign(
        self: &Arc<Self>,
        name: &str,
        term: Term,
    ) -> Result<Arc<Channel>, NodeError> {
        walden_common::validate_channel_name(name).map_err(NodeError::InvalidArgument)?;
        if self.shutting_down.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(NodeError::ShuttingDown);
        }
        let lock = self.pchannel_lock(name);
        let _one = lock.lock().await;
        if let Some(ch) = self.serving(name) {
            let healthy = *ch.health().borrow() == Health::Serving;
            if ch.term() == term && healthy {
                return Ok(ch);
            }
            if ch.term() > term {
                return Err(NodeError::TermMismatch {
                    pchannel: name.to_owned(),
                    requested: term,
                    current: ch.term(),
                });
            }
            self.take(name, &ch);
            ch.close().await;
        }
        match self.open_channel(name, term).await {
            Ok(ch) => {
                self.set_unopened(name, None);
                Ok(ch)
            }
            Err(e) => {
                error!(pchannel = name, %term, error = %e, code = %e.code(), "pchannel did not open");
                self.set_unopened(name, Some(e.to_string()));
                Err(e)
            }
        }
    }

    /// Stops serving `name` if it is served under `term` or an older one (`None`: any term),
    /// once what is queued is durable. Returns whether it was served.
    pub async fn remove(&self, name: &str, term: Option<Term>) -> bool {
        let lock = self.pchannel_lock(name);
        let _one = lock.lock().await;
        self.set_unopened(name, None);
        let Some(ch) = self.serving(name) else {
            return false;
        };
        if term.is_some_and(|t| ch.term() > t) {
            return false;
        }
        self.take(name, &ch);
        ch.close().await;
        info!(pchannel = name, term = %ch.term(), "pchannel closed");
        true
    }

    /// Removes `ch` from the served set if it is still the one served.
    fn take(&self, name: &str, ch: &Arc<Channel>) {
        let mut map = self.channels.write().unwrap_or_else(|e| e.into_inner());
        if map.get(name).is_some_and(|c| Arc::ptr_eq(c, ch)) {
            map.remove(name);
            drop(map);
            self.changed();
        }
    }

    async fn open_channel(&self, name: &str, term: Term) -> Result<Arc<Channel>, NodeError> {
        let started = Instant::now();
        let wal = self.storage.open(name, term).await?;
        let channel = Channel::start(
            wal,
            self.ticks.clone(),
            self.meta.clone(),
            self.config.clone(),
            self.metrics.clone(),
        );
        let recovered = match channel.recover_state().await {
            Ok(r) => r,
            // Damage in what the replay must read: the state past it is unknown, so the
            // pchannel serves reads only (its intact records), and says so.
            Err(e) if e.code() == walden_common::ErrorCode::Corrupted => {
                error!(pchannel = name, %term, error = %e, "pchannel damaged: serving reads only");
                channel.set_read_only(e.to_string());
                self.insert(name, &channel);
                return Ok(channel);
            }
            Err(e) => {
                channel.close().await;
                return Err(e);
            }
        };
        let ready = async {
            channel.write_first_time_tick().await?;
            channel.rollback_open_txns().await
        };
        let rolled_back = match ready.await {
            Ok(n) => n,
            Err(e) => {
                channel.close().await;
                return Err(e);
            }
        };
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
        self.insert(name, &channel);
        Ok(channel)
    }

    fn insert(&self, name: &str, channel: &Arc<Channel>) {
        self.channels
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_owned(), channel.clone());
        self.changed();
    }

    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    /// The channel serving `pchannel`; `term` 0 accepts any term.
    pub fn get(&self, pchannel: &str, term: u64) -> Result<Arc<Channel>, NodeError> {
        if self.shutting_down.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(NodeError::ShuttingDown);
        }
        let ch = self
            .serving(pchannel)
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

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Closes every channel once what is queued is durable.
    pub async fn shutdown(&self) {
        self.shutting_down
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let channels: Vec<_> = self
            .channels
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .map(|(_, c)| c)
            .collect();
        self.changed();
        futures::future::join_all(channels.iter().map(|c| c.close_on_shutdown())).await;
    }
}
