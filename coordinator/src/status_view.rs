//! How `fedtune-coordinator status` shows a [`pb::RunStatus`]: a table in text, one JSON object
//! per snapshot (for scripts and pipes), or a live terminal view (ratatui) with `--watch`.

use fedtune_proto as pb;
use ratatui::Frame;
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Color, Style, Stylize};
use ratatui::text::Line;
use ratatui::widgets::{Block, Cell, Gauge, Paragraph, Row, Table};
use serde_json::{Value, json};

/// `round 3/10 (attempt 2) · training for 12 s · deadline in 48 s · 2 rounds done · 4 of 3
/// needed clients live`.
pub fn headline(s: &pb::RunStatus) -> String {
    let attempt = if s.attempt > 1 {
        format!(" (attempt {})", s.attempt)
    } else {
        String::new()
    };
    let deadline = s
        .seconds_to_deadline
        .map(|d| format!(" · deadline in {}", seconds(d)))
        .unwrap_or_default();
    let live = s.clients.iter().filter(|c| c.state != "gone").count();
    // A tiered aggregator's parent decides the rounds (0 here).
    let of = match s.rounds {
        0 => String::new(),
        n => format!("/{n}"),
    };
    let mut line = format!(
        "round {}{of}{attempt} · {} for {}{deadline} · {} rounds done · {live} clients live ({} needed)",
        s.round,
        s.phase,
        seconds(s.seconds_in_phase),
        s.rounds_completed,
        s.min_clients
    );
    if !s.reason.is_empty() {
        line += &format!(" · {}", s.reason);
    }
    line
}

fn seconds(s: f64) -> String {
    if s < 120.0 {
        format!("{s:.0} s")
    } else {
        humantime::format_duration(std::time::Duration::from_secs(s as u64)).to_string()
    }
}

/// What a client is doing, in a few words: `downloading 45%`, `epoch 2/5 loss 0.4123`,
/// `failed: no word from site-b for 60s`.
pub fn doing(c: &pb::ClientStatus) -> String {
    let pct = |p: f64| format!("{:.0}%", p * 100.0);
    match c.state.as_str() {
        "downloading" | "uploading" => {
            format!("{} {}", c.state, c.progress.map(pct).unwrap_or_default())
        }
        "training" if c.epochs > 0 => {
            let loss = c.loss.map(|l| format!(" loss {l:.4}")).unwrap_or_default();
            format!("training epoch {}/{}{loss}", c.epoch, c.epochs)
        }
        "failed" => format!("failed: {}", c.reason),
        other => other.to_string(),
    }
}

/// The snapshot as a text table (one line per client).
pub fn text(s: &pb::RunStatus) -> String {
    let mut out = format!("run {} · {}\n", s.run_id, headline(s));
    out += &format!(
        "{:<20} {:<6} {:<40} {:<14} {:>10} {:<10} {:>9}\n",
        "client", "id", "state", "task", "heard", "device", "examples"
    );
    for c in &s.clients {
        out += &format!(
            "{:<20} {:<6} {:<40} {:<14} {:>10} {:<10} {:>9}\n",
            c.name,
            c.id,
            doing(c),
            c.task_id,
            format!("{} ago", seconds(c.seconds_since_heard)),
            c.device,
            c.num_examples
        );
    }
    out
}

/// The snapshot as one JSON object (a line of `--json` output).
pub fn json(s: &pb::RunStatus) -> Value {
    let clients: Vec<Value> = s
        .clients
        .iter()
        .map(|c| {
            json!({
                "id": c.id,
                "name": c.name,
                "device": c.device,
                "num_examples": c.num_examples,
                "state": c.state,
                "progress": c.progress,
                "epoch": c.epoch,
                "epochs": c.epochs,
                "loss": c.loss,
                "reason": c.reason,
                "task_id": c.task_id,
                "seconds_since_heard": c.seconds_since_heard,
            })
        })
        .collect();
    json!({
        "run_id": s.run_id,
        "round": s.round,
        "rounds": s.rounds,
        "attempt": s.attempt,
        "phase": s.phase,
        "seconds_in_phase": s.seconds_in_phase,
        "seconds_to_deadline": s.seconds_to_deadline,
        "min_clients": s.min_clients,
        "rounds_completed": s.rounds_completed,
        "reason": s.reason,
        "clients": clients,
    })
}

fn state_color(state: &str) -> Color {
    match state {
        "reported" => Color::Green,
        "failed" | "gone" => Color::Red,
        "downloading" | "uploading" | "training" | "evaluating" => Color::Yellow,
        _ => Color::Reset,
    }
}

