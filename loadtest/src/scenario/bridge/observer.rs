//! The bridge scenario's observer: one mTLS connection to the upstream broker, subscribed to
//! `things/#` at QoS 1, recording the end-to-end latency of every stamped message and which
//! (device, sequence) pairs arrived. Also the stamp format the devices write.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;

use crate::mqtt::{self, Packet, Version};
use crate::net;
use crate::pki;
use crate::session::Conn;
use crate::stats::{histogram, micros, Failure};
use crate::tls::{self, TlsClient, Versions};

/// Bytes of the stamp at the front of every payload: send time (ns since the run's epoch, u64),
/// run tag, device index, sequence (u32 each), little-endian.
pub const STAMP_LEN: usize = 20;

/// What a device writes at the front of each payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    /// Nanoseconds since the run's epoch when the message was encoded.
    pub sent_ns: u64,
    /// Random tag of this run: messages of other runs are ignored.
    pub run: u32,
    /// Device index.
    pub device: u32,
    /// Sequence number within the device, from 0.
    pub seq: u32,
}

impl Stamp {
    /// Writes the stamp over the first [`STAMP_LEN`] bytes of `payload` (which must be as long).
    pub fn write(&self, payload: &mut [u8]) {
        payload[..8].copy_from_slice(&self.sent_ns.to_le_bytes());
        payload[8..12].copy_from_slice(&self.run.to_le_bytes());
        payload[12..16].copy_from_slice(&self.device.to_le_bytes());
        payload[16..20].copy_from_slice(&self.seq.to_le_bytes());
    }

    /// Reads a stamp from the front of `payload`, if long enough.
    pub fn read(payload: &[u8]) -> Option<Self> {
        let u32_at = |at: usize| {
            Some(u32::from_le_bytes(
                payload.get(at..at + 4)?.try_into().ok()?,
            ))
        };
        Some(Self {
            sent_ns: u64::from_le_bytes(payload.get(..8)?.try_into().ok()?),
            run: u32_at(8)?,
            device: u32_at(12)?,
            seq: u32_at(16)?,
        })
    }
}

/// The upstream broker and the client identity to reach it with.
pub struct Upstream {
    /// Host name (also checked against its certificate).
    pub host: String,
    /// Port.
    pub port: u16,
    /// CA that signed its server certificate.
    pub ca: PathBuf,
    /// Client certificate (PEM).
    pub cert: PathBuf,
    /// Client key (PEM).
    pub key: PathBuf,
}

/// What the observer saw.
pub struct Observed {
    /// Device send → observer receive, µs.
    pub e2e: Histogram<u64>,
    /// One bit per (device, seq).
    seen: Vec<u64>,
    devices: u32,
    messages: u32,
    run: u32,
    /// Distinct (device, seq) received.
    pub distinct: u64,
    /// Repeats of a (device, seq) already received.
    pub duplicates: u64,
    /// Messages on `things/#` without this run's stamp.
    pub foreign: u64,
    /// When the last new message arrived.
    pub last: Option<Instant>,
}

impl Observed {
    /// Room for `devices` × `messages` of run `run`.
    pub fn new(devices: u32, messages: u32, run: u32) -> Self {
        let bits = u64::from(devices) * u64::from(messages);
        Self {
            e2e: histogram(),
            seen: vec![0; usize::try_from(bits.div_ceil(64)).unwrap_or(0)],
            devices,
            messages,
            run,
            distinct: 0,
            duplicates: 0,
            foreign: 0,
            last: None,
        }
    }

    fn bit(&self, device: u32, seq: u32) -> (usize, u64) {
        let n = u64::from(device) * u64::from(self.messages) + u64::from(seq);
        ((n / 64) as usize, 1 << (n % 64))
    }

    fn record(&mut self, payload: &[u8], epoch: Instant) {
        let now = Instant::now();
        let stamp = match Stamp::read(payload) {
            Some(s) if s.run == self.run && s.device < self.devices && s.seq < self.messages => s,
            _ => return self.foreign += 1,
        };
        let (word, mask) = self.bit(stamp.device, stamp.seq);
        if self.seen[word] & mask != 0 {
            self.duplicates += 1;
            return;
        }
        self.seen[word] |= mask;
        self.distinct += 1;
        self.last = Some(now);
        let sent = epoch + Duration::from_nanos(stamp.sent_ns);
        self.e2e
            .saturating_record(micros(now.saturating_duration_since(sent)));
    }

