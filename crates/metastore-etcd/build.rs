//! Compiles the slice of etcd's protos this crate speaks with protox (pure Rust): building
//! Walden needs no system `protoc`, which etcd-client's build script would.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/etcdserverpb/rpc.proto", "proto/mvccpb/kv.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        .build_server(false)
        .compile_fds(fds)?;
    Ok(())
}
