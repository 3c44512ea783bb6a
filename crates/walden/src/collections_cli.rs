//! The collection commands: `collection`, `partition`, `insert`, `upsert`, `delete`, `flush`.

use std::{fs::File, io::Read as _, path::Path};

use anyhow::{Context, bail};
use arrow_array::RecordBatch;
use clap::{Args, Subcommand};
use serde_json::{Value, json};
use walden_client::{ClientError, Collections, ProducerOptions, WriteResult};
use walden_common::HasErrorCode;
use walden_proto::v1::{CollectionInfo, CollectionState, FileKind, SegmentInfo, SegmentState};
use walden_schema::Schema;

use crate::cli::connect;

/// Where to connect and how to print, for every collection command.
#[derive(Args, Debug, Clone)]
pub struct Common {
    #[command(flatten)]
    pub conn: crate::cli::ConnArgs,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum CollectionCmd {
    /// Create a collection from a JSON schema file.
    Create {
        name: String,
        /// `{"fields":[{"name":"id","type":"int64","primary_key":true},{"name":"emb","type":"float_vector","dim":4}]}`
        #[arg(long)]
        schema: std::path::PathBuf,
        /// Shards (vchannels), placed on the least loaded pchannels.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
        shards: u32,
        #[command(flatten)]
        common: Common,
    },
    /// Schema, state, partitions and vchannels of a collection.
    Describe {
        name: String,
        #[command(flatten)]
        common: Common,
    },
    /// Every collection.
    List {
        #[command(flatten)]
        common: Common,
    },
    /// Drop a collection from every shard.
    Drop {
        name: String,
        #[command(flatten)]
        common: Common,
    },
    /// Serve reads of a collection (a new one is loaded already), building missing indexes;
    /// returns once every shard serves it.
    Load {
        name: String,
        /// Copies of each shard serving reads.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
        replicas: u32,
        /// Give up waiting after this many seconds.
        #[arg(long, default_value_t = 600.0)]
        timeout: f64,
        #[command(flatten)]
        common: Common,
    },
    /// Stop serving reads of a collection and free the memory its shards hold.
    Release {
        name: String,
        #[command(flatten)]
        common: Common,
    },
}

#[derive(Subcommand, Debug)]
pub enum PartitionCmd {
    Create {
        name: String,
        #[arg(long)]
        collection: String,
        #[command(flatten)]
        common: Common,
    },
    Drop {
        name: String,
        #[arg(long)]
        collection: String,
        #[command(flatten)]
        common: Common,
    },
}

/// `insert` and `upsert`.
#[derive(Args, Debug)]
pub struct WriteArgs {
    #[arg(long)]
    pub collection: String,
    /// Rows: a JSON array or JSON lines of objects, Parquet (`.parquet`) or Arrow IPC
    /// (`.arrow`, `.arrows`, `.ipc`, `.feather`); `-` reads JSON from stdin.
    #[arg(long)]
    pub file: std::path::PathBuf,
    /// Partition [default: _default].
    #[arg(long)]
    pub partition: Option<String>,
    #[command(flatten)]
    pub retry: RetryArgs,
    #[command(flatten)]
    pub common: Common,
}

/// How long a write follows retryable errors.
#[derive(Args, Debug)]
pub struct RetryArgs {
    /// Seconds to keep retrying through retryable errors (node restarting, channel moving).
    /// An outage ends the whole write within this window: the rows not written are named.
    #[arg(long, default_value_t = 30.0)]
    pub retry_timeout: f64,
}

impl RetryArgs {
    fn options(&self) -> anyhow::Result<ProducerOptions> {
        Ok(ProducerOptions {
            retry_timeout: crate::seconds("--retry-timeout", self.retry_timeout)?,
            ..ProducerOptions::default()
        })
    }
}

fn state_name(s: CollectionState) -> &'static str {
    match s {
        CollectionState::Unspecified => "unspecified",
        CollectionState::Creating => "creating",
        CollectionState::Created => "created",
        CollectionState::Dropping => "dropping",
    }
}

