//! A vchannel's manifest in the metastore: the commit point of historical data.
//!
//! Only the owner of the vchannel's pchannel writes it, by a transaction that compares the
//! pchannel's term key with its own term and the manifest's revision with the one it last
//! read or wrote: a node that lost the pchannel changes nothing, and neither does a stale copy.

use bytes::Bytes;
use prost::Message as _;
use walden_metastore_api::{Compare, CompareOp, CompareTarget, MetaStore, Op, Txn, keys};
use walden_proto::v1::VChannelManifest;

use crate::{FlushError, error::format};

/// A manifest and the revision it was read or written at (0: not stored yet).
#[derive(Clone, Debug, Default)]
pub struct Stored {
    pub manifest: VChannelManifest,
    pub revision: i64,
}

impl Stored {
    pub fn exists(&self) -> bool {
        self.revision != 0
    }
}

pub async fn load(
    meta: &dyn MetaStore,
    collection_id: u64,
    vchannel: &str,
) -> Result<Stored, FlushError> {
    match meta.get(&keys::manifest(collection_id, vchannel)).await? {
        None => Ok(Stored::default()),
        Some(kv) => Ok(Stored {
            manifest: VChannelManifest::decode(kv.value.as_ref())
                .map_err(|e| format(&format!("manifest of {vchannel}"), e))?,
            revision: kv.mod_revision,
        }),
    }
}

/// Replaces `stored` with `next` if the pchannel is still at `term` and the manifest is still
/// the one `stored` holds.
pub async fn commit(
    meta: &dyn MetaStore,
    pchannel: &str,
    term: u64,
    stored: &mut Stored,
    mut next: VChannelManifest,
) -> Result<(), FlushError> {
    next.term = term;
    let key = keys::manifest(next.collection_id, &next.vchannel);
    let txn = Txn {
        compare: vec![
            Compare {
                key: keys::pchannel_term(pchannel),
                op: CompareOp::Equal,
                target: CompareTarget::Value(Bytes::from(term.to_string())),
            },
            Compare::mod_revision(key.clone(), stored.revision),
        ],
        success: vec![Op::Put {
            key: key.clone(),
            value: Bytes::from(next.encode_to_vec()),
            lease: None,
        }],
        failure: vec![],
    };
    let resp = meta.txn(txn).await?;
    if !resp.succeeded {
        // Which comparison failed: a new term means this flusher is done.
        let current = meta.get(&keys::pchannel_term(pchannel)).await?;
        let same_term = current.is_some_and(|kv| kv.value.as_ref() == term.to_string().as_bytes());
        return Err(if same_term {
            FlushError::Conflict(next.vchannel)
        } else {
            FlushError::Superseded {
                pchannel: pchannel.to_owned(),
                term,
            }
        });
    }
    stored.manifest = next;
    stored.revision = resp.revision;
    Ok(())
}
