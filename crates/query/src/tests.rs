use std::collections::HashSet;

use arrow_array::{Array, Int64Array, StringArray};
use rand::{Rng, SeedableRng, rngs::StdRng};
use walden_expr::Filter;
use walden_schema::Schema;
use walden_segment_format::{Deletes, Pk, data_batch, data_schema};

use super::*;

fn schema() -> Schema {
    Schema::from_json(
        r#"{"fields":[{"name":"id","type":"int64","primary_key":true},
            {"name":"v","type":"float_vector","dim":4},
            {"name":"tag","type":"string","nullable":true}]}"#,
    )
    .expect("schema")
}

/// Rows `ids` with random vectors, tagged "even"/"odd", written at `tick`.
fn batch(s: &Schema, ids: &[i64], tick: u64, rng: &mut StdRng) -> (RecordBatch, Vec<Vec<f32>>) {
    let vecs: Vec<Vec<f32>> = ids
        .iter()
        .map(|_| (0..4).map(|_| rng.random_range(-1.0..1.0)).collect())
        .collect();
    let json: Vec<serde_json::Value> = ids
        .iter()
        .zip(&vecs)
        .map(|(i, v)| {
            serde_json::json!({"id": i, "v": v, "tag": if i % 2 == 0 {"even"} else {"odd"}})
        })
        .collect();
    let rows = s.rows_from_json(&json).expect("rows");
    (
        data_batch(s, &data_schema(s), &rows, tick).expect("data batch"),
        vecs,
    )
}

fn search(segs: &[&Segment], q: &[f32], k: usize, m: Metric, f: Option<&Filter>) -> Vec<Hit> {
    let queries = vec![q.to_vec()];
    let params = SearchParams {
        field: "v",
        queries: &queries,
        k,
        metric: m,
        filter: f,
        ef: 0,
    };
    let mut tops = vec![TopK::new(k, m)];
    for s in segs {
        s.search(&params, &mut tops).expect("search");
    }
    tops.pop().expect("one").into_sorted()
}

fn ids_of(segs: &[&Segment], hits: &[Hit]) -> Vec<i64> {
    let rows: Vec<(u64, u32)> = hits.iter().map(|h| (h.segment, h.row)).collect();
    let b = gather(segs, &rows, &["id".to_owned()]).expect("gather");
    if b.num_columns() == 0 {
        return Vec::new();
    }
    let col = b
        .column(0)
        .as_any()
        .downcast_ref::<Int64Array>()
        .expect("ids");
    col.values().to_vec()
}

#[test]
fn search_over_segments_matches_brute_force_with_filters_and_deletes() {
    let s = schema();
    let mut rng = StdRng::seed_from_u64(7);
    let mut all: Vec<(i64, Vec<f32>)> = Vec::new();
    let mut a = Segment::new(1, "_default", "id");
    let mut b = Segment::new(2, "_default", "id");
    let none = Deletes::new();
    for chunk in 0..6 {
        let ids: Vec<i64> = (chunk * 50..chunk * 50 + 50).collect();
        let (batch, vecs) = batch(&s, &ids, 10 + chunk as u64, &mut rng);
        all.extend(ids.iter().copied().zip(vecs));
        if chunk % 2 == 0 { &mut a } else { &mut b }
            .append(batch, &none)
            .expect("append");
    }
    // Deletes after every row: ids divisible by 7 go.
    for id in (0..300).filter(|i| i % 7 == 0) {
        a.delete(&Pk::Int(id), 100);
        b.delete(&Pk::Int(id), 100);
    }
    assert_eq!(a.live_rows() + b.live_rows(), 300 - 43);
    let filter = Filter::new("tag == 'even' and id > 20", &s).expect("filter");
    for m in [Metric::L2, Metric::Ip, Metric::Cosine] {
        for _ in 0..20 {
            let q: Vec<f32> = (0..4).map(|_| rng.random_range(-1.0..1.0)).collect();
            let mut want: Vec<(f32, i64)> = all
                .iter()
                .filter(|(id, _)| id % 7 != 0 && id % 2 == 0 && *id > 20)
                .map(|(id, v)| (m.key(m.distance(&q, v)), *id))
                .collect();
            want.sort_by(|x, y| x.0.total_cmp(&y.0));
            let want: Vec<i64> = want.iter().take(10).map(|w| w.1).collect();
            let hits = search(&[&a, &b], &q, 10, m, Some(&filter));
            assert_eq!(ids_of(&[&a, &b], &hits), want, "{m:?}");
            assert!(
                hits.windows(2)
                    .all(|w| m.key(w[0].distance) <= m.key(w[1].distance)),
                "nearest first"
            );
        }
    }
}

