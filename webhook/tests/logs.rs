//! The webhook's text logs carry colour codes on a terminal only: a container runtime's log
//! file, which `kubectl logs` shows, gets plain lines.

// A failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::process::Command;

const WEBHOOK: &str = env!("CARGO_BIN_EXE_servicekeel-webhook");
const MISSING: &str = "/nonexistent/pod.yaml";

/// What `inject` of a file that does not exist writes, run by `shell` with `NO_COLOR` set to
/// `no_color`: its error names the file.
fn failing_inject(shell: &[&str], no_color: &str) -> String {
    let output = Command::new(shell[0])
        .args(&shell[1..])
        .env("NO_COLOR", no_color)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let logs = String::from_utf8([output.stdout, output.stderr].concat()).unwrap();
    assert!(logs.contains(MISSING), "{logs}");
    logs
}

#[test]
fn logs_to_a_pipe_are_plain() {
    let logs = failing_inject(&[WEBHOOK, "inject", "-f", MISSING], "");
    assert!(!logs.contains('\u{1b}'), "{logs:?}");
}

#[test]
fn logs_to_a_terminal_are_coloured_unless_no_color_is_set() {
    // `script` runs the command on a terminal of its own and copies what it writes to stdout.
    let command = format!("'{WEBHOOK}' inject -f {MISSING}");
    let on_a_terminal = [
        "script",
        "--quiet",
        "--return",
        "--command",
        &command,
        "/dev/null",
    ];
    assert!(failing_inject(&on_a_terminal, "").contains('\u{1b}'));
    assert!(!failing_inject(&on_a_terminal, "1").contains('\u{1b}'));
}
