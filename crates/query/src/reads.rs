//! Reads over a set of segments: what a delegator runs over what it holds, and a query node
//! over the segments a delegator names.

use arrow_array::RecordBatch;
use walden_expr::Filter;
use walden_segment_format::{Pk, keys_of};

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

/// The live rows of `segments` matching `filter` (the output fields), at most `limit`; and
/// whether more matched.
pub fn query(
    segments: &[&Segment],
    filter: Option<&Filter>,
    output_fields: &[String],
    limit: usize,
) -> Result<(Option<RecordBatch>, bool), QueryError> {
    let mut rows = Vec::new();
    let mut more = false;
    for s in segments {
        let left = limit.saturating_sub(rows.len());
        let found = s.matching(filter, left + 1)?;
        more |= found.len() > left;
        rows.extend(found.into_iter().take(left).map(|r| (s.id(), r)));
    }
    if rows.is_empty() {
        return Ok((None, more));
    }
    Ok((Some(gather(segments, &rows, output_fields)?), more))
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
