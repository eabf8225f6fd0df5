//! `fleetctl`: the operator's command line for fleetd (PROTOCOL §8).

mod table;

use std::io::{BufRead as _, Write as _};
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};
use fleet_ctl::paging::{
    fetch_pages, ChainCheck, ListPager, Listing, NewestRecords, Verdict, MAX_PAGE,
};
use fleet_ctl::{fingerprint_matches, operator_name, ClientError, OperatorClient};
use fleet_protocol::command::arg;
use fleet_protocol::OperatorCommand as C;
use fleet_protocol::{FirmwareVersion, IpAddress, PageLimit, Serial, Text};
use serde_json::{json, Value};
use table::Shape;

#[derive(Parser)]
#[command(
    name = "fleetctl",
    version,
    about = "Operate a fleetgate fleet",
    after_help = "Lists are fetched a page at a time, following fleetd's `next`. A page answered \
                  rate_limited is asked again after the wait fleetd names (1 s if it names \
                  none), up to 10 times in a row; one answered too_large is asked again half \
                  as big. Other commands print such errors and exit non-zero."
)]
struct Cli {
    /// fleetd's address, HOST:PORT.
    #[arg(long, global = true, default_value = "127.0.0.1:8883")]
    server: String,
    /// Fleet CA certificate [default: DATA_DIR/ca.pem].
    #[arg(long, global = true)]
    ca: Option<PathBuf>,
    /// Operator certificate [default: DATA_DIR/admin.pem].
    #[arg(long, global = true)]
    cert: Option<PathBuf>,
    /// Operator private key [default: DATA_DIR/admin.key].
    #[arg(long, global = true)]
    key: Option<PathBuf>,
    /// fleetd's data directory, for the files not given one by one.
    #[arg(long, global = true, default_value = "./fleet-data")]
    data_dir: PathBuf,
    /// Operator name [default: the CN of the certificate].
    #[arg(long, global = true)]
    name: Option<String>,
    /// Print the response data as JSON.
    #[arg(long, global = true)]
    json: bool,
    /// Seconds to wait for the answer (to each page, for lists).
    #[arg(long, global = true, default_value_t = 10)]
    timeout: u64,
    #[command(subcommand)]
    command: Top,
}

#[derive(Subcommand)]
enum Top {
    /// Stations.
    #[command(subcommand)]
    Stations(StationCommand),
    /// Phones.
    #[command(subcommand)]
    Phones(PhoneCommand),
    /// The tenant's IP whitelist.
    #[command(subcommand)]
    Whitelist(WhitelistCommand),
    /// The tenant's operators and their certificates.
    #[command(subcommand)]
    Operators(OperatorCommand),
    /// Addresses blocked after failed authentications.
    #[command(subcommand)]
    Blocks(BlockCommand),
    /// The firmware catalog that Start Update installs from.
    #[command(subcommand)]
    Firmware(FirmwareCommand),
    /// The audit log (listAuditLog); `audit verify` checks its hash chain.
    #[command(args_conflicts_with_subcommands = true)]
    Audit {
        /// The newest this many records, oldest first [default: fleetd's, 100]. Up to 500 (the
        /// most one listAuditLog returns) is one request; above that fleetctl pages back
        /// through the log with after_seq until it has them.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        limit: Option<u64>,
        #[command(subcommand)]
        command: Option<AuditCommand>,
    },
    /// All devices as CSV (exportDevicesCsv).
    ExportCsv,
    /// The web console: prints `console: http://127.0.0.1:PORT/login?token=…` and serves the
    /// station list, the phone portal, the whitelist and the audit log as this operator.
    Console(fleet_console::ConsoleArgs),
    /// Why a station, phone or address is where it stands (explain): its state and why, the
    /// manual's rule, an address block, a phone's wrong PAPs and lockout, its last refusals.
    Why {
        /// A station serial, a phone MAC or an IP address.
        subject: String,
    },
    /// Any operator command with JSON arguments, e.g. `call getStation '{"serial":"A"}'`.
    Call {
        command: String,
        /// A JSON object.
        #[arg(default_value = "{}")]
        args: String,
    },
}

