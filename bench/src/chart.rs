//! The picture: latency percentiles per topology, one panel per constant-rate scenario, as SVG.

use plotters::prelude::*;

use crate::loadgen::Protocol;
use crate::run::RunResult;
use crate::stats::{PERCENTILE_LABELS, Spread};

/// Errors drawing the chart.
#[derive(Debug, thiserror::Error)]
#[error("chart: {0}")]
pub struct ChartError(String);

fn err(e: impl std::fmt::Display) -> ChartError {
    ChartError(e.to_string())
}

/// One line of a panel: a topology's median latency at each percentile.
struct Line {
    name: &'static str,
    values: Vec<f64>,
}

fn lines(result: &RunResult, protocol: Protocol, rate: u64) -> Vec<Line> {
    result
        .topologies
        .iter()
        .filter_map(|run| {
            let per_round: Vec<[f64; 5]> = run
                .rounds
                .iter()
                .flatten()
                .filter_map(|round| {
                    round
                        .fixed
                        .iter()
                        .find(|f| f.protocol == protocol && f.rate == rate)
                        .map(|f| f.latency.percentiles())
                })
                .collect();
            let values: Option<Vec<f64>> = (0..5)
                .map(|i| {
                    let at: Vec<f64> = per_round.iter().map(|p| p[i]).collect();
                    Spread::of(&at).map(|s| s.median)
                })
                .collect();
            values.map(|values| Line {
                name: run.topology.name(),
                values,
            })
        })
        .collect()
}

/// Draws the chart and returns the SVG text.
pub fn render_svg(result: &RunResult) -> Result<String, ChartError> {
    let plan = &result.plan;
    let panels: Vec<(Protocol, u64)> = plan
        .rates
        .iter()
        .flat_map(|&rate| plan.fixed_protocols.iter().map(move |&p| (p, rate)))
        .collect();
    let columns = plan.fixed_protocols.len().max(1);
    let rows = panels.len().div_ceil(columns).max(1);
    let mut svg = String::new();
    {
        let size = (560 * columns as u32, 420 * rows as u32);
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let areas = root.split_evenly((rows, columns));
        for (area, (protocol, rate)) in areas.iter().zip(&panels) {
            draw_panel(area, &lines(result, *protocol, *rate), *protocol, *rate)?;
        }
        root.present().map_err(err)?;
    }
    Ok(svg)
}

fn draw_panel(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    lines: &[Line],
    protocol: Protocol,
    rate: u64,
) -> Result<(), ChartError> {
    let all = lines.iter().flat_map(|l| l.values.iter().copied());
    let top = all.clone().fold(0.1_f64, f64::max) * 2.0;
    let bottom = all.fold(f64::INFINITY, f64::min).clamp(0.001, 1.0) / 2.0;
    let mut chart = ChartBuilder::on(area)
        .caption(
            format!("{} at {rate} req/s: latency (ms, log)", protocol.label()),
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(28)
        .y_label_area_size(52)
        .build_cartesian_2d(-0.2_f64..4.2_f64, (bottom..top).log_scale())
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_labels(5)
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 0.01 && (0.0..5.0).contains(&i) {
                PERCENTILE_LABELS[i as usize].to_string()
            } else {
                String::new()
            }
        })
        .y_label_formatter(&|y| format!("{y}"))
        .draw()
        .map_err(err)?;
    for (index, line) in lines.iter().enumerate() {
        let color = Palette99::pick(index).to_rgba();
        let points: Vec<(f64, f64)> = line
            .values
            .iter()
            .enumerate()
            .map(|(i, v)| (i as f64, v.max(bottom)))
            .collect();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
            .map_err(err)?
            .label(line.name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
            });
        chart
            .draw_series(
                points
                    .into_iter()
                    .map(|p| Circle::new(p, 3, color.filled())),
            )
            .map_err(err)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    Ok(())
}
