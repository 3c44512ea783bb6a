//! `walden_search_rows_scored_total{path}` and `walden_search_graph_walks_total` on `/metrics`:
//! the process's search counts ([`walden_query::stats`]), read at each scrape. A search served
//! by an HNSW graph scores a few rows per segment (`path="graph"`); exact search scores every
//! candidate row (`path="exact"`).

use prometheus::{
    IntCounter, IntCounterVec, Opts, Registry,
    core::{Collector, Desc},
    proto::MetricFamily,
};

struct SearchCounters {
    scored: IntCounterVec,
    walks: IntCounter,
}

impl Collector for SearchCounters {
    fn desc(&self) -> Vec<&Desc> {
        let mut d = self.scored.desc();
        d.extend(self.walks.desc());
        d
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let s = walden_query::stats::snapshot();
        for (path, n) in [("exact", s.exact_rows), ("graph", s.graph_rows)] {
            let c = self.scored.with_label_values(&[path]);
            c.reset();
            c.inc_by(n);
        }
        self.walks.reset();
        self.walks.inc_by(s.graph_walks);
        let mut out = self.scored.collect();
        out.extend(self.walks.collect());
        out
    }
}

/// Adds the search counters to `registry`.
pub fn register(registry: &Registry) {
    let scored = IntCounterVec::new(
        Opts::new(
            "search_rows_scored_total",
            "Rows whose distance a search computed, per query vector: every candidate in exact \
             search, the hits of a graph walk",
        ),
        &["path"],
    )
    .expect("valid metric");
    let walks = IntCounter::new(
        "search_graph_walks_total",
        "HNSW graph walks (one per query vector per indexed segment)",
    )
    .expect("valid metric");
    // A fixed name, registered once per process: it cannot collide.
    let _ = registry.register(Box::new(SearchCounters { scored, walks }));
}
