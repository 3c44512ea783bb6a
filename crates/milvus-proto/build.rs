//! Compiles Milvus's protos with protox (pure Rust, no `protoc`). The files under `proto/` are
//! milvus-io/milvus-proto at commit 29edb7f431624d4902b98189a4f7fc8138016f36 (the submodule
//! pymilvus v2.6.17 pins), unchanged; `proto/LICENSE` is theirs (Apache-2.0).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/milvus.proto";
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure()
        // Every RPC Walden does not serve answers UNIMPLEMENTED (walden-milvus names the RPC).
        .generate_default_stubs(true)
        // Servers only: the generated client's `connect` constructor collides with the
        // `Connect` RPC, and pymilvus is the client.
        .build_client(false)
        .compile_fds(fds)?;
    Ok(())
}