#[test]
fn a_delete_spares_rows_written_at_or_after_its_tick() {
    let s = schema();
    let mut rng = StdRng::seed_from_u64(1);
    let mut seg = Segment::new(1, "_default", "id");
    seg.append(batch(&s, &[1, 2], 10, &mut rng).0, &Deletes::new())
        .expect("append");
    // An upsert of 1 at 20: its delete at 20, then its row at 20.
    assert_eq!(seg.delete(&Pk::Int(1), 20), 1);
    seg.append(batch(&s, &[1], 20, &mut rng).0, &Deletes::new())
        .expect("append");
    assert_eq!(seg.delete(&Pk::Int(1), 20), 0, "the upserted row stays");
    assert_eq!(seg.live_rows(), 2);
    // Rows appended after a delete they predate are removed on arrival (a sealed segment
    // loaded late, say).
    let late: Deletes = [(Pk::Int(9), 50)].into_iter().collect();
    seg.append(batch(&s, &[9], 40, &mut rng).0, &late)
        .expect("append");
    assert_eq!(seg.live_rows(), 2);
    assert_eq!(seg.count(None).expect("count"), 2);
}

#[test]
fn query_count_and_gather_output_fields() {
    let s = schema();
    let mut rng = StdRng::seed_from_u64(3);
    let mut seg = Segment::new(4, "p1", "id");
    seg.append(batch(&s, &[1, 2, 3, 4, 5], 10, &mut rng).0, &Deletes::new())
        .expect("append");
    seg.delete(&Pk::Int(2), 11);
    let f = Filter::new("tag like 'ev%'", &s).expect("filter");
    assert_eq!(seg.count(Some(&f)).expect("count"), 1);
    let rows = seg.matching(None, 3).expect("matching");
    assert_eq!(rows, vec![0, 2, 3]);
    let rows: Vec<(u64, u32)> = rows.into_iter().map(|r| (4, r)).collect();
    let b = gather(&[&seg], &rows, &["tag".into(), "id".into()]).expect("gather");
    let tags = b
        .column(0)
        .as_any()
        .downcast_ref::<StringArray>()
        .expect("tags");
    assert_eq!(
        tags.iter().collect::<Vec<_>>(),
        vec![Some("odd"), Some("odd"), Some("even")]
    );
    assert!(matches!(
        gather(&[&seg], &rows, &["nope".into()]),
        Err(QueryError::InvalidArgument(_))
    ));
}

/// The ids and tags of a query's rows, in order.
fn ids_and_tags(b: &RecordBatch) -> Vec<(i64, Option<String>)> {
    let ids = b.column_by_name("id").expect("id");
    let ids = ids.as_any().downcast_ref::<Int64Array>().expect("ids");
    let tags = b.column_by_name("tag").expect("tag");
    let tags = tags.as_any().downcast_ref::<StringArray>().expect("tags");
    ids.values()
        .iter()
        .zip(tags.iter())
        .map(|(i, t)| (*i, t.map(str::to_owned)))
        .collect()
}

#[test]
fn a_query_in_key_order_returns_the_smallest_keys_across_segments() {
    let s = schema();
    let mut rng = StdRng::seed_from_u64(5);
    let (mut a, mut b) = (Segment::new(1, "p", "id"), Segment::new(2, "p", "id"));
    a.append(batch(&s, &[9, 4, 7, 1], 10, &mut rng).0, &Deletes::new())
        .expect("append");
    b.append(batch(&s, &[8, 2, 6, 3], 20, &mut rng).0, &Deletes::new())
        .expect("append");
    let fields = ["id".to_owned(), "tag".to_owned()];
    let shape = QueryShape {
        limit: 4,
        by_key: true,
    };
    let (rows, more) = query(&[&a, &b], None, &fields, "id", shape).expect("query");
    let got: Vec<i64> = ids_and_tags(&rows.expect("rows"))
        .iter()
        .map(|r| r.0)
        .collect();
    assert_eq!(got, vec![1, 2, 3, 4]);
    assert!(more, "four more rows matched");
    // Unordered, the first found are returned and the search stops early.
    let shape = QueryShape {
        limit: 2,
        by_key: false,
    };
    let (rows, _) = query(&[&a, &b], None, &fields, "id", shape).expect("query");
    let got: Vec<i64> = ids_and_tags(&rows.expect("rows"))
        .iter()
        .map(|r| r.0)
        .collect();
    assert_eq!(got, vec![9, 4]);
}

