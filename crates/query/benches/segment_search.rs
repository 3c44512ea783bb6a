//! `cargo bench -p walden-query`: one segment's search, exact and through its HNSW graph, over
//! 25 000 x 128 clustered rows (a shard of `walden bench search`), beside the machine's own
//! limit: the same distances computed in one tight loop over one contiguous array.

use std::time::Instant;

use rand::{Rng, SeedableRng, rngs::StdRng};
use walden_query::{Metric, SearchParams, Segment, TopK};
use walden_schema::{HnswParams, Schema};
use walden_segment_format::{Deletes, data_batch, data_schema};

const ROWS: usize = 25_000;
const DIM: usize = 128;
const BATCH: usize = 500;

fn main() {
    let schema = Schema::from_json(&format!(
        r#"{{"fields":[{{"name":"id","type":"int64","primary_key":true}},
            {{"name":"v","type":"float_vector","dim":{DIM}}}]}}"#
    ))
    .expect("schema");
    let mut rng = StdRng::seed_from_u64(1);
    let centres: Vec<Vec<f32>> = (0..100)
        .map(|_| (0..DIM).map(|_| rng.random_range(-1.0f32..1.0)).collect())
        .collect();
    let near = |rng: &mut StdRng| -> Vec<f32> {
        let c = &centres[rng.random_range(0..centres.len())];
        c.iter()
            .map(|x| x + rng.random_range(-0.1f32..0.1))
            .collect()
    };
    let mut seg = Segment::new(1, "_default", "id");
    let mut flat = Vec::with_capacity(ROWS * DIM);
    for lo in (0..ROWS).step_by(BATCH) {
        let rows: Vec<serde_json::Value> = (lo..lo + BATCH)
            .map(|i| {
                let v = near(&mut rng);
                flat.extend_from_slice(&v);
                serde_json::json!({"id": i, "v": v})
            })
            .collect();
        let b = schema.rows_from_json(&rows).expect("rows");
        seg.append(
            data_batch(&schema, &data_schema(&schema), &b, 1).expect("batch"),
            &Deletes::new(),
        )
        .expect("append");
    }
    let queries: Vec<Vec<f32>> = (0..200).map(|_| near(&mut rng)).collect();
    let run = |seg: &Segment, label: &str| {
        let mut lat = Vec::new();
        for q in &queries {
            let qs = vec![q.clone()];
            let params = SearchParams {
                field: "v",
                queries: &qs,
                k: 10,
                metric: Metric::L2,
                filter: None,
                ef: 32,
            };
            let t = Instant::now();
            let mut tops = vec![TopK::new(10, Metric::L2)];
            seg.search(&params, &mut tops).expect("search");
            lat.push(t.elapsed().as_secs_f64() * 1e3);
        }
        lat.sort_by(f64::total_cmp);
        println!(
            "{label:<28} p50 {:>8.3} ms  p99 {:>8.3} ms",
            lat[lat.len() / 2],
            lat[lat.len() * 99 / 100]
        );
    };
    // The limit: distances only, one contiguous array, no mask, no heap.
    let mut lat = Vec::new();
    let mut sink = 0.0f32;
    for q in &queries {
        let t = Instant::now();
        for v in flat.chunks_exact(DIM) {
            sink += Metric::L2.distance(q, v);
        }
        lat.push(t.elapsed().as_secs_f64() * 1e3);
    }
    lat.sort_by(f64::total_cmp);
    println!(
        "{:<28} p50 {:>8.3} ms  (checksum {sink:.0})",
        "limit: distances only",
        lat[lat.len() / 2]
    );
    run(&seg, "exact, 25 000 x 128");
    let t = Instant::now();
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    seg.build_index("v", Metric::L2, &HnswParams::default(), threads)
        .expect("build");
    println!(
        "hnsw build (m 16, ef_c 128)  {:>8.2} s on {threads} threads",
        t.elapsed().as_secs_f64()
    );
    run(&seg, "hnsw, ef 32");
}
