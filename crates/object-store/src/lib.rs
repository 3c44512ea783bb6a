//! The object-storage layer that the object-storage WAL and, later, the flusher share.
//!
//! One config ([`ObjectStoreConfig`]) picks `file://`, `memory://` or `s3://` (any
//! S3-compatible server through `endpoint`), and [`open`] checks it against the store at start,
//! so a bad endpoint, refused credentials, a missing bucket or a path that is not a directory
//! is one line naming the key to fix. Services see the narrow [`Blobs`] contract, not
//! `object_store`: create-if-absent (what fencing and every WAL fragment rely on), get, list and
//! delete under a prefix, with typed errors that say whether a retry helps. Transient failures
//! are retried inside (object_store's own backoff, configured here); each call is counted and
//! timed per operation ([`StoreMetrics`]).
//!
//! Only create-if-absent is used for anything that must not be overwritten: on S3 that is
//! `If-None-Match: *`, which SeaweedFS (the test server) applies atomically on one gateway,
//! where its `If-Match` is not atomic (`../shared/reference/object-storage-logs.md` §4a).

mod config;
#[cfg(feature = "testing")]
pub mod conformance;
mod error;
#[cfg(feature = "testing")]
pub mod faulty;
mod metrics;
#[cfg(feature = "testing")]
pub mod seaweed;

use std::{fmt, ops::Range, sync::Arc, time::Instant};

use async_trait::async_trait;
use bytes::Bytes;
use futures::TryStreamExt;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, path::Path};

pub use config::{Location, ObjectStoreConfig};
pub use error::ObjectStoreError;
pub use metrics::StoreMetrics;

/// An object as listed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    /// The key, relative to the store's prefix.
    pub key: String,
    pub size: u64,
}

/// Objects under one prefix. Keys are `/`-separated and relative to the prefix.
#[async_trait]
pub trait Blobs: Send + Sync + fmt::Debug {
    /// Writes `key` only if no object has it. Fails with
    /// [`ObjectStoreError::AlreadyExists`] otherwise, atomically: of two racing creates, one
    /// wins. When a call fails in a way that leaves open whether the object landed (its
    /// response was lost), a retry may report `AlreadyExists` for the caller's own object:
    /// read it back to tell.
    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<(), ObjectStoreError>;
    /// Writes `key`, replacing any object there.
    async fn put(&self, key: &str, data: Bytes) -> Result<(), ObjectStoreError>;
    async fn get(&self, key: &str) -> Result<Bytes, ObjectStoreError>;
    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, ObjectStoreError>;
    /// Every object whose key starts with `prefix` (a directory-like prefix: `a/b/`), sorted by
    /// key.
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, ObjectStoreError>;
    /// Deletes `key`; an absent key is not an error.
    async fn delete(&self, key: &str) -> Result<(), ObjectStoreError>;
    /// The object's full URL (`file:///dir/key`, `s3://bucket/prefix/key`), for readers
    /// outside Walden.
    fn url(&self, key: &str) -> String {
        key.to_owned()
    }
}

/// What a resolved create-if-absent found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Created {
    /// The key holds these bytes because this caller created it (perhaps in a call whose
    /// response was lost).
    Mine,
    /// Someone else created the key first; it holds these bytes.
    Taken(Bytes),
}

/// Extra rounds [`create`] gives a create that failed with the key found absent (the store's
/// client has already retried each round).
const CREATE_ROUNDS: u32 = 3;

/// Create-if-absent whose outcome is never unknown: when the call fails or finds the key
/// taken, the key is read back and compared with `data` (a retried create whose first try
/// landed finds "its own" object there). A key still absent after a failure is created again
/// under the same key, a few rounds, never under another. `data` must be unique to the caller
/// for [`Created::Mine`] to mean what it says.
pub async fn create(
    blobs: &dyn Blobs,
    key: &str,
    data: Bytes,
) -> Result<Created, ObjectStoreError> {
    let mut round = 0;
    loop {
        let err = match blobs.put_if_absent(key, data.clone()).await {
            Ok(()) => return Ok(Created::Mine),
            Err(e) => e,
        };
        match blobs.get(key).await {
            Ok(b) if b == data => return Ok(Created::Mine),
            Ok(b) => return Ok(Created::Taken(b)),
            Err(ObjectStoreError::NotFound { .. })
                if round < CREATE_ROUNDS
                    && !matches!(err, ObjectStoreError::AlreadyExists { .. })
                    && walden_common::HasErrorCode::is_retryable(&err) =>
            {
                round += 1;
                tokio::time::sleep(std::time::Duration::from_millis(25 << round)).await;
            }
            Err(_) => return Err(err),
        }
    }
}

