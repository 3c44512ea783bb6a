//! Names and properties: aliases, RenameCollection, AlterCollection's properties, and
//! AllocTimestamp. Aliases and renames live in Walden's catalog (`docs/design.md` §10.2), so
//! every proxy sees them; Walden checks the namespaces (an alias never takes a collection's
//! name) and refuses dropping a collection that still has aliases, as Milvus does.
//!
//! Collection properties are kept in the Walden schema's properties, one key each under
//! [`PROPERTY_PREFIX`], so two proxies setting different keys never undo each other. Keys
//! that ask Milvus for a behaviour Walden does not have (TTL, mmap, rate limits, ...) are
//! refused naming the key, never stored and ignored.

use std::collections::HashMap;

use bytes::Bytes;
use walden_client::{AliasOp, Client, Collections};
use walden_milvus_proto::{
    common::{self as mc, KeyValuePair},
    milvus as m,
};
use walden_proto::v1::CollectionSchema;

use crate::{Milvus, status};

/// Where a Milvus collection property `k` is kept: `milvus.property.k`.
pub const PROPERTY_PREFIX: &str = "milvus.property.";

/// Property keys (or key prefixes, ending in `.`) that ask for a behaviour Walden lacks.
const UNSUPPORTED: &[&str] = &[
    "collection.",
    "mmap.enabled",
    "lazyload.enabled",
    "partitionkey.isolation",
    "dynamicfield.enabled",
    "timezone",
];

/// Checks Milvus properties: each key must be one Walden can keep as it is.
pub fn check_properties(props: &[KeyValuePair]) -> Result<HashMap<String, Bytes>, mc::Status> {
    let mut out = HashMap::new();
    for p in props {
        let refused = UNSUPPORTED
            .iter()
            .any(|u| p.key == *u || (u.ends_with('.') && p.key.starts_with(u)));
        if refused {
            return Err(status::invalid(format!(
                "collection property {:?} is not supported by Walden (it keeps only \
                 properties that change no behaviour)",
                p.key
            )));
        }
        if p.key.is_empty() {
            return Err(status::invalid("a collection property needs a key"));
        }
        out.insert(
            format!("{PROPERTY_PREFIX}{}", p.key),
            Bytes::from(p.value.clone().into_bytes()),
        );
    }
    Ok(out)
}

/// The Milvus properties kept in a Walden schema, sorted by key.
pub fn properties(schema: &CollectionSchema) -> Vec<KeyValuePair> {
    let mut out: Vec<_> = schema
        .properties
        .iter()
        .filter_map(|(k, v)| {
            Some(KeyValuePair {
                key: k.strip_prefix(PROPERTY_PREFIX)?.to_owned(),
                value: String::from_utf8_lossy(v).into_owned(),
            })
        })
        .collect();
    out.sort_by(|a, b| a.key.cmp(&b.key));
    out
}

fn done<T>(r: Result<T, walden_client::ClientError>) -> mc::Status {
    match r {
        Ok(_) => status::ok(),
        Err(e) => status::from_client(&e),
    }
}

pub async fn alias(
    api: &Collections,
    op: AliasOp,
    db: &str,
    alias: &str,
    collection: &str,
) -> mc::Status {
    if let Err(s) = Milvus::database(db) {
        return s;
    }
    done(api.alias(op, alias, collection).await)
}

pub async fn describe_alias(
    client: &Client,
    r: m::DescribeAliasRequest,
) -> m::DescribeAliasResponse {
    if let Err(s) = Milvus::database(&r.db_name) {
        return m::DescribeAliasResponse {
            status: Some(s),
            ..Default::default()
        };
    }
    match client.collections().list_aliases("").await {
        Ok(all) => match all.into_iter().find(|a| a.alias == r.alias) {
            Some(a) => m::DescribeAliasResponse {
                status: Some(status::ok()),
                db_name: crate::DEFAULT_DB.into(),
                alias: a.alias,
                collection: a.collection,
            },
            None => m::DescribeAliasResponse {
                status: Some(status::fail(
                    status::Code::AliasNotFound,
                    format!("alias not found[database=default][alias={}]", r.alias),
                )),
                ..Default::default()
            },
        },
        Err(e) => m::DescribeAliasResponse {
            status: Some(status::from_client(&e)),
            ..Default::default()
        },
    }
}

pub async fn list_aliases(client: &Client, r: m::ListAliasesRequest) -> m::ListAliasesResponse {
    if let Err(s) = Milvus::database(&r.db_name) {
        return m::ListAliasesResponse {
            status: Some(s),
            ..Default::default()
        };
    }
    // A collection named must exist (an alias names its collection's aliases).
    let collection = if r.collection_name.is_empty() {
        String::new()
    } else {
        match client.collections().describe(&r.collection_name).await {
            Ok(info) => info.name,
            Err(e) => {
                return m::ListAliasesResponse {
                    status: Some(status::from_client(&e)),
                    ..Default::default()
                };
            }
        }
    };
    match client.collections().list_aliases(&collection).await {
        Ok(all) => m::ListAliasesResponse {
            status: Some(status::ok()),
            db_name: crate::DEFAULT_DB.into(),
            collection_name: r.collection_name,
            aliases: all.into_iter().map(|a| a.alias).collect(),
        },
        Err(e) => m::ListAliasesResponse {
            status: Some(status::from_client(&e)),
            ..Default::default()
        },
    }
}

pub async fn rename(api: &Collections, r: m::RenameCollectionRequest) -> mc::Status {
    for db in [&r.db_name, &r.new_db_name] {
        if let Err(s) = Milvus::database(db) {
            return s;
        }
    }
    done(api.rename(&r.old_name, &r.new_name).await)
}

pub async fn alter_collection(api: &Collections, r: m::AlterCollectionRequest) -> mc::Status {
    if let Err(s) = Milvus::database(&r.db_name) {
        return s;
    }
    let set = match check_properties(&r.properties) {
        Ok(s) => s,
        Err(s) => return s,
    };
    let delete = r
        .delete_keys
        .iter()
        .map(|k| format!("{PROPERTY_PREFIX}{k}"))
        .collect();
    done(api.alter_properties(&r.collection_name, set, delete).await)
}

pub async fn alloc_timestamp(client: &Client) -> m::AllocTimestampResponse {
    match client.allocate_ticks(1).await {
        Ok(t) => m::AllocTimestampResponse {
            status: Some(status::ok()),
            timestamp: t,
        },
        Err(e) => m::AllocTimestampResponse {
            status: Some(status::from_client(&e)),
            timestamp: 0,
        },
    }
}