/// The live view: the run's line, a gauge of the rounds, the clients' table; `error` (the
/// coordinator did not answer the last poll) under the line.
pub fn draw(frame: &mut Frame, s: &pb::RunStatus, url: &str, error: Option<&str>) {
    let [top, gauge, table] = Layout::vertical([
        Constraint::Length(4),
        Constraint::Length(3),
        Constraint::Min(4),
    ])
    .areas(frame.area());
    let mut lines = vec![
        Line::from(format!("fedtune run {} at {url}", s.run_id)).bold(),
        Line::from(headline(s)),
    ];
    if let Some(e) = error {
        lines.push(Line::from(format!("coordinator unreachable: {e}")).red());
    } else {
        lines.push(Line::from("q: quit").dim());
    }
    frame.render_widget(Paragraph::new(lines), top);
    let ratio = if s.rounds == 0 {
        0.0
    } else {
        (s.rounds_completed as f64 / s.rounds as f64).clamp(0.0, 1.0)
    };
    frame.render_widget(
        Gauge::default()
            .block(Block::bordered().title("rounds"))
            .gauge_style(Style::default().fg(Color::Cyan))
            .ratio(ratio)
            .label(format!("{}/{} rounds done", s.rounds_completed, s.rounds)),
        gauge,
    );
    let rows = s.clients.iter().map(|c| {
        Row::new(vec![
            Cell::from(c.name.clone()),
            Cell::from(c.id.clone()),
            Cell::from(doing(c)).style(Style::default().fg(state_color(&c.state))),
            Cell::from(c.task_id.clone()),
            Cell::from(format!("{} ago", seconds(c.seconds_since_heard))),
            Cell::from(c.device.clone()),
            Cell::from(c.num_examples.to_string()),
        ])
    });
    let widths = [
        Constraint::Length(18),
        Constraint::Length(6),
        Constraint::Min(24),
        Constraint::Length(12),
        Constraint::Length(10),
        Constraint::Length(10),
        Constraint::Length(9),
    ];
    let header = Row::new([
        "client", "id", "state", "task", "heard", "device", "examples",
    ])
    .style(Style::default().bold());
    frame.render_widget(
        Table::new(rows, widths)
            .header(header)
            .block(Block::bordered().title(format!("{} clients", s.clients.len()))),
        table,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use ratatui::Terminal;
    use ratatui::backend::TestBackend;

    fn snapshot() -> pb::RunStatus {
        pb::RunStatus {
            run_id: "abc123".into(),
            round: 2,
            rounds: 5,
            attempt: 1,
            phase: "training".into(),
            seconds_in_phase: 12.4,
            seconds_to_deadline: Some(47.6),
            min_clients: 2,
            rounds_completed: 1,
            reason: String::new(),
            clients: vec![
                pb::ClientStatus {
                    id: "c1".into(),
                    name: "site-a".into(),
                    state: "training".into(),
                    epoch: 2,
                    epochs: 5,
                    loss: Some(0.41234),
                    task_id: "r2-c1".into(),
                    ..Default::default()
                },
                pb::ClientStatus {
                    id: "c2".into(),
                    name: "site-b".into(),
                    state: "downloading".into(),
                    progress: Some(0.453),
                    task_id: "r2-c2".into(),
                    ..Default::default()
                },
            ],
        }
    }

    #[test]
    fn each_state_reads_as_what_the_client_is_doing() {
        let s = snapshot();
        assert_eq!(doing(&s.clients[0]), "training epoch 2/5 loss 0.4123");
        assert_eq!(doing(&s.clients[1]), "downloading 45%");
        let failed = pb::ClientStatus {
            state: "failed".into(),
            reason: "no word from site-c for 60s".into(),
            ..Default::default()
        };
        assert_eq!(doing(&failed), "failed: no word from site-c for 60s");
    }

    #[test]
    fn the_live_view_shows_the_round_and_every_client() {
        let mut terminal = Terminal::new(TestBackend::new(110, 14)).unwrap();
        terminal
            .draw(|f| draw(f, &snapshot(), "https://10.0.0.5:50051", None))
            .unwrap();
        let screen: String = terminal
            .backend()
            .buffer()
            .content()
            .iter()
            .map(|c| c.symbol())
            .collect();
        for want in [
            "round 2/5",
            "training for 12 s",
            "deadline in 48 s",
            "1/5 rounds done",
            "site-a",
            "training epoch 2/5 loss 0.4123",
            "downloading 45%",
        ] {
            assert!(screen.contains(want), "`{want}` not on screen:\n{screen}");
        }
    }
}