#[derive(Subcommand)]
enum StationCommand {
    /// List stations (listStations), every page.
    List {
        /// Only stations in this state (e.g. unauthorized, running).
        #[arg(long)]
        state: Option<String>,
        /// Only the first N stations [default: all of them, page after page].
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
        limit: Option<u64>,
    },
    /// Show one station (getStation).
    Get { serial: String },
    /// Authorize a station (acceptStation) after checking its fingerprint.
    Accept {
        serial: String,
        /// The fingerprint shown on the station's local admin page; asked for if absent.
        #[arg(long)]
        fingerprint: Option<String>,
    },
    /// Reject a station (rejectStation).
    Reject { serial: String },
    /// List rejected stations (listRejectedStations), every page.
    Rejected {
        /// Only the first N stations [default: all of them, page after page].
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
        limit: Option<u64>,
    },
    /// Clear a rejected station so it may ask again (clearRejectedStation).
    Clear { serial: String },
    /// Start a firmware update (startStationUpdate).
    Update {
        serial: String,
        /// Version to install [default: the latest].
        #[arg(long)]
        version: Option<String>,
    },
    /// Reset Device (resetStation).
    Reset {
        serial: String,
        #[arg(long)]
        delete_authentication: bool,
        #[arg(long)]
        delete_configuration: bool,
    },
    /// Remove Device (removeStation).
    Remove { serial: String },
}

#[derive(Subcommand)]
enum PhoneCommand {
    /// Create a phone (createPhone); shows its PAP.
    Create {
        mac: String,
        #[arg(long)]
        vendor: String,
        #[arg(long = "type")]
        phone_type: String,
        #[arg(long, default_value = "")]
        site: String,
    },
    /// List phones (listPhones), every page.
    List {
        /// Only the first N phones [default: all of them, page after page].
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
        limit: Option<u64>,
    },
    /// Show one phone (getPhone).
    Get { mac: String },
    /// Suspend Authentication (suspendPhoneAuthentication).
    Suspend { mac: String },
    /// Reset Authentication: a new PAP (resetPhoneAuthentication).
    ResetAuthentication { mac: String },
    /// Delete a phone (deletePhone).
    Delete { mac: String },
    /// Import phones from a CSV file (importPhonesCsv).
    Import { file: PathBuf },
    /// All devices as CSV on stdout (exportDevicesCsv): `fleetctl phones export > devices.csv`.
    Export,
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Fetch the tenant's whole audit log and check its hash chain; exits non-zero if broken.
    Verify,
}

#[derive(Subcommand)]
enum FirmwareCommand {
    /// The images, latest first (listFirmware): the first is what `stations update` installs
    /// without `--version`.
    List,
}

#[derive(Subcommand)]
enum WhitelistCommand {
    /// Add an IP or CIDR range (addWhitelistEntry).
    Add {
        entry: String,
        /// Add a range broader than fleetd's minimum prefix (the whole Internet is refused
        /// even so).
        #[arg(long)]
        force: bool,
    },
    /// Remove an entry (removeWhitelistEntry).
    Remove { entry: String },
    /// Show both whitelists (listWhitelist).
    List,
}

#[derive(Subcommand)]
enum OperatorCommand {
    /// List the tenant's operators (listOperators).
    List,
    /// Revoke an operator's certificate (revokeOperator): fleetd admits it no more.
    Revoke { name: String },
}

#[derive(Subcommand)]
enum BlockCommand {
    /// List blocked addresses (listAddressBlocks).
    List,
    /// Lift the block of an address (liftAddressBlock).
    Lift {
        /// An IPv4 or IPv6 address, as `blocks list` shows it.
        address: IpAddr,
    },
}

/// A command to send and how to show its answer.
#[derive(Debug, PartialEq)]
struct Action {
    command: C,
    shape: Shape,
}

fn action(command: C, shape: Shape) -> Action {
    Action { command, shape }
}

/// Everything validated, nothing done yet.
#[derive(Debug)]
enum Plan {
    Send(Action),
    /// A list command, page after page.
    List(ListPager),
    /// `audit --limit` above one page: page back through the audit log.
    NewestAudit(NewestRecords),
    /// `stations accept` without `--fingerprint`: look, ask, then send.
    InteractiveAccept {
        serial: Serial,
    },
    /// `audit verify`: page through the whole audit log.
    VerifyAudit,
    /// `call`: a command name only known at run time, sent as it is.
    Call {
        command: String,
        args: Value,
    },
}

