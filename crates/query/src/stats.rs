//! What searches did in this process, for `/metrics`: how many rows were scored one by one
//! (exact search: every candidate row's distance computed), and how many graph walks ran with
//! the hits they returned (each scored exactly once more for the reported distance). A search
//! that uses its HNSW graph scores a few rows per segment; one that does not scores them all.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

static EXACT_ROWS: AtomicU64 = AtomicU64::new(0);
static GRAPH_WALKS: AtomicU64 = AtomicU64::new(0);
static GRAPH_ROWS: AtomicU64 = AtomicU64::new(0);

/// The counts so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SearchCounts {
    /// Rows scored by exact search (per query vector).
    pub exact_rows: u64,
    /// Graph walks (one per query vector per segment with a graph).
    pub graph_walks: u64,
    /// Rows the graph walks returned, scored exactly for their reported distance.
    pub graph_rows: u64,
}

pub fn snapshot() -> SearchCounts {
    SearchCounts {
        exact_rows: EXACT_ROWS.load(Relaxed),
        graph_walks: GRAPH_WALKS.load(Relaxed),
        graph_rows: GRAPH_ROWS.load(Relaxed),
    }
}

pub(crate) fn exact(rows: u64) {
    EXACT_ROWS.fetch_add(rows, Relaxed);
}

pub(crate) fn graph(walks: u64, rows: u64) {
    GRAPH_WALKS.fetch_add(walks, Relaxed);
    GRAPH_ROWS.fetch_add(rows, Relaxed);
}