/// The JSON form of a collection, as `describe --json` prints it.
pub fn collection_json(info: &CollectionInfo) -> Value {
    let schema = info
        .schema
        .clone()
        .and_then(|s| Schema::new(s).ok())
        .map_or(Value::Null, |s| s.to_json());
    json!({
        "name": info.name,
        "collection_id": info.collection_id,
        "state": state_name(info.state()),
        "shards": info.vchannels.len(),
        "schema": schema,
        "partitions": info.partitions,
        "vchannels": info.vchannels.iter()
            .map(|v| json!({"name": v.name, "pchannel": v.pchannel}))
            .collect::<Vec<_>>(),
        "loaded": !info.released,
        "replicas": info.replicas.max(1),
        "indexes": info.indexes.iter().map(crate::index_cli::index_json).collect::<Vec<_>>(),
    })
}

async fn api(conn: &crate::cli::ConnArgs) -> anyhow::Result<Collections> {
    Ok(connect(conn).await?.collections())
}

fn print(common: &Common, doc: Value, text: impl FnOnce() -> String) {
    if common.json {
        println!("{doc}");
    } else {
        println!("{}", text());
    }
}

pub async fn collection(cmd: CollectionCmd) -> anyhow::Result<()> {
    match cmd {
        CollectionCmd::Create {
            name,
            schema,
            shards,
            common,
        } => {
            let text = std::fs::read_to_string(&schema)
                .with_context(|| format!("reading {}", schema.display()))?;
            let schema = Schema::from_json(&text).context("--schema")?;
            let info = api(&common.conn)
                .await?
                .create(&name, &schema, shards)
                .await?;
            print(&common, collection_json(&info), || {
                format!(
                    "created collection {} (id {}, {} shards)",
                    info.name,
                    info.collection_id,
                    info.vchannels.len()
                )
            });
        }
        CollectionCmd::Describe { name, common } => {
            let info = api(&common.conn).await?.describe(&name).await?;
            let doc = collection_json(&info);
            print(&common, doc.clone(), || {
                let mut s = format!(
                    "collection {} (id {}, {})\nschema: {}\npartitions: {}\n",
                    info.name,
                    info.collection_id,
                    state_name(info.state()),
                    doc["schema"],
                    info.partitions.join(", ")
                );
                for v in &info.vchannels {
                    s.push_str(&format!("vchannel {} on {}\n", v.name, v.pchannel));
                }
                s.trim_end().to_owned()
            });
        }
        CollectionCmd::List { common } => {
            let all = api(&common.conn).await?.list().await?;
            let doc = json!({ "collections": all.iter().map(collection_json).collect::<Vec<_>>() });
            print(&common, doc, || {
                all.iter()
                    .map(|i| {
                        format!(
                            "{}\tid={}\tshards={}\t{}",
                            i.name,
                            i.collection_id,
                            i.vchannels.len(),
                            state_name(i.state())
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        CollectionCmd::Load {
            name,
            replicas,
            timeout,
            common,
        } => {
            let timeout = crate::seconds("--timeout", timeout)?;
            let shards = connect(&common.conn)
                .await?
                .load(&name, replicas, timeout)
                .await?;
            let rows: u64 = shards.iter().map(|s| s.growing_rows + s.sealed_rows).sum();
            let indexed: u64 = shards.iter().map(|s| s.indexed_rows).sum();
            print(
                &common,
                json!({"loaded": name, "replicas": replicas, "shards": shards.len(),
                       "rows": rows, "indexed_rows": indexed}),
                || format!("loaded collection {name}: {rows} rows, {indexed} indexed"),
            );
        }
        CollectionCmd::Release { name, common } => {
            api(&common.conn).await?.release(&name).await?;
            print(&common, json!({ "released": name }), || {
                format!("released collection {name}")
            });
        }
        CollectionCmd::Drop { name, common } => {
            let r = api(&common.conn).await?.drop_collection(&name).await?;
            print(
                &common,
                json!({"dropped": name, "time_ticks": r.time_ticks}),
                || format!("dropped collection {name}"),
            );
        }
    }
    Ok(())
}

pub async fn partition(cmd: PartitionCmd) -> anyhow::Result<()> {
    let (create, name, collection, common) = match cmd {
        PartitionCmd::Create {
            name,
            collection,
            common,
        } => (true, name, collection, common),
        PartitionCmd::Drop {
            name,
            collection,
            common,
        } => (false, name, collection, common),
    };
    let api = api(&common.conn).await?;
    let r = if create {
        api.create_partition(&collection, &name).await?
    } else {
        api.drop_partition(&collection, &name).await?
    };
    let verb = if create { "created" } else { "dropped" };
    print(
        &common,
        json!({"collection": collection, "partition": name, verb: true, "time_ticks": r.time_ticks}),
        || format!("{verb} partition {name} of {collection}"),
    );
    Ok(())
}

pub async fn write(args: WriteArgs, upsert: bool) -> anyhow::Result<()> {
    let api = api(&args.common.conn)
        .await?
        .with_producer_options(args.retry.options()?);
    let (_, schema) = api.schema(&args.collection).await?;
    let batches = read_rows(&args.file, &schema)?;
    let r = if upsert {
        api.upsert(&args.collection, args.partition.as_deref(), &batches)
            .await
    } else {
        api.insert(&args.collection, args.partition.as_deref(), &batches)
            .await
    };
    let key = if upsert { "upserted" } else { "inserted" };
    let r = report_partial(&args.common, key, r)?;
    print(
        &args.common,
        json!({ key: r.rows, "time_tick": r.time_tick }),
        || {
            format!(
                "{key} {} rows into {} (tick {})",
                r.rows, args.collection, r.time_tick
            )
        },
    );
    Ok(())
}

pub async fn delete(
    collection: &str,
    ids: &str,
    partition: Option<&str>,
    retry: &RetryArgs,
    common: &Common,
) -> anyhow::Result<()> {
    let api = api(&common.conn)
        .await?
        .with_producer_options(retry.options()?);
    let (_, schema) = api.schema(collection).await?;
    let ids = schema.parse_ids(ids).context("--ids")?;
    let r = report_partial(
        common,
        "deleted",
        api.delete(collection, partition, &ids).await,
    )?;
    print(
        common,
        json!({"deleted": r.rows, "time_tick": r.time_tick}),
        || {
            format!(
                "deleted {} keys from {collection} (tick {})",
                r.rows, r.time_tick
            )
        },
    );
    Ok(())
}

pub async fn flush(
    collection: &str,
    wait: Option<std::time::Duration>,
    common: &Common,
) -> anyhow::Result<()> {
    let Some(timeout) = wait else {
        let r = api(&common.conn).await?.flush(collection).await?;
        print(
            common,
            json!({"flushed": collection, "time_ticks": r.time_ticks}),
            || format!("sealed {collection} (not waiting for the files: --wait)"),
        );
        return Ok(());
    };
    let s = connect(&common.conn)
        .await?
        .flush_and_wait(collection, timeout)
        .await?;
    let flushed = s.segments.iter().filter(|x| is_flushed(x.state())).count();
    print(
        common,
        json!({"flushed": collection, "segments": segments_json(&s.segments)}),
        || format!("flushed {collection}: {flushed} segment(s) in the manifest"),
    );
    Ok(())
}

fn is_flushed(s: SegmentState) -> bool {
    matches!(s, SegmentState::Flushed | SegmentState::Compacted)
}

fn segment_state(s: SegmentState) -> &'static str {
    match s {
        SegmentState::Growing => "growing",
        SegmentState::Sealed => "sealed",
        SegmentState::Flushed => "flushed",
        SegmentState::Compacted => "compacted",
        SegmentState::Unspecified => "unknown",
    }
}

fn segments_json(segments: &[SegmentInfo]) -> Vec<Value> {
    segments
        .iter()
        .map(|s| {
            json!({
                "id": s.segment_id,
                "vchannel": s.vchannel,
                "partition": s.partition,
                "state": segment_state(s.state()),
                "rows": s.rows,
                "deleted_rows": s.deleted_rows,
                "files": s.files.iter().map(|f| json!({
                    "url": f.url,
                    "kind": if f.kind() == FileKind::Delta { "delta" } else { "data" },
                    "rows": f.rows,
                })).collect::<Vec<_>>(),
            })
        })
        .collect()
}

/// `walden segments --collection C`.
pub async fn segments(collection: &str, common: &Common) -> anyhow::Result<()> {
    let s = connect(&common.conn).await?.segments(collection).await?;
    if common.json {
        println!("{}", json!({"segments": segments_json(&s.segments)}));
        return Ok(());
    }
    println!(
        "{:<22} {:<28} {:<12} {:<10} {:>10} {:>8} files",
        "id", "vchannel", "partition", "state", "rows", "deleted"
    );
    for x in &s.segments {
        println!(
            "{:<22} {:<28} {:<12} {:<10} {:>10} {:>8} {}",
            x.segment_id,
            x.vchannel,
            if x.partition.is_empty() {
                "-"
            } else {
                &x.partition
            },
            segment_state(x.state()),
            x.rows,
            x.deleted_rows,
            x.files.len()
        );
        for f in &x.files {
            println!("    {} ({} rows)", f.url, f.rows);
        }
    }
    Ok(())
}

/// A write that was cut into several messages and not all acknowledged is printed like a whole
/// one, with the keys that were not written and those in doubt (sent, never acknowledged: they
/// may be in the log), before the command fails: the output never hides rows that were
/// written, nor claims rows that were not.
fn report_partial(
    common: &Common,
    key: &str,
    r: Result<WriteResult, ClientError>,
) -> anyhow::Result<WriteResult> {
    match r {
        Err(ClientError::PartialWrite {
            written,
            not_written,
            in_doubt,
            cause,
        }) => {
            let code = cause.code();
            print(
                common,
                json!({
                    key: written,
                    "not_written": not_written,
                    "in_doubt": in_doubt,
                    "error": {"code": code.as_u32(), "name": code.name(), "message": cause.to_string()},
                }),
                || {
                    let mut s = format!(
                        "{key} {written} rows; not written: {}",
                        not_written.join(",")
                    );
                    if !in_doubt.is_empty() {
                        s.push_str(&format!(
                            "; in doubt (sent, not acknowledged; they may be in the log): {}",
                            in_doubt.join(",")
                        ));
                    }
                    s
                },
            );
            Err(ClientError::PartialWrite {
                written,
                not_written,
                in_doubt,
                cause,
            }
            .into())
        }
        other => Ok(other?),
    }
}

/// Reads rows for `schema` from a JSON, Parquet or Arrow IPC file.
fn read_rows(path: &Path, schema: &Schema) -> anyhow::Result<Vec<RecordBatch>> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default()
        .to_ascii_lowercase();
    let batches = match ext.as_str() {
        "parquet" => {
            let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
            parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f)
                .with_context(|| format!("reading Parquet {}", path.display()))?
                .build()?
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("reading Parquet {}", path.display()))?
        }
        "arrow" | "arrows" | "ipc" | "feather" => {
            let bytes =
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            match arrow_ipc::reader::FileReader::try_new(std::io::Cursor::new(&bytes), None) {
                Ok(r) => r.collect::<Result<Vec<_>, _>>()?,
                Err(_) => walden_schema::decode_ipc(&bytes)
                    .with_context(|| format!("reading Arrow IPC {}", path.display()))?,
            }
        }
        _ => {
            let mut text = String::new();
            if path == Path::new("-") {
                std::io::stdin().read_to_string(&mut text)?;
            } else {
                text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
            }
            // Built in the schema's own types: nothing to convert.
            return Ok(vec![schema.rows_from_json(&parse_json_rows(&text)?)?]);
        }
    };
    batches
        .iter()
        .map(|b| schema.conform(b).map_err(anyhow::Error::from))
        .collect()
}

/// A JSON array of objects, or one object per line.
fn parse_json_rows(text: &str) -> anyhow::Result<Vec<Value>> {
    if text.trim_start().starts_with('[') {
        return match serde_json::from_str(text).context("rows JSON")? {
            Value::Array(rows) => Ok(rows),
            _ => bail!("rows JSON must be an array of objects"),
        };
    }
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).with_context(|| format!("JSON line {}", i + 1)))
        .collect()
}
