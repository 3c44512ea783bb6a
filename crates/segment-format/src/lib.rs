//! The Parquet files of historical data: what the flusher writes and compaction rewrites, and
//! what any reader (pyarrow, a query node) opens.
//!
//! * A **data file** holds a segment's rows: the collection's fields with their Arrow types
//!   exactly (vectors `FixedSizeList<Float32>`, nullable fields nullable, JSON as UTF-8), then
//!   [`TICK_COLUMN`], the tick each row was written at (a transaction's rows: its commit's).
//! * A **delta file** holds deletes: `pk` (the primary key's type) and `tick`. A delete
//!   `(pk, t)` removes every row with key `pk` and a tick below `t`; an upsert at `t` is a delete
//!   at `t` plus its row at `t`, so the latest tick wins per primary key.
//!
//! Files are written whole with create-if-absent under a key no other write uses, and never
//! changed; compaction writes new ones.

mod footer;
mod keyfilter;

use std::{collections::HashMap, sync::Arc};

use arrow_array::{
    Array, ArrayRef, FixedSizeListArray, Int64Array, RecordBatch, StringArray, UInt64Array,
};
use arrow_schema::{DataType as ArrowType, Field, Schema as ArrowSchema, SchemaRef};
use bytes::Bytes;
use parquet::{
    arrow::{ArrowWriter, arrow_reader::ParquetRecordBatchReaderBuilder},
    basic::Compression,
    file::properties::WriterProperties,
};
use thiserror::Error;
use walden_common::{ErrorCode, HasErrorCode};
use walden_proto::v1::{DataType, DeleteIds};
use walden_schema::Schema;

pub use keyfilter::KeyFilter;

/// A file or batch that does not have the shape this format says.
#[derive(Debug, Error)]
#[error("{0}")]
pub struct FormatError(pub String);

impl HasErrorCode for FormatError {
    fn code(&self) -> ErrorCode {
        ErrorCode::Corrupted
    }
}

fn format(what: &str, e: impl std::fmt::Display) -> FormatError {
    FormatError(format!("{what}: {e}"))
}

/// The tick column of data files. `$` cannot start a field name, so it never collides.
pub const TICK_COLUMN: &str = "$tick";

/// A primary key.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Pk {
    Int(i64),
    Str(String),
}

/// Deletes: the highest delete tick per key.
pub type Deletes = HashMap<Pk, u64>;

/// The Arrow schema of a collection's data files.
pub fn data_schema(schema: &Schema) -> SchemaRef {
    let mut fields: Vec<Field> = schema
        .arrow()
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    fields.push(Field::new(TICK_COLUMN, ArrowType::UInt64, false));
    Arc::new(ArrowSchema::new(fields))
}

/// The Arrow schema of a collection's delta files.
pub fn delta_schema(schema: &Schema) -> SchemaRef {
    let pk = if schema.primary_key().data_type() == DataType::Int64 {
        ArrowType::Int64
    } else {
        ArrowType::Utf8
    };
    Arc::new(ArrowSchema::new(vec![
        Field::new("pk", pk, false),
        Field::new("tick", ArrowType::UInt64, false),
    ]))
}

/// Rows of an insert as a data-file batch: columns in schema order with the schema's exact
/// types (a writer may have named or nulled a vector's item differently), plus the tick.
pub fn data_batch(
    schema: &Schema,
    target: &SchemaRef,
    batch: &RecordBatch,
    tick: u64,
) -> Result<RecordBatch, FormatError> {
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(target.fields().len());
    for field in schema.arrow().fields() {
        let col = batch
            .column_by_name(field.name())
            .ok_or_else(|| format("insert payload", format!("no column {:?}", field.name())))?;
        let col = match (field.data_type(), col.data_type()) {
            (ArrowType::FixedSizeList(item, dim), ArrowType::FixedSizeList(_, _)) => {
                let l = col
                    .as_any()
                    .downcast_ref::<FixedSizeListArray>()
                    .ok_or_else(|| format("insert payload", "unreadable vector column"))?;
                Arc::new(
                    FixedSizeListArray::try_new(
                        item.clone(),
                        *dim,
                        l.values().clone(),
                        l.nulls().cloned(),
                    )
                    .map_err(|e| format("vector column", e))?,
                ) as ArrayRef
            }
            _ => col.clone(),
        };
        columns.push(col);
    }
    columns.push(Arc::new(UInt64Array::from(vec![tick; batch.num_rows()])));
    RecordBatch::try_new(target.clone(), columns).map_err(|e| format("data batch", e))
}

/// The keys of a delete payload.
pub fn delete_keys(ids: &DeleteIds) -> impl Iterator<Item = Pk> + '_ {
    ids.int_ids
        .iter()
        .map(|i| Pk::Int(*i))
        .chain(ids.str_ids.iter().map(|s| Pk::Str(s.clone())))
}

