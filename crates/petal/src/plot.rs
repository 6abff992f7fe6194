//! `petal plot` (loss and accuracy per round of one or more runs) and the
//! heat map of `petal partitions`, drawn with plotters as SVG or PNG (by
//! the output file's extension).

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use plotters::coord::Shift;
use plotters::prelude::*;

/// Where Debian and most Linux systems keep a sans-serif TrueType font.
const FONTS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
];

/// Registers a system font for labels (once).
fn font() -> anyhow::Result<()> {
    static DONE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    DONE.get_or_init(|| {
        let candidates = std::env::var("PETAL_FONT")
            .ok()
            .into_iter()
            .chain(FONTS.iter().map(|s| s.to_string()));
        for path in candidates {
            if let Ok(bytes) = std::fs::read(&path) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return Ok(());
                }
            }
        }
        Err(
            "no TrueType font found for the labels: install fonts-dejavu-core or set \
             PETAL_FONT=/path/to/font.ttf"
                .to_string(),
        )
    })
    .clone()
    .map_err(|e| anyhow::anyhow!(e))
}

/// Points of a curve: (round, value).
type Points = Vec<(f64, f64)>;

/// One curve: a label and its points.
struct Series {
    label: String,
    points: Vec<(f64, f64)>,
    dashed: bool,
}

/// What `petal plot` draws of one run.
struct Run {
    name: String,
    loss: Vec<(f64, f64)>,
    accuracy: Vec<(f64, f64)>,
    central_loss: Vec<(f64, f64)>,
    central_accuracy: Vec<(f64, f64)>,
}

fn read_run(dir: &Path) -> anyhow::Result<Run> {
    let path = dir.join("history.json");
    let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
    let h: petal_core::History = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a Petal history", path.display()))?;
    let mut run = Run {
        name: dir.file_name().map_or_else(
            || dir.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        ),
        loss: Vec::new(),
        accuracy: Vec::new(),
        central_loss: Vec::new(),
        central_accuracy: Vec::new(),
    };
    if let Some(c) = &h.initial_centralized {
        run.central_loss.extend(c.loss.map(|l| (0.0, l)));
        run.central_accuracy
            .extend(c.metrics.get("accuracy").map(|a| (0.0, *a)));
    }
    for r in &h.rounds {
        let x = r.round as f64;
        run.loss.extend(r.loss.map(|v| (x, v)));
        run.accuracy.extend(r.accuracy.map(|v| (x, v)));
        if let Some(c) = &r.centralized {
            run.central_loss.extend(c.loss.map(|l| (x, l)));
            run.central_accuracy
                .extend(c.metrics.get("accuracy").map(|a| (x, *a)));
        }
    }
    Ok(run)
}

fn color(i: usize) -> RGBColor {
    const P: [RGBColor; 8] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
    ];
    P[i % P.len()]
}

/// One panel: `series` against the round.
fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    title: &str,
    y_label: &str,
    series: &[(usize, Series)],
    legend: SeriesLabelPosition,
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let all: Vec<(f64, f64)> = series.iter().flat_map(|(_, s)| s.points.clone()).collect();
    let x_max = all.iter().map(|p| p.0).fold(1.0, f64::max);
    let (mut y_min, mut y_max) = all
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    if all.is_empty() {
        (y_min, y_max) = (0.0, 1.0);
    }
    let pad = ((y_max - y_min) * 0.05).max(1e-3);
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..x_max, (y_min - pad)..(y_max + pad))
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    chart
        .configure_mesh()
        .x_desc("round")
        .x_label_formatter(&|x| {
            // Rounds are whole numbers: label only those.
            if (x - x.round()).abs() < 1e-9 {
                format!("{}", x.round())
            } else {
                String::new()
            }
        })
        .y_desc(y_label)
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    for (i, s) in series {
        let c = color(*i);
        let style = if s.dashed {
            c.mix(0.6).stroke_width(2)
        } else {
            c.stroke_width(2)
        };
        let drawn = if s.dashed {
            chart.draw_series(DashedLineSeries::new(s.points.clone(), 6, 4, style))
        } else {
            chart.draw_series(LineSeries::new(s.points.clone(), style))
        }
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let label = s.label.clone();
        drawn
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
        chart
            .draw_series(s.points.iter().map(|&p| Circle::new(p, 3, c.filled())))
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .position(legend)
        .draw()
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    Ok(())
}

