//! `thali serve`: opens the data directory, sets up the admin password and runs the HTTP
//! listeners until SIGINT/SIGTERM.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use thali_db::{Limits, Node};
use thali_http::{router, AppState, HttpConfig};

/// Options of `thali serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeConfig {
    /// Settings file (TOML, keys named like these flags); default DIR/thali.toml if it exists.
    /// Precedence: file < environment (THALI_<FLAG>) < command line.
    #[arg(long, env = "THALI_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Data directory, created on first start.
    #[arg(long, default_value = "./thali-data", env = "THALI_DATA")]
    pub data: PathBuf,
    /// Address of the local HTTP API (repeatable, e.g. `127.0.0.1:5984` and `[::1]:5984`).
    #[arg(
        long,
        default_value = "127.0.0.1:5984",
        env = "THALI_HTTP",
        value_delimiter = ','
    )]
    pub http: Vec<SocketAddr>,
    /// Address of the mutual-TLS peer listener (repeatable; none by default).
    #[arg(long, env = "THALI_PEER", value_delimiter = ',')]
    pub peer: Vec<SocketAddr>,
    /// Password of the `admin` user; otherwise read from --admin-password-file, or from or
    /// generated into DIR/admin.password. On the command line it shows in `ps`: prefer the
    /// environment (THALI_ADMIN_PASSWORD) or a file.
    #[arg(long, env = "THALI_ADMIN_PASSWORD", hide_env_values = true)]
    pub admin_password: Option<String>,
    /// A file holding the `admin` user's password (its first line).
    #[arg(long, value_name = "FILE", env = "THALI_ADMIN_PASSWORD_FILE")]
    pub admin_password_file: Option<PathBuf>,
    /// Serve the local API (plain HTTP, the admin's password and cookies in clear) on an
    /// address other than loopback: anyone on that network can watch and replay them.
    /// Without this flag, a non-loopback --http address is refused.
    #[arg(long, env = "THALI_INSECURE_HTTP_ON_NETWORK")]
    pub insecure_http_on_network: bool,
    /// A host name the local API answers to besides loopback names and IP addresses
    /// (repeatable). Requests naming any other `Host` are refused, so a web page that rebinds
    /// its own name to 127.0.0.1 cannot reach the API.
    #[arg(
        long = "allowed-host",
        env = "THALI_ALLOWED_HOST",
        value_delimiter = ','
    )]
    pub allowed_hosts: Vec<String>,
    /// Origins allowed by CORS (repeatable; `*` for any).
    #[arg(long = "cors-origin", env = "THALI_CORS_ORIGIN", value_delimiter = ',')]
    pub cors_origins: Vec<String>,
    /// Largest request body in bytes (413 beyond).
    #[arg(long, default_value_t = 256 * 1024 * 1024, env = "THALI_MAX_REQUEST_SIZE",
          value_parser = thali_sys::limit::within::<usize>(1024, 1 << 40))]
    pub max_request_size: usize,
    /// Largest attachment in bytes (413 beyond). Standalone attachment uploads stream to disk,
    /// so this bounds disk use, not memory; inline (base64) ones also obey --max-request-size.
    #[arg(long, default_value_t = 4 << 30, env = "THALI_MAX_ATTACHMENT_SIZE",
          value_parser = thali_sys::limit::within::<u64>(1, 1 << 50))]
    pub max_attachment_size: u64,
    /// Largest JSON document in bytes (413 beyond).
    #[arg(
        long = "max-document-size",
        default_value_t = 8_000_000,
        env = "THALI_MAX_DOCUMENT_SIZE",
        value_parser = thali_sys::limit::within::<usize>(64, 1 << 32)
    )]
    pub max_doc_size: usize,
    /// Seconds a client may take to send request headers or a request body (408 beyond).
    #[arg(long, default_value_t = 300, env = "THALI_REQUEST_TIMEOUT",
          value_parser = thali_sys::limit::within::<u64>(1, 86_400))]
    pub request_timeout: u64,
    /// Most concurrent connections on the peer listener; more are closed at once.
    #[arg(long, default_value_t = 512, env = "THALI_MAX_PEER_CONNECTIONS",
          value_parser = thali_sys::limit::within::<usize>(4, 1 << 20))]
    pub max_peer_connections: usize,
    /// Requests per second one peer key may send (twice that in a burst); past it, 429.
    /// 0: unlimited.
    #[arg(long, default_value_t = 1000, env = "THALI_PEER_RATE")]
    pub peer_rate: u32,
    /// A design document language to store and replicate without running it (repeatable), for
    /// a relay that only replicates: its validators are NOT enforced here. Without it, a design
    /// document in a language thali does not run is refused.
    #[arg(
        long = "store-only-language",
        value_name = "LANG",
        env = "THALI_STORE_ONLY_LANGUAGE",
        value_delimiter = ','
    )]
    pub store_only_languages: Vec<String>,
    /// CPU budget of one plugin call: WASM fuel units / Lua VM instructions / JavaScript
    /// operations.
    #[arg(long, default_value_t = 50_000_000, env = "THALI_PLUGIN_CPU",
          value_parser = thali_sys::limit::within::<u64>(1_000, 1 << 50))]
    pub plugin_cpu: u64,
    /// Memory of one plugin instance (WASM store or Lua state), in bytes.
    #[arg(long, default_value_t = 64 * 1024 * 1024, env = "THALI_PLUGIN_MEMORY",
          value_parser = thali_sys::limit::within::<usize>(1 << 20, 1 << 40))]
    pub plugin_memory: usize,
    /// Wall-clock limit of one plugin call, in milliseconds.
    #[arg(long, default_value_t = 500, env = "THALI_PLUGIN_TIMEOUT_MS",
          value_parser = thali_sys::limit::within::<u64>(1, 3_600_000))]
    pub plugin_timeout_ms: u64,
    /// Storage engine of a new data directory (`fjall` or `sled`); an existing one keeps the
    /// engine it records (`thali migrate` converts it).
    #[arg(long, env = "THALI_STORAGE")]
    pub storage: Option<thali_store::Kind>,
    /// The node's block cache, in bytes, shared by every database and index.
    #[arg(long, default_value_t = thali_store::DEFAULT_CACHE, env = "THALI_CACHE_SIZE")]
    pub cache_size: u64,
    /// Bytes that must stay free on the data directory's file system: below it writes answer
    /// 507 `insufficient_storage` (reads go on) until space is freed.
    #[arg(long, default_value_t = thali_store::space::DEFAULT_RESERVE, env = "THALI_MIN_FREE_SPACE")]
    pub min_free_space: u64,
    /// Most databases kept open at once (CouchDB's `max_dbs_open`); idle ones close first.
    #[arg(long, default_value_t = 500, env = "THALI_MAX_DBS_OPEN",
          value_parser = thali_sys::limit::within::<usize>(1, 1 << 20))]
    pub max_dbs_open: usize,
    /// Development: keep the design documents in DIR (`<db>/<ddoc>/…` files) up to date on
    /// every save.
    #[arg(long, value_name = "DIR", env = "THALI_DEV")]
    pub dev: Option<PathBuf>,
    /// Discovery on the local network: announce the first peer listener over mDNS (under a
    /// random name that changes every 10 minutes) and list nodes nearby (`thali peer discover`).
    #[arg(long, env = "THALI_LAN")]
    pub lan: bool,
    /// Seconds between changes of the announced name (tests shorten it).
    #[arg(long, default_value_t = 600, hide = true, env = "THALI_LAN_ROTATE")]
    pub lan_rotate: u64,
    #[command(flatten)]
    pub tor: thali_tor::TorOptions,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("data directory {0}: {1}")]
    DataDir(PathBuf, std::io::Error),
    #[error("cannot listen on {0}: {1}")]
    Listen(SocketAddr, std::io::Error),
    #[error("cannot open the store: {0}")]
    Store(String),
    #[error("identity: {0}")]
    Identity(String),
    #[error("--lan announces the peer listener: give one with --peer ADDR")]
    Lan,
    #[error("--http {0} is not a loopback address: the local API is plain HTTP (the admin's password and cookies would cross the network in clear). Use 127.0.0.1 or [::1], or add --insecure-http-on-network if that is really meant")]
    NotLoopback(SocketAddr),
    #[error("--admin-password-file {0}: {1}")]
    PasswordFile(PathBuf, String),
}

