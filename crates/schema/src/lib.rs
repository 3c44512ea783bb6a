//! Collection schemas and the rows written against them.
//!
//! A schema has one primary key (`int64` or `string`), at least one `float_vector` with a
//! dimension, and scalar fields (`bool`, `int64`, `float`, `double`, `string`, `json`). Its
//! wire form is the `CollectionSchema` protobuf; users write it as JSON (see [`Schema::from_json`]).
//!
//! Insert payloads are Arrow IPC streams. [`Schema::validate_ipc`] is what the node runs at
//! append time: the columns must be exactly the schema's fields, with the Arrow types of
//! [`arrow_type`], and no nulls where the schema allows none. The same bytes later become the
//! growing segment and the Parquet file, with no re-encoding.

pub mod index;
mod json;

use std::{collections::HashSet, io::Cursor, sync::Arc};

use arrow_array::{Array, ArrayRef, Int64Array, RecordBatch, StringArray, UInt32Array};
use arrow_ipc::{reader::StreamReader, writer::StreamWriter};
use arrow_schema::{ArrowError, DataType as ArrowType, Field, Schema as ArrowSchema, SchemaRef};
use bytes::Bytes;
pub use index::{HnswParams, Index, check_index};
use thiserror::Error;
use walden_common::{ErrorCode, HasErrorCode};
pub use walden_proto::v1::{CollectionSchema, DataType, DeleteIds, FieldSchema};

/// Largest vector dimension accepted.
pub const MAX_DIM: u32 = 32_768;
/// Most fields a schema may have.
pub const MAX_FIELDS: usize = 256;

/// Errors about schemas and rows.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum SchemaError {
    /// The schema itself is unusable.
    #[error("invalid schema: {0}")]
    Invalid(String),
    /// Rows (or ids) do not fit the schema.
    #[error("rows do not match the collection's schema: {0}")]
    Mismatch(String),
    /// The payload is not a readable Arrow IPC stream.
    #[error("malformed Arrow IPC payload: {0}")]
    Malformed(String),
}

impl HasErrorCode for SchemaError {
    fn code(&self) -> ErrorCode {
        match self {
            Self::Invalid(_) | Self::Malformed(_) => ErrorCode::InvalidArgument,
            Self::Mismatch(_) => ErrorCode::SchemaMismatch,
        }
    }
}

fn mismatch(s: impl Into<String>) -> SchemaError {
    SchemaError::Mismatch(s.into())
}

/// The user-facing name of a field type (as in the JSON schema).
pub fn type_name(t: DataType) -> &'static str {
    match t {
        DataType::Unspecified => "unspecified",
        DataType::Bool => "bool",
        DataType::Int64 => "int64",
        DataType::Float => "float",
        DataType::Double => "double",
        DataType::String => "string",
        DataType::Json => "json",
        DataType::FloatVector => "float_vector",
    }
}

fn parse_type(s: &str) -> Option<DataType> {
    [
        DataType::Bool,
        DataType::Int64,
        DataType::Float,
        DataType::Double,
        DataType::String,
        DataType::Json,
        DataType::FloatVector,
    ]
    .into_iter()
    .find(|t| type_name(*t) == s)
}

/// The Arrow type a field's column must have. JSON is stored as UTF-8 text.
pub fn arrow_type(f: &FieldSchema) -> ArrowType {
    match f.data_type() {
        DataType::Bool => ArrowType::Boolean,
        DataType::Int64 => ArrowType::Int64,
        DataType::Float => ArrowType::Float32,
        DataType::Double => ArrowType::Float64,
        DataType::String | DataType::Json | DataType::Unspecified => ArrowType::Utf8,
        DataType::FloatVector => ArrowType::FixedSizeList(
            Arc::new(Field::new("item", ArrowType::Float32, false)),
            i32::try_from(f.dim).unwrap_or(i32::MAX),
        ),
    }
}

