//! The `Cluster` gRPC service: the topology stream (any coordinator), and the leader's clock,
//! moves and drains. Errors carry the typed [`walden_proto::v1::Error`] in the status details.

use std::{pin::Pin, sync::Arc};

use tokio_stream::{Stream, StreamExt, wrappers::BroadcastStream};
use tonic::{Request, Response, Status};
use walden_common::TimeTick;
use walden_proto::v1::{
    self as pb, AllocateTicksRequest, AllocateTicksResponse, AssignmentUpdate, ClusterAck,
    ClusterStatusRequest, ClusterStatusResponse, DrainNodeRequest, MovePChannelRequest,
    WatchAssignmentsRequest, cluster_server::Cluster,
};

use crate::{BalanceError, ClusterCoord};

/// The coordinator's `Cluster` service.
#[derive(Debug, Clone)]
pub struct ClusterService {
    coord: Arc<ClusterCoord>,
}

impl ClusterService {
    pub fn new(coord: Arc<ClusterCoord>) -> Self {
        Self { coord }
    }

    pub fn into_server(self) -> pb::cluster_server::ClusterServer<Self> {
        pb::cluster_server::ClusterServer::new(self)
    }
}

/// The gRPC status for an error: a coarse gRPC code, and the typed error in the details.
pub fn to_status(e: &BalanceError) -> Status {
    walden_proto::status::of(e)
}

type UpdateStream = Pin<Box<dyn Stream<Item = Result<AssignmentUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl Cluster for ClusterService {
    type WatchAssignmentsStream = UpdateStream;

    async fn watch_assignments(
        &self,
        _req: Request<WatchAssignmentsRequest>,
    ) -> Result<Response<Self::WatchAssignmentsStream>, Status> {
        let topo = self.coord.topology().clone();
        // Subscribe before the snapshot: a change in between arrives after it (with a higher
        // version), never before it.
        let changes = topo.subscribe();
        let first = topo.snapshot();
        let lagged_topo = topo.clone();
        let rest = BroadcastStream::new(changes).map(move |r| match r {
            Ok(u) => Ok(u),
            // Too slow to follow: start over from a full snapshot.
            Err(_) => Ok(lagged_topo.snapshot()),
        });
        let stream = tokio_stream::once(Ok(first)).chain(rest);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn allocate_ticks(
        &self,
        req: Request<AllocateTicksRequest>,
    ) -> Result<Response<AllocateTicksResponse>, Status> {
        let r = req.into_inner();
        let first = self
            .coord
            .allocate_ticks(r.count, TimeTick(r.above))
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(AllocateTicksResponse {
            first: first.0,
            count: r.count,
        }))
    }

    async fn move_p_channel(
        &self,
        req: Request<MovePChannelRequest>,
    ) -> Result<Response<ClusterAck>, Status> {
        let r = req.into_inner();
        let detail = self
            .coord
            .move_pchannel(&r.pchannel, r.to_node)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(ClusterAck { detail }))
    }

    async fn drain_node(
        &self,
        req: Request<DrainNodeRequest>,
    ) -> Result<Response<ClusterAck>, Status> {
        let detail = self
            .coord
            .drain_node(req.into_inner().node_id)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(ClusterAck { detail }))
    }

    async fn cluster_status(
        &self,
        _req: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
        Ok(Response::new(self.coord.status().await))
    }
}
