//! Partial upserts (`upsert(..., partial_update=True)`, Milvus 2.6): the rows name some fields,
//! and a row whose key is stored keeps its other fields.
//!
//! As Milvus's proxy does, the stored rows of the request's keys are read first (strongly, the
//! one written last of each key), and every field the request leaves out is filled from them:
//! a stored row gives its value, a new row its field's default or null, and a new row that
//! leaves out a field with neither is refused naming it (nothing is written). The dynamic
//! field merges by key: the stored keys stay, the request's win. The result is an ordinary
//! upsert of whole rows. Like Milvus's, the read and the write are two steps: a write to the
//! same key between them is overwritten by the stored values read before it.

use serde_json::{Map, Value};
use walden_client::{Client, Consistency};
use walden_milvus_proto::{
    common as mc,
    schema::{self as ms, CollectionSchema as MSchema, DataType as MType, FieldData},
};

use crate::{
    rows,
    schema::{DYNAMIC_COLUMN, DYNAMIC_FIELD},
    status,
};

/// Whether `r` asks for a partial upsert; a field op other than REPLACE (array appends and
/// removals: Walden has no Array type) is refused.
pub fn asked(r: &walden_milvus_proto::milvus::UpsertRequest) -> Result<bool, mc::Status> {
    if let Some(op) = r
        .field_ops
        .iter()
        .find(|o| o.op != ms::field_partial_update_op::OpType::Replace as i32)
    {
        return Err(status::invalid(format!(
            "field {}: array appends and removals are not served by Walden (it has no Array \
             type); a partial upsert replaces the fields it names",
            op.field_name
        )));
    }
    Ok(r.partial_update || !r.field_ops.is_empty())
}

/// The request's columns completed to whole rows: every field the request leaves out, filled
/// from the stored rows of its keys (or the field's default or null for a new key).
pub async fn complete(
    client: &Client,
    collection: &str,
    milvus: &MSchema,
    fields: &[FieldData],
    n: usize,
) -> Result<Vec<FieldData>, mc::Status> {
    let pk = milvus
        .fields
        .iter()
        .find(|f| f.is_primary_key)
        .ok_or_else(|| status::invalid("the collection has no primary key"))?;
    let keys = keys(fields, &pk.name, n)?;
    // Every stored field, by its Walden name (dynamic keys live in one JSON column).
    let outputs: Vec<String> = milvus
        .fields
        .iter()
        .filter(|f| !f.is_primary_key)
        .map(|f| {
            if f.is_dynamic {
                DYNAMIC_COLUMN.to_owned()
            } else {
                f.name.clone()
            }
        })
        .collect();
    let stored = client
        .get(collection, &keys, &outputs, Consistency::Strong)
        .await
        .map_err(|e| status::from_client(&e))?;
    if stored.truncated {
        // Rows past the server's read limit would be taken for new ones.
        return Err(status::invalid(format!(
            "a partial upsert of {n} rows reads more stored rows than the server returns at \
             once (query.max_rows): send fewer rows per call"
        )));
    }
    let by_key: std::collections::HashMap<String, Map<String, Value>> = stored
        .rows
        .into_iter()
        .filter_map(|r| Some((r.get(&pk.name)?.to_string(), r)))
        .collect();
    let base: Vec<Map<String, Value>> = keys
        .iter()
        .map(|k| by_key.get(&k.to_string()).cloned().unwrap_or_default())
        .collect();
    let given = |name: &str| {
        fields
            .iter()
            .find(|f| !f.is_dynamic && f.field_name == name)
    };
    let mut out = fields.to_vec();
    for f in milvus.fields.iter().filter(|f| !f.is_dynamic) {
        if given(&f.name).is_some() {
            continue;
        }
        let has = |r: &Map<String, Value>| r.get(&f.name).is_some_and(|v| !v.is_null());
        let defaulted = f.default_value.as_ref().is_some_and(|d| d.data.is_some());
        if !f.nullable && !defaulted && !base.iter().all(has) {
            return Err(status::invalid(format!(
                "Insert missed an field `{}` to collection without set nullable==true or set \
                 default_value",
                f.name
            )));
        }
        let mut column = rows::to_field_data(milvus, std::slice::from_ref(&f.name), &base)
            .pop()
            .ok_or_else(|| status::invalid(format!("field {} cannot be filled", f.name)))?;
        if defaulted {
            // A row without a stored value takes the field's default.
            column.valid_data = base.iter().map(has).collect();
        }
        out.push(column);
    }
    if milvus.enable_dynamic_field {
        let sent = fields
            .iter()
            .find(|f| f.is_dynamic || f.field_name == DYNAMIC_FIELD);
        let sent: Vec<Map<String, Value>> = match sent.and_then(|f| f.field.as_ref()) {
            Some(ms::field_data::Field::Scalars(ms::ScalarField {
                data: Some(ms::scalar_field::Data::JsonData(j)),
            })) => j
                .data
                .iter()
                .map(|b| match serde_json::from_slice(b) {
                    Ok(Value::Object(o)) => Ok(o),
                    _ => Err(status::invalid(format!(
                        "field {DYNAMIC_FIELD}: dynamic values must be JSON objects"
                    ))),
                })
                .collect::<Result<_, _>>()?,
            _ => vec![Map::new(); n],
        };
        let merged = base
            .iter()
            .zip(sent)
            .map(|(stored, mut sent)| {
                let mut meta = match stored.get(DYNAMIC_COLUMN) {
                    Some(Value::String(s)) => match serde_json::from_str(s) {
                        Ok(Value::Object(o)) => o,
                        _ => Map::new(),
                    },
                    Some(Value::Object(o)) => o.clone(),
                    _ => Map::new(),
                };
                meta.append(&mut sent);
                Value::Object(meta).to_string().into_bytes()
            })
            .collect();
        out.retain(|f| !(f.is_dynamic || f.field_name == DYNAMIC_FIELD));
        out.push(FieldData {
            r#type: MType::Json as i32,
            field_name: DYNAMIC_FIELD.into(),
            field: Some(ms::field_data::Field::Scalars(ms::ScalarField {
                data: Some(ms::scalar_field::Data::JsonData(ms::JsonArray {
                    data: merged,
                })),
            })),
            is_dynamic: true,
            ..FieldData::default()
        });
    }
    Ok(out)
}

/// The primary key values the request names, one per row.
fn keys(fields: &[FieldData], pk: &str, n: usize) -> Result<Vec<Value>, mc::Status> {
    let missing = || {
        status::invalid(format!(
            "a partial upsert names the rows it updates: give the primary key {pk}"
        ))
    };
    let f = fields
        .iter()
        .find(|f| f.field_name == pk)
        .ok_or_else(missing)?;
    let keys: Vec<Value> = match f.field.as_ref() {
        Some(ms::field_data::Field::Scalars(ms::ScalarField {
            data: Some(ms::scalar_field::Data::LongData(d)),
        })) => d.data.iter().map(|i| Value::from(*i)).collect(),
        Some(ms::field_data::Field::Scalars(ms::ScalarField {
            data: Some(ms::scalar_field::Data::StringData(d)),
        })) => d.data.iter().map(|s| Value::from(s.as_str())).collect(),
        _ => return Err(missing()),
    };
    if keys.len() != n {
        return Err(status::invalid(format!(
            "field {pk}: {} keys for {n} rows",
            keys.len()
        )));
    }
    Ok(keys)
}