/// Whether `got` is the column type `want` asks for. List item names and nullability are
/// writer choices (pyarrow calls the item "item" and makes it nullable), so only the shape counts.
fn same_type(want: &ArrowType, got: &ArrowType) -> bool {
    match (want, got) {
        (ArrowType::FixedSizeList(a, n), ArrowType::FixedSizeList(b, m)) => {
            n == m && a.data_type() == b.data_type()
        }
        _ => want == got,
    }
}

/// A checked schema with its Arrow form.
#[derive(Clone, Debug)]
pub struct Schema {
    proto: CollectionSchema,
    arrow: SchemaRef,
    pk: usize,
}

impl Schema {
    /// Checks `proto`: 1 to [`MAX_FIELDS`] uniquely named fields of known types, exactly one
    /// primary key of type int64 or string (not nullable), at least one float vector with a
    /// dimension from 1 to [`MAX_DIM`] (not nullable).
    pub fn new(proto: CollectionSchema) -> Result<Self, SchemaError> {
        let invalid = |s: String| SchemaError::Invalid(s);
        if proto.fields.is_empty() || proto.fields.len() > MAX_FIELDS {
            return Err(invalid(format!(
                "a schema has 1 to {MAX_FIELDS} fields, not {}",
                proto.fields.len()
            )));
        }
        let mut names = HashSet::new();
        let mut pk = None;
        let mut vectors = 0;
        for (i, f) in proto.fields.iter().enumerate() {
            let name_ok = !f.name.is_empty()
                && f.name.len() <= 255
                && f.name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !f.name.starts_with(|c: char| c.is_ascii_digit());
            if !name_ok {
                return Err(invalid(format!(
                    "field name {:?} must be 1 to 255 of [A-Za-z0-9_], not starting with a digit",
                    f.name
                )));
            }
            if !names.insert(f.name.as_str()) {
                return Err(invalid(format!("field {:?} appears twice", f.name)));
            }
            let t = DataType::try_from(f.data_type)
                .ok()
                .filter(|t| *t != DataType::Unspecified)
                .ok_or_else(|| invalid(format!("field {:?} has no known type", f.name)))?;
            if t == DataType::FloatVector {
                vectors += 1;
                if f.dim == 0 || f.dim > MAX_DIM {
                    return Err(invalid(format!(
                        "vector field {:?} needs a dim from 1 to {MAX_DIM}, not {}",
                        f.name, f.dim
                    )));
                }
                if f.nullable {
                    return Err(invalid(format!(
                        "vector field {:?} cannot be nullable",
                        f.name
                    )));
                }
            } else if f.dim != 0 {
                return Err(invalid(format!(
                    "only vector fields have a dim ({:?})",
                    f.name
                )));
            }
            if f.primary_key {
                if pk.is_some() {
                    return Err(invalid("more than one primary key".into()));
                }
                if !matches!(t, DataType::Int64 | DataType::String) || f.nullable {
                    return Err(invalid(format!(
                        "primary key {:?} must be a non-nullable int64 or string",
                        f.name
                    )));
                }
                pk = Some(i);
            }
        }
        let dynamic: Vec<_> = proto.fields.iter().filter(|f| f.dynamic).collect();
        if dynamic.len() > 1 {
            return Err(invalid("at most one field is the dynamic field".into()));
        }
        if let Some(d) = dynamic.first()
            && (d.data_type() != DataType::Json || !d.nullable)
        {
            return Err(invalid(format!(
                "the dynamic field {:?} must be a nullable json field",
                d.name
            )));
        }
        let pk = pk.ok_or_else(|| invalid("no field is the primary key".into()))?;
        if vectors == 0 {
            return Err(invalid(
                "a collection needs at least one float_vector field".into(),
            ));
        }
        let arrow = Arc::new(ArrowSchema::new(
            proto
                .fields
                .iter()
                .map(|f| Field::new(&f.name, arrow_type(f), f.nullable))
                .collect::<Vec<_>>(),
        ));
        Ok(Self { proto, arrow, pk })
    }

