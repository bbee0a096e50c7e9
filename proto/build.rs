fn main() -> Result<(), Box<dyn std::error::Error>> {
    // No protoc is installed on our machines; use the vendored one unless the user chose another.
    if std::env::var_os("PROTOC").is_none() {
        let protoc = protoc_bin_vendored::protoc_bin_path()?;
        // SAFETY: build scripts are single-threaded; nothing else reads the environment here.
        unsafe { std::env::set_var("PROTOC", protoc) };
    }
    tonic_prost_build::configure()
        // Tensor bytes as `bytes::Bytes`: one encoded broadcast is sliced for every client
        // without copying.
        .bytes(".")
        .compile_protos(&["fedtune.proto"], &["."])?;
    println!("cargo:rerun-if-changed=fedtune.proto");
    Ok(())
}