#[test]
fn of_rows_sharing_a_key_only_the_last_written_is_returned_and_the_tick_column_is_not() {
    let s = schema();
    let mut rng = StdRng::seed_from_u64(6);
    let (mut old, mut new) = (Segment::new(1, "p", "id"), Segment::new(2, "p", "id"));
    old.append(batch(&s, &[5, 3, 1], 10, &mut rng).0, &Deletes::new())
        .expect("append");
    // Key 3 written again later, key 1 twice in one batch (same tick: the later row wins).
    let (mut again, _) = batch(&s, &[3, 1, 1], 20, &mut rng);
    let tag = arrow_array::StringArray::from(vec![Some("new3"), Some("first1"), Some("last1")]);
    let at = again.schema().index_of("tag").expect("tag");
    let mut cols = again.columns().to_vec();
    cols[at] = std::sync::Arc::new(tag);
    again = RecordBatch::try_new(again.schema(), cols).expect("batch");
    new.append(again, &Deletes::new()).expect("append");
    let fields = [
        "id".to_owned(),
        "tag".to_owned(),
        walden_segment_format::TICK_COLUMN.to_owned(),
    ];
    let all = QueryShape {
        limit: 100,
        by_key: true,
    };
    // The newer segment's part first: order of parts does not decide, ticks do.
    let (n, _) = query(&[&new], None, &fields, "id", all).expect("query");
    let (o, _) = query(&[&old], None, &fields, "id", all).expect("query");
    let parts = [n.expect("new"), o.expect("old")];
    let (rows, more) = latest(&parts, "id", all).expect("latest");
    let rows = rows.expect("rows");
    assert!(
        rows.column_by_name(walden_segment_format::TICK_COLUMN)
            .is_none()
    );
    assert_eq!(
        ids_and_tags(&rows),
        vec![
            (1, Some("last1".to_owned())),
            (3, Some("new3".to_owned())),
            (5, Some("odd".to_owned())),
        ]
    );
    assert!(!more);
    let two = QueryShape {
        limit: 2,
        by_key: true,
    };
    let (rows, more) = latest(&parts, "id", two).expect("latest");
    assert_eq!(rows.expect("rows").num_rows(), 2);
    assert!(more, "a third key was dropped by the limit");
}

#[test]
fn a_key_found_in_several_parts_is_merged_once_at_its_nearest() {
    let hits = |keys: &[i64], d: &[f32]| Hits {
        keys: keys.iter().map(|k| Pk::Int(*k)).collect(),
        distances: d.to_vec(),
        fields: None,
    };
    // Key 7 in both parts (and twice in the second): it counts once, at 0.1.
    let parts = vec![
        hits(&[7, 1, 2], &[0.1, 0.3, 0.5]),
        hits(&[3, 7, 7], &[0.2, 0.25, 0.4]),
    ];
    let m = merge(parts, 3, Metric::L2).expect("merge");
    assert_eq!(m.keys, vec![Pk::Int(7), Pk::Int(3), Pk::Int(1)]);
    assert_eq!(m.distances, vec![0.1, 0.2, 0.3]);
}

#[test]
fn a_query_of_the_wrong_dimension_is_refused() {
    let s = schema();
    let mut rng = StdRng::seed_from_u64(5);
    let mut seg = Segment::new(1, "_default", "id");
    seg.append(batch(&s, &[1], 10, &mut rng).0, &Deletes::new())
        .expect("append");
    let queries = vec![vec![0.0; 3]];
    let params = SearchParams {
        field: "v",
        queries: &queries,
        k: 1,
        metric: Metric::L2,
        filter: None,
        ef: 0,
    };
    let err = seg
        .search(&params, &mut [TopK::new(1, Metric::L2)])
        .expect_err("dimension");
    assert!(err.to_string().contains("3 dimensions"), "{err}");
}