/// The arguments as operator commands. An argument the controller would refuse is refused
/// here, in the controller's own words (its parsers are these), before anything is sent.
fn plan(command: Top) -> anyhow::Result<Plan> {
    Ok(Plan::Send(match command {
        Top::Stations(command) => return plan_station(command),
        Top::Phones(command) => return plan_phone(command),
        Top::Whitelist(command) => match command {
            WhitelistCommand::Add { entry, force } => {
                let entry = arg::entry(&entry).map_err(ClientError::from)?;
                action(C::AddWhitelistEntry { entry, force }, Shape::Done)
            }
            WhitelistCommand::Remove { entry } => {
                let entry = arg::entry(&entry).map_err(ClientError::from)?;
                action(C::RemoveWhitelistEntry { entry }, Shape::Done)
            }
            WhitelistCommand::List => action(C::ListWhitelist, Shape::Whitelist),
        },
        Top::Operators(command) => match command {
            OperatorCommand::List => action(C::ListOperators, Shape::Operators),
            OperatorCommand::Revoke { name } => {
                if name.trim().is_empty() {
                    bail!("NAME must not be empty");
                }
                let name = Text::parse("name", &name).map_err(ClientError::from)?;
                action(C::RevokeOperator { name }, Shape::Operator)
            }
        },
        Top::Firmware(FirmwareCommand::List) => action(C::ListFirmware, Shape::Firmware),
        Top::Blocks(command) => match command {
            BlockCommand::List => action(C::ListAddressBlocks, Shape::Blocks),
            BlockCommand::Lift { address } => {
                let address = IpAddress::new(address);
                action(C::LiftAddressBlock { address }, Shape::Done)
            }
        },
        Top::Audit {
            command: Some(AuditCommand::Verify),
            ..
        } => return Ok(Plan::VerifyAudit),
        Top::Audit {
            limit: Some(limit),
            command: None,
        } if limit > MAX_PAGE => return Ok(Plan::NewestAudit(NewestRecords::new(limit))),
        Top::Audit {
            limit,
            command: None,
        } => {
            let limit = limit
                .map(PageLimit::new)
                .transpose()
                .map_err(ClientError::from)?;
            let command = C::ListAuditLog {
                limit,
                after_seq: None,
            };
            action(command, Shape::Audit)
        }
        Top::ExportCsv => action(C::ExportDevicesCsv, Shape::Csv),
        Top::Console(_) => bail!("the console is not a single command"),
        Top::Why { subject } => action(fleet_ctl::why::command(&subject)?, Shape::Raw),
        Top::Call { command, args } => {
            let args: Value = serde_json::from_str(&args).context("ARGS must be a JSON object")?;
            if !args.is_object() {
                bail!("ARGS must be a JSON object");
            }
            return Ok(Plan::Call { command, args });
        }
    }))
}

fn plan_station(command: StationCommand) -> anyhow::Result<Plan> {
    let serial = |text: &str| arg::serial(text).map_err(ClientError::from);
    Ok(Plan::Send(match command {
        StationCommand::List { state, limit } => {
            let state = state
                .as_deref()
                .map(arg::state)
                .transpose()
                .map_err(ClientError::from)?;
            let listing = Listing::Stations { state };
            return Ok(Plan::List(ListPager::new(listing, limit)));
        }
        StationCommand::Get { serial: s } => action(
            C::GetStation {
                serial: serial(&s)?,
            },
            Shape::Station,
        ),
        StationCommand::Accept {
            serial: s,
            fingerprint: Some(fingerprint),
        } => {
            let command = C::AcceptStation {
                serial: serial(&s)?,
                fingerprint: arg::fingerprint(fingerprint.trim()).map_err(ClientError::from)?,
            };
            action(command, Shape::Station)
        }
        StationCommand::Accept {
            serial: s,
            fingerprint: None,
        } => {
            return Ok(Plan::InteractiveAccept {
                serial: serial(&s)?,
            })
        }
        StationCommand::Reject { serial: s } => action(
            C::RejectStation {
                serial: serial(&s)?,
            },
            Shape::Station,
        ),
        StationCommand::Rejected { limit } => {
            return Ok(Plan::List(ListPager::new(Listing::RejectedStations, limit)))
        }
        StationCommand::Clear { serial: s } => action(
            C::ClearRejectedStation {
                serial: serial(&s)?,
            },
            Shape::Done,
        ),
        StationCommand::Update { serial: s, version } => {
            let version = version
                .as_deref()
                .map(FirmwareVersion::parse)
                .transpose()
                .map_err(ClientError::from)?;
            let command = C::StartStationUpdate {
                serial: serial(&s)?,
                version,
            };
            action(command, Shape::Station)
        }
        StationCommand::Reset {
            serial: s,
            delete_authentication,
            delete_configuration,
        } => {
            let command = C::ResetStation {
                serial: serial(&s)?,
                delete_authentication,
                delete_configuration,
            };
            action(command, Shape::Station)
        }
        StationCommand::Remove { serial: s } => action(
            C::RemoveStation {
                serial: serial(&s)?,
            },
            Shape::Done,
        ),
    }))
}