/// The settings in force as `GET /_node/_local/_config` shows them: CouchDB's sections for
/// what CouchDB tools look for, and `thali` with every flag. Values are strings, as in CouchDB;
/// the admin password is never shown.
fn settings(cfg: &ServeConfig, uuid: &str) -> serde_json::Value {
    let join = |v: &[String]| v.join(",");
    let addrs = |v: &[SocketAddr]| join(&v.iter().map(|a| a.to_string()).collect::<Vec<_>>());
    let path = |p: &Option<PathBuf>| {
        p.as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    };
    let first = cfg.http.first();
    serde_json::json!({
        "couchdb": {"uuid": uuid, "max_document_size": cfg.max_doc_size.to_string(),
                    "max_dbs_open": cfg.max_dbs_open.to_string(),
                    "database_dir": cfg.data.display().to_string()},
        "chttpd": {"bind_address": first.map(|a| a.ip().to_string()).unwrap_or_default(),
                   "port": first.map(|a| a.port().to_string()).unwrap_or_default(),
                   "max_http_request_size": cfg.max_request_size.to_string()},
        "chttpd_auth": {"timeout": thali_http::SESSION_TIMEOUT.to_string()},
        "admins": {"admin": "-hidden-"},
        "thali": {
            "data": cfg.data.display().to_string(), "config": path(&cfg.config),
            "http": addrs(&cfg.http), "peer": addrs(&cfg.peer),
            "cors-origin": join(&cfg.cors_origins),
            "max-request-size": cfg.max_request_size.to_string(),
            "max-attachment-size": cfg.max_attachment_size.to_string(),
            "max-document-size": cfg.max_doc_size.to_string(),
            "request-timeout": cfg.request_timeout.to_string(),
            "max-peer-connections": cfg.max_peer_connections.to_string(),
            "peer-rate": cfg.peer_rate.to_string(),
            "store-only-language": join(&cfg.store_only_languages),
            "plugin-cpu": cfg.plugin_cpu.to_string(),
            "plugin-memory": cfg.plugin_memory.to_string(),
            "plugin-timeout-ms": cfg.plugin_timeout_ms.to_string(),
            "storage": cfg.storage.map(|k| k.name().to_string()).unwrap_or_default(),
            "cache-size": cfg.cache_size.to_string(),
            "min-free-space": cfg.min_free_space.to_string(),
            "max-dbs-open": cfg.max_dbs_open.to_string(),
            "dev": path(&cfg.dev), "lan": cfg.lan.to_string(),
            "tor": cfg.tor.enabled.to_string(), "tor-network": path(&cfg.tor.network),
            "tor-port": cfg.tor.port.to_string(), "tor-restricted": cfg.tor.restricted.to_string(),
        },
    })
}

