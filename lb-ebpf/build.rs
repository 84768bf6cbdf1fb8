//! Link options of the BPF build.
//!
//! bpf-linker passes LLVM `--bpf-expand-memcpy-in-order` unless told not to, which turns
//! off LLVM's expansion of every `memset` into stores: each zeroed struct (a `Default`, an
//! address's IPv4-mapped prefix) then became a call to the builtin `memset`, a loop of one
//! byte per iteration (48 iterations for a `Rewrite`, on every packet). Without it LLVM
//! writes the zeroes in place, a word at a time where alignment allows.
fn main() {
    if std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() == Ok("bpf") {
        println!("cargo:rustc-link-arg=--disable-expand-memcpy-in-order");
    }
}