#[test]
fn merging_keeps_the_nearest_k_with_their_fields() {
    let fields = |names: &[&str]| {
        RecordBatch::try_from_iter(vec![(
            "tag",
            Arc::new(StringArray::from(names.to_vec())) as arrow_array::ArrayRef,
        )])
        .expect("batch")
    };
    let a = Hits {
        keys: vec![Pk::Int(1), Pk::Int(2)],
        distances: vec![0.9, 0.5],
        fields: Some(fields(&["a1", "a2"])),
    };
    let b = Hits {
        keys: vec![Pk::Int(3), Pk::Int(4)],
        distances: vec![0.7, 0.1],
        fields: Some(fields(&["b3", "b4"])),
    };
    let m = merge(vec![a.clone(), b.clone()], 3, Metric::Ip).expect("merge");
    assert_eq!(m.keys, vec![Pk::Int(1), Pk::Int(3), Pk::Int(2)]);
    let tags = m.fields.expect("fields");
    let tags = tags
        .column(0)
        .as_any()
        .downcast_ref::<StringArray>()
        .expect("tags");
    assert_eq!(
        tags.iter().flatten().collect::<Vec<_>>(),
        vec!["a1", "b3", "a2"]
    );
    let l2 = merge(vec![a, b], 2, Metric::L2).expect("merge");
    assert_eq!(l2.keys, vec![Pk::Int(4), Pk::Int(2)]);
}

#[test]
fn a_graph_index_finds_the_nearest_rows_skipping_deleted_and_filtered_ones() {
    let s = Schema::from_json(
        r#"{"fields":[{"name":"id","type":"int64","primary_key":true},
            {"name":"v","type":"float_vector","dim":16},
            {"name":"tag","type":"string","nullable":true}]}"#,
    )
    .expect("schema");
    let mut rng = StdRng::seed_from_u64(11);
    let mut seg = Segment::new(1, "_default", "id");
    let mut all = Vec::new();
    for chunk in 0..4 {
        let ids: Vec<i64> = (chunk * 500..chunk * 500 + 500).collect();
        let json: Vec<serde_json::Value> = ids
            .iter()
            .map(|i| {
                let v: Vec<f32> = (0..16).map(|_| rng.random_range(-1.0..1.0)).collect();
                all.push((*i, v.clone()));
                serde_json::json!({"id": i, "v": v, "tag": if i % 2 == 0 {"even"} else {"odd"}})
            })
            .collect();
        let rows = s.rows_from_json(&json).expect("rows");
        seg.append(
            data_batch(&s, &data_schema(&s), &rows, 10).expect("batch"),
            &Deletes::new(),
        )
        .expect("append");
    }
    for id in (0..2000).filter(|i| i % 5 == 0) {
        seg.delete(&Pk::Int(id), 20);
    }
    let params = walden_schema::HnswParams::default();
    seg.build_index("v", Metric::L2, &params, 2).expect("build");
    assert_eq!(seg.indexed_rows(), 2000);
    let even = Filter::new("tag == 'even'", &s).expect("filter");
    let (mut found, mut wanted) = (0, 0);
    for _ in 0..50 {
        let q: Vec<f32> = (0..16).map(|_| rng.random_range(-1.0..1.0)).collect();
        let mut want: Vec<(f32, i64)> = all
            .iter()
            .filter(|(id, _)| id % 5 != 0 && id % 2 == 0)
            .map(|(id, v)| (Metric::L2.distance(&q, v), *id))
            .collect();
        want.sort_by(|a, b| a.0.total_cmp(&b.0));
        let want: HashSet<i64> = want.iter().take(10).map(|w| w.1).collect();
        let hits = search(&[&seg], &q, 10, Metric::L2, Some(&even));
        let got = ids_of(&[&seg], &hits);
        assert!(
            got.iter().all(|id| id % 5 != 0 && id % 2 == 0),
            "no deleted or filtered row"
        );
        found += got.iter().filter(|id| want.contains(id)).count();
        wanted += want.len();
    }
    let recall = found as f64 / wanted as f64;
    assert!(recall >= 0.95, "recall@10 {recall}");
    // A filter that keeps few rows is searched exactly.
    let few = Filter::new("id < 40", &s).expect("filter");
    let q: Vec<f32> = (0..16).map(|_| 0.0).collect();
    let hits = search(&[&seg], &q, 10, Metric::L2, Some(&few));
    let mut want: Vec<(f32, i64)> = all
        .iter()
        .filter(|(id, _)| *id < 40 && id % 5 != 0)
        .map(|(id, v)| (Metric::L2.distance(&q, v), *id))
        .collect();
    want.sort_by(|a, b| a.0.total_cmp(&b.0));
    assert_eq!(
        ids_of(&[&seg], &hits),
        want.iter().take(10).map(|w| w.1).collect::<Vec<_>>()
    );
}

