//! An in-memory backend for unit tests and the conformance suite. Nothing survives the process;
//! handles created by one [`MemoryWalStorage`] (and its clones) share the logs.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex, MutexGuard},
};

use bytes::Bytes;
use futures::{FutureExt, future::BoxFuture};
use walden_common::{MessageId, Term, validate_channel_name};

use crate::{ReadFrom, Wal, WalError, WalReader, WalStorage};

#[derive(Debug, Default)]
struct Log {
    term: Term,
    /// Id of `records[0]`.
    first: u64,
    records: VecDeque<Bytes>,
    bytes: u64,
}

impl Log {
    fn end(&self) -> u64 {
        self.first + self.records.len() as u64
    }
}

/// In-memory WAL storage.
#[derive(Clone, Debug, Default)]
pub struct MemoryWalStorage {
    logs: Arc<Mutex<HashMap<String, Arc<Mutex<Log>>>>>,
}

impl MemoryWalStorage {
    pub fn new() -> Self {
        Self::default()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding these locks leaves plain data behind; going on is safe.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl WalStorage for MemoryWalStorage {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn open<'a>(
        &'a self,
        pchannel: &'a str,
        term: Term,
    ) -> BoxFuture<'a, Result<Arc<dyn Wal>, WalError>> {
        async move {
            validate_channel_name(pchannel).map_err(WalError::InvalidArgument)?;
            let log = lock(&self.logs)
                .entry(pchannel.to_owned())
                .or_default()
                .clone();
            {
                let mut l = lock(&log);
                if term < l.term {
                    return Err(WalError::Fenced {
                        pchannel: pchannel.to_owned(),
                        term,
                        current: l.term,
                    });
                }
                l.term = term;
            }
            Ok(Arc::new(MemoryWal {
                pchannel: pchannel.to_owned(),
                term,
                log,
            }) as Arc<dyn Wal>)
        }
        .boxed()
    }
}

#[derive(Debug)]
struct MemoryWal {
    pchannel: String,
    term: Term,
    log: Arc<Mutex<Log>>,
}

impl Wal for MemoryWal {
    fn pchannel(&self) -> &str {
        &self.pchannel
    }

    fn term(&self) -> Term {
        self.term
    }

    fn append(&self, record: Bytes) -> BoxFuture<'static, Result<MessageId, WalError>> {
        let mut l = lock(&self.log);
        let result = if l.term != self.term {
            Err(WalError::Fenced {
                pchannel: self.pchannel.clone(),
                term: self.term,
                current: l.term,
            })
        } else {
            let id = l.end();
            l.bytes += record.len() as u64;
            l.records.push_back(record);
            Ok(MessageId(id))
        };
        futures::future::ready(result).boxed()
    }

    fn next_id(&self) -> MessageId {
        MessageId(lock(&self.log).end())
    }

    fn first_id(&self) -> MessageId {
        MessageId(lock(&self.log).first)
    }

    fn durable_end(&self) -> MessageId {
        self.next_id()
    }

    fn size_bytes(&self) -> u64 {
        lock(&self.log).bytes
    }

    fn read(&self, from: ReadFrom) -> Result<Box<dyn WalReader>, WalError> {
        let l = lock(&self.log);
        let next = match from {
            ReadFrom::Earliest => l.first,
            ReadFrom::Latest => l.end(),
            ReadFrom::At(id) => id.0,
            ReadFrom::After(id) => id.0 + 1,
        };
        if next < l.first {
            return Err(WalError::Truncated {
                pchannel: self.pchannel.clone(),
                requested: MessageId(next),
                first: MessageId(l.first),
            });
        }
        Ok(Box::new(MemoryReader {
            pchannel: self.pchannel.clone(),
            log: self.log.clone(),
            next,
        }))
    }

    fn truncate(&self, below: MessageId) -> BoxFuture<'_, Result<(), WalError>> {
        let mut l = lock(&self.log);
        while l.first < below.0 && !l.records.is_empty() {
            if let Some(r) = l.records.pop_front() {
                l.bytes -= r.len() as u64;
            }
            l.first += 1;
        }
        futures::future::ready(Ok(())).boxed()
    }

    fn close(&self) -> BoxFuture<'_, Result<(), WalError>> {
        futures::future::ready(Ok(())).boxed()
    }
}

#[derive(Debug)]
struct MemoryReader {
    pchannel: String,
    log: Arc<Mutex<Log>>,
    next: u64,
}

impl WalReader for MemoryReader {
    fn next(&mut self) -> BoxFuture<'_, Result<Option<(MessageId, Bytes)>, WalError>> {
        let l = lock(&self.log);
        let result = if self.next < l.first {
            Err(WalError::Truncated {
                pchannel: self.pchannel.clone(),
                requested: MessageId(self.next),
                first: MessageId(l.first),
            })
        } else if self.next >= l.end() {
            Ok(None)
        } else {
            let r = l.records[(self.next - l.first) as usize].clone();
            let id = MessageId(self.next);
            self.next += 1;
            Ok(Some((id, r)))
        };
        futures::future::ready(result).boxed()
    }
}

#[cfg(all(test, feature = "conformance"))]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_backend_passes_the_conformance_suite() {
        let storage = MemoryWalStorage::new();
        crate::conformance::run_all(move || Arc::new(storage.clone()) as Arc<dyn WalStorage>).await;
    }
}
