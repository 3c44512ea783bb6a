//! The data path: Insert, Upsert, Delete, Search, Query, indexes, load and flush, each mapped onto
//! one or a few Walden client calls.

use std::time::Duration;

use prost::Message as _;
use serde_json::{Map, Value};
use walden_client::{Client, Consistency, QueryOptions, SearchOptions};
use walden_milvus_proto::{
    common::{self as mc, KeyValuePair},
    milvus as m,
    schema::{self as ms, CollectionSchema as MSchema, DataType as MType},
};
use walden_proto::v1::{CollectionInfo, DeleteIds};

use crate::{
    rows::{self, Pk},
    schema::{self, DYNAMIC_FIELD},
    status::{self, Code},
};

/// How long a LoadCollection or a Flush waits for Walden before it answers.
const WAIT: Duration = Duration::from_secs(120);

/// A collection's Walden record and its Milvus schema, or the status to answer with.
pub async fn describe(
    client: &Client,
    name: &str,
) -> Result<(CollectionInfo, MSchema), mc::Status> {
    checked(name, client.collections().describe(name).await)
}

/// As [`describe`], from a description at most 2 s old (the client's, which reads share): the
/// data path checks every request against the schema without a catalog call each time. A
/// write or read that finds the collection gone or changed is refused by its shards, and the
/// client describes it again.
pub async fn describe_recent(
    client: &Client,
    name: &str,
) -> Result<(CollectionInfo, MSchema), mc::Status> {
    let r = client
        .describe_recent(name)
        .await
        .map(|(info, _)| CollectionInfo::clone(&info));
    checked(name, r)
}

fn checked(
    name: &str,
    described: Result<CollectionInfo, walden_client::ClientError>,
) -> Result<(CollectionInfo, MSchema), mc::Status> {
    match described {
        Ok(info) if info.state == walden_proto::v1::CollectionState::Created as i32 => {
            let s = schema::to_milvus(&info.name, &info.schema.clone().unwrap_or_default());
            Ok((info, s))
        }
        Ok(_) => Err(status::no_collection(name)),
        Err(e) => {
            let s = status::from_client(&e);
            Err(if s.code == Code::CollectionNotFound as i32 {
                status::no_collection(name)
            } else {
                s
            })
        }
    }
}

fn ids_of(pks: &[Pk]) -> ms::IDs {
    let id_field = if pks.iter().all(|p| matches!(p, Pk::Int(_))) {
        ms::i_ds::IdField::IntId(ms::LongArray {
            data: pks
                .iter()
                .map(|p| match p {
                    Pk::Int(i) => *i,
                    Pk::Str(_) => 0,
                })
                .collect(),
        })
    } else {
        ms::i_ds::IdField::StrId(ms::StringArray {
            data: pks
                .iter()
                .map(|p| match p {
                    Pk::Str(s) => s.clone(),
                    Pk::Int(i) => i.to_string(),
                })
                .collect(),
        })
    };
    ms::IDs {
        id_field: Some(id_field),
    }
}

pub(crate) fn failed_mutation(s: mc::Status) -> m::MutationResult {
    m::MutationResult {
        status: Some(s),
        ..Default::default()
    }
}

