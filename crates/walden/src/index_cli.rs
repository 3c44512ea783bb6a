//! `walden index create|describe|drop`: index specs in the catalog.

use clap::{Subcommand, ValueEnum};
use serde_json::{Value, json};
use walden_proto::v1::{IndexSpec, IndexType, MetricType};
use walden_schema::index::{index_type_name, metric_name};

use crate::{cli::connect, collections_cli::Common};

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum IndexTypeArg {
    /// Exact search (no structure).
    Flat,
    /// A graph per flushed segment (growing rows stay exact).
    Hnsw,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum MetricArg {
    L2,
    Ip,
    Cosine,
}

#[derive(Subcommand, Debug)]
pub enum IndexCmd {
    /// Add an index spec for a vector field; shards build it for flushed segments.
    Create {
        #[arg(long)]
        collection: String,
        #[arg(long)]
        field: String,
        #[arg(long = "type", value_enum)]
        index_type: IndexTypeArg,
        #[arg(long, value_enum, default_value = "l2")]
        metric: MetricArg,
        /// HNSW: `{"m": 16, "ef_construction": 128, "ef": 64}` (these are the defaults).
        #[arg(long, default_value = "")]
        params: String,
        #[command(flatten)]
        common: Common,
    },
    /// The collection's index specs and how many flushed rows each shard has indexed.
    Describe {
        #[arg(long)]
        collection: String,
        #[command(flatten)]
        common: Common,
    },
    /// Remove a field's index spec (its searches become exact).
    Drop {
        #[arg(long)]
        collection: String,
        #[arg(long)]
        field: String,
        #[command(flatten)]
        common: Common,
    },
}

pub fn index_json(i: &IndexSpec) -> Value {
    json!({
        "field": i.field,
        "type": index_type_name(i.index_type()),
        "metric": metric_name(i.metric()),
        "params": serde_json::from_str::<Value>(&i.params).unwrap_or(Value::String(i.params.clone())),
    })
}

pub async fn run(cmd: IndexCmd) -> anyhow::Result<()> {
    match cmd {
        IndexCmd::Create {
            collection,
            field,
            index_type,
            metric,
            params,
            common,
        } => {
            let spec = IndexSpec {
                field,
                index_type: match index_type {
                    IndexTypeArg::Flat => IndexType::Flat,
                    IndexTypeArg::Hnsw => IndexType::Hnsw,
                } as i32,
                metric: match metric {
                    MetricArg::L2 => MetricType::L2,
                    MetricArg::Ip => MetricType::Ip,
                    MetricArg::Cosine => MetricType::Cosine,
                } as i32,
                params,
            };
            let info = connect(&common.conn)
                .await?
                .collections()
                .create_index(&collection, spec)
                .await?;
            let doc = json!({"collection": collection,
                "indexes": info.indexes.iter().map(index_json).collect::<Vec<_>>()});
            if common.json {
                println!("{doc}");
            } else {
                println!("indexes of {collection}: {}", doc["indexes"]);
            }
        }
        IndexCmd::Describe { collection, common } => {
            let client = connect(&common.conn).await?;
            let info = client.collections().describe(&collection).await?;
            let shards = client.shards(&collection).await?;
            let shard_docs: Vec<Value> = shards
                .iter()
                .map(|s| {
                    json!({"vchannel": s.vchannel, "loaded": s.loaded,
                        "growing_rows": s.growing_rows, "sealed_segments": s.sealed_segments,
                        "sealed_rows": s.sealed_rows,
                        "indexed_rows": s.indexed_rows})
                })
                .collect();
            let doc = json!({
                "collection": collection,
                "indexes": info.indexes.iter().map(index_json).collect::<Vec<_>>(),
                "shards": shard_docs,
            });
            if common.json {
                println!("{doc}");
            } else {
                for i in &info.indexes {
                    println!("{}", index_json(i));
                }
                for s in &shards {
                    println!(
                        "{}: {} growing rows (exact), {} flushed rows, {} indexed",
                        s.vchannel, s.growing_rows, s.sealed_rows, s.indexed_rows
                    );
                }
            }
        }
        IndexCmd::Drop {
            collection,
            field,
            common,
        } => {
            connect(&common.conn)
                .await?
                .collections()
                .drop_index(&collection, &field)
                .await?;
            if common.json {
                println!(
                    "{}",
                    json!({"collection": collection, "dropped_index": field})
                );
            } else {
                println!("dropped the index of {collection}.{field}");
            }
        }
    }
    Ok(())
}
