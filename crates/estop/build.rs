fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    // Compiled in Rust (protox), as Steward's own API is: building needs no protoc.
    let fds = protox::compile(["etcd.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(false)
        .skip_protoc_run()
        .compile_fds(fds)?;
    Ok(())
}