/// Insert (or Upsert): the columns checked and written as one Walden write.
pub async fn write(
    client: &Client,
    api: &walden_client::Collections,
    collection: &str,
    partition: &str,
    fields: &[ms::FieldData],
    num_rows: u32,
    upsert: bool,
) -> m::MutationResult {
    let (info, milvus) = match describe_recent(client, collection).await {
        Ok(x) => x,
        Err(s) => return failed_mutation(s),
    };
    let walden = match walden_schema::Schema::new(info.schema.clone().unwrap_or_default()) {
        Ok(s) => s,
        Err(e) => return failed_mutation(status::fail(Code::Internal, e.to_string())),
    };
    let n = num_rows as usize;
    let mut with_ids;
    let mut fields = fields;
    if let Some(pk) = milvus.fields.iter().find(|f| f.is_primary_key && f.auto_id) {
        let given = fields.iter().any(|f| f.field_name == pk.name);
        if given && !upsert && !allows_given_ids(&info) {
            return failed_mutation(status::invalid(format!(
                "field {} is the autoID primary key: Walden chooses its values; leave it out \
                 of the insert (or set the collection property allow_insert_auto_id)",
                pk.name
            )));
        }
        if !given && upsert {
            return failed_mutation(status::invalid(format!(
                "an upsert names the rows it replaces: give the primary key {}",
                pk.name
            )));
        }
        if !given {
            let count = match u32::try_from(n) {
                Ok(c) if c > 0 => c,
                _ => return failed_mutation(status::invalid("an insert of 1 to 2^32 rows")),
            };
            let first = match client.allocate_ticks(count).await {
                Ok(t) => t,
                Err(e) => return failed_mutation(status::from_client(&e)),
            };
            with_ids = fields.to_vec();
            with_ids.push(auto_ids(pk, first, n));
            fields = &with_ids;
        }
    }
    let rows = match rows::to_batch(&milvus, walden.arrow(), fields, n) {
        Ok(r) => r,
        Err(e) => return failed_mutation(status::invalid(e)),
    };
    let partition = (!partition.is_empty()).then_some(partition);
    let done = if upsert {
        api.upsert(collection, partition, &[rows.batch]).await
    } else {
        api.insert(collection, partition, &[rows.batch]).await
    };
    match done {
        Ok(w) => m::MutationResult {
            status: Some(status::ok()),
            i_ds: Some(ids_of(&rows.pks)),
            succ_index: (0..num_rows).collect(),
            insert_cnt: if upsert { 0 } else { i64::from(num_rows) },
            upsert_cnt: if upsert { i64::from(num_rows) } else { 0 },
            timestamp: w.time_tick,
            ..Default::default()
        },
        Err(e) => failed_mutation(status::from_client(&e)),
    }
}

/// Whether the collection takes ids for its autoID key (Milvus's `allow_insert_auto_id`).
fn allows_given_ids(info: &CollectionInfo) -> bool {
    info.schema.as_ref().is_some_and(|s| {
        s.properties
            .get(&format!(
                "{}allow_insert_auto_id",
                crate::names::PROPERTY_PREFIX
            ))
            .is_some_and(|v| v.eq_ignore_ascii_case(b"true"))
    })
}

/// The key column of `n` rows with server-chosen ids: `n` ticks from the cluster's oracle,
/// which no other caller ever gets (so ids never repeat, across proxies and restarts).
fn auto_ids(pk: &ms::FieldSchema, first: u64, n: usize) -> ms::FieldData {
    let first = i64::try_from(first).unwrap_or(i64::MAX - n as i64);
    ms::FieldData {
        r#type: MType::Int64 as i32,
        field_name: pk.name.clone(),
        field_id: pk.field_id,
        field: Some(ms::field_data::Field::Scalars(ms::ScalarField {
            data: Some(ms::scalar_field::Data::LongData(ms::LongArray {
                data: (0..n as i64).map(|i| first + i).collect(),
            })),
        })),
        ..Default::default()
    }
}

