//! Generates the Rust code for the .proto files under `proto/`.
//!
//! The .proto files are parsed by `protox` (pure Rust), so building this crate needs
//! no `protoc` binary:
//!
//! - `scm/machine/v1/machine.proto`: messages only, by `prost-build`, into
//!   `OUT_DIR/scm.machine.v1.rs` (included by `src/v1.rs`);
//! - `scm/admin/v1/admin.proto`: messages plus the tonic client and server of the
//!   `Admin` service, by `tonic-prost-build`, into `OUT_DIR/scm.admin.v1.rs`
//!   (included by `scm/src/front/admin.rs`), and its encoded `FileDescriptorSet`
//!   (`OUT_DIR/scm.admin.v1.descriptor.bin`, for gRPC server reflection). No transport code is generated: the SCM and the
//!   back office run HTTP/2 over their own TLS.

use std::error::Error;

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["scm/machine/v1/machine.proto"], ["proto"])?;
    prost_build::Config::new().compile_fds(fds)?;
    let admin = protox::compile(["scm/admin/v1/admin.proto"], ["proto"])?;
    // The encoded descriptors, for the SCM's gRPC server reflection.
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("scm.admin.v1.descriptor.bin"),
        prost::Message::encode_to_vec(&admin),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .build_transport(false)
        .compile_fds(admin)?;
    Ok(())
}