#[test]
fn a_growing_segments_interim_index_covers_full_chunks_and_the_tail_is_searched_exactly() {
    let s = Schema::from_json(
        r#"{"fields":[{"name":"id","type":"int64","primary_key":true},
            {"name":"v","type":"float_vector","dim":16},
            {"name":"tag","type":"string","nullable":true}]}"#,
    )
    .expect("schema");
    let mut rng = StdRng::seed_from_u64(12);
    let mut seg = Segment::new(1, "_default", "id");
    let params = walden_schema::HnswParams::default();
    let mut all: Vec<(i64, Vec<f32>)> = Vec::new();
    let mut jobs = 0;
    for chunk in 0..9 {
        let ids: Vec<i64> = (chunk * 300..chunk * 300 + 300).collect();
        let json: Vec<serde_json::Value> = ids
            .iter()
            .map(|i| {
                let v: Vec<f32> = (0..16).map(|_| rng.random_range(-1.0..1.0)).collect();
                all.push((*i, v.clone()));
                serde_json::json!({"id": i, "v": v, "tag": "t"})
            })
            .collect();
        let rows = s.rows_from_json(&json).expect("rows");
        seg.append(
            data_batch(&s, &data_schema(&s), &rows, 10).expect("batch"),
            &Deletes::new(),
        )
        .expect("append");
        // Chunks of at least 1000 rows go into the graph, as the delegator does.
        if let Some(job) = seg
            .interim_job("v", Metric::L2, &params, 1000)
            .expect("job")
        {
            assert!(
                seg.interim_job("v", Metric::L2, &params, 1000)
                    .expect("job")
                    .is_none(),
                "one job at a time"
            );
            let upto = job.run().expect("add");
            seg.finish_interim(job.ann(), Some(upto));
            jobs += 1;
        }
    }
    // 2700 rows: chunks at 1200 and 2400 rows; the last 300 are searched exactly.
    assert_eq!(jobs, 2);
    assert_eq!(seg.indexed_rows(), 2400);
    for id in (0..2700).filter(|i| i % 7 == 0) {
        seg.delete(&Pk::Int(id), 20);
    }
    let (mut found, mut wanted) = (0, 0);
    for _ in 0..50 {
        let q: Vec<f32> = (0..16).map(|_| rng.random_range(-1.0..1.0)).collect();
        let mut want: Vec<(f32, i64)> = all
            .iter()
            .filter(|(id, _)| id % 7 != 0)
            .map(|(id, v)| (Metric::L2.distance(&q, v), *id))
            .collect();
        want.sort_by(|a, b| a.0.total_cmp(&b.0));
        let want: HashSet<i64> = want.iter().take(10).map(|w| w.1).collect();
        let got = ids_of(&[&seg], &search(&[&seg], &q, 10, Metric::L2, None));
        assert_eq!(got.len(), 10);
        assert_eq!(got.iter().collect::<HashSet<_>>().len(), 10, "no row twice");
        assert!(got.iter().all(|id| id % 7 != 0), "no deleted row");
        found += got.iter().filter(|id| want.contains(id)).count();
        wanted += want.len();
    }
    let recall = found as f64 / wanted as f64;
    assert!(recall >= 0.95, "recall@10 {recall}");
    // A row of the tail (not in the graph) is found as its own nearest neighbour.
    for (id, v) in all.iter().skip(2400).filter(|(id, _)| id % 7 != 0).take(20) {
        let got = ids_of(&[&seg], &search(&[&seg], v, 1, Metric::L2, None));
        assert_eq!(got, vec![*id]);
    }
}
