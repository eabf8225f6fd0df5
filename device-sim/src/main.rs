//! `fleet-sim`: run one simulated station, or many, and play its local admin interface.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};
use fleet_sim::{
    admin_request, fingerprint, local_reset, serve_admin, spawn_fleet, spawn_station, AdminRequest,
    SimConfig, StationProfile, StationState, Tally, DEFAULT_MODEL,
};
use tokio::sync::{mpsc, watch};

#[derive(Parser)]
#[command(name = "fleet-sim", version, about = "Simulated fleetgate stations")]
struct Cli {
    #[command(subcommand)]
    command: TopCommand,
}

#[derive(Subcommand)]
enum TopCommand {
    /// One station and its local admin interface.
    #[command(subcommand)]
    Station(StationCommand),
    /// Run many stations in one process, each in BASE/<serial>.
    Stations {
        /// How many stations.
        #[arg(long)]
        count: usize,
        /// Base directory of the station directories.
        #[arg(long)]
        dir: PathBuf,
        #[command(flatten)]
        connection: Connection,
        /// Firmware of stations made now (existing directories keep theirs).
        #[arg(long, default_value = "6.1.0")]
        firmware: String,
        /// Serials are PREFIX-00001, PREFIX-00002, ….
        #[arg(long, default_value = "SIM")]
        serial_prefix: String,
        /// Seconds between summary lines.
        #[arg(long, default_value_t = 5)]
        summary_every: u64,
    },
}

#[derive(clap::Args)]
struct Connection {
    /// fleetd's address, HOST:PORT.
    #[arg(long, default_value = "127.0.0.1:8883")]
    server: String,
    /// The fleet CA certificate (fleetd's DATA_DIR/ca.pem).
    #[arg(long)]
    ca: PathBuf,
    /// Milliseconds to wait before connecting again after a refusal or a lost connection.
    #[arg(long, default_value_t = 1000)]
    retry_ms: u64,
}

impl Connection {
    fn config(&self) -> anyhow::Result<SimConfig> {
        let ca_pem = std::fs::read_to_string(&self.ca)
            .with_context(|| format!("cannot read {}", self.ca.display()))?;
        if fleet_sim::station::split_server(&self.server).is_none() {
            bail!("--server {:?} is not HOST:PORT", self.server);
        }
        Ok(SimConfig {
            server: self.server.clone(),
            ca_pem,
            retry: Duration::from_millis(self.retry_ms),
        })
    }
}

