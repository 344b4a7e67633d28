//! The console's charts, drawn with `plotters` into SVG on the server:
//! the page embeds them, so they need no script and print as they show.
//! A chart that cannot be drawn says so in its place instead of failing
//! the page.

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::service::Minute;

/// Chart size in SVG user units (the CSS scales it to the page).
const SIZE: (u32, u32) = (640, 240);
const CALLS: RGBColor = RGBColor(37, 99, 235);
const ERRORS: RGBColor = RGBColor(220, 38, 38);
const SLOW: RGBColor = RGBColor(217, 119, 6);
const USED: RGBColor = RGBColor(22, 163, 74);

type Drawn = Result<(), Box<dyn std::error::Error>>;

/// Draws into an SVG string with `draw`; a failure becomes a small SVG
/// that says so.
fn svg(draw: impl FnOnce(&DrawingArea<SVGBackend<'_>, Shift>) -> Drawn) -> String {
    let mut out = String::new();
    let result = {
        let root = SVGBackend::with_string(&mut out, SIZE).into_drawing_area();
        root.fill(&WHITE)
            .map_err(Into::into)
            .and_then(|()| draw(&root))
            .and_then(|()| root.present().map_err(Into::into))
    };
    match result {
        Ok(()) => out,
        Err(error) => {
            tracing::warn!(%error, "a console chart could not be drawn");
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="640" height="40"><text x="8" y="24">This chart could not be drawn.</text></svg>"#.to_owned()
        }
    }
}

/// The x coordinate of a minute: minutes before the last one (≤ 0).
fn minutes_ago(minutes: &[Minute]) -> impl Iterator<Item = (i32, &Minute)> {
    let last = minutes.len();
    minutes
        .iter()
        .enumerate()
        .map(move |(i, m)| (i as i32 + 1 - last as i32, m))
}

/// One line of a per-minute chart.
struct Line {
    label: &'static str,
    colour: RGBColor,
    value: fn(&Minute) -> f64,
    /// Minutes without calls are left out (a latency has no value there).
    only_with_calls: bool,
}

/// Lines over the minutes, oldest left, the last minute at 0; `whole`
/// for counts (whole-number ticks only).
fn per_minute(minutes: &[Minute], y_desc: &str, whole: bool, lines: &[Line]) -> String {
    svg(|root| {
        let top = lines
            .iter()
            .flat_map(|line| minutes.iter().map(line.value))
            .fold(0.0_f64, f64::max)
            .max(1.0);
        let left = 1 - minutes.len().max(1) as i32;
        let mut chart = ChartBuilder::on(root)
            .margin(12)
            .x_label_area_size(32)
            .y_label_area_size(52)
            .build_cartesian_2d(left..0, 0.0..top * 1.1)?;
        chart
            .configure_mesh()
            .x_desc("minutes ago")
            .y_desc(y_desc)
            .y_label_formatter(&whole_ticks(whole))
            .light_line_style(WHITE.mix(0.0))
            .draw()?;
        for line in lines {
            let style = line.colour.stroke_width(2);
            let points = minutes_ago(minutes)
                .filter(|(_, m)| !line.only_with_calls || m.calls > 0)
                .map(|(x, m)| (x, (line.value)(m)));
            chart
                // Points where minutes are left out: a lone minute with
                // calls still shows.
                .draw_series(
                    LineSeries::new(points, style).point_size(if line.only_with_calls {
                        2
                    } else {
                        0
                    }),
                )?
                .label(line.label)
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], style));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK.mix(0.3))
            .draw()?;
        Ok(())
    })
}

/// Calls and failed calls per minute.
pub(super) fn calls_per_minute(minutes: &[Minute]) -> String {
    per_minute(
        minutes,
        "calls",
        true,
        &[
            Line {
                label: "calls",
                colour: CALLS,
                value: |m| m.calls as f64,
                only_with_calls: false,
            },
            Line {
                label: "failed",
                colour: ERRORS,
                value: |m| m.errors as f64,
                only_with_calls: false,
            },
        ],
    )
}

/// Median and 95th percentile latency per minute, in milliseconds.
pub(super) fn latency_per_minute(minutes: &[Minute]) -> String {
    per_minute(
        minutes,
        "ms",
        false,
        &[
            Line {
                label: "p50",
                colour: CALLS,
                value: |m| m.p50_ms,
                only_with_calls: true,
            },
            Line {
                label: "p95",
                colour: SLOW,
                value: |m| m.p95_ms,
                only_with_calls: true,
            },
        ],
    )
}

/// Tick labels of a value axis: counts (`whole`) label only their
/// whole-number ticks.
fn whole_ticks(whole: bool) -> impl Fn(&f64) -> String {
    move |y| match (whole, y.fract() == 0.0) {
        (true, true) => format!("{y:.0}"),
        (true, false) => String::new(),
        (false, _) => format!("{y}"),
    }
}

