//! Generates the admin API's gRPC code from `proto/` without protoc: protox compiles the
//! .proto files to descriptors, tonic-prost-build writes the server (for the library) and
//! the client (for the tests and `gatehouse ctl`) into `OUT_DIR`.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/gatehouse/admin/v1/admin.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    for (dir, server) in [("server", true), ("client", false)] {
        let dir = out.join(dir);
        std::fs::create_dir_all(&dir)?;
        tonic_prost_build::configure()
            .build_server(server)
            .build_client(!server)
            .build_transport(!server)
            .out_dir(&dir)
            .compile_fds(descriptors.clone())?;
    }
    Ok(())
}
