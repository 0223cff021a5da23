//! The router's `--scheduling`: every thread of the running process has the policy asked for.

// A failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const PROXY: &str = env!("CARGO_BIN_EXE_servicekeel-proxy");
/// The kernel's numbers for the policies, as `/proc/<pid>/task/<tid>/stat` gives them.
const SCHED_OTHER: u32 = 0;
const SCHED_BATCH: u32 = 3;

/// `command` (the proxy, or a program that runs it) given the arguments of a router without an
/// API server or links, its socket in `dir`, and no `SERVICEKEEL_ROUTER_SCHEDULING`.
fn router_in(command: Command, dir: &Path) -> Command {
    let mut command = support::router_args(command, &dir.join("router.sock"), &dir.join("state"));
    command.env_remove("SERVICEKEEL_ROUTER_SCHEDULING");
    command
}

/// Starts `command` and returns once the router's socket in `dir` is there (its runtime and
/// threads have started).
fn started(command: &mut Command, dir: &Path) -> Child {
    let child = command.spawn().unwrap();
    let started = Instant::now();
    while !dir.join("router.sock").exists() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the router made no socket"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    child
}

/// The router with `args` added and `scheduling` as its environment's
/// `SERVICEKEEL_ROUTER_SCHEDULING` (unset when `None`), started.
fn router(dir: &Path, args: &[&str], scheduling: Option<&str>) -> Child {
    let mut command = router_in(Command::new(PROXY), dir);
    command
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(value) = scheduling {
        command.env("SERVICEKEEL_ROUTER_SCHEDULING", value);
    }
    started(&mut command, dir)
}

/// A thread of a running process, as `/proc/<pid>/task/<tid>/stat` gives it.
#[derive(Debug)]
struct Thread {
    tid: u32,
    name: String,
    policy: u32,
}

/// Each thread of `pid`, each read from its one `stat` file; a thread that ends while they are
/// read is left out.
fn threads(pid: u32) -> Vec<Thread> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("stat")).ok())
        .map(|stat| {
            // "tid (name) state ...": fields after the name's closing parenthesis start at the
            // third; the policy is the 41st.
            let (head, rest) = stat.rsplit_once(')').unwrap();
            let (tid, name) = head.split_once(" (").unwrap();
            Thread {
                tid: tid.parse().unwrap(),
                name: name.to_string(),
                policy: rest
                    .split_whitespace()
                    .nth(41 - 3)
                    .unwrap()
                    .parse()
                    .unwrap(),
            }
        })
        .collect()
}

/// The scheduling policy of each thread of `pid`.
fn policies(pid: u32) -> Vec<u32> {
    threads(pid).into_iter().map(|t| t.policy).collect()
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

/// A router asking for `--scheduling=batch`, run as user and group 65534 under the policy
/// `chrt` gives it (`policy`, such as `--other`), its socket in `dir`, which it may write; started,
/// with the threads' policies found and its logs.
fn unprivileged_router_under(policy: &str, dir: &Path) -> (Vec<u32>, String) {
    let mut permissions = std::fs::metadata(dir).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut permissions, 0o777);
    std::fs::set_permissions(dir, permissions).unwrap();
    let mut unprivileged = Command::new("chrt");
    unprivileged
        .args([
            policy,
            "0",
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
        ])
        .arg(PROXY);
    let mut command = router_in(unprivileged, dir);
    command
        .arg("--scheduling=batch")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = started(&mut command, dir);
    // `chrt` and `setpriv` exec the router, so the child is the router itself.
    let found = policies(child.id());
    child.kill().unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(found.len() > 1, "not the router's threads: {found:?}");
    (found, String::from_utf8(output.stderr).unwrap())
}

/// Choosing `SCHED_BATCH` from the usual policy needs no privilege.
#[test]
fn an_unprivileged_router_gets_batch_scheduling() {
    let dir = tempfile::tempdir().unwrap();
    let (found, logs) = unprivileged_router_under("--other", dir.path());
    assert!(found.iter().all(|p| *p == SCHED_BATCH), "{found:?}\n{logs}");
}

/// The kernel refuses `SCHED_BATCH` to an unprivileged thread under `SCHED_IDLE` whose nice
/// value is outside its `RLIMIT_NICE` (0 by default): the router says so, keeps its threads as
/// they were and serves.
#[test]
fn a_refusal_is_a_warning_and_the_router_runs_as_it_was() {
    const SCHED_IDLE: u32 = 5;
    let dir = tempfile::tempdir().unwrap();
    let (found, logs) = unprivileged_router_under("--idle", dir.path());
    assert!(found.iter().all(|p| *p == SCHED_IDLE), "{found:?}");
    assert!(
        logs.contains("cannot schedule the router's threads as batch: Operation not permitted"),
        "{logs}"
    );
}

