//! JSON rows to Arrow columns, for the CLI and clients that hold rows as JSON objects.

use std::sync::Arc;

use arrow_array::{
    ArrayRef, BooleanArray, FixedSizeListArray, Float32Array, Float64Array, Int64Array,
    RecordBatch, StringArray,
};
use arrow_schema::Field;
use serde_json::Value;

use crate::{DataType, FieldSchema, Schema, SchemaError, mismatch};

pub(crate) fn rows_to_batch(schema: &Schema, rows: &[Value]) -> Result<RecordBatch, SchemaError> {
    if rows.is_empty() {
        return Err(mismatch("no rows"));
    }
    for (i, row) in rows.iter().enumerate() {
        let Some(obj) = row.as_object() else {
            return Err(mismatch(format!("row {i} is not a JSON object")));
        };
        if let Some(k) = obj
            .keys()
            .find(|k| !schema.proto().fields.iter().any(|f| &f.name == *k))
        {
            return Err(mismatch(format!("row {i}: {k:?} is not in the schema")));
        }
    }
    let columns = schema
        .proto()
        .fields
        .iter()
        .map(|f| column(f, rows))
        .collect::<Result<Vec<_>, _>>()?;
    RecordBatch::try_new(schema.arrow().clone(), columns).map_err(|e| mismatch(e.to_string()))
}

fn column(f: &FieldSchema, rows: &[Value]) -> Result<ArrayRef, SchemaError> {
    let values = rows.iter().map(|r| r.get(&f.name).filter(|v| !v.is_null()));
    let bad =
        |row: usize, what: &str| mismatch(format!("row {row}: field {:?} must be {what}", f.name));
    Ok(match f.data_type() {
        DataType::Bool => Arc::new(
            values
                .enumerate()
                .map(|(i, v)| match need(f, i, v)? {
                    None => Ok(None),
                    Some(v) => v.as_bool().map(Some).ok_or_else(|| bad(i, "a bool")),
                })
                .collect::<Result<BooleanArray, _>>()?,
        ),
        DataType::Int64 => Arc::new(
            values
                .enumerate()
                .map(|(i, v)| match need(f, i, v)? {
                    None => Ok(None),
                    Some(v) => v.as_i64().map(Some).ok_or_else(|| bad(i, "an int64")),
                })
                .collect::<Result<Int64Array, _>>()?,
        ),
        DataType::Float => Arc::new(
            values
                .enumerate()
                .map(|(i, v)| match need(f, i, v)? {
                    None => Ok(None),
                    Some(v) => v
                        .as_f64()
                        .map(|x| Some(x as f32))
                        .ok_or_else(|| bad(i, "a number")),
                })
                .collect::<Result<Float32Array, _>>()?,
        ),
        DataType::Double => Arc::new(
            values
                .enumerate()
                .map(|(i, v)| match need(f, i, v)? {
                    None => Ok(None),
                    Some(v) => v.as_f64().map(Some).ok_or_else(|| bad(i, "a number")),
                })
                .collect::<Result<Float64Array, _>>()?,
        ),
        DataType::String | DataType::Unspecified => Arc::new(
            values
                .enumerate()
                .map(|(i, v)| match need(f, i, v)? {
                    None => Ok(None),
                    Some(v) => v.as_str().map(Some).ok_or_else(|| bad(i, "a string")),
                })
                .collect::<Result<StringArray, _>>()?,
        ),
        DataType::Json => Arc::new(
            values
                .enumerate()
                .map(|(i, v)| Ok(need(f, i, v)?.map(Value::to_string)))
                .collect::<Result<StringArray, SchemaError>>()?,
        ),
        DataType::FloatVector => {
            let dim = f.dim as usize;
            let mut flat = Vec::with_capacity(rows.len() * dim);
            for (i, v) in values.enumerate() {
                let list = need(f, i, v)?
                    .and_then(Value::as_array)
                    .filter(|a| a.len() == dim)
                    .ok_or_else(|| bad(i, &format!("an array of {dim} numbers")))?;
                for x in list {
                    flat.push(x.as_f64().ok_or_else(|| bad(i, "an array of numbers"))? as f32);
                }
            }
            let item = Arc::new(Field::new("item", arrow_schema::DataType::Float32, false));
            Arc::new(
                FixedSizeListArray::try_new(
                    item,
                    f.dim as i32,
                    Arc::new(Float32Array::from(flat)),
                    None,
                )
                .map_err(|e| mismatch(e.to_string()))?,
            )
        }
    })
}

/// `v`, or an error if the field is required and `v` is absent.
fn need<'a>(
    f: &FieldSchema,
    row: usize,
    v: Option<&'a Value>,
) -> Result<Option<&'a Value>, SchemaError> {
    if v.is_none() && !f.nullable {
        let what = if f.primary_key {
            "primary key"
        } else {
            "field"
        };
        return Err(mismatch(format!("row {row}: missing {what} {:?}", f.name)));
    }
    Ok(v)
}
