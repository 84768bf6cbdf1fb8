//! Builds the XDP program (lb-ebpf) for the BPF target with the nightly toolchain and
//! bpf-linker (`cargo xtask setup` installs both), so `include_bytes_aligned!` can embed it.
use anyhow::Context as _;
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let root = std::path::Path::new(&manifest_dir)
        .join("../lb-ebpf")
        .canonicalize()
        .context("finding lb-ebpf next to lb-userspace")?;
    let root = root.to_str().context("lb-ebpf path is not UTF-8")?;
    aya_build::build_ebpf(
        [Package {
            name: "lb-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        Toolchain::Custom("nightly"),
    )
}
