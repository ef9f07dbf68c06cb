//! The WASM plugin ABI and guest SDK (filled by the plugin-host issue).
