//! Compaction: merging a vchannel's small flushed segments and applying its delete logs,
//! by writing new files and swapping them into the manifest in one commit (never rewriting a
//! file). [`plan`] decides what to merge and which delete logs can go; it is pure.

use std::collections::BTreeMap;

use tracing::info;
use walden_proto::v1::{FlushedSegment, RetiredSegment, SegmentState, VChannelManifest};

use crate::{
    FlushError,
    config::CompactionConfig,
    files, manifest,
    pchannel::{Flusher, read_files, vchannel_prefix, write_data_files},
};
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Segments to rewrite, by id.
    pub inputs: Vec<u64>,
    /// Delete logs to drop once applied, by id.
    pub drop_deltas: Vec<u64>,
}

/// `pending_min_tick`: the lowest row tick of segments the flusher still holds (rows
/// that a delete log may yet remove once they are flushed).
pub fn plan(m: &VChannelManifest, c: &CompactionConfig, pending_min_tick: u64) -> Option<Plan> {
    let mut inputs: Vec<u64> = Vec::new();
    // Small segments of one partition.
    let mut by_partition: std::collections::BTreeMap<&str, Vec<&walden_proto::v1::FlushedSegment>> =
        Default::default();
    for s in &m.segments {
        if s.rows < c.small_rows {
            by_partition
                .entry(s.partition.as_str())
                .or_default()
                .push(s);
        }
    }
    if let Some(small) = by_partition.values().find(|v| v.len() >= c.min_segments) {
        let mut rows = 0;
        for s in small {
            if rows + s.rows > c.max_input_rows && !inputs.is_empty() {
                break;
            }
            rows += s.rows;
            inputs.push(s.segment_id);
        }
    }
    // Too many delete logs: rewrite every segment one of them may touch.
    if m.deltas.len() >= c.max_delete_logs {
        let max = m.deltas.iter().map(|d| d.max_tick).max().unwrap_or(0);
        let mut rows: u64 = m
            .segments
            .iter()
            .filter(|s| inputs.contains(&s.segment_id))
            .map(|s| s.rows)
            .sum();
        for s in &m.segments {
            if s.min_tick < max && !inputs.contains(&s.segment_id) {
                if rows + s.rows > c.max_input_rows && !inputs.is_empty() {
                    break;
                }
                rows += s.rows;
                inputs.push(s.segment_id);
            }
        }
    }
    // A delete log goes once every segment it may touch is rewritten with it and no
    // held segment has rows older than it.
    let drop_deltas: Vec<u64> = m
        .deltas
        .iter()
        .filter(|d| {
            d.max_tick < pending_min_tick
                && m.segments
                    .iter()
                    .filter(|s| s.min_tick < d.max_tick)
                    .all(|s| inputs.contains(&s.segment_id))
        })
        .map(|d| d.id)
        .collect();
    if inputs.is_empty() && drop_deltas.is_empty() {
        return None;
    }
    Some(Plan {
        inputs,
        drop_deltas,
    })
}

