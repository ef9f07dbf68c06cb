//! The log filter as a setting that can change while the node runs
//! (`PUT /_node/_local/_config/log/level`). The binary installs the subscriber and hands its
//! reload function here; nothing else knows how logging is set up.

use std::sync::{Mutex, OnceLock};

type Reload = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

static RELOAD: OnceLock<Reload> = OnceLock::new();
static CURRENT: Mutex<String> = Mutex::new(String::new());

/// Called once by the binary with the filter in force and how to replace it.
pub fn install(current: &str, reload: Reload) {
    if let Ok(mut c) = CURRENT.lock() {
        *c = current.to_string();
    }
    let _ = RELOAD.set(reload);
}

/// The filter in force (`tracing` directives, e.g. `info,thali_node::pair=debug`).
pub fn current() -> String {
    CURRENT.lock().map(|c| c.clone()).unwrap_or_default()
}

/// Replaces the filter; returns the previous one.
pub fn set(directives: &str) -> Result<String, String> {
    let reload = RELOAD
        .get()
        .ok_or("logging cannot be changed in this process")?;
    reload(directives)?;
    let mut c = CURRENT.lock().map_err(|_| "poisoned")?;
    Ok(std::mem::replace(&mut *c, directives.to_string()))
}
