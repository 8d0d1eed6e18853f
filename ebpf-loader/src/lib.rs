//! The mesh's BPF object, embedded at build time, and typed handles to load,
//! attach and pin its programs.
//!
//! Everything attached here is pinned in bpffs under a directory the caller
//! owns, so programs stay attached and maps keep their contents when the
//! process that loaded them exits or restarts; removing the directory's pins
//! detaches them.

pub mod bpffs;
pub mod capture;
pub mod lab_lb;
mod object;
pub mod verify;

use std::path::PathBuf;

/// The BPF object built from `ebpf/` for `bpfel-unknown-none`.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh-ebpf.o"));

/// What can go wrong loading, attaching or pinning a program or map.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The object did not load (bad ELF, BTF relocation, or map creation).
    #[error("loading the BPF object")]
    Load(#[from] aya::EbpfError),
    /// The object has no program of that name, or of another type.
    #[error("program {name}")]
    Program {
        /// Program name in the object.
        name: &'static str,
        /// What aya reported.
        #[source]
        source: aya::programs::ProgramError,
    },
    /// The object has no map of that name, or of another type.
    #[error("map {name}")]
    Map {
        /// Map name in the object.
        name: &'static str,
        /// What aya reported.
        #[source]
        source: aya::maps::MapError,
    },
    /// Pinning a map or link in bpffs failed.
    #[error("pinning {what} at {path}")]
    Pin {
        /// What was being pinned.
        what: &'static str,
        /// Where.
        path: PathBuf,
        /// What aya reported.
        #[source]
        source: aya::pin::PinError,
    },
    /// The kernel rejected a program.
    #[error("the kernel refused program {name}")]
    Verifier {
        /// Program name.
        name: String,
        /// What aya reported, including the verifier log.
        #[source]
        source: aya::programs::ProgramError,
    },
    /// The aya-log reader could not be set up.
    #[error("reading eBPF logs: {0}")]
    Log(String),
    /// The object holds a program of a type the loader does not handle.
    #[error("program {name} has unsupported type {kind}")]
    Unsupported {
        /// Program name.
        name: String,
        /// Its type.
        kind: String,
    },
    /// A filesystem operation on a cgroup or bpffs path failed.
    #[error("{what} {path}")]
    Io {
        /// The operation.
        what: &'static str,
        /// The path it was applied to.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