fn plan_phone(command: PhoneCommand) -> anyhow::Result<Plan> {
    let mac = |text: &str| arg::mac(text).map_err(ClientError::from);
    Ok(Plan::Send(match command {
        PhoneCommand::Create {
            mac: m,
            vendor,
            phone_type,
            site,
        } => {
            let text = |key: &str, text: &str| Text::parse(key, text).map_err(ClientError::from);
            let command = C::CreatePhone {
                mac: mac(&m)?,
                vendor: text("vendor", &vendor)?,
                kind: text("type", &phone_type)?,
                site: text("site", &site)?,
            };
            action(command, Shape::Phone)
        }
        PhoneCommand::List { limit } => {
            return Ok(Plan::List(ListPager::new(Listing::Phones, limit)))
        }
        PhoneCommand::Get { mac: m } => action(C::GetPhone { mac: mac(&m)? }, Shape::Phone),
        PhoneCommand::Suspend { mac: m } => {
            let command = C::SuspendPhoneAuthentication { mac: mac(&m)? };
            action(command, Shape::Phone)
        }
        PhoneCommand::ResetAuthentication { mac: m } => {
            let command = C::ResetPhoneAuthentication { mac: mac(&m)? };
            action(command, Shape::Phone)
        }
        PhoneCommand::Delete { mac: m } => action(C::DeletePhone { mac: mac(&m)? }, Shape::Done),
        PhoneCommand::Import { file } => {
            let csv = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            action(C::ImportPhonesCsv { csv }, Shape::Import)
        }
        PhoneCommand::Export => action(C::ExportDevicesCsv, Shape::Csv),
    }))
}

struct Credentials {
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
    name: String,
}

