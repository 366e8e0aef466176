//! PROXY protocol v2 (`listener.proxy_protocol = true`): a TCP load balancer in front of the
//! lobby prefixes each connection with a binary header naming the device's real address.
//! The header is read exactly (never a byte of the TLS that follows) before the handshake.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::io::{AsyncRead, AsyncReadExt};

/// The fixed 12-byte signature that starts every v2 header.
pub const SIGNATURE: [u8; 12] = [
    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
];

/// Longest header accepted (addresses plus TLVs); real ones are a few dozen bytes.
const MAX_LEN: usize = 512;

/// Why a connection's PROXY header was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error("connection closed before the PROXY header")]
    Closed,
    #[error("not a PROXY protocol v2 header")]
    Signature,
    #[error("unsupported PROXY version or command")]
    Version,
    #[error("PROXY header too long or too short for its address family")]
    Length,
}

/// Reads one v2 header. Returns the client's address for a PROXY command over TCP, `None`
/// for LOCAL (the balancer's own health check) or an address family the lobby does not use.
pub async fn read_v2<R: AsyncRead + Unpin>(io: &mut R) -> Result<Option<SocketAddr>, ProxyError> {
    let mut head = [0u8; 16];
    io.read_exact(&mut head)
        .await
        .map_err(|_| ProxyError::Closed)?;
    if head[..12] != SIGNATURE {
        return Err(ProxyError::Signature);
    }
    let (version, command) = (head[12] >> 4, head[12] & 0x0F);
    if version != 2 || command > 1 {
        return Err(ProxyError::Version);
    }
    let len = usize::from(u16::from_be_bytes([head[14], head[15]]));
    if len > MAX_LEN {
        return Err(ProxyError::Length);
    }
    let mut body = vec![0u8; len];
    io.read_exact(&mut body)
        .await
        .map_err(|_| ProxyError::Closed)?;
    if command == 0 {
        return Ok(None); // LOCAL
    }
    parse_addresses(head[13], &body)
}

/// The source address of a PROXY command's body, by family/protocol byte.
fn parse_addresses(family: u8, body: &[u8]) -> Result<Option<SocketAddr>, ProxyError> {
    match family {
        // TCP over IPv4: src(4) dst(4) sport(2) dport(2), then TLVs.
        0x11 => {
            let b = body.get(..12).ok_or(ProxyError::Length)?;
            let ip = Ipv4Addr::new(b[0], b[1], b[2], b[3]);
            let port = u16::from_be_bytes([b[8], b[9]]);
            Ok(Some(SocketAddr::new(IpAddr::V4(ip), port)))
        }
        // TCP over IPv6: src(16) dst(16) sport(2) dport(2), then TLVs.
        0x21 => {
            let b = body.get(..36).ok_or(ProxyError::Length)?;
            let mut src = [0u8; 16];
            src.copy_from_slice(&b[..16]);
            let port = u16::from_be_bytes([b[32], b[33]]);
            Ok(Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(src)), port)))
        }
        _ => Ok(None), // UNSPEC, UDP, UNIX: no address worth keeping
    }
}

/// Builds a v2 PROXY header (tests, and anyone fronting the lobby from code).
pub fn header_v2(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let mut out = SIGNATURE.to_vec();
    out.push(0x21); // version 2, PROXY
    match (src, dst) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            out.push(0x11);
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&s.ip().octets());
            out.extend_from_slice(&d.ip().octets());
            out.extend_from_slice(&s.port().to_be_bytes());
            out.extend_from_slice(&d.port().to_be_bytes());
        }
        (s, d) => {
            let v6 = |a: SocketAddr| match a.ip() {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            out.push(0x21);
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&v6(s).octets());
            out.extend_from_slice(&v6(d).octets());
            out.extend_from_slice(&s.port().to_be_bytes());
            out.extend_from_slice(&d.port().to_be_bytes());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn parse(bytes: &[u8]) -> Result<Option<SocketAddr>, ProxyError> {
        let mut r = bytes;
        read_v2(&mut r).await
    }

    #[tokio::test]
    async fn ipv4_and_ipv6_round_trip_and_leave_the_rest() {
        let src: SocketAddr = "203.0.113.7:40000".parse().unwrap();
        let dst: SocketAddr = "10.0.0.1:8883".parse().unwrap();
        let mut bytes = header_v2(src, dst);
        bytes.extend_from_slice(b"\x16\x03\x01TLS follows");
        let mut r = bytes.as_slice();
        assert_eq!(read_v2(&mut r).await, Ok(Some(src)));
        assert_eq!(r, b"\x16\x03\x01TLS follows", "read past the header");
        let src6: SocketAddr = "[2001:db8::7]:40000".parse().unwrap();
        let dst6: SocketAddr = "[2001:db8::1]:8883".parse().unwrap();
        assert_eq!(parse(&header_v2(src6, dst6)).await, Ok(Some(src6)));
    }

    #[tokio::test]
    async fn local_and_hostile_headers() {
        let mut local = SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
        assert_eq!(parse(&local).await, Ok(None));
        assert_eq!(
            parse(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 a ClientHello").await,
            Err(ProxyError::Signature)
        );
        assert_eq!(parse(&SIGNATURE[..6]).await, Err(ProxyError::Closed));
        let mut v1 = SIGNATURE.to_vec();
        v1.extend_from_slice(&[0x11, 0x11, 0x00, 0x0C]);
        assert_eq!(parse(&v1).await, Err(ProxyError::Version));
        let mut long = SIGNATURE.to_vec();
        long.extend_from_slice(&[0x21, 0x11, 0xFF, 0xFF]);
        assert_eq!(parse(&long).await, Err(ProxyError::Length));
        let mut short = SIGNATURE.to_vec();
        short.extend_from_slice(&[0x21, 0x11, 0x00, 0x04, 1, 2, 3, 4]);
        assert_eq!(parse(&short).await, Err(ProxyError::Length));
    }
}
