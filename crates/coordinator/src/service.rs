//! The `Collections` gRPC service. A failed call is a gRPC status whose details hold the typed
//! [`walden_proto::v1::Error`] (stable code, retry hint); clients read the code from there.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use walden_proto::v1::{
    self as pb, Alias, AliasRequest, AlterPropertiesRequest, CollectionInfo, CollectionName,
    CreateCollectionRequest, DdlResponse, DropIndexRequest, IndexRequest, ListAliasesRequest,
    ListAliasesResponse, ListCollectionsRequest, ListCollectionsResponse, LoadRequest,
    PartitionRequest, RenameCollectionRequest, collections_server::Collections,
};

use crate::{CoordError, Coordinator, DdlResult};

/// The coordinator's gRPC face.
#[derive(Debug, Clone)]
pub struct CollectionService {
    coord: Arc<Coordinator>,
}

impl CollectionService {
    pub fn new(coord: Arc<Coordinator>) -> Self {
        Self { coord }
    }

    pub fn into_server(self) -> pb::collections_server::CollectionsServer<Self> {
        pb::collections_server::CollectionsServer::new(self)
    }
}

/// The gRPC status for an error: a coarse gRPC code, and the typed error in the details.
pub fn to_status(e: &CoordError) -> Status {
    walden_proto::status::of(e)
}

fn ddl(r: Result<DdlResult, CoordError>) -> Result<Response<DdlResponse>, Status> {
    let r = r.map_err(|e| to_status(&e))?;
    Ok(Response::new(DdlResponse {
        broadcast_id: r.broadcast_id,
        time_ticks: r.time_ticks,
    }))
}

#[tonic::async_trait]
impl Collections for CollectionService {
    async fn create_collection(
        &self,
        req: Request<CreateCollectionRequest>,
    ) -> Result<Response<CollectionInfo>, Status> {
        let r = req.into_inner();
        let info = self
            .coord
            .create_collection(&r.name, r.schema.unwrap_or_default(), r.shards)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(info))
    }

    async fn describe_collection(
        &self,
        req: Request<CollectionName>,
    ) -> Result<Response<CollectionInfo>, Status> {
        let info = self
            .coord
            .describe(&req.into_inner().name)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(info))
    }

    async fn list_collections(
        &self,
        _req: Request<ListCollectionsRequest>,
    ) -> Result<Response<ListCollectionsResponse>, Status> {
        let collections = self.coord.list().await.map_err(|e| to_status(&e))?;
        Ok(Response::new(ListCollectionsResponse { collections }))
    }

    async fn drop_collection(
        &self,
        req: Request<CollectionName>,
    ) -> Result<Response<DdlResponse>, Status> {
        ddl(self.coord.drop_collection(&req.into_inner().name).await)
    }

    async fn create_partition(
        &self,
        req: Request<PartitionRequest>,
    ) -> Result<Response<DdlResponse>, Status> {
        let r = req.into_inner();
        ddl(self
            .coord
            .alter_partition(&r.collection, &r.partition, true)
            .await)
    }

    async fn drop_partition(
        &self,
        req: Request<PartitionRequest>,
    ) -> Result<Response<DdlResponse>, Status> {
        let r = req.into_inner();
        ddl(self
            .coord
            .alter_partition(&r.collection, &r.partition, false)
            .await)
    }

    async fn flush(&self, req: Request<CollectionName>) -> Result<Response<DdlResponse>, Status> {
        ddl(self.coord.flush(&req.into_inner().name).await)
    }

    async fn create_index(
        &self,
        req: Request<IndexRequest>,
    ) -> Result<Response<CollectionInfo>, Status> {
        let r = req.into_inner();
        info(
            self.coord
                .create_index(&r.collection, r.index.unwrap_or_default())
                .await,
        )
    }

    async fn drop_index(
        &self,
        req: Request<DropIndexRequest>,
    ) -> Result<Response<CollectionInfo>, Status> {
        let r = req.into_inner();
        info(self.coord.drop_index(&r.collection, &r.field).await)
    }

    async fn load_collection(
        &self,
        req: Request<LoadRequest>,
    ) -> Result<Response<CollectionInfo>, Status> {
        let r = req.into_inner();
        info(self.coord.load_collection(&r.collection, r.replicas).await)
    }

    async fn release_collection(
        &self,
        req: Request<CollectionName>,
    ) -> Result<Response<CollectionInfo>, Status> {
        info(self.coord.release_collection(&req.into_inner().name).await)
    }

    async fn rename_collection(
        &self,
        req: Request<RenameCollectionRequest>,
    ) -> Result<Response<CollectionInfo>, Status> {
        let r = req.into_inner();
        info(self.coord.rename_collection(&r.name, &r.new_name).await)
    }

    async fn alter_properties(
        &self,
        req: Request<AlterPropertiesRequest>,
    ) -> Result<Response<CollectionInfo>, Status> {
        let r = req.into_inner();
        info(
            self.coord
                .alter_properties(&r.collection, r.set, r.delete)
                .await,
        )
    }

    async fn create_alias(&self, req: Request<AliasRequest>) -> Result<Response<Alias>, Status> {
        let r = req.into_inner();
        alias(self.coord.create_alias(&r.alias, &r.collection).await)
    }

    async fn alter_alias(&self, req: Request<AliasRequest>) -> Result<Response<Alias>, Status> {
        let r = req.into_inner();
        alias(self.coord.alter_alias(&r.alias, &r.collection).await)
    }

    async fn drop_alias(&self, req: Request<AliasRequest>) -> Result<Response<Alias>, Status> {
        alias(self.coord.drop_alias(&req.into_inner().alias).await)
    }

    async fn list_aliases(
        &self,
        req: Request<ListAliasesRequest>,
    ) -> Result<Response<ListAliasesResponse>, Status> {
        let aliases = self
            .coord
            .list_aliases(&req.into_inner().collection)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(ListAliasesResponse { aliases }))
    }
}

fn alias(r: Result<Alias, CoordError>) -> Result<Response<Alias>, Status> {
    r.map(Response::new).map_err(|e| to_status(&e))
}

fn info(r: Result<CollectionInfo, CoordError>) -> Result<Response<CollectionInfo>, Status> {
    r.map(Response::new).map_err(|e| to_status(&e))
}
