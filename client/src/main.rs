fn main() -> anyhow::Result<()> {
    fedtune_client::cli::main()
}
