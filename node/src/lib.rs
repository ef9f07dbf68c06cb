//! thali-node: the `thali` binary's commands (`serve`, the CLI, the settings file) over the
//! layer crates. The layers are re-exported under their old module names so tests, benchmarks
//! and the fuzzer reach them through one dependency. See ARCHITECTURE.md for the code map.

pub mod cli;
pub mod config;
pub mod serve;

pub use thali_db as db;
pub use thali_dev as dev;
pub use thali_doc as doc;
pub use thali_http as http;
pub use thali_mango as mango;
pub use thali_multipart as multipart;
pub use thali_pair as pair;
pub use thali_peer as peer;
pub use thali_plugins as plugins;
pub use thali_replicate as replicate;
pub use thali_store as store;
pub use thali_sys as sys;
pub use thali_tor as tor;
pub use thali_view as view;
