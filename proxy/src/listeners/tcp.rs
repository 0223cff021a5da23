//! TCP: each accepted connection is handed to the router when it takes handoffs (see
//! [`crate::tunnel::handoff`]); otherwise it is one flow, piped both ways with half-close kept
//! (a FIN from the application ends the flow's send side only). A flow the router refuses or
//! breaks is reset towards the application, so it sees the failure at once.

use servicekeel_api::Protocol;
use servicekeel_api::tunnel::FlowTarget;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::Context;
use crate::metrics::{FlowOutcome, Metered};
use crate::shutdown::stopped;
use crate::tunnel::server::abort;

pub(super) async fn accept(
    listener: TcpListener,
    target: FlowTarget,
    context: Context,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stopped(&mut stop) => return,
        };
        match accepted {
            Ok((stream, _)) => {
                tokio::spawn(flow(stream, target.clone(), context.clone()));
            }
            Err(error) => {
                tracing::warn!(%error, %target, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

async fn flow(stream: TcpStream, target: FlowTarget, context: Context) {
    let ip = match stream.local_addr() {
        Ok(std::net::SocketAddr::V4(addr)) => *addr.ip(),
        _ => return,
    };
    let _guard = match context.flows.begin(ip, &context.metrics, Protocol::Tcp) {
        Ok(guard) => guard,
        Err(at_limit) => {
            tracing::debug!(%target, limit = at_limit.limit, "flow limit reached; connection reset");
            abort(&stream);
            context
                .metrics
                .flow_ended(Protocol::Tcp, FlowOutcome::Limited);
            return;
        }
    };
    let _ = stream.set_nodelay(true);
    let stream = match &context.tcp_handoff {
        Some(giver) => match giver.give(stream, &target).await {
            Ok(()) => {
                return context
                    .metrics
                    .flow_ended(Protocol::Tcp, FlowOutcome::HandedOff);
            }
            Err((stream, reason)) => {
                tracing::debug!(%reason, %target, "carried in the tunnel");
                stream
            }
        },
        None => stream,
    };
    let outcome = match context.client.open(&target).await {
        Err(error) => {
            tracing::debug!(%error, "flow not opened");
            abort(&stream);
            super::outcome_of(&error)
        }
        Ok(mut tunnel) => {
            let mut app = Metered::new(stream, context.metrics.bytes(Protocol::Tcp));
            match crate::tunnel::pipe(&mut tunnel, &mut app).await {
                Ok(_) => FlowOutcome::Completed,
                Err(error) => {
                    tracing::debug!(%error, %target, "flow broken");
                    abort(app.get_ref());
                    FlowOutcome::Failed
                }
            }
        }
    };
    context.metrics.flow_ended(Protocol::Tcp, outcome);
}
