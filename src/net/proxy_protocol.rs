//! The PROXY protocol (HAProxy's proxy-protocol.txt): a header a load balancer sends first on
//! a connection, before TLS or IMAP, to say who the client really is. Read on listeners with
//! `proxy_protocol = true`, written to upstreams with `send_proxy`.
//!
//! Parsing and encoding are the `ppp` crate's. What is ours is the framing: reading exactly
//! the header's bytes from the socket and not one more, since what follows on the same
//! stream (a TLS ClientHello, or nothing at all until the IMAP greeting) belongs to the
//! session. The header's own structure says where it ends: a v1 header is one line of at most
//! 107 bytes, a v2 header is 16 bytes whose last two give the length of the rest.

use std::io;
use std::net::{IpAddr, SocketAddr, SocketAddrV6};

use ppp::{v1, v2};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::config::SendProxy;

/// The v2 signature (12 bytes).
const V2_SIGNATURE: &[u8] = v2::PROTOCOL_PREFIX;
/// The fixed part of a v2 header: signature, version/command, family/protocol, length.
const V2_FIXED: usize = 16;
/// The longest v1 header, CRLF included (the specification's bound).
const V1_MAX: usize = 107;
/// The shortest v1 header (`PROXY UNKNOWN\r\n`): this much can always be read at once.
const V1_MIN: usize = 15;
/// Enough to tell v1 (`PROXY`) from v2 (its signature starts `\r\n\r\n\0`) from neither.
const PREFIX: usize = 5;

/// The two ends of a client's connection: who connected, and to which address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddrs {
    /// The client's real address.
    pub source: SocketAddr,
    /// The address the client connected to.
    pub destination: SocketAddr,
}

/// What a valid header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received {
    /// A proxied client.
    Proxied(ClientAddrs),
    /// The load balancer speaking for itself (a v2 LOCAL command, as health checks send, or
    /// a v1 `UNKNOWN`): the connection's own addresses stand.
    Local,
}

#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("no header: the connection starts with neither the v1 nor the v2 signature")]
    Missing,
    #[error("invalid header: {0}")]
    Invalid(String),
    #[error("connection closed inside the header")]
    Closed,
    #[error("I/O error reading the header: {0}")]
    Io(#[source] io::Error),
}

impl HeaderError {
    fn from_read(e: io::Error) -> HeaderError {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            HeaderError::Closed
        } else {
            HeaderError::Io(e)
        }
    }
}

/// Reads one header (v1 or v2, whichever comes) from the start of `tcp`, consuming exactly
/// its bytes. The caller bounds the time it may take.
pub async fn read_header(tcp: &mut TcpStream) -> Result<Received, HeaderError> {
    let mut buf = vec![0u8; PREFIX];
    read_exact(tcp, &mut buf).await?;
    if buf == v1::PROTOCOL_PREFIX.as_bytes() {
        read_v1_line(tcp, &mut buf).await?;
        parse_v1(&buf)
    } else if buf == V2_SIGNATURE[..PREFIX] {
        extend(tcp, &mut buf, V2_FIXED - PREFIX).await?;
        if !buf.starts_with(V2_SIGNATURE) {
            return Err(HeaderError::Missing);
        }
        let rest = u16::from_be_bytes([buf[V2_FIXED - 2], buf[V2_FIXED - 1]]);
        extend(tcp, &mut buf, usize::from(rest)).await?;
        parse_v2(&buf)
    } else {
        Err(HeaderError::Missing)
    }
}

/// Reads up to the line's LF (at most [`V1_MAX`] bytes in all), never past it.
async fn read_v1_line(tcp: &mut TcpStream, buf: &mut Vec<u8>) -> Result<(), HeaderError> {
    extend(tcp, buf, V1_MIN - buf.len()).await?;
    // One byte at a time: the line's end is known only once seen, and a byte more would be
    // the session's. At most ~90 small reads, once per connection.
    while buf.last() != Some(&b'\n') {
        if buf.len() >= V1_MAX {
            return Err(HeaderError::Invalid(format!(
                "v1 header longer than {V1_MAX} bytes"
            )));
        }
        extend(tcp, buf, 1).await?;
    }
    Ok(())
}

async fn extend(tcp: &mut TcpStream, buf: &mut Vec<u8>, more: usize) -> Result<(), HeaderError> {
    let start = buf.len();
    buf.resize(start + more, 0);
    read_exact(tcp, &mut buf[start..]).await
}

