//! Development hot reload (filled in below).
