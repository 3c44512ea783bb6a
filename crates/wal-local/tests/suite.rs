//! Integration tests of the local WAL, on the real file system and on the fault file system.
//!
//! One test binary for the crate (each `tests/*.rs` file is a module here): the suite links
//! once, not once per file, which keeps CI's build time and disk in bounds.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[macro_use]
mod faults;

mod local_wal;
mod shared_log;
