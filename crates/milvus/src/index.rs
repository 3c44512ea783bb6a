//! Indexes: CreateIndex, DescribeIndex, DropIndex, GetIndexState, GetIndexBuildProgress.
//!
//! Walden holds one index spec per vector field (HNSW graphs or exact). What the user asked
//! for, the index's name and its parameters as given, is kept in the collection's properties
//! under `milvus.index.{field}` (JSON), so DescribeIndex answers with the user's name and
//! parameters and says which type serves them. Progress is the delegators': rows of flushed
//! segments in a graph against all flushed rows.
//!
//! A scalar field's index (INVERTED, STL_SORT, TRIE, BITMAP, AUTOINDEX: what Milvus's docs
//! have users add beside the vector index) is accepted and described as asked, and changes
//! nothing: Walden's filters scan their columns, so every answer is the same with or without
//! it. Only its Milvus view is kept (with `"scalar": true`).

use serde_json::{Map, Value, json};
use walden_client::Client;
use walden_common::{ErrorCode, HasErrorCode};
use walden_milvus_proto::{
    common::{self as mc, KeyValuePair},
    milvus as m,
    schema::DataType as MType,
};
use walden_proto::v1::{CollectionInfo, IndexSpec, IndexType, MetricType};

use crate::{
    data::{describe, param},
    status::{self, Code},
};

/// Where the Milvus view of the index of `field` is kept.
fn property(field: &str) -> String {
    format!("milvus.index.{field}")
}

/// Milvus's index types served by Walden: AUTOINDEX and HNSW (and the IVF, DiskANN and ScaNN
/// families, served by HNSW) build graphs; FLAT (and BRUTE_FORCE, milvus-lite's name for it)
/// is exact.
fn index_type(name: &str) -> Option<IndexType> {
    match name.to_ascii_uppercase().as_str() {
        "FLAT" | "BRUTE_FORCE" => Some(IndexType::Flat),
        "" | "AUTOINDEX" | "HNSW" | "IVF_FLAT" | "IVF_SQ8" | "IVF_PQ" | "DISKANN" | "SCANN" => {
            Some(IndexType::Hnsw)
        }
        _ => None,
    }
}

fn metric_type(name: &str) -> Option<MetricType> {
    match name.to_ascii_uppercase().as_str() {
        "" => Some(MetricType::Unspecified),
        "L2" => Some(MetricType::L2),
        "IP" => Some(MetricType::Ip),
        "COSINE" => Some(MetricType::Cosine),
        _ => None,
    }
}

/// The Milvus view of a field's index: its name and the parameters as given.
struct Asked {
    name: String,
    index_type: String,
    params: Map<String, Value>,
    scalar: bool,
}

fn asked(info: &CollectionInfo, field: &str) -> Asked {
    let kept = info
        .schema
        .as_ref()
        .and_then(|s| s.properties.get(&property(field)))
        .and_then(|v| serde_json::from_slice::<Value>(v).ok())
        .unwrap_or(Value::Null);
    Asked {
        name: kept["name"].as_str().unwrap_or(field).to_owned(),
        index_type: kept["index_type"].as_str().unwrap_or_default().to_owned(),
        params: kept["params"].as_object().cloned().unwrap_or_default(),
        scalar: kept["scalar"].as_bool().unwrap_or(false),
    }
}

/// An index as Milvus lists it: a vector field's (a Walden spec) or a scalar field's.
struct Listed<'a> {
    field: String,
    spec: Option<&'a IndexSpec>,
}

/// Scalar index types Milvus offers; accepted on scalar fields, served by scans.
const SCALAR_TYPES: [&str; 6] = ["", "AUTOINDEX", "INVERTED", "STL_SORT", "TRIE", "BITMAP"];

