//! Child processes of the local cluster. Each writes its output to its own log file, is stopped
//! (SIGTERM, then SIGKILL) when dropped, and can be tied to this process so that it dies with it
//! even when this process is killed: tests must never leave a control plane behind.

use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rustix::process::{Pid, Signal, kill_process};

/// How long a process gets between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Whether a child outlives this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifetime {
    /// Killed by the kernel when this process ends, however it ends (tests).
    TiedToThisProcess,
    /// Keeps running after this process exits, in its own process group (`servicekeel-e2e up`).
    Detached,
}

#[derive(Debug)]
pub struct Process {
    name: String,
    child: Option<Child>,
    log: PathBuf,
    program: PathBuf,
    args: Vec<OsString>,
    lifetime: Lifetime,
}

impl Process {
    pub fn spawn(
        name: &str,
        program: &Path,
        args: &[OsString],
        log: &Path,
        lifetime: Lifetime,
    ) -> anyhow::Result<Process> {
        let out = File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
        let child = launch(name, program, args, out, lifetime)?;
        Ok(Process {
            name: name.to_string(),
            child: Some(child),
            log: log.to_owned(),
            program: program.to_owned(),
            args: args.to_vec(),
            lifetime,
        })
    }

    /// Starts the process again with the same command line (stopping it first if it runs); its
    /// output goes on at the end of the same log.
    pub fn start_again(&mut self) -> anyhow::Result<()> {
        self.stop();
        let out = File::options()
            .append(true)
            .open(&self.log)
            .with_context(|| format!("cannot open {}", self.log.display()))?;
        self.child = Some(launch(
            &self.name,
            &self.program,
            &self.args,
            out,
            self.lifetime,
        )?);
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn log(&self) -> &Path {
        &self.log
    }

    /// The running process's id (none once stopped).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|child| child.id())
    }

    /// Fails, with the end of the log, when the process has exited.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        let Some(child) = self.child.as_mut() else {
            bail!("{} is not running", self.name);
        };
        if let Some(status) = child.try_wait()? {
            bail!(
                "{} exited ({status}); the end of its log {}:\n{}",
                self.name,
                self.log.display(),
                log_tail(&self.log, 40)
            );
        }
        Ok(())
    }

    /// Leaves the process running and forgets it; returns its pid.
    pub fn detach(mut self) -> Option<u32> {
        self.child.take().map(|child| child.id())
    }

    /// SIGTERM, then SIGKILL after a grace period; waits for it to exit.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Some(pid) = Pid::from_raw(child.id() as i32) {
            let _ = kill_process(pid, Signal::TERM);
        }
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.stop();
    }
}

fn launch(
    name: &str,
    program: &Path,
    args: &[OsString],
    out: File,
    lifetime: Lifetime,
) -> anyhow::Result<Child> {
    let err = out.try_clone()?;
    let mut command = match lifetime {
        // The parent-death signal fires when the spawning *thread* ends, so tied children are
        // spawned from one thread that lives as long as the process.
        Lifetime::TiedToThisProcess => {
            let mut command = Command::new("setpriv");
            command.args(["--pdeathsig", "KILL", "--"]).arg(program);
            command
        }
        Lifetime::Detached => {
            let mut command = Command::new(program);
            command.process_group(0);
            command
        }
    };
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    match lifetime {
        Lifetime::TiedToThisProcess => spawn_from_keeper(command),
        Lifetime::Detached => command.spawn(),
    }
    .with_context(|| format!("cannot start {name} ({})", program.display()))
}

/// Stops a process started by an earlier `servicekeel-e2e up`, if `pid` is still the program
/// named `program` (a pid can be reused). Returns whether it was running.
pub fn stop_pid(pid: u32, program: &str) -> bool {
    if !is_running(pid, program) {
        return false;
    }
    let Some(raw) = Pid::from_raw(pid as i32) else {
        return false;
    };
    let _ = kill_process(raw, Signal::TERM);
    let deadline = Instant::now() + STOP_GRACE;
    while Instant::now() < deadline && is_running(pid, program) {
        std::thread::sleep(Duration::from_millis(50));
    }
    if is_running(pid, program) {
        let _ = kill_process(raw, Signal::KILL);
    }
    true
}

