//! The `lobby` command line (SPEC §7): serve, dev PKI, device ids and claim codes.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use lobby::claims::codes::ClaimKey;
use lobby::config::{Config, LogConfig};
use lobby::device::{cert_pem_to_der, DeviceId};
use lobby::server::{ensure_dev_pki, Lobby};
use lobby::{pki, qr};

const DEFAULT_CONFIG: &str = "config/lobby.toml";

#[derive(Parser)]
#[command(
    name = "lobby",
    version,
    about = "MQTT lobby broker and router for unbound IoT devices"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the lobby: on `--config`, else on `config/lobby.toml` when it exists, else on the
    /// built-in defaults (development only: `certs/dev` must exist, or `--dev` creates it).
    Serve {
        #[arg(long)]
        config: Option<PathBuf>,
        /// Without a config file: run on the built-in defaults and create the development PKI
        /// (`certs/dev`) when it is missing.
        #[arg(long)]
        dev: bool,
        /// Log as JSON lines (overrides `log.format`).
        #[arg(long)]
        log_json: bool,
    },
    /// Check a config file without starting: its keys, and the files it names (TLS
    /// certificates and keys, CAs, CRLs, claim-code keys, the admin token). Exit 1 naming
    /// what is wrong.
    CheckConfig {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Development PKI.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Print a certificate's device_id (SHA-256 of its DER).
    DeviceId {
        #[arg(long)]
        cert: PathBuf,
    },
    /// Print a device's claim code (its QR label).
    ClaimCode(ClaimCodeArgs),
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Create a CA, a server certificate, device certificates, a claim key and an admin token.
    Init {
        #[arg(long, default_value = "certs/dev")]
        dir: PathBuf,
        #[arg(long, default_value_t = 3)]
        devices: usize,
    },
    /// Issue one more device certificate from the CA in `--dir`.
    Device {
        #[arg(long, default_value = "certs/dev")]
        dir: PathBuf,
        #[arg(long)]
        name: String,
    },
}

#[derive(Args)]
struct ClaimCodeArgs {
    #[arg(long)]
    cert: PathBuf,
    /// Config naming `claims.code_key`.
    #[arg(long, default_value = DEFAULT_CONFIG)]
    config: PathBuf,
    /// Also draw the code as a QR code in the terminal.
    #[arg(long)]
    qr: bool,
    /// Also write the QR code as a PNG image.
    #[arg(long)]
    png: Option<PathBuf>,
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Serve {
            config,
            dev,
            log_json,
        } => serve(config.as_deref(), dev, log_json),
        Command::CheckConfig { config } => check_config(&config),
        Command::Certs(CertsCommand::Init { dir, devices }) => {
            let report = pki::init(&pki::InitOptions { dir, devices })?;
            for f in report.files {
                println!("{}", f.display());
            }
            Ok(())
        }
        Command::Certs(CertsCommand::Device { dir, name }) => {
            println!("{}", pki::issue_device(&dir, &name)?.display());
            Ok(())
        }
        Command::DeviceId { cert } => {
            println!("{}", device_id(&cert)?);
            Ok(())
        }
        Command::ClaimCode(args) => claim_code(&args),
    }
}

fn device_id(cert: &Path) -> Result<DeviceId> {
    let pem =
        std::fs::read_to_string(cert).with_context(|| format!("reading {}", cert.display()))?;
    let der = cert_pem_to_der(&pem).with_context(|| format!("parsing {}", cert.display()))?;
    Ok(DeviceId::from_cert_der(&der))
}

fn claim_code(args: &ClaimCodeArgs) -> Result<()> {
    let config = Config::load(&args.config)?;
    let key = ClaimKey::load(&config.claims.code_key)?;
    let code = key.code_for(&device_id(&args.cert)?);
    println!("{code}");
    if args.qr {
        print!("{}", qr::render_terminal(&code)?);
    }
    if let Some(png) = &args.png {
        qr::write_png(&code, png, 8)?;
        eprintln!("wrote {}", png.display());
    }
    Ok(())
}

/// The config `serve` runs on, and the file it came from (SIGHUP reads it again).
fn serve_config(path: Option<&Path>, dev: bool) -> Result<(Config, Option<PathBuf>)> {
    let file = path
        .map(Path::to_owned)
        .or_else(|| Some(PathBuf::from(DEFAULT_CONFIG)).filter(|p| p.exists()));
    if let Some(file) = file {
        return Ok((Config::load(&file)?, Some(file)));
    }
    let mut config = Config::default();
    config.dev.auto_init = dev;
    let dev_pki = Path::new("certs/dev");
    if !dev && !dev_pki.join("ca.pem").exists() {
        anyhow::bail!(
            "no config: {DEFAULT_CONFIG} does not exist and no --config was given. Give \
             --config FILE (see config/lobby.toml in the repository for every key), or --dev \
             to run on the built-in development defaults (creates certs/dev with a CA, a \
             server certificate, device certificates, a claim key and an admin token)"
        );
    }
    Ok((config, None))
}

fn serve(path: Option<&Path>, dev: bool, log_json: bool) -> Result<()> {
    let (config, file) = serve_config(path, dev)?;
    init_tracing(&config.log, log_json);
    ensure_dev_pki(&config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async {
        let lobby = Lobby::start(&config).await?;
        lobby.run_until_signal(file.as_deref()).await;
        Ok(())
    })
}

fn check_config(path: &Path) -> Result<()> {
    let config = Config::load(path)?;
    lobby::server::check_files(&config)?;
    println!("{}: ok", path.display());
    Ok(())
}

fn init_tracing(log: &LogConfig, force_json: bool) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if force_json || log.format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}