/// Delete by a filter: the keys it matches (read strongly) are deleted.
pub async fn delete(
    client: &Client,
    api: &walden_client::Collections,
    r: m::DeleteRequest,
) -> m::MutationResult {
    let (_, milvus) = match describe_recent(client, &r.collection_name).await {
        Ok(x) => x,
        Err(s) => return failed_mutation(s),
    };
    let Some(pk) = milvus.fields.iter().find(|f| f.is_primary_key) else {
        return failed_mutation(status::fail(Code::Internal, "no primary key"));
    };
    if r.expr.trim().is_empty() {
        return failed_mutation(status::invalid("delete needs a filter expression (expr)"));
    }
    let found = client
        .query(
            &r.collection_name,
            &QueryOptions {
                order_by_key: false,
                filter: r.expr.clone(),
                output_fields: vec![pk.name.clone()],
                limit: 0,
                consistency: Consistency::Strong,
                partitions: partitions(&r.partition_name),
            },
        )
        .await;
    let rows = match found {
        // More matches than one read returns: deleting only those would report a part as the
        // whole, so nothing is deleted.
        Ok(q) if q.truncated => {
            return failed_mutation(status::invalid(format!(
                "the filter matches more than the {} rows one read returns (query.max_rows): \
                 nothing was deleted; delete with narrower filters",
                q.rows.len()
            )));
        }
        Ok(q) => q.rows,
        Err(e) => return failed_mutation(status::from_client(&e)),
    };
    let mut ids = DeleteIds::default();
    for row in &rows {
        match row.get(&pk.name) {
            Some(Value::Number(n)) => ids.int_ids.extend(n.as_i64()),
            Some(Value::String(s)) => ids.str_ids.push(s.clone()),
            _ => {}
        }
    }
    let pks: Vec<Pk> = ids
        .int_ids
        .iter()
        .map(|i| Pk::Int(*i))
        .chain(ids.str_ids.iter().map(|s| Pk::Str(s.clone())))
        .collect();
    if pks.is_empty() {
        return m::MutationResult {
            status: Some(status::ok()),
            i_ds: Some(ids_of(&[])),
            ..Default::default()
        };
    }
    let partition = (!r.partition_name.is_empty()).then_some(r.partition_name.as_str());
    match api.delete(&r.collection_name, partition, &ids).await {
        Ok(w) => m::MutationResult {
            status: Some(status::ok()),
            i_ds: Some(ids_of(&pks)),
            delete_cnt: i64::try_from(pks.len()).unwrap_or(i64::MAX),
            timestamp: w.time_tick,
            ..Default::default()
        },
        Err(e) => failed_mutation(status::from_client(&e)),
    }
}

fn partitions(one: &str) -> Vec<String> {
    if one.is_empty() {
        vec![]
    } else {
        vec![one.to_owned()]
    }
}

/// Where the consistency level a collection was created with is kept (its number).
pub const CONSISTENCY_PROPERTY: &str = "milvus.consistency_level";

/// The level reads of the collection use when they name none (Milvus's collection default).
pub fn default_level(info: &CollectionInfo) -> i32 {
    info.schema
        .as_ref()
        .and_then(|s| s.properties.get(CONSISTENCY_PROPERTY))
        .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok())
        .unwrap_or(mc::ConsistencyLevel::Bounded as i32)
}

/// Milvus's consistency as Walden's: a Session or Customized read with a guarantee timestamp
/// waits as a strong one does (the timestamp may come from another proxy's write). A request
/// that asks for the collection's default level (`collection_default`) gets the level the
/// collection was created with. Walden's bounded level also reads this process's own writes.
fn consistency(level: i32, guarantee: u64, collection_default: Option<i32>) -> Consistency {
    let level = collection_default.unwrap_or(level);
    match mc::ConsistencyLevel::try_from(level) {
        Ok(mc::ConsistencyLevel::Strong) => Consistency::Strong,
        Ok(mc::ConsistencyLevel::Eventually) => Consistency::Eventually,
        Ok(mc::ConsistencyLevel::Session | mc::ConsistencyLevel::Customized) if guarantee > 0 => {
            Consistency::Strong
        }
        Ok(mc::ConsistencyLevel::Session) => Consistency::Session,
        _ => Consistency::Bounded,
    }
}

pub(crate) fn param<'a>(kvs: &'a [KeyValuePair], key: &str) -> Option<&'a str> {
    kvs.iter().find(|p| p.key == key).map(|p| p.value.as_str())
}

