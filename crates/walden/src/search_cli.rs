//! `walden search`, `walden query`, `walden get` and `walden count`.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail, ensure};
use clap::{Args, ValueEnum};
use serde_json::{Value, json};
use walden_client::{Consistency, QueryOptions, SearchOptions};
use walden_query::Metric;

use crate::{cli::connect, collections_cli::Common};

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ConsistencyArg {
    Strong,
    Bounded,
    Session,
    Eventually,
}

impl From<ConsistencyArg> for Consistency {
    fn from(c: ConsistencyArg) -> Self {
        match c {
            ConsistencyArg::Strong => Self::Strong,
            ConsistencyArg::Bounded => Self::Bounded,
            ConsistencyArg::Session => Self::Session,
            ConsistencyArg::Eventually => Self::Eventually,
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum MetricArg {
    L2,
    Ip,
    Cosine,
}

#[derive(Args, Debug)]
pub struct SearchArgs {
    #[arg(long)]
    collection: String,
    /// One query vector as a JSON array.
    #[arg(
        long,
        conflicts_with = "vectors_file",
        required_unless_present = "vectors_file"
    )]
    vector: Option<String>,
    /// Query vectors: a JSON array of arrays, or a float32/float64 `.npy` file (1-D or 2-D).
    #[arg(long)]
    vectors_file: Option<PathBuf>,
    #[arg(long, default_value_t = 10)]
    top_k: u32,
    /// A boolean expression over scalar fields, applied before the top-k.
    #[arg(long, default_value = "")]
    filter: String,
    /// Fields to return with each hit, comma-separated (`*`: all).
    #[arg(long, value_delimiter = ',')]
    output_fields: Vec<String>,
    #[arg(long, value_enum, default_value = "bounded")]
    consistency: ConsistencyArg,
    /// The vector field (needed when the collection has several).
    #[arg(long, default_value = "")]
    field: String,
    /// The metric [default: the field's index's, else l2].
    #[arg(long, value_enum)]
    metric: Option<MetricArg>,
    /// Only these partitions, comma-separated.
    #[arg(long, value_delimiter = ',')]
    partitions: Vec<String>,
    /// HNSW candidates kept while searching [default: the index's ef].
    #[arg(long, default_value_t = 0)]
    ef: u32,
    #[command(flatten)]
    common: Common,
}

#[derive(Args, Debug)]
pub struct QueryArgs {
    #[arg(long)]
    collection: String,
    /// A boolean expression over scalar fields; empty: every row (up to --limit).
    #[arg(long, default_value = "")]
    filter: String,
    /// Fields to return, comma-separated (`*`: all); the primary key always comes first.
    #[arg(long, value_delimiter = ',')]
    output_fields: Vec<String>,
    /// At most this many rows (0: the server's query.max_rows).
    #[arg(long, default_value_t = 0)]
    limit: u64,
    #[arg(long, value_enum, default_value = "bounded")]
    consistency: ConsistencyArg,
    #[arg(long, value_delimiter = ',')]
    partitions: Vec<String>,
    #[command(flatten)]
    common: Common,
}

#[derive(Args, Debug)]
pub struct GetArgs {
    #[arg(long)]
    collection: String,
    /// Primary keys, as a JSON array (`[1, 2]` or `["a", "b"]`).
    #[arg(long)]
    ids: String,
    #[arg(long, value_delimiter = ',')]
    output_fields: Vec<String>,
    #[arg(long, value_enum, default_value = "bounded")]
    consistency: ConsistencyArg,
    #[command(flatten)]
    common: Common,
}

#[derive(Args, Debug)]
pub struct CountArgs {
    #[arg(long)]
    collection: String,
    #[arg(long, default_value = "")]
    filter: String,
    #[arg(long, value_enum, default_value = "bounded")]
    consistency: ConsistencyArg,
    #[command(flatten)]
    common: Common,
}

fn vectors_of(v: Value) -> anyhow::Result<Vec<Vec<f32>>> {
    let as_vector = |v: &Value| -> anyhow::Result<Vec<f32>> {
        v.as_array()
            .context("a query vector is a JSON array of numbers")?
            .iter()
            .map(|x| {
                x.as_f64()
                    .map(|f| f as f32)
                    .context("a query vector holds numbers only")
            })
            .collect()
    };
    match &v {
        Value::Array(items) if items.first().is_some_and(Value::is_array) => {
            items.iter().map(as_vector).collect()
        }
        Value::Array(_) => Ok(vec![as_vector(&v)?]),
        _ => bail!("query vectors are a JSON array (one vector) or an array of arrays"),
    }
}

/// Reads a `.npy` file of float32 or float64 values, 1-D (one vector) or 2-D (one per row).
fn read_npy(path: &Path) -> anyhow::Result<Vec<Vec<f32>>> {
    let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    ensure!(
        data.starts_with(b"\x93NUMPY") && data.len() >= 10,
        "{} is not a .npy file",
        path.display()
    );
    let (header_len, start) = if data[6] == 1 {
        (u16::from_le_bytes([data[8], data[9]]) as usize, 10)
    } else {
        ensure!(data.len() >= 12, "{}: truncated header", path.display());
        (
            u32::from_le_bytes([data[8], data[9], data[10], data[11]]) as usize,
            12,
        )
    };
    let header = std::str::from_utf8(
        data.get(start..start + header_len)
            .context("truncated .npy header")?,
    )?;
    let descr = header
        .split("'descr':")
        .nth(1)
        .and_then(|s| s.split('\'').nth(1))
        .context(".npy header has no descr")?;
    ensure!(
        !header.contains("'fortran_order': True"),
        "Fortran-ordered .npy files are not supported"
    );
    let shape: Vec<usize> = header
        .split("'shape':")
        .nth(1)
        .and_then(|s| s.split('(').nth(1))
        .and_then(|s| s.split(')').next())
        .context(".npy header has no shape")?
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().context("bad .npy shape"))
        .collect::<Result<_, _>>()?;
    let body = &data[start + header_len..];
    let values: Vec<f32> = match descr {
        "<f4" => body
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        "<f8" => body
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
            .collect(),
        other => bail!(".npy dtype {other} is not float32 or float64"),
    };
    let (rows, dim) = match shape.as_slice() {
        [d] => (1, *d),
        [r, d] => (*r, *d),
        _ => bail!(".npy shape {shape:?} is not 1-D or 2-D"),
    };
    ensure!(
        values.len() == rows * dim && dim > 0,
        ".npy holds {} values for shape {shape:?}",
        values.len()
    );
    Ok(values.chunks_exact(dim).map(<[f32]>::to_vec).collect())
}

