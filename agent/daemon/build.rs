//! Generates the control API's message types from `proto/agt.proto`. The file is parsed
//! by `protox` (pure Rust), so building needs no `protoc`.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/agt.proto");
    let descriptors = protox::compile(["proto/agt.proto"], ["proto"])?;
    prost_build::Config::new().compile_fds(descriptors)?;
    Ok(())
}
