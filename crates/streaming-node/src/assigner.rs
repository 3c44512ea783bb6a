//! Standalone's assigner: the coordinator's job for one process. It serves every configured
//! pchannel on the local manager, each under a new term taken from the metastore by
//! compare-and-swap (so a term is never used twice, even across crashes), and reopens a
//! pchannel whose storage failed under the next term, with backoff.

use std::{
    sync::{Arc, Weak},
    time::{Duration, Instant},
};

use tracing::{error, info, warn};
use walden_common::Term;
use walden_metastore_api::{MetaStore, increment, keys};

use crate::{
    NodeError,
    channel::{Channel, Health},
    manager::WalManager,
};

/// The next term of `pchannel`, persisted before it is used.
pub async fn next_term(meta: &dyn MetaStore, pchannel: &str) -> Result<Term, NodeError> {
    Ok(Term(increment(meta, &keys::pchannel_term(pchannel)).await?))
}

/// Opens every pchannel of `names` (in parallel: replay is CPU work) and supervises each. One
/// that cannot open (damaged storage, a full disk) keeps only itself down: the others serve,
/// and it is retried with backoff.
pub async fn serve_locally(
    manager: &Arc<WalManager>,
    meta: Arc<dyn MetaStore>,
    names: Vec<String>,
) {
    let started = Instant::now();
    let opens = names.iter().map(|name| {
        let (m, meta, name) = (manager.clone(), meta.clone(), name.clone());
        tokio::spawn(async move { open(&m, &*meta, &name).await })
    });
    let results = futures::future::join_all(opens).await;
    let mut failed = 0;
    for (name, r) in names.iter().zip(results) {
        let opened = matches!(r, Ok(Ok(())));
        if !opened {
            failed += 1;
            if let Ok(Err(e)) = &r {
                error!(pchannel = %name, error = %e, "pchannel did not open; retrying");
            }
        }
        tokio::spawn(supervise(
            Arc::downgrade(manager),
            meta.clone(),
            name.clone(),
            opened,
        ));
    }
    info!(
        pchannels = names.len(),
        failed,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "pchannels opened"
    );
}

async fn open(
    manager: &Arc<WalManager>,
    meta: &dyn MetaStore,
    name: &str,
) -> Result<(), NodeError> {
    let term = match next_term(meta, name).await {
        Ok(t) => t,
        Err(e) => {
            manager.set_unopened(name, Some(e.to_string()));
            return Err(e);
        }
    };
    manager.assign(name, term).await.map(|_| ())
}

/// A channel that fails sooner than this after opening counts as the same trouble: the backoff
/// before the next reopen keeps growing instead of starting over, so a fault that every
/// incarnation hits (a full disk, damage) cannot raise terms in a tight loop.
const STABLE_AFTER: Duration = Duration::from_secs(30);

/// Watches one pchannel; when its storage fails, closes it and reopens it (recovering the WAL)
/// under a new term, with backoff, then goes on watching the new incarnation.
async fn supervise(
    manager: Weak<WalManager>,
    meta: Arc<dyn MetaStore>,
    name: String,
    mut open_now: bool,
) {
    let mut backoff = Duration::from_millis(100);
    let mut opened_at = Instant::now();
    loop {
        if open_now {
            let Some(ch) = manager.upgrade().and_then(|m| m.get(&name, 0).ok()) else {
                return;
            };
            let health = ch.health();
            let term = ch.term();
            drop(ch);
            let why = match Channel::until_unhealthy(health).await {
                Some(Health::Failed(why)) => why,
                // Reopening would take the log back from its new owner, who would take it back
                // in turn: the pchannel stays down here (state `fenced`) until an operator
                // decides.
                Some(Health::Fenced(why)) => {
                    error!(pchannel = %name, reason = %why, "pchannel taken over by another writer; not reopening");
                    return;
                }
                _ => return,
            };
            warn!(pchannel = %name, reason = %why, "reopening the pchannel");
            if let Some(m) = manager.upgrade() {
                m.remove(&name, Some(term)).await;
            }
            if opened_at.elapsed() >= STABLE_AFTER {
                backoff = Duration::from_millis(100);
            }
        }
        loop {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
            let Some(m) = manager.upgrade() else { return };
            if m.is_shutting_down() {
                return;
            }
            match open(&m, &*meta, &name).await {
                Ok(()) => {
                    opened_at = Instant::now();
                    open_now = true;
                    break;
                }
                Err(e) => warn!(pchannel = %name, error = %e, "reopen failed; retrying"),
            }
        }
    }
}
