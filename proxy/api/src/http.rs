//! The status code of an HTTP answer, as the tools asking a component's admin server (`/readyz`,
//! `/healthz`) read it: the sidecar's postStart hook and the local cluster's checks.

/// The status code of `reply`, an answer read from its start; none if it does not start with an
/// HTTP status line.
pub fn status(reply: &str) -> Option<u16> {
    let mut status_line = reply.lines().next()?.split_whitespace();
    status_line.next().filter(|v| v.starts_with("HTTP/"))?;
    status_line.next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::status;

    #[test]
    fn the_status_is_read_from_the_status_line_only() {
        assert_eq!(status("HTTP/1.0 200 OK\r\n\r\nok"), Some(200));
        assert_eq!(
            status("HTTP/1.1 503 Service Unavailable\r\n\r\n200"),
            Some(503)
        );
        assert_eq!(status("HTTP/1.1 200"), Some(200));
        assert_eq!(status("200 OK"), None);
        assert_eq!(status("HTTP/1.0 abc"), None);
        assert_eq!(status(""), None);
    }
}