fn credentials(cli: &Cli) -> anyhow::Result<Credentials> {
    let read = |given: &Option<PathBuf>, default: &str| {
        let path = given.clone().unwrap_or_else(|| cli.data_dir.join(default));
        std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))
    };
    let ca_pem = read(&cli.ca, "ca.pem")?;
    let cert_pem = read(&cli.cert, "admin.pem")?;
    let key_pem = read(&cli.key, "admin.key")?;
    let name = match &cli.name {
        Some(name) => name.clone(),
        None => operator_name(&cert_pem).context("cannot read the operator name; give --name")?,
    };
    Ok(Credentials {
        ca_pem,
        cert_pem,
        key_pem,
        name,
    })
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(Cli::parse())) {
        Ok(code) => code,
        Err(e) => {
            match e.downcast_ref::<ClientError>() {
                Some(ClientError::CommandFailed { code, error }) => {
                    eprintln!("error: {code}: {error}");
                }
                _ => eprintln!("error: {e:#}"),
            }
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let credentials = credentials(&cli)?;
    if let Top::Console(args) = cli.command {
        args.check()?;
        let client = connect(&cli.server, &credentials, cli.timeout).await?;
        return console(client, &credentials, args).await;
    }
    let why = matches!(cli.command, Top::Why { .. });
    let plan = plan(cli.command)?;
    let client = connect(&cli.server, &credentials, cli.timeout).await?;
    let (data, shape) = match plan {
        Plan::Send(action) => (client.run(&action.command).await?, action.shape),
        Plan::List(pager) => {
            let listing = pager.listing();
            let data = fetch_pages(&client, pager).await?;
            if !cli.json {
                if let Some(next) = data.get("next").and_then(Value::as_str) {
                    eprintln!(
                        "(more {} after {next}: raise --limit or leave it out to see them all)",
                        listing.field()
                    );
                }
            }
            (data, listing_shape(listing))
        }
        Plan::NewestAudit(pager) => (fetch_pages(&client, pager).await?, Shape::Audit),
        Plan::Call { command, args } => (client.call(&command, args).await?, Shape::Raw),
        Plan::VerifyAudit => {
            let verdict = fetch_pages(&client, ChainCheck::new()).await?;
            return show_verdict(cli.json, &verdict);
        }
        Plan::InteractiveAccept { serial } => (
            accept_interactively(&client, &serial).await?,
            Shape::Station,
        ),
    };
    match why && !cli.json {
        true => std::io::stdout().write_all(fleet_ctl::why::render(&data).as_bytes())?,
        false => show(cli.json, shape, &data)?,
    }
    Ok(ExitCode::SUCCESS)
}

async fn connect(
    server: &str,
    credentials: &Credentials,
    timeout: u64,
) -> anyhow::Result<OperatorClient> {
    let client = OperatorClient::connect(
        server,
        &credentials.ca_pem,
        &credentials.cert_pem,
        &credentials.key_pem,
        &credentials.name,
    )
    .await
    .with_context(|| format!("cannot reach fleetd at {server}"))?;
    Ok(client.with_timeout(Duration::from_secs(timeout)))
}

/// `fleetctl console`: the web console as this operator, hearing its tenant's events.
async fn console(
    client: OperatorClient,
    credentials: &Credentials,
    args: fleet_console::ConsoleArgs,
) -> anyhow::Result<ExitCode> {
    // The tenant is the O of the operator certificate, `default` without one (PROTOCOL §1).
    let tenant = fleet_certs::inspect_pem(&credentials.cert_pem)?
        .organization
        .unwrap_or_else(|| "default".to_owned());
    let events = client.subscribe_events(&tenant).await?;
    let link = std::sync::Arc::new(ConsoleLink(client));
    fleet_console::run(args, link, &tenant, events).await?;
    Ok(ExitCode::SUCCESS)
}

/// The console's way to fleetd: this operator client, with fleetctl's own paging.
struct ConsoleLink(OperatorClient);

fn console_error(error: ClientError) -> fleet_console::FleetdError {
    use fleet_console::FleetdError as E;
    match error {
        ClientError::CommandFailed { code, error } => E::Refused { code, error },
        ClientError::Connection(_)
        | ClientError::Timeout(_)
        | ClientError::Closed
        | ClientError::Refused(_) => E::Unreachable(error.to_string()),
        other => E::Malformed(other.to_string()),
    }
}

impl fleet_console::Fleetd for ConsoleLink {
    fn operator(&self) -> &str {
        self.0.name()
    }

    fn run(&self, command: C) -> fleet_console::Reply<'_, Value> {
        Box::pin(async move { self.0.run(&command).await.map_err(console_error) })
    }

    fn list_all(&self, listing: Listing) -> fleet_console::Reply<'_, Vec<Value>> {
        Box::pin(async move {
            let data = fetch_pages(&self.0, ListPager::new(listing, None))
                .await
                .map_err(console_error)?;
            Ok(data[listing.field()]
                .as_array()
                .cloned()
                .unwrap_or_default())
        })
    }

    fn verify_audit(&self) -> fleet_console::Reply<'_, fleet_console::ChainVerdict> {
        Box::pin(async move {
            let verdict = fetch_pages(&self.0, ChainCheck::new())
                .await
                .map_err(console_error)?;
            Ok(fleet_console::ChainVerdict {
                records: verdict.records,
                unchained: verdict.unchained,
                broken: verdict.broken.map(|b| (b.seq, b.problem)),
            })
        })
    }
}

fn listing_shape(listing: Listing) -> Shape {
    match listing {
        Listing::Stations { .. } | Listing::RejectedStations => Shape::Stations,
        Listing::Phones => Shape::Phones,
    }
}

#[allow(clippy::print_stdout)]
fn show_verdict(json: bool, verdict: &Verdict) -> anyhow::Result<ExitCode> {
    if json {
        let value = match &verdict.broken {
            None => json!({
                "intact": true,
                "records": verdict.records,
                "unchained": verdict.unchained,
            }),
            Some(broken) => json!({
                "intact": false,
                "seq": broken.seq,
                "problem": broken.problem,
                "records": verdict.records,
            }),
        };
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        match &verdict.broken {
            None => {
                println!("audit chain intact: {} records", verdict.records);
                if verdict.unchained > 0 {
                    println!(
                        "(the first {} were stored before audit records were chained and are not covered)",
                        verdict.unchained
                    );
                }
            }
            Some(broken) => println!(
                "audit chain BROKEN at seq {}: {}",
                broken.seq, broken.problem
            ),
        }
    }
    Ok(match verdict.broken {
        None => ExitCode::SUCCESS,
        Some(_) => ExitCode::FAILURE,
    })
}