#[derive(Subcommand)]
enum StationCommand {
    /// Make a new station directory.
    Init {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        serial: String,
        #[arg(long, default_value = "6.1.0")]
        firmware: String,
        #[arg(long, default_value = DEFAULT_MODEL)]
        model: String,
        /// MAC of the streaming interface (derived from the serial if absent).
        #[arg(long)]
        mac_streaming: Option<String>,
        /// MAC of the control interface (derived from the serial if absent).
        #[arg(long)]
        mac_control: Option<String>,
    },
    /// Boot the station and keep it running until Ctrl-C; prints one line per event.
    Run {
        #[arg(long)]
        dir: PathBuf,
        #[command(flatten)]
        connection: Connection,
    },
    /// Show the fingerprint, as the local admin page does.
    Fingerprint {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Local admin "Reset Device"; a running station reboots.
    Reset {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        delete_configuration: bool,
        #[arg(long)]
        delete_authentication: bool,
    },
    /// Ask the running station to reboot.
    Reboot {
        #[arg(long)]
        dir: PathBuf,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        TopCommand::Station(command) => station(command).await,
        TopCommand::Stations {
            count,
            dir,
            connection,
            firmware,
            serial_prefix,
            summary_every,
        } => {
            stations(
                count,
                &dir,
                &connection,
                &firmware,
                &serial_prefix,
                summary_every,
            )
            .await
        }
    }
}

#[allow(clippy::print_stdout)]
async fn station(command: StationCommand) -> anyhow::Result<()> {
    match command {
        StationCommand::Init {
            dir,
            serial,
            firmware,
            model,
            mac_streaming,
            mac_control,
        } => {
            let profile = StationProfile {
                serial,
                firmware,
                model,
                mac_streaming,
                mac_control,
            };
            let state = StationState::init(&dir, &profile)?;
            let record = &state.record;
            println!(
                "station {} ({} firmware {}) in {}; MACs {} / {}",
                record.serial,
                record.model,
                record.firmware,
                dir.display(),
                record.mac_streaming,
                record.mac_control
            );
        }
        StationCommand::Run { dir, connection } => {
            let config = connection.config()?;
            StationState::open(&dir)?;
            let mut station = spawn_station(&dir, config);
            let _admin = serve_admin(&dir, station.control()).await?;
            loop {
                tokio::select! {
                    event = station.next_event() => match event {
                        Some(event) => println!("{event}"),
                        None => break,
                    },
                    signal = tokio::signal::ctrl_c() => {
                        signal?;
                        station.shutdown().await;
                        break;
                    }
                }
            }
        }
        StationCommand::Fingerprint { dir } => {
            let shown = match admin_request(&dir, &AdminRequest::Fingerprint).await? {
                Some(reply) if reply.ok => reply.fingerprint,
                Some(reply) => bail!("{}", reply.error.unwrap_or_default()),
                None => fingerprint(&dir)?.map(|f| f.to_string()),
            };
            match shown {
                Some(fingerprint) => println!("{fingerprint}"),
                None => println!("no key pair: firmware below 6.1.0"),
            }
        }
        StationCommand::Reset {
            dir,
            delete_configuration,
            delete_authentication,
        } => {
            let request = AdminRequest::Reset {
                delete_configuration,
                delete_authentication,
            };
            match admin_request(&dir, &request).await? {
                Some(reply) if reply.ok => println!("reset applied; the station reboots"),
                Some(reply) => bail!("{}", reply.error.unwrap_or_default()),
                None => {
                    local_reset(&dir, delete_configuration, delete_authentication)?;
                    println!("reset applied; takes effect when the station boots");
                }
            }
        }
        StationCommand::Reboot { dir } => match admin_request(&dir, &AdminRequest::Reboot).await? {
            Some(reply) if reply.ok => println!("rebooting"),
            Some(reply) => bail!("{}", reply.error.unwrap_or_default()),
            None => bail!("no station is running for {}", dir.display()),
        },
    }
    Ok(())
}

#[allow(clippy::print_stdout)]
async fn stations(
    count: usize,
    base: &Path,
    connection: &Connection,
    firmware: &str,
    prefix: &str,
    summary_every: u64,
) -> anyhow::Result<()> {
    let config = connection.config()?;
    let stations = spawn_fleet(base, count, prefix, firmware, &config)?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = Vec::with_capacity(stations.len());
    let mut admins = Vec::new();
    for (serial, mut station) in stations {
        match serve_admin(&base.join(&serial), station.control()).await {
            Ok(admin) => admins.push(admin),
            Err(e) => tracing::warn!("{serial}: no local admin socket: {e}"),
        }
        let tx = tx.clone();
        let mut stop = stop_rx.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                tokio::select! {
                    event = station.next_event() => match event {
                        Some(event) => {
                            let _ = tx.send((serial.clone(), event));
                        }
                        None => return,
                    },
                    _ = stop.changed() => break,
                }
            }
            station.shutdown().await;
        }));
    }
    drop(tx);
    let mut tally = Tally::default();
    let mut summary = tokio::time::interval(Duration::from_secs(summary_every.max(1)));
    loop {
        tokio::select! {
            event = rx.recv() => match event {
                Some((serial, event)) => tally.observe(&serial, &event),
                None => break,
            },
            _ = summary.tick() => println!("{tally}"),
            signal = tokio::signal::ctrl_c() => {
                signal?;
                break;
            }
        }
    }
    let _ = stop_tx.send(true);
    for task in tasks {
        let _ = task.await;
    }
    drop(admins);
    println!("{tally}");
    Ok(())
}
