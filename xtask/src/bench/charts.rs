//! PNG charts of a run (plotters, bitmap backend): bars are medians, whiskers min–max.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use plotters::{
    coord::Shift,
    prelude::*,
    style::{FontStyle, register_font},
};

use super::{
    beds::{TrafficPath, Variant},
    report::{Results, Summary, fmt},
    workloads::{Kind, Workload},
};

const FONT: &str = "sans-serif";
const FONT_FILES: [&str; 2] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

/// Makes the text font known to plotters (once); fails if no DejaVu Sans is installed
/// (the bench installs fonts-dejavu-core with its other tools).
pub fn register_text_font() -> anyhow::Result<()> {
    static REGISTERED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            let path = FONT_FILES
                .iter()
                .find(|p| Path::new(p).exists())
                .ok_or_else(|| format!("no font for the charts: none of {FONT_FILES:?}"))?;
            let bytes = std::fs::read(path).map_err(|e| format!("{path}: {e}"))?;
            // plotters keeps fonts for the life of the process.
            register_font(FONT, FontStyle::Normal, Box::leak(bytes.into_boxed_slice()))
                .map_err(|_| format!("{path} is not a usable font"))
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

fn color(variant: Variant) -> RGBColor {
    match variant {
        Variant::Direct => RGBColor(140, 140, 140),
        Variant::Iptables => RGBColor(230, 115, 0),
        Variant::Nftables => RGBColor(150, 80, 180),
        Variant::LbTc => RGBColor(30, 110, 200),
        Variant::LbXdp => RGBColor(20, 160, 90),
    }
}

/// One bar series: a name, a colour and per group a summary (or nothing).
struct Series<'a> {
    name: String,
    color: RGBColor,
    values: Vec<Option<&'a Summary>>,
}

/// Writes the run's charts next to `stem` (`<stem>-throughput.png`, ...) and returns their paths.
pub fn write_all(results: &Results, stem: &Path) -> anyhow::Result<Vec<PathBuf>> {
    register_text_font()?;
    let path_for = |name: &str| {
        let mut file = stem.as_os_str().to_owned();
        file.push(format!("-{name}.png"));
        PathBuf::from(file)
    };
    let mut written = Vec::new();

    // Throughput: groups are path × Services, bars are variants.
    let throughput = path_for("throughput");
    let paths = [
        TrafficPath::ClusterIp,
        TrafficPath::NodePort,
        TrafficPath::ClusterIp6,
        TrafficPath::NodePort6,
    ];
    let (groups, per_group) = path_groups(results, Kind::Throughput, &paths);
    let series = variant_series(results, &per_group, "gbit_per_s");
    let note = footnote(results);
    let bar_chart = |path: &Path, title: &str, unit: &str, groups: &[String], series: &[Series]| {
        render(path, groups.len(), |root| {
            draw_bars(root, title, unit, groups, series, &note)
        })
    };
    bar_chart(
        &throughput,
        "TCP throughput to a pod on the other node (iperf3, one stream)",
        "Gbit/s",
        &groups,
        &series,
    )?;
    written.push(throughput);

    // Latency: groups are variants, bars are percentiles; one chart per path at the most
    // Services.
    let large = results.largest();
    let latency = path_for("latency");
    let mut groups = Vec::new();
    let mut percentiles: Vec<Series> = [("p50_us", "p50"), ("p90_us", "p90"), ("p99_us", "p99")]
        .iter()
        .zip([
            RGBColor(120, 170, 230),
            RGBColor(40, 110, 200),
            RGBColor(10, 40, 120),
        ])
        .map(|((_, name), color)| Series {
            name: (*name).to_owned(),
            color,
            values: Vec::new(),
        })
        .collect();
    for path in [TrafficPath::ClusterIp, TrafficPath::NodePort] {
        let workload = Workload {
            kind: Kind::RequestResponse,
            path,
        };
        for variant in Variant::ALL.into_iter().filter(|v| v.applies_to(path)) {
            groups.push(format!("{}\n{}", variant.label(), path.short_label(),));
            for (series, figure) in percentiles.iter_mut().zip(["p50_us", "p90_us", "p99_us"]) {
                series
                    .values
                    .push(results.find(large, variant, &workload.id(), figure));
            }
        }
    }
    bar_chart(
        &latency,
        &format!("Request/response round trip, 64-byte messages (sockperf), {large} Services"),
        "µs (lower is better)",
        &groups,
        &percentiles,
    )?;
    written.push(latency);

    // Connection rate against the number of Services.
    let connections = path_for("connections");
    render(&connections, 0, |root| {
        draw_connections(root, results, &note)
    })?;
    written.push(connections);

    // Small packets from the XDP generator.
    let packets = path_for("packets");
    let paths = [TrafficPath::NodePort, TrafficPath::ClusterIp];
    let (groups, per_group) = path_groups(results, Kind::SmallPackets, &paths);
    bar_chart(
        &packets,
        "UDP 64-byte packets node-1 forwards to a pod on the other node (XDP generator, 256 flows)",
        "packets/s forwarded by node-1",
        &groups,
        &variant_series(results, &per_group, "forwarded_pps"),
    )?;
    written.push(packets);
    let delivered = path_for("packets-delivered");
    bar_chart(
        &delivered,
        "UDP 64-byte packets delivered end to end to a pod on the other node (XDP generator)",
        "packets/s delivered to the pod",
        &groups,
        &variant_series(results, &per_group, "delivered_pps"),
    )?;
    written.push(delivered);

    // Per-packet program cost, one bar a scale.
    let cost = &results.program_cost;
    if !cost.rows.is_empty() {
        let programs = path_for("program-cost");
        let scales = cost.scales();
        let mut paths: Vec<(&str, &str)> = Vec::new();
        for row in cost.rows.iter().filter(|r| r.single_runs) {
            if !paths.contains(&(row.program.as_str(), row.path.as_str())) {
                paths.push((&row.program, &row.path));
            }
        }
        let summaries: Vec<Vec<Option<Summary>>> = scales
            .iter()
            .map(|&services| {
                paths
                    .iter()
                    .map(|(program, path)| {
                        cost.ns(program, path, services)
                            .map(|(median, min, max)| Summary {
                                services,
                                variant: Variant::LbTc,
                                workload: (*program).to_owned(),
                                figure: (*path).to_owned(),
                                median,
                                min,
                                max,
                                n: cost.rounds,
                            })
                    })
                    .collect()
            })
            .collect();
        let shades = [RGBColor(120, 170, 230), RGBColor(10, 60, 150)];
        let series: Vec<Series> = scales
            .iter()
            .zip(&summaries)
            .enumerate()
            .map(|(i, (services, values))| Series {
                name: format!("{services} Services"),
                color: shades[i.min(shades.len() - 1)],
                values: values.iter().map(Option::as_ref).collect(),
            })
            .collect();
        let groups: Vec<String> = paths
            .iter()
            .map(|(program, path)| format!("{program}\n{path}"))
            .collect();
        bar_chart(
            &programs,
            "Per-packet cost of each program path: BPF_PROG_TEST_RUN single runs, full conntrack",
            "ns a packet (lower is better)",
            &groups,
            &series,
        )?;
        written.push(programs);
    }
    Ok(written)
}

