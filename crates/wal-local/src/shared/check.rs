//! The shared log's part of `walden wal check`: every segment read whole, every record's
//! checksum and body verified, ids of each pchannel checked for gaps. Reads only.

use super::*;
use crate::check::{Problem, Report, load_skipped, saw_id};

pub(crate) fn check(fs: &dyn FileSystem, root: &Path) -> Result<Report, WalError> {
    let dir = root.join("log");
    let seqs = segment_seqs(fs, &dir)?;
    let mut report = Report {
        layout: "shared",
        ..Report::default()
    };
    for (k, &seq) in seqs.iter().enumerate() {
        let last = k + 1 == seqs.len();
        let path = dir.join(segment_name(seq));
        let location = path.display().to_string();
        let b = fs
            .read_all(&path)
            .map_err(io_err(LOG, format!("reading {location}")))?
            .unwrap_or_default();
        report.segments += 1;
        if b.len() < HEADER_LEN || &b[..8] != MAGIC {
            report.problems.push(Problem {
                location: location.clone(),
                detail: "damaged segment header (its records are still read)".into(),
                torn_tail: last && b.len() < HEADER_LEN,
            });
            if b.len() < HEADER_LEN {
                continue;
            }
        }
        let mut off = HEADER_LEN;
        while off < b.len() {
            match format::record_at(&b[off..]) {
                RecordAt::Valid { start, len } => {
                    let body = &b[off + start..off + start + len];
                    match parse_body(body) {
                        Some((id, name, _)) => {
                            if !saw_id(&mut report, name, id) {
                                report.problems.push(Problem {
                                    location: format!("{location} at {off}"),
                                    detail: format!("{name}: id {id} out of order"),
                                    torn_tail: false,
                                });
                            }
                        }
                        None => report.problems.push(Problem {
                            location: format!("{location} at {off}"),
                            detail: "record with a damaged body".into(),
                            torn_tail: false,
                        }),
                    }
                    off += start + len;
                }
                RecordAt::Incomplete if off == b.len() => break,
                _ if b[off..].iter().all(|x| *x == 0) => break,
                damage => {
                    let after = format::any_valid_record_after(&b, off + 1);
                    let until = after.unwrap_or(b.len());
                    report.problems.push(Problem {
                        location: format!("{location} at {off}"),
                        detail: format!("bytes {off}..{until} damaged ({damage:?})"),
                        torn_tail: last && after.is_none(),
                    });
                    match after {
                        Some(a) => off = a,
                        None => break,
                    }
                }
            }
        }
    }
    load_skipped(fs, root, &mut report);
    Ok(report)
}
