//! Approximate nearest neighbours over a flushed segment: an HNSW graph (usearch), keyed by the
//! segment's row numbers. Deletes and filters are applied inside the graph walk, and a filter
//! that keeps few rows falls back to exact search (a sparse graph walk loses recall).

use usearch::{Index as Usearch, IndexOptions, MetricKind, ScalarKind};
use walden_schema::HnswParams;

use crate::{Metric, QueryError};

/// Below this share of rows passing the filter, search is exact instead.
pub(crate) const EXACT_BELOW: f64 = 0.05;

/// An HNSW graph over one vector field of one segment.
pub struct Ann {
    field: String,
    metric: Metric,
    ef: usize,
    index: Usearch,
}

impl std::fmt::Debug for Ann {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ann")
            .field("field", &self.field)
            .field("metric", &self.metric)
            .field("size", &self.index.size())
            .finish()
    }
}

fn ann_error(what: &str, e: impl std::fmt::Display) -> QueryError {
    QueryError::Data(format!("hnsw {what}: {e}"))
}

fn new_index(metric: Metric, params: &HnswParams, dim: usize) -> Result<Usearch, QueryError> {
    let options = IndexOptions {
        dimensions: dim,
        metric: match metric {
            Metric::L2 => MetricKind::L2sq,
            Metric::Ip => MetricKind::IP,
            Metric::Cosine => MetricKind::Cos,
        },
        quantization: ScalarKind::F32,
        connectivity: params.m,
        expansion_add: params.ef_construction,
        expansion_search: params.ef,
        multi: false,
    };
    Usearch::new(&options).map_err(|e| ann_error("create", e))
}

impl Ann {
    /// An empty graph that rows are added to later: a growing segment's interim index.
    pub fn empty(
        field: &str,
        metric: Metric,
        params: &HnswParams,
        dim: usize,
    ) -> Result<Self, QueryError> {
        Ok(Self {
            field: field.to_owned(),
            metric,
            ef: params.ef,
            index: new_index(metric, params, dim)?,
        })
    }

    /// Makes room for `rows` rows in all, with a search context per core (and one for the
    /// adding thread). Never with an add in flight.
    pub fn reserve(&self, rows: usize) -> Result<(), QueryError> {
        let threads = std::thread::available_parallelism().map_or(1, usize::from) + 1;
        self.index
            .reserve_capacity_and_threads(rows, threads)
            .map_err(|e| ann_error("reserve", e))
    }

    /// Room for this many rows in all.
    pub fn capacity(&self) -> usize {
        self.index.capacity()
    }

    /// Adds `vectors` (row-major, `dim` each) as rows `first`, `first + 1`, ... on this
    /// thread; searches may run meanwhile.
    pub fn add_rows(&self, first: u32, vectors: &[f32], dim: usize) -> Result<(), QueryError> {
        for (i, v) in vectors.chunks_exact(dim.max(1)).enumerate() {
            self.index
                .add(u64::from(first) + i as u64, v)
                .map_err(|e| ann_error("add", e))?;
        }
        Ok(())
    }

    /// Builds the graph of `vectors` (row-major, `dim` each; row `i` gets key `i`) on up to
    /// `threads` threads.
    pub fn build(
        field: &str,
        metric: Metric,
        params: &HnswParams,
        vectors: &[f32],
        dim: usize,
        threads: usize,
    ) -> Result<Self, QueryError> {
        let index = new_index(metric, params, dim)?;
        let rows = vectors.len() / dim.max(1);
        let threads = threads.clamp(1, 16);
        index
            .reserve_capacity_and_threads(rows, threads)
            .map_err(|e| ann_error("reserve", e))?;
        let per = rows.div_ceil(threads).max(1);
        let index_ref = &index;
        let results: Vec<Result<(), QueryError>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|t| {
                    s.spawn(move || {
                        let (lo, hi) = (t * per, ((t + 1) * per).min(rows));
                        for r in lo..hi {
                            index_ref
                                .add(r as u64, &vectors[r * dim..(r + 1) * dim])
                                .map_err(|e| ann_error("add", e))?;
                        }
                        Ok(())
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(QueryError::Data("hnsw build panicked".into())))
                })
                .collect()
        });
        results.into_iter().collect::<Result<Vec<()>, _>>()?;
        Ok(Self {
            field: field.to_owned(),
            metric,
            ef: params.ef,
            index,
        })
    }

    pub fn field(&self) -> &str {
        &self.field
    }

    pub fn metric(&self) -> Metric {
        self.metric
    }

    /// Rows in the graph.
    pub fn len(&self) -> usize {
        self.index.size()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Up to `k` rows near `q` among those `allow` admits (approximate), keeping `ef`
    /// candidates (0: the index's).
    pub fn search(
        &self,
        q: &[f32],
        k: usize,
        ef: usize,
        allow: impl Fn(u32) -> bool,
    ) -> Result<Vec<u32>, QueryError> {
        // A wider beam than k keeps recall at k; usearch reads it per search.
        let ef = if ef == 0 { self.ef } else { ef };
        self.index.change_expansion_search(ef.max(k));
        let m = self
            .index
            .filtered_search(q, k, |key| allow(key as u32))
            .map_err(|e| ann_error("search", e))?;
        Ok(m.keys.into_iter().map(|k| k as u32).collect())
    }
}