/// Whether `pid` is alive and runs `program` (matched against its command line).
pub fn is_running(pid: u32, program: &str) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let status = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // A zombie has exited already.
    let zombie = status
        .rsplit_once(')')
        .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
    !zombie && String::from_utf8_lossy(&cmdline).contains(program)
}

/// The value of field `name` (such as `VmRSS` or `CapEff`) in `/proc/<pid>/status`, trimmed.
pub fn status_field(pid: u32, name: &str) -> anyhow::Result<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("process {pid} is gone"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .map(|value| value.trim().to_string())
        .with_context(|| format!("no {name} for process {pid}"))
}

/// The last `lines` lines of a log file.
pub fn log_tail(path: &Path, lines: usize) -> String {
    const WINDOW: u64 = 64 * 1024;
    let Ok(mut file) = File::open(path) else {
        return format!("(no log at {})", path.display());
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(WINDOW)));
    let mut text = String::new();
    let mut bytes = Vec::new();
    if file.read_to_end(&mut bytes).is_ok() {
        text = String::from_utf8_lossy(&bytes).into_owned();
    }
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

type SpawnRequest = (Command, mpsc::Sender<std::io::Result<Child>>);

/// Spawns `command` from the keeper thread, which lives until the process exits.
fn spawn_from_keeper(command: Command) -> std::io::Result<Child> {
    static KEEPER: OnceLock<mpsc::Sender<SpawnRequest>> = OnceLock::new();
    let keeper = KEEPER.get_or_init(|| {
        let (requests, incoming) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("process-keeper".into())
            .spawn(move || {
                for (mut command, reply) in incoming {
                    let _ = reply.send(command.spawn());
                }
                // The senders live in a static, so this point is never reached before exit.
                loop {
                    std::thread::park();
                }
            })
            .expect("cannot start the process keeper thread");
        requests
    });
    let (reply, answer) = mpsc::channel();
    keeper
        .send((command, reply))
        .map_err(|_| std::io::Error::other("process keeper thread is gone"))?;
    answer
        .recv()
        .map_err(|_| std::io::Error::other("process keeper thread is gone"))?
}

/// How often [`poll_until`] asks again.
pub const POLL: Duration = Duration::from_millis(200);

/// Polls `check` every [`POLL`] until it returns `Some`; an error from it ends the wait, and
/// so does `timeout`, naming `what`.
pub async fn poll_until<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await? {
            return Ok(value);
        }
        if Instant::now() > deadline {
            bail!("{what} did not happen within {timeout:?}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Polls `check` until it succeeds. Fails, with the end of the log of the process concerned,
/// as soon as one of `processes` exits or when `timeout` passes (reporting `check`'s last
/// answer and the log of the first process).
pub async fn wait_ready<F, Fut>(
    what: &str,
    processes: &mut [&mut Process],
    timeout: Duration,
    mut check: F,
) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        for process in processes.iter_mut() {
            process.check_running()?;
        }
        let last = match check().await {
            Ok(()) => return Ok(()),
            Err(last) => last,
        };
        if Instant::now() > deadline {
            let log = processes
                .first()
                .map(|p| p.log().to_owned())
                .unwrap_or_default();
            bail!(
                "{what} did not become ready within {timeout:?} (last answer: {last}); the end of \
                 {}:\n{}",
                log.display(),
                log_tail(&log, 40)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `GET path` over HTTP/1.0 to `addr` (a local server: etcd, an admin port); the whole reply,
/// status line included. Fails after 2 s.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: {}\r\n\r\n", addr.ip()).as_bytes())
            .await?;
        let mut reply = String::new();
        stream.read_to_string(&mut reply).await?;
        Ok(reply)
    };
    tokio::time::timeout(Duration::from_secs(2), attempt)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

/// A loopback port that was free for TCP and UDP a moment ago. It is taken below the kernel's
/// range of ephemeral ports, so that the connections and sockets opened before the process it is
/// meant for binds it (which take their ports from that range) cannot take it first; each
/// process starts at its own place in that span and goes on from there.
pub fn free_port() -> anyhow::Result<u16> {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let ephemeral = ephemeral_ports_from();
    let span = ephemeral.saturating_sub(FIXED_PORTS_FROM);
    if span < 1024 {
        let listener =
            std::net::TcpListener::bind("127.0.0.1:0").context("no free loopback port")?;
        return Ok(listener.local_addr()?.port());
    }
    let start = std::process::id().wrapping_mul(7919) % span;
    first_free(FIXED_PORTS_FROM, span, || {
        start + NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    })
}

/// The first loopback port free for both TCP and UDP among `span` ports from `from`, tried in
/// the order `next` gives (each taken modulo `span`).
fn first_free(from: u32, span: u32, mut next: impl FnMut() -> u32) -> anyhow::Result<u16> {
    for _ in 0..span {
        let port = (from + next() % span) as u16;
        let free = std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
            && std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok();
        if free {
            return Ok(port);
        }
    }
    bail!(
        "no loopback port free for TCP and UDP in {from}..{}",
        from + span
    )
}

/// Where [`free_port`] starts looking: above the fixed ports of Kubernetes' own components
/// (the kubelet's 10250 and its neighbours) and of common services.
const FIXED_PORTS_FROM: u32 = 20_000;

/// The first port of the kernel's ephemeral range (`ip_local_port_range`), read once; Linux's
/// default where it cannot be read.
fn ephemeral_ports_from() -> u32 {
    static FROM: OnceLock<u32> = OnceLock::new();
    *FROM.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|range| range.split_whitespace().next()?.parse().ok())
            .unwrap_or(32768)
    })
}