/// The primary keys of a batch's rows (`column` is the key column).
pub fn keys_of(batch: &RecordBatch, column: &str) -> Result<Vec<Pk>, FormatError> {
    let col = batch
        .column_by_name(column)
        .ok_or_else(|| format("rows", format!("no primary key column {column:?}")))?;
    if let Some(a) = col.as_any().downcast_ref::<Int64Array>() {
        return Ok(a.iter().map(|v| Pk::Int(v.unwrap_or_default())).collect());
    }
    if let Some(a) = col.as_any().downcast_ref::<StringArray>() {
        return Ok(a
            .iter()
            .map(|v| Pk::Str(v.unwrap_or_default().to_owned()))
            .collect());
    }
    Err(format(
        "rows",
        "the primary key is neither int64 nor string",
    ))
}

/// A delta batch of `deletes` (key, tick).
pub fn delta_batch(target: &SchemaRef, deletes: &[(Pk, u64)]) -> Result<RecordBatch, FormatError> {
    let pk: ArrayRef = match target.field(0).data_type() {
        ArrowType::Int64 => Arc::new(Int64Array::from_iter_values(deletes.iter().map(
            |(k, _)| match k {
                Pk::Int(i) => *i,
                Pk::Str(_) => 0,
            },
        ))),
        _ => Arc::new(StringArray::from_iter_values(deletes.iter().map(
            |(k, _)| match k {
                Pk::Str(s) => s.as_str(),
                Pk::Int(_) => "",
            },
        ))),
    };
    let ticks = Arc::new(UInt64Array::from_iter_values(
        deletes.iter().map(|(_, t)| *t),
    ));
    RecordBatch::try_new(target.clone(), vec![pk, ticks]).map_err(|e| format("delta batch", e))
}

/// Reads the deletes of a delta file into `into` (highest tick per key).
pub fn read_deletes(bytes: Bytes, into: &mut Deletes) -> Result<u64, FormatError> {
    let mut n = 0;
    for batch in decode(bytes)? {
        let keys = keys_of(&batch, "pk")?;
        let ticks = ticks_of(&batch, "tick")?;
        for (k, t) in keys.into_iter().zip(ticks.values().iter()) {
            let e = into.entry(k).or_insert(0);
            *e = (*e).max(*t);
            n += 1;
        }
    }
    Ok(n)
}

pub fn ticks_of<'a>(batch: &'a RecordBatch, column: &str) -> Result<&'a UInt64Array, FormatError> {
    batch
        .column_by_name(column)
        .and_then(|c| c.as_any().downcast_ref::<UInt64Array>())
        .ok_or_else(|| format("file", format!("no uint64 column {column:?}")))
}

/// Groups batches into files of at most about `max_bytes` each (by Arrow memory size; a
/// single batch larger than that is one file).
pub fn split(batches: Vec<RecordBatch>, max_bytes: u64) -> Vec<Vec<RecordBatch>> {
    let mut files = Vec::new();
    let (mut cur, mut size) = (Vec::new(), 0u64);
    for b in batches {
        let n = b.get_array_memory_size() as u64;
        if !cur.is_empty() && size + n > max_bytes {
            files.push(std::mem::take(&mut cur));
            size = 0;
        }
        size += n;
        cur.push(b);
    }
    if !cur.is_empty() {
        files.push(cur);
    }
    files
}

/// One Parquet file of `batches` (all of `schema`).
pub fn encode(schema: &SchemaRef, batches: &[RecordBatch]) -> Result<Bytes, FormatError> {
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .build();
    let mut out = Vec::new();
    let mut w = ArrowWriter::try_new(&mut out, schema.clone(), Some(props))
        .map_err(|e| format("parquet writer", e))?;
    for b in batches {
        w.write(b).map_err(|e| format("parquet write", e))?;
    }
    w.close().map_err(|e| format("parquet close", e))?;
    Ok(Bytes::from(out))
}

/// Every batch of a Parquet file. A malformed file is an error, never a panic (the Parquet
/// reader is not hardened against every input; `fuzz/fuzz_targets/segment_files.rs`).
pub fn decode(bytes: Bytes) -> Result<Vec<RecordBatch>, FormatError> {
    walden_schema::quietly(|| decode_unguarded(bytes))
        .map_err(|why| FormatError(format!("parquet file: the reader gave up: {why}")))?
}

fn decode_unguarded(bytes: Bytes) -> Result<Vec<RecordBatch>, FormatError> {
    footer::check(&bytes)
        .map_err(|why| FormatError(format!("parquet file: damaged footer: {why}")))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)
        .map_err(|e| format("parquet file", e))?
        .build()
        .map_err(|e| format("parquet file", e))?;
    reader
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format("parquet file", e))
}

