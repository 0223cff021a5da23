//! Network namespaces for tests that need nodes with their own addresses: a switch namespace
//! holding a bridge, and one namespace per node joined to it by a veth pair. Real processes
//! run inside a node with [`Node::spawn`]; test code runs inside one on [`Node::runtime`], a
//! runtime whose thread has entered the node's namespace. Everything is removed on drop.

use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Runs `ip` with `args`; panics with its stderr when it fails.
pub fn ip(args: &[&str]) {
    let output = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run ip (iproute2 is needed): {e}"));
    assert!(
        output.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn in_ns(ns: &str, args: &[&str]) {
    let mut all = vec!["netns", "exec", ns, "ip"];
    all.extend_from_slice(args);
    ip(&all);
}

/// A set of nodes on one /24, named uniquely for this process.
#[derive(Debug)]
pub struct Net {
    prefix: String,
    switch: String,
    subnet: [u8; 3],
    namespaces: Vec<String>,
    next: u8,
}

static NETS: AtomicUsize = AtomicUsize::new(0);

impl Net {
    pub fn new() -> Net {
        let n = NETS.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id() % 10_000;
        let prefix = format!("sk{pid}n{n}");
        let switch = format!("{prefix}-sw");
        ip(&["netns", "add", &switch]);
        in_ns(&switch, &["link", "add", "br0", "type", "bridge"]);
        in_ns(&switch, &["link", "set", "br0", "up"]);
        // A /24 private to this net: 10.(100 + pid % 100).(n).0
        let subnet = [10, 100 + (pid % 100) as u8, n as u8];
        Net {
            prefix,
            switch: switch.clone(),
            subnet,
            namespaces: vec![switch],
            next: 1,
        }
    }

    /// A new node on the bridge with the next address.
    pub fn node(&mut self, name: &str) -> Node {
        let host = self.next;
        self.next += 1;
        let ns = format!("{}-{name}", self.prefix);
        let outer = format!("{}v{host}", self.prefix);
        let addr = Ipv4Addr::new(self.subnet[0], self.subnet[1], self.subnet[2], host);
        ip(&["netns", "add", &ns]);
        self.namespaces.push(ns.clone());
        ip(&[
            "link",
            "add",
            &outer,
            "netns",
            &self.switch,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &ns,
        ]);
        in_ns(
            &self.switch,
            &["link", "set", &outer, "master", "br0", "up"],
        );
        in_ns(&ns, &["addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
        in_ns(&ns, &["link", "set", "eth0", "up"]);
        in_ns(&ns, &["link", "set", "lo", "up"]);
        Node {
            ns,
            addr,
            port: outer,
        }
    }

    /// Takes `node`'s port on the bridge down (`up` false: the node is cut off, as by a pulled
    /// cable; nothing tells the others) or back up.
    pub fn set_link(&self, node: &Node, up: bool) {
        let state = if up { "up" } else { "down" };
        in_ns(&self.switch, &["link", "set", &node.port, state]);
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// A node: a network namespace with one address.
#[derive(Debug, Clone)]
pub struct Node {
    pub ns: String,
    pub addr: Ipv4Addr,
    /// Its port on the bridge (the switch's end of its veth pair).
    port: String,
}

/// A process started in a node, killed on drop.
#[derive(Debug)]
pub struct Process {
    pub child: Child,
    pub log: PathBuf,
}

impl Process {
    /// Sends SIGKILL and waits for the process to go.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The process's output so far, for failure messages.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Node {
    /// Starts `program` inside the node with `args` and `env`, output to `log`.
    pub fn spawn(
        &self,
        program: &str,
        args: &[&str],
        env: &[(&str, String)],
        log: PathBuf,
    ) -> Process {
        let out = std::fs::File::create(&log).unwrap();
        let err = out.try_clone().unwrap();
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.ns, program])
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        for (key, value) in env {
            command.env(key, value);
        }
        Process {
            child: command.spawn().unwrap(),
            log,
        }
    }

    /// A single-threaded runtime whose thread lives in the node's namespace: sockets made by
    /// tasks spawned on it belong to the node.
    pub fn runtime(&self) -> NodeRuntime {
        let path = format!("/run/netns/{}", self.ns);
        let (handle_tx, handle_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let file = std::fs::File::open(&path).unwrap();
            rustix::thread::move_into_link_name_space(
                file.as_fd(),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )
            .unwrap();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            handle_tx.send(runtime.handle().clone()).unwrap();
            runtime.block_on(async {
                let _ = stopped.await;
            });
        });
        NodeRuntime {
            handle: handle_rx.recv().unwrap(),
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

/// See [`Node::runtime`].
#[derive(Debug)]
pub struct NodeRuntime {
    pub handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NodeRuntime {
    /// Runs `future` inside the node and waits for its result.
    pub async fn run<T: Send + 'static>(
        &self,
        future: impl std::future::Future<Output = T> + Send + 'static,
    ) -> T {
        self.handle.spawn(future).await.unwrap()
    }
}

impl Drop for NodeRuntime {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