/// Chart groups of path × Services for `kind`: their labels and what each shows.
fn path_groups(
    results: &Results,
    kind: Kind,
    paths: &[TrafficPath],
) -> (Vec<String>, Vec<(Workload, usize)>) {
    paths
        .iter()
        .flat_map(|&path| {
            results.method.service_counts.iter().map(move |&services| {
                (
                    format!("{}\n{services} Services", path.short_label()),
                    (Workload { kind, path }, services),
                )
            })
        })
        .unzip()
}

/// One series per variant, over groups of (workload, Services).
fn variant_series<'a>(
    results: &'a Results,
    groups: &[(Workload, usize)],
    figure: &str,
) -> Vec<Series<'a>> {
    Variant::ALL
        .into_iter()
        .filter(|v| groups.iter().any(|(w, _)| v.applies_to(w.path)))
        .map(|variant| Series {
            name: variant.label().to_owned(),
            color: color(variant),
            values: groups
                .iter()
                .map(|(workload, services)| {
                    results.find(*services, variant, &workload.id(), figure)
                })
                .collect(),
        })
        .collect()
}

/// What every chart says under it: how its figures were made.
fn footnote(results: &Results) -> String {
    format!(
        "Median of {} round(s); whiskers: min–max. Veth testbed of network namespaces on {} \
         shared cores ({}), kernel {}.",
        results.method.rounds, results.machine.cpus, results.machine.cpu, results.machine.kernel
    )
}

/// Draws a PNG at `path` with `draw`: 1200x680, wider when `groups` x-axis groups need the
/// room for their labels.
fn render(
    path: &Path,
    groups: usize,
    draw: impl FnOnce(&DrawingArea<BitMapBackend, Shift>) -> DrawResult,
) -> anyhow::Result<()> {
    let width = (groups as u32 * 190).max(1200);
    let root = BitMapBackend::new(path, (width, 680)).into_drawing_area();
    draw(&root)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("drawing {}", path.display()))?;
    root.present()
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("writing {}", path.display()))
}

type DrawResult = Result<(), Box<dyn std::error::Error>>;

