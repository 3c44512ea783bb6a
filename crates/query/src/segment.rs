//! A segment's rows in memory: Arrow batches in the data-file shape (the collection's fields,
//! then `$tick`), the primary-key index that deletes go through, and the deleted-row bitmap.
//! Growing segments take batches as they are read from the WAL; sealed ones are built once
//! from their files.

use std::{
    collections::{BinaryHeap, HashMap},
    sync::Arc,
};

use arrow_array::{Array, FixedSizeListArray, Float32Array, RecordBatch};
use walden_expr::Filter;
use walden_segment_format::{Deletes, Pk, TICK_COLUMN, keys_of, ticks_of};

use walden_schema::HnswParams;

use crate::{
    Metric, QueryError,
    ann::{Ann, EXACT_BELOW},
};

/// The rows holding one primary key (almost always one).
#[derive(Clone, Debug)]
enum Rows {
    One(u32),
    Many(Vec<u32>),
}

/// One segment's rows.
#[derive(Debug)]
pub struct Segment {
    id: u64,
    partition: String,
    pk: String,
    batches: Vec<RecordBatch>,
    /// The first row of each batch.
    starts: Vec<u32>,
    ticks: Vec<u64>,
    deleted: Vec<bool>,
    deleted_rows: u32,
    keys: HashMap<Pk, Rows>,
    bytes: usize,
    /// A graph index of one vector field: every row of a flushed segment of an indexed field;
    /// the first `ann_rows` of a growing one (its interim index, rows added in chunks).
    ann: Option<Arc<Ann>>,
    /// Rows searchable through `ann`; later rows are searched exactly.
    ann_rows: u32,
    /// An interim-index job is under way.
    indexing: bool,
}

/// A row of a segment found by a search: its reported distance and where it is.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Hit {
    pub distance: f32,
    /// The segment's id.
    pub segment: u64,
    pub row: u32,
}

/// What a search asks of each segment.
#[derive(Debug)]
pub struct SearchParams<'a> {
    /// The vector field searched.
    pub field: &'a str,
    pub queries: &'a [Vec<f32>],
    pub k: usize,
    pub metric: Metric,
    pub filter: Option<&'a Filter>,
    /// HNSW candidates kept while searching (0: the index's).
    pub ef: usize,
}

/// A candidate in a bounded max-heap on the key (the worst of the best k on top).
#[derive(Clone, Copy, Debug)]
struct Cand {
    key: f32,
    hit: Hit,
}

impl PartialEq for Cand {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == std::cmp::Ordering::Equal
    }
}
impl Eq for Cand {}
impl PartialOrd for Cand {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Cand {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        // Ties break on position, so results do not depend on the order segments are visited.
        self.key
            .total_cmp(&other.key)
            .then(self.hit.segment.cmp(&other.hit.segment))
            .then(self.hit.row.cmp(&other.hit.row))
    }
}

/// Keeps the `k` nearest of what it is offered.
#[derive(Debug)]
pub struct TopK {
    k: usize,
    metric: Metric,
    heap: BinaryHeap<Cand>,
}

impl TopK {
    pub fn new(k: usize, metric: Metric) -> Self {
        Self {
            k,
            metric,
            heap: BinaryHeap::with_capacity(k + 1),
        }
    }

    pub fn offer(&mut self, hit: Hit) {
        if self.k == 0 {
            return;
        }
        let c = Cand {
            key: self.metric.key(hit.distance),
            hit,
        };
        if self.heap.len() < self.k {
            self.heap.push(c);
        } else if self.heap.peek().is_some_and(|worst| c < *worst) {
            self.heap.pop();
            self.heap.push(c);
        }
    }

    /// The hits, nearest first.
    pub fn into_sorted(self) -> Vec<Hit> {
        self.heap
            .into_sorted_vec()
            .into_iter()
            .map(|c| c.hit)
            .collect()
    }
}