pub async fn search(a: SearchArgs) -> anyhow::Result<()> {
    let vectors = match (&a.vector, &a.vectors_file) {
        (Some(v), _) => vectors_of(serde_json::from_str(v).context("--vector is not JSON")?)?,
        (None, Some(p)) if p.extension().is_some_and(|e| e == "npy") => read_npy(p)?,
        (None, Some(p)) => vectors_of(
            serde_json::from_slice(
                &std::fs::read(p).with_context(|| format!("reading {}", p.display()))?,
            )
            .with_context(|| format!("{} is not JSON", p.display()))?,
        )?,
        (None, None) => bail!("give --vector or --vectors-file"),
    };
    let options = SearchOptions {
        field: a.field,
        top_k: a.top_k,
        filter: a.filter,
        output_fields: a.output_fields,
        consistency: a.consistency.into(),
        metric: a.metric.map(|m| match m {
            MetricArg::L2 => Metric::L2,
            MetricArg::Ip => Metric::Ip,
            MetricArg::Cosine => Metric::Cosine,
        }),
        partitions: a.partitions,
        ef: a.ef,
    };
    let client = connect(&a.common.conn).await?;
    let results = client.search(&a.collection, &vectors, &options).await?;
    let as_json: Vec<Value> = results
        .iter()
        .map(|hits| {
            Value::Array(
                hits.iter()
                    .map(|h| json!({"id": h.id, "distance": h.distance, "fields": h.fields}))
                    .collect(),
            )
        })
        .collect();
    if a.common.json {
        println!("{}", json!({ "results": as_json }));
        return Ok(());
    }
    for (q, hits) in results.iter().enumerate() {
        println!("query {q}: {} hits", hits.len());
        for h in hits {
            println!(
                "  {:<24} {:>12.6}  {}",
                h.id.to_string(),
                h.distance,
                Value::Object(h.fields.clone())
            );
        }
    }
    Ok(())
}

