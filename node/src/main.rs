//! The `thali` command line.

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
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
    /// Check a settings file (DIR/thali.toml): unknown keys and bad values, by line.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
    /// Invite another device to a database: prints a single-use `thali:` URI and its QR code
    /// (`thali invite list`, `thali invite revoke ID` manage them).
    #[command(args_conflicts_with_subcommands = true)]
    Invite {
        #[command(subcommand)]
        action: Option<InviteAction>,
        /// The database to share.
        #[arg(long)]
        db: Option<String>,
        /// What the other device may do: read, write or admin.
        #[arg(long, default_value = "write")]
        level: String,
        /// How long the invite stays valid (90s, 15m, 1h, 7d).
        #[arg(long, default_value = "1h")]
        expires: String,
        /// `tcp` (the peer listener) or `tor` (the onion service).
        #[arg(long)]
        via: Option<String>,
        /// The host the other device should dial, when the peer listener is on 0.0.0.0.
        #[arg(long)]
        host: Option<String>,
        /// The name the other device will know this one by.
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        at: thali_node::cli::NodeArgs,
    },
    /// Accept an invite made by `thali invite` on another device: pair, grant it the same
    /// access here and replicate both ways.
    Join {
        #[command(flatten)]
        args: thali_node::cli::JoinArgs,
        #[command(flatten)]
        at: thali_node::cli::NodeArgs,
    },
    /// Pair with a device face to face: both show a 6-digit code and each user confirms it.
    /// One side waits (`--wait`), the other asks (`--with KEY|URL --db NAME`).
    Pair {
        /// Wait for another device to ask.
        #[arg(long, conflicts_with = "with")]
        wait: bool,
        /// Seconds to wait.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
        /// The device to ask: an httpkey URL, or the start of a key `thali peer discover` lists.
        #[arg(long, required_unless_present = "wait")]
        with: Option<String>,
        /// The database to share.
        #[arg(long, required_unless_present = "wait")]
        db: Option<String>,
        #[arg(long, default_value = "write")]
        level: String,
        /// The name to know the other device by.
        #[arg(long)]
        name: Option<String>,
        /// The name the other device will know this one by.
        #[arg(long = "as")]
        as_name: Option<String>,
        #[arg(long)]
        no_replicate: bool,
        #[command(flatten)]
        at: thali_node::cli::NodeArgs,
    },
    /// Manage which peer keys may use a database (edits its `_security` on the running node).
    Peer {
        #[command(subcommand)]
        action: PeerAction,
        #[command(flatten)]
        at: thali_node::cli::NodeArgs,
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
    /// The paired peers (name, key, databases and levels, replications); with --db, the keys
    /// allowed on that database.
    List {
        #[arg(long)]
        db: Option<String>,
    },
    /// Forget a paired peer: revoke its access everywhere and delete its replications.
    Remove { name: String },
    /// The nodes `serve --lan` found nearby.
    Discover,
}

#[derive(Subcommand)]
enum ConfigAction {
    /// Report every problem of the file, or that it is fine.
    Check {
        /// The file (default: DIR/thali.toml).
        #[arg(long)]
        file: Option<PathBuf>,
        #[arg(long, default_value = "./thali-data")]
        data: PathBuf,
    },
}

#[derive(Subcommand)]
enum InviteAction {
    /// The invites made, with their state (open, used, expired, revoked).
    List,
    /// Make an open invite unusable.
    Revoke { id: String },
}

