//! Milvus's gRPC API (`milvus.proto.milvus.MilvusService`, what pymilvus speaks) on top of
//! Walden's client.
//!
//! Contract:
//! - [`Milvus`] answers every RPC with Milvus's encodings and statuses ([`status`]): success has
//!   `code` 0, a failure a Milvus code, the legacy `error_code` where clients test it, and a
//!   reason naming what is wrong. Bad input is refused before anything is written.
//! - It holds no state of its own: every call goes through a [`walden_client::Client`] (routing,
//!   waiting for a moving pchannel, retries), so the same service runs inside `walden
//!   standalone` and in any number of stateless `walden proxy` processes.
//! - Schemas keep what Milvus users gave ([`schema`]): field ids, Milvus types, the dynamic
//!   field; Walden stores the data in its own types.
//! - Timestamps are the same on both sides: Walden's ticks are hybrid timestamps laid out as
//!   Milvus's (`physical_ms << 18 | logical`), so a tick is a Milvus timestamp as is.
//! - An RPC Walden does not serve answers `UNIMPLEMENTED` naming the RPC ([`NameUnimplemented`]).
//! - Only the `default` database exists.

mod data;
mod index;
pub mod names;
mod partial;
mod partitions;
pub mod rows;
pub mod schema;
pub mod status;
mod unimplemented;

pub use unimplemented::NameUnimplemented;

use tonic::{Request, Response, Status};
use walden_client::{AliasOp, Client, Collections};
use walden_milvus_proto::{
    common::{self as mc, ServerInfo},
    milvus::{
        self as m,
        milvus_service_server::{MilvusService, MilvusServiceServer},
    },
};
use walden_proto::v1::CollectionState;

/// The one database.
pub const DEFAULT_DB: &str = "default";

/// The Milvus version pymilvus is told (the API level Walden follows).
pub const MILVUS_VERSION: &str = "v2.6.0";

/// The Milvus API over a Walden client.
#[derive(Clone, Debug)]
pub struct Milvus {
    client: ClientSlot,
}

/// The client the API calls Walden through, replaceable while it serves (a proxy connects
/// again when the cluster's coordinator changes).
///
/// Writes go through one long-lived [`Collections`] per client: its producers (one per
/// pchannel, idempotent) serve every insert, instead of a new producer per call, which would
/// churn the nodes' table of remembered producers.
#[derive(Clone, Debug)]
pub struct ClientSlot(std::sync::Arc<std::sync::RwLock<(Client, std::sync::Arc<Collections>)>>);

impl ClientSlot {
    fn new(client: Client) -> Self {
        let writes = std::sync::Arc::new(client.collections());
        Self(std::sync::Arc::new(std::sync::RwLock::new((
            client, writes,
        ))))
    }

    pub fn get(&self) -> Client {
        self.0.read().unwrap_or_else(|e| e.into_inner()).0.clone()
    }

    /// The collections API that writes go through.
    pub fn writes(&self) -> std::sync::Arc<Collections> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).1.clone()
    }

    /// Calls from now on go through `client`; calls under way finish with the old one.
    pub fn replace(&self, client: Client) {
        let writes = std::sync::Arc::new(client.collections());
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = (client, writes);
    }
}

impl Milvus {
    pub fn new(client: Client) -> Self {
        Self {
            client: ClientSlot::new(client),
        }
    }

    /// Where the service's client can be replaced.
    pub fn slot(&self) -> ClientSlot {
        self.client.clone()
    }

    fn client(&self) -> Client {
        self.client.get()
    }

    async fn alias(
        &self,
        op: AliasOp,
        db: &str,
        alias: &str,
        collection: &str,
    ) -> Answer<mc::Status> {
        answer(names::alias(&self.client.writes(), op, db, alias, collection).await)
    }

    /// The gRPC service, ready for a router: unserved RPCs answer `UNIMPLEMENTED` naming the
    /// RPC, and requests up to 256 MiB are taken (a pymilvus insert batch is sent whole).
    pub fn into_service(self) -> NameUnimplemented<MilvusServiceServer<Self>> {
        NameUnimplemented(
            MilvusServiceServer::new(self)
                .max_decoding_message_size(256 << 20)
                .max_encoding_message_size(256 << 20),
        )
    }