fn vectors<'a>(batch: &'a RecordBatch, field: &str) -> Result<(&'a [f32], usize), QueryError> {
    let col = batch
        .column_by_name(field)
        .and_then(|c| c.as_any().downcast_ref::<FixedSizeListArray>())
        .ok_or_else(|| QueryError::InvalidArgument(format!("{field:?} is not a vector field")))?;
    let dim = usize::try_from(col.value_length()).unwrap_or(0);
    let values = col
        .values()
        .as_any()
        .downcast_ref::<Float32Array>()
        .ok_or_else(|| QueryError::Data(format!("{field:?} does not hold float32 vectors")))?;
    let values = values.values().as_ref();
    if values.len() != dim * col.len() {
        return Err(QueryError::Data(format!(
            "{field:?}: {} values for {} vectors of {dim}",
            values.len(),
            col.len()
        )));
    }
    Ok((values, dim))
}

impl Segment {
    pub fn new(id: u64, partition: &str, pk: &str) -> Self {
        Self {
            id,
            partition: partition.to_owned(),
            pk: pk.to_owned(),
            batches: Vec::new(),
            starts: Vec::new(),
            ticks: Vec::new(),
            deleted: Vec::new(),
            deleted_rows: 0,
            keys: HashMap::new(),
            bytes: 0,
            ann: None,
            ann_rows: 0,
            indexing: false,
        }
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn partition(&self) -> &str {
        &self.partition
    }

    pub fn rows(&self) -> u32 {
        self.ticks.len() as u32
    }

    /// The highest tick of its rows (0 when empty).
    pub fn max_tick(&self) -> u64 {
        self.ticks.iter().copied().max().unwrap_or(0)
    }

    /// Rows no delete has removed.
    pub fn live_rows(&self) -> u32 {
        self.rows() - self.deleted_rows
    }

    /// Memory held by the rows' columns.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Adds rows in the data-file shape, removing at once those `deletes` already covers.
    pub fn append(&mut self, batch: RecordBatch, deletes: &Deletes) -> Result<(), QueryError> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let keys = keys_of(&batch, &self.pk).map_err(|e| QueryError::Data(e.to_string()))?;
        let ticks = ticks_of(&batch, TICK_COLUMN).map_err(|e| QueryError::Data(e.to_string()))?;
        let start = self.rows();
        for (i, (key, tick)) in keys.into_iter().zip(ticks.values().iter()).enumerate() {
            let row = start + i as u32;
            let gone = deletes.get(&key).is_some_and(|d| *d > *tick);
            self.deleted.push(gone);
            self.deleted_rows += u32::from(gone);
            self.ticks.push(*tick);
            match self.keys.get_mut(&key) {
                None => {
                    self.keys.insert(key, Rows::One(row));
                }
                Some(Rows::One(r)) => {
                    let first = *r;
                    self.keys.insert(key, Rows::Many(vec![first, row]));
                }
                Some(Rows::Many(v)) => v.push(row),
            }
        }
        self.bytes += batch.get_array_memory_size();
        self.starts.push(start);
        self.batches.push(batch);
        Ok(())
    }

    /// Removes the rows with key `pk` written below `tick`; returns how many it removed.
    pub fn delete(&mut self, pk: &Pk, tick: u64) -> u32 {
        let rows: &[u32] = match self.keys.get(pk) {
            None => return 0,
            Some(Rows::One(r)) => std::slice::from_ref(r),
            Some(Rows::Many(v)) => v,
        };
        let mut n = 0;
        for &r in rows {
            let r = r as usize;
            if !self.deleted[r] && self.ticks[r] < tick {
                self.deleted[r] = true;
                n += 1;
            }
        }
        self.deleted_rows += n;
        n
    }

    /// Applies every delete of `deletes`.
    pub fn apply(&mut self, deletes: &Deletes) -> u32 {
        deletes.iter().map(|(pk, t)| self.delete(pk, *t)).sum()
    }

    /// A bloom filter of its keys.
    pub fn key_filter(&self) -> walden_segment_format::KeyFilter {
        walden_segment_format::KeyFilter::new(self.keys.len(), self.keys.keys())
    }