async fn read_exact(tcp: &mut TcpStream, buf: &mut [u8]) -> Result<(), HeaderError> {
    tcp.read_exact(buf)
        .await
        .map(drop)
        .map_err(HeaderError::from_read)
}

/// A complete v1 line (`PROXY TCP4 203.0.113.7 192.0.2.1 4242 993\r\n`).
fn parse_v1(line: &[u8]) -> Result<Received, HeaderError> {
    let header = v1::Header::try_from(line).map_err(|e| HeaderError::Invalid(e.to_string()))?;
    Ok(match header.addresses {
        v1::Addresses::Tcp4(a) => Received::Proxied(ClientAddrs {
            source: SocketAddr::from((a.source_address, a.source_port)),
            destination: SocketAddr::from((a.destination_address, a.destination_port)),
        }),
        v1::Addresses::Tcp6(a) => Received::Proxied(ClientAddrs {
            source: SocketAddr::from((a.source_address, a.source_port)),
            destination: SocketAddr::from((a.destination_address, a.destination_port)),
        }),
        v1::Addresses::Unknown => Received::Local,
    })
}

/// A complete v2 header.
fn parse_v2(bytes: &[u8]) -> Result<Received, HeaderError> {
    let header = v2::Header::try_from(bytes).map_err(|e| HeaderError::Invalid(e.to_string()))?;
    if header.command == v2::Command::Local {
        return Ok(Received::Local);
    }
    if header.protocol == v2::Protocol::Datagram {
        return Err(HeaderError::Invalid(
            "v2 header for a datagram (UDP) connection".to_owned(),
        ));
    }
    Ok(match header.addresses {
        v2::Addresses::IPv4(a) => Received::Proxied(ClientAddrs {
            source: SocketAddr::from((a.source_address, a.source_port)),
            destination: SocketAddr::from((a.destination_address, a.destination_port)),
        }),
        v2::Addresses::IPv6(a) => Received::Proxied(ClientAddrs {
            source: SocketAddr::from((a.source_address, a.source_port)),
            destination: SocketAddr::from((a.destination_address, a.destination_port)),
        }),
        // The specification: for an unspecified or UNIX family the receiver uses the
        // connection's own addresses.
        v2::Addresses::Unspecified | v2::Addresses::Unix(_) => Received::Local,
    })
}

/// The header to send first to an upstream: the client's addresses, or, without a client
/// (a probe of imapgate's own), a v2 LOCAL command or a v1 `UNKNOWN`. `None` for
/// `send_proxy = "none"`.
pub fn encode(version: SendProxy, client: Option<ClientAddrs>) -> io::Result<Option<Vec<u8>>> {
    let client = client.map(|c| same_family(c.source, c.destination));
    Ok(match (version, client) {
        (SendProxy::None, _) => None,
        (SendProxy::V1, Some(ends)) => Some(v1::Addresses::from(ends).to_string().into_bytes()),
        (SendProxy::V1, None) => Some(v1::Addresses::Unknown.to_string().into_bytes()),
        (SendProxy::V2, Some(ends)) => Some(
            v2::Builder::with_addresses(
                v2::Version::Two | v2::Command::Proxy,
                v2::Protocol::Stream,
                ends,
            )
            .build()?,
        ),
        (SendProxy::V2, None) => Some(
            v2::Builder::with_addresses(
                v2::Version::Two | v2::Command::Local,
                v2::Protocol::Unspecified,
                v2::Addresses::Unspecified,
            )
            .build()?,
        ),
    })
}

