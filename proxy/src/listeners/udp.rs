//! UDP: one flow per client address. The listener reads every datagram and hands it to its
//! client's flow through a bounded queue; a flow ends when it has been idle for the configured
//! time, and then the client's next datagram opens a new one. A full queue or a listener at
//! its client limit (`SIDECAR_UDP_MAX_CLIENTS`) drops datagrams (UDP may) and counts them. A closed listener keeps serving
//! the flows it has until they end.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use servicekeel_api::Protocol;
use servicekeel_api::tunnel::{FlowTarget, MAX_DATAGRAM};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};

use super::{Context, UDP_QUEUE};
use crate::metrics::{DropReason, FlowOutcome};
use crate::shutdown::stopped;
use crate::tunnel::datagrams::{self, Way};

pub(super) async fn serve(
    socket: UdpSocket,
    target: FlowTarget,
    context: Context,
    mut stop: watch::Receiver<bool>,
) {
    let socket = Arc::new(socket);
    let Ok(SocketAddr::V4(local)) = socket.local_addr() else {
        return;
    };
    let mut clients: HashMap<SocketAddr, mpsc::Sender<Bytes>> = HashMap::new();
    let (ended, mut ended_rx) = mpsc::unbounded_channel::<SocketAddr>();
    let mut buffer = vec![0u8; MAX_DATAGRAM];
    let mut accepting = true;
    loop {
        tokio::select! {
            received = socket.recv_from(&mut buffer) => {
                let (n, peer) = match received {
                    Ok(received) => received,
                    Err(error) => {
                        // ICMP errors from earlier replies surface here; the socket is fine.
                        tracing::debug!(%error, %target, "receive failed");
                        continue;
                    }
                };
                let datagram = Bytes::copy_from_slice(&buffer[..n]);
                if let Some(queue) = clients.get(&peer).filter(|q| !q.is_closed()) {
                    if queue.try_send(datagram).is_err() {
                        context.metrics.datagram_dropped(DropReason::QueueFull);
                    }
                    continue;
                }
                if !accepting {
                    continue;
                }
                clients.retain(|_, queue| !queue.is_closed());
                if clients.len() >= context.udp_max_clients {
                    context.metrics.datagram_dropped(DropReason::FlowLimit);
                    continue;
                }
                let (queue, incoming) = mpsc::channel(UDP_QUEUE);
                let _ = queue.try_send(datagram);
                clients.insert(peer, queue);
                let client = datagrams::Client {
                    incoming,
                    socket: socket.clone(),
                    peer,
                    draining: context.draining.clone(),
                };
                tokio::spawn(flow(client, target.clone(), context.clone(), *local.ip(), ended.clone()));
            }
            Some(peer) = ended_rx.recv() => {
                if clients.get(&peer).is_some_and(|q| q.is_closed()) {
                    clients.remove(&peer);
                }
            }
            _ = stopped(&mut stop), if accepting => accepting = false,
        }
        if !accepting && clients.values().all(|q| q.is_closed()) {
            return;
        }
    }
}

async fn flow(
    client: datagrams::Client,
    target: FlowTarget,
    context: Context,
    ip: std::net::Ipv4Addr,
    ended: mpsc::UnboundedSender<SocketAddr>,
) {
    let peer = client.peer;
    let guard = match context.flows.begin(ip, &context.metrics, Protocol::Udp) {
        Ok(guard) => guard,
        Err(at_limit) => {
            // Its datagrams are dropped, as UDP allows; a later one tries again.
            tracing::debug!(%target, limit = at_limit.limit, "flow limit reached; datagrams dropped");
            drop(client);
            context
                .metrics
                .flow_ended(Protocol::Udp, FlowOutcome::Limited);
            let _ = ended.send(peer);
            return;
        }
    };
    let outcome = match context.client.open(&target).await {
        Err(error) => {
            tracing::debug!(%error, "flow not opened");
            // Its queued datagrams are lost, as UDP allows; the next one tries again.
            drop(client);
            super::outcome_of(&error)
        }
        Ok(tunnel) => {
            let (sent, received) = context.metrics.bytes(Protocol::Udp);
            let meter = |way, n: usize| match way {
                Way::Out => {
                    sent.inc_by(n as u64);
                }
                Way::In => {
                    received.inc_by(n as u64);
                }
            };
            match datagrams::relay(tunnel, client, context.udp_idle, meter).await {
                Ok(()) => FlowOutcome::Completed,
                Err(error) => {
                    tracing::debug!(%error, %target, "flow broken");
                    FlowOutcome::Failed
                }
            }
        }
    };
    drop(guard);
    context.metrics.flow_ended(Protocol::Udp, outcome);
    let _ = ended.send(peer);
}