/// The admin password: given, or read from / generated into `DIR/admin.password` (0600).
/// Returns the password and whether it was generated now.
pub fn admin_password(data: &Path, given: Option<String>) -> Result<(String, bool), ServeError> {
    if let Some(p) = given.filter(|p| !p.is_empty()) {
        return Ok((p, false));
    }
    let file = data.join("admin.password");
    match std::fs::read_to_string(&file) {
        Ok(p) if !p.trim().is_empty() => return Ok((p.trim().to_string(), false)),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(ServeError::DataDir(file, e)),
    }
    let pw = thali_db::random_hex(16);
    thali_sys::files::write_private(&file, pw.as_bytes())
        .map_err(|e| ServeError::DataDir(file.clone(), e))?;
    Ok((pw, true))
}

/// What `run` refuses to start with: `--lan` without a peer listener to announce, and an
/// `--http` address off loopback unless `--insecure-http-on-network` says so.
fn check_listeners(cfg: &ServeConfig) -> Result<(), ServeError> {
    if cfg.lan && cfg.peer.is_empty() {
        return Err(ServeError::Lan);
    }
    match cfg
        .http
        .iter()
        .find(|a| !a.ip().is_loopback() && !cfg.insecure_http_on_network)
    {
        Some(a) => Err(ServeError::NotLoopback(*a)),
        None => Ok(()),
    }
}

