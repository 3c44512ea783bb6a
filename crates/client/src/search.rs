//! Search and query: each pchannel's owner answers for the vchannels on it, and the client
//! merges their answers (the top-k over every shard; rows up to the limit).

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use serde_json::{Map, Value};
use walden_common::{ErrorCode, HasErrorCode};
use walden_proto::v1::{
    CollectionInfo, ConsistencyLevel, FloatVector, MetricType, QueryRequest, ReadOptions,
    SearchRequest,
};
use walden_query::{Hits, Metric, merge};
use walden_schema::Schema;
use walden_segment_format::Pk;

use crate::{Client, ClientError, OWNER_WAIT};

/// How fresh a read must be.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Consistency {
    /// Sees every write acknowledged before the read started (read your writes).
    Strong,
    /// Sees writes older than the server's staleness bound (`query.bounded_staleness_ms`).
    #[default]
    Bounded,
    /// Sees this client's own acknowledged writes.
    Session,
    /// Sees what the shards have read; never waits.
    Eventually,
}

impl Consistency {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "strong" => Some(Self::Strong),
            "bounded" => Some(Self::Bounded),
            "session" => Some(Self::Session),
            "eventually" => Some(Self::Eventually),
            _ => None,
        }
    }
}

/// A search's options beyond the collection and the query vectors.
#[derive(Clone, Debug)]
pub struct SearchOptions {
    /// The vector field (may be empty when the collection has one).
    pub field: String,
    pub top_k: u32,
    /// A boolean expression over scalar fields (docs/design.md §14.3); empty: every row.
    pub filter: String,
    pub output_fields: Vec<String>,
    pub consistency: Consistency,
    /// L2 when `None`.
    pub metric: Option<Metric>,
    pub partitions: Vec<String>,
    /// HNSW candidates kept while searching (0: the index's `ef`).
    pub ef: u32,
}

impl Default for SearchOptions {
    fn default() -> Self {
        Self {
            field: String::new(),
            top_k: 10,
            filter: String::new(),
            output_fields: Vec::new(),
            consistency: Consistency::default(),
            metric: None,
            partitions: Vec::new(),
            ef: 0,
        }
    }
}

/// A query's options.
#[derive(Clone, Debug, Default)]
pub struct QueryOptions {
    pub filter: String,
    pub output_fields: Vec<String>,
    /// At most this many rows (0: the server's `query.max_rows`).
    pub limit: u64,
    pub consistency: Consistency,
    pub partitions: Vec<String>,
    /// The `limit` rows of smallest primary key, in key order (cursor paging); otherwise the
    /// first found. Either way, of rows sharing a primary key only the one written last is
    /// returned, as Milvus does.
    pub order_by_key: bool,
}

/// One row found by a search.
#[derive(Clone, Debug, PartialEq)]
pub struct SearchHit {
    /// The primary key.
    pub id: Value,
    /// Squared L2 distance (smaller is nearer), or inner product / cosine similarity
    /// (larger is nearer).
    pub distance: f32,
    /// The output fields asked for (and the primary key).
    pub fields: Map<String, Value>,
}

/// What a query found.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct QueryRows {
    pub rows: Vec<Map<String, Value>>,
    /// More rows matched than the limit.
    pub truncated: bool,
}

/// Primary keys in the order the server sorts them: integers by value, strings by bytes.
fn key_order(a: Option<&Value>, b: Option<&Value>) -> std::cmp::Ordering {
    match (a, b) {
        (Some(Value::Number(x)), Some(Value::Number(y))) => x
            .as_i64()
            .cmp(&y.as_i64())
            .then_with(|| x.as_u64().cmp(&y.as_u64())),
        (Some(Value::String(x)), Some(Value::String(y))) => x.cmp(y),
        _ => std::cmp::Ordering::Equal,
    }
}

fn protocol(e: impl std::fmt::Display) -> ClientError {
    ClientError::Protocol(e.to_string())
}

fn pk_json(pk: &Pk) -> Value {
    match pk {
        Pk::Int(i) => Value::from(*i),
        Pk::Str(s) => Value::from(s.as_str()),
    }
}