/// The indexes of the collection a request names, by index name or field (all when both are
/// empty): vector fields' specs, then scalar fields' views.
fn matching<'a>(info: &'a CollectionInfo, field: &str, name: &str) -> Vec<Listed<'a>> {
    let vector = info.indexes.iter().map(|i| Listed {
        field: i.field.clone(),
        spec: Some(i),
    });
    let mut scalar: Vec<Listed<'a>> = info
        .schema
        .iter()
        .flat_map(|s| s.properties.keys())
        .filter_map(|k| k.strip_prefix("milvus.index."))
        .filter(|f| asked(info, f).scalar)
        .map(|f| Listed {
            field: f.to_owned(),
            spec: None,
        })
        .collect();
    scalar.sort_by(|a, b| a.field.cmp(&b.field));
    vector
        .chain(scalar)
        .filter(|l| {
            (field.is_empty() || l.field == field)
                && (name.is_empty() || asked(info, &l.field).name == name)
        })
        .collect()
}

/// Keeps the Milvus view of the index on `field`.
async fn keep(
    client: &Client,
    r: &m::CreateIndexRequest,
    asked_type: &str,
    given: &Map<String, Value>,
    scalar: bool,
) -> mc::Status {
    let name = if r.index_name.is_empty() {
        r.field_name.clone()
    } else {
        r.index_name.clone()
    };
    let mut kept = json!({"name": name, "index_type": asked_type, "params": given});
    if scalar {
        kept["scalar"] = true.into();
    }
    let set = [(
        property(&r.field_name),
        bytes::Bytes::from(kept.to_string().into_bytes()),
    )]
    .into();
    match client
        .collections()
        .alter_properties(&r.collection_name, set, vec![])
        .await
    {
        Ok(_) => status::ok(),
        Err(e) => status::from_client(&e),
    }
}

pub async fn create(client: &Client, r: m::CreateIndexRequest) -> mc::Status {
    let p = &r.extra_params;
    let asked_type = param(p, "index_type").unwrap_or_default();
    let given: Map<String, Value> = param(p, "params")
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or_default();
    let (_, milvus) = match describe(client, &r.collection_name).await {
        Ok(x) => x,
        Err(s) => return s,
    };
    let Some(field) = milvus.fields.iter().find(|f| f.name == r.field_name) else {
        return status::invalid(format!(
            "cannot create index on non-existed field: {}",
            r.field_name
        ));
    };
    if field.data_type != MType::FloatVector as i32 {
        if !SCALAR_TYPES.contains(&asked_type.to_ascii_uppercase().as_str()) {
            return status::fail(
                Code::IndexNotSupported,
                format!(
                    "index type {asked_type} does not apply to scalar field {} (INVERTED, \
                     STL_SORT, TRIE, BITMAP and AUTOINDEX do)",
                    r.field_name
                ),
            );
        }
        return keep(client, &r, asked_type, &given, true).await;
    }
    let Some(t) = index_type(asked_type) else {
        return status::fail(
            Code::IndexNotSupported,
            format!(
                "index type {asked_type} is not served by Walden (AUTOINDEX, HNSW, FLAT, IVF_*, DISKANN, SCANN are)"
            ),
        );
    };
    let metric_name = param(p, "metric_type").unwrap_or_default();
    let Some(metric) = metric_type(metric_name) else {
        return status::invalid(format!(
            "metric type {metric_name} is not served by Walden (L2, IP, COSINE are)"
        ));
    };
    let mut params = Map::new();
    if t == IndexType::Hnsw {
        let get = |k: &str| {
            given
                .get(k)
                .and_then(|v| {
                    v.as_u64()
                        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
                })
                .or_else(|| param(p, k).and_then(|s| s.parse().ok()))
        };
        if let Some(m) = get("M") {
            params.insert("m".into(), m.into());
        }
        if let Some(e) = get("efConstruction") {
            params.insert("ef_construction".into(), e.into());
        }
    }
    let spec = IndexSpec {
        field: r.field_name.clone(),
        index_type: t as i32,
        metric: metric as i32,
        params: Value::Object(params).to_string(),
    };
    if let Err(e) = client
        .collections()
        .create_index(&r.collection_name, spec)
        .await
    {
        return status::from_client(&e);
    }
    keep(client, &r, asked_type, &given, false).await
}