/// The admin password the operator gave: `--admin-password` (or its environment variable),
/// else the first line of `--admin-password-file`.
fn given_password(cfg: &ServeConfig) -> Result<Option<String>, ServeError> {
    Ok(match (&cfg.admin_password, &cfg.admin_password_file) {
        (Some(p), _) if !p.is_empty() => Some(p.clone()),
        (_, Some(f)) => Some(password_file(f)?),
        _ => None,
    })
}

/// The first line of an `--admin-password-file`.
fn password_file(f: &Path) -> Result<String, ServeError> {
    let text = std::fs::read_to_string(f)
        .map_err(|e| ServeError::PasswordFile(f.into(), e.to_string()))?;
    let pw = text.lines().next().unwrap_or("").trim().to_string();
    if pw.is_empty() {
        return Err(ServeError::PasswordFile(
            f.into(),
            "the file is empty".into(),
        ));
    }
    Ok(pw)
}

async fn bind(addr: &SocketAddr) -> Result<(tokio::net::TcpListener, SocketAddr), ServeError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| ServeError::Listen(*addr, e))?;
    let local = listener
        .local_addr()
        .map_err(|e| ServeError::Listen(*addr, e))?;
    Ok((listener, local))
}

pub async fn run(cfg: ServeConfig) -> Result<(), ServeError> {
    check_listeners(&cfg)?;
    std::fs::create_dir_all(&cfg.data).map_err(|e| ServeError::DataDir(cfg.data.clone(), e))?;
    let (password, generated) = admin_password(&cfg.data, given_password(&cfg)?)?;
    if generated {
        println!(
            "Generated the admin password (user `admin`), saved in {}: {password}",
            cfg.data.join("admin.password").display()
        );
    }
    let node = open_node(&cfg)?;
    let identity = thali_peer::Identity::load_or_create(&cfg.data)
        .map_err(|e| ServeError::Identity(e.to_string()))?;
    tracing::info!(key = %identity.key_id(), "node identity");
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let identity = Arc::new(identity);
    let tor = cfg
        .tor
        .is_enabled()
        .then(|| thali_tor::Tor::new(&cfg.data, cfg.tor.clone(), &identity));
    let dialer = thali_peer::Dialer::new(
        identity.clone(),
        tor.clone()
            .map(|t| t as Arc<dyn thali_peer::dial::OnionConnect>),
    );
    let replicator = thali_replicate::Replicator::new(node.clone(), dialer.clone());
    let pairing = thali_pair::Pairing::new(node.clone(), identity.clone(), dialer, tor.clone());
    let manager = tokio::spawn(thali_replicate::manager::run(
        replicator.clone(),
        shutdown_tx.subscribe(),
    ));
    let dev = cfg
        .dev
        .clone()
        .map(|dir| tokio::spawn(thali_dev::run(node.clone(), dir, shutdown_tx.subscribe())));
    let state = AppState {
        replicator: replicator.clone(),
        node: node.clone(),
        config: Arc::new(http_config(&cfg, password)),
        lockout: Arc::default(),
        logged_out: Arc::default(),
        shutdown: shutdown_rx,
        key_id: identity.key_id().into(),
        tor: tor.clone(),
        pairing: pairing.clone(),
        settings: Arc::new(settings(&cfg, node.uuid())),
    };
    let app = router(state);
    let mut servers = Vec::new();
    // Peer listeners first: once the HTTP API answers, every listener is up.
    let (peer_urls, listening) = serve_peers(
        &cfg,
        &identity,
        &node,
        &app,
        tor.as_ref(),
        &shutdown_tx,
        &mut servers,
    )
    .await?;
    serve_http(&cfg, &app, &shutdown_tx, &mut servers).await?;
    if cfg.lan {
        let addr = *listening.first().ok_or(ServeError::Lan)?;
        let rotate = Duration::from_secs(cfg.lan_rotate.max(1));
        let lan = thali_pair::lan::run(pairing.clone(), addr, rotate, shutdown_tx.subscribe());
        servers.push(tokio::spawn(lan));
    }
    pairing.set_listeners(listening);
    // `thali id` prints these while the node runs.
    let urls_file = cfg.data.join("peer-urls");
    let _ = std::fs::write(&urls_file, peer_urls.join("\n"));
    if let Some(tor) = &tor {
        tokio::spawn(announce_onion(
            tor.clone(),
            identity.key_id(),
            urls_file.clone(),
            peer_urls,
        ));
    }
    wait_for_signal().await;
    let _ = std::fs::remove_file(&urls_file);
    shut_down(Stopping {
        node,
        replicator,
        shutdown_tx,
        manager,
        dev,
        servers,
    })
    .await
}