    /// Checks the database name: only `default` (or none) exists.
    fn database(db: &str) -> Result<(), mc::Status> {
        if db.is_empty() || db == DEFAULT_DB {
            Ok(())
        } else {
            Err(status::fail(
                status::Code::DatabaseNotFound,
                format!("database not found[database={db}]: Walden has only the default database"),
            ))
        }
    }
}

type Answer<T> = Result<Response<T>, Status>;

fn answer<T>(t: T) -> Answer<T> {
    Ok(Response::new(t))
}

/// A response that can carry a failed status and nothing else.
trait Refusal {
    fn refusal(s: mc::Status) -> Self;
}

macro_rules! refusal {
    ($($t:ty),* $(,)?) => {$(
        impl Refusal for $t {
            fn refusal(s: mc::Status) -> Self {
                Self { status: Some(s), ..Default::default() }
            }
        }
    )*};
}

refusal!(
    m::MutationResult,
    m::SearchResults,
    m::QueryResults,
    m::DescribeCollectionResponse,
    m::ShowCollectionsResponse,
    m::DescribeDatabaseResponse,
    m::BoolResponse,
);

impl Refusal for mc::Status {
    fn refusal(s: mc::Status) -> Self {
        s
    }
}

/// Only the `default` database exists: another one is refused with code 800, as `T`.
fn in_default_db<T: Refusal>(db: &str) -> Result<(), T> {
    Milvus::database(db).map_err(T::refusal)
}

#[tonic::async_trait]
impl MilvusService for Milvus {
    async fn connect(&self, _req: Request<m::ConnectRequest>) -> Answer<m::ConnectResponse> {
        answer(m::ConnectResponse {
            status: Some(status::ok()),
            server_info: Some(ServerInfo {
                build_tags: MILVUS_VERSION.into(),
                deploy_mode: "walden".into(),
                reserved: [("walden".to_owned(), env!("CARGO_PKG_VERSION").to_owned())].into(),
                ..ServerInfo::default()
            }),
            identifier: i64::from(rand_id()),
        })
    }

    async fn get_version(
        &self,
        _req: Request<m::GetVersionRequest>,
    ) -> Answer<m::GetVersionResponse> {
        answer(m::GetVersionResponse {
            status: Some(status::ok()),
            version: MILVUS_VERSION.into(),
        })
    }

    async fn check_health(
        &self,
        _req: Request<m::CheckHealthRequest>,
    ) -> Answer<m::CheckHealthResponse> {
        let healthy = self.client().collections().list().await;
        answer(m::CheckHealthResponse {
            status: Some(status::ok()),
            is_healthy: healthy.is_ok(),
            reasons: healthy.err().map(|e| e.to_string()).into_iter().collect(),
            quota_states: vec![],
        })
    }

    async fn list_databases(
        &self,
        _req: Request<m::ListDatabasesRequest>,
    ) -> Answer<m::ListDatabasesResponse> {
        answer(m::ListDatabasesResponse {
            status: Some(status::ok()),
            db_names: vec![DEFAULT_DB.into()],
            created_timestamp: vec![0],
            db_ids: vec![1],
        })
    }

    async fn describe_database(
        &self,
        req: Request<m::DescribeDatabaseRequest>,
    ) -> Answer<m::DescribeDatabaseResponse> {
        if let Err(refused) = in_default_db(&req.get_ref().db_name) {
            return answer(refused);
        }
        answer(m::DescribeDatabaseResponse {
            status: Some(status::ok()),
            db_name: DEFAULT_DB.into(),
            db_id: 1,
            ..Default::default()
        })
    }

