//! The glue between the cluster's roles, over gRPC: a node's clock (batches from the leader
//! coordinator), the coordinator's appender for DDL (through the routed client), and the
//! catalog service that only the leader runs.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use walden_common::TimeTick;
use walden_coordinator::{AppendError, Appender, Coordinator, service::CollectionService};
use walden_message::MutableMessage;
use walden_metastore_api::MetaStore;
use walden_proto::v1::{
    AllocateTicksRequest, CollectionInfo, CollectionName, CreateCollectionRequest, DdlResponse,
    ListCollectionsRequest, ListCollectionsResponse, PartitionRequest,
    cluster_client::ClusterClient, collections_server::Collections,
};
use walden_tso::{TickServer, TsoError};

type ClockClient = ClusterClient<walden_connect::Authed>;

/// A node's [`TickServer`]: the leader coordinator, found through etcd and asked again after a
/// leader change.
#[derive(Debug)]
pub struct LeaderClock {
    meta: Arc<dyn MetaStore>,
    peers: walden_connect::ConnectOptions,
    leader: Mutex<Option<(String, ClockClient)>>,
}

impl LeaderClock {
    pub fn new(meta: Arc<dyn MetaStore>, peers: walden_connect::ConnectOptions) -> Self {
        Self {
            meta,
            peers,
            leader: Mutex::new(None),
        }
    }

    async fn client(&self) -> Result<ClockClient, TsoError> {
        if let Some((_, c)) = self
            .leader
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            return Ok(c.clone());
        }
        let leader = walden_balancer::election::current_leader(&*self.meta)
            .await?
            .ok_or_else(|| TsoError::Unavailable("no coordinator leader elected".into()))?;
        let channel = walden_connect::lazy(
            &leader.address,
            &self.peers,
            Some(std::time::Duration::from_secs(5)),
        )
        .map_err(|e| TsoError::Unavailable(format!("the leader's address: {e}")))?;
        let c = ClusterClient::new(channel);
        *self.leader.lock().unwrap_or_else(|e| e.into_inner()) = Some((leader.address, c.clone()));
        Ok(c)
    }
}

#[async_trait]
impl TickServer for LeaderClock {
    async fn allocate(&self, count: u32, above: TimeTick) -> Result<TimeTick, TsoError> {
        let mut last = None;
        for attempt in 0..4 {
            if attempt > 0 {
                tokio::time::sleep(std::time::Duration::from_millis(50 << attempt)).await;
            }
            let mut c = match self.client().await {
                Ok(c) => c,
                Err(e) => {
                    last = Some(e);
                    continue;
                }
            };
            match c
                .allocate_ticks(AllocateTicksRequest {
                    count,
                    above: above.0,
                })
                .await
            {
                Ok(r) => return Ok(TimeTick(r.into_inner().first)),
                Err(s) => {
                    // A new leader, or none reachable: look it up again.
                    *self.leader.lock().unwrap_or_else(|e| e.into_inner()) = None;
                    last = Some(TsoError::Unavailable(format!(
                        "the leader's clock: {}",
                        s.message()
                    )));
                }
            }
        }
        Err(last.unwrap_or_else(|| TsoError::Unavailable("the leader's clock".into())))
    }
}

/// The coordinator's appender: the routed client, on the coordinator's own topology.
#[derive(Debug)]
pub struct RoutedAppender {
    pub client: walden_client::Client,
    pub topology: Arc<walden_balancer::Topology>,
}

#[async_trait]
impl Appender for RoutedAppender {
    fn pchannels(&self) -> Vec<String> {
        // The coordinator's own records, not what some node reports.
        self.topology
            .records()
            .into_iter()
            .map(|r| r.value.pchannel)
            .collect()
    }

    async fn append(&self, pchannel: &str, msg: MutableMessage) -> Result<u64, AppendError> {
        let producer = self
            .client
            .producer(pchannel, walden_client::ProducerOptions::default());
        producer
            .append(msg)
            .await
            .map(|r| r.tick.0)
            .map_err(|e| AppendError {
                code: walden_common::HasErrorCode::code(&e),
                message: e.to_string(),
            })
    }
}

/// The `Collections` service of a `walden coord`: the catalog runs on the leader only; a
/// standby answers NOT_LEADER, naming the leader.
#[derive(Debug, Clone)]
pub struct LeaderCatalog {
    pub catalog: watch::Receiver<Option<Arc<Coordinator>>>,
    pub meta: Arc<dyn MetaStore>,
}

