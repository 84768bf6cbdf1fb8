//! Where the benchmarks record their figures: `docs/benchmarks/<date>.json` for a full run
//! (`cargo xtask bench`), `docs/benchmarks/quick.json` for a quick or smoke run (not
//! committed). Each benchmark binary merges its own top-level keys into the file, so the
//! per-packet and the TCP benchmarks of one run end up side by side in one file.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};

/// How a benchmark binary was asked to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Run {
    /// `cargo xtask bench`: full sizes, figures to `<date>.json`.
    Full,
    /// `cargo xtask bench --quick`: small sizes, release build.
    Quick,
    /// Under `cargo test`: the smallest sizes, to keep the benchmark working.
    Smoke,
}

impl Run {
    /// From the binary's arguments: `cargo bench` passes `--bench`, `cargo xtask bench
    /// --quick` adds `--quick`, `cargo test` neither.
    pub fn from_args() -> Run {
        let args: Vec<String> = std::env::args().collect();
        if args.iter().any(|a| a == "--quick") {
            Run::Quick
        } else if args.iter().any(|a| a == "--bench") {
            Run::Full
        } else {
            Run::Smoke
        }
    }

    pub fn command(self) -> &'static str {
        match self {
            Run::Full => "cargo xtask bench",
            Run::Quick => "cargo xtask bench --quick",
            Run::Smoke => "cargo xtask test (the benchmarks' smoke run, a debug build)",
        }
    }

    /// The file this run's figures go to.
    pub fn file(self) -> PathBuf {
        let name = match self {
            Run::Full => format!("{}.json", today()),
            Run::Quick | Run::Smoke => "quick.json".into(),
        };
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../docs/benchmarks")
            .join(name)
    }

    /// Merges `figures`' top-level keys into this run's file (made if missing; a file of an
    /// earlier day's format that does not parse is replaced). Returns its path.
    pub fn record(self, figures: &serde_json::Value) -> Result<PathBuf> {
        let path = self.file();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut all: serde_json::Value = std::fs::read_to_string(&path)
            .ok()
            .and_then(|text| serde_json::from_str(&text).ok())
            .filter(serde_json::Value::is_object)
            .unwrap_or_else(|| serde_json::json!({}));
        if let (Some(all), Some(new)) = (all.as_object_mut(), figures.as_object()) {
            for (key, value) in new {
                all.insert(key.clone(), value.clone());
            }
        }
        std::fs::write(&path, serde_json::to_string_pretty(&all)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }
}

/// Today's date (UTC), YYYY-MM-DD.
pub fn today() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%F"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| "undated".into())
}

/// What the numbers were measured on: "CPU, N cores, Linux VERSION".
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cpu}, {cores} cores, Linux {}", kernel.trim())
}

/// The font the charts' text is drawn with (Debian's fonts-dejavu-core, which
/// `cargo xtask setup` installs).
const CHART_FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

impl Run {
    /// Where this run's chart called `name` goes: `docs/benchmarks/<date>-<name>.png` for a
    /// full run, `docs/benchmarks/quick-<name>.png` (not committed) otherwise.
    pub fn chart_file(self, name: &str) -> PathBuf {
        let stem = match self {
            Run::Full => today(),
            Run::Quick | Run::Smoke => "quick".into(),
        };
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../docs/benchmarks")
            .join(format!("{stem}-{name}.png"))
    }
}

/// Draws `bars` (label, value) as a bar chart with `title`, the values in `unit`, to the PNG
/// file `path`.
pub fn bar_chart(path: &Path, title: &str, unit: &str, bars: &[(String, f64)]) -> Result<()> {
    use plotters::prelude::*;

    let font = std::fs::read(CHART_FONT)
        .with_context(|| format!("reading {CHART_FONT} (run cargo xtask setup)"))?;
    // The font must outlive every chart: it is read once per process.
    let font: &'static [u8] = Box::leak(font.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, font)
        .map_err(|_| anyhow::anyhow!("{CHART_FONT} is not a font ab_glyph can read"))?;

    let draw = || -> std::result::Result<(), Box<dyn std::error::Error + '_>> {
        let root = BitMapBackend::new(path, (900, 440)).into_drawing_area();
        root.fill(&WHITE)?;
        let top = bars.iter().map(|b| b.1).fold(0.0, f64::max) * 1.2;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(16)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(
                (0..bars.len().saturating_sub(1)).into_segmented(),
                0.0..top.max(1e-9),
            )?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(bars.len())
            .x_label_formatter(&|v| match v {
                SegmentValue::CenterOf(i) => bars.get(*i).map_or(String::new(), |b| b.0.clone()),
                _ => String::new(),
            })
            .y_desc(unit)
            .label_style(("sans-serif", 15))
            .draw()?;
        chart.draw_series(bars.iter().enumerate().map(|(i, (_, v))| {
            let mut bar = Rectangle::new(
                [
                    (SegmentValue::Exact(i), 0.0),
                    (SegmentValue::Exact(i + 1), *v),
                ],
                BLUE.mix(0.55).filled(),
            );
            bar.set_margin(0, 0, 14, 14);
            bar
        }))?;
        chart.draw_series(bars.iter().enumerate().map(|(i, (_, v))| {
            Text::new(
                format!("{v:.2}"),
                (SegmentValue::CenterOf(i), *v + top * 0.03),
                ("sans-serif", 15),
            )
        }))?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| anyhow::anyhow!("drawing {}: {e}", path.display()))
}
