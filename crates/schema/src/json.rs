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

/// Converts columns that hold the right values in a neighbouring Arrow type to the schema's
/// type: vectors written as (large) lists of float32/float64 with `dim` values per row (what
/// Parquet readers without Arrow metadata produce), float64 for `float`, float32 for `double`,
/// int32 for `int64`. Columns come out in schema order.
pub(crate) fn conform(schema: &Schema, batch: &RecordBatch) -> Result<RecordBatch, SchemaError> {
    use arrow_array::{Array, Int32Array, LargeListArray, ListArray};
    use arrow_schema::DataType as A;
    let mut columns = Vec::with_capacity(schema.proto().fields.len());
    for f in &schema.proto().fields {
        let col = batch
            .column_by_name(&f.name)
            .ok_or_else(|| {
                let what = if f.primary_key {
                    "primary key"
                } else {
                    "field"
                };
                mismatch(format!("missing {what} {:?}", f.name))
            })?
            .clone();
        let col: ArrayRef = match (f.data_type(), col.data_type()) {
            (DataType::FloatVector, A::List(_) | A::LargeList(_)) => {
                let dim = f.dim as usize;
                let (values, offsets): (ArrayRef, Vec<usize>) =
                    if let Some(l) = col.as_any().downcast_ref::<ListArray>() {
                        let o = l.value_offsets().iter().map(|x| *x as usize).collect();
                        (l.values().clone(), o)
                    } else if let Some(l) = col.as_any().downcast_ref::<LargeListArray>() {
                        let o = l.value_offsets().iter().map(|x| *x as usize).collect();
                        (l.values().clone(), o)
                    } else {
                        return Err(mismatch(format!("field {:?}: unreadable list", f.name)));
                    };
                if col.null_count() > 0 || offsets.windows(2).any(|w| w[1] - w[0] != dim) {
                    return Err(mismatch(format!(
                        "field {:?}: every row needs exactly {dim} values",
                        f.name
                    )));
                }
                let (start, end) = (offsets[0], offsets[offsets.len() - 1]);
                let flat: Vec<f32> = if let Some(v) = values.as_any().downcast_ref::<Float32Array>()
                {
                    v.values()[start..end].to_vec()
                } else if let Some(v) = values.as_any().downcast_ref::<Float64Array>() {
                    v.values()[start..end].iter().map(|x| *x as f32).collect()
                } else {
                    return Err(mismatch(format!(
                        "field {:?}: vector values must be float32 or float64",
                        f.name
                    )));
                };
                let item = Arc::new(Field::new("item", A::Float32, false));
                Arc::new(
                    FixedSizeListArray::try_new(
                        item,
                        dim as i32,
                        Arc::new(Float32Array::from(flat)),
                        None,
                    )
                    .map_err(|e| mismatch(e.to_string()))?,
                )
            }
            (DataType::Float, A::Float64) => Arc::new(
                downcast::<Float64Array>(&col, f)?
                    .iter()
                    .map(|x| x.map(|x| x as f32))
                    .collect::<Float32Array>(),
            ),
            (DataType::Double, A::Float32) => Arc::new(
                downcast::<Float32Array>(&col, f)?
                    .iter()
                    .map(|x| x.map(f64::from))
                    .collect::<Float64Array>(),
            ),
            (DataType::Int64, A::Int32) => Arc::new(
                downcast::<Int32Array>(&col, f)?
                    .iter()
                    .map(|x| x.map(i64::from))
                    .collect::<Int64Array>(),
            ),
            _ => col,
        };
        columns.push(col);
    }
    if batch.num_columns() != columns.len() {
        let extra = batch
            .schema()
            .fields()
            .iter()
            .find(|c| !schema.proto().fields.iter().any(|f| &f.name == c.name()))
            .map_or_else(String::new, |c| c.name().clone());
        return Err(mismatch(format!("column {extra:?} is not in the schema")));
    }
    let out = RecordBatch::try_new(schema.arrow().clone(), columns)
        .map_err(|e| mismatch(e.to_string()))?;
    schema.check_batch(&out)?;
    Ok(out)
}

fn downcast<'a, T: 'static>(col: &'a ArrayRef, f: &FieldSchema) -> Result<&'a T, SchemaError> {
    col.as_any()
        .downcast_ref::<T>()
        .ok_or_else(|| mismatch(format!("field {:?}: unreadable column", f.name)))
}

/// The rows of `batch` (any subset of the schema's fields, in any order) as JSON objects.
/// JSON fields are parsed back into values; float vectors become arrays.
pub(crate) fn batch_to_rows(
    schema: &Schema,
    batch: &RecordBatch,
) -> Result<Vec<serde_json::Map<String, Value>>, SchemaError> {
    use arrow_array::Array;
    let mut rows = vec![serde_json::Map::new(); batch.num_rows()];
    for (field, col) in batch.schema().fields().iter().zip(batch.columns()) {
        let name = field.name();
        let kind = schema
            .proto()
            .fields
            .iter()
            .find(|f| &f.name == name)
            .map(|f| f.data_type())
            .ok_or_else(|| mismatch(format!("{name:?} is not in the schema")))?;
        let wrong = || mismatch(format!("column {name:?} does not have its field's type"));
        for (i, row) in rows.iter_mut().enumerate() {
            let v = if col.is_null(i) {
                Value::Null
            } else {
                match kind {
                    DataType::Bool => Value::Bool(
                        col.as_any()
                            .downcast_ref::<BooleanArray>()
                            .ok_or_else(wrong)?
                            .value(i),
                    ),
                    DataType::Int64 => Value::from(
                        col.as_any()
                            .downcast_ref::<Int64Array>()
                            .ok_or_else(wrong)?
                            .value(i),
                    ),
                    DataType::Float => f32_json(
                        col.as_any()
                            .downcast_ref::<Float32Array>()
                            .ok_or_else(wrong)?
                            .value(i),
                    ),
                    DataType::Double => Value::from(
                        col.as_any()
                            .downcast_ref::<Float64Array>()
                            .ok_or_else(wrong)?
                            .value(i),
                    ),
                    DataType::String | DataType::Unspecified => Value::from(
                        col.as_any()
                            .downcast_ref::<StringArray>()
                            .ok_or_else(wrong)?
                            .value(i),
                    ),
                    DataType::Json => {
                        let s = col
                            .as_any()
                            .downcast_ref::<StringArray>()
                            .ok_or_else(wrong)?
                            .value(i);
                        serde_json::from_str(s).unwrap_or_else(|_| Value::from(s))
                    }
                    DataType::FloatVector => {
                        let l = col
                            .as_any()
                            .downcast_ref::<FixedSizeListArray>()
                            .ok_or_else(wrong)?;
                        let item = l.value(i);
                        let f = item
                            .as_any()
                            .downcast_ref::<Float32Array>()
                            .ok_or_else(wrong)?;
                        Value::Array(f.values().iter().map(|x| f32_json(*x)).collect())
                    }
                }
            };
            row.insert(name.clone(), v);
        }
    }
    Ok(rows)
}

/// A float32 as the shortest decimal that reads back as it (0.1, not 0.10000000149011612).
fn f32_json(x: f32) -> Value {
    x.to_string()
        .parse::<f64>()
        .ok()
        .and_then(serde_json::Number::from_f64)
        .map_or(Value::Null, Value::Number)
}