#[allow(clippy::print_stdout)]
fn show(json: bool, shape: Shape, data: &Value) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(data)?);
    } else {
        print!("{}", table::render(shape, data));
    }
    Ok(())
}

/// The manual's authorize page: show serial, MACs and fingerprint, have the operator type the
/// fingerprint from the station's local admin page, and accept only when they match.
#[allow(clippy::print_stdout)]
async fn accept_interactively(client: &OperatorClient, serial: &Serial) -> anyhow::Result<Value> {
    let get = C::GetStation {
        serial: serial.clone(),
    };
    let station = client.run(&get).await?;
    print!("{}", table::render(Shape::Station, &station));
    let Some(expected) = station.get("fingerprint").and_then(Value::as_str) else {
        bail!("station {serial} has no fingerprint (legacy firmware): update it first");
    };
    print!("Type or paste the fingerprint shown on the station's local admin page: ");
    std::io::stdout().flush()?;
    let mut typed = String::new();
    std::io::stdin().lock().read_line(&mut typed)?;
    if !fingerprint_matches(&typed, expected) {
        bail!("the fingerprint does not match: station {serial} was not accepted");
    }
    let accept = C::AcceptStation {
        serial: serial.clone(),
        fingerprint: arg::fingerprint(expected).map_err(ClientError::from)?,
    };
    Ok(client.run(&accept).await?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_ctl::paging::Pager as _;

    fn parsed(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("fleetctl").chain(args.iter().copied()))
    }

    fn planned(args: &[&str]) -> Plan {
        plan(parsed(args).expect("the arguments parse").command).expect("a plan")
    }

    /// The name and the wire arguments of `command`.
    fn wire(command: &C) -> (&'static str, Value) {
        (command.name().as_str(), Value::Object(command.arguments()))
    }

    /// The command, arguments and shape of a plan that sends one command.
    fn sent(args: &[&str]) -> (&'static str, Value, Shape) {
        match planned(args) {
            Plan::Send(action) => {
                let (command, args) = wire(&action.command);
                (command, args, action.shape)
            }
            other => panic!("{args:?}: not one command but {other:?}"),
        }
    }

    /// The command and first request of a paged list, and how it is shown.
    fn listed(args: &[&str]) -> (&'static str, Value, Shape) {
        match planned(args) {
            Plan::List(pager) => {
                let (command, args) = wire(&pager.request());
                (command, args, listing_shape(pager.listing()))
            }
            other => panic!("{args:?}: not a list but {other:?}"),
        }
    }

    #[test]
    fn lists_page_and_limit_only_when_asked() {
        assert_eq!(
            listed(&["stations", "list"]),
            ("listStations", json!({}), Shape::Stations)
        );
        assert_eq!(
            listed(&["stations", "list", "--state", "running", "--limit", "5"]),
            (
                "listStations",
                json!({"state": "running", "limit": 5}),
                Shape::Stations
            )
        );
        assert_eq!(
            listed(&["stations", "rejected"]),
            ("listRejectedStations", json!({}), Shape::Stations)
        );
        assert_eq!(
            listed(&["stations", "rejected", "--limit", "3"]),
            ("listRejectedStations", json!({"limit": 3}), Shape::Stations)
        );
        assert_eq!(
            listed(&["phones", "list"]),
            ("listPhones", json!({}), Shape::Phones)
        );
        assert_eq!(
            listed(&["phones", "list", "--limit", "9000"]),
            ("listPhones", json!({"limit": MAX_PAGE}), Shape::Phones)
        );
        for args in [
            &["phones", "list", "--limit", "0"][..],
            &["stations", "list", "--limit", "-1"],
            &["stations", "rejected", "--limit", "many"],
            &["audit", "--limit", "0"],
        ] {
            assert!(parsed(args).is_err(), "{args:?}");
        }
    }

    #[test]
    fn audit_pages_only_beyond_one_listauditlog() {
        assert_eq!(sent(&["audit"]), ("listAuditLog", json!({}), Shape::Audit));
        assert_eq!(
            sent(&["audit", "--limit", "500"]),
            ("listAuditLog", json!({"limit": 500}), Shape::Audit)
        );
        match planned(&["audit", "--limit", "501"]) {
            Plan::NewestAudit(pager) => {
                assert_eq!(
                    wire(&pager.request()),
                    ("listAuditLog", json!({"limit": 500}))
                );
            }
            other => panic!("not paged: {other:?}"),
        }
        assert!(matches!(planned(&["audit", "verify"]), Plan::VerifyAudit));
    }

    #[test]
    fn operators_and_blocks() {
        assert_eq!(
            sent(&["operators", "list"]),
            ("listOperators", json!({}), Shape::Operators)
        );
        assert_eq!(
            sent(&["operators", "revoke", "bob"]),
            ("revokeOperator", json!({"name": "bob"}), Shape::Operator)
        );
        assert!(plan(parsed(&["operators", "revoke", " "]).unwrap().command).is_err());
        assert!(parsed(&["operators", "revoke"]).is_err());
        assert_eq!(
            sent(&["blocks", "list"]),
            ("listAddressBlocks", json!({}), Shape::Blocks)
        );
        assert_eq!(
            sent(&["firmware", "list"]),
            ("listFirmware", json!({}), Shape::Firmware)
        );
        assert_eq!(
            sent(&["blocks", "lift", "203.0.113.7"]),
            (
                "liftAddressBlock",
                json!({"address": "203.0.113.7"}),
                Shape::Done
            )
        );
        // Parsed at the edge, sent in its canonical form.
        assert_eq!(
            sent(&["blocks", "lift", "2001:DB8:0::1"]).1,
            json!({"address": "2001:db8::1"})
        );
        for address in ["203.0.113.0/24", "203.0.113.7:8883", "fleet.example", ""] {
            assert!(parsed(&["blocks", "lift", address]).is_err(), "{address}");
        }
    }

    #[test]
    fn whitelist_add_forces_only_when_told() {
        assert_eq!(
            sent(&["whitelist", "add", "203.0.113.0/24"]),
            (
                "addWhitelistEntry",
                json!({"entry": "203.0.113.0/24"}),
                Shape::Done
            )
        );
        assert_eq!(
            sent(&["whitelist", "add", "10.0.0.0/7", "--force"]),
            (
                "addWhitelistEntry",
                json!({"entry": "10.0.0.0/7", "force": true}),
                Shape::Done
            )
        );
    }

    #[test]
    fn console_takes_its_listen_address_and_refuses_other_hosts_unless_told() {
        let console = |args: &[&str]| match parsed(args).map(|cli| cli.command) {
            Ok(Top::Console(args)) => args,
            _ => panic!("{args:?}: not the console"),
        };
        let default = console(&["console"]);
        assert_eq!(default.listen, "127.0.0.1:0".parse().unwrap());
        assert!(!default.open && default.check().is_ok());
        let chosen = console(&["console", "--listen", "127.0.0.1:8080", "--open"]);
        assert_eq!(chosen.listen.port(), 8080);
        assert!(chosen.open);
        assert!(console(&["console", "--listen", "192.0.2.1:80"])
            .check()
            .is_err());
        assert!(console(&[
            "console",
            "--listen",
            "0.0.0.0:80",
            "--insecure-listen-anywhere"
        ])
        .check()
        .is_ok());
        assert!(parsed(&["console", "--listen", "localhost"]).is_err());
        assert!(plan(Top::Console(default)).is_err(), "not a single command");
    }

    #[test]
    fn the_other_commands_are_as_they_were() {
        assert_eq!(
            sent(&["stations", "get", "ST-1"]),
            ("getStation", json!({"serial": "ST-1"}), Shape::Station)
        );
        assert_eq!(
            sent(&["whitelist", "remove", "203.0.113.7"]),
            (
                "removeWhitelistEntry",
                json!({"entry": "203.0.113.7"}),
                Shape::Done
            )
        );
        assert_eq!(
            sent(&["whitelist", "list"]),
            ("listWhitelist", json!({}), Shape::Whitelist)
        );
        assert!(matches!(
            planned(&["stations", "accept", "ST-1"]),
            Plan::InteractiveAccept { serial } if serial.as_str() == "ST-1"
        ));
        assert!(matches!(
            planned(&["call", "getStation", r#"{"serial":"A"}"#]),
            Plan::Call { command, args } if command == "getStation" && args == json!({"serial": "A"})
        ));
    }
}
