//! The sidecar's start-to-ready time and idle memory: the real binary is started 20 times
//! with a design-example annotations file, `/readyz` is polled until it answers 200, and the
//! process's resident memory is read from /proc once it is ready. Printed, not asserted
//! (goals: ready within 50 ms, under 10 MB idle).
//!
//! `cargo bench -p servicekeel-proxy --bench startup`

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const RUNS: usize = 20;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

fn ready(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.write_all(b"GET /readyz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
    let mut reply = String::new();
    let _ = stream.read_to_string(&mut reply);
    reply.starts_with("HTTP/1.1 200")
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kib| kib.parse().ok())
        })
        .unwrap_or(0)
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

fn main() {
    let dir = std::env::temp_dir().join(format!("servicekeel-startup-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let annotations = dir.join("annotations");
    std::fs::write(
        &annotations,
        "servicekeel.io/imported-services=\"services:\\n  - name: simple-server\\n    cluster: cluster-a.local\\n    ports:\\n      - port: 8080\\n\"",
    )
    .expect("annotations file");
    let (mut ready_ms, mut rss_mib) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        let admin = free_port();
        let started = Instant::now();
        let mut child = Command::new(env!("CARGO_BIN_EXE_servicekeel-proxy"))
            .arg("sidecar")
            .env_clear()
            .env("POD_NAMESPACE", "default")
            .env("SERVICEKEEL_CLUSTER", "cluster-a")
            .env("SIDECAR_UPSTREAM_DNS", "127.0.0.1:9")
            .env("SIDECAR_DNS_ADDR", "127.0.0.1:0")
            .env("SIDECAR_ADMIN_ADDR", format!("127.0.0.1:{admin}"))
            .env("SIDECAR_ANNOTATIONS_FILE", &annotations)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("the sidecar starts");
        let deadline = started + Duration::from_secs(10);
        while !ready(admin) {
            assert!(
                Instant::now() < deadline,
                "the sidecar did not become ready"
            );
            std::thread::sleep(Duration::from_micros(500));
        }
        ready_ms.push(started.elapsed().as_secs_f64() * 1000.0);
        std::thread::sleep(Duration::from_millis(200));
        rss_mib.push(rss_kib(child.id()) as f64 / 1024.0);
        let _ = child.kill();
        let _ = child.wait();
    }
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "sidecar start-to-ready: median {:.1} ms over {RUNS} starts (goal 50 ms)",
        median(&mut ready_ms)
    );
    println!(
        "sidecar idle RSS: median {:.1} MiB (goal 10 MB)",
        median(&mut rss_mib)
    );
}
