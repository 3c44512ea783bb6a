//! Integration tests of a streaming node in process, over its gRPC face.
//!
//! One test binary for the crate (each `tests/*.rs` file is a module here): the suite links
//! once, not once per file, which keeps CI's build time and disk in bounds.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

mod assign;
mod cluster;
mod collections;
mod node;
mod txn;
