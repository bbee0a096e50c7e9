//! `fedtune-coordinator status`: asks a running coordinator where its run is and what every
//! client is doing (the `Admin` service), once or, with `--watch`, again and again — redrawn in
//! place on a terminal, one JSON line per snapshot otherwise.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use fedtune_connect::connection::endpoint;
use fedtune_connect::tls::{self, ClientAuth, ClientSecurity};
use fedtune_proto::{self as pb, admin_client::AdminClient};
use fedtune_settings::KitFile;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyModifiers};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::status_view;

#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    /// The coordinator, e.g. https://10.0.0.5:50051 [default: the --config kit's].
    #[arg(long)]
    pub coordinator: Option<String>,
    /// A kit's client.toml (an admin's: its certificate or token must be named in the
    /// coordinator's --admins): coordinator URL, CA, certificate and key; flags win.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The CA that issued the coordinator's certificate.
    #[arg(long)]
    pub ca_cert: Option<PathBuf>,
    /// This admin's certificate and key, for a coordinator with --client-ca.
    #[arg(long)]
    pub cert: Option<PathBuf>,
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// A file holding this admin's client token, for a coordinator with --client-tokens.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Check the coordinator's certificate for this name instead of the URL's host.
    #[arg(long)]
    pub tls_server_name: Option<String>,
    /// Plaintext http:// (a coordinator run with --insecure).
    #[arg(long)]
    pub insecure: bool,
    /// Keep asking: redraw in place on a terminal (q quits), one JSON line per snapshot
    /// otherwise; ends when the run has finished.
    #[arg(long)]
    pub watch: bool,
    /// JSON instead of the table (with --watch: JSON lines even on a terminal).
    #[arg(long)]
    pub json: bool,
    /// How often --watch asks.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub interval: Duration,
}

type Admin = AdminClient<InterceptedService<Channel, ClientAuth>>;

pub async fn run(args: StatusArgs) -> anyhow::Result<()> {
    let kit = match &args.config {
        Some(path) => KitFile::read(path)?,
        None => KitFile::default(),
    };
    let url = args.coordinator.clone().or(kit.coordinator).context(
        "give --coordinator URL (e.g. https://10.0.0.5:50051) or --config with a kit's client.toml",
    )?;
    let security = ClientSecurity {
        insecure: args.insecure || kit.insecure,
        ca_cert: args.ca_cert.clone().or(kit.ca_cert),
        cert: args.cert.clone().or(kit.cert),
        key: args.key.clone().or(kit.key),
        server_name: args.tls_server_name.clone().or(kit.tls_server_name),
        token_file: args.token_file.clone().or(kit.token_file),
    };
    let channel = tls::secure(endpoint(&url)?, &url, &security)?
        .connect()
        .await
        .map_err(|e| match tls::explain(&e) {
            Some(why) => anyhow::anyhow!("{url}: {why}"),
            None => anyhow::anyhow!("{url}: cannot connect: {e}"),
        })?;
    let mut admin = AdminClient::with_interceptor(channel, tls::client_auth(&url, &security)?);
    if !args.watch {
        let s = ask(&mut admin, &url).await?;
        if args.json {
            println!("{}", status_view::json(&s));
        } else {
            print!("{}", status_view::text(&s));
        }
        return Ok(());
    }
    if std::io::stdout().is_terminal() && !args.json {
        return watch_terminal(&mut admin, &url, args.interval).await;
    }
    watch_lines(&mut admin, &url, args.interval).await
}

async fn ask(admin: &mut Admin, url: &str) -> anyhow::Result<pb::RunStatus> {
    admin
        .get_status(pb::StatusRequest {})
        .await
        .map(|r| r.into_inner())
        .map_err(|status| refused(url, &status))
}

/// The coordinator's refusal (or a TLS failure) in one line that names it.
fn refused(url: &str, status: &tonic::Status) -> anyhow::Error {
    match tls::explain(status) {
        Some(why) => anyhow::anyhow!("{url}: {why}"),
        None => anyhow::anyhow!("{url}: {}", status.message()),
    }
}

/// One JSON line per snapshot until the run has finished (a refusal ends it; a coordinator
/// that is away is asked again).
async fn watch_lines(admin: &mut Admin, url: &str, every: Duration) -> anyhow::Result<()> {
    loop {
        match admin.get_status(pb::StatusRequest {}).await {
            Ok(r) => {
                let s = r.into_inner();
                println!("{}", status_view::json(&s));
                if s.phase == "finished" {
                    return Ok(());
                }
            }
            Err(e) if e.code() == tonic::Code::Unavailable => {
                eprintln!("{url}: unavailable ({}); asking again", e.message());
            }
            Err(e) => return Err(refused(url, &e)),
        }
        tokio::time::sleep(every).await;
    }
}

/// The live view, redrawn every `every` until q, Esc or Ctrl-C.
async fn watch_terminal(admin: &mut Admin, url: &str, every: Duration) -> anyhow::Result<()> {
    let mut last = ask(admin, url).await?;
    let mut terminal = ratatui::try_init().context("cannot take over the terminal")?;
    let result: anyhow::Result<()> = async {
        loop {
            let error = match admin.get_status(pb::StatusRequest {}).await {
                Ok(r) => {
                    last = r.into_inner();
                    None
                }
                Err(e) => Some(e.message().to_string()),
            };
            terminal.draw(|f| status_view::draw(f, &last, url, error.as_deref()))?;
            if tokio::task::block_in_place(|| quit_pressed(every))? {
                return Ok(());
            }
        }
    }
    .await;
    ratatui::restore();
    result
}

/// Waits up to `every` for a key; whether it asks to quit.
fn quit_pressed(every: Duration) -> std::io::Result<bool> {
    if !event::poll(every)? {
        return Ok(false);
    }
    Ok(match event::read()? {
        Event::Key(key) => {
            matches!(key.code, KeyCode::Char('q') | KeyCode::Esc)
                || (key.code == KeyCode::Char('c') && key.modifiers.contains(KeyModifiers::CONTROL))
        }
        _ => false,
    })
}
