//! `walden.v1.Query`: search and query over the vchannels this node's delegators hold.
//! The client sends each owner the vchannels it serves and merges the answers.

use std::sync::Arc;

use arrow_array::RecordBatch;
use tonic::{Request, Response, Status};
use walden_expr::Filter;
use walden_proto::{
    status::of,
    v1::{
        self as pb, MetricType, QueryRequest, QueryResponse, ReadOptions, SearchRequest,
        SearchResponse, query_server::Query,
    },
};
use walden_query::{Hits, Metric, QueryShape, merge};
use walden_segment_format::TICK_COLUMN;

use crate::{DelegatorError, Delegators, Shard, shard::SearchSpec};

#[derive(Debug, Clone)]
pub struct QueryService {
    delegators: Arc<Delegators>,
}

impl QueryService {
    pub fn new(delegators: Arc<Delegators>) -> Self {
        Self { delegators }
    }

    pub fn into_server(self) -> pb::query_server::QueryServer<Self> {
        pb::query_server::QueryServer::new(self)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }

    /// The shards of the request, each checked to belong to `collection` (by id when the
    /// request gives one: a renamed collection's shards know the name it was created with),
    /// caught up to the consistency level's tick.
    async fn shards(
        &self,
        (collection, collection_id): (&str, u64),
        vchannels: &[String],
        options: &ReadOptions,
    ) -> Result<Vec<Arc<Shard>>, DelegatorError> {
        if vchannels.is_empty() {
            return Err(DelegatorError::InvalidArgument("no vchannels named".into()));
        }
        let mut out = Vec::with_capacity(vchannels.len());
        for v in vchannels {
            let s = self.delegators.shard(v)?;
            let other = if collection_id != 0 {
                s.collection_id != collection_id
            } else {
                s.collection() != collection
            };
            if other {
                return Err(DelegatorError::WrongCollection {
                    vchannel: v.clone(),
                    collection: collection.to_owned(),
                });
            }
            out.push(s);
        }
        let config = self.delegators.config();
        for s in &out {
            s.wait(options, config).await?;
        }
        Ok(out)
    }

    async fn search_inner(&self, req: SearchRequest) -> Result<SearchResponse, DelegatorError> {
        let config = self.delegators.config().clone();
        if req.vectors.is_empty() || req.vectors.len() > config.max_vectors {
            return Err(DelegatorError::InvalidArgument(format!(
                "a search takes 1 to {} query vectors, not {}",
                config.max_vectors,
                req.vectors.len()
            )));
        }
        if req.top_k == 0 || req.top_k > config.max_top_k {
            return Err(DelegatorError::InvalidArgument(format!(
                "top_k must be 1 to {}, not {}",
                config.max_top_k, req.top_k
            )));
        }
        let options = req.options.clone().unwrap_or_default();
        let shards = self
            .shards(
                (&req.collection, req.collection_id),
                &req.vchannels,
                &options,
            )
            .await?;
        let first = &shards[0];
        let field = first.vector_field(&req.field)?;
        let metric = match req.metric() {
            MetricType::Unspecified => first.default_metric(&field),
            MetricType::L2 => Metric::L2,
            MetricType::Ip => Metric::Ip,
            MetricType::Cosine => Metric::Cosine,
        };
        let filter = (!req.filter.trim().is_empty())
            .then(|| Filter::new(&req.filter, first.schema()))
            .transpose()?;
        let outputs = first.output_fields(&req.output_fields)?;
        let want_fields = !req.output_fields.is_empty();
        // The sealed part on query nodes gets the request resolved: field, metric, outputs.
        let sealed_req = SearchRequest {
            field: field.clone(),
            metric: metric_type(metric) as i32,
            output_fields: outputs.clone(),
            options: None,
            vchannels: Vec::new(),
            ..req.clone()
        };
        let queries: Vec<Vec<f32>> = req.vectors.into_iter().map(|v| v.values).collect();
        let k = req.top_k as usize;
        let ef = req.ef as usize;
        let partitions = options.partitions;
        // Search is CPU work of milliseconds: off the async workers, one task per shard so the
        // shards of a request use every core.
        let nq = queries.len();
        let (field, queries, filter, outputs, partitions) = (
            Arc::new(field),
            Arc::new(queries),
            Arc::new(filter),
            Arc::new(outputs),
            Arc::new(partitions),
        );
        let tasks: Vec<_> = shards
            .into_iter()
            .map(|s| {
                let shard = s.clone();
                let (field, queries, filter, outputs, partitions) = (
                    field.clone(),
                    queries.clone(),
                    filter.clone(),
                    outputs.clone(),
                    partitions.clone(),
                );
                let task = tokio::task::spawn_blocking(move || {
                    s.search(&SearchSpec {
                        field: &field,
                        queries: &queries,
                        k,
                        metric,
                        filter: filter.as_ref().as_ref(),
                        output_fields: &outputs,
                        partitions: &partitions,
                        ef,
                    })
                });
                (shard, task)
            })
            .collect();
        let mut per_query: Vec<Vec<Hits>> = vec![Vec::new(); nq];
        let ctx = self.delegators.ctx();
        for (shard, t) in tasks {
            let (hits, remote) = t
                .await
                .map_err(|e| DelegatorError::Format(format!("search task: {e}")))??;
            for (q, h) in hits.into_iter().enumerate() {
                per_query[q].push(h);
            }
            if let Some(r) = shard.remote.as_ref().filter(|_| !remote.is_empty()) {
                for answer in r.search(&shard, ctx, &remote, &sealed_req).await? {
                    for (q, h) in answer.into_iter().enumerate().take(nq) {
                        per_query[q].push(h);
                    }
                }
            }
        }
        let results = per_query
            .into_iter()
            .map(|parts| Ok(merge(parts, k, metric)?))
            .collect::<Result<Vec<Hits>, DelegatorError>>()?;
        Ok(SearchResponse {
            results: results
                .into_iter()
                .map(|h| walden_querynode::wire::hits_to_proto(h, want_fields))
                .collect::<Result<_, _>>()?,
            metric: metric_type(metric) as i32,
        })
    }

