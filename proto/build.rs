//! Generates the Rust types for `proto/scm/machine/v1/machine.proto`.
//!
//! The .proto is parsed by `protox` (pure Rust), so building this crate needs
//! no `protoc` binary; `prost-build` turns the descriptors into Rust code in
//! `OUT_DIR/scm.machine.v1.rs`, which `src/v1.rs` includes.

use std::error::Error;

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["scm/machine/v1/machine.proto"], ["proto"])?;
    prost_build::Config::new().compile_fds(fds)?;
    Ok(())
}
