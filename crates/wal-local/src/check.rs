//! `walden wal check`: verifies every record of a local WAL offline, without changing a byte
//! (a torn tail is reported, not cut), and says what is damaged: byte ranges per segment and
//! id ranges per pchannel.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use walden_wal_api::WalError;

use crate::{
    format::{self, RecordAt, SegmentHeader},
    fs::{FileSystem, StdFs},
    open::{io_err, lock_dir},
    ranges::{Ranges, read_skipped},
    shared,
};

/// Something wrong in the stored bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// The file, and the byte offset where it starts.
    pub location: String,
    pub detail: String,
    /// A torn tail in the last segment: never acknowledged, and cut at the next open.
    pub torn_tail: bool,
}

/// One pchannel as found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PchannelReport {
    /// Ids found, as `first..end` (damaged ones included).
    pub first: u64,
    pub end: u64,
    pub records: u64,
    /// Ids whose records are damaged, the skipped ones included.
    pub damaged: Ranges,
    /// Ids an operator skipped (`SKIPPED`).
    pub skipped: Ranges,
}

/// What [`check`] found.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub layout: &'static str,
    pub segments: u64,
    pub records: u64,
    pub problems: Vec<Problem>,
    pub pchannels: BTreeMap<String, PchannelReport>,
}

impl Report {
    /// Damage a reader would meet: damaged ids not skipped, or damaged bytes that no
    /// pchannel's ids account for (they held records nothing after them shows the loss of).
    pub fn is_damaged(&self) -> bool {
        let unskipped = self.pchannels.values().any(|p| {
            p.damaged
                .iter()
                .any(|r| !p.skipped.subtract(r.clone()).is_empty())
        });
        let attributed = self.pchannels.values().any(|p| !p.damaged.is_empty());
        unskipped || (!attributed && self.problems.iter().any(|p| !p.torn_tail))
    }

    /// Damage found, all of it skipped by an operator.
    pub fn all_skipped(&self) -> bool {
        !self.is_damaged() && self.pchannels.values().any(|p| !p.damaged.is_empty())
    }
}

/// Checks the WAL under `root` (`<data_dir>/wal`), in whichever layout it holds. Takes the
/// WAL's lock, so it refuses to run beside a server using it.
pub fn check(root: &Path) -> Result<Report, WalError> {
    let fs = StdFs;
    if root.join("log").is_dir() {
        let _lock = lock_dir(&fs, root, "(shared log)")?;
        shared::check(&fs, root)
    } else {
        check_per_pchannel(&fs, root)
    }
}

/// Records one pchannel id seen at `location`, noting a gap before it as damaged.
pub(crate) fn saw_id(report: &mut Report, pchannel: &str, id: u64) -> bool {
    let p = report.pchannels.entry(pchannel.to_owned()).or_default();
    if p.records == 0 && p.damaged.is_empty() {
        p.first = id;
    } else if id < p.end {
        return false;
    } else if id > p.end {
        p.damaged.add(p.end..id);
    }
    p.end = id + 1;
    p.records += 1;
    report.records += 1;
    true
}

/// Loads each pchannel's skipped ranges from its directory under `root`.
pub(crate) fn load_skipped(fs: &dyn FileSystem, root: &Path, report: &mut Report) {
    for (name, p) in &mut report.pchannels {
        if let Ok(s) = read_skipped(fs, &root.join(name), name) {
            p.skipped = s;
        }
    }
}

/// The per-pchannel layout: `root/<pchannel>/<first_id>.seg`.
fn check_per_pchannel(fs: &dyn FileSystem, root: &Path) -> Result<Report, WalError> {
    let mut report = Report {
        layout: "per_pchannel",
        ..Report::default()
    };
    let dirs = fs.list(root).map_err(io_err("(wal)", "listing the WAL"))?;
    for name in dirs {
        let dir: PathBuf = root.join(&name);
        let Ok(files) = fs.list(&dir) else { continue };
        let mut firsts: Vec<u64> = files
            .iter()
            .filter_map(|f| format::parse_segment_file_name(f))
            .collect();
        firsts.sort_unstable();
        if firsts.is_empty() {
            continue;
        }
        let _lock = lock_dir(fs, &dir, &name)?;
        for (k, first) in firsts.iter().enumerate() {
            let last = k + 1 == firsts.len();
            let path = dir.join(format::segment_file_name(*first));
            let location = path.display().to_string();
            let b = fs
                .read_all(&path)
                .map_err(io_err(&name, format!("reading {location}")))?
                .unwrap_or_default();
            report.segments += 1;
            let header = match SegmentHeader::decode(&b) {
                Ok(h) => h,
                Err(e) => {
                    report.problems.push(Problem {
                        location,
                        detail: format!("bad segment header: {e:?}"),
                        torn_tail: last && b.len() < 64,
                    });
                    continue;
                }
            };
            let mut off = header.encoded_len();
            let mut id = header.first_id;
            while off < b.len() {
                match format::record_at(&b[off..]) {
                    RecordAt::Valid { start, len } => {
                        saw_id(&mut report, &name, id);
                        id += 1;
                        off += start + len;
                    }
                    damage => {
                        let after = format::any_valid_record_after(&b, off + 1);
                        let torn = last && after.is_none();
                        report.problems.push(Problem {
                            location: format!("{location} at {off}"),
                            detail: format!("{damage:?} (id {id})"),
                            torn_tail: torn,
                        });
                        if !torn {
                            report
                                .pchannels
                                .entry(name.clone())
                                .or_default()
                                .damaged
                                .add(id..id + 1);
                        }
                        break;
                    }
                }
            }
        }
    }
    load_skipped(fs, root, &mut report);
    Ok(report)
}