    async fn query_inner(&self, req: QueryRequest) -> Result<QueryResponse, DelegatorError> {
        let config = self.delegators.config().clone();
        let options = req.options.clone().unwrap_or_default();
        let shards = self
            .shards(
                (&req.collection, req.collection_id),
                &req.vchannels,
                &options,
            )
            .await?;
        let first = &shards[0];
        let filter = (!req.filter.trim().is_empty())
            .then(|| Filter::new(&req.filter, first.schema()))
            .transpose()?;
        let pk = first.pk().to_owned();
        // Every part carries its rows' ticks, so that of rows sharing a key only the one
        // written last is returned (`walden_query::latest`), as Milvus reduces query results.
        let mut outputs = first.output_fields(&req.output_fields)?;
        outputs.push(TICK_COLUMN.to_owned());
        let limit = if req.limit == 0 {
            config.max_rows
        } else {
            req.limit.min(config.max_rows)
        } as usize;
        let by_key = req.order_by_key;
        let count_only = req.count_only;
        let partitions = options.partitions;
        let sealed_req = QueryRequest {
            output_fields: outputs.clone(),
            limit: limit as u64,
            options: None,
            vchannels: Vec::new(),
            ..req.clone()
        };
        let ctx = self.delegators.ctx();
        let (mut count, mut truncated) = (0u64, false);
        let mut batches: Vec<RecordBatch> = Vec::new();
        let mut rows = 0usize;
        // In key order every part is asked for the whole limit: its smallest keys may all
        // come before every other part's.
        let left = |rows: usize| if by_key { limit } else { limit - rows };
        for s in shards {
            let local = {
                let (s, filter, outputs, partitions) = (
                    s.clone(),
                    filter.clone(),
                    outputs.clone(),
                    partitions.clone(),
                );
                let shape = QueryShape {
                    limit: left(rows),
                    by_key,
                };
                tokio::task::spawn_blocking(move || {
                    if count_only {
                        let (n, remote) = s.count(filter.as_ref(), &partitions)?;
                        return Ok::<_, DelegatorError>((n, None, false, remote));
                    }
                    let (batch, more, remote) =
                        s.query(filter.as_ref(), &outputs, &partitions, shape)?;
                    Ok((0, batch, more, remote))
                })
                .await
                .map_err(|e| DelegatorError::Format(format!("query task: {e}")))??
            };
            let (n, batch, more, remote) = local;
            count += n;
            truncated |= more;
            if let Some(b) = batch {
                rows += b.num_rows();
                batches.push(b);
            }
            let Some(r) = s.remote.as_ref().filter(|_| !remote.is_empty()) else {
                continue;
            };
            if !count_only && left(rows) == 0 {
                truncated = true;
                continue;
            }
            let sub = QueryRequest {
                limit: left(rows) as u64,
                ..sealed_req.clone()
            };
            for answer in r.query(&s, ctx, &remote, &sub).await? {
                count += if count_only { answer.count } else { 0 };
                truncated |= answer.truncated;
                if answer.rows.is_empty() {
                    continue;
                }
                for b in walden_schema::decode_ipc(&answer.rows)? {
                    let take = b.num_rows().min(left(rows));
                    truncated |= take < b.num_rows();
                    rows += take;
                    batches.push(b.slice(0, take));
                }
            }
        }
        if count_only {
            return Ok(QueryResponse {
                count,
                ..Default::default()
            });
        }
        let (all, more) = walden_query::latest(&batches, &pk, QueryShape { limit, by_key })?;
        truncated |= more;
        let rows = all.as_ref().map_or(0, RecordBatch::num_rows);
        let rows_bytes = match all {
            None => bytes::Bytes::new(),
            Some(all) => walden_schema::batch_to_ipc(&all)?,
        };
        Ok(QueryResponse {
            rows: rows_bytes,
            count: rows as u64,
            truncated,
        })
    }
}

fn metric_type(m: Metric) -> MetricType {
    match m {
        Metric::L2 => MetricType::L2,
        Metric::Ip => MetricType::Ip,
        Metric::Cosine => MetricType::Cosine,
    }
}

#[tonic::async_trait]
impl Query for QueryService {
    async fn search(
        &self,
        request: Request<SearchRequest>,
    ) -> Result<Response<SearchResponse>, Status> {
        self.search_inner(request.into_inner())
            .await
            .map(Response::new)
            .map_err(|e| of(&e))
    }

    async fn shards(
        &self,
        request: Request<pb::ShardsRequest>,
    ) -> Result<Response<pb::ShardsResponse>, Status> {
        let mut out = pb::ShardsResponse::default();
        for v in request.into_inner().vchannels {
            let shard = self.delegators.shard(&v).map_err(|e| of(&e))?;
            out.shards.push(shard.state());
        }
        Ok(Response::new(out))
    }

    async fn query(
        &self,
        request: Request<QueryRequest>,
    ) -> Result<Response<QueryResponse>, Status> {
        self.query_inner(request.into_inner())
            .await
            .map(Response::new)
            .map_err(|e| of(&e))
    }
}