    /// Parses the JSON form:
    /// `{"fields":[{"name":"id","type":"int64","primary_key":true},{"name":"emb","type":"float_vector","dim":4}]}`
    /// (`primary_key`, `dim` and `nullable` may be left out).
    pub fn from_json(text: &str) -> Result<Self, SchemaError> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct J {
            fields: Vec<F>,
        }
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct F {
            name: String,
            #[serde(rename = "type")]
            data_type: String,
            #[serde(default)]
            primary_key: bool,
            #[serde(default)]
            dim: u32,
            #[serde(default)]
            nullable: bool,
        }
        let j: J = serde_json::from_str(text)
            .map_err(|e| SchemaError::Invalid(format!("schema JSON: {e}")))?;
        let fields = j
            .fields
            .into_iter()
            .map(|f| {
                let t = parse_type(&f.data_type).ok_or_else(|| {
                    SchemaError::Invalid(format!(
                        "field {:?}: unknown type {:?} (bool, int64, float, double, string, \
                         json, float_vector)",
                        f.name, f.data_type
                    ))
                })?;
                Ok(FieldSchema {
                    name: f.name,
                    data_type: t as i32,
                    primary_key: f.primary_key,
                    dim: f.dim,
                    nullable: f.nullable,
                    ..FieldSchema::default()
                })
            })
            .collect::<Result<_, SchemaError>>()?;
        Self::new(CollectionSchema {
            fields,
            ..CollectionSchema::default()
        })
    }

    /// The JSON form that [`Schema::from_json`] reads.
    pub fn to_json(&self) -> serde_json::Value {
        let fields = self
            .proto
            .fields
            .iter()
            .map(|f| {
                let mut o = serde_json::json!({"name": f.name, "type": type_name(f.data_type())});
                if f.primary_key {
                    o["primary_key"] = true.into();
                }
                if f.dim != 0 {
                    o["dim"] = f.dim.into();
                }
                if f.nullable {
                    o["nullable"] = true.into();
                }
                o
            })
            .collect::<Vec<_>>();
        serde_json::json!({ "fields": fields })
    }

    pub fn proto(&self) -> &CollectionSchema {
        &self.proto
    }

    pub fn arrow(&self) -> &SchemaRef {
        &self.arrow
    }

    pub fn primary_key(&self) -> &FieldSchema {
        &self.proto.fields[self.pk]
    }

    /// Converts a batch whose columns hold the right values in a neighbouring Arrow type
    /// (lists for vectors, other float or int widths) to this schema's types, then checks it.
    pub fn conform(&self, batch: &RecordBatch) -> Result<RecordBatch, SchemaError> {
        json::conform(self, batch)
    }

    /// Checks an insert payload and returns its row count. Nothing here trusts the payload:
    /// a malformed stream is `Malformed`, a well-formed one with other columns is `Mismatch`.
    pub fn validate_ipc(&self, payload: &[u8]) -> Result<u64, SchemaError> {
        let batches = decode_ipc(payload)?;
        let mut rows = 0u64;
        for batch in &batches {
            self.check_batch(batch)?;
            rows += batch.num_rows() as u64;
        }
        if rows == 0 {
            return Err(mismatch("the payload holds no rows"));
        }
        Ok(rows)
    }

    /// Checks one batch's columns, types and nulls.
    pub fn check_batch(&self, batch: &RecordBatch) -> Result<(), SchemaError> {
        let got = batch.schema();
        for f in &self.proto.fields {
            let Some((i, col)) = got.column_with_name(&f.name) else {
                let what = if f.primary_key {
                    "primary key"
                } else {
                    "field"
                };
                return Err(mismatch(format!("missing {what} {:?}", f.name)));
            };
            let want = arrow_type(f);
            if !same_type(&want, col.data_type()) {
                return Err(mismatch(format!(
                    "field {:?} is {} ({want}) but the column is {}",
                    f.name,
                    type_name(f.data_type()),
                    col.data_type()
                )));
            }
            let array = batch.column(i);
            if !f.nullable && array.null_count() > 0 {
                return Err(mismatch(format!("field {:?} has nulls", f.name)));
            }
            if f.data_type() == DataType::FloatVector
                && let Some(list) = array
                    .as_any()
                    .downcast_ref::<arrow_array::FixedSizeListArray>()
                && list.values().null_count() > 0
            {
                return Err(mismatch(format!(
                    "vector field {:?} has null elements",
                    f.name
                )));
            }
            if f.data_type() == DataType::Json
                && let Some(text) = array.as_any().downcast_ref::<StringArray>()
            {
                for (row, v) in text.iter().enumerate() {
                    if let Some(v) = v
                        && serde_json::from_str::<serde::de::IgnoredAny>(v).is_err()
                    {
                        return Err(mismatch(format!(
                            "field {:?}, row {row}: not valid JSON",
                            f.name
                        )));
                    }
                }
            }
        }
        if got.fields().len() != self.proto.fields.len() {
            let extra = got
                .fields()
                .iter()
                .find(|c| !self.proto.fields.iter().any(|f| &f.name == c.name()))
                .map_or_else(String::new, |c| c.name().clone());
            return Err(mismatch(format!("column {extra:?} is not in the schema")));
        }
        Ok(())
    }

    /// Encodes `batch` (already checked to match) as an Arrow IPC stream: an insert payload.
    pub fn encode_ipc(&self, batch: &RecordBatch) -> Result<Bytes, SchemaError> {
        self.check_batch(batch)?;
        let mut out = Vec::with_capacity(batch.get_array_memory_size() + 1024);
        let mut w = StreamWriter::try_new(&mut out, &batch.schema()).map_err(internal)?;
        w.write(batch).map_err(internal)?;
        w.finish().map_err(internal)?;
        drop(w);
        Ok(Bytes::from(out))
    }

    /// Builds a batch from JSON row objects (`{"id": 1, "emb": [0.1, ...], ...}`).
    pub fn rows_from_json(&self, rows: &[serde_json::Value]) -> Result<RecordBatch, SchemaError> {
        json::rows_to_batch(self, rows)
    }

    /// The rows of `batch` (any of the schema's fields) as JSON objects: the inverse of
    /// [`Schema::rows_from_json`], for search and query results.
    pub fn rows_to_json(
        &self,
        batch: &RecordBatch,
    ) -> Result<Vec<serde_json::Map<String, serde_json::Value>>, SchemaError> {
        json::batch_to_rows(self, batch)
    }

    /// Splits `batch` into one batch per shard by primary key (see [`shard_of_pk`]); shards
    /// with no rows get `None`.
    pub fn split_by_shard(
        &self,
        batch: &RecordBatch,
        shards: usize,
    ) -> Result<Vec<Option<RecordBatch>>, SchemaError> {
        let pk = batch
            .column_by_name(&self.primary_key().name)
            .ok_or_else(|| mismatch("missing primary key"))?;
        let mut idx: Vec<Vec<u32>> = vec![Vec::new(); shards];
        for row in 0..batch.num_rows() {
            let key = pk_bytes(pk, row).ok_or_else(|| mismatch("primary key has nulls"))?;
            idx[shard_of_pk(&key, shards)].push(row as u32);
        }
        idx.into_iter()
            .map(|rows| {
                if rows.is_empty() {
                    return Ok(None);
                }
                let take = UInt32Array::from(rows);
                arrow_select::take::take_record_batch(batch, &take)
                    .map(Some)
                    .map_err(internal)
            })
            .collect()
    }

    /// Parses a comma-separated list of primary keys (`1,2,3` or `a,b`) of this schema's key type.
    pub fn parse_ids(&self, text: &str) -> Result<DeleteIds, SchemaError> {
        let mut ids = DeleteIds::default();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            if self.primary_key().data_type() == DataType::Int64 {
                ids.int_ids.push(
                    part.parse()
                        .map_err(|_| mismatch(format!("primary key {part:?} is not an int64")))?,
                );
            } else {
                ids.str_ids.push(part.to_owned());
            }
        }
        if ids.int_ids.is_empty() && ids.str_ids.is_empty() {
            return Err(mismatch("no primary keys given"));
        }
        Ok(ids)
    }

    /// Checks that a delete's keys have this schema's key type, and counts them.
    pub fn check_delete(&self, ids: &DeleteIds) -> Result<u64, SchemaError> {
        let (right, wrong) = match self.primary_key().data_type() {
            DataType::Int64 => (ids.int_ids.len(), ids.str_ids.len()),
            _ => (ids.str_ids.len(), ids.int_ids.len()),
        };
        if wrong > 0 {
            return Err(mismatch(format!(
                "primary keys must be {}",
                type_name(self.primary_key().data_type())
            )));
        }
        if right == 0 {
            return Err(mismatch("a delete needs at least one primary key"));
        }
        Ok(right as u64)
    }
}