    async fn create_collection(
        &self,
        req: Request<m::CreateCollectionRequest>,
    ) -> Answer<mc::Status> {
        let r = req.into_inner();
        if let Err(refused) = in_default_db(&r.db_name) {
            return answer(refused);
        }
        let translated = match schema::from_milvus(&r.collection_name, &r.schema) {
            Ok(t) => t,
            Err(e) => return answer(status::fail(status::Code::IllegalSchema, e)),
        };
        let mut translated = translated;
        match names::check_properties(&r.properties) {
            Ok(props) => translated.walden.properties.extend(props),
            Err(refused) => return answer(refused),
        }
        translated.walden.properties.insert(
            data::CONSISTENCY_PROPERTY.into(),
            bytes::Bytes::from(r.consistency_level.to_string().into_bytes()),
        );
        let walden = match walden_schema::Schema::new(translated.walden) {
            Ok(s) => s,
            Err(e) => return answer(status::fail(status::Code::IllegalSchema, e.to_string())),
        };
        let shards = u32::try_from(r.shards_num.max(1)).unwrap_or(1);
        let done = self
            .client
            .writes()
            .create(&r.collection_name, &walden, shards)
            .await;
        answer(match done {
            Ok(_) => status::ok(),
            Err(e) => status::from_client(&e),
        })
    }

    async fn drop_collection(&self, req: Request<m::DropCollectionRequest>) -> Answer<mc::Status> {
        let r = req.into_inner();
        if let Err(refused) = in_default_db(&r.db_name) {
            return answer(refused);
        }
        answer(
            match self
                .client
                .writes()
                .drop_collection(&r.collection_name)
                .await
            {
                // Milvus answers success for a collection that is not there.
                Ok(_) => status::ok(),
                Err(e)
                    if status::from_client(&e).code == status::Code::CollectionNotFound as i32 =>
                {
                    status::ok()
                }
                Err(e) => status::from_client(&e),
            },
        )
    }

    async fn has_collection(
        &self,
        req: Request<m::HasCollectionRequest>,
    ) -> Answer<m::BoolResponse> {
        let r = req.into_inner();
        if let Err(refused) = in_default_db(&r.db_name) {
            return answer(refused);
        }
        answer(
            match self
                .client()
                .collections()
                .describe(&r.collection_name)
                .await
            {
                Ok(info) => m::BoolResponse {
                    status: Some(status::ok()),
                    value: info.state == CollectionState::Created as i32,
                },
                Err(e) => {
                    let s = status::from_client(&e);
                    if s.code == status::Code::CollectionNotFound as i32 {
                        m::BoolResponse {
                            status: Some(status::ok()),
                            value: false,
                        }
                    } else {
                        m::BoolResponse {
                            status: Some(s),
                            value: false,
                        }
                    }
                }
            },
        )
    }

    async fn describe_collection(
        &self,
        req: Request<m::DescribeCollectionRequest>,
    ) -> Answer<m::DescribeCollectionResponse> {
        let r = req.into_inner();
        if let Err(refused) = in_default_db(&r.db_name) {
            return answer(refused);
        }
        let info = match self
            .client()
            .collections()
            .describe(&r.collection_name)
            .await
        {
            Ok(i) if i.state == CollectionState::Created as i32 => i,
            Ok(_) => {
                return answer(m::DescribeCollectionResponse {
                    status: Some(status::no_collection(&r.collection_name)),
                    ..Default::default()
                });
            }
            Err(e) => {
                let mut s = status::from_client(&e);
                if s.code == status::Code::CollectionNotFound as i32 {
                    s = status::no_collection(&r.collection_name);
                }
                return answer(m::DescribeCollectionResponse {
                    status: Some(s),
                    ..Default::default()
                });
            }
        };
        let walden = info.schema.clone().unwrap_or_default();
        let mut schema = schema::to_milvus(&info.name, &walden);
        // Milvus does not list the dynamic field (pymilvus would take it for an input field).
        schema.fields.retain(|f| !f.is_dynamic);
        let id = i64::try_from(info.collection_id).unwrap_or(i64::MAX);
        answer(m::DescribeCollectionResponse {
            status: Some(status::ok()),
            schema: Some(schema),
            collection_id: id,
            virtual_channel_names: info.vchannels.iter().map(|v| v.name.clone()).collect(),
            physical_channel_names: info.vchannels.iter().map(|v| v.pchannel.clone()).collect(),
            shards_num: i32::try_from(info.vchannels.len()).unwrap_or(i32::MAX),
            consistency_level: data::default_level(&info),
            collection_name: info.name.clone(),
            db_name: DEFAULT_DB.into(),
            num_partitions: i64::try_from(info.partitions.len()).unwrap_or(0),
            db_id: 1,
            aliases: info.aliases.clone(),
            properties: names::properties(&walden),
            ..Default::default()
        })
    }