/// Arguments as the `OsString`s `Process::spawn` takes.
pub fn args<I: IntoIterator<Item = S>, S: Into<OsString>>(items: I) -> Vec<OsString> {
    items.into_iter().map(Into::into).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_field_is_its_value_alone_and_a_missing_one_an_error() {
        let me = std::process::id();
        let uid = rustix::process::getuid().as_raw();
        assert_eq!(
            status_field(me, "Uid").expect("Uid"),
            format!("{uid}\t{uid}\t{uid}\t{uid}")
        );
        assert!(status_field(me, "VmRSS").expect("VmRSS").ends_with(" kB"));
        // A field's name is matched whole: "Vm" is no field of its own.
        let error = status_field(me, "Vm").expect_err("no such field");
        assert!(error.to_string().contains("no Vm for process"), "{error}");
    }

    #[test]
    fn free_ports_are_below_the_ephemeral_range_free_for_tcp_and_udp_and_each_another() {
        let ephemeral = ephemeral_ports_from() as u16;
        assert!(
            std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
                .expect("the kernel's ephemeral range")
                .starts_with(&ephemeral.to_string()),
            "the range's lower end, {ephemeral}, as the kernel gives it"
        );
        let ports: Vec<u16> = (0..3).map(|_| free_port().expect("a port")).collect();
        for &port in &ports {
            assert!(
                (FIXED_PORTS_FROM as u16..ephemeral).contains(&port),
                "{port} not below {ephemeral}"
            );
            let _tcp = std::net::TcpListener::bind(("127.0.0.1", port)).expect("free for TCP");
            let _udp = std::net::UdpSocket::bind(("127.0.0.1", port)).expect("free for UDP");
        }
        assert!(ports[0] != ports[1] && ports[1] != ports[2] && ports[0] != ports[2]);
    }

    /// A port held for TCP only, or for UDP only, is passed over for the next one free.
    #[test]
    fn a_port_held_for_either_protocol_is_passed_over() {
        // Ports the kernel gives now are free for the other protocol too, as a rule; tried in
        // turn from the held one.
        let tcp_held = std::net::TcpListener::bind("127.0.0.1:0").expect("a TCP port");
        let udp_held = std::net::UdpSocket::bind("127.0.0.1:0").expect("a UDP port");
        for (held, protocol) in [
            (tcp_held.local_addr().expect("addr").port(), "TCP"),
            (udp_held.local_addr().expect("addr").port(), "UDP"),
        ] {
            let mut step = 0;
            let given = first_free(u32::from(held), 64, || {
                step += 1;
                step - 1
            })
            .expect("a free port among 64");
            assert!(step >= 2, "the held port was tried first and passed over");
            assert_ne!(given, held, "held for {protocol}");
            let after = u32::from(held) + 1..u32::from(held) + 64;
            assert!(after.contains(&u32::from(given)), "{given}");
        }
    }
}
