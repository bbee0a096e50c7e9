// Shared body of the build scripts of the crates whose binaries and tests may link libtorch
// (included with `include!`). Only active with the crate's `tch` feature.
//
// 1. Bake libtorch's folder into the binaries as an rpath, so they run without LD_LIBRARY_PATH.
// 2. Link libtorch.so with --no-as-needed: nothing in our code calls into libtorch_cuda.so
//    directly, so the linker would drop it and the CUDA backend would never register
//    ("Could not run 'aten::empty.memory_format' ... from the 'CUDA' backend").
fn link_libtorch() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if std::env::var_os("CARGO_FEATURE_TCH").is_none() {
        return;
    }
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    }
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    println!("cargo:rustc-link-arg=-ltorch");
}