    async fn create_alias(&self, req: Request<m::CreateAliasRequest>) -> Answer<mc::Status> {
        let r = req.into_inner();
        self.alias(AliasOp::Create, &r.db_name, &r.alias, &r.collection_name)
            .await
    }

    async fn alter_alias(&self, req: Request<m::AlterAliasRequest>) -> Answer<mc::Status> {
        let r = req.into_inner();
        self.alias(AliasOp::Alter, &r.db_name, &r.alias, &r.collection_name)
            .await
    }

    async fn drop_alias(&self, req: Request<m::DropAliasRequest>) -> Answer<mc::Status> {
        let r = req.into_inner();
        self.alias(AliasOp::Drop, &r.db_name, &r.alias, "").await
    }

    async fn describe_alias(
        &self,
        req: Request<m::DescribeAliasRequest>,
    ) -> Answer<m::DescribeAliasResponse> {
        answer(names::describe_alias(&self.client(), req.into_inner()).await)
    }

    async fn list_aliases(
        &self,
        req: Request<m::ListAliasesRequest>,
    ) -> Answer<m::ListAliasesResponse> {
        answer(names::list_aliases(&self.client(), req.into_inner()).await)
    }

    async fn rename_collection(
        &self,
        req: Request<m::RenameCollectionRequest>,
    ) -> Answer<mc::Status> {
        answer(names::rename(&self.client.writes(), req.into_inner()).await)
    }

    async fn alter_collection(
        &self,
        req: Request<m::AlterCollectionRequest>,
    ) -> Answer<mc::Status> {
        answer(names::alter_collection(&self.client.writes(), req.into_inner()).await)
    }

    async fn alloc_timestamp(
        &self,
        _req: Request<m::AllocTimestampRequest>,
    ) -> Answer<m::AllocTimestampResponse> {
        answer(names::alloc_timestamp(&self.client()).await)
    }

    async fn insert(&self, req: Request<m::InsertRequest>) -> Answer<m::MutationResult> {
        let r = req.into_inner();
        if let Err(refused) = in_default_db(&r.db_name) {
            return answer(refused);
        }
        answer(
            data::write(
                &self.client(),
                &self.client.writes(),
                &r.collection_name,
                &r.partition_name,
                &r.fields_data,
                r.num_rows,
                false,
            )
            .await,
        )
    }

    async fn upsert(&self, req: Request<m::UpsertRequest>) -> Answer<m::MutationResult> {
        let r = req.into_inner();
        if let Err(refused) = in_default_db(&r.db_name) {
            return answer(refused);
        }
        let client = self.client();
        let fields = match partial::asked(&r) {
            Err(refused) => return answer(data::failed_mutation(refused)),
            Ok(false) => r.fields_data,
            Ok(true) => {
                // The description the write below uses too (cached for reads and writes).
                let (_, milvus) = match data::describe_recent(&client, &r.collection_name).await {
                    Ok(x) => x,
                    Err(s) => return answer(data::failed_mutation(s)),
                };
                let n = r.num_rows as usize;
                match partial::complete(&client, &r.collection_name, &milvus, &r.fields_data, n)
                    .await
                {
                    Ok(f) => f,
                    Err(s) => return answer(data::failed_mutation(s)),
                }
            }
        };
        answer(
            data::write(
                &client,
                &self.client.writes(),
                &r.collection_name,
                &r.partition_name,
                &fields,
                r.num_rows,
                true,
            )
            .await,
        )
    }

    async fn delete(&self, req: Request<m::DeleteRequest>) -> Answer<m::MutationResult> {
        let r = req.into_inner();
        if let Err(refused) = in_default_db(&r.db_name) {
            return answer(refused);
        }
        answer(data::delete(&self.client(), &self.client.writes(), r).await)
    }

    async fn search(&self, req: Request<m::SearchRequest>) -> Answer<m::SearchResults> {
        let r = req.into_inner();
        if let Err(refused) = in_default_db(&r.db_name) {
            return answer(refused);
        }
        answer(data::search(&self.client(), r).await)
    }

