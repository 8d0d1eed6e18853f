//! Copies the BPF object produced by `cargo xtask build-ebpf` into OUT_DIR so
//! the crate can embed it, and rebuilds whenever that object changes.

use std::{env, fs, path::PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=MESH_EBPF_OBJECT");
    let object = env::var_os("MESH_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"))
                .join("../target/ebpf/bpfel-unknown-none/release/mesh-ebpf")
        });
    println!("cargo:rerun-if-changed={}", object.display());
    let out =
        PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("mesh-ebpf.o");
    if let Err(err) = fs::copy(&object, &out) {
        panic!(
            "the BPF object {} is missing ({err}); run `cargo xtask build-ebpf` first",
            object.display()
        );
    }
}
