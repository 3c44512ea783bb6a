use proptest::prelude::*;
use serde_json::json;

use super::*;

const SCHEMA: &str = r#"{"fields":[
    {"name":"id","type":"int64","primary_key":true},
    {"name":"emb","type":"float_vector","dim":4},
    {"name":"title","type":"string"},
    {"name":"score","type":"double","nullable":true},
    {"name":"meta","type":"json","nullable":true}
]}"#;

fn schema() -> Schema {
    Schema::from_json(SCHEMA).unwrap()
}

fn rows(n: i64) -> Vec<serde_json::Value> {
    (0..n)
        .map(|i| json!({"id": i, "emb": [i as f64, 0.5, 0.25, 1.0], "title": format!("t{i}")}))
        .collect()
}

#[test]
fn json_rows_encode_to_a_payload_that_validates_with_its_row_count() {
    let s = schema();
    let batch = s.rows_from_json(&rows(10)).unwrap();
    let payload = s.encode_ipc(&batch).unwrap();
    assert_eq!(s.validate_ipc(&payload).unwrap(), 10);
    let back = decode_ipc(&payload).unwrap();
    assert_eq!(back, vec![batch]);
}

#[test]
fn schema_json_round_trips() {
    let s = schema();
    let again = Schema::from_json(&s.to_json().to_string()).unwrap();
    assert_eq!(again.proto(), s.proto());
}

#[test]
fn unusable_schemas_are_refused_with_invalid() {
    for bad in [
        r#"{"fields":[]}"#,
        r#"{"fields":[{"name":"id","type":"int64","primary_key":true}]}"#,
        r#"{"fields":[{"name":"e","type":"float_vector","dim":4}]}"#,
        r#"{"fields":[{"name":"id","type":"double","primary_key":true},{"name":"e","type":"float_vector","dim":4}]}"#,
        r#"{"fields":[{"name":"id","type":"int64","primary_key":true},{"name":"e","type":"float_vector","dim":0}]}"#,
        r#"{"fields":[{"name":"id","type":"int64","primary_key":true},{"name":"e","type":"float_vector","dim":4},{"name":"e","type":"bool"}]}"#,
        r#"{"fields":[{"name":"id","type":"int64","primary_key":true},{"name":"e","type":"vector","dim":4}]}"#,
        r#"{"fields":[{"name":"a b","type":"int64","primary_key":true},{"name":"e","type":"float_vector","dim":4}]}"#,
        r#"{"fields":[{"name":"id","type":"int64","primary_key":true,"nullable":true},{"name":"e","type":"float_vector","dim":4}]}"#,
        "not json",
    ] {
        let e = Schema::from_json(bad).expect_err(bad);
        assert_eq!(e.code(), ErrorCode::InvalidArgument, "{bad}: {e}");
    }
}

fn other_schema_payload(fields: &str, rows: &[serde_json::Value]) -> Bytes {
    let other = Schema::from_json(fields).unwrap();
    other
        .encode_ipc(&other.rows_from_json(rows).unwrap())
        .unwrap()
}

#[test]
fn wrong_dimension_wrong_type_and_missing_primary_key_are_mismatches() {
    let s = schema();
    let wrong_dim = other_schema_payload(
        r#"{"fields":[{"name":"id","type":"int64","primary_key":true},{"name":"emb","type":"float_vector","dim":3},{"name":"title","type":"string"},{"name":"score","type":"double","nullable":true},{"name":"meta","type":"json","nullable":true}]}"#,
        &[json!({"id": 1, "emb": [1, 2, 3], "title": "x"})],
    );
    let wrong_type = other_schema_payload(
        r#"{"fields":[{"name":"id","type":"string","primary_key":true},{"name":"emb","type":"float_vector","dim":4},{"name":"title","type":"string"},{"name":"score","type":"double","nullable":true},{"name":"meta","type":"json","nullable":true}]}"#,
        &[json!({"id": "1", "emb": [1, 2, 3, 4], "title": "x"})],
    );
    let no_pk = other_schema_payload(
        r#"{"fields":[{"name":"key","type":"int64","primary_key":true},{"name":"emb","type":"float_vector","dim":4},{"name":"title","type":"string"},{"name":"score","type":"double","nullable":true},{"name":"meta","type":"json","nullable":true}]}"#,
        &[json!({"key": 1, "emb": [1, 2, 3, 4], "title": "x"})],
    );
    for (what, payload, needle) in [
        ("dimension", wrong_dim, "emb"),
        ("type", wrong_type, "id"),
        ("primary key", no_pk, "missing primary key \"id\""),
    ] {
        let e = s.validate_ipc(&payload).expect_err(what);
        assert_eq!(e.code(), ErrorCode::SchemaMismatch, "{what}: {e}");
        assert!(e.to_string().contains(needle), "{what}: {e}");
    }
}

