//! `walden.v1.QueryNode`: what delegators ask of a query node.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use walden_expr::Filter;
use walden_proto::{
    status::of,
    v1::{
        self as pb, ForwardDeletesRequest, ForwardDeletesResponse, HeldSegment, MetricType,
        QueryNodeStateRequest, QueryNodeStateResponse, QueryResponse, SegmentQueryRequest,
        SegmentSearchRequest, SegmentSearchResponse, query_node_server::QueryNodeServer,
    },
};
use walden_query::{Metric, SearchParams, Segment};
use walden_segment_format::{Pk, delete_keys};

use crate::{
    QueryNode, QueryNodeError,
    node::{Collection, Held},
};

#[derive(Debug, Clone)]
pub struct QueryNodeService {
    node: Arc<QueryNode>,
}

impl QueryNodeService {
    pub fn new(node: Arc<QueryNode>) -> Self {
        Self { node }
    }

    pub fn into_server(self) -> QueryNodeServer<Self> {
        QueryNodeServer::new(self)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }

    /// The collection and segments a request names, held by the incarnation it synced with.
    fn resolve(
        &self,
        collection_id: u64,
        vchannel: &str,
        ids: &[u64],
        incarnation: u64,
    ) -> Result<(Arc<Collection>, Vec<Arc<Held>>), QueryNodeError> {
        if incarnation != 0 && incarnation != self.node.incarnation() {
            return Err(QueryNodeError::NotHeld(format!(
                "query node {} restarted since the asker synced with it",
                self.node.id()
            )));
        }
        let coll = self.node.collection(collection_id).ok_or_else(|| {
            QueryNodeError::NotHeld(format!(
                "query node {} holds nothing of collection {collection_id}",
                self.node.id()
            ))
        })?;
        Ok((coll, self.node.segments(collection_id, vchannel, ids)?))
    }

    async fn search_inner(
        &self,
        req: SegmentSearchRequest,
    ) -> Result<SegmentSearchResponse, QueryNodeError> {
        let (coll, held) = self.resolve(
            req.collection_id,
            &req.vchannel,
            &req.segment_ids,
            req.incarnation,
        )?;
        let s = req.search.unwrap_or_default();
        let metric = match s.metric() {
            MetricType::Ip => Metric::Ip,
            MetricType::Cosine => Metric::Cosine,
            MetricType::L2 | MetricType::Unspecified => Metric::L2,
        };
        tokio::task::spawn_blocking(move || {
            let filter = (!s.filter.trim().is_empty())
                .then(|| Filter::new(&s.filter, &coll.schema))
                .transpose()?;
            let queries: Vec<Vec<f32>> = s.vectors.into_iter().map(|v| v.values).collect();
            let guards: Vec<_> = held.iter().map(|h| h.read()).collect();
            let segments: Vec<&Segment> = guards.iter().map(|g| &**g).collect();
            let params = SearchParams {
                field: &s.field,
                queries: &queries,
                k: s.top_k as usize,
                metric,
                filter: filter.as_ref(),
                ef: s.ef as usize,
            };
            let hits = walden_query::search(&segments, &params, &s.output_fields, &coll.pk)?;
            Ok(SegmentSearchResponse {
                results: hits
                    .into_iter()
                    .map(|h| crate::wire::hits_to_proto(h, true))
                    .collect::<Result<_, _>>()?,
            })
        })
        .await
        .map_err(|e| QueryNodeError::Format(format!("search task: {e}")))?
    }

