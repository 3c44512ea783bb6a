//! Transactions on one vchannel: every body message becomes visible to consumers together, at
//! the commit's tick, or never.
//!
//! ```no_run
//! # use bytes::Bytes;
//! # use walden_message::{MessageType, MutableMessage};
//! # async fn demo(client: walden_client::Client) -> Result<(), walden_client::ClientError> {
//! let producer = client.producer("walden-dml-0", Default::default());
//! let txn = producer.begin_txn("orders", None).await?;
//! txn.append(MutableMessage::new(MessageType::Data, "orders", Bytes::from("a"))).await?;
//! txn.append(MutableMessage::new(MessageType::Data, "orders", Bytes::from("b"))).await?;
//! txn.commit().await?;
//! # Ok(()) }
//! ```
//!
//! A transaction idle for longer than its keepalive (the node's `txn_keepalive_ms` unless given)
//! is rolled back by the node, as is every transaction open on a vchannel when an exclusive
//! message (DDL, flush) reaches it, or when the pchannel restarts; later calls fail with
//! `TXN_EXPIRED`, and the whole transaction should be retried.

use std::time::Duration;

use bytes::Bytes;
use walden_message::{MessageType, MutableMessage, TxnContext};

use crate::{AppendResult, ClientError, Producer};

/// An open transaction.
#[derive(Debug)]
pub struct Txn {
    producer: Producer,
    vchannel: String,
    ctx: TxnContext,
    begun: AppendResult,
}

impl Producer {
    /// Opens a transaction on `vchannel` (of this producer's pchannel).
    pub async fn begin_txn(
        &self,
        vchannel: &str,
        keepalive: Option<Duration>,
    ) -> Result<Txn, ClientError> {
        let mut begin = MutableMessage::new(MessageType::BeginTxn, vchannel, Bytes::new());
        let keepalive_ms = keepalive.map_or(0, |k| k.as_millis().max(1) as u64);
        begin.txn = Some(TxnContext {
            txn_id: 0,
            keepalive_ms,
        });
        let begun = self.append(begin).await?;
        Ok(Txn {
            producer: self.clone(),
            vchannel: vchannel.to_owned(),
            // The node names a transaction by its BeginTxn's tick.
            ctx: TxnContext {
                txn_id: begun.tick.0,
                keepalive_ms,
            },
            begun,
        })
    }
}

impl Txn {
    /// The transaction's id (the tick of its BeginTxn).
    pub fn id(&self) -> u64 {
        self.ctx.txn_id
    }

    /// Where its BeginTxn landed.
    pub fn begun(&self) -> AppendResult {
        self.begun
    }

    /// Appends a body message (Insert, Upsert, Delete or Data on the transaction's vchannel).
    pub async fn append(&self, mut msg: MutableMessage) -> Result<AppendResult, ClientError> {
        if msg.vchannel != self.vchannel {
            return Err(ClientError::InvalidArgument(format!(
                "transaction {} is on vchannel {:?}, not {:?}",
                self.ctx.txn_id, self.vchannel, msg.vchannel
            )));
        }
        msg.txn = Some(self.ctx);
        self.producer.append(msg).await
    }

    /// Makes every body message visible, at the returned tick.
    pub async fn commit(self) -> Result<AppendResult, ClientError> {
        self.end(MessageType::CommitTxn).await
    }

    /// Discards the transaction.
    pub async fn rollback(self) -> Result<AppendResult, ClientError> {
        self.end(MessageType::RollbackTxn).await
    }

    async fn end(self, t: MessageType) -> Result<AppendResult, ClientError> {
        let mut msg = MutableMessage::new(t, self.vchannel.clone(), Bytes::new());
        msg.txn = Some(self.ctx);
        self.producer.append(msg).await
    }
}