    async fn query(&self, req: Request<m::QueryRequest>) -> Answer<m::QueryResults> {
        let r = req.into_inner();
        if let Err(refused) = in_default_db(&r.db_name) {
            return answer(refused);
        }
        answer(data::query(&self.client(), r).await)
    }

    async fn create_index(&self, req: Request<m::CreateIndexRequest>) -> Answer<mc::Status> {
        answer(index::create(&self.client(), req.into_inner()).await)
    }

    async fn describe_index(
        &self,
        req: Request<m::DescribeIndexRequest>,
    ) -> Answer<m::DescribeIndexResponse> {
        answer(index::describe_index(&self.client(), req.into_inner()).await)
    }

    async fn drop_index(&self, req: Request<m::DropIndexRequest>) -> Answer<mc::Status> {
        answer(index::drop(&self.client(), req.into_inner()).await)
    }

    async fn get_index_state(
        &self,
        req: Request<m::GetIndexStateRequest>,
    ) -> Answer<m::GetIndexStateResponse> {
        answer(index::state(&self.client(), req.into_inner()).await)
    }

    async fn get_index_build_progress(
        &self,
        req: Request<m::GetIndexBuildProgressRequest>,
    ) -> Answer<m::GetIndexBuildProgressResponse> {
        answer(index::build_progress(&self.client(), req.into_inner()).await)
    }

    async fn load_collection(&self, req: Request<m::LoadCollectionRequest>) -> Answer<mc::Status> {
        answer(data::load(&self.client(), req.into_inner()).await)
    }

    async fn release_collection(
        &self,
        req: Request<m::ReleaseCollectionRequest>,
    ) -> Answer<mc::Status> {
        answer(data::release(&self.client(), req.into_inner()).await)
    }

    async fn get_load_state(
        &self,
        req: Request<m::GetLoadStateRequest>,
    ) -> Answer<m::GetLoadStateResponse> {
        let r = req.into_inner();
        answer(
            match data::load_state(&self.client(), &r.collection_name).await {
                Ok(state) => m::GetLoadStateResponse {
                    status: Some(status::ok()),
                    state: state as i32,
                },
                // As Milvus's proxy answers: a collection that is not there is a state.
                Err(s) if s.code == status::Code::CollectionNotFound as i32 => {
                    m::GetLoadStateResponse {
                        status: Some(status::ok()),
                        state: mc::LoadState::NotExist as i32,
                    }
                }
                Err(s) => m::GetLoadStateResponse {
                    status: Some(s),
                    state: 0,
                },
            },
        )
    }

    async fn get_loading_progress(
        &self,
        req: Request<m::GetLoadingProgressRequest>,
    ) -> Answer<m::GetLoadingProgressResponse> {
        let r = req.into_inner();
        answer(
            match data::load_state(&self.client(), &r.collection_name).await {
                Ok(state) => m::GetLoadingProgressResponse {
                    status: Some(status::ok()),
                    progress: if state == mc::LoadState::Loaded {
                        100
                    } else {
                        0
                    },
                    refresh_progress: 0,
                },
                Err(s) => m::GetLoadingProgressResponse {
                    status: Some(s),
                    ..Default::default()
                },
            },
        )
    }

    async fn flush(&self, req: Request<m::FlushRequest>) -> Answer<m::FlushResponse> {
        answer(data::flush(&self.client(), req.into_inner()).await)
    }

    async fn get_flush_state(
        &self,
        _req: Request<m::GetFlushStateRequest>,
    ) -> Answer<m::GetFlushStateResponse> {
        // Flush answers once everything it sealed is flushed.
        answer(m::GetFlushStateResponse {
            status: Some(status::ok()),
            flushed: true,
        })
    }

    async fn get_collection_statistics(
        &self,
        req: Request<m::GetCollectionStatisticsRequest>,
    ) -> Answer<m::GetCollectionStatisticsResponse> {
        let r = req.into_inner();
        answer(
            match data::row_count(&self.client(), &r.collection_name, "").await {
                Ok(n) => m::GetCollectionStatisticsResponse {
                    status: Some(status::ok()),
                    stats: vec![mc::KeyValuePair {
                        key: "row_count".into(),
                        value: n.to_string(),
                    }],
                },
                Err(s) => m::GetCollectionStatisticsResponse {
                    status: Some(s),
                    stats: vec![],
                },
            },
        )
    }

