//! Fuzz targets for every parser that takes bytes from the network or a peer.
//!
//! A target is a `fn(&[u8])` that feeds the bytes to one parser — directly for the pure ones
//! (`doc`, `rev`, `httpkey`, `selector`, `multipart`), or as a request to an in-process node on
//! a real on-disk store for the rest ([`node::Harness`]) — and panics when the node breaks a
//! promise: a panic of its own, a 5xx, an error that is not CouchDB-shaped, a hang, a database
//! that no longer reads. Three drivers run the same targets:
//! - `cargo test -p thali-fuzz` (part of the test command): every target a fixed number of
//!   mutated and generated inputs from a fixed seed ([`driver`]);
//! - `thali-fuzz <target|all> --seconds N`: the same driver for as long as asked;
//! - `scripts/fuzz-afl.sh <target>`: coverage-guided, AFL++ through `cargo afl` (`fuzz/afl`).

pub mod driver;
pub mod gen;
pub mod node;
pub mod targets;

/// One fuzz target: its name, the function, and the seeds its inputs start from.
pub struct Target {
    pub name: &'static str,
    pub run: fn(&[u8]),
    pub seeds: fn() -> Vec<Vec<u8>>,
    /// Inputs are JSON: the driver also generates structured JSON values for it.
    pub json: bool,
}

pub fn target(name: &str) -> Option<&'static Target> {
    targets::ALL.iter().find(|t| t.name == name)
}
