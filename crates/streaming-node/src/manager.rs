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

use tracing::{error, info, warn};
use walden_common::{HasErrorCode, Term};
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
    /// Pchannels that could not be opened yet, with the last error (retried with backoff).
    unopened: RwLock<HashMap<String, String>>,
    shutting_down: std::sync::atomic::AtomicBool,
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
            unopened: RwLock::new(HashMap::new()),
            shutting_down: std::sync::atomic::AtomicBool::new(false),
        });
        // One task per pchannel: replay is CPU work, and this way it uses every core.
        let opens = manager.config.pchannel_names().into_iter().map(|name| {
            let m = manager.clone();
            tokio::spawn(async move { m.open_channel(&name).await })
        });
        let names = manager.config.pchannel_names();
        let mut failed = 0;
        // One pchannel that cannot open (damaged storage, a full disk) keeps only itself
        // down: the others serve, and it is retried with backoff.
        for (name, r) in names
            .into_iter()
            .zip(futures::future::join_all(opens).await)
        {
            let r = r.map_err(|e| NodeError::Internal(format!("opening a pchannel: {e}")));
            match r.and_then(|r| r) {
                Ok(channel) => {
                    tokio::spawn(supervise(Arc::downgrade(&manager), Some(channel), name));
                }
                Err(e) => {
                    failed += 1;
                    error!(pchannel = %name, error = %e, "pchannel did not open; retrying");
                    manager.set_unopened(&name, Some(e.to_string()));
                    tokio::spawn(supervise(Arc::downgrade(&manager), None, name));
                }
            }
        }
        info!(
            pchannels = manager.config.pchannels,
            failed,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "pchannels opened"
        );
        tokio::spawn(extend_tso(Arc::downgrade(&manager)));
        Ok(manager)
    }

    fn set_unopened(&self, pchannel: &str, why: Option<String>) {
        let mut u = self.unopened.write().unwrap_or_else(|e| e.into_inner());
        match why {
            Some(w) => {
                u.insert(pchannel.to_owned(), w);
            }
            None => {
                u.remove(pchannel);
            }
        }
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
        let recovered = match channel.recover_state().await {
            Ok(r) => r,
            // Damage in what the replay must read: the state past it is unknown, so the
            // pchannel serves reads only (its intact records), and says so.
            Err(e) if e.code() == walden_common::ErrorCode::Corrupted => {
                error!(pchannel = name, %term, error = %e, "pchannel damaged: serving reads only");
                channel.set_read_only(e.to_string());
                self.channels
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(name.to_owned(), channel.clone());
                return Ok(channel);
            }
            Err(e) => return Err(e),
        };
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
        if self.shutting_down.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(NodeError::ShuttingDown);
        }
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
        self.shutting_down
            .store(true, std::sync::atomic::Ordering::SeqCst);
        futures::future::join_all(channels.iter().map(|c| c.close_on_shutdown())).await;
    }
}

/// A channel that fails sooner than this after opening counts as the same trouble: the backoff
/// before the next reopen keeps growing instead of starting over, so a fault that every
/// incarnation hits (a full disk, damage) cannot raise terms in a tight loop.
const STABLE_AFTER: Duration = Duration::from_secs(30);

/// Watches one pchannel; when its storage fails, closes it and reopens it (recovering the WAL)
/// under a new term, with backoff, then goes on watching the new incarnation. Starts from
/// `None` for a pchannel whose first open failed.
async fn supervise(
    manager: std::sync::Weak<WalManager>,
    mut channel: Option<Arc<Channel>>,
    name: String,
) {
    let mut backoff = Duration::from_millis(100);
    let mut opened_at = Instant::now();
    loop {
        if let Some(ch) = channel.take() {
            let mut health = ch.health();
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
                    // Reopening would take the log back from its new owner, who would take it
                    // back in turn: the pchannel stays down here (state `fenced`) until an
                    // operator (or, in a cluster, the coordinator) decides.
                    Health::Fenced(why) => {
                        error!(pchannel = %name, reason = %why, "pchannel taken over by another writer; not reopening");
                        return;
                    }
                }
            };
            warn!(pchannel = %name, reason = %why, "reopening the pchannel");
            ch.close().await;
            if opened_at.elapsed() >= STABLE_AFTER {
                backoff = Duration::from_millis(100);
            }
        }
        loop {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
            let Some(m) = manager.upgrade() else { return };
            match m.open_channel(&name).await {
                Ok(c) => {
                    m.set_unopened(&name, None);
                    opened_at = Instant::now();
                    channel = Some(c);
                    break;
                }
                Err(e) => {
                    warn!(pchannel = %name, error = %e, "reopen failed; retrying");
                    m.set_unopened(&name, Some(e.to_string()));
                }
            }
        }
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
