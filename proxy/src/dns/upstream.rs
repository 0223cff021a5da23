//! Forwarding a query for a name that is not imported: the query's bytes go to the upstream
//! resolver as they came, over UDP, and its answer comes back as it was sent; a truncated UDP
//! answer is asked for again over TCP. An upstream that is down or silent is an error within
//! the timeout, so the caller can answer SERVFAIL instead of leaving the client waiting.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

/// A DNS header is 12 bytes: id, flags, four counts.
const HEADER_LEN: usize = 12;
/// The "truncated" flag in the header's third byte.
const TC: u8 = 0x02;
/// The "response" flag in the header's third byte.
const QR: u8 = 0x80;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream {0} did not answer within {1:?}")]
    Timeout(SocketAddr, Duration),
    #[error("upstream {addr}: {cause}")]
    Io {
        addr: SocketAddr,
        cause: std::io::Error,
    },
    #[error("upstream {0} sent a malformed answer")]
    BadAnswer(SocketAddr),
    #[error("query is shorter than a DNS header")]
    ShortQuery,
}

#[derive(Debug, Clone)]
pub struct Upstream {
    addr: SocketAddr,
    timeout: Duration,
}

impl Upstream {
    pub fn new(addr: SocketAddr, timeout: Duration) -> Self {
        Upstream { addr, timeout }
    }

    /// The upstream's answer to `query`, byte for byte.
    pub async fn forward(&self, query: &[u8]) -> Result<Vec<u8>, UpstreamError> {
        if query.len() < HEADER_LEN {
            return Err(UpstreamError::ShortQuery);
        }
        let answer = self.within(self.udp(query)).await?;
        if answer[2] & TC == 0 {
            return Ok(answer);
        }
        self.within(self.tcp(query)).await
    }

    async fn within<F>(&self, attempt: F) -> Result<Vec<u8>, UpstreamError>
    where
        F: std::future::Future<Output = Result<Vec<u8>, UpstreamError>>,
    {
        tokio::time::timeout(self.timeout, attempt)
            .await
            .map_err(|_| UpstreamError::Timeout(self.addr, self.timeout))?
    }

    async fn udp(&self, query: &[u8]) -> Result<Vec<u8>, UpstreamError> {
        let io = |cause| UpstreamError::Io {
            addr: self.addr,
            cause,
        };
        // One socket per query: answers cannot be confused between clients whose ids clash.
        let local: SocketAddr = if self.addr.is_ipv4() {
            "0.0.0.0:0".parse().expect("valid address")
        } else {
            "[::]:0".parse().expect("valid address")
        };
        let socket = UdpSocket::bind(local).await.map_err(io)?;
        socket.connect(self.addr).await.map_err(io)?;
        socket.send(query).await.map_err(io)?;
        let mut buffer = vec![0u8; 65_535];
        loop {
            let length = socket.recv(&mut buffer).await.map_err(io)?;
            let answer = &buffer[..length];
            // Only an answer to this query counts; anything else is ignored.
            if answer.len() >= HEADER_LEN && answer[..2] == query[..2] && answer[2] & QR != 0 {
                return Ok(answer.to_vec());
            }
        }
    }

