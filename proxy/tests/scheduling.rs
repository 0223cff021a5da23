//! The router's `--scheduling`: every thread of the running process has the policy asked for.

// A failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const PROXY: &str = env!("CARGO_BIN_EXE_servicekeel-proxy");
/// The kernel's numbers for the policies, as `/proc/<pid>/task/<tid>/stat` gives them.
const SCHED_OTHER: u32 = 0;
const SCHED_BATCH: u32 = 3;

/// A router without an API server or links, its socket in `dir`, with `args` added and
/// `scheduling` as its environment's `SERVICEKEEL_ROUTER_SCHEDULING` (unset when `None`);
/// returns once its socket is there (its runtime and threads have started).
fn router(dir: &Path, args: &[&str], scheduling: Option<&str>) -> Child {
    let socket = dir.join("router.sock");
    let mut command = Command::new(PROXY);
    match scheduling {
        Some(value) => command.env("SERVICEKEEL_ROUTER_SCHEDULING", value),
        None => command.env_remove("SERVICEKEEL_ROUTER_SCHEDULING"),
    };
    let child = command
        .args(["router", "--node=n", "--cluster=c", "--no-api"])
        .arg(format!("--socket={}", socket.display()))
        .arg(format!("--state-dir={}", dir.join("state").display()))
        .arg("--admin-addr=127.0.0.1:0")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while !socket.exists() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the router made no socket"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    child
}

/// The scheduling policy of each thread of `pid`.
fn policies(pid: u32) -> Vec<u32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|task| {
            let stat = std::fs::read_to_string(task.unwrap().path().join("stat")).unwrap();
            // Fields after the command's closing parenthesis start at the third; the policy is
            // the 41st.
            let (_, rest) = stat.rsplit_once(')').unwrap();
            rest.split_whitespace()
                .nth(41 - 3)
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect()
}

fn threads_of_a_router_with(args: &[&str], scheduling: Option<&str>) -> Vec<u32> {
    let dir = tempfile::tempdir().unwrap();
    let mut child = router(dir.path(), args, scheduling);
    let found = policies(child.id());
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(found.len() > 1, "one thread only: {found:?}");
    found
}

#[test]
fn batch_scheduling_covers_every_thread_of_the_router() {
    let found = threads_of_a_router_with(&["--scheduling=batch"], None);
    assert!(found.iter().all(|p| *p == SCHED_BATCH), "{found:?}");
}

#[test]
fn the_environment_sets_it_too_and_the_flag_wins() {
    let found = threads_of_a_router_with(&[], Some("batch"));
    assert!(found.iter().all(|p| *p == SCHED_BATCH), "{found:?}");
    let found = threads_of_a_router_with(&["--scheduling=normal"], Some("batch"));
    assert!(found.iter().all(|p| *p == SCHED_OTHER), "{found:?}");
}

#[test]
fn the_router_is_scheduled_normally_by_default() {
    let found = threads_of_a_router_with(&[], None);
    assert!(found.iter().all(|p| *p == SCHED_OTHER), "{found:?}");
}
