//! The report's charts: one line per figure over the rounds, a marker at every round that
//! recorded it, drawn twice — PNG (plotters' bitmap backend) and SVG — with DejaVu Sans
//! compiled in (plotters would otherwise look for system fonts, or fail to draw text).

use std::path::Path;
use std::sync::Once;

use anyhow::{Context, anyhow};
use plotters::coord::Shift;
use plotters::prelude::*;

use super::Round;

const SIZE: (u32, u32) = (800, 480);
const COLORS: [RGBColor; 4] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
];

/// One chart: a title, what the y axis measures, and its lines.
pub struct Chart {
    pub name: &'static str,
    pub title: &'static str,
    pub y_label: &'static str,
    pub series: Vec<Series>,
}

pub struct Series {
    pub label: &'static str,
    /// (round, value) for the rounds that recorded it.
    pub points: Vec<(u64, f64)>,
}

impl Chart {
    pub fn png(&self) -> String {
        format!("{}.png", self.name)
    }

    pub fn svg(&self) -> String {
        format!("{}.svg", self.name)
    }
}

fn series(rounds: &[Round], label: &'static str, value: impl Fn(&Round) -> Option<f64>) -> Series {
    Series {
        label,
        points: rounds
            .iter()
            .filter_map(|r| Some((r.round, value(r)?)))
            .collect(),
    }
}

/// The three evaluations of one figure (`accuracy`, `f1`, `loss`): the server's on
/// `--eval-data`, the federated one (clients measuring the global model), and the clients' own
/// validation of their local models.
fn evaluations(rounds: &[Round], figure: &str) -> Vec<Series> {
    let (eval, fed) = (format!("eval_{figure}"), format!("fed_eval_{figure}"));
    vec![
        series(rounds, "server-side (--eval-data)", |r| r.server(&eval)),
        series(rounds, "federated (clients, global model)", |r| r.num(&fed)),
        series(rounds, "clients' own validation", |r| r.clients(&eval)),
    ]
}

/// The charts of a run; a figure no round recorded is left out, and so is a chart with none.
pub fn charts(rounds: &[Round]) -> Vec<Chart> {
    let mb = |key: &'static str| move |r: &Round| r.num(key).map(|b| b / 1e6);
    let secs = |key: &'static str| move |r: &Round| r.num(key).map(|ms| ms / 1e3);
    let all = vec![
        Chart {
            name: "accuracy",
            title: "Accuracy per round",
            y_label: "accuracy",
            series: evaluations(rounds, "accuracy"),
        },
        Chart {
            name: "f1",
            title: "Macro F1 per round",
            y_label: "macro F1",
            series: evaluations(rounds, "f1"),
        },
        Chart {
            name: "loss",
            title: "Loss per round",
            y_label: "loss",
            series: std::iter::once(series(rounds, "training (clients)", |r| {
                r.num("train_loss")
            }))
            .chain(evaluations(rounds, "loss"))
            .collect(),
        },
        Chart {
            name: "bytes",
            title: "Bytes per round",
            y_label: "MB",
            series: vec![
                series(rounds, "down (models sent)", mb("bytes_down")),
                series(rounds, "up (updates received)", mb("bytes_up")),
            ],
        },
        Chart {
            name: "clients",
            title: "Clients per round",
            y_label: "clients",
            series: vec![
                series(rounds, "selected", |r| r.num("clients_selected")),
                series(rounds, "reported", |r| r.num("clients_reported")),
                series(rounds, "failed", |r| r.num("clients_failed")),
            ],
        },
        Chart {
            name: "time",
            title: "Time per round",
            y_label: "seconds",
            series: vec![
                series(rounds, "round", secs("round_ms")),
                series(rounds, "aggregation", secs("aggregate_ms")),
                series(rounds, "evaluation", secs("eval_ms")),
            ],
        },
    ];
    all.into_iter()
        .map(|mut c| {
            c.series.retain(|s| !s.points.is_empty());
            c
        })
        .filter(|c| !c.series.is_empty())
        .collect()
}

/// Draws every chart as `<name>.png` and `<name>.svg` in `out`; returns what it drew.
pub fn draw_all(rounds: &[Round], out: &Path) -> anyhow::Result<Vec<Chart>> {
    register_font()?;
    let charts = charts(rounds);
    let last = rounds.iter().map(|r| r.round).max().unwrap_or(1);
    let first = rounds.iter().map(|r| r.round).min().unwrap_or(1);
    for chart in &charts {
        let png = out.join(chart.png());
        draw(
            BitMapBackend::new(&png, SIZE).into_drawing_area(),
            chart,
            first..last,
        )
        .with_context(|| format!("cannot draw {}", png.display()))?;
        let svg = out.join(chart.svg());
        draw(
            SVGBackend::new(&svg, SIZE).into_drawing_area(),
            chart,
            first..last,
        )
        .with_context(|| format!("cannot draw {}", svg.display()))?;
    }
    Ok(charts)
}

/// DejaVu Sans as plotters' "sans-serif", once per process.
fn register_font() -> anyhow::Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            dejavu::sans::regular(),
        )
        .map_err(|_| anyhow!("the embedded DejaVu Sans font did not load"));
    });
    result
}

fn draw<DB: DrawingBackend>(
    area: DrawingArea<DB, Shift>,
    chart: &Chart,
    rounds: std::ops::Range<u64>,
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let fail = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("{e:?}");
    area.fill(&WHITE).map_err(fail)?;
    let values = chart
        .series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1));
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    let pad = ((hi - lo) * 0.08).max(hi.abs() * 0.02).max(1e-6);
    let y = (if lo >= 0.0 {
        (lo - pad).max(0.0)
    } else {
        lo - pad
    })..hi + pad;
    // Whole rounds on the x axis, with half a round of room on each side.
    let x = (rounds.start as f64 - 0.5)..(rounds.end as f64 + 0.5);
    let mut ctx = ChartBuilder::on(&area)
        .caption(chart.title, ("sans-serif", 22))
        .margin(14)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d(x, y)
        .map_err(fail)?;
    let span = rounds.end - rounds.start + 1;
    ctx.configure_mesh()
        .x_desc("round")
        .y_desc(chart.y_label)
        .x_labels(span.min(12) as usize + 1)
        .x_label_formatter(&|v| {
            if (v - v.round()).abs() < 1e-9 {
                format!("{}", v.round() as i64)
            } else {
                String::new()
            }
        })
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(fail)?;
    for (i, s) in chart.series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let points: Vec<(f64, f64)> = s.points.iter().map(|&(r, v)| (r as f64, v)).collect();
        ctx.draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
            .map_err(fail)?
            .label(s.label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
        ctx.draw_series(
            points
                .into_iter()
                .map(|p| Circle::new(p, 3, color.filled())),
        )
        .map_err(fail)?;
    }
    ctx.configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(fail)?;
    area.present().map_err(fail)?;
    Ok(())
}
