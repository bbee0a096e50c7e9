//! `fedtune-client` that also knows `tiny-conv`.

fn main() -> anyhow::Result<()> {
    fedtune_common::models::register::<fedtune_example_custom_model::TinyConv>()?;
    fedtune_client::cli::main()
}