/// Output fields as asked (`*` is every field), the primary key first.
fn outputs(milvus: &MSchema, asked: &[String]) -> Vec<String> {
    let pk = milvus
        .fields
        .iter()
        .find(|f| f.is_primary_key)
        .map(|f| f.name.clone())
        .unwrap_or_default();
    let mut out = vec![pk];
    for a in asked {
        if a == "*" {
            for f in &milvus.fields {
                let name = if f.is_dynamic {
                    DYNAMIC_FIELD.to_owned()
                } else {
                    f.name.clone()
                };
                if !out.contains(&name) {
                    out.push(name);
                }
            }
        } else if !out.contains(a) {
            out.push(a.clone());
        }
    }
    out
}

/// Walden names for Milvus output fields (dynamic keys read the JSON column).
fn walden_outputs(milvus: &MSchema, names: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for n in names {
        let w = if milvus.fields.iter().any(|f| &f.name == n && !f.is_dynamic) {
            n.clone()
        } else {
            schema::DYNAMIC_COLUMN.to_owned()
        };
        if !out.contains(&w) {
            out.push(w);
        }
    }
    out
}

pub async fn search(client: &Client, r: m::SearchRequest) -> m::SearchResults {
    let fail = |s| m::SearchResults {
        status: Some(s),
        ..Default::default()
    };
    let (info, milvus) = match describe_recent(client, &r.collection_name).await {
        Ok(x) => x,
        Err(s) => return fail(s),
    };
    if !r.sub_reqs.is_empty() || r.function_score.is_some() {
        return fail(status::invalid(
            "hybrid search and function scores are not served by Walden",
        ));
    }
    if !r.expr_template_values.is_empty() {
        return fail(status::invalid(
            "expression templates are not served by Walden; write the values into the filter",
        ));
    }
    let p = &r.search_params;
    if param(p, "group_by_field").is_some_and(|g| !g.is_empty()) {
        return fail(status::invalid("group_by_field is not served by Walden"));
    }
    let Some(m::search_request::SearchInput::PlaceholderGroup(group)) = &r.search_input else {
        return fail(status::invalid(
            "search by primary keys is not served by Walden; send vectors",
        ));
    };
    let group = match mc::PlaceholderGroup::decode(group.as_slice()) {
        Ok(g) => g,
        Err(e) => {
            return fail(status::invalid(format!(
                "the placeholder group does not decode: {e}"
            )));
        }
    };
    let mut vectors = Vec::new();
    for ph in &group.placeholders {
        if ph.r#type != mc::PlaceholderType::FloatVector as i32 {
            return fail(status::invalid("only float vectors are searched by Walden"));
        }
        for v in &ph.values {
            if v.len() % 4 != 0 {
                return fail(status::invalid(
                    "a float vector's bytes are not a multiple of 4",
                ));
            }
            vectors.push(
                v.chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect::<Vec<f32>>(),
            );
        }
    }
    let top_k: u32 = param(p, "topk").and_then(|v| v.parse().ok()).unwrap_or(10);
    let offset: u32 = param(p, "offset").and_then(|v| v.parse().ok()).unwrap_or(0);
    let round: i32 = param(p, "round_decimal")
        .and_then(|v| v.parse().ok())
        .unwrap_or(-1);
    let field = param(p, "anns_field").unwrap_or_default().to_owned();
    let metric = match param(p, "metric_type").filter(|m| !m.is_empty()) {
        Some(m) => match walden_query::Metric::parse(m) {
            Some(x) => Some(x),
            None => {
                return fail(status::invalid(format!(
                    "metric type {m} is not served by Walden (L2, IP, COSINE are)"
                )));
            }
        },
        None => None,
    };
    let ef = param(p, "params")
        .and_then(|s| serde_json::from_str::<Value>(s).ok())
        .and_then(|v| {
            v.get("ef")
                .or_else(|| v.get("search_list"))
                .and_then(Value::as_u64)
                .or_else(|| v.get("nprobe").and_then(Value::as_u64).map(|n| n * 8))
        })
        .unwrap_or(0);
    let names = outputs(&milvus, &r.output_fields);
    let options = SearchOptions {
        field,
        top_k: top_k + offset,
        filter: r.dsl.clone(),
        output_fields: walden_outputs(&milvus, &names),
        consistency: consistency(
            r.consistency_level,
            r.guarantee_timestamp,
            r.use_default_consistency.then(|| default_level(&info)),
        ),
        metric,
        partitions: r.partition_names.clone(),
        ef: u32::try_from(ef).unwrap_or(u32::MAX),
    };
    let hits = match client.search(&r.collection_name, &vectors, &options).await {
        Ok(h) => h,
        Err(e) => return fail(status::from_client(&e)),
    };
    let pk_name = names[0].clone();
    let mut topks = Vec::new();
    let mut scores = Vec::new();
    let mut pks = Vec::new();
    let mut rows_out: Vec<Map<String, Value>> = Vec::new();
    for per_query in hits {
        let kept: Vec<_> = per_query.into_iter().skip(offset as usize).collect();
        topks.push(i64::try_from(kept.len()).unwrap_or(0));
        for h in kept {
            let score = if round >= 0 {
                let f = 10f32.powi(round);
                (h.distance * f).round() / f
            } else {
                h.distance
            };
            scores.push(score);
            pks.push(match &h.id {
                Value::Number(n) => Pk::Int(n.as_i64().unwrap_or_default()),
                Value::String(s) => Pk::Str(s.clone()),
                other => Pk::Str(other.to_string()),
            });
            rows_out.push(h.fields);
        }
    }
    let out_names: Vec<String> = names
        .into_iter()
        // The key is an output field when asked, by name or by `*` (which names every field).
        .filter(|n| *n != pk_name || r.output_fields.iter().any(|a| a == n || a == "*"))
        .collect();
    let fields_data = rows::to_field_data(&milvus, &out_names, &rows_out);
    m::SearchResults {
        status: Some(status::ok()),
        results: Some(ms::SearchResultData {
            num_queries: i64::try_from(vectors.len()).unwrap_or(0),
            top_k: i64::from(top_k),
            fields_data,
            scores,
            ids: Some(ids_of(&pks)),
            topks,
            output_fields: out_names,
            primary_field_name: pk_name,
            ..Default::default()
        }),
        collection_name: r.collection_name.clone(),
        ..Default::default()
    }
}