pub async fn drop(client: &Client, r: m::DropIndexRequest) -> mc::Status {
    let (info, _) = match describe(client, &r.collection_name).await {
        Ok(x) => x,
        Err(s) => return s,
    };
    let found = matching(&info, &r.field_name, &r.index_name);
    let Some(listed) = found.first() else {
        // Milvus answers success for an index that is not there.
        return status::ok();
    };
    let api = client.collections();
    if listed.spec.is_some()
        && let Err(e) = api.drop_index(&r.collection_name, &listed.field).await
    {
        return status::from_client(&e);
    }
    let gone = vec![property(&listed.field)];
    match api
        .alter_properties(&r.collection_name, Default::default(), gone)
        .await
    {
        Ok(_) => status::ok(),
        Err(e) => status::from_client(&e),
    }
}

/// Rows of flushed segments in a graph (or searched exactly, for FLAT) and all flushed rows,
/// over the collection's shards. A released collection's delegators hold nothing: (0, 0).
async fn progress(
    client: &Client,
    collection: &str,
    spec: &IndexSpec,
) -> Result<(u64, u64), mc::Status> {
    sharded(client, collection, |shards| {
        let total: u64 = shards.iter().map(|s| s.sealed_rows).sum();
        let indexed = if spec.index_type() == IndexType::Flat {
            total
        } else {
            shards
                .iter()
                .filter(|s| s.indexes.iter().any(|i| i == spec))
                .map(|s| s.indexed_rows)
                .sum()
        };
        (indexed, total)
    })
    .await
}

/// All flushed rows of the collection's shards, twice (a scan covers every one of them).
async fn flushed(client: &Client, collection: &str) -> Result<(u64, u64), mc::Status> {
    sharded(client, collection, |shards| {
        let total: u64 = shards.iter().map(|s| s.sealed_rows).sum();
        (total, total)
    })
    .await
}

/// `f` of the delegators' shard states; (0, 0) for a released collection.
async fn sharded(
    client: &Client,
    collection: &str,
    f: impl FnOnce(&[walden_proto::v1::ShardState]) -> (u64, u64),
) -> Result<(u64, u64), mc::Status> {
    match client.shards(collection).await {
        Ok(shards) => Ok(f(&shards)),
        Err(e) if e.code() == ErrorCode::NotLoaded => Ok((0, 0)),
        Err(e) => Err(status::from_client(&e)),
    }
}

fn not_found(collection: &str) -> mc::Status {
    status::fail(
        Code::IndexNotFound,
        format!("index not found[collection={collection}]"),
    )
}

