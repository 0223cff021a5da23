//! The router as the DaemonSet runs it on a node: `prepare-dirs`, with root's `CAP_CHOWN`
//! alone, hands over the host directories an earlier router running as root left behind; the
//! router then runs as its own user in the sidecars' group with no capabilities, replaces the
//! stale socket, routes from the snapshot root wrote, and the sidecars' group may connect.
//! Needs root and `setpriv`, as the CI machine has.

// A failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod support;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime};

use servicekeel_api::defaults::{ROUTER_UID, SIDECAR_UID};
use servicekeel_proxy::registry::Endpoint;
use support::connects_as;

const PROXY: &str = env!("CARGO_BIN_EXE_servicekeel-proxy");
const ROUTER: u32 = ROUTER_UID as u32;
const SIDECARS: u32 = SIDECAR_UID as u32;

/// `prepare-dirs` handing `dirs` to the router's user and the sidecars' group, run as root with
/// only the capabilities in `bounding` (`setpriv --bounding-set`).
fn prepare_dirs(bounding: &str, dirs: &[&Path]) -> Output {
    Command::new("setpriv")
        .arg(format!("--bounding-set={bounding}"))
        .args(["--inh-caps=-all", "--"])
        .args([PROXY, "prepare-dirs"])
        .arg(format!("--owner={ROUTER}:{SIDECARS}"))
        .args(dirs)
        .env("NO_COLOR", "1")
        .output()
        .unwrap()
}

/// The router run as the DaemonSet runs it: its own user, the sidecars' group, no capabilities.
fn unprivileged_router(run: &Path, state: &Path) -> Child {
    let mut setpriv = Command::new("setpriv");
    setpriv
        .arg(format!("--reuid={ROUTER}"))
        .arg(format!("--regid={SIDECARS}"))
        .args([
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
            "--",
            PROXY,
        ]);
    support::router_args(setpriv, &run.join("router.sock"), state)
        .arg(format!("--socket-gid={SIDECARS}"))
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// The `Name:` line of `/proc/<pid>/status`, its value.
fn status_line(pid: u32, name: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{name}:")))
        .unwrap()
        .trim()
        .to_string()
}

fn owner_of(path: &Path) -> (u32, u32) {
    let meta = std::fs::symlink_metadata(path).unwrap();
    (meta.uid(), meta.gid())
}

#[test]
fn a_router_without_root_takes_over_what_a_root_router_left() {
    let dir = tempfile::tempdir().unwrap();
    // Anyone may look up paths below it, as under /var/run and /var/lib.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (run, state) = (dir.path().join("run"), dir.path().join("state"));
    // What a router running as root left: its socket, and a snapshot only root may read.
    std::fs::create_dir(&run).unwrap();
    std::fs::create_dir(&state).unwrap();
    drop(std::os::unix::net::UnixListener::bind(run.join("router.sock")).unwrap());
    let snapshot = state.join(servicekeel_api::defaults::ROUTER_SNAPSHOT_FILE);
    let endpoint = Endpoint {
        addr: "10.244.0.7:8080".parse().unwrap(),
        node: "n".into(),
        ready: true,
    };
    servicekeel_proxy::snapshot::save(
        &snapshot,
        &[("web.default.c:80/TCP".parse().unwrap(), endpoint)],
        SystemTime::now(),
    )
    .unwrap();
    std::fs::set_permissions(&snapshot, std::fs::Permissions::from_mode(0o600)).unwrap();

    // Without the init container's work the router cannot make its socket.
    let refused = unprivileged_router(&run, &state)
        .wait_with_output()
        .unwrap();
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("Permission denied"), "{said}");

    // Without CAP_CHOWN `prepare-dirs` fails, and says what it needs.
    let failed = prepare_dirs("-all", &[&run, &state]);
    assert!(!failed.status.success());
    let said = String::from_utf8_lossy(&failed.stderr);
    assert!(said.contains("needs root's CAP_CHOWN"), "{said}");
    assert_eq!(owner_of(&run), (0, 0));

    // With it alone, both directories and what is in them change hands.
    let prepared = prepare_dirs("-all,+chown", &[&run, &state]);
    let said = String::from_utf8_lossy(&prepared.stderr);
    assert!(prepared.status.success(), "{said}");
    for path in [&run, &run.join("router.sock"), &state, &snapshot] {
        assert_eq!(owner_of(path), (ROUTER, SIDECARS), "{}", path.display());
    }

    let mut router = unprivileged_router(&run, &state);
    let socket = run.join("router.sock");
    let started = Instant::now();
    // The stale socket is replaced by the router's own; between its removal and the bind there
    // is none.
    let replaced = |socket: &Path| {
        std::fs::symlink_metadata(socket)
            .is_ok_and(|meta| meta.uid() == ROUTER && meta.mode() & 0o777 == 0o660)
    };
    while !replaced(&socket) {
        assert!(
            router.try_wait().unwrap().is_none(),
            "the router stopped: {}",
            String::from_utf8_lossy(&router.wait_with_output().unwrap().stderr)
        );
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no socket of the router's"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let pid = router.id();
    let uid = status_line(pid, "Uid");
    let capabilities = status_line(pid, "CapEff");
    let sidecar_may = connects_as(SIDECARS, SIDECARS, &socket);
    let stranger_may = connects_as(4242, 4242, &socket);
    router.kill().unwrap();
    let logs = String::from_utf8(router.wait_with_output().unwrap().stderr).unwrap();

    // Real, effective, saved and file system user.
    let router_uid = ROUTER.to_string();
    assert_eq!(
        uid.split_whitespace().collect::<Vec<_>>(),
        [router_uid.as_str(); 4]
    );
    assert_eq!(capabilities, "0000000000000000");
    assert!(
        logs.contains("routing from the snapshot entries=1"),
        "{logs}"
    );
    assert!(sidecar_may, "the sidecars' group cannot connect");
    assert!(!stranger_may, "another user connected");
    assert_eq!(owner_of(&socket), (ROUTER, SIDECARS));
}