    /// How many of `device`'s sequences `0..upto` never arrived.
    pub fn missing(&self, device: u32, upto: u32) -> u64 {
        (0..upto.min(self.messages))
            .filter(|&seq| {
                let (word, mask) = self.bit(device, seq);
                self.seen[word] & mask == 0
            })
            .count() as u64
    }
}

/// Connects to the upstream broker over mTLS and subscribes to `things/#` at QoS 1.
pub async fn connect(up: &Upstream, limit: Duration) -> Result<Conn> {
    let provider = tls::provider();
    let client = TlsClient::new(provider.clone(), &up.ca, &up.host, Versions::Both, false)?;
    let identity = pki::load_pair("observer".into(), &up.cert, &up.key, &provider)?;
    let addr = net::resolve(&up.host, up.port).await?;
    let tcp = tokio::time::timeout(limit, net::tcp_connect(addr, None))
        .await
        .context("observer: TCP connect timed out")?
        .with_context(|| format!("observer: connecting to {addr}"))?;
    let connector = TlsConnector::from(client.for_device(&identity.key));
    let stream = tokio::time::timeout(limit, connector.connect(client.server_name.clone(), tcp))
        .await
        .context("observer: TLS handshake timed out")?
        .context("observer: TLS handshake with the upstream broker")?;
    let id = format!("lt-observer-{:08x}", rand::random::<u32>());
    let (mut conn, code) = Conn::start(stream, Version::V4, &id, 60, limit)
        .await
        .map_err(|f| anyhow::anyhow!("observer: {}: {}", f.phase, f.detail))?;
    if code != 0 {
        bail!("observer: upstream CONNACK 0x{code:02X}");
    }
    match conn.subscribe("things/#", limit).await {
        Ok(code) if code < 0x80 => Ok(conn),
        Ok(code) => bail!("observer: SUBACK 0x{code:02X} for things/#"),
        Err(f) => bail!("observer: subscribe: {}: {}", f.phase, f.detail),
    }
}

/// Receives (and PUBACKs) until `stop`; `progress` follows the distinct count. Returns what was
/// seen and the error that ended it early, if any.
pub async fn observe(
    mut conn: Conn,
    mut seen: Observed,
    epoch: Instant,
    stop: CancellationToken,
    progress: Arc<AtomicU64>,
) -> (Observed, Option<Failure>) {
    let period = Duration::from_secs(30);
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    let mut acks = Vec::new();
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => return (seen, None),
            _ = ping.tick() => {
                if let Err(f) = conn.send(&mqtt::PINGREQ).await {
                    return (seen, Some(f));
                }
            }
            batch = conn.read_batch(|packet| {
                if let Packet::Publish { qos, pkid, payload, .. } = packet {
                    if qos == 1 {
                        acks.extend_from_slice(&mqtt::puback(pkid));
                    }
                    seen.record(payload, epoch);
                }
            }) => {
                if let Err(f) = batch {
                    return (seen, Some(f));
                }
                progress.store(seen.distinct, Ordering::Relaxed);
                if !acks.is_empty() {
                    if let Err(f) = conn.send(&acks).await {
                        return (seen, Some(f));
                    }
                    acks.clear();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_round_trip_and_counting() {
        let stamp = Stamp {
            sent_ns: 5,
            run: 7,
            device: 2,
            seq: 9,
        };
        let mut payload = vec![0u8; 64];
        stamp.write(&mut payload);
        assert_eq!(Stamp::read(&payload), Some(stamp));
        assert_eq!(Stamp::read(&payload[..10]), None);
        let mut seen = Observed::new(3, 10, 7);
        let epoch = Instant::now();
        seen.record(&payload, epoch);
        seen.record(&payload, epoch);
        seen.record(b"other", epoch);
        assert_eq!((seen.distinct, seen.duplicates, seen.foreign), (1, 1, 1));
        assert_eq!(seen.missing(2, 10), 9);
        assert_eq!(seen.missing(1, 10), 10);
    }
}