/// Splits delete keys by shard, as [`Schema::split_by_shard`] does for rows.
pub fn split_ids(ids: &DeleteIds, shards: usize) -> Vec<DeleteIds> {
    let mut out = vec![DeleteIds::default(); shards];
    for id in &ids.int_ids {
        out[shard_of_pk(&id.to_le_bytes(), shards)]
            .int_ids
            .push(*id);
    }
    for id in &ids.str_ids {
        out[shard_of_pk(id.as_bytes(), shards)]
            .str_ids
            .push(id.clone());
    }
    out
}

/// The shard a primary key belongs to: FNV-1a (64 bit) of its bytes (little-endian for int64,
/// UTF-8 for strings) modulo the shard count. Stable: it decides where rows live.
pub fn shard_of_pk(key: &[u8], shards: usize) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h % shards.max(1) as u64) as usize
}

fn pk_bytes(col: &ArrayRef, row: usize) -> Option<Vec<u8>> {
    if col.is_null(row) {
        return None;
    }
    if let Some(a) = col.as_any().downcast_ref::<Int64Array>() {
        return Some(a.value(row).to_le_bytes().to_vec());
    }
    col.as_any()
        .downcast_ref::<StringArray>()
        .map(|a| a.value(row).as_bytes().to_vec())
}

