//! `lobby-loadtest`: load-test harness for the lobby (SPEC §11). CLI only; the flow is
//!
//! 1. identities — [`pki`]: device certificates made in memory from the CA, or loaded;
//! 2. pacing — [`run`]: one task per device under `--concurrency` and `--rate`;
//! 3. connection — [`net`] (source addresses, TCP) → [`tls`] (mTLS) → [`session`] with the
//!    hand-written codec in [`mqtt`];
//! 4. scenarios — [`scenario`]: `connect`, `idle` (with [`kernel`]), `claim` (with [`api`]),
//!    `bridge`, `storm`;
//! 5. results — [`stats`]: HDR histograms, progress bar, the JSON line on stdout.
#![forbid(unsafe_code)]

mod api;
mod kernel;
mod mqtt;
mod net;
mod pki;
mod run;
mod scenario;
mod session;
mod stats;
mod tls;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::mqtt::Version;
use crate::run::Pace;
use crate::session::Ctx;
use crate::tls::{TlsClient, Versions};

/// Load-test harness for the lobby.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// TCP, TLS, CONNECT → CONNACK, DISCONNECT per device, as fast as allowed.
    Connect {
        #[command(flatten)]
        common: Common,
        /// Connect every device this many times (with --resume, after a warm-up pass that
        /// gives each device one full handshake, so the measured connects can resume).
        #[arg(long, default_value_t = 1)]
        repeat: usize,
        /// The server's pid: report its CPU time per connect over the measured pass.
        #[arg(long)]
        server_pid: Option<u32>,
    },
    /// Open N connections and hold them, keeping them alive.
    Idle {
        #[command(flatten)]
        common: Common,
        /// How long to hold all connections once open (e.g. 60s, 5m).
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        hold: Duration,
        /// The server's pid: report its RSS growth per held connection.
        #[arg(long)]
        server_pid: Option<u32>,
    },
    /// Devices wait subscribed; create a tenant, claim them, measure claim → redirect.
    Claim {
        #[command(flatten)]
        common: Common,
        /// Lobby API base URL; repeat it (or give `a,b`) to deal the claims to several nodes
        /// in turn (the tenant is created through the first).
        #[arg(
            long,
            default_value = "http://127.0.0.1:8080",
            value_delimiter = ',',
            num_args = 1
        )]
        api: Vec<String>,
        /// Operator token, or @FILE to read it.
        #[arg(long)]
        admin_token: String,
        /// Claim key file (64 hex characters).
        #[arg(long)]
        claim_key: PathBuf,
        /// Claim requests (batches, with --claim-batch) in flight at once, per --api.
        #[arg(long, default_value_t = 16)]
        claim_concurrency: usize,
        /// Codes per `POST /v1/claims:batch` (1..=1000); 0: one `POST /v1/claims` per device.
        #[arg(long, default_value_t = 0)]
        claim_batch: usize,
        /// How long to wait for the last redirects after the last claim.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        redirect_timeout: Duration,
        /// Server pid (repeatable): report the servers' CPU over the claim phase.
        #[arg(long)]
        server_pid: Vec<u32>,
    },
    /// Hold N connections, drop them all at once (the server restarts, or --drop-after) and
    /// measure how they all come back.
    Storm {
        #[command(flatten)]
        common: Common,
        /// The harness closes every connection this long after all are held, and reconnects
        /// them (without it: the server must go away, e.g. a script restarts it).
        #[arg(long, value_parser = humantime::parse_duration)]
        drop_after: Option<Duration>,
        /// Without --drop-after: how long to wait, once all are held, for the server to go.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        hold: Duration,
        /// Reconnect attempts stop this long after the first connection dropped.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        deadline: Duration,
        /// Reconnects in flight at once during the storm (0: all devices at once).
        #[arg(long, default_value_t = 0)]
        storm_concurrency: usize,
        /// The server's pid: report its CPU time per reconnect (--drop-after).
        #[arg(long)]
        server_pid: Option<u32>,
        /// File holding the server's pid, re-read after the storm (a restart changes it).
        #[arg(long)]
        server_pid_file: Option<PathBuf>,
        /// Written (with the number held) once every first connect attempt is done.
        #[arg(long)]
        ready_file: Option<PathBuf>,
    },
    /// Devices publish through a bridge; an observer on the upstream broker measures
    /// messages per second and end-to-end latency.
    Bridge {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        bridge: scenario::bridge::BridgeArgs,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum MqttVersion {
    /// MQTT 3.1.1.
    #[value(name = "3.1.1", alias = "3", alias = "4", alias = "311")]
    V311,
    /// MQTT 5.0.
    #[value(name = "5")]
    V5,
}

/// Options every scenario shares.
#[derive(Args)]
struct Common {
    /// Server host.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Server MQTT port; repeat it (or give `a,b`) to spread the devices round-robin over
    /// several listeners, e.g. the nodes of a fleet on one host.
    #[arg(long, default_value = "8883", value_delimiter = ',', num_args = 1)]
    port: Vec<u16>,
    /// CA certificate (PEM): signs the device certificates and, unless --server-ca, the server's.
    #[arg(long)]
    ca: PathBuf,
    /// CA private key (PEM) to make device certificates; not needed with --certs.
    #[arg(long, required_unless_present = "certs")]
    ca_key: Option<PathBuf>,
    /// Use existing *.pem + *.key pairs from this directory instead of making certificates.
    #[arg(long)]
    certs: Option<PathBuf>,
    /// CA that signed the server certificate (default: --ca).
    #[arg(long)]
    server_ca: Option<PathBuf>,
    /// Name to verify the server certificate against (and send as SNI).
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// Number of devices (default 1000; with --certs: all pairs found).
    #[arg(long)]
    devices: Option<usize>,
    /// Connects in flight at once.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// Cap on connect starts per second.
    #[arg(long)]
    rate: Option<f64>,
    /// MQTT protocol version.
    #[arg(long, value_enum, default_value = "3.1.1")]
    mqtt: MqttVersion,
    /// Source addresses, `127.0.0.1-127.0.0.8` or `a,b,c` (default: spread over 127.0.0.x only
    /// when the server is on loopback and there are more than 25,000 devices per address).
    #[arg(long)]
    source_ips: Option<String>,
    /// Offer TLS 1.3 only.
    #[arg(long, conflicts_with = "tls12")]
    tls13_only: bool,
    /// Offer TLS 1.2 only.
    #[arg(long)]
    tls12: bool,
    /// Allow TLS session resumption (per device; default: every connect is a full handshake).
    #[arg(long)]
    resume: bool,
    /// Limit for each phase (TCP, TLS, CONNACK, SUBACK).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

impl Common {
    fn pace(&self) -> Pace {
        Pace {
            concurrency: self.concurrency,
            rate: self.rate,
        }
    }

    /// Certificates, TLS, addresses: everything a run needs before the first connect.
    async fn context(&self) -> Result<Arc<Ctx>> {
        let provider = tls::provider();
        let devices = match (&self.certs, &self.ca_key) {
            (Some(dir), _) => pki::load_dir(dir, self.devices, &provider)?,
            (None, Some(key)) => {
                pki::generate(&self.ca, key, self.devices.unwrap_or(1000), &provider)?
            }
            (None, None) => bail!("--ca-key or --certs is required"),
        };
        if devices.is_empty() {
            bail!("no devices to run");
        }
        let versions = match (self.tls13_only, self.tls12) {
            (true, _) => Versions::Tls13,
            (_, true) => Versions::Tls12,
            _ => Versions::Both,
        };
        let server_ca = self.server_ca.as_ref().unwrap_or(&self.ca);
        let tls = TlsClient::new(
            provider,
            server_ca,
            &self.server_name,
            versions,
            self.resume,
        )?;
        let mut servers = Vec::with_capacity(self.port.len());
        for &port in &self.port {
            servers.push(net::resolve(&self.host, port).await?);
        }
        // Every port is on the same host: the first address decides whether to spread sources.
        let sources = match &self.source_ips {
            Some(text) => net::parse_source_ips(text)?,
            None => net::default_source_ips(servers[0], devices.len()),
        };
        if !sources.is_empty() {
            eprintln!("binding to {} source addresses", sources.len());
        }
        let version = match self.mqtt {
            MqttVersion::V311 => Version::V4,
            MqttVersion::V5 => Version::V5,
        };
        let ctx = Ctx::new(servers, sources, tls, version, self.timeout, devices);
        Ok(Arc::new(ctx))
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build();
    let outcome = runtime
        .context("starting the tokio runtime")
        .and_then(|rt| rt.block_on(run(cli)));
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    match net::raise_nofile_limit() {
        Ok(limit) => eprintln!("open files limit: {limit}"),
        Err(e) => eprintln!("warning: {e:#}"),
    }
    let report = match cli.scenario {
        Scenario::Connect {
            common,
            repeat,
            server_pid,
        } => {
            let opts = scenario::connect::ConnectOpts { repeat, server_pid };
            scenario::connect::run(common.context().await?, common.pace(), opts).await?
        }
        Scenario::Idle {
            common,
            hold,
            server_pid,
        } => {
            let opts = scenario::idle::IdleOpts { hold, server_pid };
            scenario::idle::run(common.context().await?, common.pace(), opts).await?
        }
        Scenario::Claim {
            common,
            api,
            admin_token,
            claim_key,
            claim_concurrency,
            claim_batch,
            redirect_timeout,
            server_pid,
        } => {
            let opts = scenario::claim::ClaimOpts {
                apis: api,
                admin_token: api::read_token(&admin_token)?,
                claim_key: pki::read_claim_key(&claim_key)?,
                claim_concurrency,
                claim_batch,
                redirect_timeout,
                server_pids: server_pid,
            };
            scenario::claim::run(common.context().await?, common.pace(), opts).await?
        }
        Scenario::Storm {
            common,
            drop_after,
            hold,
            deadline,
            storm_concurrency,
            server_pid,
            server_pid_file,
            ready_file,
        } => {
            let opts = scenario::storm::StormOpts {
                drop_after,
                hold,
                deadline,
                storm_concurrency,
                server_pid,
                server_pid_file,
                ready_file,
            };
            scenario::storm::run(common.context().await?, common.pace(), opts).await?
        }
        Scenario::Bridge { common, bridge } => {
            scenario::bridge::run(common.context().await?, common.pace(), bridge).await?
        }
    };
    println!(
        "{}",
        serde_json::to_string(&report).context("serializing report")?
    );
    Ok(())
}