fn print_rows(rows: walden_client::QueryRows, json_out: bool) {
    if json_out {
        println!(
            "{}",
            json!({"rows": rows.rows, "truncated": rows.truncated})
        );
    } else {
        for r in &rows.rows {
            println!("{}", Value::Object(r.clone()));
        }
    }
    if rows.truncated {
        eprintln!(
            "note: more rows matched; these are the first {} (raise --limit)",
            rows.rows.len()
        );
    }
}

pub async fn query(a: QueryArgs) -> anyhow::Result<()> {
    let client = connect(&a.common.conn).await?;
    let rows = client
        .query(
            &a.collection,
            &QueryOptions {
                order_by_key: false,
                filter: a.filter,
                output_fields: a.output_fields,
                limit: a.limit,
                consistency: a.consistency.into(),
                partitions: a.partitions,
            },
        )
        .await?;
    print_rows(rows, a.common.json);
    Ok(())
}

pub async fn get(a: GetArgs) -> anyhow::Result<()> {
    let ids: Vec<Value> = match serde_json::from_str(&a.ids).context("--ids is not JSON")? {
        Value::Array(v) => v,
        one => vec![one],
    };
    ensure!(
        ids.iter().all(|v| v.is_i64() || v.is_string()),
        "--ids holds integers or strings"
    );
    let client = connect(&a.common.conn).await?;
    let rows = client
        .get(&a.collection, &ids, &a.output_fields, a.consistency.into())
        .await?;
    print_rows(rows, a.common.json);
    Ok(())
}

pub async fn count(a: CountArgs) -> anyhow::Result<()> {
    let client = connect(&a.common.conn).await?;
    let n = client
        .count(&a.collection, &a.filter, a.consistency.into())
        .await?;
    if a.common.json {
        println!("{}", json!({ "count": n }));
    } else {
        println!("{n}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_files_of_float32_and_float64_read_as_vectors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let write = |name: &str, descr: &str, shape: &str, body: Vec<u8>| {
            let mut header =
                format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
            while (10 + header.len() + 1) % 64 != 0 {
                header.push(' ');
            }
            header.push('\n');
            let mut out = b"\x93NUMPY\x01\x00".to_vec();
            out.extend((header.len() as u16).to_le_bytes());
            out.extend(header.as_bytes());
            out.extend(body);
            let p = dir.path().join(name);
            std::fs::write(&p, out).expect("write");
            p
        };
        let f4: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let p = write("a.npy", "<f4", "(2, 2)", f4);
        assert_eq!(
            read_npy(&p).expect("read"),
            vec![vec![1.0, 2.0], vec![3.0, 4.0]]
        );
        let f8: Vec<u8> = [0.5f64, -1.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let p = write("b.npy", "<f8", "(2,)", f8);
        assert_eq!(read_npy(&p).expect("read"), vec![vec![0.5, -1.0]]);
        let p = write("c.npy", "<i4", "(1,)", vec![0; 4]);
        assert!(read_npy(&p).is_err());
    }

    #[test]
    fn vectors_are_one_array_or_an_array_of_arrays() {
        assert_eq!(
            vectors_of(json!([1, 2.5])).expect("one"),
            vec![vec![1.0, 2.5]]
        );
        assert_eq!(
            vectors_of(json!([[1], [2]])).expect("two"),
            vec![vec![1.0], vec![2.0]]
        );
        assert!(vectors_of(json!({"a": 1})).is_err());
        assert!(vectors_of(json!(["x"])).is_err());
    }
}
