//! `servicekeel-proxy wait`: returns once the sidecar beside it answers `/readyz` with 200.
//!
//! The webhook runs it as the sidecar container's `postStart` hook. The kubelet starts a pod's
//! containers in order and does not start the next one until a container's `postStart` hook has
//! returned, so the application starts with the sidecar's DNS and listeners already up. A
//! startup probe gave the same order but runs only on its period's ticks, which held every
//! injected pod's start by up to a second more.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use servicekeel_api::{defaults, http};

/// How long one attempt may take to connect or to be answered.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);
/// Pause between attempts: the sidecar is ready a few milliseconds after it starts.
const RETRY_EVERY: Duration = Duration::from_millis(10);

/// Polls `admin` until its `/readyz` answers 200, for at most `timeout`. The error says what the
/// last attempt found.
pub fn until_ready(admin: SocketAddr, timeout: Duration) -> Result<(), String> {
    let target = reachable(admin);
    let deadline = Instant::now() + timeout;
    loop {
        let last = match ready_status(target) {
            Ok(200) => return Ok(()),
            Ok(status) => format!("it answered {status}"),
            Err(error) => error.to_string(),
        };
        if Instant::now() + RETRY_EVERY >= deadline {
            return Err(format!(
                "the sidecar's http://{target}{} was not ready within {timeout:?}: {last}",
                defaults::READY_PATH
            ));
        }
        std::thread::sleep(RETRY_EVERY);
    }
}

/// Where to reach an admin server listening on `addr`: a wildcard address is reached on loopback.
fn reachable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => (Ipv4Addr::LOCALHOST, addr.port()).into(),
        IpAddr::V6(ip) if ip.is_unspecified() => (Ipv6Addr::LOCALHOST, addr.port()).into(),
        _ => addr,
    }
}

/// The status code of one `GET /readyz` to `target`.
fn ready_status(target: SocketAddr) -> std::io::Result<u16> {
    let mut stream = TcpStream::connect_timeout(&target, ATTEMPT_TIMEOUT)?;
    stream.set_read_timeout(Some(ATTEMPT_TIMEOUT))?;
    stream.set_write_timeout(Some(ATTEMPT_TIMEOUT))?;
    // One write: `write!` on the bare stream would send each formatted piece as its own
    // segment, and a server may answer and close after the first, failing the rest.
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n",
        defaults::READY_PATH
    );
    stream.write_all(request.as_bytes())?;
    // The status line's start is all that is needed: "HTTP/1.1 200".
    let mut head = [0u8; 12];
    stream.read_exact(&mut head)?;
    let head = String::from_utf8_lossy(&head);
    http::status(&head).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("not an HTTP answer: {head:?}"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wildcard_address_is_reached_on_loopback() {
        let addr = |text: &str| text.parse::<SocketAddr>().unwrap();
        assert_eq!(reachable(addr("0.0.0.0:15021")), addr("127.0.0.1:15021"));
        assert_eq!(reachable(addr("[::]:15021")), addr("[::1]:15021"));
        assert_eq!(
            reachable(addr("10.244.0.7:15021")),
            addr("10.244.0.7:15021")
        );
    }
}
