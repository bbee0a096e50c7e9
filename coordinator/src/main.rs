fn main() -> anyhow::Result<()> {
    fedtune_coordinator::cli::main()
}
