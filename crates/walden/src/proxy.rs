//! `walden proxy`: Milvus's API (`walden-milvus`) in front of a cluster, as a process of its
//! own (docs/design.md §15). It holds no state: it finds the leading coordinator in etcd and
//! calls the cluster through Walden's client (routing, waiting while a pchannel moves,
//! retries), so any number of proxies can run, and killing one loses nothing that was
//! acknowledged; pymilvus pointed at another carries on. When the leadership moves to another
//! coordinator, the proxy connects its client there.

use std::time::Duration;

use anyhow::Context;
use tracing::{info, warn};
use walden_client::{Client, ConnectOptions};
use walden_metastore_api::MetaStore;
use walden_milvus::{ClientSlot, Milvus};

use crate::{
    backends,
    config::Config,
    server::{self, GrpcServer},
};

/// How long the proxy waits at start for a coordinator to lead.
const LEADER_WAIT: Duration = Duration::from_secs(60);

pub async fn run(config: Config, ready_file: Option<std::path::PathBuf>) -> anyhow::Result<()> {
    let Some(listener) = server::bind_milvus(&config.milvus).await? else {
        anyhow::bail!("a proxy serves Milvus's API: give it an address (--listen)");
    };
    let addr = listener.local_addr()?;
    let security = server::Security::load(&config.server, addr)?;
    let meta = backends::etcd(&config).await?;
    let options = security.peers(&config.cluster)?;
    let (leader, client) = connect_to_leader(&*meta, &options, None).await?;
    let milvus = Milvus::new(client);
    let follow = tokio::spawn(follow_leader(meta, options, milvus.slot(), leader));
    let routes = tonic::service::Routes::new(milvus.into_service());
    let mut grpc = GrpcServer::start_milvus(
        listener,
        config.server.max_connections,
        &config.server,
        &security,
        routes,
    )?;
    info!(%addr, "walden proxy ready: Milvus's API");
    if let Some(path) = &ready_file {
        server::write_ready_file(
            path,
            addr,
            None,
            serde_json::json!({ "milvus": addr.to_string() }),
        )?;
    }
    tokio::select! {
        r = &mut grpc.task => {
            r.context("the gRPC server task")?.context("serving gRPC")?;
        }
        () = server::shutdown_signal() => {
            info!("shutting down: draining connections");
            grpc.stop().await;
        }
    }
    follow.abort();
    Ok(())
}

/// Waits (at most [`LEADER_WAIT`]) for a coordinator other than `not` to lead, and connects a
/// client to it.
async fn connect_to_leader(
    meta: &dyn MetaStore,
    options: &ConnectOptions,
    not: Option<&str>,
) -> anyhow::Result<(String, Client)> {
    let deadline = tokio::time::Instant::now() + LEADER_WAIT;
    let mut last = String::from("no coordinator leads");
    loop {
        match walden_balancer::election::current_leader(meta).await {
            Ok(Some(l)) if Some(l.address.as_str()) != not => {
                match Client::connect_with(&l.address, options).await {
                    Ok(c) => {
                        info!(
                            coordinator = l.address,
                            "calling the cluster through its leader"
                        );
                        return Ok((l.address, c));
                    }
                    Err(e) => last = format!("connecting to the leader {}: {e}", l.address),
                }
            }
            Ok(_) => {}
            Err(e) => last = format!("reading the leader from etcd: {e}"),
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("{last} (waited {} s)", LEADER_WAIT.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Connects the service's client to each new leader the election names.
async fn follow_leader(
    meta: std::sync::Arc<dyn MetaStore>,
    options: ConnectOptions,
    slot: ClientSlot,
    mut leader: String,
) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = match walden_balancer::election::current_leader(&*meta).await {
            Ok(Some(l)) => l.address,
            Ok(None) => continue,
            Err(e) => {
                warn!(error = %e, "reading the coordinator leader from etcd failed");
                continue;
            }
        };
        if now == leader {
            continue;
        }
        match connect_to_leader(&*meta, &options, Some(&leader)).await {
            Ok((address, client)) => {
                slot.replace(client);
                leader = address;
            }
            Err(e) => warn!(error = %e, "following the new coordinator leader failed"),
        }
    }
}
