//! Documents and their revisions: pure logic, no I/O.

pub mod collate;
pub mod parse;
pub mod rev;
pub mod selector;
pub mod tree;

pub use rev::{hash_rev, Rev};
pub use tree::{Leaf, MergeOutcome, RevTree};