/// Keeps the rows of `batch` that no delete in `deletes` removes; returns it and how many
/// were removed.
pub fn apply_deletes(
    batch: &RecordBatch,
    pk: &str,
    deletes: &Deletes,
) -> Result<(RecordBatch, u64), FormatError> {
    if deletes.is_empty() {
        return Ok((batch.clone(), 0));
    }
    let keys = keys_of(batch, pk)?;
    let ticks = ticks_of(batch, TICK_COLUMN)?;
    let keep: arrow_array::BooleanArray = keys
        .iter()
        .zip(ticks.values().iter())
        .map(|(k, t)| Some(deletes.get(k).is_none_or(|d| *d <= *t)))
        .collect();
    let removed = keep.iter().filter(|k| *k == Some(false)).count() as u64;
    let kept = arrow_select::filter::filter_record_batch(batch, &keep)
        .map_err(|e| format("applying deletes", e))?;
    Ok((kept, removed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use walden_proto::v1::{CollectionSchema, FieldSchema};

    fn schema() -> Schema {
        Schema::new(CollectionSchema {
            fields: vec![
                FieldSchema {
                    name: "id".into(),
                    data_type: DataType::Int64 as i32,
                    primary_key: true,
                    ..Default::default()
                },
                FieldSchema {
                    name: "v".into(),
                    data_type: DataType::FloatVector as i32,
                    dim: 2,
                    ..Default::default()
                },
                FieldSchema {
                    name: "note".into(),
                    data_type: DataType::String as i32,
                    nullable: true,
                    ..Default::default()
                },
            ],
            ..Default::default()
        })
        .expect("schema")
    }

    fn rows(s: &Schema, ids: &[i64]) -> RecordBatch {
        let json: Vec<serde_json::Value> = ids
            .iter()
            .map(|i| serde_json::json!({"id": i, "v": [*i as f32, 0.5], "note": null}))
            .collect();
        s.rows_from_json(&json).expect("rows")
    }

    #[test]
    fn a_data_file_round_trips_with_the_exact_schema_and_ticks() {
        let s = schema();
        let target = data_schema(&s);
        let b = data_batch(&s, &target, &rows(&s, &[1, 2, 3]), 77).expect("batch");
        let bytes = encode(&target, std::slice::from_ref(&b)).expect("encode");
        let back = decode(bytes).expect("decode");
        assert_eq!(back.len(), 1);
        assert_eq!(back[0], b);
        assert_eq!(back[0].schema(), target);
        assert!(target.field_with_name("note").expect("note").is_nullable());
    }

    #[test]
    fn deletes_remove_only_rows_written_before_them() {
        let s = schema();
        let target = data_schema(&s);
        let old = data_batch(&s, &target, &rows(&s, &[1, 2]), 10).expect("old");
        let new = data_batch(&s, &target, &rows(&s, &[1]), 30).expect("new");
        // Deleted at 20 (after the first row 1, before the upserted one), and row 2 at 10
        // (the same tick as the row: an upsert's own row stays).
        let deletes: Deletes = [(Pk::Int(1), 20), (Pk::Int(2), 10)].into_iter().collect();
        let (kept_old, removed) = apply_deletes(&old, "id", &deletes).expect("apply");
        assert_eq!((kept_old.num_rows(), removed), (1, 1));
        let (kept_new, removed) = apply_deletes(&new, "id", &deletes).expect("apply");
        assert_eq!((kept_new.num_rows(), removed), (1, 0));
    }

    #[test]
    fn a_delta_file_round_trips_keeping_the_highest_tick_per_key() {
        let s = schema();
        let target = delta_schema(&s);
        let b = delta_batch(
            &target,
            &[(Pk::Int(5), 9), (Pk::Int(5), 12), (Pk::Int(6), 3)],
        )
        .expect("delta");
        let mut d = Deletes::new();
        let n = read_deletes(encode(&target, &[b]).expect("encode"), &mut d).expect("read");
        assert_eq!(n, 3);
        assert_eq!(d.get(&Pk::Int(5)), Some(&12));
        assert_eq!(d.get(&Pk::Int(6)), Some(&3));
    }

    #[test]
    fn files_are_split_by_size() {
        let s = schema();
        let target = data_schema(&s);
        let batches: Vec<_> = (0..10)
            .map(|i| data_batch(&s, &target, &rows(&s, &[i]), 1).expect("b"))
            .collect();
        let one = batches[0].get_array_memory_size() as u64;
        let files = split(batches, one * 3);
        assert_eq!(files.iter().map(Vec::len).sum::<usize>(), 10);
        assert!(files.len() >= 4, "{}", files.len());
    }
}
