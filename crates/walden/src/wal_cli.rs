//! `walden wal`: offline tools for a local WAL (the server stopped): `check` verifies every
//! record and prints what is damaged; `skip-damaged` lets readers of one pchannel pass over its
//! damaged records, writing an audit record of what it skipped and why.

use std::{io::Write as _, path::PathBuf};

use anyhow::Context;
use clap::Subcommand;
use serde_json::json;
use walden_common::ErrorCode;
use walden_wal_local::{
    check::{Report, check},
    fs::StdFs,
    ranges::{SkipRecord, append_skip_records},
};

use crate::cli::CliError;

#[derive(Subcommand, Debug)]
pub enum WalCmd {
    /// Verify every record of the local WAL under DATA_DIR (the server must be stopped);
    /// prints damaged byte ranges per segment and damaged ids per pchannel, and exits non-zero
    /// (CORRUPTED) if a reader would meet damage.
    Check {
        #[arg(long, default_value = "./walden-data")]
        data_dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Let readers of PCHANNEL pass over its damaged records (found as `check` finds them).
    /// Writes an audit line per range to <data_dir>/wal/<pchannel>/SKIPPED, prints each, and is
    /// logged at every open. The server must be stopped.
    SkipDamaged {
        #[arg(long, default_value = "./walden-data")]
        data_dir: PathBuf,
        #[arg(long)]
        pchannel: String,
        /// Why (kept in the audit record).
        #[arg(long)]
        reason: String,
        #[arg(long)]
        json: bool,
    },
}

pub fn run(cmd: WalCmd) -> anyhow::Result<()> {
    match cmd {
        WalCmd::Check { data_dir, json } => {
            let report = check(&data_dir.join("wal")).context("checking the WAL")?;
            print_report(&report, json)?;
            if report.is_damaged() {
                return Err(CliError {
                    code: ErrorCode::Corrupted,
                    message: format!(
                        "{} holds damaged records (see above)",
                        data_dir.join("wal").display()
                    ),
                }
                .into());
            }
            Ok(())
        }
        WalCmd::SkipDamaged {
            data_dir,
            pchannel,
            reason,
            json,
        } => skip(&data_dir, &pchannel, &reason, json),
    }
}

fn ranges_text(r: &walden_wal_local::ranges::Ranges) -> String {
    let v: Vec<String> = r
        .iter()
        .map(|r| format!("{}..{}", r.start, r.end))
        .collect();
    v.join(",")
}

fn print_report(r: &Report, json_out: bool) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    if json_out {
        let pchannels: serde_json::Map<String, serde_json::Value> = r
            .pchannels
            .iter()
            .map(|(name, p)| {
                let ranges = |x: &walden_wal_local::ranges::Ranges| {
                    x.iter()
                        .map(|r| json!([r.start, r.end]))
                        .collect::<Vec<_>>()
                };
                (
                    name.clone(),
                    json!({
                        "first_id": p.first, "end_id": p.end, "records": p.records,
                        "damaged": ranges(&p.damaged), "skipped": ranges(&p.skipped),
                    }),
                )
            })
            .collect();
        let problems: Vec<_> = r
            .problems
            .iter()
            .map(|p| json!({"location": p.location, "detail": p.detail, "torn_tail": p.torn_tail}))
            .collect();
        let doc = json!({
            "layout": r.layout, "segments": r.segments, "records": r.records,
            "damaged": r.is_damaged(), "problems": problems, "pchannels": pchannels,
        });
        writeln!(out, "{doc}")?;
        return Ok(());
    }
    writeln!(
        out,
        "{} layout: {} segments, {} records",
        r.layout, r.segments, r.records
    )?;
    for p in &r.problems {
        let what = if p.torn_tail {
            "torn tail (never acknowledged; cut at the next open)"
        } else {
            "DAMAGED"
        };
        writeln!(out, "{what}: {}: {}", p.location, p.detail)?;
    }
    for (name, p) in &r.pchannels {
        let noun = if p.records == 1 { "record" } else { "records" };
        write!(
            out,
            "{name}: ids {}..{} ({} {noun})",
            p.first, p.end, p.records
        )?;
        if !p.damaged.is_empty() {
            write!(out, ", damaged ids {}", ranges_text(&p.damaged))?;
        }
        if !p.skipped.is_empty() {
            write!(out, ", skipped ids {}", ranges_text(&p.skipped))?;
        }
        writeln!(out)?;
    }
    let result = if r.is_damaged() {
        "result: DAMAGED"
    } else if r.all_skipped() {
        "result: ok (every damaged record was skipped by an operator: see SKIPPED)"
    } else {
        "result: ok"
    };
    writeln!(out, "{result}")?;
    Ok(())
}

fn skip(
    data_dir: &std::path::Path,
    pchannel: &str,
    reason: &str,
    json_out: bool,
) -> anyhow::Result<()> {
    walden_common::validate_channel_name(pchannel).map_err(|e| CliError {
        code: ErrorCode::InvalidArgument,
        message: format!("--pchannel: {e}"),
    })?;
    anyhow::ensure!(!reason.trim().is_empty(), "--reason must say why");
    let root = data_dir.join("wal");
    let report = check(&root).context("checking the WAL")?;
    let Some(p) = report.pchannels.get(pchannel) else {
        return Err(CliError {
            code: ErrorCode::ChannelNotFound,
            message: format!("{pchannel} has no records in {}", root.display()),
        }
        .into());
    };
    let unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let records: Vec<SkipRecord> = p
        .damaged
        .iter()
        .flat_map(|r| p.skipped.subtract(r.clone()))
        .map(|ids| SkipRecord {
            ids,
            unix_ms,
            reason: reason.to_owned(),
        })
        .collect();
    let dir = root.join(pchannel);
    if !records.is_empty() {
        append_skip_records(&StdFs, &dir, pchannel, &records)?;
    }
    let mut out = std::io::stdout().lock();
    for r in &records {
        if json_out {
            let doc = json!({"pchannel": pchannel, "skipped": [r.ids.start, r.ids.end],
                "unix_ms": r.unix_ms, "reason": r.reason,
                "audit": dir.join(walden_wal_local::ranges::SKIPPED_FILE)});
            writeln!(out, "{doc}")?;
        } else {
            writeln!(
                out,
                "skipped {pchannel} ids {}..{} (audit: {})",
                r.ids.start,
                r.ids.end,
                dir.join(walden_wal_local::ranges::SKIPPED_FILE).display()
            )?;
        }
    }
    if records.is_empty() && !json_out {
        writeln!(out, "{pchannel}: nothing damaged to skip")?;
    }
    Ok(())
}