/// Both addresses in one family, as a header needs them: IPv4 when both can be (an
/// IPv4-mapped IPv6 address is its IPv4 address), else IPv6 with IPv4 addresses mapped.
fn same_family(source: SocketAddr, destination: SocketAddr) -> (SocketAddr, SocketAddr) {
    let v4 = |a: SocketAddr| match a.ip().to_canonical() {
        IpAddr::V4(ip) => Some(SocketAddr::from((ip, a.port()))),
        IpAddr::V6(_) => None,
    };
    let v6 = |a: SocketAddr| match a {
        SocketAddr::V4(a) => {
            SocketAddr::V6(SocketAddrV6::new(a.ip().to_ipv6_mapped(), a.port(), 0, 0))
        }
        v6 => v6,
    };
    match (v4(source), v4(destination)) {
        (Some(s), Some(d)) => (s, d),
        _ => (v6(source), v6(destination)),
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    use super::*;

    /// A connected pair: what the test writes on the first arrives on the second.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let writer = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (reader, _) = listener.accept().await.unwrap();
        (writer, reader)
    }

    /// Sends `bytes`, reads a header, then returns what follows it (the writer is closed).
    async fn read(bytes: &[u8]) -> (Result<Received, HeaderError>, Vec<u8>) {
        let (mut w, mut r) = pair().await;
        w.write_all(bytes).await.unwrap();
        w.shutdown().await.unwrap();
        let got = read_header(&mut r).await;
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).await.unwrap();
        (got, rest)
    }

    fn proxied(source: &str, destination: &str) -> Received {
        Received::Proxied(ClientAddrs {
            source: source.parse().unwrap(),
            destination: destination.parse().unwrap(),
        })
    }

    /// A v2 PROXY/TCP over IPv4 header as the specification lays it out, with `tlv` after
    /// the addresses.
    fn v2_tcp4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, tlv: &[u8]) -> Vec<u8> {
        let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        h.extend([0x21, 0x11]);
        h.extend(u16::try_from(12 + tlv.len()).unwrap().to_be_bytes());
        h.extend(src);
        h.extend(dst);
        h.extend(sport.to_be_bytes());
        h.extend(dport.to_be_bytes());
        h.extend(tlv);
        h
    }

    #[tokio::test]
    async fn v1_tcp4_and_what_follows_is_left_alone() {
        let (got, rest) = read(b"PROXY TCP4 203.0.113.7 192.0.2.1 4242 993\r\n\x16\x03\x01").await;
        assert_eq!(got.unwrap(), proxied("203.0.113.7:4242", "192.0.2.1:993"));
        assert_eq!(rest, b"\x16\x03\x01");
    }

    #[tokio::test]
    async fn v1_tcp6_and_unknown() {
        let (got, rest) = read(b"PROXY TCP6 2001:db8::7 2001:db8::1 4242 143\r\na NOOP\r\n").await;
        assert_eq!(
            got.unwrap(),
            proxied("[2001:db8::7]:4242", "[2001:db8::1]:143")
        );
        assert_eq!(rest, b"a NOOP\r\n");
        let (got, rest) = read(b"PROXY UNKNOWN\r\n").await;
        assert_eq!(got.unwrap(), Received::Local);
        assert!(rest.is_empty());
        let (got, _) = read(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n").await;
        assert_eq!(got.unwrap(), Received::Local);
    }

    #[tokio::test]
    async fn v2_with_tlvs_and_what_follows_is_left_alone() {
        // A PP2_TYPE_UNIQUE_ID TLV, as HAProxy's `unique-id` sends.
        let mut bytes = v2_tcp4(
            [203, 0, 113, 7],
            [192, 0, 2, 1],
            4242,
            993,
            b"\x05\x00\x03abc",
        );
        bytes.extend(b"\x16\x03\x01");
        let (got, rest) = read(&bytes).await;
        assert_eq!(got.unwrap(), proxied("203.0.113.7:4242", "192.0.2.1:993"));
        assert_eq!(rest, b"\x16\x03\x01");
    }

    #[tokio::test]
    async fn v2_local_keeps_the_connection_addresses() {
        let mut bytes = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        bytes.extend([0x20, 0x00, 0x00, 0x00]);
        let (got, rest) = read(&bytes).await;
        assert_eq!(got.unwrap(), Received::Local);
        assert!(rest.is_empty());
    }

    #[tokio::test]
    async fn a_lone_header_is_read_without_waiting_for_more() {
        // The IMAP server speaks first: after its header the load balancer sends nothing
        // until the greeting, so reading one byte too many would hang the session.
        for header in [
            b"PROXY UNKNOWN\r\n".to_vec(),
            b"PROXY TCP4 203.0.113.7 192.0.2.1 4242 993\r\n".to_vec(),
            v2_tcp4([203, 0, 113, 7], [192, 0, 2, 1], 4242, 993, b""),
        ] {
            let (mut w, mut r) = pair().await;
            w.write_all(&header).await.unwrap();
            let got = tokio::time::timeout(std::time::Duration::from_secs(10), read_header(&mut r))
                .await
                .expect("the header is read without more bytes");
            assert!(got.is_ok(), "{got:?}");
        }
    }

    #[tokio::test]
    async fn no_header_is_missing() {
        for start in [
            &b"a CAPABILITY\r\n"[..],
            b"\x16\x03\x01\x02\x00\x01",
            b"\r\n\r\n\0\r\nXXXX\n1234",
        ] {
            let (got, _) = read(start).await;
            assert!(
                matches!(got, Err(HeaderError::Missing)),
                "{start:?}: {got:?}"
            );
        }
    }

    #[tokio::test]
    async fn malformed_headers_are_invalid() {
        let mut bad_version = v2_tcp4([203, 0, 113, 7], [192, 0, 2, 1], 1, 2, b"");
        bad_version[12] = 0x11;
        let mut short_addresses = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        short_addresses.extend([0x21, 0x11, 0x00, 0x04, 1, 2, 3, 4]);
        let mut udp = v2_tcp4([203, 0, 113, 7], [192, 0, 2, 1], 1, 2, b"");
        udp[13] = 0x12;
        for bytes in [
            b"PROXY garbage garbage\r\n".to_vec(),
            b"PROXY TCP4 203.0.113.7 192.0.2.1 4242\r\n".to_vec(),
            b"PROXY TCP4 203.0.113.999 192.0.2.1 4242 993\r\n".to_vec(),
            b"PROXY TCP4 203.0.113.7 192.0.2.1 4242 993\n".to_vec(),
            [&b"PROXY TCP4 "[..], &[b'1'; 120]].concat(),
            bad_version,
            short_addresses,
            udp,
        ] {
            let (got, _) = read(&bytes).await;
            assert!(
                matches!(got, Err(HeaderError::Invalid(_))),
                "{:?}: {got:?}",
                String::from_utf8_lossy(&bytes)
            );
        }
    }

    #[tokio::test]
    async fn a_connection_closed_inside_the_header() {
        for bytes in [
            &b"PROXY TCP4 203.0.113.7"[..],
            b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c\x01",
        ] {
            let (got, _) = read(bytes).await;
            assert!(matches!(got, Err(HeaderError::Closed)), "{got:?}");
        }
    }

    #[test]
    fn encoded_headers_read_back() {
        let client = ClientAddrs {
            source: "203.0.113.7:4242".parse().unwrap(),
            destination: "192.0.2.1:993".parse().unwrap(),
        };
        let v1 = encode(SendProxy::V1, Some(client)).unwrap().unwrap();
        assert_eq!(v1, b"PROXY TCP4 203.0.113.7 192.0.2.1 4242 993\r\n");
        assert_eq!(parse_v1(&v1).unwrap(), Received::Proxied(client));
        let v2 = encode(SendProxy::V2, Some(client)).unwrap().unwrap();
        assert_eq!(
            v2,
            v2_tcp4([203, 0, 113, 7], [192, 0, 2, 1], 4242, 993, b"")
        );
        assert_eq!(parse_v2(&v2).unwrap(), Received::Proxied(client));
        assert_eq!(encode(SendProxy::None, Some(client)).unwrap(), None);
    }

    #[test]
    fn without_a_client_the_header_says_local() {
        let v1 = encode(SendProxy::V1, None).unwrap().unwrap();
        assert_eq!(v1, b"PROXY UNKNOWN\r\n");
        let v2 = encode(SendProxy::V2, None).unwrap().unwrap();
        assert_eq!(parse_v2(&v2).unwrap(), Received::Local);
        assert_eq!(v2[12], 0x20);
    }

    #[test]
    fn mixed_families_are_sent_in_one() {
        let ends = |s: &str, d: &str| ClientAddrs {
            source: s.parse().unwrap(),
            destination: d.parse().unwrap(),
        };
        let v1 = |c| String::from_utf8(encode(SendProxy::V1, Some(c)).unwrap().unwrap()).unwrap();
        assert_eq!(
            v1(ends("203.0.113.7:4242", "[::ffff:192.0.2.1]:993")),
            "PROXY TCP4 203.0.113.7 192.0.2.1 4242 993\r\n"
        );
        assert_eq!(
            v1(ends("203.0.113.7:4242", "[2001:db8::1]:993")),
            "PROXY TCP6 ::ffff:203.0.113.7 2001:db8::1 4242 993\r\n"
        );
    }
}
