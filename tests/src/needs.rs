//! What some test groups need beyond `cargo`: root (network namespaces, a tmpfs), Debian's
//! `tor`, pouchdb-server from npm, the example WebAssembly plugins. A plain `cargo test` skips a
//! test whose need is missing and says so on the terminal; `tests/run-all.sh` installs every
//! need and sets `THALI_TEST_ALL=1`, under which a missing need fails the test instead, so no
//! group can silently not run in CI.

use std::io::Write;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;

#[derive(Clone, Copy, Debug)]
pub enum Need {
    /// Network namespaces (the LAN test) and mounts (the full-disk test).
    Root,
    /// `tor` and `tor-gencert` for a private Tor network.
    Tor,
    /// `npm ci` in `tests/interop`.
    PouchdbServer,
    /// The example plugins built for wasm32 (built here when the target is installed).
    WasmPlugins,
}

impl Need {
    fn how(self) -> &'static str {
        match self {
            Need::Root => "root (run tests/run-all.sh as root)",
            Need::Tor => "Debian's tor package (apt-get install -y tor)",
            Need::PouchdbServer => "pouchdb-server (npm ci --prefix tests/interop)",
            Need::WasmPlugins => {
                "the wasm32 target (rustup target add wasm32-unknown-unknown), to build plugins/"
            }
        }
    }

    fn met(self) -> bool {
        match self {
            Need::Root => (unsafe { libc::geteuid() }) == 0,
            Need::Tor => ["tor", "tor-gencert"].iter().all(|b| on_path(b).is_some()),
            Need::PouchdbServer => crate::workspace_root()
                .join("tests/interop/node_modules/pouchdb-server/bin/pouchdb-server")
                .is_file(),
            Need::WasmPlugins => wasm_plugins(),
        }
    }
}

/// Whether `need` is met for the test `test`; when it is not, fails under `THALI_TEST_ALL`
/// and otherwise says on the terminal (past the test harness's capture) that it skipped.
pub fn met(need: Need, test: &str) -> bool {
    if need.met() {
        return true;
    }
    if std::env::var_os("THALI_TEST_ALL").is_some() {
        panic!("{test} needs {} (THALI_TEST_ALL is set)", need.how());
    }
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: needs {}", need.how());
    false
}

/// Returns from the test unless every need is met (see [`met`]).
#[macro_export]
macro_rules! require {
    ($($need:expr),+) => {
        $(
            if !$crate::needs::met($need, module_path!()) {
                return;
            }
        )+
    };
}

pub fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/bin".into()])
        .map(|d: PathBuf| d.join(name))
        .find(|p| p.is_file())
}

const PLUGINS: [&str; 3] = ["typed.wasm", "views.wasm", "merge.wasm"];

/// The example plugins exist, or could be built now (once per test binary).
fn wasm_plugins() -> bool {
    static BUILT: Mutex<Option<bool>> = Mutex::new(None);
    let mut built = BUILT.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(b) = *built {
        return b;
    }
    let root = crate::workspace_root();
    let out = root.join("plugins/target/wasm32-unknown-unknown/release");
    let present = || PLUGINS.iter().all(|p| out.join(p).is_file());
    let ok = present()
        || (Command::new("rustup")
            .args(["target", "list", "--installed"])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("wasm32-unknown-unknown"))
            && Command::new("cargo")
                .args(["build", "--release", "--target", "wasm32-unknown-unknown"])
                .arg("--manifest-path")
                .arg(root.join("plugins/Cargo.toml"))
                .status()
                .is_ok_and(|s| s.success())
            && present());
    *built = Some(ok);
    ok
}