fn draw_bars(
    root: &DrawingArea<BitMapBackend, Shift>,
    title: &str,
    unit: &str,
    groups: &[String],
    series: &[Series],
    note: &str,
) -> DrawResult {
    root.fill(&WHITE)?;
    let (root, under) = root.split_vertically(root.dim_in_pixel().1 - 28);
    draw_note(&under, note)?;
    let root = &root;
    let top = series
        .iter()
        .flat_map(|s| s.values.iter().flatten())
        .map(|s| s.max)
        .fold(0.0_f64, f64::max)
        .max(1e-9)
        // Headroom for the value labels and the legend.
        * 1.35;
    let mut chart = ChartBuilder::on(root)
        .caption(title, (FONT, 22))
        .margin(16)
        .x_label_area_size(56)
        .y_label_area_size(80)
        .build_cartesian_2d(0.0..groups.len() as f64, 0.0..top)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_desc(unit)
        .y_label_formatter(&|v| fmt(*v))
        .label_style((FONT, 14))
        .draw()?;

    let width = 0.8 / series.len().max(1) as f64;
    for (index, s) in series.iter().enumerate() {
        let color = s.color;
        let offset = 0.1 + index as f64 * width;
        chart
            .draw_series(s.values.iter().enumerate().filter_map(|(g, v)| {
                v.map(|v| {
                    let x = g as f64 + offset;
                    Rectangle::new([(x, 0.0), (x + width * 0.9, v.median)], color.filled())
                })
            }))?
            .label(s.name.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 12, y + 6)], color.filled()));
        // Whiskers (min–max) and the median's value.
        for (g, v) in s.values.iter().enumerate() {
            let Some(v) = v else { continue };
            let x = g as f64 + offset + width * 0.45;
            if v.n > 1 {
                chart.draw_series(std::iter::once(PathElement::new(
                    vec![(x, v.min), (x, v.max)],
                    BLACK.stroke_width(2),
                )))?;
            }
            chart.draw_series(std::iter::once(Text::new(
                fmt(v.median),
                (x, v.max.max(v.median) + top * 0.01),
                TextStyle::from((FONT, 12)).pos(plotters::style::text_anchor::Pos::new(
                    plotters::style::text_anchor::HPos::Center,
                    plotters::style::text_anchor::VPos::Bottom,
                )),
            )))?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font((FONT, 14))
        .draw()?;
    // Group names under the axis, centred on each group, one text line per `\n`.
    for (g, name) in groups.iter().enumerate() {
        let (px, py) = chart.backend_coord(&(g as f64 + 0.5, 0.0));
        for (line_index, line) in name.lines().enumerate() {
            root.draw(&Text::new(
                line.to_owned(),
                (px, py + 8 + 17 * line_index as i32),
                TextStyle::from((FONT, 14)).pos(plotters::style::text_anchor::Pos::new(
                    plotters::style::text_anchor::HPos::Center,
                    plotters::style::text_anchor::VPos::Top,
                )),
            ))?;
        }
    }
    Ok(())
}

/// The footnote line at the bottom of a chart.
fn draw_note(area: &DrawingArea<BitMapBackend, Shift>, note: &str) -> DrawResult {
    area.draw(&Text::new(
        note.to_owned(),
        (16, 4),
        TextStyle::from((FONT, 13)).color(&RGBColor(70, 70, 70)),
    ))?;
    Ok(())
}

/// New connections per second (ClusterIP path) against the number of Services, one line per
/// variant, log scale in Services.
fn draw_connections(
    root: &DrawingArea<BitMapBackend, Shift>,
    results: &Results,
    note: &str,
) -> DrawResult {
    root.fill(&WHITE)?;
    let (root, under) = root.split_vertically(root.dim_in_pixel().1 - 28);
    draw_note(&under, note)?;
    let root = &root;
    let workload = Workload {
        kind: Kind::ConnectionRate,
        path: TrafficPath::ClusterIp,
    }
    .id();
    let counts = &results.method.service_counts;
    let lines: Vec<(Variant, Vec<(f64, &Summary)>)> = Variant::ALL
        .into_iter()
        .filter(|v| v.applies_to(TrafficPath::ClusterIp))
        .map(|variant| {
            let points = counts
                .iter()
                .filter_map(|&n| {
                    results
                        .find(n, variant, &workload, "per_s")
                        .map(|s| (n as f64, s))
                })
                .collect();
            (variant, points)
        })
        .collect();
    let top = lines
        .iter()
        .flat_map(|(_, p)| p.iter().map(|(_, s)| s.max))
        .fold(0.0_f64, f64::max)
        .max(1.0)
        * 1.15;
    let (low, high) = (
        counts.iter().copied().min().unwrap_or(1).max(1) as f64 / 1.5,
        counts.iter().copied().max().unwrap_or(10).max(2) as f64 * 1.5,
    );
    let mut chart = ChartBuilder::on(root)
        .caption(
            "New TCP connections per second, pod → ClusterIP → remote pod (closed with RST)",
            (FONT, 22),
        )
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .build_cartesian_2d((low..high).log_scale(), 0.0..top)?;
    chart
        .configure_mesh()
        .x_desc("Services programmed (log scale)")
        .y_desc("connections/s")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| fmt(*v))
        .label_style((FONT, 14))
        .draw()?;
    for (variant, points) in &lines {
        let color = color(*variant);
        chart
            .draw_series(LineSeries::new(
                points.iter().map(|(x, s)| (*x, s.median)),
                color.stroke_width(3),
            ))?
            .label(variant.label())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(3))
            });
        chart.draw_series(
            points
                .iter()
                .map(|(x, s)| Circle::new((*x, s.median), 5, color.filled())),
        )?;
        chart.draw_series(points.iter().filter(|(_, s)| s.n > 1).map(|(x, s)| {
            PathElement::new(vec![(*x, s.min), (*x, s.max)], color.stroke_width(2))
        }))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font((FONT, 14))
        .draw()?;
    Ok(())
}