/// Collections described for reads: when, the record and its schema.
pub(crate) type Described = HashMap<String, (Instant, Arc<CollectionInfo>, Arc<Schema>)>;

/// How long a collection's description is reused by reads before it is asked for again (a
/// read that finds it stale asks at once).
pub(crate) const DESCRIBED_FOR: Duration = Duration::from_secs(2);

/// How long reads pass over a read replica that failed a call (its node may be dead until the
/// placement moves the replica away, a lease later).
const PASS_OVER: Duration = Duration::from_secs(5);

/// How long a read follows moves and restarts (retryable errors other than LAG_TOO_LARGE)
/// before it reports the last error, by default ([`Client::with_read_retry`]).
pub(crate) const READ_RETRY: Duration = Duration::from_secs(15);

impl Client {
    /// Records a write's tick for `session` reads.
    pub(crate) fn note_write(&self, tick: u64) {
        self.last_write.fetch_max(tick, Ordering::Relaxed);
    }

    /// Records a write's tick on `vchannel`: a `session` read of that shard waits for it.
    pub(crate) fn note_write_on(&self, vchannel: &str, tick: u64) {
        let mut by = self.last_write_by.lock().unwrap_or_else(|e| e.into_inner());
        let t = by.entry(vchannel.to_owned()).or_insert(0);
        *t = (*t).max(tick);
    }

    /// The highest tick of this client's acknowledged writes.
    pub fn last_write_tick(&self) -> u64 {
        self.last_write.load(Ordering::Relaxed)
    }

    /// Sets what a `session` read of `vchannels` waits for: this client's last write on them
    /// (a shard never waits for a write on another pchannel, whose ticks it may never reach).
    fn session_for(&self, options: &mut Option<ReadOptions>, vchannels: &[String]) {
        let Some(o) = options.as_mut() else { return };
        let by = self.last_write_by.lock().unwrap_or_else(|e| e.into_inner());
        o.guarantee_tick = vchannels
            .iter()
            .filter_map(|v| by.get(v))
            .copied()
            .max()
            .unwrap_or(0);
    }

    fn read_options(&self, c: Consistency, partitions: &[String]) -> ReadOptions {
        ReadOptions {
            consistency: match c {
                Consistency::Strong => ConsistencyLevel::Strong,
                Consistency::Bounded => ConsistencyLevel::Bounded,
                Consistency::Session => ConsistencyLevel::Session,
                Consistency::Eventually => ConsistencyLevel::Eventually,
            } as i32,
            guarantee_tick: self.last_write_tick(),
            partitions: partitions.to_vec(),
        }
    }

