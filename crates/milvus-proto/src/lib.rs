//! Milvus's gRPC API as pymilvus speaks it: `milvus.proto.milvus.MilvusService` and the messages
//! of `common`, `schema`, `msg`, `rg` and `feder`, generated at build time from the protos of
//! milvus-io/milvus-proto at the commit pymilvus v2.6.17 pins (29edb7f4, under `proto/`).
//!
//! Only types: what Walden does with them is `walden-milvus`'s job.
#![allow(missing_docs, clippy::all, missing_debug_implementations)]

pub mod common {
    tonic::include_proto!("milvus.proto.common");
}
pub mod schema {
    tonic::include_proto!("milvus.proto.schema");
}
pub mod msg {
    tonic::include_proto!("milvus.proto.msg");
}
pub mod rg {
    tonic::include_proto!("milvus.proto.rg");
}
pub mod feder {
    tonic::include_proto!("milvus.proto.feder");
}
pub mod milvus {
    tonic::include_proto!("milvus.proto.milvus");
}
