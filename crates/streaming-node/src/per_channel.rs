//! One task per pchannel a node serves: what the flusher and the delegator both run, started
//! when a pchannel starts serving here and aborted when it stops, moves or changes term.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard},
};

use walden_common::Term;

use crate::{
    channel::{Channel, Health},
    manager::WalManager,
};

/// Aborts its task when dropped: a task that must not outlive its owner's scope.
#[derive(Debug)]
pub struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A pchannel's running task, the term it runs under, and what it shares (`T`).
#[derive(Debug)]
pub struct Running<T> {
    pub term: Term,
    pub state: T,
    task: tokio::task::AbortHandle,
}

/// The tasks of a node's served pchannels.
#[derive(Debug)]
pub struct PerChannel<T> {
    running: Mutex<HashMap<String, Running<T>>>,
}

impl<T> Default for PerChannel<T> {
    fn default() -> Self {
        Self {
            running: Mutex::new(HashMap::new()),
        }
    }
}

impl<T: Send + 'static> PerChannel<T> {
    /// Follows `manager` until its change feed ends: `start` runs for each serving pchannel
    /// without a task (returning what the task shares, and the task); `stopped` after a task
    /// is aborted because its pchannel stopped serving here, moved, or changed term.
    pub fn follow(
        self: &Arc<Self>,
        manager: Arc<WalManager>,
        start: impl Fn(&Arc<Channel>) -> (T, tokio::task::JoinHandle<()>) + Send + Sync + 'static,
        stopped: impl Fn(&str) + Send + Sync + 'static,
    ) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let mut changes = manager.changes();
            loop {
                this.reconcile(&manager.channels(), &start, &stopped);
                if changes.changed().await.is_err() {
                    break;
                }
            }
            for (name, r) in this.lock().drain() {
                r.task.abort();
                stopped(&name);
            }
        })
    }

    fn reconcile(
        &self,
        channels: &[Arc<Channel>],
        start: &impl Fn(&Arc<Channel>) -> (T, tokio::task::JoinHandle<()>),
        stopped: &impl Fn(&str),
    ) {
        let mut running = self.lock();
        running.retain(|name, r| {
            let keep = channels
                .iter()
                .any(|c| c.name() == name && c.term() == r.term)
                && !r.task.is_finished();
            if !keep {
                r.task.abort();
                stopped(name);
            }
            keep
        });
        for ch in channels {
            if running.contains_key(ch.name()) || *ch.health().borrow() != Health::Serving {
                continue;
            }
            let (state, task) = start(ch);
            running.insert(
                ch.name().to_owned(),
                Running {
                    term: ch.term(),
                    state,
                    task: task.abort_handle(),
                },
            );
        }
    }

    /// Whether a task runs for `pchannel`.
    pub fn serves(&self, pchannel: &str) -> bool {
        self.lock().contains_key(pchannel)
    }

    /// The running tasks, by pchannel.
    pub fn lock(&self) -> MutexGuard<'_, HashMap<String, Running<T>>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }
}
