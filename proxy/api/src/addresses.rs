//! Address formats of the contract: the loopback range imported services get their local IPs
//! from (`SIDECAR_IP_RANGE`), and the router's address (`SIDECAR_SERVER_LISTEN`).

use std::fmt;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::str::FromStr;

use crate::defaults;

/// An IPv4 range inside 127.0.0.0/8 with at least two usable addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalRange {
    network: Ipv4Addr,
    prefix: u8,
}

impl LocalRange {
    /// The usable addresses, lowest first: all but the range's first and last.
    pub fn hosts(&self) -> impl Iterator<Item = Ipv4Addr> + use<> {
        let first = u32::from(self.network);
        let size = 1u64 << (32 - self.prefix);
        (1..size - 1).map(move |offset| Ipv4Addr::from(first + offset as u32))
    }

    pub fn capacity(&self) -> usize {
        (1usize << (32 - self.prefix)) - 2
    }
}

impl FromStr for LocalRange {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let parsed = text.split_once('/').and_then(|(ip, bits)| {
            let ip: Ipv4Addr = ip.parse().ok()?;
            let prefix: u8 = bits.parse().ok()?;
            (prefix <= 32).then_some((ip, prefix))
        });
        let Some((ip, prefix)) = parsed else {
            return Err(format!(
                "{text:?} is not an IPv4 CIDR like {}",
                defaults::IP_RANGE
            ));
        };
        if !ip.is_loopback() || prefix > 30 {
            return Err(format!(
                "{text:?} must be a loopback range (inside 127.0.0.0/8) of at least 4 addresses"
            ));
        }
        let mask = u32::MAX << (32 - prefix);
        Ok(LocalRange {
            network: Ipv4Addr::from(u32::from(ip) & mask),
            prefix,
        })
    }
}

impl fmt::Display for LocalRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// Where the node router listens for sidecars.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouterAddr {
    Unix(PathBuf),
    /// `host:port`, resolved when connecting.
    Tcp(String),
}

impl FromStr for RouterAddr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        if let Some(path) = text.strip_prefix("unix://") {
            if !path.starts_with('/') {
                return Err(format!(
                    "{text:?}: a unix:// address needs an absolute path"
                ));
            }
            return Ok(RouterAddr::Unix(PathBuf::from(path)));
        }
        if let Some(host_port) = text.strip_prefix("tcp://") {
            let valid = host_port.rsplit_once(':').is_some_and(|(host, port)| {
                !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
            });
            if !valid {
                return Err(format!("{text:?}: a tcp:// address needs HOST:PORT"));
            }
            return Ok(RouterAddr::Tcp(host_port.to_string()));
        }
        Err(format!(
            "{text:?} is not unix:///PATH or tcp://HOST:PORT (like {})",
            defaults::ROUTER_LISTEN
        ))
    }
}

impl fmt::Display for RouterAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RouterAddr::Unix(path) => write!(f, "unix://{}", path.display()),
            RouterAddr::Tcp(host_port) => write!(f, "tcp://{host_port}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        let range: LocalRange = defaults::IP_RANGE.parse().unwrap();
        assert_eq!(range.capacity(), 254);
        let hosts: Vec<Ipv4Addr> = range.hosts().collect();
        assert_eq!(hosts.len(), 254);
        assert_eq!(hosts[0], Ipv4Addr::new(127, 0, 66, 1));
        assert_eq!(hosts[253], Ipv4Addr::new(127, 0, 66, 254));
        // Host bits are ignored, as in any CIDR.
        assert_eq!(
            "127.0.66.9/30".parse::<LocalRange>().unwrap().to_string(),
            "127.0.66.8/30"
        );
        assert_eq!("127.0.66.8/30".parse::<LocalRange>().unwrap().capacity(), 2);
        for bad in [
            "10.0.0.0/24",
            "127.0.0.1/31",
            "127.0.0.0",
            "127.0.0.0/33",
            "x/24",
        ] {
            assert!(bad.parse::<LocalRange>().is_err(), "{bad}");
        }
    }

    #[test]
    fn router_addresses() {
        assert_eq!(
            defaults::ROUTER_LISTEN.parse::<RouterAddr>().unwrap(),
            RouterAddr::Unix("/var/run/servicekeel/router.sock".into())
        );
        assert_eq!(
            "tcp://10.0.0.5:15008".parse::<RouterAddr>().unwrap(),
            RouterAddr::Tcp("10.0.0.5:15008".into())
        );
        assert_eq!(
            "tcp://[::1]:15008"
                .parse::<RouterAddr>()
                .unwrap()
                .to_string(),
            "tcp://[::1]:15008"
        );
        for bad in [
            "unix://relative",
            "tcp://host",
            "tcp://:1",
            "tcp://h:0",
            "http://x:1",
            "/path",
        ] {
            assert!(bad.parse::<RouterAddr>().is_err(), "{bad}");
        }
    }
}
