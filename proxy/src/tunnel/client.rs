//! The sidecar's end of the tunnel: one HTTP/2 connection to the node router, shared by every
//! flow, kept up by a background task.
//!
//! - While the router is away the task retries with exponential backoff (from
//!   [`MIN_BACKOFF`] to [`MAX_BACKOFF`]); a flow opened meanwhile asks for an attempt at once
//!   and fails as soon as that attempt does, so an application sees a refused connection, never
//!   a hang.
//! - The pod's registration is sent on every new connection and again whenever it changes; the
//!   router keeps it for as long as the connection lives.

use std::fmt;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderValue, Method, Request, StatusCode};
use servicekeel_api::addresses::RouterAddr;
use servicekeel_api::tunnel::registration::Registration;
use servicekeel_api::tunnel::{
    FlowTarget, PROTOCOL_HEADER, REGISTRATION_PATH, SOURCE_HEADER, Source, VERSION, VERSION_HEADER,
};
use tokio::runtime::Handle;
use tokio::sync::{Notify, watch};

use crate::shutdown::stopped;

use super::{BoxIo, FlowStream, settings};

/// First retry delay after the router went away.
pub const MIN_BACKOFF: Duration = Duration::from_millis(50);
/// Longest retry delay: the link is back within this of the router being back.
pub const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// How long connecting (socket and HTTP/2 handshake) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the router may take to answer a flow (it may try several endpoints).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(15);
/// Most of a refusal's text kept for the log.
const MAX_REFUSAL_TEXT: usize = 1024;

/// Connects to the router: the seam tests and the router (for its peers) fill differently.
#[async_trait::async_trait]
pub trait Connector: Send + Sync + 'static {
    async fn connect(&self) -> io::Result<BoxIo>;
    /// Where it connects, for logs.
    fn describe(&self) -> String;
}

#[async_trait::async_trait]
impl Connector for RouterAddr {
    async fn connect(&self) -> io::Result<BoxIo> {
        Ok(match self {
            RouterAddr::Unix(path) => Box::new(tokio::net::UnixStream::connect(path).await?),
            RouterAddr::Tcp(host_port) => {
                let stream = tokio::net::TcpStream::connect(host_port.as_str()).await?;
                stream.set_nodelay(true)?;
                Box::new(stream)
            }
        })
    }

    fn describe(&self) -> String {
        self.to_string()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("router {router} unavailable: {reason}")]
    Unavailable { router: String, reason: String },
    #[error("router refused {target}: {status} {message}")]
    Refused {
        target: String,
        status: StatusCode,
        message: String,
    },
    #[error("tunnel to {router} failed opening {target}: {cause}")]
    Broken {
        router: String,
        target: String,
        cause: String,
    },
}

#[derive(Clone)]
enum Link {
    Connecting,
    Up(h2::client::SendRequest<Bytes>),
    Down { attempt: u64, reason: Arc<str> },
}

impl fmt::Debug for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Link::Connecting => f.write_str("Connecting"),
            Link::Up(_) => f.write_str("Up"),
            Link::Down { attempt, reason } => write!(f, "Down(attempt {attempt}: {reason})"),
        }
    }
}

/// A handle on the tunnel; cheap to clone.
#[derive(Debug, Clone)]
pub struct Client {
    shared: Arc<Shared>,
}

struct Shared {
    connector: Box<dyn Connector>,
    router: String,
    source: HeaderValue,
    link: watch::Sender<Link>,
    /// A flow found the link down and wants an attempt now.
    wake: Notify,
    registration: watch::Sender<Option<Registration>>,
    /// Set by [`Client::close`].
    closed: watch::Sender<bool>,
    /// The runtime the connection runs on, when it is not the caller's: a link's own thread.
    /// A link is also pinged, and dropped when its peer stops answering (a peer router can
    /// vanish without closing the socket).
    home: Option<Handle>,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("router", &self.router)
            .field("link", &*self.link.borrow())
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Starts keeping a connection through `connector`; flows carry `source`. The task stops
    /// when `stop` turns true.
    pub fn start(
        connector: impl Connector,
        source: &Source,
        stop: watch::Receiver<bool>,
    ) -> Client {
        Self::spawn(connector, source, stop, None)
    }

