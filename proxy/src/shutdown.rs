//! Stopping: every long-running task of the sidecar and the router takes a `watch` receiver
//! that turns true when it should stop.

use tokio::sync::watch;

/// Resolves once `stop` turns true (or its sender is gone). The borrow of the value ends here,
/// so the future can sit in a `select!` across awaits.
pub async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