pub async fn describe_index(
    client: &Client,
    r: m::DescribeIndexRequest,
) -> m::DescribeIndexResponse {
    let refuse = |s| m::DescribeIndexResponse {
        status: Some(s),
        ..Default::default()
    };
    let (info, _) = match describe(client, &r.collection_name).await {
        Ok(x) => x,
        Err(s) => return refuse(s),
    };
    let found = matching(&info, &r.field_name, &r.index_name);
    if found.is_empty() {
        return refuse(not_found(&r.collection_name));
    }
    let mut index_descriptions = Vec::new();
    for (n, listed) in found.into_iter().enumerate() {
        let a = asked(&info, &listed.field);
        let Some(i) = listed.spec else {
            // A scalar index: as asked; its field is scanned, so it is always complete.
            let (_, total) = match flushed(client, &r.collection_name).await {
                Ok(p) => p,
                Err(s) => return refuse(s),
            };
            let shown = if a.index_type.is_empty() {
                "AUTOINDEX".to_owned()
            } else {
                a.index_type.clone()
            };
            index_descriptions.push(m::IndexDescription {
                index_name: a.name,
                index_id: i64::try_from(n).unwrap_or(0) + 1,
                params: vec![
                    KeyValuePair {
                        key: "index_type".into(),
                        value: shown,
                    },
                    KeyValuePair {
                        key: "params".into(),
                        value: Value::Object(a.params).to_string(),
                    },
                ],
                field_name: listed.field.clone(),
                indexed_rows: i64::try_from(total).unwrap_or(i64::MAX),
                total_rows: i64::try_from(total).unwrap_or(i64::MAX),
                state: mc::IndexState::Finished as i32,
                ..Default::default()
            });
            continue;
        };
        let (indexed, total) = match progress(client, &r.collection_name, i).await {
            Ok(p) => p,
            Err(s) => return refuse(s),
        };
        let served = match i.index_type() {
            // Exact either way: the name asked is the truth.
            IndexType::Flat if a.index_type.eq_ignore_ascii_case("BRUTE_FORCE") => "BRUTE_FORCE",
            IndexType::Flat => "FLAT",
            _ => "HNSW",
        };
        let metric = match i.metric() {
            MetricType::Ip => "IP",
            MetricType::Cosine => "COSINE",
            _ => "L2",
        };
        let kv = |k: &str, v: String| KeyValuePair {
            key: k.into(),
            value: v,
        };
        let mut params = vec![
            kv("index_type", served.into()),
            kv("metric_type", metric.into()),
            kv("params", Value::Object(a.params).to_string()),
        ];
        if !a.index_type.is_empty() && !a.index_type.eq_ignore_ascii_case(served) {
            // IVF, DiskANN, ScaNN and AUTOINDEX are served by an HNSW graph: say so.
            params.push(kv("requested_index_type", a.index_type));
        }
        index_descriptions.push(m::IndexDescription {
            index_name: a.name,
            index_id: i64::try_from(n).unwrap_or(0) + 1,
            params,
            field_name: i.field.clone(),
            indexed_rows: i64::try_from(indexed).unwrap_or(i64::MAX),
            total_rows: i64::try_from(total).unwrap_or(i64::MAX),
            pending_index_rows: i64::try_from(total - indexed.min(total)).unwrap_or(0),
            state: if indexed >= total {
                mc::IndexState::Finished
            } else {
                mc::IndexState::InProgress
            } as i32,
            ..Default::default()
        });
    }
    m::DescribeIndexResponse {
        status: Some(status::ok()),
        index_descriptions,
    }
}

/// DescribeIndex of the indexes a request names.
async fn described(
    client: &Client,
    collection_name: String,
    field_name: String,
    index_name: String,
) -> m::DescribeIndexResponse {
    let r = m::DescribeIndexRequest {
        collection_name,
        field_name,
        index_name,
        ..Default::default()
    };
    describe_index(client, r).await
}

pub async fn state(client: &Client, r: m::GetIndexStateRequest) -> m::GetIndexStateResponse {
    let d = described(client, r.collection_name, r.field_name, r.index_name).await;
    let states: Vec<i32> = d.index_descriptions.iter().map(|i| i.state).collect();
    let state = if states.is_empty() {
        mc::IndexState::None as i32
    } else if states.contains(&(mc::IndexState::InProgress as i32)) {
        mc::IndexState::InProgress as i32
    } else {
        mc::IndexState::Finished as i32
    };
    m::GetIndexStateResponse {
        status: d.status,
        state,
        fail_reason: String::new(),
    }
}

pub async fn build_progress(
    client: &Client,
    r: m::GetIndexBuildProgressRequest,
) -> m::GetIndexBuildProgressResponse {
    let d = described(client, r.collection_name, r.field_name, r.index_name).await;
    m::GetIndexBuildProgressResponse {
        status: d.status,
        indexed_rows: d.index_descriptions.iter().map(|i| i.indexed_rows).sum(),
        total_rows: d.index_descriptions.iter().map(|i| i.total_rows).sum(),
    }
}
