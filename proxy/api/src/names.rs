//! Kubernetes name rules used by the contract: DNS-1123 labels and subdomains, IANA service names.
//!
//! Each check returns `Err` with a sentence a user can act on, in Kubernetes' own wording.

const LABEL_MAX: usize = 63;
const SUBDOMAIN_MAX: usize = 253;
const IANA_SVC_NAME_MAX: usize = 15;

/// A DNS-1123 label: at most 63 lowercase alphanumerics or '-', starting and ending alphanumeric.
pub fn check_dns1123_label(value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err("must not be empty".into());
    }
    if value.len() > LABEL_MAX {
        return Err(format!("must be no more than {LABEL_MAX} characters"));
    }
    let bytes = value.as_bytes();
    let edge_ok = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let inner_ok = |b: u8| edge_ok(b) || b == b'-';
    if !bytes.iter().all(|&b| inner_ok(b)) || !edge_ok(bytes[0]) || !edge_ok(bytes[bytes.len() - 1])
    {
        return Err(
            "must be a DNS-1123 label: lowercase alphanumeric characters or '-', \
             starting and ending with an alphanumeric character"
                .into(),
        );
    }
    Ok(())
}

/// A DNS-1123 subdomain: at most 253 characters, dot-separated DNS-1123 labels.
pub fn check_dns1123_subdomain(value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err("must not be empty".into());
    }
    if value.len() > SUBDOMAIN_MAX {
        return Err(format!("must be no more than {SUBDOMAIN_MAX} characters"));
    }
    if value
        .split('.')
        .any(|label| check_dns1123_label(label).is_err())
    {
        return Err(
            "must be a DNS-1123 subdomain: lowercase alphanumeric characters, '-' or '.', \
             each dot-separated part starting and ending with an alphanumeric character"
                .into(),
        );
    }
    Ok(())
}

/// An IANA service name, as used for named container ports: at most 15 lowercase alphanumerics
/// or '-', with at least one letter and no leading, trailing or doubled '-'.
pub fn check_iana_svc_name(value: &str) -> Result<(), String> {
    let valid = !value.is_empty()
        && value.len() <= IANA_SVC_NAME_MAX
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && value.bytes().any(|b| b.is_ascii_lowercase())
        && !value.starts_with('-')
        && !value.ends_with('-')
        && !value.contains("--");
    if valid {
        Ok(())
    } else {
        Err(format!(
            "must be a port name: at most {IANA_SVC_NAME_MAX} lowercase alphanumeric characters \
             or '-', with at least one letter and no leading, trailing or doubled '-'"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        for ok in ["a", "db-service", "0abc", &"a".repeat(63)] {
            assert!(check_dns1123_label(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", "a-", "A", "a.b", "a_b", &"a".repeat(64)] {
            assert!(check_dns1123_label(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn subdomains() {
        for ok in ["cluster-a", "cluster-a.local", "a.b.c"] {
            assert!(check_dns1123_subdomain(ok).is_ok(), "{ok}");
        }
        let too_long = ["a".repeat(63).as_str(); 5].join(".");
        for bad in [
            "",
            ".a",
            "a.",
            "a..b",
            "Cluster",
            "a_b.c",
            too_long.as_str(),
        ] {
            assert!(check_dns1123_subdomain(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn iana_service_names() {
        for ok in ["http", "grpc-web", "h2c", "a1234567890bcde"] {
            assert!(check_iana_svc_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "8080",
            "-http",
            "http-",
            "gr--pc",
            "HTTP",
            "a1234567890bcdef",
        ] {
            assert!(check_iana_svc_name(bad).is_err(), "{bad}");
        }
    }
}