    /// Whether the segment holds a row with key `pk` (deleted or not).
    pub fn may_contain(&self, pk: &Pk) -> bool {
        self.keys.contains_key(pk)
    }

    /// The live rows of each batch that match `filter`.
    fn live(&self, b: usize, filter: Option<&Filter>) -> Result<Vec<bool>, QueryError> {
        let start = self.starts[b] as usize;
        let n = self.batches[b].num_rows();
        let mut keep: Vec<bool> = self.deleted[start..start + n].iter().map(|d| !d).collect();
        if let Some(f) = filter {
            for (k, m) in keep.iter_mut().zip(f.evaluate(&self.batches[b])?) {
                *k &= m;
            }
        }
        Ok(keep)
    }

    /// Builds an HNSW graph of `field` (replacing any other), on up to `threads` threads.
    pub fn build_index(
        &mut self,
        field: &str,
        metric: Metric,
        params: &HnswParams,
        threads: usize,
    ) -> Result<(), QueryError> {
        let job = self.graph_job(field);
        let rows = job.rows;
        let ann = job.build(metric, params, threads)?;
        self.install_index(ann, rows);
        Ok(())
    }

    /// A copy of every row's vector of `field`, to build a graph of the whole segment off its
    /// lock ([`GraphJob::build`], then [`Segment::install_index`]): the rows and their deletes
    /// stay as they are meanwhile.
    pub fn graph_job(&self, field: &str) -> GraphJob {
        let mut all = Vec::new();
        let mut dim = 0;
        let mut failed = None;
        for batch in &self.batches {
            match vectors(batch, field) {
                Ok((values, d)) => {
                    dim = d;
                    all.extend_from_slice(values);
                }
                Err(e) => failed = Some(e),
            }
        }
        GraphJob {
            field: field.to_owned(),
            vectors: all,
            dim,
            rows: self.rows(),
            failed,
        }
    }

    /// Makes `ann` (a graph of the first `rows` rows, or none) the segment's index.
    pub fn install_index(&mut self, ann: Option<Ann>, rows: u32) {
        self.ann_rows = if ann.is_some() { rows } else { 0 };
        self.ann = ann.map(Arc::new);
    }

    /// Drops the segment's graph: searches are exact.
    pub fn drop_index(&mut self) {
        self.install_index(None, 0);
    }

    /// The next chunk of a growing segment's interim index, once `min_rows` rows are not in
    /// it yet: a graph of `field` is started (or grown) and the chunk's vectors copied, to be
    /// added off the caller's lock ([`IndexJob::run`]), then published with
    /// [`Segment::finish_interim`]. `None` while a job is under way or the chunk is short.
    pub fn interim_job(
        &mut self,
        field: &str,
        metric: Metric,
        params: &HnswParams,
        min_rows: u32,
    ) -> Result<Option<IndexJob>, QueryError> {
        if self.indexing || min_rows == 0 || self.rows() - self.ann_rows < min_rows {
            return Ok(None);
        }
        if self
            .ann
            .as_ref()
            .is_some_and(|a| a.field() != field || a.metric() != metric)
        {
            return Ok(None);
        }
        let first = self.ann_rows;
        let mut chunk = Vec::new();
        let mut dim = 0;
        for (b, batch) in self.batches.iter().enumerate() {
            let start = self.starts[b];
            let n = batch.num_rows() as u32;
            if start + n <= first {
                continue;
            }
            let (values, d) = vectors(batch, field)?;
            dim = d;
            let skip = first.saturating_sub(start) as usize;
            chunk.extend_from_slice(&values[skip * d..]);
        }
        if dim == 0 {
            return Ok(None);
        }
        let ann = match &self.ann {
            Some(a) => a.clone(),
            None => {
                let a = Arc::new(Ann::empty(field, metric, params, dim)?);
                self.ann = Some(a.clone());
                a
            }
        };
        let want = self.rows() as usize;
        if ann.capacity() < want {
            // Doubling keeps reservations (never concurrent with an add) rare.
            ann.reserve(want.next_power_of_two().max(1024))?;
        }
        self.indexing = true;
        Ok(Some(IndexJob {
            ann,
            first,
            vectors: chunk,
            dim,
        }))
    }