fn main() -> std::process::ExitCode {
    // Whatever the node writes (databases, keys, passwords, Tor state) is its owner's alone.
    // SAFETY: umask only sets the process's file-creation mask.
    unsafe {
        libc::umask(0o077);
    }
    thali_node::sys::files::raise_open_files_limit();
    use tracing_subscriber::prelude::*;
    // arti's crates log their routine work at info; the node's own lines stay at info.
    // lsm_tree warns when a dropped keyspace's table files are already gone (its folder went
    // first): routine after every database deletion and compaction.
    let directives = std::env::var("THALI_LOG")
        .ok()
        .filter(|d| tracing_subscriber::EnvFilter::try_new(d).is_ok())
        .unwrap_or_else(|| {
            "info,tor_=warn,arti_=warn,fjall=warn,lsm_tree=warn,lsm_tree::table::inner=error"
                .to_string()
        });
    let filter = tracing_subscriber::EnvFilter::new(&directives);
    // Reloadable, so `PUT /_node/_local/_config/log/level` changes it while the node runs.
    let (filter, reload) = tracing_subscriber::reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    // One JSON object per line, with the fields of the event and of its spans (request,
    // replication), for log collectors.
    if std::env::var("THALI_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json")) {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_current_span(true)
                    .with_span_list(true)
                    .with_writer(std::io::stderr),
            )
            .init();
    } else {
        registry
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
            .init();
    }
    thali_node::sys::logs::install(
        &directives,
        Box::new(move |d: &str| {
            let f = tracing_subscriber::EnvFilter::try_new(d).map_err(|e| e.to_string())?;
            reload.reload(f).map_err(|e| e.to_string())
        }),
    );
    // `serve` settings from DIR/thali.toml come in as flags the command line did not give.
    let argv = match thali_node::config::with_file(&Cli::command(), std::env::args_os().collect()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("thali: settings file {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let cli = match Cli::command()
        .try_get_matches_from(argv)
        .and_then(|m| Cli::from_arg_matches(&m))
    {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
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
        Command::Config {
            action: ConfigAction::Check { file, data },
        } => {
            let path = file.unwrap_or_else(|| data.join(thali_node::config::FILE_NAME));
            match thali_node::config::check(&Cli::command(), &path) {
                Ok(msg) => {
                    println!("{msg}");
                    Ok(())
                }
                Err(e) => Err(e.into()),
            }
        }
        Command::Routes => {
            println!("{}", thali_node::http::routes::table_json());
            Ok(())
        }
        Command::Peer { action, at } => {
            let action = match action {
                PeerAction::Allow { key, db, level } => {
                    thali_node::cli::PeerCommand::Allow { key, db, level }
                }
                PeerAction::Deny { key, db } => thali_node::cli::PeerCommand::Deny { key, db },
                PeerAction::List { db } => thali_node::cli::PeerCommand::List { db },
                PeerAction::Remove { name } => thali_node::cli::PeerCommand::Remove { name },
                PeerAction::Discover => thali_node::cli::PeerCommand::Discover,
            };
            thali_node::cli::peer(&at.data, at.node, action)
        }
        Command::Invite {
            action,
            db,
            level,
            expires,
            via,
            host,
            name,
            at,
        } => {
            use thali_node::cli::{InviteArgs, InviteCommand};
            let cmd = match (action, db) {
                (Some(InviteAction::List), _) => Ok(InviteCommand::List),
                (Some(InviteAction::Revoke { id }), _) => Ok(InviteCommand::Revoke { id }),
                (None, Some(db)) => Ok(InviteCommand::Create(InviteArgs {
                    db,
                    level,
                    expires,
                    via,
                    host,
                    name,
                })),
                (None, None) => Err("say which database to share: thali invite --db NAME".into()),
            };
            cmd.and_then(|c| thali_node::cli::invite(&at.data, at.node, c))
        }
        Command::Join { args, at } => thali_node::cli::join(&at.data, at.node, args),
        Command::Pair {
            wait,
            timeout,
            with,
            db,
            level,
            name,
            as_name,
            no_replicate,
            at,
        } => {
            use thali_node::cli::PairCommand;
            let cmd = match (wait, with, db) {
                (true, _, _) => Ok(PairCommand::Wait { timeout, as_name }),
                (false, Some(with), Some(db)) => Ok(PairCommand::With {
                    with,
                    db,
                    level,
                    name,
                    as_name,
                    no_replicate,
                }),
                _ => Err("give --wait, or --with and --db".into()),
            };
            cmd.and_then(|c| thali_node::cli::pair(&at.data, at.node, c))
        }
        Command::Migrate { data, to } => thali_node::cli::migrate(&data, to),
        Command::Replicate(args) => rt.block_on(thali_node::cli::replicate(args)),
        Command::Serve(cfg) => {
            let r = rt.block_on(run(cfg)).map_err(Into::into);
            // The store is flushed; work still running on blocking threads (a client's long
            // query whose client left) must not keep the process, and the store's lock, alive.
            rt.shutdown_timeout(std::time::Duration::from_secs(2));
            return exit_code(r);
        }
    };
    exit_code(res)
}

fn exit_code(res: Result<(), Box<dyn std::error::Error>>) -> std::process::ExitCode {
    match res {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("thali: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
