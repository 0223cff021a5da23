//! How every ServiceKeel binary colours its logs.

use std::ffi::OsStr;
use std::io::IsTerminal;

/// Whether log lines written to `stream` carry ANSI colour codes: only when it is a terminal,
/// and never while `NO_COLOR` is set to a non-empty value (<https://no-color.org>). A container
/// runtime's log file (what `kubectl logs` shows), a pipe or a file gets plain text.
pub fn colour(stream: &impl IsTerminal) -> bool {
    colour_for(
        stream.is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    )
}

/// [`colour`] for a stream that is or is not a `terminal`, with this value of `NO_COLOR`.
fn colour_for(terminal: bool, no_color: Option<&OsStr>) -> bool {
    terminal && no_color.is_none_or(OsStr::is_empty)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_terminal_gets_colours() {
        assert!(colour_for(true, None));
        assert!(!colour_for(false, None));
    }

    #[test]
    fn no_color_set_to_a_value_turns_colours_off() {
        assert!(!colour_for(true, Some(OsStr::new("1"))));
        assert!(!colour_for(true, Some(OsStr::new("false"))));
        assert!(colour_for(true, Some(OsStr::new(""))));
        assert!(!colour_for(false, Some(OsStr::new(""))));
    }
}
