//! `servicekeel-demo`: the demo workload, one static binary for every pod of
//! `manifests/examples/`. The server echoes TCP and UDP and tells its name; the client commands
//! check, from inside a pod, what ServiceKeel promises: names resolve, bytes come back exact.
//!
//! ```text
//! servicekeel-demo serve [--tcp-echo PORT] [--udp-echo PORT] [--name PORT]
//! servicekeel-demo resolve NAME
//! servicekeel-demo tcp HOST:PORT [--bytes N] [--count C | --for SECONDS] [--retries R]
//! servicekeel-demo udp HOST:PORT [--bytes N]
//! servicekeel-demo name HOST:PORT [--count C]
//! servicekeel-demo hold HOST:PORT --seconds S
//! servicekeel-demo sleep
//! ```
//!
//! Every command prints one plain line on success and exits 0; on failure it says why on stderr
//! and exits 1.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs, UdpSocket};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

const USAGE: &str =
    "usage: servicekeel-demo serve [--tcp-echo PORT] [--udp-echo PORT] [--name PORT]
       servicekeel-demo resolve NAME
       servicekeel-demo tcp HOST:PORT [--bytes N] [--count C | --for SECONDS] [--retries R]
       servicekeel-demo udp HOST:PORT [--bytes N]
       servicekeel-demo name HOST:PORT [--count C]
       servicekeel-demo hold HOST:PORT --seconds S
       servicekeel-demo sleep";

const IO_TIMEOUT: Duration = Duration::from_secs(10);
const UDP_ATTEMPTS: u32 = 3;
const UDP_WAIT: Duration = Duration::from_secs(1);
/// The largest UDP payload the client sends (one datagram, no fragmentation games).
const MAX_UDP_BYTES: usize = 1400;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("servicekeel-demo: {error}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &[String]) -> Result<String, String> {
    let (command, rest) = args.split_first().ok_or_else(|| USAGE.to_string())?;
    let mut options = Options::parse(rest)?;
    // Every option is read before anything runs, so a typo fails before any traffic.
    let action: Box<dyn FnOnce() -> Result<String, String>> = match command.as_str() {
        "serve" => {
            let ports = ServePorts {
                tcp: options.port("--tcp-echo")?,
                udp: options.port("--udp-echo")?,
                name: options.port("--name")?,
            };
            Box::new(move || serve(ports))
        }
        "resolve" => {
            let target = options.target()?;
            Box::new(move || resolve(&target))
        }
        "tcp" => {
            let bytes = options.number("--bytes", 4096)?;
            let count = options.number("--count", 1)?;
            let seconds = options.number("--for", 0)?;
            let retries = options.number("--retries", 0)?;
            let target = options.target()?;
            let until = match (count, seconds) {
                (_, 0) => Until::Count(count),
                (1, seconds) => Until::Elapsed(Duration::from_secs(seconds as u64)),
                _ => return Err("--count and --for do not go together".into()),
            };
            if until == Until::Count(1) && retries == 0 {
                Box::new(move || tcp_round_trip(&target, bytes))
            } else {
                Box::new(move || tcp_connections(&target, bytes, until, retries))
            }
        }
        "udp" => {
            let bytes = options.number("--bytes", 512)?;
            let target = options.target()?;
            Box::new(move || udp_round_trip(&target, bytes))
        }
        "name" => {
            let count = options.number("--count", 1)?;
            let target = options.target()?;
            Box::new(move || {
                let names = (0..count)
                    .map(|_| name(&target))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(names.join("\n"))
            })
        }
        "hold" => {
            let seconds = options.number("--seconds", 10)?;
            let target = options.target()?;
            Box::new(move || hold(&target, Duration::from_secs(seconds as u64)))
        }
        "sleep" => Box::new(sleep_until_stopped),
        "-h" | "--help" => return Ok(USAGE.to_string()),
        other => return Err(format!("unknown command {other:?}\n{USAGE}")),
    };
    options.finish()?;
    action()
}

/// `--flag VALUE` pairs and at most one positional argument.
struct Options {
    flags: Vec<(String, String)>,
    positional: Option<String>,
}

