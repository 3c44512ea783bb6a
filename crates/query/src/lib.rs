//! The query engine: what a delegator runs over growing segments and a query node over sealed
//! ones.
//!
//! * [`Segment`] holds rows as Arrow batches in the data-file shape of
//!   `walden-segment-format`, with a primary-key index for deletes (a delete `(pk, t)` removes
//!   the key's rows written below `t`, so the latest tick wins).
//! * Search is exact: every live row that passes the filter is scored with a SIMD kernel
//!   ([`Metric`]) and offered to a bounded heap per query ([`TopK`]), so filters apply before
//!   the top-k, never after.
//! * [`gather`] materializes output fields for hits spread over many segments.

mod ann;
mod merge;
mod metric;
mod reads;
mod segment;

use std::{collections::HashMap, sync::Arc};

use arrow_array::{Array, RecordBatch};
use arrow_schema::{Field, Schema as ArrowSchema};
use thiserror::Error;
use walden_common::{ErrorCode, HasErrorCode};
use walden_expr::ExprError;

pub mod stats;

pub use ann::Ann;
pub use merge::{Hits, merge};
pub use metric::Metric;
pub use reads::{QueryShape, count, latest, query, search};
pub use segment::{GraphJob, Hit, IndexJob, SearchParams, Segment, TopK};
pub use walden_segment_format::KeyFilter;

/// Errors of the query engine.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum QueryError {
    /// The request does not fit the collection (dimension, field, filter); not retryable.
    #[error("{0}")]
    InvalidArgument(String),
    /// A filter that cannot be used.
    #[error(transparent)]
    Filter(#[from] ExprError),
    /// Rows that do not have the shape they should; not retryable.
    #[error("unreadable rows: {0}")]
    Data(String),
}

impl HasErrorCode for QueryError {
    fn code(&self) -> ErrorCode {
        match self {
            Self::InvalidArgument(_) | Self::Filter(_) => ErrorCode::InvalidArgument,
            Self::Data(_) => ErrorCode::Corrupted,
        }
    }
}

/// The rows `(segment id, row)` of `segments` as one batch with `fields` (in that order).
pub fn gather(
    segments: &[&Segment],
    rows: &[(u64, u32)],
    fields: &[String],
) -> Result<RecordBatch, QueryError> {
    let by_id: HashMap<u64, &Segment> = segments.iter().map(|s| (s.id(), *s)).collect();
    // Every batch the rows touch, numbered in first-seen order.
    let mut sources: Vec<(u64, usize)> = Vec::new();
    let mut index: HashMap<(u64, usize), usize> = HashMap::new();
    let mut picks = Vec::with_capacity(rows.len());
    for (seg, row) in rows {
        let s = by_id
            .get(seg)
            .ok_or_else(|| QueryError::Data(format!("segment {seg} is not held here")))?;
        let (b, i) = s.locate(*row);
        let n = *index.entry((*seg, b)).or_insert_with(|| {
            sources.push((*seg, b));
            sources.len() - 1
        });
        picks.push((n, i));
    }
    let mut out_fields = Vec::with_capacity(fields.len());
    let mut columns = Vec::with_capacity(fields.len());
    for name in fields {
        let mut arrays: Vec<&dyn Array> = Vec::with_capacity(sources.len());
        let mut field = None;
        for (seg, b) in &sources {
            let batch = &by_id[seg].batches()[*b];
            let (i, f) = batch.schema_ref().column_with_name(name).ok_or_else(|| {
                QueryError::InvalidArgument(format!("no field {name:?} to output"))
            })?;
            field.get_or_insert_with(|| f.clone());
            arrays.push(batch.column(i).as_ref());
        }
        let Some(field) = field else {
            // No rows: the field's type cannot be read from any batch.
            return Ok(RecordBatch::new_empty(Arc::new(ArrowSchema::empty())));
        };
        columns.push(
            arrow_select::interleave::interleave(&arrays, &picks)
                .map_err(|e| QueryError::Data(format!("gathering {name:?}: {e}")))?,
        );
        out_fields.push(Field::clone(&field));
    }
    RecordBatch::try_new(Arc::new(ArrowSchema::new(out_fields)), columns)
        .map_err(|e| QueryError::Data(format!("gathering rows: {e}")))
}

#[cfg(test)]
mod tests;
