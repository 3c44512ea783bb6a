//! Reads over a set of segments: what a delegator runs over what it holds, and a query node
//! over the segments a delegator names.

use arrow_array::RecordBatch;
use walden_expr::Filter;
use walden_segment_format::{Pk, TICK_COLUMN, keys_of};

use crate::{Hits, QueryError, SearchParams, Segment, TopK, gather};

/// The `k` nearest live rows per query vector over `segments`, with `output_fields` (the
/// primary key `pk` first).
pub fn search(
    segments: &[&Segment],
    params: &SearchParams<'_>,
    output_fields: &[String],
    pk: &str,
) -> Result<Vec<Hits>, QueryError> {
    let mut tops: Vec<TopK> = params
        .queries
        .iter()
        .map(|_| TopK::new(params.k, params.metric))
        .collect();
    for s in segments {
        s.search(params, &mut tops)?;
    }
    let mut out = Vec::with_capacity(tops.len());
    for top in tops {
        let hits = top.into_sorted();
        let rows: Vec<(u64, u32)> = hits.iter().map(|h| (h.segment, h.row)).collect();
        let fields = gather(segments, &rows, output_fields)?;
        out.push(Hits {
            keys: keys(&fields, pk)?,
            distances: hits.iter().map(|h| h.distance).collect(),
            fields: Some(fields).filter(|f| f.num_columns() > 0),
        });
    }
    Ok(out)
}

/// Which matching rows a query returns.
#[derive(Clone, Copy, Debug)]
pub struct QueryShape {
    /// At most this many.
    pub limit: usize,
    /// The `limit` smallest primary keys, in key order (what cursor paging needs: a query
    /// iterator asks for keys above the last it saw); otherwise the first found, unordered.
    pub by_key: bool,
}

/// The live rows of `segments` matching `filter` (the output fields), as `shape` says; and
/// whether more matched. `output_fields` may name [`TICK_COLUMN`] for [`latest`] to use.
pub fn query(
    segments: &[&Segment],
    filter: Option<&Filter>,
    output_fields: &[String],
    pk: &str,
    shape: QueryShape,
) -> Result<(Option<RecordBatch>, bool), QueryError> {
    let limit = shape.limit;
    let mut rows = Vec::new();
    let mut more = false;
    for s in segments {
        if shape.by_key {
            rows.extend(
                s.matching(filter, usize::MAX)?
                    .into_iter()
                    .map(|r| (s.id(), r)),
            );
            continue;
        }
        let left = limit.saturating_sub(rows.len());
        let found = s.matching(filter, left + 1)?;
        more |= found.len() > left;
        rows.extend(found.into_iter().take(left).map(|r| (s.id(), r)));
    }
    if shape.by_key && !rows.is_empty() {
        // Keys first, then only the rows kept: a page never copies what it drops.
        let keys = keys_of(&gather(segments, &rows, &[pk.to_owned()])?, pk)
            .map_err(|e| QueryError::Data(e.to_string()))?;
        let mut order: Vec<usize> = (0..rows.len()).collect();
        order.sort_by(|a, b| keys[*a].cmp(&keys[*b]));
        more = order.len() > limit;
        rows = order.into_iter().take(limit).map(|i| rows[i]).collect();
    }
    if rows.is_empty() {
        return Ok((None, more));
    }
    Ok((Some(gather(segments, &rows, output_fields)?), more))
}

/// Milvus's reduce of query results: of the rows sharing a primary key, only the one written
/// last (highest [`TICK_COLUMN`], then the later in `parts`) is kept, then `shape` applies.
/// The tick column is dropped from what is returned; `true` when rows beyond the limit were
/// dropped.
pub fn latest(
    parts: &[RecordBatch],
    pk: &str,
    shape: QueryShape,
) -> Result<(Option<RecordBatch>, bool), QueryError> {
    let Some(first) = parts.first() else {
        return Ok((None, false));
    };
    let data = |e: &dyn std::fmt::Display| QueryError::Data(format!("reducing query rows: {e}"));
    let all = arrow_select::concat::concat_batches(&first.schema(), parts).map_err(|e| data(&e))?;
    let keys = keys_of(&all, pk).map_err(|e| data(&e))?;
    let ticks = walden_segment_format::ticks_of(&all, TICK_COLUMN).map_err(|e| data(&e))?;
    let mut newest: std::collections::HashMap<&Pk, usize> = std::collections::HashMap::new();
    for (i, k) in keys.iter().enumerate() {
        let slot = newest.entry(k).or_insert(i);
        if ticks.value(i) >= ticks.value(*slot) {
            *slot = i;
        }
    }
    let mut kept: Vec<usize> = newest.into_values().collect();
    if shape.by_key {
        kept.sort_by(|a, b| keys[*a].cmp(&keys[*b]));
    } else {
        kept.sort_unstable();
    }
    let more = kept.len() > shape.limit;
    kept.truncate(shape.limit);
    let take = arrow_array::UInt32Array::from_iter_values(kept.iter().map(|i| *i as u32));
    let mut columns = Vec::new();
    let mut fields = Vec::new();
    for (f, c) in all.schema().fields().iter().zip(all.columns()) {
        if f.name() == TICK_COLUMN {
            continue;
        }
        fields.push(f.clone());
        columns.push(arrow_select::take::take(c, &take, None).map_err(|e| data(&e))?);
    }
    let schema = std::sync::Arc::new(arrow_schema::Schema::new(fields));
    let out = RecordBatch::try_new(schema, columns).map_err(|e| data(&e))?;
    Ok(((out.num_rows() > 0).then_some(out), more))
}

/// How many live rows of `segments` match `filter`.
pub fn count(segments: &[&Segment], filter: Option<&Filter>) -> Result<u64, QueryError> {
    let mut n = 0;
    for s in segments {
        n += s.count(filter)?;
    }
    Ok(n)
}

fn keys(fields: &RecordBatch, pk: &str) -> Result<Vec<Pk>, QueryError> {
    if fields.num_rows() == 0 {
        return Ok(Vec::new());
    }
    keys_of(fields, pk).map_err(|e| QueryError::Data(e.to_string()))
}