impl Options {
    fn parse(args: &[String]) -> Result<Options, String> {
        let mut flags = Vec::new();
        let mut positional = None;
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            if arg.starts_with("--") {
                let value = args.next().ok_or_else(|| format!("{arg} needs a value"))?;
                flags.push((arg.clone(), value.clone()));
            } else if positional.replace(arg.clone()).is_some() {
                return Err(format!("unexpected argument {arg:?}\n{USAGE}"));
            }
        }
        Ok(Options { flags, positional })
    }

    fn target(&mut self) -> Result<String, String> {
        self.positional
            .take()
            .ok_or_else(|| format!("missing HOST:PORT or NAME\n{USAGE}"))
    }

    fn take(&mut self, flag: &str) -> Option<String> {
        let index = self.flags.iter().position(|(f, _)| f == flag)?;
        Some(self.flags.remove(index).1)
    }

    fn number(&mut self, flag: &str, default: usize) -> Result<usize, String> {
        match self.take(flag) {
            None => Ok(default),
            Some(value) => value
                .parse()
                .map_err(|_| format!("{flag} takes a number, not {value:?}")),
        }
    }

    fn port(&mut self, flag: &str) -> Result<Option<u16>, String> {
        self.take(flag)
            .map(|value| {
                value
                    .parse()
                    .map_err(|_| format!("{flag} takes a port number, not {value:?}"))
            })
            .transpose()
    }

    /// Refuses what no command used.
    fn finish(&self) -> Result<(), String> {
        match (self.flags.first(), &self.positional) {
            (Some((flag, _)), _) => Err(format!("unknown option {flag}\n{USAGE}")),
            (None, Some(arg)) => Err(format!("unexpected argument {arg:?}\n{USAGE}")),
            (None, None) => Ok(()),
        }
    }
}

struct ServePorts {
    tcp: Option<u16>,
    udp: Option<u16>,
    name: Option<u16>,
}

fn serve(ports: ServePorts) -> Result<String, String> {
    let ServePorts {
        tcp,
        udp,
        name: name_port,
    } = ports;
    if tcp.is_none() && udp.is_none() && name_port.is_none() {
        return Err("serve needs at least one of --tcp-echo, --udp-echo, --name".into());
    }
    let me = hostname();
    if let Some(port) = tcp {
        let listener = bind_tcp(port)?;
        std::thread::spawn(move || accept_each(listener, echo_connection));
    }
    if let Some(port) = udp {
        let socket = UdpSocket::bind(("0.0.0.0", port))
            .map_err(|e| format!("cannot bind UDP port {port}: {e}"))?;
        std::thread::spawn(move || echo_datagrams(socket));
    }
    if let Some(port) = name_port {
        let listener = bind_tcp(port)?;
        let me = me.clone();
        std::thread::spawn(move || {
            accept_each(listener, move |mut stream| {
                let _ = stream.write_all(format!("{me}\n").as_bytes());
            })
        });
    }
    eprintln!(
        "servicekeel-demo: {me} serving tcp-echo {} udp-echo {} name {}",
        show(tcp),
        show(udp),
        show(name_port)
    );
    sleep_until_stopped()
}

fn show(port: Option<u16>) -> String {
    port.map_or("-".into(), |p| p.to_string())
}

fn bind_tcp(port: u16) -> Result<TcpListener, String> {
    TcpListener::bind(("0.0.0.0", port)).map_err(|e| format!("cannot bind TCP port {port}: {e}"))
}

fn accept_each(listener: TcpListener, handle: impl Fn(TcpStream) + Clone + Send + 'static) {
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                let handle = handle.clone();
                std::thread::spawn(move || handle(stream));
            }
            Err(error) => eprintln!("servicekeel-demo: accept: {error}"),
        }
    }
}

fn echo_connection(mut stream: TcpStream) {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => {
                if stream.write_all(&buffer[..n]).is_err() {
                    return;
                }
            }
            Err(_) => return,
        }
    }
    let _ = stream.shutdown(std::net::Shutdown::Write);
}