    /// Like [`Client::start`], for a link to a peer router: the connection runs on `home` (a
    /// link thread's runtime; its flows report it, see [`FlowStream::home`]), is pinged every
    /// [`PING_INTERVAL`] and dropped when a ping goes unanswered for [`PING_TIMEOUT`].
    pub fn start_link(
        connector: impl Connector,
        source: &Source,
        stop: watch::Receiver<bool>,
        home: Handle,
    ) -> Client {
        Self::spawn(connector, source, stop, Some(home))
    }

    /// A link (pinged) when it has a `home`.
    fn spawn(
        connector: impl Connector,
        source: &Source,
        stop: watch::Receiver<bool>,
        home: Option<Handle>,
    ) -> Client {
        let router = connector.describe();
        let source = HeaderValue::from_str(&source.to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown/unknown"));
        let shared = Arc::new(Shared {
            connector: Box::new(connector),
            router,
            source,
            link: watch::Sender::new(Link::Connecting),
            wake: Notify::new(),
            registration: watch::Sender::new(None),
            closed: watch::Sender::new(false),
            home: home.clone(),
        });
        // The connection task ends on the caller's stop or on `close`, whichever comes first.
        let (end, ended) = watch::channel(false);
        let mut closed = shared.closed.subscribe();
        let mut stop = stop;
        let home = home.unwrap_or_else(Handle::current);
        home.spawn(async move {
            tokio::select! {
                _ = stopped(&mut stop) => {}
                _ = stopped(&mut closed) => {}
            }
            let _ = end.send(true);
        });
        home.spawn(maintain(shared.clone(), ended));
        Client { shared }
    }

    /// Stops keeping the connection (a peer that is gone for good); flows already open carry on
    /// while the connection lasts.
    pub fn close(&self) {
        let _ = self.shared.closed.send(true);
    }

    /// Whether the connection to the router is up.
    pub fn is_up(&self) -> bool {
        matches!(*self.shared.link.borrow(), Link::Up(_))
    }

    /// Waits until the connection is up or `timeout` passes; true if up.
    pub async fn wait_up(&self, timeout: Duration) -> bool {
        let mut link = self.shared.link.subscribe();
        tokio::time::timeout(timeout, link.wait_for(|l| matches!(l, Link::Up(_))))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Sets what is registered with the router (`None`: nothing); sent now if connected and on
    /// every reconnect.
    pub fn set_registration(&self, registration: Option<Registration>) {
        self.shared.registration.send_if_modified(|current| {
            let changed = *current != registration;
            *current = registration;
            changed
        });
    }

    /// Opens a flow to `target`, from this client's own source.
    pub async fn open(&self, target: &FlowTarget) -> Result<FlowStream, OpenError> {
        self.open_as(target, None).await
    }

    /// Opens a flow to `target` on behalf of `source` (a router passing on a flow), or of
    /// this client's own source.
    pub async fn open_as(
        &self,
        target: &FlowTarget,
        source: Option<&Source>,
    ) -> Result<FlowStream, OpenError> {
        let source = match source {
            Some(source) => HeaderValue::from_str(&source.to_string())
                .unwrap_or_else(|_| self.shared.source.clone()),
            None => self.shared.source.clone(),
        };
        let broken = |cause: String| OpenError::Broken {
            router: self.shared.router.clone(),
            target: target.to_string(),
            cause,
        };
        let sender = self.sender().await?;
        let mut sender = tokio::time::timeout(RESPONSE_TIMEOUT, sender.ready())
            .await
            .map_err(|_| broken("no stream available in time".into()))?
            .map_err(|e| broken(e.to_string()))?;
        let request = Request::builder()
            .method(Method::CONNECT)
            .uri(target.authority())
            .header(VERSION_HEADER, VERSION.to_string())
            .header(PROTOCOL_HEADER, target.protocol.as_str())
            .header(SOURCE_HEADER, source)
            .body(())
            .map_err(|e| broken(e.to_string()))?;
        let (response, send) = sender
            .send_request(request, false)
            .map_err(|e| broken(e.to_string()))?;
        let response = tokio::time::timeout(RESPONSE_TIMEOUT, response)
            .await
            .map_err(|_| broken("no answer in time".into()))?
            .map_err(|e| broken(e.to_string()))?;
        let status = response.status();
        let body = response.into_body();
        if status == StatusCode::OK {
            return Ok(FlowStream::new(send, body).with_home(self.shared.home.clone()));
        }
        Err(OpenError::Refused {
            target: target.to_string(),
            status,
            message: read_text(body, MAX_REFUSAL_TEXT).await,
        })
    }

    /// The live connection; if there is none, one attempt is asked for and its result awaited.
    async fn sender(&self) -> Result<h2::client::SendRequest<Bytes>, OpenError> {
        let mut link = self.shared.link.subscribe();
        let seen = match &*link.borrow_and_update() {
            Link::Up(sender) => return Ok(sender.clone()),
            Link::Down { attempt, .. } => Some(*attempt),
            Link::Connecting => None,
        };
        self.shared.wake.notify_one();
        let unavailable = |reason: String| OpenError::Unavailable {
            router: self.shared.router.clone(),
            reason,
        };
        let settled = tokio::time::timeout(
            CONNECT_TIMEOUT,
            link.wait_for(|l| match l {
                Link::Up(_) => true,
                Link::Down { attempt, .. } => Some(*attempt) != seen,
                Link::Connecting => false,
            }),
        )
        .await
        .map_err(|_| unavailable("no connection in time".into()))?
        .map_err(|_| unavailable("the tunnel has stopped".into()))?;
        match &*settled {
            Link::Up(sender) => Ok(sender.clone()),
            Link::Down { reason, .. } => Err(unavailable(reason.to_string())),
            Link::Connecting => Err(unavailable("still connecting".into())),
        }
    }
}

/// Reads up to `limit` bytes of a body as text, for messages.
pub(crate) async fn read_text(mut body: h2::RecvStream, limit: usize) -> String {
    let mut text = BytesMut::new();
    while text.len() < limit {
        match body.data().await {
            Some(Ok(chunk)) => {
                let _ = body.flow_control().release_capacity(chunk.len());
                text.extend_from_slice(&chunk[..chunk.len().min(limit - text.len())]);
            }
            _ => break,
        }
    }
    String::from_utf8_lossy(&text).trim().to_string()
}

/// A live connection: the handle flows use and the task driving it, which ends with it.
type Connection = (h2::client::SendRequest<Bytes>, tokio::task::JoinHandle<()>);

async fn connect(shared: &Shared) -> Result<Connection, String> {
    let handshake = async {
        let io = shared
            .connector
            .connect()
            .await
            .map_err(|e| e.to_string())?;
        h2::client::Builder::new()
            .initial_window_size(settings::STREAM_WINDOW)
            .initial_connection_window_size(settings::CONNECTION_WINDOW)
            .max_frame_size(settings::MAX_FRAME)
            .max_header_list_size(servicekeel_api::tunnel::MAX_HEADER_BYTES)
            .handshake::<_, Bytes>(io)
            .await
            .map_err(|e| format!("HTTP/2 handshake: {e}"))
    };
    let (sender, mut connection) = tokio::time::timeout(CONNECT_TIMEOUT, handshake)
        .await
        .map_err(|_| "connect timed out".to_string())??;
    let router = shared.router.clone();
    let pings = shared
        .home
        .is_some()
        .then(|| connection.ping_pong())
        .flatten();
    let driver = tokio::spawn(async move {
        let ended = async {
            if let Err(error) = connection.await {
                tracing::debug!(%router, %error, "tunnel connection ended");
            }
        };
        match pings {
            None => ended.await,
            Some(pings) => tokio::select! {
                _ = ended => {}
                _ = keepalive(pings) => tracing::warn!(%router, "peer stopped answering pings"),
            },
        }
    });
    match sender.ready().await {
        Ok(sender) => Ok((sender, driver)),
        Err(error) => {
            driver.abort();
            Err(format!("HTTP/2 connection: {error}"))
        }
    }
}

async fn register(
    shared: &Shared,
    sender: &h2::client::SendRequest<Bytes>,
    registration: &Registration,
) {
    let attempt = async {
        let mut sender = sender.clone().ready().await.map_err(|e| e.to_string())?;
        let request = Request::builder()
            .method(Method::PUT)
            .uri(format!("http://router{REGISTRATION_PATH}"))
            .header(VERSION_HEADER, VERSION.to_string())
            .header(SOURCE_HEADER, shared.source.clone())
            .body(())
            .map_err(|e| e.to_string())?;
        let (response, mut body) = sender
            .send_request(request, false)
            .map_err(|e| e.to_string())?;
        body.send_data(Bytes::from(registration.to_json()), true)
            .map_err(|e| e.to_string())?;
        let response = response.await.map_err(|e| e.to_string())?;
        let status = response.status();
        let text = read_text(response.into_body(), MAX_REFUSAL_TEXT).await;
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("{status} {text}"))
        }
    };
    match tokio::time::timeout(RESPONSE_TIMEOUT, attempt).await {
        Ok(Ok(())) => {
            let endpoints = registration.endpoints().len();
            tracing::info!(router = %shared.router, endpoints, "registered exports");
        }
        Ok(Err(error)) => {
            tracing::warn!(router = %shared.router, %error, "registration refused");
        }
        Err(_) => tracing::warn!(router = %shared.router, "registration not answered in time"),
    }
}

