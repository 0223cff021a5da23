//! The HTTPS server: `POST /mutate`, `GET /healthz`, `GET /readyz`, `GET /metrics`.
//!
//! [`app`] is the router, testable without a socket; [`serve`] runs it over TLS on a bound
//! listener until a shutdown signal, then stops accepting and lets in-flight requests finish
//! (up to a deadline). Handshakes and request headers have timeouts, so a slow client cannot
//! hold a connection forever.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::admission;
use crate::config::Config;
use crate::metrics::{Metrics, Outcome};
use crate::tls::CertReloader;
use crate::view::ClusterView;

/// Largest AdmissionReview accepted; larger bodies get 413.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// Time a client has to finish the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a client has to send a request's headers.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// What the handlers share, behind one reference count: the router clones it for every
/// request.
#[derive(Debug, Clone)]
pub struct AppState(Arc<Shared>);

#[derive(Debug)]
pub struct Shared {
    pub config: Arc<Config>,
    pub metrics: Arc<Metrics>,
    pub view: Arc<dyn ClusterView>,
    ready: AtomicBool,
}

impl AppState {
    pub fn new(config: Arc<Config>, metrics: Arc<Metrics>, view: Arc<dyn ClusterView>) -> Self {
        AppState(Arc::new(Shared {
            config,
            metrics,
            view,
            ready: AtomicBool::new(true),
        }))
    }

    /// Makes `/readyz` fail, so no new traffic is sent while draining.
    pub fn set_ready(&self, ready: bool) {
        self.0.ready.store(ready, Ordering::SeqCst);
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/mutate", post(mutate))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

async fn mutate(State(state): State<AppState>, body: Result<Bytes, BytesRejection>) -> Response {
    let start = Instant::now();
    let body = match body {
        Ok(body) => body,
        Err(rejection) => {
            // Over the size limit (413) or a broken body stream.
            state.metrics.observe(Outcome::Invalid, start.elapsed());
            tracing::warn!(status = %rejection.status(), "{}", rejection.body_text());
            return rejection.into_response();
        }
    };
    match admission::review(&body, &state.config, state.view.as_ref()) {
        Ok(reviewed) => {
            let json = reviewed.answer.to_json();
            state.metrics.observe(reviewed.outcome, start.elapsed());
            if reviewed.remembered {
                state.metrics.remembered_review();
            }
            ([(header::CONTENT_TYPE, "application/json")], json).into_response()
        }
        Err(error) => {
            state.metrics.observe(Outcome::Invalid, start.elapsed());
            tracing::warn!(%error, "malformed admission request");
            (StatusCode::BAD_REQUEST, format!("{error}\n")).into_response()
        }
    }
}

async fn readyz(State(state): State<AppState>) -> (StatusCode, &'static str) {
    if state.ready.load(Ordering::SeqCst) {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down")
    }
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
}

/// Serves `app` over TLS on `listener` until `shutdown` turns true, then drains in-flight
/// connections for at most `drain` and returns; connections still open then are not aborted
/// here, they end with the process.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    app: Router,
    mut shutdown: watch::Receiver<bool>,
    drain: Duration,
) {
    let acceptor = TlsAcceptor::from(tls);
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    builder.http2().timer(TokioTimer::new());
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors or similar: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped(&mut shutdown) => break,
        };
        let acceptor = acceptor.clone();
        let builder = builder.clone();
        let service = TowerToHyperService::new(app.clone());
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let stream =
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(error)) => {
                        tracing::debug!(%peer, %error, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                };
            let connection = builder
                .serve_connection(TokioIo::new(stream), service)
                .into_owned();
            if let Err(error) = watcher.watch(connection).await {
                tracing::debug!(%peer, %error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!("all connections drained"),
        _ = tokio::time::sleep(drain) => tracing::warn!(?drain, "drain deadline passed; connections still open end with the process"),
    }
}

/// Re-reads the serving certificate every `interval` until `shutdown` turns true.
pub async fn reload_certificates(
    reloader: Arc<CertReloader>,
    interval: Duration,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stopped(&mut shutdown) => return,
        }
        match reloader.reload_if_changed() {
            Ok(false) => {}
            Ok(true) => {
                metrics.certificate_reload(true);
                tracing::info!("serving certificate reloaded");
            }
            Err(error) => {
                metrics.certificate_reload(false);
                tracing::warn!(%error, "serving certificate not reloaded; keeping the current one");
            }
        }
    }
}

/// Resolves once `shutdown` is true (or its sender is gone), holding no guard across awaits.
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}
