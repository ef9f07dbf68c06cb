//! The `thali` command line.

use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use thali_node::serve::{run, ServeConfig};

// The store and JSON handling allocate heavily; mimalloc cut write CPU noticeably over glibc
// malloc.
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
    Serve(ServeConfig),
    /// Print this node's key id and its httpkey URLs (creating the identity if needed).
    Id {
        #[arg(long, default_value = "./thali-data")]
        data: PathBuf,
        /// Peer addresses to print URLs for (default: those of the running node).
        #[arg(long)]
        peer: Vec<String>,
    },
    /// Replicate SOURCE to TARGET (through the running node, or in-process when none runs).
    Replicate(thali_node::cli::ReplicateArgs),
    /// Copy a stopped node's store to the other storage engine, verify it and switch to it.
    Migrate {
        #[arg(long, default_value = "./thali-data")]
        data: PathBuf,
        /// The engine to move to.
        #[arg(long)]
        to: thali_node::store::Kind,
    },
    /// Print the HTTP API's route table as JSON (kinds, path templates, methods).
    Routes,
    /// Manage which peer keys may use a database (edits its `_security` on the running node).
    Peer {
        #[command(subcommand)]
        action: PeerAction,
        /// Data directory of the node (for its admin password).
        #[arg(long, global = true, default_value = "./thali-data")]
        data: PathBuf,
        /// The node's local HTTP API.
        #[arg(long, global = true, default_value = "127.0.0.1:5984")]
        node: SocketAddr,
    },
}

#[derive(Subcommand)]
enum PeerAction {
    /// Grant a key `read`, `write` or `admin` on a database.
    Allow {
        key: String,
        #[arg(long)]
        db: String,
        #[arg(long, default_value = "write")]
        level: String,
    },
    /// Remove a key from a database's `_security`.
    Deny {
        key: String,
        #[arg(long)]
        db: String,
    },
    /// List the keys allowed on a database.
    List {
        #[arg(long)]
        db: String,
    },
}

fn main() -> std::process::ExitCode {
    // Whatever the node writes (databases, keys, passwords, Tor state) is its owner's alone.
    // SAFETY: umask only sets the process's file-creation mask.
    unsafe {
        libc::umask(0o077);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("THALI_LOG")
                // arti's crates log their routine work at info; the node's own lines stay at info.
                // lsm_tree warns when a dropped keyspace's table files are already gone (its
                // folder went first): routine after every database deletion and compaction.
                .unwrap_or_else(|_| {
                    tracing_subscriber::EnvFilter::new(
                        "info,tor_=warn,arti_=warn,fjall=warn,lsm_tree=warn,\
                         lsm_tree::table::inner=error",
                    )
                }),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Serve(_)) {
        // Command-line output piped into `head` ends the command quietly, as Unix tools do,
        // instead of panicking on the broken pipe.
        // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
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
    let res: Result<(), Box<dyn std::error::Error>> = match cli.command {
        Command::Id { data, peer } => thali_node::cli::print_id(&data, &peer),
        Command::Routes => {
            println!("{}", thali_node::http::routes::table_json());
            Ok(())
        }
        Command::Peer { action, data, node } => {
            let action = match action {
                PeerAction::Allow { key, db, level } => {
                    thali_node::cli::PeerCommand::Allow { key, db, level }
                }
                PeerAction::Deny { key, db } => thali_node::cli::PeerCommand::Deny { key, db },
                PeerAction::List { db } => thali_node::cli::PeerCommand::List { db },
            };
            thali_node::cli::peer(&data, node, action)
        }
        Command::Migrate { data, to } => thali_node::cli::migrate(&data, to),
        Command::Replicate(args) => rt.block_on(thali_node::cli::replicate(args)),
        Command::Serve(cfg) => rt.block_on(run(cfg)).map_err(Into::into),
    };
    match res {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("thali: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
