//! `servicekeel-proxy wait`, the sidecar container's postStart hook, as the kubelet runs it:
//! started beside a sidecar that is not up yet, it returns once the sidecar is ready, and it
//! fails with a message naming the address when the sidecar never is.

// A failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const PROXY: &str = env!("CARGO_BIN_EXE_servicekeel-proxy");

/// A loopback address nothing listens on now.
fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn wait(admin: SocketAddr, timeout: &str) -> Child {
    Command::new(PROXY)
        .args(["wait", "--timeout", timeout])
        .env_clear()
        .env("SIDECAR_ADMIN_ADDR", admin.to_string())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Kills the process when dropped, so a failed test leaves no sidecar behind.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn returns_once_the_sidecar_started_after_it_is_ready() {
    let dir = tempfile::tempdir().unwrap();
    let annotations = dir.path().join("annotations");
    std::fs::write(&annotations, "").unwrap();
    let admin = free_addr();
    let mut waiting = wait(admin, "20s");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        waiting.try_wait().unwrap().is_none(),
        "wait returned before any sidecar ran"
    );
    // The sidecar as the webhook configures it: admin on the wildcard address, which `wait`
    // (reading the same variable) reaches on loopback.
    let _sidecar = Running(
        Command::new(PROXY)
            .arg("sidecar")
            .env_clear()
            .env("POD_NAMESPACE", "default")
            .env("SERVICEKEEL_CLUSTER", "cluster-a")
            .env("SIDECAR_UPSTREAM_DNS", "127.0.0.1:9")
            .env("SIDECAR_DNS_ADDR", free_addr().to_string())
            .env("SIDECAR_ADMIN_ADDR", format!("0.0.0.0:{}", admin.port()))
            .env("SIDECAR_ANNOTATIONS_FILE", &annotations)
            .env(
                "SIDECAR_SERVER_LISTEN",
                format!("unix://{}", dir.path().join("router.sock").display()),
            )
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let output = waiting.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn fails_naming_the_address_when_nothing_listens() {
    let admin = free_addr();
    let output = wait(admin, "300ms").wait_with_output().unwrap();
    assert!(!output.status.success());
    let logs = String::from_utf8(output.stderr).unwrap();
    assert!(
        logs.contains(&format!("http://{admin}/readyz was not ready within 300ms")),
        "{logs}"
    );
    assert!(logs.contains("refused"), "{logs}");
}

#[test]
fn fails_saying_what_a_sidecar_that_is_not_ready_answers() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let admin = listener.local_addr().unwrap();
    let waiting = wait(admin, "300ms");
    // Not ready, as a sidecar whose DNS is not serving answers, to every attempt.
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let mut stream = stream.unwrap();
            // One read, then the answer and the close: a request sent in pieces would find the
            // connection gone before its end and never see the answer.
            let mut request = [0u8; 256];
            let _ = stream.read(&mut request);
            let _ = stream.write_all(
                b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 18\r\n\r\nDNS is not serving",
            );
        }
    });
    let output = waiting.wait_with_output().unwrap();
    assert!(!output.status.success());
    let logs = String::from_utf8(output.stderr).unwrap();
    assert!(logs.contains("it answered 503"), "{logs}");
}
