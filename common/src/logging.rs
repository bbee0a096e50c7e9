//! Log set-up shared by both binaries: human-readable text (default) or one JSON object per line.

use tracing_subscriber::EnvFilter;

// The format's name lives with the settings files that spell it.
pub use fedtune_settings::LogFormat;

/// The log target of local training (epochs, losses): `RUST_LOG=fedtune::train=warn` quiets
/// it, `=debug` adds detail.
pub const TRAIN: &str = "fedtune::train";
/// The log target of the network side (connections, retries, TLS refusals, transfers), e.g.
/// `RUST_LOG=info,fedtune::net=debug`.
pub const NET: &str = "fedtune::net";

/// Installs the global subscriber, writing to stderr. `RUST_LOG` overrides the default level
/// (`info`). Calling it twice is harmless (the second call does nothing).
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,h2=warn,tower=warn,hyper=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.with_target(false).try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
    };
}
