//! `pagoda bench --plot FILE.png`: output throughput and TTFT p50 against concurrency, one
//! line per target (in-process, nats, llama-server, …). Drawn with plotters' bitmap
//! backend; text uses DejaVu Sans (a subset, `assets/fonts/`), embedded in the binary, so
//! no system font library or font file is needed.

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;
use plotters::style::FontStyle;

use super::BenchReport;

static FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans-subset.ttf");

#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("nothing to plot: no successful run")]
    Empty,
    #[error("drawing {path}: {message}")]
    Draw { path: String, message: String },
}

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        for style in [FontStyle::Normal, FontStyle::Bold] {
            // The font is a constant known to parse (a unit test renders with it).
            let _ = plotters::style::register_font("sans-serif", style, FONT);
        }
    });
}

/// The line colour of a target: fixed for the known ones, so plots compare at a glance.
fn colour(target: &str, i: usize) -> RGBColor {
    match target {
        "in-process" => RGBColor(31, 119, 180),
        "nats" => RGBColor(44, 160, 44),
        "llama-server" => RGBColor(214, 39, 40),
        _ => {
            let (r, g, b) = Palette99::pick(i + 3).rgb();
            RGBColor(r, g, b)
        }
    }
}

/// One line of the plot: a target's points, sorted by concurrency.
struct Line {
    target: String,
    /// (concurrency, output tok/s, TTFT p50 in seconds)
    points: Vec<(f64, f64, f64)>,
}

fn lines(reports: &[BenchReport]) -> Vec<Line> {
    let mut out: Vec<Line> = Vec::new();
    for r in reports.iter().filter(|r| r.successful > 0) {
        let p = (
            r.max_concurrency as f64,
            r.output_throughput,
            r.ttft_ms.p50 / 1e3,
        );
        match out.iter_mut().find(|l| l.target == r.target) {
            Some(l) => l.points.push(p),
            None => out.push(Line {
                target: r.target.clone(),
                points: vec![p],
            }),
        }
    }
    for l in &mut out {
        l.points.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    out
}

/// The workload, from the first report that says.
fn title(reports: &[BenchReport]) -> String {
    let Some(r) = reports.iter().find(|r| !r.dataset.is_empty()) else {
        return "pagoda bench".into();
    };
    let prompts = match (r.input_len, r.prefix_len) {
        (Some(i), Some(p)) if p > 0 => format!("random prompts of {i} tokens ({p} shared)"),
        (Some(i), _) => format!("random prompts of {i} tokens"),
        _ => format!("prompts from {}", r.dataset),
    };
    let rate = match r.request_rate {
        Some(x) => format!("{x} req/s Poisson"),
        None => "all at once".into(),
    };
    format!(
        "pagoda bench: {prompts}, {} output tokens{}, {rate}",
        r.output_len,
        if r.ignore_eos { " (ignore_eos)" } else { "" }
    )
}

/// Draws `reports` into a PNG at `path`.
pub fn plot(reports: &[BenchReport], path: &Path) -> Result<(), PlotError> {
    let lines = lines(reports);
    if lines.is_empty() {
        return Err(PlotError::Empty);
    }
    register_font();
    let err = |e: &dyn std::fmt::Display| PlotError::Draw {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    let root = BitMapBackend::new(path, (1400, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let body = root
        .titled(&title(reports), ("sans-serif", 20))
        .map_err(|e| err(&e))?;
    let (left, right) = body.split_horizontally(700);

    let mut xs: Vec<f64> = lines
        .iter()
        .flat_map(|l| l.points.iter().map(|p| p.0))
        .collect();
    xs.sort_by(|a, b| a.total_cmp(b));
    xs.dedup();
    let (x_lo, x_hi) = (xs[0] / 1.6, xs[xs.len() - 1] * 1.6);

    type Pick = fn(&(f64, f64, f64)) -> f64;
    let panels: [(&DrawingArea<BitMapBackend, _>, &str, &str, Pick); 2] = [
        (
            &left,
            "Output throughput",
            "output tokens/s (all streams)",
            |p| p.1,
        ),
        (&right, "Time to first token (p50)", "TTFT p50 (s)", |p| p.2),
    ];
    for (area, title, y_desc, pick) in panels {
        let y_max = lines
            .iter()
            .flat_map(|l| l.points.iter().map(pick))
            .fold(0.0f64, f64::max);
        let y_hi = if y_max > 0.0 { y_max * 1.15 } else { 1.0 };
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 24))
            .margin(16)
            .x_label_area_size(48)
            .y_label_area_size(72)
            .build_cartesian_2d(
                (x_lo..x_hi).log_scale().with_key_points(xs.clone()),
                0.0..y_hi,
            )
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc("concurrency (requests in flight)")
            .y_desc(y_desc)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| {
                if y_hi >= 100.0 {
                    format!("{y:.0}")
                } else if y_hi >= 1.0 {
                    format!("{y:.1}")
                } else {
                    format!("{y:.3}")
                }
            })
            .label_style(("sans-serif", 15))
            .axis_desc_style(("sans-serif", 16))
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(|e| err(&e))?;
        for (i, l) in lines.iter().enumerate() {
            let c = colour(&l.target, i);
            let pts: Vec<(f64, f64)> = l.points.iter().map(|p| (p.0, pick(p))).collect();
            chart
                .draw_series(LineSeries::new(pts.clone(), c.stroke_width(3)))
                .map_err(|e| err(&e))?
                .label(l.target.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 24, y)], c.stroke_width(3))
                });
            chart
                .draw_series(pts.into_iter().map(|p| Circle::new(p, 5, c.filled())))
                .map_err(|e| err(&e))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .label_font(("sans-serif", 15))
            .draw()
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