fn http_config(cfg: &ServeConfig, admin_password: String) -> HttpConfig {
    HttpConfig {
        admin_password,
        cors_origins: cfg.cors_origins.clone(),
        max_request_size: cfg.max_request_size,
        body_timeout: Duration::from_secs(cfg.request_timeout.max(1)),
        cookie_secret: rand::random(),
        allowed_hosts: cfg.allowed_hosts.clone(),
    }
}

/// The node's databases, with the limits the settings give.
fn open_node(cfg: &ServeConfig) -> Result<Arc<Node>, ServeError> {
    Node::open(
        &cfg.data,
        &thali_store::Options {
            engine: cfg.storage,
            cache_bytes: cfg.cache_size,
            min_free: cfg.min_free_space,
        },
        Limits {
            max_dbs_open: cfg.max_dbs_open.max(1),
            store_only_languages: cfg.store_only_languages.clone(),
            max_doc_size: cfg.max_doc_size,
            // An attachment may be as large as a request could carry it uncompressed.
            max_att_size: usize::try_from(cfg.max_attachment_size).unwrap_or(usize::MAX),
            max_inline_att_size: cfg
                .max_request_size
                .min(usize::try_from(cfg.max_attachment_size).unwrap_or(usize::MAX)),
            plugins: thali_plugins::Limits {
                cpu: cfg.plugin_cpu,
                memory: cfg.plugin_memory,
                timeout: Duration::from_millis(cfg.plugin_timeout_ms.max(1)),
                ..Default::default()
            },
        },
    )
    .map_err(|e| ServeError::Store(e.to_string()))
}

