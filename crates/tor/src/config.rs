//! `thali serve --tor …` options and the arti configuration built from them.

use arti_client::config::{ConfigurationSources, TorClientConfig};
use std::path::{Path, PathBuf};
use tor_config::{sources::MustRead, ConfigurationSource};

/// Options of `thali serve` for Tor.
#[derive(Debug, Clone, clap::Args)]
pub struct TorOptions {
    /// Publish this node as a Tor onion service (arti, embedded; state in DIR/tor/) and dial
    /// `.onion` peers through Tor.
    #[arg(long = "tor", env = "THALI_TOR")]
    pub enabled: bool,
    /// An arti configuration file (arti's TOML) merged under the node's own settings: e.g.
    /// `[tor_network]` authorities and fallback caches and `[override_net_params]` for a
    /// private Tor network. Implies `--tor`.
    #[arg(long = "tor-network", value_name = "FILE", env = "THALI_TOR_NETWORK")]
    pub network: Option<PathBuf>,
    /// The onion service's virtual port (peers use `httpkey://<onion>:PORT/<key>/db`).
    #[arg(long = "tor-port", default_value_t = 6984, env = "THALI_TOR_PORT")]
    pub port: u16,
    /// Restricted discovery: only peers whose keys some database's `_security` names (and this
    /// node) can fetch the service's descriptor, i.e. even find it. Rechecked every 10 s; a
    /// change relaunches the service (same address).
    #[arg(long = "tor-restricted", env = "THALI_TOR_RESTRICTED")]
    pub restricted: bool,
    /// The service's nickname in arti's keystore (`DIR/tor/state/keystore/hss/<nickname>/`).
    #[arg(
        long = "tor-nickname",
        default_value = "thali",
        hide = true,
        env = "THALI_TOR_NICKNAME"
    )]
    pub nickname: String,
}

impl TorOptions {
    pub fn is_enabled(&self) -> bool {
        self.enabled || self.network.is_some()
    }
}

/// arti's configuration: the network file (if any), then the node's storage paths on top.
pub fn client_config(options: &TorOptions, state_dir: &Path) -> Result<TorClientConfig, String> {
    let mut sources = ConfigurationSources::new_empty();
    if let Some(file) = &options.network {
        sources.push_source(ConfigurationSource::from_path(file), MustRead::MustRead);
    }
    let path = |p: PathBuf| serde_json::to_string(&p.to_string_lossy()).unwrap_or_default();
    sources.push_source(
        ConfigurationSource::from_verbatim(format!(
            "[storage]\nstate_dir = {}\ncache_dir = {}\n",
            path(state_dir.join("state")),
            path(state_dir.join("cache")),
        )),
        MustRead::MustRead,
    );
    let tree = sources
        .load()
        .map_err(|e| format!("reading the Tor configuration: {e}"))?;
    tor_config::resolve::<TorClientConfig>(&tree)
        .map_err(|e| format!("invalid Tor configuration: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_goes_under_the_data_dir_and_bad_files_are_errors() {
        let dir = std::env::temp_dir().join(format!("thali-torcfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut o = TorOptions {
            enabled: true,
            network: None,
            port: 6984,
            restricted: false,
            nickname: "thali".into(),
        };
        assert!(client_config(&o, &dir.join("tor")).is_ok());
        let bad = dir.join("bad.toml");
        std::fs::write(&bad, "[path_rules]\nipv4_subnet_family_prefix = \"x\"\n").unwrap();
        o.network = Some(bad);
        let e = client_config(&o, &dir.join("tor")).unwrap_err();
        assert!(e.contains("invalid Tor configuration"), "{e}");
        o.network = Some(dir.join("missing.toml"));
        assert!(client_config(&o, &dir.join("tor")).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
