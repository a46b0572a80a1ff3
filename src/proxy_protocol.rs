//! PROXY protocol v1 and v2 (HAProxy), so limits and logs see the real client address behind a
//! load balancer. Accepted only from trusted networks: anyone else could claim any address.
//! The header is read exactly, never a byte beyond it, because a TLS client's first bytes may
//! follow in the same packet.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

/// The 12-byte signature that starts a v2 header.
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// RFC-sized bound on a v1 line, CRLF included.
const V1_MAX: usize = 107;
/// popbridge reads no TLVs it needs; a larger v2 header is refused rather than buffered.
const V2_MAX_PAYLOAD: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no PROXY protocol header within {0:?}")]
    Timeout(Duration),
    #[error("connection does not start with a PROXY protocol header")]
    NotProxy,
    #[error("malformed PROXY protocol header: {0}")]
    Malformed(String),
    #[error("I/O while reading PROXY header: {0}")]
    Io(#[from] std::io::Error),
}

/// Read one PROXY header from `io`. `Some(address)` is the client the proxy speaks for;
/// `None` means the proxy speaks for itself (v1 `UNKNOWN`, v2 `LOCAL`, e.g. a health check).
pub async fn read_header<IO: AsyncRead + Unpin>(
    io: &mut IO,
    timeout: Duration,
) -> Result<Option<SocketAddr>, ProxyError> {
    tokio::time::timeout(timeout, read(io))
        .await
        .map_err(|_| ProxyError::Timeout(timeout))?
}

async fn read<IO: AsyncRead + Unpin>(io: &mut IO) -> Result<Option<SocketAddr>, ProxyError> {
    let mut head = [0u8; 5];
    io.read_exact(&mut head).await?;
    if &head == b"PROXY" {
        let mut line = head.to_vec();
        while !line.ends_with(b"\r\n") {
            if line.len() >= V1_MAX {
                return Err(ProxyError::Malformed("v1 line too long".into()));
            }
            line.push(io.read_u8().await?);
        }
        return parse_v1(&line);
    }
    if head[..] == V2_SIGNATURE[..5] {
        let mut header = vec![0u8; 16];
        header[..5].copy_from_slice(&head);
        io.read_exact(&mut header[5..]).await?;
        if header[..12] != V2_SIGNATURE {
            return Err(ProxyError::NotProxy);
        }
        let len = usize::from(u16::from_be_bytes([header[14], header[15]]));
        if len > V2_MAX_PAYLOAD {
            return Err(ProxyError::Malformed(format!("v2 payload of {len} bytes")));
        }
        header.resize(16 + len, 0);
        io.read_exact(&mut header[16..]).await?;
        return parse_v2(&header);
    }
    Err(ProxyError::NotProxy)
}

fn parse_v1(line: &[u8]) -> Result<Option<SocketAddr>, ProxyError> {
    use ppp::v1::{Addresses, Header};
    let header = Header::try_from(line).map_err(|e| ProxyError::Malformed(e.to_string()))?;
    Ok(match header.addresses {
        Addresses::Unknown => None,
        Addresses::Tcp4(a) => Some(SocketAddr::new(IpAddr::V4(a.source_address), a.source_port)),
        Addresses::Tcp6(a) => Some(SocketAddr::new(IpAddr::V6(a.source_address), a.source_port)),
    })
}

fn parse_v2(bytes: &[u8]) -> Result<Option<SocketAddr>, ProxyError> {
    use ppp::v2::{Addresses, Command, Header};
    let header = Header::try_from(bytes).map_err(|e| ProxyError::Malformed(e.to_string()))?;
    if header.command == Command::Local {
        return Ok(None);
    }
    Ok(match header.addresses {
        Addresses::IPv4(a) => Some(SocketAddr::new(IpAddr::V4(a.source_address), a.source_port)),
        Addresses::IPv6(a) => Some(SocketAddr::new(IpAddr::V6(a.source_address), a.source_port)),
        Addresses::Unspecified | Addresses::Unix(_) => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn parse(bytes: &[u8]) -> (Result<Option<SocketAddr>, ProxyError>, Vec<u8>) {
        let mut cursor = std::io::Cursor::new(bytes.to_vec());
        let r = read_header(&mut cursor, Duration::from_secs(1)).await;
        let pos = cursor.position() as usize;
        (r, bytes[pos..].to_vec())
    }

    #[tokio::test]
    async fn v1_tcp4_tcp6_unknown_and_nothing_read_beyond() {
        let (r, rest) = parse(b"PROXY TCP4 203.0.113.7 192.0.2.1 5555 110\r\nCAPA\r\n").await;
        assert_eq!(r.unwrap(), Some("203.0.113.7:5555".parse().unwrap()));
        assert_eq!(rest, b"CAPA\r\n");
        let (r, _) = parse(b"PROXY TCP6 2001:db8::1 2001:db8::2 4000 995\r\n").await;
        assert_eq!(r.unwrap(), Some("[2001:db8::1]:4000".parse().unwrap()));
        let (r, rest) = parse(b"PROXY UNKNOWN\r\n\x16\x03\x01").await;
        assert_eq!(r.unwrap(), None);
        assert_eq!(rest, b"\x16\x03\x01");
    }

    #[tokio::test]
    async fn v2_proxy_and_local() {
        let addrs: ppp::v2::Addresses = (
            "198.51.100.9:6000".parse::<SocketAddr>().unwrap(),
            "192.0.2.1:110".parse::<SocketAddr>().unwrap(),
        )
            .into();
        let header = ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Proxy,
            ppp::v2::Protocol::Stream,
            addrs,
        )
        .build()
        .unwrap();
        let mut bytes = header.clone();
        bytes.extend_from_slice(b"USER x\r\n");
        let (r, rest) = parse(&bytes).await;
        assert_eq!(r.unwrap(), Some("198.51.100.9:6000".parse().unwrap()));
        assert_eq!(rest, b"USER x\r\n");

        let local = ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Local,
            ppp::v2::Protocol::Unspecified,
            ppp::v2::Addresses::Unspecified,
        )
        .build()
        .unwrap();
        assert_eq!(parse(&local).await.0.unwrap(), None);
    }

    #[tokio::test]
    async fn garbage_and_oversize_are_refused() {
        assert!(matches!(
            parse(b"USER bob\r\n").await.0,
            Err(ProxyError::NotProxy)
        ));
        let long = format!("PROXY TCP4 {}\r\n", "1".repeat(200));
        assert!(matches!(
            parse(long.as_bytes()).await.0,
            Err(ProxyError::Malformed(_))
        ));
        assert!(matches!(
            parse(b"PROXY TCP4 nonsense\r\n").await.0,
            Err(ProxyError::Malformed(_))
        ));
        let mut big = V2_SIGNATURE.to_vec();
        big.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert!(matches!(parse(&big).await.0, Err(ProxyError::Malformed(_))));
        assert!(matches!(parse(b"PRO").await.0, Err(ProxyError::Io(_))));
    }
}