/// [`Blobs`] over an `object_store` backend.
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    prefix: String,
    metrics: StoreMetrics,
    label: String,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store").field("at", &self.label).finish()
    }
}

impl Store {
    fn path(&self, key: &str) -> Path {
        if self.prefix.is_empty() {
            Path::from(key)
        } else {
            Path::from(format!("{}/{key}", self.prefix))
        }
    }

    /// Runs one call: counted, timed, its error classified.
    async fn call<T, F>(&self, op: &'static str, key: &str, f: F) -> Result<T, ObjectStoreError>
    where
        F: Future<Output = object_store::Result<T>>,
    {
        let started = Instant::now();
        self.metrics.requests.with_label_values(&[op]).inc();
        let r = f.await;
        self.metrics
            .latency
            .with_label_values(&[op])
            .observe(started.elapsed().as_secs_f64());
        r.map_err(|e| {
            let e = ObjectStoreError::from_store(op, key, &e);
            let kind = match &e {
                ObjectStoreError::AlreadyExists { .. } => "already_exists",
                ObjectStoreError::NotFound { .. } => "not_found",
                ObjectStoreError::Unavailable { .. } => "unavailable",
                ObjectStoreError::Denied { .. } => "denied",
                _ => "other",
            };
            self.metrics.errors.with_label_values(&[op, kind]).inc();
            e
        })
    }
}

#[async_trait]
impl Blobs for Store {
    fn url(&self, key: &str) -> String {
        format!("{}/{key}", self.label.trim_end_matches('/'))
    }

    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<(), ObjectStoreError> {
        let n = data.len() as u64;
        let opts = PutOptions {
            mode: PutMode::Create,
            ..PutOptions::default()
        };
        let path = self.path(key);
        self.call("put_if_absent", key, async {
            self.inner
                .put_opts(&path, PutPayload::from(data), opts)
                .await
        })
        .await?;
        self.metrics.bytes.with_label_values(&["put"]).inc_by(n);
        Ok(())
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<(), ObjectStoreError> {
        let n = data.len() as u64;
        let path = self.path(key);
        self.call("put", key, async {
            self.inner.put(&path, PutPayload::from(data)).await
        })
        .await?;
        self.metrics.bytes.with_label_values(&["put"]).inc_by(n);
        Ok(())
    }

    async fn get(&self, key: &str) -> Result<Bytes, ObjectStoreError> {
        let path = self.path(key);
        let b = self
            .call("get", key, async {
                self.inner.get(&path).await?.bytes().await
            })
            .await?;
        self.metrics
            .bytes
            .with_label_values(&["get"])
            .inc_by(b.len() as u64);
        Ok(b)
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, ObjectStoreError> {
        let path = self.path(key);
        let b = self
            .call("get", key, async {
                self.inner.get_range(&path, range).await
            })
            .await?;
        self.metrics
            .bytes
            .with_label_values(&["get"])
            .inc_by(b.len() as u64);
        Ok(b)
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, ObjectStoreError> {
        let base = self.path(prefix.trim_end_matches('/'));
        let strip = if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.prefix)
        };
        let mut out: Vec<ObjectInfo> = self
            .call("list", prefix, async {
                self.inner.list(Some(&base)).try_collect::<Vec<_>>().await
            })
            .await?
            .into_iter()
            .map(|m| ObjectInfo {
                key: m
                    .location
                    .as_ref()
                    .strip_prefix(&strip)
                    .unwrap_or(m.location.as_ref())
                    .to_owned(),
                size: m.size,
            })
            .collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    async fn delete(&self, key: &str) -> Result<(), ObjectStoreError> {
        let path = self.path(key);
        match self
            .call("delete", key, async { self.inner.delete(&path).await })
            .await
        {
            Ok(()) | Err(ObjectStoreError::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// Opens the store `config` names and checks that it answers: a one-line error naming the
/// key to fix if the endpoint cannot be reached, the credentials are refused, the bucket is
/// missing or the directory does not exist.
pub async fn open(
    config: &ObjectStoreConfig,
    metrics: StoreMetrics,
) -> Result<Arc<dyn Blobs>, ObjectStoreError> {
    let cfg = |detail: String| ObjectStoreError::Config {
        key: "object_store",
        detail,
    };
    config.validate().map_err(cfg)?;
    let location = config.location().map_err(cfg)?;
    let (inner, prefix): (Arc<dyn ObjectStore>, String) = match &location {
        Location::Memory => (
            Arc::new(object_store::memory::InMemory::new()),
            String::new(),
        ),
        Location::File(dir) => {
            if !dir.is_dir() {
                return Err(ObjectStoreError::Config {
                    key: "object_store.url",
                    detail: format!("{} is not a directory", dir.display()),
                });
            }
            let fs = object_store::local::LocalFileSystem::new_with_prefix(dir).map_err(|e| {
                ObjectStoreError::Config {
                    key: "object_store.url",
                    detail: error::chain(&e),
                }
            })?;
            (Arc::new(fs), String::new())
        }
        Location::S3 { bucket, prefix } => (s3(config, bucket)?, prefix.clone()),
    };
    let store = Store {
        inner,
        prefix,
        metrics,
        label: config.url.clone(),
    };
    probe(&store, config, &location).await?;
    Ok(Arc::new(store))
}

fn s3(config: &ObjectStoreConfig, bucket: &str) -> Result<Arc<dyn ObjectStore>, ObjectStoreError> {
    use object_store::{
        BackoffConfig, ClientOptions, RetryConfig,
        aws::{AmazonS3Builder, AmazonS3ConfigKey},
    };
    let ms = std::time::Duration::from_millis;
    let mut b = AmazonS3Builder::from_env()
        .with_bucket_name(bucket)
        .with_allow_http(config.allow_http)
        .with_retry(RetryConfig {
            backoff: BackoffConfig {
                init_backoff: ms(config.retry_backoff_ms.max(1)),
                max_backoff: ms(config.retry_max_ms.max(1)),
                base: 2.0,
            },
            max_retries: config.max_retries,
            retry_timeout: ms(config.retry_max_ms.max(1)),
        })
        .with_client_options(
            ClientOptions::new()
                .with_timeout(config.request_timeout())
                .with_allow_http(config.allow_http),
        );
    if !config.endpoint.is_empty() {
        b = b.with_endpoint(&config.endpoint);
    }
    if !config.region.is_empty() {
        b = b.with_region(&config.region);
    } else if b.get_config_value(&AmazonS3ConfigKey::Region).is_none() {
        b = b.with_region("us-east-1");
    }
    if !config.access_key_id.is_empty() {
        b = b
            .with_access_key_id(&config.access_key_id)
            .with_secret_access_key(&config.secret_access_key);
    } else if b
        .get_config_value(&AmazonS3ConfigKey::AccessKeyId)
        .is_none()
    {
        // No credentials anywhere: anonymous requests, never a metadata-service lookup.
        b = b.with_skip_signature(true);
    }
    let store = b.build().map_err(|e| ObjectStoreError::Config {
        key: "object_store",
        detail: error::chain(&e),
    })?;
    Ok(Arc::new(store))
}

/// What the start-time probe lists.
const PROBE_PREFIX: &str = "walden-probe/";

/// One list call at start, its failure turned into the key to fix.
async fn probe(
    store: &Store,
    config: &ObjectStoreConfig,
    location: &Location,
) -> Result<(), ObjectStoreError> {
    // A prefix that holds nothing: reaching it checks the endpoint, the credentials and the
    // bucket as well as a full listing would, without listing a WAL's every object at start.
    let e = match store.list(PROBE_PREFIX).await {
        Ok(_) => return Ok(()),
        Err(e) => e,
    };
    let text = e.to_string();
    Err(match (&e, location) {
        (ObjectStoreError::Unavailable { .. }, _) => ObjectStoreError::Config {
            key: "object_store.endpoint",
            detail: format!(
                "cannot reach {:?}: {text}",
                if config.endpoint.is_empty() {
                    "the S3 endpoint"
                } else {
                    &config.endpoint
                }
            ),
        },
        (ObjectStoreError::Denied { .. }, _) => ObjectStoreError::Config {
            key: "object_store.access_key_id",
            detail: format!("the credentials were refused: {text}"),
        },
        (_, Location::S3 { bucket, .. })
            if text.contains("NoSuchBucket") || matches!(e, ObjectStoreError::NotFound { .. }) =>
        {
            ObjectStoreError::Config {
                key: "object_store.url",
                detail: format!("bucket {bucket:?} does not exist: {text}"),
            }
        }
        _ => ObjectStoreError::Config {
            key: "object_store.url",
            detail: text,
        },
    })
}