fn read_batches(payload: &[u8]) -> Result<Vec<RecordBatch>, SchemaError> {
    let reader = StreamReader::try_new(Cursor::new(payload), None)
        .map_err(|e| SchemaError::Malformed(e.to_string()))?;
    reader
        .collect::<Result<Vec<_>, ArrowError>>()
        .map_err(|e| SchemaError::Malformed(e.to_string()))
}

/// Encodes any batch as an Arrow IPC stream (search and query results).
pub fn batch_to_ipc(batch: &RecordBatch) -> Result<Bytes, SchemaError> {
    let mut out = Vec::with_capacity(batch.get_array_memory_size() + 1024);
    let mut w = StreamWriter::try_new(&mut out, &batch.schema()).map_err(internal)?;
    w.write(batch).map_err(internal)?;
    w.finish().map_err(internal)?;
    drop(w);
    Ok(Bytes::from(out))
}

/// Reads every batch of an Arrow IPC stream (an insert payload) without checking a schema.
pub fn decode_ipc(payload: &[u8]) -> Result<Vec<RecordBatch>, SchemaError> {
    // The Arrow reader is not hardened against every malformed input (fuzzing finds panics in
    // its buffer slicing); a panic must become a refusal, not a dead node.
    quietly(|| read_batches(payload))
        .map_err(|why| SchemaError::Malformed(format!("the reader gave up: {why}")))?
}

std::thread_local! {
    static QUIET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f`, turning a panic into its message, without the panic hook printing it: refusing a
/// malformed payload is not a crash, and a panic message on a server's stderr reads like one.
/// Panics anywhere else still reach the hook that was installed before. For readers of
/// untrusted bytes whose library may panic (Arrow IPC here, Parquet in the segment format).
pub fn quietly<T>(f: impl FnOnce() -> T + std::panic::UnwindSafe) -> Result<T, String> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let earlier = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET.with(std::cell::Cell::get) {
                earlier(info);
            }
        }));
    });
    let was = QUIET.with(|q| q.replace(true));
    let r = std::panic::catch_unwind(f);
    QUIET.with(|q| q.set(was));
    r.map_err(|p| {
        p.downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".into())
    })
}

fn internal(e: ArrowError) -> SchemaError {
    SchemaError::Malformed(e.to_string())
}

#[cfg(test)]
mod tests;