impl LeaderCatalog {
    async fn inner(&self) -> Result<CollectionService, Status> {
        if let Some(c) = self.catalog.borrow().clone() {
            return Ok(CollectionService::new(c));
        }
        let leader = walden_balancer::election::current_leader(&*self.meta)
            .await
            .ok()
            .flatten()
            .map(|l| l.address);
        let e = walden_balancer::BalanceError::NotLeader { leader };
        Err(walden_balancer::service::to_status(&e))
    }
}

#[tonic::async_trait]
impl Collections for LeaderCatalog {
    async fn create_collection(
        &self,
        req: Request<CreateCollectionRequest>,
    ) -> Result<Response<CollectionInfo>, Status> {
        self.inner().await?.create_collection(req).await
    }

    async fn describe_collection(
        &self,
        req: Request<CollectionName>,
    ) -> Result<Response<CollectionInfo>, Status> {
        self.inner().await?.describe_collection(req).await
    }

    async fn list_collections(
        &self,
        req: Request<ListCollectionsRequest>,
    ) -> Result<Response<ListCollectionsResponse>, Status> {
        self.inner().await?.list_collections(req).await
    }

    async fn drop_collection(
        &self,
        req: Request<CollectionName>,
    ) -> Result<Response<DdlResponse>, Status> {
        self.inner().await?.drop_collection(req).await
    }

    async fn create_partition(
        &self,
        req: Request<PartitionRequest>,
    ) -> Result<Response<DdlResponse>, Status> {
        self.inner().await?.create_partition(req).await
    }

    async fn drop_partition(
        &self,
        req: Request<PartitionRequest>,
    ) -> Result<Response<DdlResponse>, Status> {
        self.inner().await?.drop_partition(req).await
    }

    async fn flush(&self, req: Request<CollectionName>) -> Result<Response<DdlResponse>, Status> {
        self.inner().await?.flush(req).await
    }

    async fn create_index(
        &self,
        req: Request<walden_proto::v1::IndexRequest>,
    ) -> Result<Response<CollectionInfo>, Status> {
        self.inner().await?.create_index(req).await
    }

    async fn drop_index(
        &self,
        req: Request<walden_proto::v1::DropIndexRequest>,
    ) -> Result<Response<CollectionInfo>, Status> {
        self.inner().await?.drop_index(req).await
    }

    async fn load_collection(
        &self,
        req: Request<walden_proto::v1::LoadRequest>,
    ) -> Result<Response<CollectionInfo>, Status> {
        self.inner().await?.load_collection(req).await
    }

    async fn release_collection(
        &self,
        req: Request<CollectionName>,
    ) -> Result<Response<CollectionInfo>, Status> {
        self.inner().await?.release_collection(req).await
    }

    async fn rename_collection(
        &self,
        req: Request<walden_proto::v1::RenameCollectionRequest>,
    ) -> Result<Response<CollectionInfo>, Status> {
        self.inner().await?.rename_collection(req).await
    }

    async fn alter_properties(
        &self,
        req: Request<walden_proto::v1::AlterPropertiesRequest>,
    ) -> Result<Response<CollectionInfo>, Status> {
        self.inner().await?.alter_properties(req).await
    }

    async fn create_alias(
        &self,
        req: Request<walden_proto::v1::AliasRequest>,
    ) -> Result<Response<walden_proto::v1::Alias>, Status> {
        self.inner().await?.create_alias(req).await
    }

    async fn alter_alias(
        &self,
        req: Request<walden_proto::v1::AliasRequest>,
    ) -> Result<Response<walden_proto::v1::Alias>, Status> {
        self.inner().await?.alter_alias(req).await
    }

    async fn drop_alias(
        &self,
        req: Request<walden_proto::v1::AliasRequest>,
    ) -> Result<Response<walden_proto::v1::Alias>, Status> {
        self.inner().await?.drop_alias(req).await
    }

    async fn list_aliases(
        &self,
        req: Request<walden_proto::v1::ListAliasesRequest>,
    ) -> Result<Response<walden_proto::v1::ListAliasesResponse>, Status> {
        self.inner().await?.list_aliases(req).await
    }
}