    async fn query_inner(&self, req: SegmentQueryRequest) -> Result<QueryResponse, QueryNodeError> {
        let (coll, held) = self.resolve(
            req.collection_id,
            &req.vchannel,
            &req.segment_ids,
            req.incarnation,
        )?;
        let q = req.query.unwrap_or_default();
        tokio::task::spawn_blocking(move || {
            let filter = (!q.filter.trim().is_empty())
                .then(|| Filter::new(&q.filter, &coll.schema))
                .transpose()?;
            let guards: Vec<_> = held.iter().map(|h| h.read()).collect();
            let segments: Vec<&Segment> = guards.iter().map(|g| &**g).collect();
            if q.count_only {
                return Ok(QueryResponse {
                    count: walden_query::count(&segments, filter.as_ref())?,
                    ..Default::default()
                });
            }
            let (rows, truncated) = walden_query::query(
                &segments,
                filter.as_ref(),
                &q.output_fields,
                &coll.pk,
                walden_query::QueryShape {
                    limit: q.limit as usize,
                    by_key: q.order_by_key,
                },
            )?;
            Ok(QueryResponse {
                count: rows.as_ref().map_or(0, |r| r.num_rows() as u64),
                rows: match rows {
                    Some(r) => walden_schema::batch_to_ipc(&r)?,
                    None => bytes::Bytes::new(),
                },
                truncated,
            })
        })
        .await
        .map_err(|e| QueryNodeError::Format(format!("query task: {e}")))?
    }

    fn forward_inner(&self, req: ForwardDeletesRequest) -> Result<(), QueryNodeError> {
        let (_, held) = self.resolve(
            req.collection_id,
            &req.vchannel,
            &req.segment_ids,
            req.incarnation,
        )?;
        let ids = req.ids.unwrap_or_default();
        let keys: Vec<Pk> = delete_keys(&ids).collect();
        if keys.len() != req.ticks.len() {
            return Err(QueryNodeError::InvalidArgument(format!(
                "{} keys and {} ticks",
                keys.len(),
                req.ticks.len()
            )));
        }
        for h in held {
            let mut seg = h.segment.write().unwrap_or_else(|e| e.into_inner());
            for (k, t) in keys.iter().zip(&req.ticks) {
                seg.delete(k, *t);
            }
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl pb::query_node_server::QueryNode for QueryNodeService {
    async fn search_segments(
        &self,
        request: Request<SegmentSearchRequest>,
    ) -> Result<Response<SegmentSearchResponse>, Status> {
        self.search_inner(request.into_inner())
            .await
            .map(Response::new)
            .map_err(|e| of(&e))
    }

    async fn query_segments(
        &self,
        request: Request<SegmentQueryRequest>,
    ) -> Result<Response<QueryResponse>, Status> {
        self.query_inner(request.into_inner())
            .await
            .map(Response::new)
            .map_err(|e| of(&e))
    }

    async fn forward_deletes(
        &self,
        request: Request<ForwardDeletesRequest>,
    ) -> Result<Response<ForwardDeletesResponse>, Status> {
        self.forward_inner(request.into_inner())
            .map(|()| Response::new(ForwardDeletesResponse {}))
            .map_err(|e| of(&e))
    }

    async fn state(
        &self,
        request: Request<QueryNodeStateRequest>,
    ) -> Result<Response<QueryNodeStateResponse>, Status> {
        let req = request.into_inner();
        let have: std::collections::HashSet<u64> = req.have_filters.into_iter().collect();
        let segments = self
            .node
            .all()
            .into_iter()
            .filter(|h| {
                req.vchannel.is_empty()
                    || (h.collection_id == req.collection_id && h.vchannel == req.vchannel)
            })
            .map(|h| {
                let s = h.read();
                HeldSegment {
                    collection_id: h.collection_id,
                    vchannel: h.vchannel.clone(),
                    segment_id: s.id(),
                    rows: u64::from(s.rows()),
                    indexed_rows: s.indexed_rows() as u64,
                    key_filter: if have.contains(&s.id()) {
                        bytes::Bytes::new()
                    } else {
                        h.key_filter.clone()
                    },
                }
            })
            .collect();
        Ok(Response::new(QueryNodeStateResponse {
            id: self.node.id(),
            incarnation: self.node.incarnation(),
            segments,
        }))
    }
}