    /// Calls every shard of `info` once, all at once, each on the owner of its pchannel or
    /// one of its read replicas (taking turns; `prefer_owner` asks the owner first), and
    /// retries a failed call on the next copy.
    async fn per_owner<T, F, Fut>(
        &self,
        info: &CollectionInfo,
        prefer_owner: bool,
        call: F,
    ) -> Result<Vec<T>, ClientError>
    where
        F: Fn(crate::Grpc, Vec<String>) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        let mut by_pchannel: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for v in &info.vchannels {
            by_pchannel
                .entry(v.pchannel.as_str())
                .or_default()
                .push(v.name.clone());
        }
        // Read replicas serving every vchannel of a pchannel's group.
        let replicas = |names: &[String]| -> Vec<String> {
            let of = |v: &str| {
                info.read_replicas
                    .iter()
                    .find(|r| r.vchannel == v)
                    .map(|r| r.addresses.clone())
                    .unwrap_or_default()
            };
            let mut common = names.first().map(|v| of(v)).unwrap_or_default();
            for v in names.iter().skip(1) {
                let these = of(v);
                common.retain(|a| these.contains(a));
            }
            common
        };
        let turn = if prefer_owner {
            0
        } else {
            self.read_turn
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        };
        let started = tokio::time::Instant::now();
        let mut backoff = Duration::from_millis(50);
        let mut attempt = 0usize;
        loop {
            // Every shard at once: a read waits for the slowest shard, not for their sum.
            let answers = futures::future::join_all(by_pchannel.iter().map(|(pchannel, names)| {
                let call = &call;
                let copies = replicas(names);
                async move {
                    // Copy 0 is the owner, then the read replicas; a replica that failed a
                    // call lately is passed over while another copy is left.
                    let n = copies.len() + 1;
                    let pick = (0..n)
                        .map(|i| (turn + attempt + i) % n)
                        .find(|p| {
                            p.checked_sub(1)
                                .is_none_or(|i| !self.failed_lately(&copies[i]))
                        })
                        .unwrap_or((turn + attempt) % n);
                    let replica = pick.checked_sub(1).map(|i| copies[i].clone());
                    let grpc = match replica.as_deref().and_then(|a| self.route.at(a)) {
                        Some(g) => g?,
                        None => self.route.grpc(pchannel, OWNER_WAIT).await?,
                    };
                    call(grpc, names.clone()).await.map_err(|s| {
                        let e = ClientError::from(s);
                        if let Some(a) = replica
                            && e.is_retryable()
                        {
                            self.copy_failed(a);
                        }
                        e
                    })
                }
            }))
            .await;
            match answers.into_iter().collect::<Result<Vec<T>, ClientError>>() {
                Ok(out) => return Ok(out),
                Err(e) => {
                    // Not served there: the caller describes the collection again (its
                    // shards may have moved, or it may have been re-created).
                    let again = e.is_retryable()
                        && !matches!(
                            e.code(),
                            ErrorCode::LagTooLarge | ErrorCode::ChannelNotFound
                        )
                        && started.elapsed() < self.read_retry;
                    if !again {
                        return Err(e);
                    }
                    self.read_retries.fetch_add(1, Ordering::Relaxed);
                    attempt += 1;
                    // The next copy at once; back off once every copy was tried.
                    if attempt.is_multiple_of(1 + info.read_replicas.len().min(1)) {
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                    }
                }
            }
        }
    }

    /// Remembers that the read replica at `addr` failed a call (dead, restarting, or not
    /// serving yet): reads pass it over for [`PASS_OVER`].
    fn copy_failed(&self, addr: String) {
        self.failed_copies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(addr, Instant::now());
    }

    fn failed_lately(&self, addr: &str) -> bool {
        self.failed_copies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(addr)
            .is_some_and(|at| at.elapsed() < PASS_OVER)
    }

    /// The collection's record and schema, described at most [`DESCRIBED_FOR`] ago.
    async fn described(
        &self,
        collection: &str,
    ) -> Result<(Arc<CollectionInfo>, Arc<Schema>), ClientError> {
        if let Some((at, info, schema)) = self.described_cache().get(collection)
            && at.elapsed() < DESCRIBED_FOR
        {
            return Ok((info.clone(), schema.clone()));
        }
        let info = Arc::new(self.collections().describe(collection).await?);
        let schema =
            Arc::new(Schema::new(info.schema.clone().unwrap_or_default()).map_err(protocol)?);
        self.described_cache().insert(
            collection.to_owned(),
            (Instant::now(), info.clone(), schema.clone()),
        );
        Ok((info, schema))
    }

    /// The collection's record and checked schema as reads use them: described at most
    /// [`DESCRIBED_FOR`] (2 s) ago, so a front end that checks each request against the schema
    /// does not ask the coordinator every time. A read that finds the collection changed
    /// describes it afresh.
    pub async fn describe_recent(
        &self,
        collection: &str,
    ) -> Result<(Arc<CollectionInfo>, Arc<Schema>), ClientError> {
        self.described(collection).await
    }

    /// Forgets the description of `collection` reads use (see [`crate::Collections::forget`]).
    pub(crate) fn forget_described(&self, collection: &str) {
        self.described_cache().remove(collection);
    }

    fn described_cache(&self) -> std::sync::MutexGuard<'_, Described> {
        self.described.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a read of `collection` that failed with `e` is tried again (after a short
    /// sleep), with the collection described afresh: once when the node says the vchannel
    /// holds another collection (dropped or re-created), and for up to [`READ_RETRY`] when
    /// no node serves a vchannel yet (a move, a restart, a delegator starting again).
    async fn retry(
        &self,
        collection: &str,
        e: &ClientError,
        started: Instant,
        attempt: &mut u32,
    ) -> bool {
        let again = match e.code() {
            // The collection described earlier was dropped (and perhaps created again under
            // the same name): describe it afresh, once.
            ErrorCode::CollectionNotFound | ErrorCode::CollectionDropped => *attempt == 0,
            ErrorCode::ChannelNotFound => started.elapsed() < self.read_retry,
            _ => false,
        };
        if again {
            self.read_retries.fetch_add(1, Ordering::Relaxed);
            self.described_cache().remove(collection);
            let backoff = Duration::from_millis(50 << (*attempt).min(4));
            tokio::time::sleep(backoff).await;
            *attempt += 1;
        }
        again
    }

    /// The `top_k` nearest rows to each of `vectors`, nearest first.
    pub async fn search(
        &self,
        collection: &str,
        vectors: &[Vec<f32>],
        options: &SearchOptions,
    ) -> Result<Vec<Vec<SearchHit>>, ClientError> {
        let (started, mut attempt) = (Instant::now(), 0);
        loop {
            let (info, schema) = self.described(collection).await?;
            match self.search_in(&info, &schema, vectors, options).await {
                Err(e) if self.retry(collection, &e, started, &mut attempt).await => {}
                r => return r,
            }
        }
    }

    async fn search_in(
        &self,
        info: &CollectionInfo,
        schema: &Schema,
        vectors: &[Vec<f32>],
        options: &SearchOptions,
    ) -> Result<Vec<Vec<SearchHit>>, ClientError> {
        let request = SearchRequest {
            collection: info.name.clone(),
            collection_id: info.collection_id,
            vchannels: Vec::new(),
            field: options.field.clone(),
            vectors: vectors
                .iter()
                .map(|v| FloatVector { values: v.clone() })
                .collect(),
            top_k: options.top_k,
            filter: options.filter.clone(),
            output_fields: options.output_fields.clone(),
            metric: match options.metric {
                None => MetricType::Unspecified,
                Some(Metric::L2) => MetricType::L2,
                Some(Metric::Ip) => MetricType::Ip,
                Some(Metric::Cosine) => MetricType::Cosine,
            } as i32,
            options: Some(self.read_options(options.consistency, &options.partitions)),
            ef: options.ef,
        };
        let answers = self
            .per_owner(
                info,
                options.consistency == Consistency::Strong,
                |grpc, vchannels| {
                    let mut r = request.clone();
                    self.session_for(&mut r.options, &vchannels);
                    r.vchannels = vchannels;
                    async move { Ok(grpc.query.clone().search(r).await?.into_inner()) }
                },
            )
            .await?;
        // Every owner used the same metric (the field's index's, unless the request named one).
        let metric = match answers.first().map(|a| a.metric()) {
            Some(MetricType::Ip) => Metric::Ip,
            Some(MetricType::Cosine) => Metric::Cosine,
            _ => Metric::L2,
        };
        let mut per_query: Vec<Vec<Hits>> = vec![Vec::new(); vectors.len()];
        for a in answers {
            for (q, h) in a.results.into_iter().enumerate() {
                let Some(slot) = per_query.get_mut(q) else {
                    return Err(ClientError::Protocol(
                        "a search answer has more result lists than query vectors".into(),
                    ));
                };
                slot.push(from_proto(h)?);
            }
        }
        let mut out = Vec::with_capacity(per_query.len());
        for parts in per_query {
            let merged = merge(parts, options.top_k as usize, metric).map_err(protocol)?;
            let rows = match &merged.fields {
                Some(b) => schema.rows_to_json(b).map_err(protocol)?,
                None => vec![Map::new(); merged.len()],
            };
            out.push(
                merged
                    .keys
                    .iter()
                    .zip(&merged.distances)
                    .zip(rows)
                    .map(|((k, d), fields)| SearchHit {
                        id: pk_json(k),
                        distance: *d,
                        fields,
                    })
                    .collect(),
            );
        }
        Ok(out)
    }

    /// The rows matching `options.filter` (primary key first, then the output fields).
    pub async fn query(
        &self,
        collection: &str,
        options: &QueryOptions,
    ) -> Result<QueryRows, ClientError> {
        let (started, mut attempt) = (Instant::now(), 0);
        loop {
            let (info, schema) = self.described(collection).await?;
            match self.query_in(&info, &schema, options).await {
                Err(e) if self.retry(collection, &e, started, &mut attempt).await => {}
                r => return r,
            }
        }
    }

    async fn query_in(
        &self,
        info: &CollectionInfo,
        schema: &Schema,
        options: &QueryOptions,
    ) -> Result<QueryRows, ClientError> {
        let request = QueryRequest {
            collection: info.name.clone(),
            collection_id: info.collection_id,
            vchannels: Vec::new(),
            filter: options.filter.clone(),
            output_fields: options.output_fields.clone(),
            limit: options.limit,
            count_only: false,
            options: Some(self.read_options(options.consistency, &options.partitions)),
            order_by_key: options.order_by_key,
        };
        let answers = self
            .per_owner(
                info,
                options.consistency == Consistency::Strong,
                |grpc, vchannels| {
                    let mut r = request.clone();
                    self.session_for(&mut r.options, &vchannels);
                    r.vchannels = vchannels;
                    async move { Ok(grpc.query.clone().query(r).await?.into_inner()) }
                },
            )
            .await?;
        let mut out = QueryRows::default();
        for a in answers {
            out.truncated |= a.truncated;
            if a.rows.is_empty() {
                continue;
            }
            for b in walden_schema::decode_ipc(&a.rows).map_err(protocol)? {
                out.rows.extend(schema.rows_to_json(&b).map_err(protocol)?);
            }
        }
        if options.order_by_key {
            // Each shard's rows are in key order; a key lives in one shard.
            let pk = &schema.primary_key().name;
            out.rows.sort_by(|a, b| key_order(a.get(pk), b.get(pk)));
        }
        if options.limit > 0 && out.rows.len() as u64 > options.limit {
            out.rows.truncate(options.limit as usize);
            out.truncated = true;
        }
        Ok(out)
    }

    /// The rows with these primary keys.
    pub async fn get(
        &self,
        collection: &str,
        ids: &[Value],
        output_fields: &[String],
        consistency: Consistency,
    ) -> Result<QueryRows, ClientError> {
        let (_, schema) = self.described(collection).await?;
        let pk = &schema.primary_key().name;
        let list: Vec<String> = ids.iter().map(Value::to_string).collect();
        self.query(
            collection,
            &QueryOptions {
                order_by_key: false,
                filter: format!("{pk} in [{}]", list.join(", ")),
                output_fields: output_fields.to_vec(),
                limit: 0,
                consistency,
                partitions: Vec::new(),
            },
        )
        .await
    }

    /// What the delegators hold of each shard of `collection`.
    pub async fn shards(
        &self,
        collection: &str,
    ) -> Result<Vec<walden_proto::v1::ShardState>, ClientError> {
        let (started, mut attempt) = (Instant::now(), 0);
        loop {
            let (info, _) = self.described(collection).await?;
            let answers = self
                .per_owner(&info, true, |grpc, vchannels| async move {
                    Ok(grpc
                        .query
                        .clone()
                        .shards(walden_proto::v1::ShardsRequest { vchannels })
                        .await?
                        .into_inner())
                })
                .await;
            match answers {
                Ok(a) => return Ok(a.into_iter().flat_map(|a| a.shards).collect()),
                Err(e) if self.retry(collection, &e, started, &mut attempt).await => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Loads `collection` with `replicas` copies and waits (at most `timeout`) until every
    /// shard serves it with the catalog's index specs, holds every segment its manifest
    /// names, and (with an HNSW index) has built the graph of each.
    pub async fn load(
        &self,
        collection: &str,
        replicas: u32,
        timeout: Duration,
    ) -> Result<Vec<walden_proto::v1::ShardState>, ClientError> {
        let info = self.collections().load(collection, replicas).await?;
        let hnsw = info
            .indexes
            .iter()
            .any(|i| i.index_type() == walden_proto::v1::IndexType::Hnsw);
        let started = tokio::time::Instant::now();
        loop {
            let state = async {
                let shards = self.shards(collection).await?;
                let segments = self.segments(collection).await?;
                Ok::<_, ClientError>((shards, segments))
            };
            let last = match state.await {
                Ok((shards, segments)) => {
                    // Every segment the manifests hold (delete logs aside) is swapped in.
                    let flushed = |v: &str| {
                        segments
                            .segments
                            .iter()
                            .filter(|x| {
                                x.vchannel == v
                                    && x.rows > 0
                                    && matches!(
                                        x.state(),
                                        walden_proto::v1::SegmentState::Flushed
                                            | walden_proto::v1::SegmentState::Compacted
                                    )
                            })
                            .count() as u64
                    };
                    let ready = shards.len() == info.vchannels.len()
                        && shards.iter().all(|s| {
                            s.loaded
                                && s.indexes == info.indexes
                                && s.sealed_segments == flushed(&s.vchannel)
                                && (!hnsw || s.indexed_rows == s.sealed_rows)
                        });
                    if ready {
                        return Ok(shards);
                    }
                    None
                }
                Err(e) if e.is_retryable() => Some(e),
                Err(e) => return Err(e),
            };
            if started.elapsed() >= timeout {
                return Err(ClientError::RetriesExhausted {
                    seconds: started.elapsed().as_secs_f64(),
                    last: Box::new(last.unwrap_or_else(|| ClientError::Server {
                        code: ErrorCode::NotLoaded.as_u32(),
                        message: format!("collection {collection:?} is still loading"),
                        retryable: true,
                    })),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// How many live rows match `filter` (every row when empty).
    pub async fn count(
        &self,
        collection: &str,
        filter: &str,
        consistency: Consistency,
    ) -> Result<u64, ClientError> {
        self.count_partitions(collection, filter, consistency, &[])
            .await
    }

    /// How many live rows of `partitions` (all when empty) match `filter`.
    pub async fn count_partitions(
        &self,
        collection: &str,
        filter: &str,
        consistency: Consistency,
        partitions: &[String],
    ) -> Result<u64, ClientError> {
        let (started, mut attempt) = (Instant::now(), 0);
        loop {
            let (info, _) = self.described(collection).await?;
            match self.count_in(&info, filter, consistency, partitions).await {
                Err(e) if self.retry(collection, &e, started, &mut attempt).await => {}
                r => return r,
            }
        }
    }

    async fn count_in(
        &self,
        info: &CollectionInfo,
        filter: &str,
        consistency: Consistency,
        partitions: &[String],
    ) -> Result<u64, ClientError> {
        let request = QueryRequest {
            collection: info.name.clone(),
            collection_id: info.collection_id,
            vchannels: Vec::new(),
            filter: filter.to_owned(),
            output_fields: Vec::new(),
            limit: 0,
            count_only: true,
            options: Some(self.read_options(consistency, partitions)),
            order_by_key: false,
        };
        let answers = self
            .per_owner(
                info,
                consistency == Consistency::Strong,
                |grpc, vchannels| {
                    let mut r = request.clone();
                    self.session_for(&mut r.options, &vchannels);
                    r.vchannels = vchannels;
                    async move { Ok(grpc.query.clone().query(r).await?.into_inner()) }
                },
            )
            .await?;
        Ok(answers.iter().map(|a| a.count).sum())
    }
}

fn from_proto(h: walden_proto::v1::SearchHits) -> Result<Hits, ClientError> {
    let keys: Vec<Pk> = h
        .int_ids
        .into_iter()
        .map(Pk::Int)
        .chain(h.str_ids.into_iter().map(Pk::Str))
        .collect();
    if keys.len() != h.distances.len() {
        return Err(ClientError::Protocol(format!(
            "a search answer has {} ids for {} distances",
            keys.len(),
            h.distances.len()
        )));
    }
    let fields = if h.fields.is_empty() {
        None
    } else {
        let batches = walden_schema::decode_ipc(&h.fields).map_err(protocol)?;
        match batches.as_slice() {
            [one] => Some(one.clone()),
            [] => None,
            _ => {
                let schema = batches[0].schema();
                Some(arrow_select::concat::concat_batches(&schema, &batches).map_err(protocol)?)
            }
        }
    };
    Ok(Hits {
        keys,
        distances: h.distances,
        fields,
    })
}
