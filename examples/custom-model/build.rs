include!("../../deploy/link-libtorch.rs");

fn main() {
    link_libtorch();
}