pub async fn query(client: &Client, r: m::QueryRequest) -> m::QueryResults {
    let fail = |s| m::QueryResults {
        status: Some(s),
        ..Default::default()
    };
    let (info, milvus) = match describe_recent(client, &r.collection_name).await {
        Ok(x) => x,
        Err(s) => return fail(s),
    };
    if !r.expr_template_values.is_empty() {
        return fail(status::invalid(
            "expression templates are not served by Walden; write the values into the filter",
        ));
    }
    let level = consistency(
        r.consistency_level,
        r.guarantee_timestamp,
        r.use_default_consistency.then(|| default_level(&info)),
    );
    let pk_name = milvus
        .fields
        .iter()
        .find(|f| f.is_primary_key)
        .map(|f| f.name.clone())
        .unwrap_or_default();
    if r.output_fields
        .iter()
        .any(|f| f.eq_ignore_ascii_case("count(*)"))
    {
        let counted = client
            .count_partitions(&r.collection_name, &r.expr, level, &r.partition_names)
            .await;
        return match counted {
            Ok(n) => m::QueryResults {
                status: Some(status::ok()),
                fields_data: vec![ms::FieldData {
                    r#type: MType::Int64 as i32,
                    field_name: "count(*)".into(),
                    field: Some(ms::field_data::Field::Scalars(ms::ScalarField {
                        data: Some(ms::scalar_field::Data::LongData(ms::LongArray {
                            data: vec![i64::try_from(n).unwrap_or(i64::MAX)],
                        })),
                    })),
                    ..Default::default()
                }],
                collection_name: r.collection_name.clone(),
                output_fields: vec!["count(*)".into()],
                primary_field_name: pk_name,
                ..Default::default()
            },
            Err(e) => fail(status::from_client(&e)),
        };
    }
    let q = &r.query_params;
    let limit: u64 = param(q, "limit").and_then(|v| v.parse().ok()).unwrap_or(0);
    let offset: u64 = param(q, "offset").and_then(|v| v.parse().ok()).unwrap_or(0);
    if r.expr.trim().is_empty() && limit == 0 {
        return fail(status::invalid(
            "empty expression should be used with limit",
        ));
    }
    let names = outputs(&milvus, &r.output_fields);
    let options = QueryOptions {
        filter: r.expr.clone(),
        output_fields: walden_outputs(&milvus, &names),
        limit: if limit == 0 { 0 } else { limit + offset },
        consistency: level,
        partitions: r.partition_names.clone(),
        // Milvus merges a query's segments in key order, and clients page on it: pymilvus's
        // query iterator asks for `pk > last` (and seeks an offset without its `iterator`
        // flag), so the smallest keys must come first whatever the request says.
        order_by_key: true,
    };
    let rows = match client.query(&r.collection_name, &options).await {
        Ok(q) => q.rows,
        Err(e) => return fail(status::from_client(&e)),
    };
    let rows: Vec<_> = rows
        .into_iter()
        .skip(usize::try_from(offset).unwrap_or(usize::MAX))
        .collect();
    m::QueryResults {
        status: Some(status::ok()),
        fields_data: rows::to_field_data(&milvus, &names, &rows),
        collection_name: r.collection_name.clone(),
        output_fields: names,
        primary_field_name: pk_name,
        ..Default::default()
    }
}

