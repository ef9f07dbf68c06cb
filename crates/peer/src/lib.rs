//! Thali's trust model: a node is its Ed25519 key. This module holds the node's identity,
//! the TLS configurations for both sides of a peer connection, `httpkey://` URLs, the peer
//! acceptor that feeds authenticated connections (TCP or onion) into the same HTTP router as
//! loopback, and the dialer the replicator uses to reach peers.

pub mod dial;
pub mod guard;
pub mod httpkey;
pub mod identity;
pub mod listener;
pub mod pairing;
pub mod tls;

pub use dial::Dialer;
pub use httpkey::{HttpKeyUrl, PeerKey};
pub use identity::{key_id, parse_key_id, Identity, PeerAddr, PeerKeyId, Stranger};
