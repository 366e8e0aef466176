//! Kernel memory of held connections (SPEC §12 `server_kernel_sock_bytes_per_conn`), kept apart
//! from the server's RSS: socket buffers and the slab objects every TCP socket costs.
//!
//! Two readings, both printed on stderr:
//! - **both ends, by delta**: `/proc/net/sockstat` TCP `mem` (pages charged to TCP socket
//!   buffers) and `/proc/slabinfo` (the socket caches below) before connecting and while
//!   holding. Harness and server share this kernel, so the delta covers two sockets per
//!   connection; halved, it is the symmetric estimate. `filp` and `dentry` are global caches that
//!   any process (a build next door) moves, so their deltas are noisy.
//! - **server side, isolated** (the reported figure): `ss -tm` lists the established sockets
//!   whose local address is the server's listener, i.e. exactly the server's ends, with each
//!   one's buffer memory (`skmem`: r = receive queue, w = write queue, f = forward-allocated,
//!   o = option memory). To that average the figure adds the slab objects each such socket
//!   holds, one each by construction: the TCP socket (`TCP`/`TCPv6`), its inode + `struct
//!   socket` (`sock_inode_cache`), its `struct file` (`filp`) and its `dentry`, each at its
//!   slab's size per object including the slab's packing (`pages × page size ÷ objects per
//!   slab`). The delta above checks the "one each" (about 2 per connection).
//!
//! Not counted (not attributable per socket from these files): the epoll registration
//! (`epitem`, merged into a kmalloc cache on this kernel), LSM blobs, skbs in flight.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Command;

use anyhow::{Context, Result};

/// Slab caches of TCP sockets; the first four are per held socket (see the module doc).
const SOCKET_SLABS: [&str; 8] = [
    "TCP",
    "TCPv6",
    "sock_inode_cache",
    "filp",
    "dentry",
    "request_sock_TCP",
    "request_sock_TCPv6",
    "tw_sock_TCP",
];

/// One slab cache's line of `/proc/slabinfo`.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Slab {
    active: u64,
    /// Bytes per object including the slab's packing loss.
    bytes_per_obj: f64,
}

/// A reading of `/proc/net/sockstat`, `/proc/slabinfo` and the server's sockets.
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// TCP `mem`, in pages.
    tcp_mem_pages: u64,
    slabs: BTreeMap<String, Slab>,
    /// The server's established sockets (`ss`), or why they could not be listed.
    server: Result<SkMem, String>,
}

/// Reads the snapshot, with the sockets whose local address is one of `servers`;
/// `/proc/slabinfo` needs root (without it, only the buffers are counted).
pub fn snapshot(servers: &[SocketAddr]) -> Result<Snapshot> {
    let sockstat = std::fs::read_to_string("/proc/net/sockstat").context("reading sockstat")?;
    let tcp_mem_pages = parse_sockstat_mem(&sockstat).context("no TCP mem in sockstat")?;
    let slabs = match std::fs::read_to_string("/proc/slabinfo") {
        Ok(text) => parse_slabinfo(&text, page_size()),
        Err(e) => {
            eprintln!("kernel memory: /proc/slabinfo unreadable ({e}): socket buffers only");
            BTreeMap::new()
        }
    };
    Ok(Snapshot {
        tcp_mem_pages,
        slabs,
        server: server_skmem(servers).map_err(|e| format!("{e:#}")),
    })
}

fn page_size() -> u64 {
    rustix::param::page_size() as u64
}

fn parse_sockstat_mem(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("TCP:"))?;
    let mut words = line.split_whitespace();
    words.find(|w| *w == "mem")?;
    words.next()?.parse().ok()
}

/// `name active_objs num_objs objsize objperslab pagesperslab : …` for the socket caches.
fn parse_slabinfo(text: &str, page: u64) -> BTreeMap<String, Slab> {
    let mut slabs = BTreeMap::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let Some(name) = f.first().filter(|n| SOCKET_SLABS.contains(n)) else {
            continue;
        };
        let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
        if let (Some(active), Some(per_slab), Some(pages)) = (num(1), num(4), num(5)) {
            let bytes_per_obj = (pages * page) as f64 / per_slab.max(1) as f64;
            slabs.insert(
                (*name).to_owned(),
                Slab {
                    active,
                    bytes_per_obj,
                },
            );
        }
    }
    slabs
}

/// Buffer memory of the server's established sockets, from `ss -tm`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct SkMem {
    sockets: u64,
    rmem: u64,
    wmem_queued: u64,
    fwd_alloc: u64,
    optmem: u64,
}

impl SkMem {
    fn bytes(&self) -> u64 {
        self.rmem + self.wmem_queued + self.fwd_alloc + self.optmem
    }
}