    async fn tcp(&self, query: &[u8]) -> Result<Vec<u8>, UpstreamError> {
        let io = |cause| UpstreamError::Io {
            addr: self.addr,
            cause,
        };
        let length = u16::try_from(query.len()).map_err(|_| UpstreamError::ShortQuery)?;
        let mut stream = TcpStream::connect(self.addr).await.map_err(io)?;
        let mut framed = length.to_be_bytes().to_vec();
        framed.extend_from_slice(query);
        stream.write_all(&framed).await.map_err(io)?;
        let mut prefix = [0u8; 2];
        stream.read_exact(&mut prefix).await.map_err(io)?;
        let mut answer = vec![0u8; usize::from(u16::from_be_bytes(prefix))];
        stream.read_exact(&mut answer).await.map_err(io)?;
        if answer.len() < HEADER_LEN || answer[..2] != query[..2] {
            return Err(UpstreamError::BadAnswer(self.addr));
        }
        Ok(answer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A query for example.com A with id 0x1234.
    fn query() -> Vec<u8> {
        let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        q.extend_from_slice(b"\x07example\x03com\x00\x00\x01\x00\x01");
        q
    }

    /// The answer to `query` with `flags` in the third byte and some payload.
    fn answer(query: &[u8], flags: u8, payload: &[u8]) -> Vec<u8> {
        let mut a = query.to_vec();
        a[2] = flags;
        a.extend_from_slice(payload);
        a
    }

    const TIMEOUT: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn answers_come_back_byte_for_byte_ignoring_strangers() {
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = server.local_addr().unwrap();
        let upstream = Upstream::new(addr, TIMEOUT);
        let serve = tokio::spawn(async move {
            let mut buf = [0u8; 512];
            let (n, from) = server.recv_from(&mut buf).await.unwrap();
            let q = buf[..n].to_vec();
            // A stray packet with another id, then the real answer.
            let mut stray = answer(&q, QR, b"stray");
            stray[0] ^= 0xff;
            server.send_to(&stray, from).await.unwrap();
            server
                .send_to(&answer(&q, QR | 0x01, b"real"), from)
                .await
                .unwrap();
        });
        let got = upstream.forward(&query()).await.unwrap();
        assert_eq!(got, answer(&query(), QR | 0x01, b"real"));
        serve.await.unwrap();
    }

    /// A UDP socket and a TCP listener on the same loopback port: the UDP port is picked by the
    /// system, and another one taken when its TCP twin is in use (an ephemeral port of some
    /// other connection).
    async fn udp_and_tcp_on_one_port() -> (UdpSocket, tokio::net::TcpListener, SocketAddr) {
        for _ in 0..100 {
            let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let addr = udp.local_addr().unwrap();
            if let Ok(tcp) = tokio::net::TcpListener::bind(addr).await {
                return (udp, tcp, addr);
            }
        }
        panic!("no loopback port free for both UDP and TCP in 100 tries");
    }

    #[tokio::test]
    async fn a_truncated_answer_is_asked_for_again_over_tcp() {
        let (udp, tcp, addr) = udp_and_tcp_on_one_port().await;
        let full = answer(&query(), QR, &vec![0xab; 3000]);
        let expected = full.clone();
        let serve = tokio::spawn(async move {
            let mut buf = [0u8; 512];
            let (n, from) = udp.recv_from(&mut buf).await.unwrap();
            udp.send_to(&answer(&buf[..n], QR | TC, b""), from)
                .await
                .unwrap();
            let (mut stream, _) = tcp.accept().await.unwrap();
            let mut prefix = [0u8; 2];
            stream.read_exact(&mut prefix).await.unwrap();
            let mut q = vec![0u8; usize::from(u16::from_be_bytes(prefix))];
            stream.read_exact(&mut q).await.unwrap();
            assert_eq!(q, query(), "the same query over TCP");
            stream
                .write_all(&(full.len() as u16).to_be_bytes())
                .await
                .unwrap();
            stream.write_all(&full).await.unwrap();
        });
        let got = Upstream::new(addr, TIMEOUT)
            .forward(&query())
            .await
            .unwrap();
        assert_eq!(got, expected);
        serve.await.unwrap();
    }

    #[tokio::test]
    async fn a_silent_upstream_is_a_timeout() {
        let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let upstream = Upstream::new(silent.local_addr().unwrap(), Duration::from_millis(200));
        let error = upstream.forward(&query()).await.unwrap_err();
        assert!(matches!(error, UpstreamError::Timeout(..)), "{error}");
    }

    #[tokio::test]
    async fn a_closed_port_fails_without_waiting_out_the_timeout() {
        let gone = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = gone.local_addr().unwrap();
        drop(gone);
        // The port-unreachable reply turns into an error on the connected socket (an I/O
        // error, not a timeout).
        let error = Upstream::new(addr, Duration::from_secs(30))
            .forward(&query())
            .await
            .unwrap_err();
        assert!(matches!(error, UpstreamError::Io { .. }), "{error}");
    }

    #[tokio::test]
    async fn short_queries_are_refused() {
        let upstream = Upstream::new("127.0.0.1:9".parse().unwrap(), TIMEOUT);
        assert!(matches!(
            upstream.forward(&[1, 2, 3]).await,
            Err(UpstreamError::ShortQuery)
        ));
    }
}