fn draw_runs<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, runs: &[Run]) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let (left, right) = root.split_horizontally(root.dim_in_pixel().0 / 2);
    let pick = |f: &dyn Fn(&Run) -> (&Points, &Points)| -> Vec<(usize, Series)> {
        let mut out = Vec::new();
        for (i, r) in runs.iter().enumerate() {
            let (fed, central) = f(r);
            if !fed.is_empty() {
                out.push((
                    i,
                    Series {
                        label: format!("{} (federated)", r.name),
                        points: fed.clone(),
                        dashed: false,
                    },
                ));
            }
            if !central.is_empty() {
                out.push((
                    i,
                    Series {
                        label: format!("{} (centralized)", r.name),
                        points: central.clone(),
                        dashed: true,
                    },
                ));
            }
        }
        out
    };
    panel(
        &left,
        "Loss",
        "loss",
        &pick(&|r| (&r.loss, &r.central_loss)),
        SeriesLabelPosition::UpperRight,
    )?;
    panel(
        &right,
        "Accuracy",
        "accuracy",
        &pick(&|r| (&r.accuracy, &r.central_accuracy)),
        SeriesLabelPosition::LowerRight,
    )?;
    root.present().map_err(|e| anyhow::anyhow!("{e:?}"))?;
    Ok(())
}

/// `petal plot RUN... -o FILE`: loss and accuracy per round, federated
/// (solid) and centralized (dashed), each run its own color.
pub fn plot(runs: &[PathBuf], out: &Path, size: (u32, u32)) -> anyhow::Result<()> {
    if runs.is_empty() {
        bail!("name at least one run folder");
    }
    let runs: Vec<Run> = runs
        .iter()
        .map(|d| read_run(d))
        .collect::<anyhow::Result<_>>()?;
    font()?;
    match extension(out)?.as_str() {
        "svg" => draw_runs(SVGBackend::new(out, size).into_drawing_area(), &runs)?,
        _ => draw_runs(BitMapBackend::new(out, size).into_drawing_area(), &runs)?,
    }
    println!("wrote {}", out.display());
    Ok(())
}

fn extension(out: &Path) -> anyhow::Result<String> {
    let ext = out
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    if ext != "svg" && ext != "png" {
        bail!("{}: the output must end in .svg or .png", out.display());
    }
    Ok(ext)
}

/// A heat map of `counts[partition][class]` (examples per class per partition).
pub fn heatmap(counts: &[Vec<usize>], title: &str, out: &Path) -> anyhow::Result<()> {
    font()?;
    let rows = counts.len().max(1);
    let cols = counts.first().map_or(1, Vec::len).max(1);
    let size = (
        (160 + 28 * cols as u32).clamp(480, 2000),
        (120 + 14 * rows as u32).clamp(360, 4000),
    );
    let max = counts.iter().flatten().copied().max().unwrap_or(1).max(1) as f64;
    fn draw<DB: DrawingBackend>(
        root: DrawingArea<DB, Shift>,
        counts: &[Vec<usize>],
        title: &str,
        max: f64,
        rows: usize,
        cols: usize,
    ) -> anyhow::Result<()>
    where
        DB::ErrorType: 'static,
    {
        root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(-0.5..cols as f64 - 0.5, -0.5..rows as f64 - 0.5)
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        // Cells are centred on whole numbers: label only those.
        let whole = |v: &f64| {
            if (v - v.round()).abs() < 1e-9 {
                format!("{}", v.round())
            } else {
                String::new()
            }
        };
        chart
            .configure_mesh()
            .disable_mesh()
            .x_labels(cols.min(40))
            .y_labels(rows.min(40))
            .x_label_formatter(&whole)
            .y_label_formatter(&whole)
            .x_desc("class")
            .y_desc("partition")
            .label_style(("sans-serif", 13))
            .draw()
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        chart
            .draw_series(counts.iter().enumerate().flat_map(|(p, row)| {
                row.iter().enumerate().map(move |(c, &n)| {
                    let v = (n as f64 / max).sqrt();
                    let shade = (255.0 * (1.0 - v)) as u8;
                    let (c, p) = (c as f64, p as f64);
                    Rectangle::new(
                        [(c - 0.5, p - 0.5), (c + 0.5, p + 0.5)],
                        RGBColor(shade, shade, 255).filled(),
                    )
                })
            }))
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        root.present().map_err(|e| anyhow::anyhow!("{e:?}"))?;
        Ok(())
    }
    match extension(out)?.as_str() {
        "svg" => draw(
            SVGBackend::new(out, size).into_drawing_area(),
            counts,
            title,
            max,
            rows,
            cols,
        )?,
        _ => draw(
            BitMapBackend::new(out, size).into_drawing_area(),
            counts,
            title,
            max,
            rows,
            cols,
        )?,
    }
    Ok(())
}
