#![no_std]
//! The XDP program is the `xlb` binary in src/main.rs. This empty library exists so
//! lb-userspace can list lb-ebpf as a build-dependency and cargo rebuilds the object
//! when these sources change.
