//! IP networks in the config (`proxy_from = ["10.0.0.0/8", "2001:db8::/32", "127.0.0.1"]`).
//!
//! Host bits are refused (`10.1.2.3/8`): in a list of trusted sources, a typo that silently
//! widens or narrows trust is worse than an error. A bare address is a one-address network.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;
use serde::Deserialize;

/// One network: an address and a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network(IpNet);

impl Network {
    /// Whether `ip` is inside. An IPv4 address written as IPv6 (`::ffff:10.1.2.3`, what a
    /// dual-stack socket reports) counts as the IPv4 address it is.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.contains(&ip.to_canonical())
    }
}

impl fmt::Display for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Why a string is not a [`Network`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetworkError {
    #[error("{0:?} is not a network: write address/prefix, such as 10.0.0.0/8 or 2001:db8::/32")]
    Syntax(String),
    #[error("{given:?} has host bits set: the network is {network}")]
    HostBits { given: String, network: String },
}

impl FromStr for Network {
    type Err = NetworkError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let text = s.trim();
        if let Ok(ip) = text.parse::<IpAddr>() {
            return Ok(Network(IpNet::from(ip)));
        }
        let net: IpNet = text
            .parse()
            .map_err(|_| NetworkError::Syntax(s.to_owned()))?;
        if net.trunc() != net {
            return Err(NetworkError::HostBits {
                given: s.to_owned(),
                network: net.trunc().to_string(),
            });
        }
        Ok(Network(net))
    }
}

impl<'de> Deserialize<'de> for Network {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Network {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn networks_and_single_addresses() {
        assert!(net("10.0.0.0/8").contains(ip("10.200.1.2")));
        assert!(!net("10.0.0.0/8").contains(ip("11.0.0.1")));
        assert!(net("127.0.0.1").contains(ip("127.0.0.1")));
        assert!(!net("127.0.0.1").contains(ip("127.0.0.2")));
        assert!(net("2001:db8::/32").contains(ip("2001:db8:1::7")));
        assert!(!net("2001:db8::/32").contains(ip("10.0.0.1")));
        assert_eq!(net(" 192.0.2.0/24 ").to_string(), "192.0.2.0/24");
    }

    #[test]
    fn ipv4_mapped_peers_match_ipv4_networks() {
        assert!(net("10.0.0.0/8").contains(ip("::ffff:10.1.2.3")));
        assert!(!net("10.0.0.0/8").contains(ip("::ffff:11.1.2.3")));
    }

    #[test]
    fn bad_networks_are_refused_with_a_reason() {
        for bad in [
            "",
            "10.0.0.0/33",
            "10.0.0/8",
            "example.org",
            "10.0.0.0/",
            "::1/129",
        ] {
            assert!(
                matches!(bad.parse::<Network>(), Err(NetworkError::Syntax(_))),
                "{bad:?}"
            );
        }
        assert_eq!(
            "10.1.2.3/8".parse::<Network>().unwrap_err().to_string(),
            "\"10.1.2.3/8\" has host bits set: the network is 10.0.0.0/8"
        );
    }
}