#[test]
fn normal_leaves_every_thread_as_it_was_and_watches_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = router(dir.path(), &["--scheduling=normal"], None);
    let found = threads(child.id());
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(found.len() > 1, "one thread only: {found:?}");
    assert!(found.iter().all(|t| t.policy == SCHED_OTHER), "{found:?}");
    assert!(found.iter().all(|t| t.name != "scheduling"), "{found:?}");
}

#[test]
fn by_default_the_router_watches_the_node_s_cpus() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = router(dir.path(), &[], None);
    let found = threads(child.id());
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        found.iter().any(|t| t.name == "scheduling"),
        "no watching thread: {found:?}"
    );
}

/// `/proc/stat` of a 2-CPU node after `ticks` ticks, of which the share `idle` idled.
fn node_stat(ticks: u64, idle: f64) -> String {
    let idle_ticks = (ticks as f64 * idle) as u64;
    format!(
        "cpu  {} 0 0 {idle_ticks} 0 0 0 0 0 0\ncpu0 0 0 0 0 0 0 0 0 0 0\ncpu1 0 0 0 0 0 0 0 0 0 0\n",
        ticks - idle_ticks
    )
}

/// Writes `/proc/stat` texts to `path` every 100 ms, 20 ticks of each CPU apart, the share of
/// idle time the last value of `idle` gives, until `idle` is negative.
fn feed(path: std::path::PathBuf, idle: std::sync::Arc<std::sync::Mutex<f64>>) {
    let mut ticks = 1_000u64;
    let mut idle_ticks = 500f64;
    loop {
        let share = *idle.lock().unwrap();
        if share < 0.0 {
            return;
        }
        ticks += 40;
        idle_ticks += 40.0 * share;
        // Written in place, so the bind mount keeps showing the file.
        std::fs::write(&path, node_stat(ticks, idle_ticks / ticks as f64)).unwrap();
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Polls until `found` holds for the threads of `pid`, waking the router by connecting to its
/// socket in `dir` between looks; panics after 20 s.
fn until(pid: u32, dir: &Path, what: &str, found: impl Fn(&[Thread]) -> bool) {
    let started = Instant::now();
    loop {
        // A few connections at once, so that more than one worker wakes.
        let wakers: Vec<_> = (0..8)
            .filter_map(|_| std::os::unix::net::UnixStream::connect(dir.join("router.sock")).ok())
            .collect();
        drop(wakers);
        let threads = threads(pid);
        if found(&threads) {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{what}: {threads:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `auto` against the node's CPUs as the router reads them: its `/proc/stat` is a file the test
/// writes, bind-mounted over the real one in a mount namespace of the router's own (as LXCFS
/// does for containers). While a whole CPU idles, the runtime's threads go under `SCHED_BATCH`
/// as they wake; once none does, back to `SCHED_OTHER`.
#[test]
fn auto_follows_the_idle_cpus_the_router_reads() {
    let dir = tempfile::tempdir().unwrap();
    let stat = dir.path().join("stat");
    std::fs::write(&stat, node_stat(1_000, 0.5)).unwrap();
    let idle = std::sync::Arc::new(std::sync::Mutex::new(0.9));
    let feeder = std::thread::spawn({
        let (stat, idle) = (stat.clone(), idle.clone());
        move || feed(stat, idle)
    });
    let mut namespaced = Command::new("unshare");
    namespaced
        .args(["--mount", "--propagation=private", "sh", "-c"])
        .arg(r#"mount --bind "$0" /proc/stat && exec "$@""#)
        .arg(&stat)
        .arg(PROXY);
    let mut command = router_in(namespaced, dir.path());
    command
        .arg("--scheduling=auto")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = started(&mut command, dir.path());
    let pid = child.id();
    let workers = |t: &&Thread| t.name.starts_with("tokio-r");
    until(pid, dir.path(), "no worker went batch", |threads| {
        threads
            .iter()
            .filter(workers)
            .any(|t| t.policy == SCHED_BATCH)
    });
    let batch: Vec<u32> = threads(pid)
        .iter()
        .filter(workers)
        .filter(|t| t.policy == SCHED_BATCH)
        .map(|t| t.tid)
        .collect();
    *idle.lock().unwrap() = 0.2;
    until(pid, dir.path(), "no batch worker went back", |threads| {
        threads
            .iter()
            .any(|t| batch.contains(&t.tid) && t.policy == SCHED_OTHER)
    });
    *idle.lock().unwrap() = -1.0;
    feeder.join().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
}
