//! The bottom layer: small helpers over the operating system that every other module may use
//! and that use nothing of the node.

pub mod clock;
pub mod files;
pub mod limit;
pub mod logs;
pub mod metrics;
pub mod shutdown;
pub mod sync;
