//! Sockets and the process around them: source-address spreading (one loopback address has
//! ~28k ephemeral ports), TCP connect, the open-files limit and the server's RSS.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use anyhow::{bail, Context, Result};
use rustix::process::{getrlimit, setrlimit, Resource};
use tokio::net::{TcpSocket, TcpStream};

/// Devices per source address before the harness spreads over more loopback addresses.
pub const PER_SOURCE_IP: usize = 25_000;

/// Parses `127.0.0.1-127.0.0.8` (an IPv4 range) or `a,b,c` (a list).
pub fn parse_source_ips(text: &str) -> Result<Vec<IpAddr>> {
    if let Some((from, to)) = text.split_once('-') {
        let from: Ipv4Addr = from.trim().parse().context("--source-ips range start")?;
        let to: Ipv4Addr = to.trim().parse().context("--source-ips range end")?;
        let (from, to) = (u32::from(from), u32::from(to));
        if to < from || to - from > 1024 {
            bail!("--source-ips range must be ascending and at most 1025 addresses");
        }
        return Ok((from..=to).map(|ip| IpAddr::V4(ip.into())).collect());
    }
    text.split(',')
        .map(|ip| {
            ip.trim()
                .parse()
                .with_context(|| format!("--source-ips: bad address {ip}"))
        })
        .collect()
}

/// The default: no explicit binding, unless the server is on loopback and one address would not
/// have enough ports, then 127.0.0.1..=127.0.0.N.
pub fn default_source_ips(server: SocketAddr, devices: usize) -> Vec<IpAddr> {
    if !server.ip().is_loopback() || !server.is_ipv4() || devices <= PER_SOURCE_IP {
        return Vec::new();
    }
    let count = devices.div_ceil(PER_SOURCE_IP).min(254) as u8;
    (1..=count)
        .map(|last| IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)))
        .collect()
}

/// Connects to `server`, bound to `source` (port 0) first when given.
pub async fn tcp_connect(server: SocketAddr, source: Option<IpAddr>) -> io::Result<TcpStream> {
    let socket = if server.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = source {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    let stream = socket.connect(server).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Resolves `host:port`, preferring IPv4.
pub async fn resolve(host: &str, port: u16) -> Result<SocketAddr> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .with_context(|| format!("resolving {host}"))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .with_context(|| format!("{host} has no address"))
}

/// Raises the soft open-files limit to the hard limit; returns the new soft limit.
pub fn raise_nofile_limit() -> Result<u64> {
    let mut limit = getrlimit(Resource::Nofile);
    limit.current = limit.maximum;
    setrlimit(Resource::Nofile, limit).context("raising RLIMIT_NOFILE")?;
    Ok(getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX))
}

/// CPU time (utime + stime) process `pid` has used, in microseconds. `/proc` counts in
/// USER_HZ ticks, 100 per second on Linux: a 10 ms resolution.
pub fn cpu_micros(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start at field 3 (state).
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("parsing /proc/PID/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .context("parsing utime/stime in /proc/PID/stat")
    };
    // utime and stime are fields 14 and 15, i.e. 11 and 12 after the state field (3).
    Ok((tick(11)? + tick(12)?) * 10_000)
}

/// The resident set size of process `pid` in bytes, from `/proc/PID/status` (VmRSS).
pub fn rss_bytes(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .with_context(|| format!("no VmRSS in /proc/{pid}/status"))?;
    let kib: u64 = line
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .context("parsing VmRSS")?;
    Ok(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_ip_forms() {
        let range = parse_source_ips("127.0.0.1-127.0.0.3").unwrap();
        assert_eq!(range.len(), 3);
        assert_eq!(range[2], "127.0.0.3".parse::<IpAddr>().unwrap());
        assert_eq!(parse_source_ips("127.0.0.5, 127.0.0.9").unwrap().len(), 2);
        assert!(parse_source_ips("127.0.0.9-127.0.0.1").is_err());
    }

    #[test]
    fn spreads_only_past_one_address() {
        let lo: SocketAddr = "127.0.0.1:8883".parse().unwrap();
        assert!(default_source_ips(lo, 20_000).is_empty());
        assert_eq!(default_source_ips(lo, 60_000).len(), 3);
        let remote: SocketAddr = "10.0.0.1:8883".parse().unwrap();
        assert!(default_source_ips(remote, 60_000).is_empty());
    }
}