/// `ss -tmnHO state established` for sockets whose local address is one of `servers`.
fn server_skmem(servers: &[SocketAddr]) -> Result<SkMem> {
    let filter: Vec<String> = servers
        .iter()
        .map(|a| match a {
            SocketAddr::V4(v4) => format!("src {v4}"),
            SocketAddr::V6(v6) => format!("src [{}]:{}", v6.ip(), v6.port()),
        })
        .collect();
    let expr = format!("( {} )", filter.join(" or "));
    let out = Command::new("ss")
        .args(["-tmnHO", "state", "established", &expr])
        .output()
        .context("running ss")?;
    if !out.status.success() {
        anyhow::bail!("ss: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(parse_skmem(&String::from_utf8_lossy(&out.stdout)))
}

/// Sums every `skmem:(r…,rb…,t…,tb…,f…,w…,o…,bl…,d…)` in `ss` output.
fn parse_skmem(text: &str) -> SkMem {
    let mut sum = SkMem::default();
    for part in text.split("skmem:(").skip(1) {
        let body = part.split(')').next().unwrap_or("");
        sum.sockets += 1;
        for field in body.split(',') {
            // Longest prefixes first: `rb` and `tb` are buffer limits, not memory in use.
            let value = |p: &str| field.strip_prefix(p).and_then(|v| v.parse::<u64>().ok());
            if field.starts_with("rb") || field.starts_with("tb") || field.starts_with("bl") {
                continue;
            }
            if let Some(v) = value("r") {
                sum.rmem += v;
            } else if let Some(v) = value("w") {
                sum.wmem_queued += v;
            } else if let Some(v) = value("f") {
                sum.fwd_alloc += v;
            } else if let Some(v) = value("o") {
                sum.optmem += v;
            }
        }
    }
    sum
}

/// Prints both readings for `held` connections (`before` taken before the first connect,
/// `now` while holding) and returns the server-side bytes per connection: the isolated figure,
/// or half the delta when `ss` is missing or finds no server socket (a server on another host:
/// then not meaningful).
pub fn per_conn(
    before: &Snapshot,
    now: &Snapshot,
    servers: &[SocketAddr],
    held: u64,
) -> Option<u64> {
    if held == 0 {
        return None;
    }
    let both = print_delta(before, now, held);
    match &now.server {
        Ok(sk) if sk.sockets > 0 => Some(print_isolated(now, servers, sk)),
        Ok(_) => {
            eprintln!("kernel server side: ss found no socket on the server address: delta ÷ 2");
            Some(both / held / 2)
        }
        Err(e) => {
            eprintln!("kernel server side: {e:#}: delta ÷ 2");
            Some(both / held / 2)
        }
    }
}

/// The delta (both ends); returns its total in bytes.
fn print_delta(before: &Snapshot, now: &Snapshot, held: u64) -> u64 {
    let page = page_size();
    let pages = now.tcp_mem_pages.saturating_sub(before.tcp_mem_pages);
    let mut total = pages * page;
    let mut parts = vec![format!(
        "sockstat TCP mem +{pages} pages ({} B)",
        pages * page
    )];
    for (name, slab) in &now.slabs {
        let was = before.slabs.get(name).map_or(0, |s| s.active);
        let objs = slab.active as i64 - was as i64;
        let bytes = (objs as f64 * slab.bytes_per_obj).round() as i64;
        if objs != 0 {
            parts.push(format!(
                "{name} {objs:+} ({:.2}/conn, {bytes:+} B)",
                objs as f64 / held as f64
            ));
        }
        total = total.saturating_add_signed(bytes);
    }
    eprintln!(
        "kernel both ends, delta over {held} held: {}; total {total} B = {} B/conn, ÷ 2 = {} B",
        parts.join(", "),
        total / held,
        total / held / 2
    );
    total
}

/// The isolated server-side figure; returns bytes per server socket.
fn print_isolated(now: &Snapshot, servers: &[SocketAddr], sk: &SkMem) -> u64 {
    let n = sk.sockets;
    let tcp = if servers.iter().all(SocketAddr::is_ipv4) {
        "TCP"
    } else {
        "TCPv6"
    };
    let mut slab_bytes = 0.0;
    let mut parts = Vec::new();
    for name in [tcp, "sock_inode_cache", "filp", "dentry"] {
        if let Some(slab) = now.slabs.get(name) {
            slab_bytes += slab.bytes_per_obj;
            parts.push(format!("{name} {:.0}", slab.bytes_per_obj));
        }
    }
    let buffers = sk.bytes() / n;
    let figure = buffers + slab_bytes.round() as u64;
    eprintln!(
        "kernel server side (ss, {n} sockets on the server address): buffers {buffers} B/socket \
         (r {} w {} f {} o {} in all); slab objects {:.0} B/socket ({}); \
         server_kernel_sock_bytes_per_conn {figure}",
        sk.rmem,
        sk.wmem_queued,
        sk.fwd_alloc,
        sk.optmem,
        slab_bytes,
        parts.join(" + ")
    );
    figure
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_sockstat_mem() {
        let text =
            "sockets: used 31\nTCP: inuse 11 orphan 0 tw 2 alloc 14 mem 265\nUDP: inuse 0 mem 7\n";
        assert_eq!(parse_sockstat_mem(text), Some(265));
    }

    #[test]
    fn reads_socket_slabs() {
        let text = "slabinfo - version: 2.1\n\
            TCP                   26     26   2368   13    8 : tunables    0    0    0 : slabdata 2 2 0\n\
            filp                 753    861    192   21    1 : tunables    0    0    0 : slabdata 41 41 0\n\
            kmalloc-64           100    100     64   64    1 : tunables    0    0    0 : slabdata 2 2 0\n";
        let slabs = parse_slabinfo(text, 4096);
        assert_eq!(slabs.len(), 2);
        assert_eq!(slabs["TCP"].active, 26);
        assert!((slabs["TCP"].bytes_per_obj - 32768.0 / 13.0).abs() < 1e-9);
        assert!((slabs["filp"].bytes_per_obj - 4096.0 / 21.0).abs() < 1e-9);
    }

    #[test]
    fn sums_skmem() {
        let text = "0 0 127.0.0.1:8883 127.0.0.1:50884 skmem:(r0,rb131072,t0,tb2626560,f4096,w0,o0,bl0,d0)\n\
            0 0 127.0.0.1:8883 127.0.0.1:50886 skmem:(r512,rb131072,t0,tb2626560,f3584,w100,o40,bl0,d1)\n";
        let sk = parse_skmem(text);
        assert_eq!(
            sk,
            SkMem {
                sockets: 2,
                rmem: 512,
                wmem_queued: 100,
                fwd_alloc: 7680,
                optmem: 40
            }
        );
        assert_eq!(sk.bytes(), 8332);
    }
}
