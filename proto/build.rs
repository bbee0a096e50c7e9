fn main() -> Result<(), Box<dyn std::error::Error>> {
    // No protoc is installed on our machines; use the vendored one unless the user chose another.
    if std::env::var_os("PROTOC").is_none() {
        let protoc = protoc_bin_vendored::protoc_bin_path()?;
        // SAFETY: build scripts are single-threaded; nothing else reads the environment here.
        unsafe { std::env::set_var("PROTOC", protoc) };
    }
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        // Tensor bytes as `bytes::Bytes`: one encoded broadcast is sliced for every client
        // without copying.
        .bytes(".")
        // For gRPC server reflection: tools discover the services without the .proto file.
        .file_descriptor_set_path(out.join("fedtune_descriptor.bin"))
        .compile_protos(&["fedtune.proto"], &["."])?;
    println!("cargo:rerun-if-changed=fedtune.proto");
    Ok(())
}
