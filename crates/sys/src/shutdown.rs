//! Shutdown and cancellation signals are `watch` channels of `bool` (true: stop).

use tokio::sync::watch;

/// Resolves once the flag is set (or its sender is gone).
pub async fn cancelled(flag: &mut watch::Receiver<bool>) {
    let _ = flag.wait_for(|c| *c).await;
}
