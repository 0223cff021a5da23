//! The admin server the sidecar and the router share: `/healthz`, `/readyz` (503 with the
//! reason while not ready) and `/metrics` (Prometheus text).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use servicekeel_api::defaults;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// What the admin server asks of its process.
pub trait Status: Send + Sync + 'static {
    /// Why the process is not ready, or `None` when it is.
    fn not_ready(&self) -> Option<String>;
    /// The Prometheus text exposition.
    fn metrics(&self) -> String;
}

#[derive(Debug, thiserror::Error)]
#[error("cannot bind the admin server to {addr}: {cause}")]
pub struct BindError {
    pub addr: SocketAddr,
    pub cause: std::io::Error,
}

/// Binds `addr`; returns the listener and the address it got.
pub async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), BindError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|cause| BindError { addr, cause })?;
    let bound = listener
        .local_addr()
        .map_err(|cause| BindError { addr, cause })?;
    Ok((listener, bound))
}

/// Serves until `stopped` turns true.
pub async fn serve(
    listener: TcpListener,
    status: Arc<dyn Status>,
    mut stopped: watch::Receiver<bool>,
) {
    let for_metrics = status.clone();
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let text = for_metrics.metrics();
                async move { text }
            }),
        )
        .route(defaults::HEALTH_PATH, get(|| async { "ok" }))
        .route(
            defaults::READY_PATH,
            get(move || {
                let not_ready = status.not_ready();
                async move {
                    match not_ready {
                        None => (StatusCode::OK, "ok".to_string()),
                        Some(reason) => (StatusCode::SERVICE_UNAVAILABLE, reason),
                    }
                }
            }),
        );
    let shutdown = async move {
        crate::shutdown::stopped(&mut stopped).await;
    };
    if let Err(error) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
    {
        tracing::warn!(%error, "admin server stopped");
    }
}
