//! Leader election through etcd: the leader key is created only if absent, under the
//! candidate's lease, in the same transaction that raises the coordinator epoch. Standbys wait
//! for the key to go (the leader's lease ended) and try again. Every write the leader makes
//! compares the leader key's revision, so a leader that lost its lease cannot write.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use prost::Message as _;
use tokio::sync::watch;
use tracing::{info, warn};
use walden_metastore_api::{Compare, LeaseId, MetaError, MetaStore, Op, Revision, Txn, keys};
use walden_proto::v1::CoordinatorInfo;

/// Won leadership. `lost` turns true once the lease is gone (or cannot have survived).
#[derive(Debug, Clone)]
pub struct Leadership {
    pub info: CoordinatorInfo,
    pub lease: LeaseId,
    /// The leader key's revision: the fence every leader write compares.
    pub key_revision: Revision,
    pub lost: watch::Receiver<bool>,
}

impl Leadership {
    /// The comparison that fences a write to this leadership.
    pub fn fence(&self) -> Compare {
        Compare::mod_revision(keys::COORD_LEADER, self.key_revision)
    }

    pub fn is_lost(&self) -> bool {
        *self.lost.borrow()
    }
}

/// The leader now, if any.
pub async fn current_leader(meta: &dyn MetaStore) -> Result<Option<CoordinatorInfo>, MetaError> {
    Ok(match meta.get(keys::COORD_LEADER).await? {
        Some(kv) => CoordinatorInfo::decode(kv.value.as_ref()).ok(),
        None => None,
    })
}

/// Waits until this candidate leads. `me` carries its addresses; the epoch is filled in.
pub async fn campaign(
    meta: Arc<dyn MetaStore>,
    mut me: CoordinatorInfo,
    ttl: Duration,
) -> Result<Leadership, MetaError> {
    let mut logged_standby = false;
    loop {
        let lease = meta.grant_lease(ttl).await?;
        let (epoch_rev, epoch) = match meta.get(keys::COORD_EPOCH).await? {
            Some(kv) => (
                kv.mod_revision,
                std::str::from_utf8(&kv.value)
                    .ok()
                    .and_then(|s| s.parse::<u64>().ok())
                    .ok_or_else(|| {
                        MetaError::Corrupted(format!("{} is not a number", keys::COORD_EPOCH))
                    })?,
            ),
            None => (0, 0),
        };
        me.epoch = epoch + 1;
        let resp = meta
            .txn(Txn {
                compare: vec![
                    Compare::absent(keys::COORD_LEADER),
                    Compare::mod_revision(keys::COORD_EPOCH, epoch_rev),
                ],
                success: vec![
                    Op::Put {
                        key: keys::COORD_EPOCH.into(),
                        value: Bytes::from(me.epoch.to_string()),
                        lease: None,
                    },
                    Op::Put {
                        key: keys::COORD_LEADER.into(),
                        value: Bytes::from(me.encode_to_vec()),
                        lease: Some(lease),
                    },
                ],
                failure: vec![],
            })
            .await?;
        if resp.succeeded {
            let (tx, rx) = watch::channel(false);
            tokio::spawn(keep_leading(meta.clone(), lease, ttl, tx));
            info!(
                epoch = me.epoch,
                address = me.address,
                "leading the cluster"
            );
            return Ok(Leadership {
                info: me,
                lease,
                key_revision: resp.revision,
                lost: rx,
            });
        }
        let _ = meta.revoke_lease(lease).await;
        if !logged_standby {
            let leader = current_leader(&*meta).await.ok().flatten();
            info!(leader = ?leader.map(|l| l.address), "standing by");
            logged_standby = true;
        }
        wait_for_vacancy(&*meta).await;
    }
}

/// Returns once the leader key is gone (or after a while, to look again).
async fn wait_for_vacancy(meta: &dyn MetaStore) {
    let Ok(mut w) = meta.watch(keys::COORD_LEADER).await else {
        tokio::time::sleep(Duration::from_millis(500)).await;
        return;
    };
    if matches!(meta.get(keys::COORD_LEADER).await, Ok(None)) {
        return;
    }
    let deadline = tokio::time::sleep(Duration::from_secs(5));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            () = &mut deadline => return,
            e = w.recv() => match e {
                Some(e) if e.kind == walden_metastore_api::EventKind::Delete && e.kv.key == keys::COORD_LEADER => return,
                Some(_) => {}
                None => return,
            },
        }
    }
}

/// Keeps the lease alive at a third of its TTL. Declares the leadership lost when etcd says the
/// lease is gone, or when no keep-alive succeeded for a whole TTL (it has expired by then).
async fn keep_leading(
    meta: Arc<dyn MetaStore>,
    lease: LeaseId,
    ttl: Duration,
    lost: watch::Sender<bool>,
) {
    let mut last_ok = tokio::time::Instant::now();
    let mut every = tokio::time::interval(ttl / 3);
    loop {
        every.tick().await;
        if lost.is_closed() {
            let _ = meta.revoke_lease(lease).await;
            return;
        }
        // A keep-alive may hang on an etcd that lost its quorum: it gets only what is left of
        // the lease, so a leader never outlives its lease waiting for an answer.
        let left = ttl.saturating_sub(last_ok.elapsed());
        let answer = match tokio::time::timeout(left, meta.keep_alive(lease)).await {
            Ok(a) => a,
            Err(_) => Err(MetaError::Unavailable {
                context: "keeping a lease alive".into(),
                detail: format!("no answer in the {} ms left of the lease", left.as_millis()),
            }),
        };
        match answer {
            Ok(()) => last_ok = tokio::time::Instant::now(),
            Err(MetaError::LeaseNotFound(_)) => {
                warn!(lease, "leader lease gone: stepping down");
                let _ = lost.send(true);
                return;
            }
            Err(e) => {
                warn!(lease, error = %e, "leader keep-alive failed");
                if last_ok.elapsed() >= ttl {
                    warn!(lease, "no keep-alive for a whole TTL: stepping down");
                    let _ = lost.send(true);
                    return;
                }
            }
        }
    }
}
