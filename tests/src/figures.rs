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