    /// Publishes a finished interim job: rows below `upto` are searched through the graph.
    pub fn finish_interim(&mut self, ann: &Arc<Ann>, upto: Option<u32>) {
        if self.ann.as_ref().is_some_and(|a| Arc::ptr_eq(a, ann)) {
            self.indexing = false;
            if let Some(upto) = upto {
                self.ann_rows = self.ann_rows.max(upto);
            }
        }
    }

    /// The field and metric of the segment's graph index, if it has one.
    pub fn index(&self) -> Option<(&str, Metric)> {
        self.ann.as_ref().map(|a| (a.field(), a.metric()))
    }

    /// Rows searched through the graph index (0 without one).
    pub fn indexed_rows(&self) -> usize {
        self.ann_rows as usize
    }

    /// Offers every live row matching the filter to each query's top-k (`tops[i]` for
    /// `params.queries[i]`): filters apply before the top-k is taken. With a graph index of
    /// the field and metric, the graph finds the candidates (filter and deletes applied
    /// during the walk) unless the filter keeps too few rows for a graph walk to find them.
    pub fn search(&self, params: &SearchParams<'_>, tops: &mut [TopK]) -> Result<(), QueryError> {
        if let Some(ann) = &self.ann
            && ann.field() == params.field
            && ann.metric() == params.metric
            && self.ann_rows > 0
        {
            if params.filter.is_none() {
                // Deletes only: the graph walk reads the deleted-row bitmap as it is.
                if self.live_rows() == 0 {
                    return Ok(());
                }
                if f64::from(self.live_rows()) >= EXACT_BELOW * f64::from(self.rows()) {
                    let (deleted, upto) = (&self.deleted, self.ann_rows);
                    self.search_graph(
                        ann,
                        |r| r < upto && deleted.get(r as usize) == Some(&false),
                        params,
                        tops,
                    )?;
                    return self.search_exact(params, tops, upto);
                }
            } else {
                let mut allow = Vec::with_capacity(self.rows() as usize);
                for b in 0..self.batches.len() {
                    allow.extend(self.live(b, params.filter)?);
                }
                let passing = allow.iter().filter(|a| **a).count();
                if passing == 0 {
                    return Ok(());
                }
                if passing as f64 >= EXACT_BELOW * allow.len() as f64 {
                    let upto = self.ann_rows;
                    self.search_graph(
                        ann,
                        |r| r < upto && allow.get(r as usize) == Some(&true),
                        params,
                        tops,
                    )?;
                    return self.search_exact(params, tops, upto);
                }
            }
        }
        self.search_exact(params, tops, 0)
    }

    fn search_graph(
        &self,
        ann: &Ann,
        allow: impl Fn(u32) -> bool + Copy,
        params: &SearchParams<'_>,
        tops: &mut [TopK],
    ) -> Result<(), QueryError> {
        // Each batch's vectors, resolved once per search (not per query or hit).
        let mut slices = Vec::with_capacity(self.batches.len());
        let mut dim = 0;
        for b in &self.batches {
            let (values, d) = vectors(b, params.field)?;
            slices.push(values);
            dim = d;
        }
        for (q, top) in params.queries.iter().zip(tops.iter_mut()) {
            if q.len() != dim {
                return Err(QueryError::InvalidArgument(format!(
                    "a query vector has {} dimensions; {:?} has {dim}",
                    q.len(),
                    params.field
                )));
            }
            let rows = ann.search(q, params.k, params.ef, allow)?;
            crate::stats::graph(1, rows.len() as u64);
            for row in rows {
                let (b, i) = self.locate(row);
                // The reported distance is the exact one, as for growing rows.
                top.offer(Hit {
                    distance: params
                        .metric
                        .distance(q, &slices[b][i * dim..(i + 1) * dim]),
                    segment: self.id,
                    row,
                });
            }
        }
        Ok(())
    }