/// One bar of a bar chart: its label, its height (`None` draws none) and
/// its colour.
struct Bar {
    label: String,
    value: Option<f64>,
    colour: RGBColor,
}

/// Labelled bars on an axis from 0 to `top`; whole-number ticks when
/// `whole` (counts).
fn labelled_bars(bars: &[Bar], top: f64, y_desc: &str, whole: bool) -> String {
    svg(|root| {
        let n = bars.len().max(1) as u32;
        let label = |value: &SegmentValue<u32>| match value {
            SegmentValue::CenterOf(i) => bars
                .get(*i as usize)
                .map(|bar| bar.label.clone())
                .unwrap_or_default(),
            _ => String::new(),
        };
        let mut chart = ChartBuilder::on(root)
            .margin(12)
            .x_label_area_size(32)
            .y_label_area_size(44)
            .build_cartesian_2d((0..n).into_segmented(), 0.0..top)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(bars.len().max(1))
            .x_label_formatter(&label)
            // Counts tick at whole numbers only.
            .y_labels(if whole {
                (top as usize).clamp(1, 10)
            } else {
                10
            })
            .y_label_formatter(&whole_ticks(whole))
            .y_desc(y_desc)
            .light_line_style(WHITE.mix(0.0))
            .draw()?;
        chart.draw_series(bars.iter().enumerate().filter_map(|(i, bar)| {
            let i = i as u32;
            let mut drawn = Rectangle::new(
                [
                    (SegmentValue::Exact(i), 0.0),
                    (SegmentValue::Exact(i + 1), bar.value?),
                ],
                bar.colour.filled(),
            );
            drawn.set_margin(0, 0, 12, 12);
            Some(drawn)
        }))?;
        Ok(())
    })
}

/// Counts by label as bars: calls by outcome, say. `ok_label` is drawn in
/// the success colour, the rest in the failure colour.
pub(super) fn bars(counts: &[(String, u64)], y_desc: &str, ok_label: Option<&str>) -> String {
    let top = counts.iter().map(|(_, c)| *c).max().unwrap_or(0).max(1);
    let bars: Vec<Bar> = counts
        .iter()
        .map(|(name, count)| Bar {
            label: name.clone(),
            value: Some(*count as f64),
            colour: if Some(name.as_str()) == ok_label {
                USED
            } else {
                ERRORS
            },
        })
        .collect();
    labelled_bars(&bars, (top + top.div_ceil(10)) as f64, y_desc, true)
}

/// How much of each quota is used, in percent: one bar per (label, used,
/// limit); a limit of zero means no quota and draws no bar.
pub(super) fn quotas(items: &[(String, f64, f64)]) -> String {
    let bars: Vec<Bar> = items
        .iter()
        .map(|(name, used, limit)| {
            let share = (*limit > 0.0).then(|| (used / limit * 100.0).clamp(0.0, 100.0));
            Bar {
                label: name.clone(),
                value: share,
                colour: if share.is_some_and(|s| s >= 90.0) {
                    ERRORS
                } else {
                    USED
                },
            }
        })
        .collect();
    labelled_bars(&bars, 100.0, "% of quota", false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_are_svg_with_their_series_and_labels() {
        let minutes: Vec<Minute> = (0..61)
            .map(|i| Minute {
                at: i * 60_000,
                calls: i % 7,
                errors: u64::from(i % 7 == 3),
                p50_ms: 1.5,
                p95_ms: 4.0,
            })
            .collect();
        for chart in [calls_per_minute(&minutes), latency_per_minute(&minutes)] {
            assert!(chart.starts_with("<svg"), "{chart}");
            assert!(chart.contains("<polyline"), "{chart}");
            assert!(chart.contains("minutes ago"));
        }
        let outcomes = bars(
            &[("ok".into(), 40), ("<trap>".into(), 3)],
            "calls",
            Some("ok"),
        );
        assert!(outcomes.contains("<rect"));
        // Guests choose error codes: their text is escaped.
        assert!(outcomes.contains("&lt;trap&gt;") && !outcomes.contains("<trap>"));
        let quota = quotas(&[
            ("memory".into(), 50.0, 100.0),
            ("no quota".into(), 1.0, 0.0),
        ]);
        assert!(quota.contains("<rect") && quota.contains("% of quota"));
    }

    #[test]
    fn empty_data_still_draws() {
        assert!(calls_per_minute(&[]).starts_with("<svg"));
        assert!(latency_per_minute(&[]).starts_with("<svg"));
        assert!(bars(&[], "calls", None).starts_with("<svg"));
        assert!(quotas(&[]).starts_with("<svg"));
    }
}
