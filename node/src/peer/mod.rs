//! Thali's trust model: a node is its Ed25519 key. This module holds the node's identity,
//! the TLS configurations for both sides of a peer connection, `httpkey://` URLs and the peer
//! listener that feeds authenticated connections into the same HTTP router as loopback.

pub mod httpkey;
pub mod identity;
pub mod listener;
pub mod tls;

pub use httpkey::{HttpKeyUrl, PeerKey};
pub use identity::{key_id, parse_key_id, Identity};