/// The peer listeners and the onion service: their httpkey URLs and the addresses they listen
/// on.
async fn serve_peers(
    cfg: &ServeConfig,
    identity: &Arc<thali_peer::Identity>,
    node: &Arc<Node>,
    app: &axum::Router,
    tor: Option<&Arc<thali_tor::Tor>>,
    shutdown_tx: &tokio::sync::watch::Sender<bool>,
    servers: &mut Vec<tokio::task::JoinHandle<()>>,
) -> Result<(Vec<String>, Vec<SocketAddr>), ServeError> {
    let mut peer_urls = Vec::new();
    let mut listening = Vec::new();
    if cfg.peer.is_empty() && tor.is_none() {
        return Ok((peer_urls, listening));
    }
    let tls = thali_peer::tls::server_config(identity)
        .map_err(|e| ServeError::Identity(e.to_string()))?;
    let acceptor = thali_peer::listener::PeerAcceptor::new(
        tls,
        app.clone(),
        Duration::from_secs(cfg.request_timeout.max(1)),
        cfg.max_peer_connections,
        cfg.peer_rate,
        {
            let node = node.clone();
            Arc::new(move |key: String| {
                let node = node.clone();
                Box::pin(async move { node.peer_keys().await.contains(&key) })
            })
        },
    );
    for addr in &cfg.peer {
        let (listener, local) = bind(addr).await?;
        let url = format!("httpkey://{local}/{}/", identity.key_id());
        tracing::info!(addr = %local, %url, "peer listener (mutual TLS) listening");
        println!("thali peers reach this node at {url}");
        peer_urls.push(url);
        listening.push(local);
        servers.push(tokio::spawn(thali_peer::listener::serve(
            listener,
            acceptor.clone(),
            shutdown_tx.subscribe(),
        )));
    }
    if let Some(tor) = tor {
        println!(
            "thali is starting its Tor onion service (state in {})",
            cfg.data.join("tor").display()
        );
        servers.push(tokio::spawn(thali_tor::run(
            tor.clone(),
            node.clone(),
            acceptor,
            shutdown_tx.subscribe(),
        )));
    }
    Ok((peer_urls, listening))
}

/// The CouchDB HTTP API on each `--http` address.
async fn serve_http(
    cfg: &ServeConfig,
    app: &axum::Router,
    shutdown_tx: &tokio::sync::watch::Sender<bool>,
    servers: &mut Vec<tokio::task::JoinHandle<()>>,
) -> Result<(), ServeError> {
    for addr in &cfg.http {
        let (listener, local) = bind(addr).await?;
        tracing::info!(addr = %local, "HTTP API listening");
        println!("thali listening on http://{local}");
        let mut rx = shutdown_tx.subscribe();
        let app = app.clone();
        servers.push(tokio::spawn(async move {
            use axum::serve::ListenerExt;
            let listener = listener.tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            });
            let app = app.into_make_service_with_connect_info::<SocketAddr>();
            let res = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = rx.wait_for(|v| *v).await;
                })
                .await;
            if let Err(e) = res {
                tracing::error!(error = %e, "server error");
            }
        }));
    }
    Ok(())
}

/// What a stop waits for, in order.
struct Stopping {
    node: Arc<Node>,
    replicator: Arc<thali_replicate::Replicator>,
    shutdown_tx: tokio::sync::watch::Sender<bool>,
    manager: tokio::task::JoinHandle<()>,
    dev: Option<tokio::task::JoinHandle<()>>,
    servers: Vec<tokio::task::JoinHandle<()>>,
}

async fn shut_down(s: Stopping) -> Result<(), ServeError> {
    tracing::info!("shutting down");
    let _ = s.shutdown_tx.send(true);
    let _ = s.manager.await;
    if let Some(dev) = s.dev {
        let _ = dev.await;
    }
    // Jobs stop after a last checkpoint, before the stores close.
    s.replicator.shutdown().await;
    // Give open requests a moment; feeds end on the shutdown signal. Short enough that the
    // whole stop stays well within 10 s, whatever a request still does.
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        futures_util::future::join_all(s.servers),
    )
    .await;
    s.node
        .flush()
        .map_err(|e| ServeError::Store(e.to_string()))?;
    tracing::info!("stopped cleanly");
    Ok(())
}

/// Adds the onion httpkey URL to `DIR/peer-urls` (for `thali id`) and stdout once the service
/// has an address.
async fn announce_onion(
    tor: Arc<thali_tor::Tor>,
    key_id: String,
    urls_file: PathBuf,
    mut urls: Vec<String>,
) {
    loop {
        if let Some(onion) = tor.onion() {
            let url = format!("httpkey://{onion}:{}/{key_id}/", tor.port());
            println!("thali peers reach this node over Tor at {url}");
            urls.push(url);
            let _ = std::fs::write(&urls_file, urls.join("\n"));
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