fn echo_datagrams(socket: UdpSocket) {
    let mut buffer = vec![0u8; 65536];
    loop {
        match socket.recv_from(&mut buffer) {
            Ok((n, from)) => {
                let _ = socket.send_to(&buffer[..n], from);
            }
            Err(error) => eprintln!("servicekeel-demo: udp: {error}"),
        }
    }
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

fn resolve(name: &str) -> Result<String, String> {
    let addresses = lookup(&format!("{name}:0"))?;
    let list: Vec<String> = addresses.iter().map(|a| a.ip().to_string()).collect();
    Ok(format!("{name} resolves to {}", list.join(" ")))
}

fn lookup(target: &str) -> Result<Vec<SocketAddr>, String> {
    let addresses: Vec<SocketAddr> = target
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {target}: {e}"))?
        .collect();
    if addresses.is_empty() {
        return Err(format!("{target} resolves to no address"));
    }
    Ok(addresses)
}

fn connect(target: &str) -> Result<(TcpStream, SocketAddr), String> {
    let address = lookup(target)?[0];
    let stream = TcpStream::connect_timeout(&address, IO_TIMEOUT)
        .map_err(|e| format!("cannot connect to {target} ({address}): {e}"))?;
    stream
        .set_read_timeout(Some(IO_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(IO_TIMEOUT)))
        .map_err(|e| format!("{target}: {e}"))?;
    Ok((stream, address))
}

/// Bytes no two runs repeat in the same order, so an echo from an earlier run cannot pass.
fn payload(len: usize) -> Vec<u8> {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state as u8
        })
        .collect()
}

fn tcp_round_trip(target: &str, bytes: usize) -> Result<String, String> {
    let started = Instant::now();
    let (mut stream, address) = connect(target)?;
    let sent = payload(bytes);
    let mut writer = stream.try_clone().map_err(|e| format!("{target}: {e}"))?;
    let to_send = sent.clone();
    // Write while reading: an echo of more than the socket buffers would otherwise deadlock.
    let writing = std::thread::spawn(move || {
        writer.write_all(&to_send)?;
        writer.shutdown(std::net::Shutdown::Write)
    });
    let mut received = Vec::with_capacity(bytes);
    stream.read_to_end(&mut received).map_err(|e| {
        format!(
            "{target}: reading the echo after {} bytes: {e}",
            received.len()
        )
    })?;
    match writing.join() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(format!("{target}: writing: {e}")),
        Err(_) => return Err(format!("{target}: the writer failed")),
    }
    if received != sent {
        return Err(format!(
            "{target}: sent {} bytes, got {} back{}",
            sent.len(),
            received.len(),
            first_difference(&sent, &received)
        ));
    }
    Ok(format!(
        "tcp {target} ({address}): {bytes} bytes echoed byte-exact in {:.1} ms",
        started.elapsed().as_secs_f64() * 1000.0
    ))
}

/// How many connections `tcp` makes: a number, or as many as fit in a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Until {
    Count(usize),
    Elapsed(Duration),
}

/// Connections one after another, each a full round trip, until `until`; a failed one is tried
/// again up to `retries` times. Fails on the first connection that fails every try.
fn tcp_connections(
    target: &str,
    bytes: usize,
    until: Until,
    retries: usize,
) -> Result<String, String> {
    let started = Instant::now();
    let mut retried = 0;
    let mut index = 0;
    loop {
        let done = match until {
            Until::Count(count) => index >= count,
            Until::Elapsed(duration) => started.elapsed() >= duration,
        };
        if done {
            break;
        }
        index += 1;
        let mut attempt = 0;
        loop {
            match tcp_round_trip(target, bytes) {
                Ok(_) => break,
                Err(error) if attempt < retries => {
                    eprintln!("servicekeel-demo: connection {index}: {error}; trying again");
                    attempt += 1;
                    retried += 1;
                }
                Err(error) => {
                    return Err(format!(
                        "connection {index} failed {} time(s) after {:.1} s: {error}",
                        attempt + 1,
                        started.elapsed().as_secs_f64()
                    ));
                }
            }
        }
    }
    Ok(format!(
        "tcp {target}: {index} connections of {bytes} bytes echoed byte-exact in {:.1} s, \
         {retried} retried, 0 failed",
        started.elapsed().as_secs_f64()
    ))
}

