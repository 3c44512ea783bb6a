//! Filters arrive as text from any client: any input must parse to an expression or give a
//! syntax error (never a panic, never unbounded recursion), and a parsed one must check against
//! a schema and evaluate without panicking.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use walden_schema::{CollectionSchema, DataType, FieldSchema, Schema};

fn schema() -> Schema {
    let f = |name: &str, t: DataType| FieldSchema {
        name: name.into(),
        data_type: t as i32,
        primary_key: name == "id",
        dim: if t == DataType::FloatVector { 2 } else { 0 },
        nullable: name != "id" && name != "v",
        dynamic: name == "j",
    };
    Schema::new(CollectionSchema {
        fields: vec![
            f("id", DataType::Int64),
            f("v", DataType::FloatVector),
            f("s", DataType::String),
            f("x", DataType::Float),
            f("d", DataType::Double),
            f("b", DataType::Bool),
            f("j", DataType::Json),
        ],
        ..Default::default()
    })
    .expect("schema")
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let schema = schema();
    if let Ok(filter) = walden_expr::Filter::new(text, &schema) {
        use arrow_array::{ArrayRef, BooleanArray, Float32Array, Float64Array, Int64Array, StringArray};
        let cols: Vec<(&str, ArrayRef)> = vec![
            ("id", Arc::new(Int64Array::from(vec![1, -5, i64::MAX]))),
            ("s", Arc::new(StringArray::from(vec![Some("ab%"), None, Some("ü_x")]))),
            ("x", Arc::new(Float32Array::from(vec![Some(f32::NAN), Some(1.5), None]))),
            ("d", Arc::new(Float64Array::from(vec![None, Some(-0.0), Some(1e300)]))),
            ("b", Arc::new(BooleanArray::from(vec![Some(true), None, Some(false)]))),
            (
                "j",
                Arc::new(StringArray::from(vec![
                    Some(r#"{"a": [1, "x", {"b": null}], "s": "ab"}"#),
                    None,
                    Some("not json"),
                ])),
            ),
        ];
        let batch = arrow_array::RecordBatch::try_from_iter(cols).expect("batch");
        let rows = filter.evaluate(&batch).expect("a checked filter evaluates");
        assert_eq!(rows.len(), 3);
    }
});
