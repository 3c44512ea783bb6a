//! Collection schemas both ways. A Milvus `CollectionSchema` becomes a Walden schema (Milvus's
//! integer widths are stored as int64, VarChar as string, the dynamic field as a JSON column),
//! and the Milvus schema itself, with the field ids the server assigns, is kept with the Walden
//! schema under [`PROPERTY`]: DescribeCollection answers with what the user created.

use bytes::Bytes;
use prost::Message;
use walden_milvus_proto::{
    common::KeyValuePair,
    schema::{CollectionSchema as MSchema, DataType as MType, FieldSchema as MField},
};
use walden_proto::v1::{CollectionSchema as WSchema, DataType as WType, FieldSchema as WField};

/// Where the Milvus schema is kept in the Walden schema's properties.
pub const PROPERTY: &str = "milvus.schema";

/// Milvus's name of the dynamic field.
pub const DYNAMIC_FIELD: &str = "$meta";

/// The Walden column that holds the dynamic field (Walden field names are `[A-Za-z0-9_]`).
pub const DYNAMIC_COLUMN: &str = "_meta";

/// The first id Milvus gives a user field (0 and 1 are its row id and timestamp).
const FIRST_FIELD_ID: i64 = 100;

/// Longest VarChar Milvus accepts.
const MAX_VARCHAR: u32 = 65_535;

/// A Milvus schema checked and translated.
#[derive(Clone, Debug)]
pub struct Translated {
    pub walden: WSchema,
    /// As the user gave it, with field ids and the dynamic field filled in.
    pub milvus: MSchema,
}

fn param<'a>(f: &'a MField, key: &str) -> Option<&'a str> {
    f.type_params
        .iter()
        .find(|p| p.key == key)
        .map(|p| p.value.as_str())
}

fn type_name(t: i32) -> String {
    MType::try_from(t).map_or_else(|_| format!("type {t}"), |t| t.as_str_name().to_owned())
}

/// Checks a CreateCollection's serialized schema for collection `name` and translates it.
pub fn from_milvus(name: &str, bytes: &[u8]) -> Result<Translated, String> {
    let mut milvus =
        MSchema::decode(bytes).map_err(|e| format!("the schema does not decode: {e}"))?;
    milvus.name = name.to_owned();
    let mut fields = Vec::new();
    let mut next_id = FIRST_FIELD_ID;
    for f in &mut milvus.fields {
        if f.name == DYNAMIC_COLUMN && milvus.enable_dynamic_field {
            return Err(format!(
                "field name {DYNAMIC_COLUMN:?} is reserved for the dynamic field"
            ));
        }
        f.field_id = next_id;
        next_id += 1;
        let t = MType::try_from(f.data_type).unwrap_or(MType::None);
        let (data_type, dim) = match t {
            MType::Bool => (WType::Bool, 0),
            MType::Int8 | MType::Int16 | MType::Int32 | MType::Int64 => (WType::Int64, 0),
            MType::Float => (WType::Float, 0),
            MType::Double => (WType::Double, 0),
            MType::VarChar => {
                let max = param(f, "max_length").ok_or_else(|| {
                    format!(
                        "type param(max_length) should be specified for the field({})",
                        f.name
                    )
                })?;
                match max.parse::<u32>() {
                    Ok(n) if (1..=MAX_VARCHAR).contains(&n) => {}
                    _ => {
                        return Err(format!(
                            "the maximum length specified for field({}) should be in (0, {MAX_VARCHAR}], but got {max}",
                            f.name
                        ));
                    }
                }
                (WType::String, 0)
            }
            MType::Json => (WType::Json, 0),
            MType::FloatVector => {
                let dim = param(f, "dim").ok_or_else(|| {
                    format!(
                        "dimension is not defined in field type params of field {}",
                        f.name
                    )
                })?;
                let dim = dim
                    .parse::<u32>()
                    .map_err(|_| format!("invalid dimension {dim:?} of field {}", f.name))?;
                (WType::FloatVector, dim)
            }
            _ => {
                return Err(format!(
                    "field {:?}: data type {} is not supported by Walden (Bool, Int8, Int16, \
                     Int32, Int64, Float, Double, VarChar, JSON and FloatVector are)",
                    f.name,
                    type_name(f.data_type)
                ));
            }
        };
        if f.auto_id && !(f.is_primary_key && t == MType::Int64) {
            return Err(format!(
                "field {:?}: autoID is only for an Int64 primary key",
                f.name
            ));
        }
        if f.is_primary_key && !matches!(t, MType::Int64 | MType::VarChar) {
            return Err(format!(
                "the data type of primary key should be Int64 or VarChar, not {} ({})",
                type_name(f.data_type),
                f.name
            ));
        }
        if f.is_partition_key || f.is_clustering_key || f.is_function_output {
            return Err(format!(
                "field {:?}: partition keys, clustering keys and function outputs are not supported by Walden",
                f.name
            ));
        }
        fields.push(WField {
            name: f.name.clone(),
            data_type: data_type as i32,
            primary_key: f.is_primary_key,
            dim,
            nullable: f.nullable,
            dynamic: false,
        });
    }
    if !milvus.functions.is_empty() {
        return Err("schema functions (BM25, embeddings) are not supported by Walden".into());
    }
    if milvus.fields.iter().filter(|f| f.is_primary_key).count() != 1 {
        return Err("there must be exactly one primary key field".into());
    }
    if milvus.enable_dynamic_field {
        milvus.fields.push(MField {
            field_id: next_id,
            name: DYNAMIC_FIELD.into(),
            description: "dynamic schema".into(),
            data_type: MType::Json as i32,
            is_dynamic: true,
            ..MField::default()
        });
        fields.push(WField {
            name: DYNAMIC_COLUMN.into(),
            data_type: WType::Json as i32,
            nullable: true,
            dynamic: true,
            ..WField::default()
        });
    }
    let mut walden = WSchema {
        fields,
        ..WSchema::default()
    };
    walden
        .properties
        .insert(PROPERTY.into(), Bytes::from(milvus.encode_to_vec()));
    // Walden's own checks (names, one vector at least, dimensions) speak for themselves.
    walden_schema::Schema::new(walden.clone()).map_err(|e| e.to_string())?;
    Ok(Translated { walden, milvus })
}