    async fn get_partition_statistics(
        &self,
        req: Request<m::GetPartitionStatisticsRequest>,
    ) -> Answer<m::GetPartitionStatisticsResponse> {
        let r = req.into_inner();
        let n = data::row_count(&self.client(), &r.collection_name, &r.partition_name).await;
        answer(match n {
            Ok(n) => m::GetPartitionStatisticsResponse {
                status: Some(status::ok()),
                stats: vec![mc::KeyValuePair {
                    key: "row_count".into(),
                    value: n.to_string(),
                }],
            },
            Err(s) => m::GetPartitionStatisticsResponse {
                status: Some(s),
                stats: vec![],
            },
        })
    }

    async fn create_partition(
        &self,
        req: Request<m::CreatePartitionRequest>,
    ) -> Answer<mc::Status> {
        let r = req.into_inner();
        if let Err(refused) = in_default_db(&r.db_name) {
            return answer(refused);
        }
        answer(partitions::create(&self.client(), &r.collection_name, &r.partition_name).await)
    }

    async fn drop_partition(&self, req: Request<m::DropPartitionRequest>) -> Answer<mc::Status> {
        let r = req.into_inner();
        if let Err(refused) = in_default_db(&r.db_name) {
            return answer(refused);
        }
        answer(partitions::drop(&self.client(), &r.collection_name, &r.partition_name).await)
    }

    async fn has_partition(&self, req: Request<m::HasPartitionRequest>) -> Answer<m::BoolResponse> {
        let r = req.into_inner();
        answer(
            match partitions::list(&self.client(), &r.collection_name).await {
                Ok(names) => m::BoolResponse {
                    status: Some(status::ok()),
                    value: names.contains(&r.partition_name),
                },
                Err(s) => m::BoolResponse {
                    status: Some(s),
                    value: false,
                },
            },
        )
    }

    async fn show_partitions(
        &self,
        req: Request<m::ShowPartitionsRequest>,
    ) -> Answer<m::ShowPartitionsResponse> {
        answer(partitions::show(&self.client(), &req.into_inner().collection_name).await)
    }

    async fn load_partitions(&self, req: Request<m::LoadPartitionsRequest>) -> Answer<mc::Status> {
        answer(partitions::load(&self.client(), req.into_inner()).await)
    }

    async fn release_partitions(
        &self,
        req: Request<m::ReleasePartitionsRequest>,
    ) -> Answer<mc::Status> {
        answer(partitions::release(&self.client(), req.into_inner()).await)
    }

    async fn show_collections(
        &self,
        req: Request<m::ShowCollectionsRequest>,
    ) -> Answer<m::ShowCollectionsResponse> {
        let r = req.into_inner();
        if let Err(refused) = in_default_db(&r.db_name) {
            return answer(refused);
        }
        answer(match self.client().collections().list().await {
            Ok(list) => {
                let live: Vec<_> = list
                    .into_iter()
                    .filter(|c| c.state == CollectionState::Created as i32)
                    .collect();
                m::ShowCollectionsResponse {
                    status: Some(status::ok()),
                    collection_names: live.iter().map(|c| c.name.clone()).collect(),
                    collection_ids: live
                        .iter()
                        .map(|c| i64::try_from(c.collection_id).unwrap_or(i64::MAX))
                        .collect(),
                    created_timestamps: vec![0; live.len()],
                    created_utc_timestamps: vec![0; live.len()],
                    query_service_available: live.iter().map(|c| !c.released).collect(),
                    shards_num: live
                        .iter()
                        .map(|c| i32::try_from(c.vchannels.len()).unwrap_or(i32::MAX))
                        .collect(),
                    ..Default::default()
                }
            }
            Err(e) => m::ShowCollectionsResponse {
                status: Some(status::from_client(&e)),
                ..Default::default()
            },
        })
    }
}

/// A connection identifier for `Connect` (pymilvus sends it back; Walden keeps no session).
fn rand_id() -> u32 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    t ^ std::process::id().rotate_left(16)
}
