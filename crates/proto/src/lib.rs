//! Walden's protobuf messages and gRPC services (`walden.v1`), generated at build time.
#![allow(missing_docs, clippy::all, missing_debug_implementations)]

pub mod codec;
pub mod status;

pub mod v1 {
    tonic::include_proto!("walden.v1");

    /// The encoded `FileDescriptorSet`, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/walden_descriptor.bin"));
}
