//! `fleetd`: the fleet service (front door, router and controller in one process).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

/// Descriptors fleetd holds besides its clients' sockets: the listener, the store, the
/// runtime's own, the log.
const RESERVED_FILES: u64 = 64;

#[derive(Parser)]
#[command(
    name = "fleetd",
    version,
    about = "fleetgate: broker and controller in one process"
)]
struct Args {
    /// Configuration file (TOML); every key has a default, so it is optional.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Data directory (CA, certificates, store). Overrides `server.data_dir`.
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    /// Address of the MQTT/TLS listener. Overrides `server.listen`.
    #[arg(long)]
    listen: Option<SocketAddr>,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Issue a further operator certificate: registers it and writes NAME.pem and NAME.key
    /// into the data directory (or --out). Never overwrites; a name is issued once per tenant.
    IssueOperator {
        name: String,
        #[arg(long, default_value = "default")]
        tenant: String,
        /// Folder for NAME.pem and NAME.key (default: the data directory).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Print a commented example configuration with every key and its default.
    ExampleConfig,
}

fn main() {
    with_two_malloc_arenas();
    if let Err(e) = run() {
        // One line, non-zero exit (PROTOCOL §8).
        eprintln!("fleetd: {e:#}");
        std::process::exit(1);
    }
}

/// Re-executes fleetd with `MALLOC_ARENA_MAX=2` unless the environment sets it (or
/// `GLIBC_TUNABLES`). glibc gives threads that allocate arenas of their own (up to 8 per core)
/// and keeps what is freed in each: in the churn soak (`bench/src/bin/churn.rs`, 1,000
/// stations × 10 rounds) fleetd's RSS grew 2.9× while its live heap did not (heaptrack), and
/// 1.5×, flattening, with two arenas; the storm figures did not change. The environment must
/// say it before the process starts, hence the `exec`; without glibc it has no effect.
fn with_two_malloc_arenas() {
    use std::os::unix::process::CommandExt;
    const ARENAS: &str = "MALLOC_ARENA_MAX";
    if std::env::var_os(ARENAS).is_some() || std::env::var_os("GLIBC_TUNABLES").is_some() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let error = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env(ARENAS, "2")
        .exec();
    // Only returns on failure: go on with glibc's default.
    eprintln!("fleetd: running without {ARENAS}=2 ({error})");
}

// stdout is what scripts read (PROTOCOL §8): the issued files, the example configuration.
#[allow(clippy::print_stdout)]
fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,rumqttd=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut config = fleet_config::load(args.config.as_deref())?;
    if let Some(dir) = args.data_dir {
        config.server.data_dir = dir;
    }
    if let Some(listen) = args.listen {
        config.server.listen = listen;
    }
    match args.command {
        Some(Cmd::IssueOperator { name, tenant, out }) => {
            let dir = &config.server.data_dir;
            let (cert, key) = fleet_certs::data_dir::issue_operator_files_into(
                dir,
                &name,
                &tenant,
                out.as_deref().unwrap_or(dir),
            )?;
            println!("{}\n{}", cert.display(), key.display());
            Ok(())
        }
        Some(Cmd::ExampleConfig) => {
            print!("{}", fleet_config::EXAMPLE);
            Ok(())
        }
        None => serve(config),
    }
}

/// Raises the soft limit on open files to the hard one, and says how many connections it
/// allows: each client holds a socket, and the usual soft limit of 1024 would turn clients
/// away long before `server.max_connections`. A failure is a warning, never fatal.
fn raise_open_files(max_connections: u32) {
    let limit = getrlimit(Resource::Nofile);
    if let (Some(soft), Some(hard)) = (limit.current, limit.maximum) {
        let raised = Rlimit {
            current: Some(hard),
            maximum: Some(hard),
        };
        if soft < hard {
            if let Err(e) = setrlimit(Resource::Nofile, raised) {
                tracing::warn!("cannot raise the limit on open files from {soft} to {hard}: {e}");
            }
        }
    }
    let Some(files) = getrlimit(Resource::Nofile).current else {
        tracing::info!("no limit on open files");
        return;
    };
    let connections = connections_allowed(files);
    tracing::info!(
        open_files = files,
        before = ?limit.current,
        "the limit on open files allows about {connections} connections"
    );
    if connections < u64::from(max_connections) {
        tracing::warn!(
            "server.max_connections is {max_connections}, more than the limit on open files \
             allows: raise the hard limit (ulimit -Hn) or lower server.max_connections"
        );
    }
}

/// Connections that `open_files` descriptors leave room for.
fn connections_allowed(open_files: u64) -> u64 {
    open_files.saturating_sub(RESERVED_FILES)
}

// stdout says where fleetd listens, for scripts and tests.
#[allow(clippy::print_stdout)]
fn serve(config: fleet_config::Config) -> anyhow::Result<()> {
    raise_open_files(config.server.max_connections);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // Admissions, session openings and ends, router links and firmware reads wait on the
        // blocking pool (they may wait for the controller's lock or the disk, never on an async
        // worker): bounded, so that a connect storm queues them instead of starting hundreds of
        // threads.
        .max_blocking_threads(128)
        .build()
        .context("tokio runtime")?;
    runtime.block_on(async {
        let fleet = fleet_controller::Fleet::start(&config).await?;
        tracing::info!(
            listen = %fleet.local_addr(),
            data_dir = %config.server.data_dir.display(),
            "fleetd ready"
        );
        // Scripts and tests read the bound address from this line.
        println!("fleetd listening on {}", fleet.local_addr());
        tokio::signal::ctrl_c().await.context("signal handler")?;
        tracing::info!("shutting down");
        fleet.shutdown();
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connections_allowed_leave_room_for_fleetds_own_files() {
        assert_eq!(connections_allowed(20_000), 20_000 - RESERVED_FILES);
        assert_eq!(connections_allowed(1024), 960);
        assert_eq!(connections_allowed(3), 0);
    }
}
