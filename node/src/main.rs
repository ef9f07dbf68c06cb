//! The `thali` command line.

use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use thali_node::serve::{run, ServeConfig};

// sled and JSON handling allocate heavily; mimalloc cut write CPU noticeably over glibc malloc.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "thali",
    version,
    about = "A CouchDB-protocol peer-to-peer document node"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node.
    Serve {
        /// Data directory, created on first start.
        #[arg(long, default_value = "./thali-data")]
        data: PathBuf,
        /// Address of the local HTTP API (repeatable, e.g. `127.0.0.1:5984` and `[::1]:5984`).
        #[arg(long, default_value = "127.0.0.1:5984")]
        http: Vec<SocketAddr>,
        /// Password of the `admin` user; otherwise read from or generated into
        /// DIR/admin.password.
        #[arg(long, env = "THALI_ADMIN_PASSWORD", hide_env_values = true)]
        admin_password: Option<String>,
        /// Origins allowed by CORS (repeatable; `*` for any).
        #[arg(long = "cors-origin")]
        cors_origins: Vec<String>,
        /// Largest request body in bytes (413 beyond).
        #[arg(long, default_value_t = 256 * 1024 * 1024)]
        max_request_size: usize,
        /// Largest JSON document in bytes (413 beyond).
        #[arg(long, default_value_t = 8_000_000)]
        max_document_size: usize,
    },
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("THALI_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("thali: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let res = match cli.command {
        Command::Serve {
            data,
            http,
            admin_password,
            cors_origins,
            max_request_size,
            max_document_size,
        } => rt.block_on(run(ServeConfig {
            data,
            http,
            admin_password,
            cors_origins,
            max_request_size,
            max_doc_size: max_document_size,
        })),
    };
    match res {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("thali: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