fn first_difference(sent: &[u8], received: &[u8]) -> String {
    sent.iter()
        .zip(received)
        .position(|(a, b)| a != b)
        .map_or(String::new(), |i| format!(", first difference at byte {i}"))
}

fn udp_round_trip(target: &str, bytes: usize) -> Result<String, String> {
    if bytes == 0 || bytes > MAX_UDP_BYTES {
        return Err(format!("--bytes for udp is 1 to {MAX_UDP_BYTES}"));
    }
    let address = lookup(target)?[0];
    let local: SocketAddr = if address.is_ipv4() {
        "0.0.0.0:0".parse().expect("valid address")
    } else {
        "[::]:0".parse().expect("valid address")
    };
    let socket = UdpSocket::bind(local).map_err(|e| format!("cannot bind a UDP socket: {e}"))?;
    socket
        .connect(address)
        .and_then(|()| socket.set_read_timeout(Some(UDP_WAIT)))
        .map_err(|e| format!("{target} ({address}): {e}"))?;
    let sent = payload(bytes);
    let mut buffer = vec![0u8; 65536];
    let started = Instant::now();
    for attempt in 1..=UDP_ATTEMPTS {
        socket
            .send(&sent)
            .map_err(|e| format!("{target} ({address}): sending: {e}"))?;
        // Skip anything that is not the echo of this payload (a late echo of a lost attempt is).
        let deadline = Instant::now() + UDP_WAIT;
        while Instant::now() < deadline {
            match socket.recv(&mut buffer) {
                Ok(n) if buffer[..n] == sent[..] => {
                    return Ok(format!(
                        "udp {target} ({address}): {bytes} bytes echoed byte-exact in {:.1} ms \
                         (attempt {attempt})",
                        started.elapsed().as_secs_f64() * 1000.0
                    ));
                }
                Ok(n) => {
                    eprintln!("servicekeel-demo: ignoring a {n}-byte datagram that is not the echo")
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    break;
                }
                Err(e) => return Err(format!("{target} ({address}): receiving: {e}")),
            }
        }
    }
    Err(format!(
        "udp {target} ({address}): no echo after {UDP_ATTEMPTS} datagrams"
    ))
}

fn name(target: &str) -> Result<String, String> {
    let (mut stream, _) = connect(target)?;
    let mut reply = String::new();
    stream
        .read_to_string(&mut reply)
        .map_err(|e| format!("{target}: {e}"))?;
    let reply = reply.trim();
    if reply.is_empty() {
        return Err(format!("{target}: the connection closed without a name"));
    }
    Ok(reply.to_string())
}

/// One connection kept busy: a small round trip every 50 ms until `duration` has passed.
fn hold(target: &str, duration: Duration) -> Result<String, String> {
    let (mut stream, address) = connect(target)?;
    let started = Instant::now();
    let mut round_trips = 0u64;
    let mut buffer = [0u8; 64];
    while started.elapsed() < duration {
        let message = payload(buffer.len());
        stream
            .write_all(&message)
            .and_then(|()| stream.read_exact(&mut buffer))
            .map_err(|e| {
                format!("{target} ({address}): the live connection broke after {round_trips} round trips: {e}")
            })?;
        if buffer[..] != message[..] {
            return Err(format!(
                "{target}: round trip {round_trips} came back different"
            ));
        }
        round_trips += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(format!(
        "hold {target} ({address}): one connection, {round_trips} round trips over {} s, none failed",
        duration.as_secs()
    ))
}

/// Waits for SIGTERM or SIGINT (a container's PID 1 would otherwise ignore them).
fn sleep_until_stopped() -> Result<String, String> {
    let mut signals =
        Signals::new([SIGTERM, SIGINT]).map_err(|e| format!("cannot handle signals: {e}"))?;
    let signal = signals.forever().next();
    Ok(format!("stopped by signal {}", signal.unwrap_or_default()))
}
