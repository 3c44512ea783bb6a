//! Integration tests of the `walden` binary: real processes and real servers on 127.0.0.1.
//!
//! One test binary for the crate (each `tests/*.rs` file is a module here): the suite links
//! once, not once per file, which keeps CI's build time and disk in bounds.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

mod bad_input;
mod bench;
mod cli;
mod cluster;
mod collections;
mod consistency;
mod crash;
mod damage;
mod disk_full;
mod flush;
mod hnsw;
mod idempotency;
mod object_wal;
mod operability;
mod query_nodes;
mod search;
mod security;
mod txn_crash;
