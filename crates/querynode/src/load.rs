//! Reading flushed data: a vchannel's manifest, its segments' Parquet files (with the graph
//! index built) and its delete logs. Query nodes and the standalone delegator both load this
//! way.

use prost::Message as _;
use walden_metastore_api::{MetaStore, keys};
use walden_object_store::Blobs;
use walden_proto::v1::CollectionInfo;
use walden_proto::v1::{FlushedSegment, IndexSpec, IndexType, MetricType, VChannelManifest};
use walden_query::{Metric, Segment};
use walden_schema::{HnswParams, Index, Schema};
use walden_segment_format::{self as files, Deletes};

use crate::QueryNodeError;

/// The graph a flushed segment is built with: field, metric, parameters.
pub type HnswSpec = (String, Metric, HnswParams);

/// A vchannel's manifest and its revision, if one was committed.
pub async fn read_manifest(
    meta: &dyn MetaStore,
    collection_id: u64,
    vchannel: &str,
) -> Result<Option<(VChannelManifest, i64)>, QueryNodeError> {
    let Some(kv) = meta.get(&keys::manifest(collection_id, vchannel)).await? else {
        return Ok(None);
    };
    let m = VChannelManifest::decode(kv.value.as_ref())
        .map_err(|e| QueryNodeError::Format(format!("manifest of {vchannel}: {e}")))?;
    Ok(Some((m, kv.mod_revision)))
}

/// The catalog record of collection `collection_id`: under `name` (the name it was last
/// known by) when it is still there, else found among every record (it was renamed). None:
/// no record has that id (dropped).
pub async fn catalog_record(
    meta: &dyn MetaStore,
    name: &str,
    collection_id: u64,
) -> Result<Option<CollectionInfo>, QueryNodeError> {
    let decode = |kv: &walden_metastore_api::KeyValue| {
        CollectionInfo::decode(kv.value.as_ref())
            .map_err(|e| QueryNodeError::Format(format!("catalog record {}: {e}", kv.key)))
    };
    if let Some(kv) = meta.get(&keys::collection(name)).await? {
        let info = decode(&kv)?;
        if info.collection_id == collection_id {
            return Ok(Some(info));
        }
    }
    for kv in meta.range(keys::COLLECTION_PREFIX).await? {
        let info = decode(&kv)?;
        if info.collection_id == collection_id {
            return Ok(Some(info));
        }
    }
    Ok(None)
}

/// The metric a search of `field` uses when it names none: its index's, else L2.
pub fn default_metric(indexes: &[IndexSpec], field: &str) -> Metric {
    match indexes
        .iter()
        .find(|i| i.field == field)
        .map(IndexSpec::metric)
    {
        Some(MetricType::Ip) => Metric::Ip,
        Some(MetricType::Cosine) => Metric::Cosine,
        _ => Metric::L2,
    }
}

/// The HNSW spec of a collection, if a field has one (one indexed field per segment).
pub fn hnsw(schema: &Schema, indexes: &[IndexSpec]) -> Option<HnswSpec> {
    indexes.iter().find_map(|spec| {
        if spec.index_type() != IndexType::Hnsw {
            return None;
        }
        match walden_schema::check_index(schema, spec).ok()?.1 {
            Index::Hnsw(p) => Some((spec.field.clone(), default_metric(indexes, &spec.field), p)),
            Index::Flat => None,
        }
    })
}

/// Reads `segments` from object storage and builds their graphs, off the async workers
/// (decoding Parquet and building a graph take a while).
pub async fn segments(
    blobs: &dyn Blobs,
    segments: Vec<FlushedSegment>,
    pk: &str,
    hnsw: Option<HnswSpec>,
) -> Result<Vec<Segment>, QueryNodeError> {
    let mut read: Vec<(FlushedSegment, Vec<bytes::Bytes>)> = Vec::new();
    for s in segments {
        let mut data = Vec::new();
        for f in &s.files {
            data.push(blobs.get(&f.key).await?);
        }
        read.push((s, data));
    }
    let pk = pk.to_owned();
    tokio::task::spawn_blocking(move || {
        let threads = std::thread::available_parallelism().map_or(1, usize::from);
        let none = Deletes::new();
        let mut out = Vec::new();
        for (s, data) in read {
            let mut seg = Segment::new(s.segment_id, &s.partition, &pk);
            for bytes in data {
                for batch in files::decode(bytes)? {
                    seg.append(batch, &none)?;
                }
            }
            if let Some((field, metric, params)) = &hnsw {
                seg.build_index(field, *metric, params, threads)?;
            }
            out.push(seg);
        }
        Ok(out)
    })
    .await
    .map_err(|e| QueryNodeError::Format(format!("loading segments: {e}")))?
}

/// Reads the delete logs `keys`, each into a map of its own.
pub async fn delete_logs(
    blobs: &dyn Blobs,
    keys: Vec<String>,
) -> Result<Vec<(String, Deletes)>, QueryNodeError> {
    let mut out = Vec::new();
    for key in keys {
        let bytes = blobs.get(&key).await?;
        let mut d = Deletes::new();
        files::read_deletes(bytes, &mut d)?;
        out.push((key, d));
    }
    Ok(out)
}
