//! `walden.v1.Storage`: what the flushers of a node know of its vchannels' segments.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use walden_common::ErrorCode;
use walden_proto::v1::{
    self as pb, SegmentInfo, SegmentState, SegmentsRequest, SegmentsResponse, VChannelFlushState,
    storage_server::Storage,
};

use crate::Flushers;

#[derive(Debug, Clone)]
pub struct StorageService {
    flushers: Arc<Flushers>,
}

impl StorageService {
    pub fn new(flushers: Arc<Flushers>) -> Self {
        Self { flushers }
    }

    pub fn into_server(self) -> pb::storage_server::StorageServer<Self> {
        pb::storage_server::StorageServer::new(self)
    }
}

#[tonic::async_trait]
impl Storage for StorageService {
    async fn segments(
        &self,
        request: Request<SegmentsRequest>,
    ) -> Result<Response<SegmentsResponse>, Status> {
        let mut out = SegmentsResponse::default();
        let blobs = self.flushers.blobs();
        for vchannel in request.into_inner().vchannels {
            let Some((m, held)) = self.flushers.view_of(&vchannel) else {
                let pchannel_served = vchannel
                    .rsplit_once('_')
                    .is_some_and(|(p, _)| self.flushers.serves(p));
                // A served pchannel whose flusher has not met the vchannel yet: nothing flushed
                // or held that it knows of.
                if pchannel_served {
                    out.vchannels.push(VChannelFlushState {
                        vchannel,
                        ..Default::default()
                    });
                    continue;
                }
                return Err(walden_proto::status::status(
                    ErrorCode::ChannelNotFound,
                    format!("vchannel {vchannel:?} is not on a pchannel this node serves"),
                ));
            };
            let url = |mut f: pb::SegmentFile| {
                f.url = blobs.url(&f.key);
                f
            };
            for s in &m.segments {
                out.segments.push(SegmentInfo {
                    segment_id: s.segment_id,
                    vchannel: vchannel.clone(),
                    partition: s.partition.clone(),
                    state: s.state,
                    rows: s.rows,
                    deleted_rows: s.deleted_rows,
                    files: s.files.iter().cloned().map(url).collect(),
                });
            }
            // Delete logs, as Milvus's L0 segments: no rows, only deletes.
            for d in &m.deltas {
                out.segments.push(SegmentInfo {
                    segment_id: d.id,
                    vchannel: vchannel.clone(),
                    partition: String::new(),
                    state: SegmentState::Flushed as i32,
                    rows: 0,
                    deleted_rows: d.file.as_ref().map_or(0, |f| f.rows),
                    files: d.file.iter().cloned().map(url).collect(),
                });
            }
            out.segments.extend(held);
            out.vchannels.push(VChannelFlushState {
                vchannel,
                flushed_tick: m.flushed_tick,
                checkpoint_id: m.checkpoint_id,
            });
        }
        Ok(Response::new(out))
    }
}
