//! Partitions: Walden's own (the default one is `_default` on both sides). Walden loads and
//! releases whole collections: loading partitions loads the collection, and releasing some but
//! not all of them is refused, naming why.

use walden_client::Client;
use walden_milvus_proto::{common as mc, milvus as m};

use crate::{data, status};

pub async fn create(client: &Client, collection: &str, partition: &str) -> mc::Status {
    match client
        .collections()
        .create_partition(collection, partition)
        .await
    {
        Ok(_) => status::ok(),
        Err(e) => status::from_client(&e),
    }
}

pub async fn drop(client: &Client, collection: &str, partition: &str) -> mc::Status {
    match client
        .collections()
        .drop_partition(collection, partition)
        .await
    {
        Ok(_) => status::ok(),
        Err(e) => status::from_client(&e),
    }
}

/// The collection's partitions, or the status to answer with.
pub async fn list(client: &Client, collection: &str) -> Result<Vec<String>, mc::Status> {
    let (info, _) = data::describe(client, collection).await?;
    Ok(info.partitions)
}

pub async fn show(client: &Client, collection: &str) -> m::ShowPartitionsResponse {
    match list(client, collection).await {
        Ok(names) => m::ShowPartitionsResponse {
            status: Some(status::ok()),
            partition_i_ds: (1..).take(names.len()).collect(),
            created_timestamps: vec![0; names.len()],
            created_utc_timestamps: vec![0; names.len()],
            partition_names: names,
            ..Default::default()
        },
        Err(s) => m::ShowPartitionsResponse {
            status: Some(s),
            ..Default::default()
        },
    }
}

pub async fn load(client: &Client, r: m::LoadPartitionsRequest) -> mc::Status {
    match list(client, &r.collection_name).await {
        Ok(names) => {
            if let Some(missing) = r.partition_names.iter().find(|p| !names.contains(p)) {
                return status::fail(
                    status::Code::PartitionNotFound,
                    format!("partition not found[partition={missing}]"),
                );
            }
        }
        Err(s) => return s,
    }
    data::load(
        client,
        m::LoadCollectionRequest {
            collection_name: r.collection_name,
            replica_number: r.replica_number,
            ..Default::default()
        },
    )
    .await
}

pub async fn release(client: &Client, r: m::ReleasePartitionsRequest) -> mc::Status {
    let names = match list(client, &r.collection_name).await {
        Ok(n) => n,
        Err(s) => return s,
    };
    if names.iter().any(|p| !r.partition_names.contains(p)) {
        return status::invalid(
            "Walden loads and releases whole collections: release every partition, or the collection",
        );
    }
    data::release(
        client,
        m::ReleaseCollectionRequest {
            collection_name: r.collection_name,
            ..Default::default()
        },
    )
    .await
}