/// Runs the catalog while this coordinator leads: started (finishing any DDL task the last
/// leader left) on each leadership, dropped when it ends. Its writes carry the leadership's
/// fence, so a deposed leader's catalog cannot change a record.
pub async fn run_catalog(
    coord: Arc<walden_balancer::ClusterCoord>,
    meta: Arc<dyn MetaStore>,
    appender: Arc<RoutedAppender>,
    catalog: watch::Sender<Option<Arc<Coordinator>>>,
) {
    let mut leading = coord.leading();
    // The leader also places flushed segments on query nodes (one task per leadership).
    let mut placement: Option<tokio::task::JoinHandle<()>> = None;
    loop {
        if let Some(t) = placement.take() {
            t.abort();
        }
        let epoch = *leading.borrow_and_update();
        match (epoch, coord.fence()) {
            (Some(epoch), Some(fence)) => {
                let fenced: Arc<dyn MetaStore> =
                    Arc::new(walden_metastore_api::Fenced::new(meta.clone(), fence));
                let start =
                    Coordinator::start(fenced.clone(), appender.clone() as Arc<dyn Appender>);
                tokio::select! {
                    r = start => match r {
                        Ok(c) => {
                            tracing::info!(epoch, "catalog serving");
                            catalog.send_replace(Some(c));
                            placement = Some(tokio::spawn(walden_coordinator::placement::run(
                                fenced.clone(),
                                std::time::Duration::from_secs(2),
                            )));
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "starting the catalog failed; retrying");
                            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                            continue;
                        }
                    },
                    _ = leading.changed() => continue,
                }
            }
            _ => {
                catalog.send_replace(None);
            }
        }
        if leading.changed().await.is_err() {
            return;
        }
    }
}

/// How a node's read replicas read a pchannel another node serves: a client of the leader
/// coordinator (found through etcd, connected again after a failure), whose consumer follows
/// the owner as it moves.
#[derive(Clone, Debug)]
pub struct ClientReader(Arc<ReaderState>);

#[derive(Debug)]
pub struct ReaderState {
    meta: Arc<dyn MetaStore>,
    peers: walden_connect::ConnectOptions,
    client: tokio::sync::Mutex<Option<walden_client::Client>>,
}

impl ClientReader {
    pub fn new(meta: Arc<dyn MetaStore>, peers: walden_connect::ConnectOptions) -> Self {
        Self(Arc::new(ReaderState {
            meta,
            peers,
            client: tokio::sync::Mutex::new(None),
        }))
    }
}

impl ReaderState {
    async fn client(&self) -> Result<walden_client::Client, String> {
        let mut c = self.client.lock().await;
        if let Some(c) = c.as_ref() {
            return Ok(c.clone());
        }
        let leader = walden_balancer::election::current_leader(&*self.meta)
            .await
            .map_err(|e| e.to_string())?
            .ok_or("no coordinator leader elected")?;
        let client = walden_client::Client::connect_with(&leader.address, &self.peers)
            .await
            .map_err(|e| e.to_string())?;
        *c = Some(client.clone());
        Ok(client)
    }

    async fn forget(&self) {
        *self.client.lock().await = None;
    }
}

impl walden_delegator::PChannelReader for ClientReader {
    fn read(
        &self,
        pchannel: &str,
        from: Option<walden_common::MessageId>,
    ) -> tokio::sync::mpsc::Receiver<Result<walden_message::Delivery, String>> {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let (this, pchannel) = (self.0.clone(), pchannel.to_owned());
        tokio::spawn(async move {
            let client = match this.client().await {
                Ok(c) => c,
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            };
            let mut consumer = client.consumer(
                &pchannel,
                walden_client::ConsumerOptions {
                    from: from.map_or(walden_client::DeliverFrom::All, |id| {
                        walden_client::DeliverFrom::StartFrom(id)
                    }),
                    ..Default::default()
                },
            );
            loop {
                let item = match consumer.next_delivery().await {
                    Some(Ok(d)) => Ok(d),
                    Some(Err(e)) => {
                        this.forget().await;
                        Err(e.to_string())
                    }
                    None => return,
                };
                let end = item.is_err();
                if tx.send(item).await.is_err() || end {
                    return;
                }
            }
        });
        rx
    }

    fn last_tick<'a>(
        &'a self,
        pchannel: &'a str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<u64, String>> + Send + 'a>> {
        Box::pin(async move {
            let client = self.0.client().await?;
            let status = match client.status_of(pchannel).await {
                Ok(s) => s,
                Err(e) => {
                    self.0.forget().await;
                    return Err(e.to_string());
                }
            };
            status
                .pchannels
                .iter()
                .find(|p| p.name == pchannel)
                .map(|p| p.last_time_tick)
                .ok_or_else(|| format!("{pchannel} is not served by its owner"))
        })
    }
}
