//! Documents and their revisions: pure logic, no I/O.

pub mod canonical;
pub mod collate;
pub mod parse;
pub mod rev;
pub mod selector;
pub mod tree;

pub use rev::{hash_rev, Rev};
pub use tree::{Leaf, MergeOutcome, RevTree};

/// A JSON object from members moved in. `json!` serialises every expression it is given, so
/// `json!({"docs": docs})` deep-copies `docs`; this does not.
pub fn object<const N: usize>(members: [(&str, serde_json::Value); N]) -> serde_json::Value {
    serde_json::Value::Object(
        members
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
    )
}