pub async fn load(client: &Client, r: m::LoadCollectionRequest) -> mc::Status {
    let replicas = u32::try_from(r.replica_number.max(1)).unwrap_or(1);
    match client.load(&r.collection_name, replicas, WAIT).await {
        Ok(_) => status::ok(),
        Err(e) => status::from_client(&e),
    }
}

pub async fn release(client: &Client, r: m::ReleaseCollectionRequest) -> mc::Status {
    match client.collections().release(&r.collection_name).await {
        Ok(_) => status::ok(),
        Err(e) => status::from_client(&e),
    }
}

pub async fn load_state(client: &Client, name: &str) -> Result<mc::LoadState, mc::Status> {
    let (info, _) = describe(client, name).await?;
    Ok(if info.released {
        mc::LoadState::NotLoad
    } else {
        mc::LoadState::Loaded
    })
}

pub async fn flush(client: &Client, r: m::FlushRequest) -> m::FlushResponse {
    let mut coll_flush_ts = std::collections::HashMap::new();
    for name in &r.collection_names {
        match client.flush_and_wait(name, WAIT).await {
            Ok(_) => {
                coll_flush_ts.insert(
                    name.clone(),
                    walden_common::TimeTick::compose(now_ms(), 0).0,
                );
            }
            Err(e) => {
                return m::FlushResponse {
                    status: Some(status::from_client(&e)),
                    ..Default::default()
                };
            }
        }
    }
    m::FlushResponse {
        status: Some(status::ok()),
        db_name: crate::DEFAULT_DB.into(),
        coll_flush_ts,
        ..Default::default()
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Live rows of the collection (or of `partition`), read strongly.
pub async fn row_count(client: &Client, name: &str, partition: &str) -> Result<u64, mc::Status> {
    let (info, _) = describe(client, name).await?;
    if !partition.is_empty() && !info.partitions.iter().any(|p| p == partition) {
        return Err(status::fail(
            Code::PartitionNotFound,
            format!("partition not found[partition={partition}]"),
        ));
    }
    client
        .count_partitions(name, "", Consistency::Strong, &partitions(partition))
        .await
        .map_err(|e| status::from_client(&e))
}
