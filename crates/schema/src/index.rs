//! Vector index specs: which index a vector field has, its metric and its parameters, checked
//! against the schema and with every default filled in (so `index describe` shows what is used).

use serde::{Deserialize, Serialize};
use walden_proto::v1::{IndexSpec, IndexType, MetricType};

use crate::{DataType, Schema, SchemaError};

/// HNSW parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HnswParams {
    /// Links per node (graph degree). Default 16; 2 to 128.
    pub m: usize,
    /// Candidates kept while building. Default 128; 4 to 2 048.
    pub ef_construction: usize,
    /// Candidates kept while searching (at least top_k is used). Default 64; 1 to 32 768.
    pub ef: usize,
}

impl Default for HnswParams {
    fn default() -> Self {
        Self {
            m: 16,
            ef_construction: 128,
            ef: 64,
        }
    }
}

/// A checked index spec.
#[derive(Clone, Debug, PartialEq)]
pub enum Index {
    Flat,
    Hnsw(HnswParams),
}

fn invalid(s: String) -> SchemaError {
    SchemaError::Invalid(s)
}

/// Checks `spec` against `schema` and returns it with defaults filled in (metric L2, the
/// parameters' defaults, parameters as canonical JSON).
pub fn check_index(schema: &Schema, spec: &IndexSpec) -> Result<(IndexSpec, Index), SchemaError> {
    let field = schema
        .proto()
        .fields
        .iter()
        .find(|f| f.name == spec.field)
        .ok_or_else(|| invalid(format!("no field {:?} to index", spec.field)))?;
    if field.data_type() != DataType::FloatVector {
        return Err(invalid(format!(
            "{:?} is not a vector field; only vector fields are indexed",
            spec.field
        )));
    }
    let params = spec.params.trim();
    let params = if params.is_empty() { "{}" } else { params };
    let mut out = spec.clone();
    if out.metric() == MetricType::Unspecified {
        out.metric = MetricType::L2 as i32;
    }
    let index = match spec.index_type() {
        IndexType::Unspecified => {
            return Err(invalid("an index needs a type (flat or hnsw)".into()));
        }
        IndexType::Flat => {
            let v: serde_json::Value = serde_json::from_str(params)
                .map_err(|e| invalid(format!("index params are not JSON: {e}")))?;
            if v.as_object().is_none_or(|o| !o.is_empty()) {
                return Err(invalid("a flat index takes no params".into()));
            }
            out.params = "{}".into();
            Index::Flat
        }
        IndexType::Hnsw => {
            let v: serde_json::Value =
                serde_json::from_str(params).map_err(|e| invalid(format!("hnsw params: {e}")))?;
            if !v.is_object() {
                return Err(invalid("hnsw params are a JSON object".into()));
            }
            let p: HnswParams =
                serde_json::from_value(v).map_err(|e| invalid(format!("hnsw params: {e}")))?;
            let check = |name: &str, v: usize, lo: usize, hi: usize| {
                if (lo..=hi).contains(&v) {
                    Ok(())
                } else {
                    Err(invalid(format!(
                        "hnsw {name} must be {lo} to {hi}, not {v}"
                    )))
                }
            };
            check("m", p.m, 2, 128)?;
            check("ef_construction", p.ef_construction, 4, 2048)?;
            check("ef", p.ef, 1, 32_768)?;
            out.params = serde_json::to_string(&p).map_err(|e| invalid(e.to_string()))?;
            Index::Hnsw(p)
        }
    };
    Ok((out, index))
}

/// The name users write for an index type.
pub fn index_type_name(t: IndexType) -> &'static str {
    match t {
        IndexType::Unspecified => "unspecified",
        IndexType::Flat => "flat",
        IndexType::Hnsw => "hnsw",
    }
}

/// The name users write for a metric.
pub fn metric_name(m: MetricType) -> &'static str {
    match m {
        MetricType::Unspecified => "unspecified",
        MetricType::L2 => "l2",
        MetricType::Ip => "ip",
        MetricType::Cosine => "cosine",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema() -> Schema {
        Schema::from_json(
            r#"{"fields":[{"name":"id","type":"int64","primary_key":true},
                {"name":"v","type":"float_vector","dim":4},{"name":"t","type":"string"}]}"#,
        )
        .expect("schema")
    }

    fn spec(field: &str, t: IndexType, params: &str) -> IndexSpec {
        IndexSpec {
            field: field.into(),
            index_type: t as i32,
            metric: MetricType::Unspecified as i32,
            params: params.into(),
        }
    }

    #[test]
    fn defaults_are_filled_in() {
        let (s, i) =
            check_index(&schema(), &spec("v", IndexType::Hnsw, r#"{"m": 8}"#)).expect("ok");
        assert_eq!(
            i,
            Index::Hnsw(HnswParams {
                m: 8,
                ..Default::default()
            })
        );
        assert_eq!(s.metric(), MetricType::L2);
        assert_eq!(s.params, r#"{"m":8,"ef_construction":128,"ef":64}"#);
        let (s, i) = check_index(&schema(), &spec("v", IndexType::Flat, "")).expect("ok");
        assert_eq!((i, s.params.as_str()), (Index::Flat, "{}"));
    }

    #[test]
    fn bad_specs_say_why() {
        for (sp, needle) in [
            (spec("t", IndexType::Hnsw, ""), "not a vector field"),
            (spec("nope", IndexType::Hnsw, ""), "no field"),
            (spec("v", IndexType::Unspecified, ""), "needs a type"),
            (spec("v", IndexType::Hnsw, r#"{"m": 1}"#), "m must be"),
            (spec("v", IndexType::Hnsw, r#"{"M": 8}"#), "unknown field"),
            (spec("v", IndexType::Hnsw, "[1]"), "hnsw params"),
            (spec("v", IndexType::Flat, r#"{"m": 8}"#), "no params"),
        ] {
            let e = check_index(&schema(), &sp).expect_err(needle);
            assert!(e.to_string().contains(needle), "{needle}: {e}");
        }
    }
}
