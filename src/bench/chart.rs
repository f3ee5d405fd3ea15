//! The PNG chart of a benchmark: latency percentiles and throughput against concurrency (or
//! request rate), one point per level. Text is drawn with DejaVu Sans embedded in the binary
//! (plotters' `ab_glyph` backend), so no system font library is needed.

use std::path::Path;

use plotters::coord::ranged1d::ValueFormatter;
use plotters::prelude::*;

use super::metrics::Summary;

/// DejaVu Sans (Bitstream Vera license, see assets/fonts/LICENSE).
const FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");

/// Draws `levels` into `path` (PNG, 1800 x 560): latency, token and request throughput.
pub fn draw(path: &Path, title: &str, levels: &[Summary]) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Display| format!("drawing {}: {e}", path.display());
    plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
        .map_err(|_| "the embedded font is not a valid TrueType font".to_owned())?;
    // The x axis: concurrency, or the request rate for Poisson levels.
    let by_rate = levels.iter().all(|l| l.request_rate.is_some());
    let xs: Vec<f64> = levels
        .iter()
        .map(|l| l.request_rate.unwrap_or(l.concurrency as f64))
        .collect();
    let (lo, hi) = xs
        .iter()
        .fold((f64::MAX, f64::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)));
    let x_range = (lo / 1.5).max(1e-3)..(hi * 1.5);
    let x_desc = if by_rate {
        "request rate (requests/s)"
    } else {
        "concurrent requests"
    };

    let root = BitMapBackend::new(path, (1800, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let root = root
        .titled(title, ("sans-serif", 22))
        .map_err(|e| err(&e))?;
    let panels = root.split_evenly((1, 3));
    let latency: [Series; 5] = [
        ("TTFT p50", RGBColor(31, 119, 180), |s| s.ttft_ms.p50),
        ("TTFT p99", RGBColor(174, 199, 232), |s| s.ttft_ms.p99),
        ("ITL p50", RGBColor(255, 127, 14), |s| s.itl_ms.p50),
        ("ITL p99", RGBColor(255, 187, 120), |s| s.itl_ms.p99),
        ("E2E p50", RGBColor(44, 160, 44), |s| s.e2e_ms.p50),
    ];
    let tokens: [Series; 2] = [
        ("output tokens/s", RGBColor(148, 103, 189), |s| {
            s.output_token_throughput
        }),
        ("all tokens/s", RGBColor(188, 189, 34), |s| {
            s.total_token_throughput
        }),
    ];
    let requests: [Series; 2] = [
        ("requests/s", RGBColor(140, 86, 75), |s| {
            s.request_throughput
        }),
        ("goodput", RGBColor(227, 119, 194), |s| s.goodput),
    ];
    let panel = Panel {
        levels,
        xs: &xs,
        x_range,
        x_desc,
    };
    panel
        .draw(&panels[0], "latency (ms, log scale)", "ms", true, &latency)
        .map_err(|e| err(&e))?;
    panel
        .draw(&panels[1], "token throughput", "tokens/s", false, &tokens)
        .map_err(|e| err(&e))?;
    panel
        .draw(
            &panels[2],
            "request throughput",
            "requests/s",
            false,
            &requests,
        )
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// A line of the chart: its legend, color and value per level.
type Series = (&'static str, RGBColor, fn(&Summary) -> f64);

/// What both panels share: the levels and the x axis.
struct Panel<'a> {
    levels: &'a [Summary],
    xs: &'a [f64],
    x_range: std::ops::Range<f64>,
    x_desc: &'static str,
}

type Area<'b> = DrawingArea<BitMapBackend<'b>, plotters::coord::Shift>;

impl Panel<'_> {
    /// One panel: `series` against the level, the y axis logarithmic if `log_y`.
    fn draw(
        &self,
        area: &Area<'_>,
        caption: &str,
        y_desc: &str,
        log_y: bool,
        series: &[Series],
    ) -> Result<(), String> {
        let y_max = self
            .levels
            .iter()
            .flat_map(|l| series.iter().map(move |(_, _, f)| f(l)))
            .fold(1.0f64, f64::max);
        let mut builder = ChartBuilder::on(area);
        builder
            .caption(caption, ("sans-serif", 18))
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(64);
        if log_y {
            let chart = builder
                .build_cartesian_2d(
                    self.x_range.clone().log_scale(),
                    (0.1f64..y_max * 2.0).log_scale(),
                )
                .map_err(|e| e.to_string())?;
            self.lines(chart, y_desc, series, 0.1)
        } else {
            let chart = builder
                .build_cartesian_2d(self.x_range.clone().log_scale(), 0f64..y_max * 1.15)
                .map_err(|e| e.to_string())?;
            self.lines(chart, y_desc, series, 0.0)
        }
    }

    fn lines<'c, Y>(
        &self,
        mut chart: ChartContext<'c, BitMapBackend<'c>, Cartesian2d<LogCoord<f64>, Y>>,
        y_desc: &str,
        series: &[Series],
        y_floor: f64,
    ) -> Result<(), String>
    where
        Y: Ranged<ValueType = f64> + ValueFormatter<f64>,
    {
        chart
            .configure_mesh()
            .x_labels(5)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .light_line_style(WHITE)
            .x_desc(self.x_desc)
            .y_desc(y_desc)
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(|e| e.to_string())?;
        for &(name, color, value) in series {
            let points: Vec<(f64, f64)> = self
                .levels
                .iter()
                .zip(self.xs)
                .map(|(l, &x)| (x, value(l).max(y_floor)))
                .collect();
            chart
                .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
                .map_err(|e| e.to_string())?
                .label(name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            chart
                .draw_series(points.iter().map(|&p| Circle::new(p, 4, color.filled())))
                .map_err(|e| e.to_string())?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .label_font(("sans-serif", 14))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| e.to_string())?;
        Ok(())
    }
}