#[test]
fn json_rows_with_missing_required_fields_or_bad_values_are_refused() {
    let s = schema();
    for bad in [
        json!({"emb": [1, 2, 3, 4], "title": "no id"}),
        json!({"id": 1, "emb": [1, 2, 3], "title": "short vector"}),
        json!({"id": "1", "emb": [1, 2, 3, 4], "title": "string id"}),
        json!({"id": 1, "emb": [1, 2, 3, 4]}),
        json!({"id": 1, "emb": [1, 2, 3, 4], "title": "x", "extra": 1}),
        json!([1, 2]),
    ] {
        let e = s
            .rows_from_json(std::slice::from_ref(&bad))
            .expect_err(&bad.to_string());
        assert_eq!(e.code(), ErrorCode::SchemaMismatch, "{bad}: {e}");
    }
}

#[test]
fn rows_split_by_primary_key_hash_and_every_row_lands_once() {
    let s = schema();
    let batch = s.rows_from_json(&rows(200)).unwrap();
    let parts = s.split_by_shard(&batch, 3).unwrap();
    let ids = |b: &RecordBatch| -> Vec<i64> {
        let a = b.column(0).as_any().downcast_ref::<Int64Array>().unwrap();
        a.values().to_vec()
    };
    let mut all = Vec::new();
    for (shard, part) in parts.iter().enumerate() {
        let part = part.as_ref().expect("200 rows reach every one of 3 shards");
        for id in ids(part) {
            assert_eq!(shard_of_pk(&id.to_le_bytes(), 3), shard);
            all.push(id);
        }
    }
    all.sort_unstable();
    assert_eq!(all, (0..200).collect::<Vec<_>>());
    // Deletes go where the rows went.
    let del = split_ids(&s.parse_ids("5,17,42").unwrap(), 3);
    for (shard, d) in del.iter().enumerate() {
        for id in &d.int_ids {
            let part = parts[shard].as_ref().unwrap();
            assert!(ids(part).contains(id));
        }
    }
}

#[test]
fn delete_keys_must_have_the_primary_key_type() {
    let s = schema();
    assert!(s.parse_ids("1, 2,3").is_ok());
    assert_eq!(
        s.parse_ids("a").unwrap_err().code(),
        ErrorCode::SchemaMismatch
    );
    let strs = DeleteIds {
        str_ids: vec!["a".into()],
        ..Default::default()
    };
    assert_eq!(
        s.check_delete(&strs).unwrap_err().code(),
        ErrorCode::SchemaMismatch
    );
    assert_eq!(
        s.check_delete(&DeleteIds::default()).unwrap_err().code(),
        ErrorCode::SchemaMismatch
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// The node runs this on every insert: arbitrary bytes never panic and never validate.
    #[test]
    fn arbitrary_bytes_are_refused_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        prop_assert!(schema().validate_ipc(&bytes).is_err());
    }

    /// Damaged real payloads: refused or, if still readable, a correct row count.
    #[test]
    fn damaged_payloads_are_refused_or_still_consistent(
        n in 1i64..20,
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
    ) {
        let s = schema();
        let payload = s.encode_ipc(&s.rows_from_json(&rows(n)).unwrap()).unwrap();
        let mut bad = payload.to_vec();
        for (i, b) in flips {
            let i = i.index(bad.len());
            bad[i] ^= b | 1;
        }
        // What validates must decode to exactly the rows it reported.
        if let Ok(got) = s.validate_ipc(&bad) {
            let rows: usize = decode_ipc(&bad).unwrap().iter().map(|b| b.num_rows()).sum();
            prop_assert_eq!(rows as u64, got);
        }
        // A stream cut at a message boundary is a shorter valid stream; elsewhere it is refused.
        let truncated = &payload[..cut.index(payload.len())];
        if let Ok(got) = s.validate_ipc(truncated) {
            prop_assert!(got <= n as u64);
        }
    }
}