impl Flusher {
    /// Compacts `vchannel` if its manifest calls for it: writes the merged segments (deletes
    /// applied) as new files, then swaps them into the manifest in one commit. The old files
    /// are left to [`Flusher::collect_garbage`], after the grace period.
    pub(crate) async fn compact(&mut self, vchannel: &str) -> Result<bool, FlushError> {
        let Some(v) = self.vchannels.get(vchannel) else {
            return Ok(false);
        };
        if v.dropped() {
            return Ok(false);
        }
        let pending_min = v
            .pending
            .values()
            .filter(|p| p.rows > 0)
            .map(|p| p.min_tick)
            .min()
            .unwrap_or(u64::MAX);
        let Some(plan) = plan(&v.stored.manifest, &self.ctx.config.compaction, pending_min) else {
            return Ok(false);
        };
        let ctx = self.ctx.clone();
        let _busy = crate::metrics::InProgress::new(&ctx.metrics.compactions_in_progress);
        let blobs = ctx.blobs.as_ref();
        let m = v.stored.manifest.clone();
        let mut deletes = files::Deletes::new();
        for d in &m.deltas {
            if let Some(f) = &d.file {
                files::read_deletes(blobs.get(&f.key).await?, &mut deletes)?;
            }
        }
        let prefix = vchannel_prefix(m.collection_id, vchannel);
        let mut partitions: BTreeMap<String, Vec<&FlushedSegment>> = BTreeMap::new();
        for s in m
            .segments
            .iter()
            .filter(|s| plan.inputs.contains(&s.segment_id))
        {
            partitions.entry(s.partition.clone()).or_default().push(s);
        }
        let mut outputs = Vec::new();
        for (partition, inputs) in partitions {
            let (mut kept, mut removed) = (Vec::new(), 0u64);
            for s in &inputs {
                for b in read_files(blobs, &s.files).await? {
                    let (b, r) = files::apply_deletes(&b, &v.pk, &deletes)?;
                    removed += r;
                    if b.num_rows() > 0 {
                        kept.push(b);
                    }
                }
            }
            let id = self.ch.fresh_tick().await.map_err(FlushError::from)?.0;
            let rows: u64 = kept.iter().map(|b| b.num_rows() as u64).sum();
            let (mut min_tick, mut max_tick) = (u64::MAX, 0);
            for b in &kept {
                for t in files::ticks_of(b, files::TICK_COLUMN)?.values() {
                    min_tick = min_tick.min(*t);
                    max_tick = max_tick.max(*t);
                }
            }
            let segment_files = write_data_files(
                blobs,
                &format!("{prefix}{id:020}/"),
                &v.data_schema,
                kept,
                ctx.config.max_file_bytes,
            )
            .await?;
            ctx.metrics.compacted_rows.inc_by(rows);
            outputs.push(FlushedSegment {
                segment_id: id,
                partition,
                state: SegmentState::Compacted as i32,
                rows,
                deleted_rows: removed + inputs.iter().map(|s| s.deleted_rows).sum::<u64>(),
                files: segment_files,
                min_tick: if rows == 0 { 0 } else { min_tick },
                max_tick,
                compacted_from: inputs.iter().map(|s| s.segment_id).collect(),
                create_id: 0,
            });
        }
        let mut next = m.clone();
        for s in next
            .segments
            .iter()
            .filter(|s| plan.inputs.contains(&s.segment_id))
        {
            next.retired.push(RetiredSegment {
                segment_id: s.segment_id,
                create_id: s.create_id,
            });
        }
        next.segments
            .retain(|s| !plan.inputs.contains(&s.segment_id));
        // A merge that deleted every row leaves no segment.
        next.segments
            .extend(outputs.into_iter().filter(|s| s.rows > 0));
        next.deltas.retain(|d| !plan.drop_deltas.contains(&d.id));
        let pchannel = self.ch.name().to_owned();
        let term = self.ch.term().0;
        let v = self
            .vchannels
            .get_mut(vchannel)
            .ok_or_else(|| FlushError::NotServed(vchannel.to_owned()))?;
        manifest::commit(ctx.meta.as_ref(), &pchannel, term, &mut v.stored, next).await?;
        info!(
            %vchannel,
            merged = plan.inputs.len(),
            delete_logs_dropped = plan.drop_deltas.len(),
            "compacted"
        );
        self.publish(vchannel);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::plan;
    use crate::config::CompactionConfig;
    use walden_proto::v1::{DeltaLog, FlushedSegment, VChannelManifest};

    fn seg(id: u64, rows: u64, min_tick: u64) -> FlushedSegment {
        FlushedSegment {
            segment_id: id,
            partition: "_default".into(),
            rows,
            min_tick,
            max_tick: min_tick + 1,
            ..Default::default()
        }
    }

    #[test]
    fn small_segments_of_a_partition_are_merged_once_there_are_enough() {
        let c = CompactionConfig::default();
        let mut m = VChannelManifest {
            segments: (1..=3).map(|i| seg(i, 10, i * 10)).collect(),
            ..Default::default()
        };
        assert_eq!(plan(&m, &c, u64::MAX), None);
        m.segments.push(seg(4, 10, 40));
        m.segments.push(seg(5, 1_000_000, 50));
        let p = plan(&m, &c, u64::MAX).expect("a plan");
        assert_eq!(p.inputs, vec![1, 2, 3, 4]);
    }

    #[test]
    fn a_delete_log_is_dropped_only_when_everything_it_may_touch_is_rewritten() {
        let c = CompactionConfig {
            max_delete_logs: 2,
            ..Default::default()
        };
        let delta = |id, max_tick| DeltaLog {
            id,
            max_tick,
            min_tick: max_tick,
            file: None,
        };
        let m = VChannelManifest {
            segments: vec![seg(1, 1_000_000, 10), seg(2, 1_000_000, 100)],
            deltas: vec![delta(7, 50), delta(8, 60)],
            ..Default::default()
        };
        let p = plan(&m, &c, u64::MAX).expect("a plan");
        // Segment 2's rows are all newer than every delete: untouched.
        assert_eq!(p.inputs, vec![1]);
        assert_eq!(p.drop_deltas, vec![7, 8]);
        // A held segment with rows older than a delete keeps that delete log.
        let p = plan(&m, &c, 55).expect("a plan");
        assert_eq!(p.drop_deltas, vec![7]);
    }
}
