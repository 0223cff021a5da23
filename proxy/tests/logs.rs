//! The proxy's logs carry colour codes on a terminal only: a container runtime's log file, which
//! `kubectl logs` shows, gets plain lines.

// A failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::process::Command;

const PROXY: &str = env!("CARGO_BIN_EXE_servicekeel-proxy");
const ESCAPE: char = '\u{1b}';

/// A sidecar without its required environment: it logs why and exits.
fn misconfigured() -> Command {
    let mut command = Command::new(PROXY);
    command.arg("sidecar").env_clear();
    command
}

#[test]
fn logs_to_a_pipe_are_plain() {
    let output = misconfigured().output().unwrap();
    assert!(!output.status.success());
    let logs = String::from_utf8(output.stderr).unwrap();
    assert!(logs.contains("POD_NAMESPACE"), "{logs}");
    assert!(!logs.contains(ESCAPE), "{logs:?}");
}

/// What the misconfigured sidecar writes on a terminal (`script` gives it one), with `NO_COLOR`
/// set to `no_color`.
fn on_a_terminal(no_color: &str) -> String {
    let output = Command::new("script")
        .args(["--quiet", "--return", "--command"])
        .arg(format!("'{PROXY}' sidecar"))
        .arg("/dev/null")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap())
        .env("NO_COLOR", no_color)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let logs = String::from_utf8(output.stdout).unwrap();
    assert!(logs.contains("POD_NAMESPACE"), "{logs}");
    logs
}

#[test]
fn logs_to_a_terminal_are_coloured_unless_no_color_is_set() {
    assert!(on_a_terminal("").contains(ESCAPE));
    assert!(!on_a_terminal("1").contains(ESCAPE));
}