/// The Milvus schema of a Walden collection: the one kept at creation, or (for a collection
/// made through Walden's own API) one derived from the Walden schema.
pub fn to_milvus(name: &str, walden: &WSchema) -> MSchema {
    if let Some(kept) = walden.properties.get(PROPERTY)
        && let Ok(s) = MSchema::decode(kept.as_ref())
    {
        return s;
    }
    let fields = walden
        .fields
        .iter()
        .zip(FIRST_FIELD_ID..)
        .map(|(f, id)| {
            let (data_type, type_params) = match WType::try_from(f.data_type) {
                Ok(WType::Bool) => (MType::Bool, vec![]),
                Ok(WType::Int64) => (MType::Int64, vec![]),
                Ok(WType::Float) => (MType::Float, vec![]),
                Ok(WType::Double) => (MType::Double, vec![]),
                Ok(WType::String) => (MType::VarChar, vec![kv("max_length", MAX_VARCHAR)]),
                Ok(WType::Json) => (MType::Json, vec![]),
                Ok(WType::FloatVector) => (MType::FloatVector, vec![kv("dim", f.dim)]),
                _ => (MType::None, vec![]),
            };
            MField {
                field_id: id,
                name: f.name.clone(),
                is_primary_key: f.primary_key,
                data_type: data_type as i32,
                type_params,
                nullable: f.nullable,
                ..MField::default()
            }
        })
        .collect();
    MSchema {
        name: name.to_owned(),
        fields,
        ..MSchema::default()
    }
}

fn kv(key: &str, value: impl ToString) -> KeyValuePair {
    KeyValuePair {
        key: key.into(),
        value: value.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn field(name: &str, t: MType, params: &[(&str, &str)]) -> MField {
        MField {
            name: name.into(),
            data_type: t as i32,
            type_params: params.iter().map(|(k, v)| kv(k, v)).collect(),
            ..MField::default()
        }
    }

    fn schema(fields: Vec<MField>, dynamic: bool) -> Vec<u8> {
        MSchema {
            fields,
            enable_dynamic_field: dynamic,
            ..MSchema::default()
        }
        .encode_to_vec()
    }

    #[test]
    fn milvus_types_map_to_walden_columns_and_the_milvus_schema_is_kept_with_ids() {
        let mut id = field("id", MType::Int64, &[]);
        id.is_primary_key = true;
        id.auto_id = true;
        let bytes = schema(
            vec![
                id,
                field("v", MType::FloatVector, &[("dim", "8")]),
                field("small", MType::Int8, &[]),
                field("title", MType::VarChar, &[("max_length", "64")]),
            ],
            true,
        );
        let t = from_milvus("c", &bytes).unwrap();
        let kinds: Vec<_> = t
            .walden
            .fields
            .iter()
            .map(|f| (f.name.as_str(), f.data_type))
            .collect();
        assert_eq!(
            kinds,
            vec![
                ("id", WType::Int64 as i32),
                ("v", WType::FloatVector as i32),
                ("small", WType::Int64 as i32),
                ("title", WType::String as i32),
                (DYNAMIC_COLUMN, WType::Json as i32),
            ]
        );
        let back = to_milvus("c", &t.walden);
        assert_eq!(back.name, "c");
        let ids: Vec<_> = back
            .fields
            .iter()
            .map(|f| (f.name.as_str(), f.field_id))
            .collect();
        assert_eq!(
            ids,
            vec![
                ("id", 100),
                ("v", 101),
                ("small", 102),
                ("title", 103),
                (DYNAMIC_FIELD, 104)
            ]
        );
        assert_eq!(back.fields[2].data_type, MType::Int8 as i32);
        assert!(back.fields[0].auto_id && back.fields[4].is_dynamic);
    }

    #[test]
    fn unsupported_types_and_missing_params_are_refused_naming_the_field() {
        let mut id = field("id", MType::Int64, &[]);
        id.is_primary_key = true;
        let refused = |extra: MField| {
            from_milvus(
                "c",
                &schema(
                    vec![
                        id.clone(),
                        field("v", MType::FloatVector, &[("dim", "4")]),
                        extra,
                    ],
                    false,
                ),
            )
            .unwrap_err()
        };
        let e = refused(field("b", MType::BinaryVector, &[("dim", "8")]));
        assert!(e.contains("\"b\"") && e.contains("BinaryVector"), "{e}");
        let e = refused(field("s", MType::VarChar, &[]));
        assert!(e.contains("max_length") && e.contains("(s)"), "{e}");
        let e = from_milvus(
            "c",
            &schema(vec![id.clone(), field("v", MType::FloatVector, &[])], false),
        )
        .unwrap_err();
        assert!(e.contains("dimension") && e.contains(" v"), "{e}");
        let e = from_milvus("c", b"\xff\xff").unwrap_err();
        assert!(e.contains("decode"), "{e}");
    }
}
