//! Id ranges (damaged records, and those an operator chose to skip) and the `SKIPPED` audit
//! file that records each skip.
//!
//! `{pchannel}/SKIPPED` is text, one skip per line, never rewritten but to add a line:
//! `START END UNIX_MS REASON` (ids `START..END`; the reason runs to the end of the line).

use std::{ops::Range, path::Path};

use walden_wal_api::WalError;

use crate::{fs::FileSystem, open::io_err};

/// The audit file of skipped ranges, in a pchannel's directory.
pub const SKIPPED_FILE: &str = "SKIPPED";

/// Disjoint, sorted, merged id ranges.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ranges(Vec<Range<u64>>);

impl Ranges {
    pub fn add(&mut self, r: Range<u64>) {
        if r.is_empty() {
            return;
        }
        self.0.push(r);
        self.0.sort_by_key(|r| r.start);
        let mut merged: Vec<Range<u64>> = Vec::with_capacity(self.0.len());
        for r in self.0.drain(..) {
            match merged.last_mut() {
                Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
                _ => merged.push(r),
            }
        }
        self.0 = merged;
    }

    /// The range holding `id`.
    pub fn containing(&self, id: u64) -> Option<Range<u64>> {
        self.0.iter().find(|r| r.contains(&id)).cloned()
    }

    /// The parts of `r` not in these ranges.
    pub fn subtract(&self, r: Range<u64>) -> Vec<Range<u64>> {
        let mut out = Vec::new();
        let mut at = r.start;
        for s in &self.0 {
            if s.end <= at || s.start >= r.end {
                continue;
            }
            if s.start > at {
                out.push(at..s.start);
            }
            at = at.max(s.end);
        }
        if at < r.end {
            out.push(at..r.end);
        }
        out
    }

    pub fn iter(&self) -> impl Iterator<Item = &Range<u64>> {
        self.0.iter()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// One line of the audit file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SkipRecord {
    pub ids: Range<u64>,
    pub unix_ms: u64,
    pub reason: String,
}

fn parse_line(line: &str) -> Option<SkipRecord> {
    let mut parts = line.splitn(4, ' ');
    let start = parts.next()?.parse().ok()?;
    let end = parts.next()?.parse().ok()?;
    let unix_ms = parts.next()?.parse().ok()?;
    let reason = parts.next().unwrap_or("").to_owned();
    (start < end).then_some(SkipRecord {
        ids: start..end,
        unix_ms,
        reason,
    })
}

/// Every skip recorded for the pchannel in `dir`, in the order written.
pub fn read_skip_records(
    fs: &dyn FileSystem,
    dir: &Path,
    pchannel: &str,
) -> Result<Vec<SkipRecord>, WalError> {
    let Some(b) = fs
        .read_all(&dir.join(SKIPPED_FILE))
        .map_err(io_err(pchannel, "reading SKIPPED"))?
    else {
        return Ok(Vec::new());
    };
    let text = String::from_utf8_lossy(&b);
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            parse_line(l).ok_or_else(|| WalError::Corrupted {
                pchannel: pchannel.to_owned(),
                location: dir.join(SKIPPED_FILE).display().to_string(),
                detail: format!("unreadable line {l:?}"),
            })
        })
        .collect()
}

/// The skipped ranges of the pchannel in `dir`.
pub(crate) fn read_skipped(
    fs: &dyn FileSystem,
    dir: &Path,
    pchannel: &str,
) -> Result<Ranges, WalError> {
    let mut r = Ranges::default();
    for rec in read_skip_records(fs, dir, pchannel)? {
        r.add(rec.ids);
    }
    Ok(r)
}

/// Adds `records` to the audit file (atomically: the old lines, then these).
pub fn append_skip_records(
    fs: &dyn FileSystem,
    dir: &Path,
    pchannel: &str,
    records: &[SkipRecord],
) -> Result<(), WalError> {
    let path = dir.join(SKIPPED_FILE);
    let mut b = fs
        .read_all(&path)
        .map_err(io_err(pchannel, "reading SKIPPED"))?
        .unwrap_or_default();
    for r in records {
        let reason = r.reason.replace(['\n', '\r'], " ");
        b.extend_from_slice(
            format!("{} {} {} {reason}\n", r.ids.start, r.ids.end, r.unix_ms).as_bytes(),
        );
    }
    fs.write_atomic(&path, &b)
        .map_err(io_err(pchannel, "writing SKIPPED"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn ranges_merge_and_subtract() {
        let mut r = Ranges::default();
        r.add(5..7);
        r.add(1..3);
        r.add(3..4);
        r.add(6..9);
        r.add(4..4);
        assert_eq!(r.0, vec![1..4, 5..9]);
        assert_eq!(r.containing(6), Some(5..9));
        assert_eq!(r.containing(4), None);
        assert_eq!(r.subtract(0..10), vec![0..1, 4..5, 9..10]);
        assert_eq!(r.subtract(5..9), Vec::<Range<u64>>::new());
        assert_eq!(r.subtract(2..6), vec![4..5]);
    }

    #[test]
    fn skip_lines_round_trip_and_a_bad_line_is_refused() {
        let fs = crate::fs::FaultFs::new();
        let dir = Path::new("/p");
        let rec = SkipRecord {
            ids: 10..12,
            unix_ms: 99,
            reason: "disk\nreplaced".into(),
        };
        append_skip_records(&fs, dir, "p", std::slice::from_ref(&rec)).unwrap();
        let back = read_skip_records(&fs, dir, "p").unwrap();
        assert_eq!(back[0].ids, 10..12);
        assert_eq!(back[0].reason, "disk replaced");
        fs.write_atomic(&dir.join(SKIPPED_FILE), b"1 x 2\n")
            .unwrap();
        assert!(read_skip_records(&fs, dir, "p").is_err());
    }
}