async fn maintain(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut backoff = MIN_BACKOFF;
    let mut attempt = 0u64;
    let mut last_reason: Option<String> = None;
    loop {
        if *stop.borrow() {
            return;
        }
        attempt += 1;
        let connection = tokio::select! {
            result = connect(&shared) => result,
            _ = stopped(&mut stop) => return,
        };
        match connection {
            Ok((sender, mut driver)) => {
                tracing::info!(router = %shared.router, "tunnel connected");
                last_reason = None;
                backoff = MIN_BACKOFF;
                shared.link.send_replace(Link::Up(sender.clone()));
                let mut registration = shared.registration.subscribe();
                registration.mark_changed();
                loop {
                    tokio::select! {
                        _ = &mut driver => {
                            tracing::warn!(router = %shared.router, "tunnel lost");
                            break;
                        }
                        changed = registration.changed() => {
                            if changed.is_err() {
                                return;
                            }
                            let current = registration.borrow_and_update().clone();
                            if let Some(current) = current {
                                register(&shared, &sender, &current).await;
                            }
                        }
                        _ = stopped(&mut stop) => return,
                    }
                }
                shared.link.send_replace(Link::Down {
                    attempt,
                    reason: "connection lost".into(),
                });
            }
            Err(reason) => {
                if last_reason.as_deref() != Some(reason.as_str()) {
                    tracing::warn!(router = %shared.router, %reason, "tunnel down; retrying");
                    last_reason = Some(reason.clone());
                }
                shared.link.send_replace(Link::Down {
                    attempt,
                    reason: reason.into(),
                });
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shared.wake.notified() => {}
                    _ = stopped(&mut stop) => return,
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// Interval of keepalive pings on a link.
pub const PING_INTERVAL: Duration = Duration::from_secs(1);
/// How long a ping may go unanswered before the link is dropped: a peer cut off is noticed
/// within `PING_INTERVAL + PING_TIMEOUT` (4 s), while an answer queued behind a few seconds'
/// worth of data on a slow link still arrives in time.
pub const PING_TIMEOUT: Duration = Duration::from_secs(3);

/// Pings every [`PING_INTERVAL`]; returns when a ping goes unanswered for [`PING_TIMEOUT`].
async fn keepalive(mut pings: h2::PingPong) {
    loop {
        tokio::time::sleep(PING_INTERVAL).await;
        match tokio::time::timeout(PING_TIMEOUT, pings.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) | Err(_) => return,
        }
    }
}
