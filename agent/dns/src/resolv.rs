//! The host's resolver, from `/etc/resolv.conf`.
use std::net::{IpAddr, SocketAddr};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResolvError {
    #[error("{path}: no nameserver line with an IP address")]
    NoNameserver { path: String },
}

/// The first `nameserver` of a resolv.conf text, on port 53, as glibc picks it: comments
/// (`#`, `;`) and other keywords are skipped, and so is a nameserver that is not an IP
/// address. An IPv6 zone (`fe80::1%eth0`) is not supported by `SocketAddr` and is skipped
/// too. `path` only names the file in the error.
pub fn first_nameserver(text: &str, path: &str) -> Result<SocketAddr, ResolvError> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next()? == "nameserver").then(|| words.next())?
        })
        .find_map(|addr| addr.parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .ok_or_else(|| ResolvError::NoNameserver { path: path.into() })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_first_address_nameserver_wins() {
        let text = "# generated\n; old\nsearch example.com\noptions ndots:2\n  nameserver   10.0.0.2  # primary\nnameserver 10.0.0.3\n";
        assert_eq!(first_nameserver(text, "r").unwrap(), "10.0.0.2:53".parse().unwrap());
    }

    #[test]
    fn ipv6_and_bad_entries() {
        assert_eq!(first_nameserver("nameserver 2001:db8::53\n", "r").unwrap(), "[2001:db8::53]:53".parse().unwrap());
        let skipped =
            "nameserver\nnameserver dns.example\nnameserver fe80::1%eth0\n#nameserver 1.1.1.1\nnameserver 9.9.9.9\n";
        assert_eq!(first_nameserver(skipped, "r").unwrap(), "9.9.9.9:53".parse().unwrap());
        assert_eq!(
            first_nameserver("search x\n", "/etc/resolv.conf").unwrap_err().to_string(),
            "/etc/resolv.conf: no nameserver line with an IP address"
        );
        assert!(first_nameserver("", "r").is_err());
        assert!(first_nameserver("nameservers 1.1.1.1\n", "r").is_err());
    }
}