    /// Exact search over the rows from `from` on (the graph covers those below).
    fn search_exact(
        &self,
        params: &SearchParams<'_>,
        tops: &mut [TopK],
        from: u32,
    ) -> Result<(), QueryError> {
        for (b, batch) in self.batches.iter().enumerate() {
            let start = self.starts[b];
            if start + batch.num_rows() as u32 <= from {
                continue;
            }
            let mut keep = self.live(b, params.filter)?;
            for k in keep.iter_mut().take(from.saturating_sub(start) as usize) {
                *k = false;
            }
            if !keep.iter().any(|k| *k) {
                continue;
            }
            let (values, dim) = vectors(batch, params.field)?;
            let scored = keep.iter().filter(|k| **k).count() as u64;
            crate::stats::exact(scored * params.queries.len() as u64);
            for (q, top) in params.queries.iter().zip(tops.iter_mut()) {
                if q.len() != dim {
                    return Err(QueryError::InvalidArgument(format!(
                        "a query vector has {} dimensions; {:?} has {dim}",
                        q.len(),
                        params.field
                    )));
                }
                for (i, v) in values.chunks_exact(dim).enumerate() {
                    if keep[i] {
                        top.offer(Hit {
                            distance: params.metric.distance(q, v),
                            segment: self.id,
                            row: self.starts[b] + i as u32,
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// The live rows matching `filter`, at most `limit`.
    pub fn matching(&self, filter: Option<&Filter>, limit: usize) -> Result<Vec<u32>, QueryError> {
        let mut out = Vec::new();
        for b in 0..self.batches.len() {
            if out.len() >= limit {
                break;
            }
            let start = self.starts[b];
            for (i, k) in self.live(b, filter)?.into_iter().enumerate() {
                if k {
                    out.push(start + i as u32);
                    if out.len() >= limit {
                        break;
                    }
                }
            }
        }
        Ok(out)
    }

    /// How many live rows match `filter`.
    pub fn count(&self, filter: Option<&Filter>) -> Result<u64, QueryError> {
        if filter.is_none() {
            return Ok(u64::from(self.live_rows()));
        }
        let mut n = 0;
        for b in 0..self.batches.len() {
            n += self.live(b, filter)?.iter().filter(|k| **k).count() as u64;
        }
        Ok(n)
    }

    /// The batch holding `row`, and the row's index in it.
    pub(crate) fn locate(&self, row: u32) -> (usize, usize) {
        let b = self.starts.partition_point(|s| *s <= row) - 1;
        (b, (row - self.starts[b]) as usize)
    }

    pub(crate) fn batches(&self) -> &[RecordBatch] {
        &self.batches
    }
}

/// The vectors of a whole segment, copied to build its graph off the segment's lock.
#[derive(Debug)]
pub struct GraphJob {
    field: String,
    vectors: Vec<f32>,
    dim: usize,
    /// The rows copied: what the graph will cover.
    pub rows: u32,
    failed: Option<QueryError>,
}

impl GraphJob {
    /// Builds the graph on up to `threads` threads (none for a segment without rows).
    pub fn build(
        self,
        metric: Metric,
        params: &HnswParams,
        threads: usize,
    ) -> Result<Option<Ann>, QueryError> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        if self.dim == 0 {
            return Ok(None);
        }
        Ann::build(
            &self.field,
            metric,
            params,
            &self.vectors,
            self.dim,
            threads,
        )
        .map(Some)
    }
}

/// A chunk of rows to add to a growing segment's interim index, off the segment's lock.
#[derive(Debug)]
pub struct IndexJob {
    ann: Arc<Ann>,
    first: u32,
    vectors: Vec<f32>,
    dim: usize,
}

impl IndexJob {
    /// The graph it grows (to name it in [`Segment::finish_interim`]).
    pub fn ann(&self) -> &Arc<Ann> {
        &self.ann
    }

    /// Adds the chunk; returns the row count the graph then covers.
    pub fn run(&self) -> Result<u32, QueryError> {
        self.ann.add_rows(self.first, &self.vectors, self.dim)?;
        Ok(self.first + (self.vectors.len() / self.dim.max(1)) as u32)
    }
}
