//! Merging the top-k of several shards (or nodes) into one.

use arrow_array::{Array, RecordBatch};
use walden_segment_format::Pk;

use crate::{Metric, QueryError};

/// One query vector's hits from one source, nearest first.
#[derive(Clone, Debug, Default)]
pub struct Hits {
    pub keys: Vec<Pk>,
    pub distances: Vec<f32>,
    /// The output fields of each hit, in hit order (`None` when none were asked).
    pub fields: Option<RecordBatch>,
}

impl Hits {
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// The `k` nearest of `parts` (each one query vector's hits from one source), nearest first.
/// Ties keep the order of `parts`, so merging is deterministic. A primary key found more than
/// once (rows sharing a key: an insert that repeated it) is kept once, at its nearest, as
/// Milvus's reduce keeps it.
pub fn merge(parts: Vec<Hits>, k: usize, metric: Metric) -> Result<Hits, QueryError> {
    let mut all: Vec<(f32, usize, usize)> = parts
        .iter()
        .enumerate()
        .flat_map(|(p, h)| {
            h.distances
                .iter()
                .enumerate()
                .map(move |(i, d)| (metric.key(*d), p, i))
        })
        .collect();
    all.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    let mut seen = std::collections::HashSet::with_capacity(k);
    all.retain(|(_, p, i)| seen.len() < k && seen.insert(&parts[*p].keys[*i]));
    let mut out = Hits {
        keys: all
            .iter()
            .map(|(_, p, i)| parts[*p].keys[*i].clone())
            .collect(),
        distances: all
            .iter()
            .map(|(_, p, i)| parts[*p].distances[*i])
            .collect(),
        fields: None,
    };
    let with_fields: Vec<(usize, &RecordBatch)> = parts
        .iter()
        .enumerate()
        .filter_map(|(p, h)| h.fields.as_ref().map(|f| (p, f)))
        .collect();
    if let Some((_, first)) = with_fields.first() {
        let slot = |p: usize| with_fields.iter().position(|(q, _)| *q == p);
        let picks = all
            .iter()
            .map(|(_, p, i)| {
                slot(*p).map(|s| (s, *i)).ok_or_else(|| {
                    QueryError::Data("a part of the merge has no output fields".into())
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut columns = Vec::with_capacity(first.num_columns());
        for c in 0..first.num_columns() {
            let arrays: Vec<&dyn Array> = with_fields
                .iter()
                .map(|(_, b)| b.columns().get(c).map(|a| a.as_ref()))
                .collect::<Option<_>>()
                .ok_or_else(|| QueryError::Data("parts with different output fields".into()))?;
            columns.push(
                arrow_select::interleave::interleave(&arrays, &picks)
                    .map_err(|e| QueryError::Data(format!("merging output fields: {e}")))?,
            );
        }
        out.fields = Some(
            RecordBatch::try_new(first.schema(), columns)
                .map_err(|e| QueryError::Data(format!("merging output fields: {e}")))?,
        );
    }
    Ok(out)
}
