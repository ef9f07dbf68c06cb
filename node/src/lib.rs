//! thali-node: a CouchDB-protocol document node. See ARCHITECTURE.md for the code map.

pub mod cli;
pub mod config;
pub mod db;
pub mod dev;
pub mod doc;
pub mod http;
pub mod mango;
pub mod multipart;
pub mod pair;
pub mod peer;
pub mod plugins;
pub mod replicate;
pub mod serve;
pub mod store;
pub mod sys;
pub mod tor;
pub mod view;

#[cfg(test)]
mod layers;
