//! `fleetctl`: the operator's command line for fleetd (PROTOCOL §8).

mod table;

use std::io::{BufRead as _, Write as _};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};
use fleet_ctl::audit::{ChainBreak, ChainVerifier};
use fleet_ctl::{fingerprint_matches, operator_name, ClientError, OperatorClient};
use serde_json::{json, Value};
use table::Shape;

#[derive(Parser)]
#[command(name = "fleetctl", version, about = "Operate a fleetgate fleet")]
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
    /// Seconds to wait for the answer.
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
    /// The audit log (listAuditLog); `audit verify` checks its hash chain.
    #[command(args_conflicts_with_subcommands = true)]
    Audit {
        /// At most this many records.
        #[arg(long)]
        limit: Option<u64>,
        #[command(subcommand)]
        command: Option<AuditCommand>,
    },
    /// All devices as CSV (exportDevicesCsv).
    ExportCsv,
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
    /// List stations (listStations).
    List {
        /// Only stations in this state (e.g. unauthorized, running).
        #[arg(long)]
        state: Option<String>,
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
    /// List rejected stations (listRejectedStations).
    Rejected,
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
    /// List phones (listPhones).
    List,
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
enum WhitelistCommand {
    /// Add an IP or CIDR range (addWhitelistEntry).
    Add { entry: String },
    /// Remove an entry (removeWhitelistEntry).
    Remove { entry: String },
    /// Show both whitelists (listWhitelist).
    List,
}

/// A command to send and how to show its answer.
struct Action {
    command: &'static str,
    args: Value,
    shape: Shape,
}

fn action(command: &'static str, args: Value, shape: Shape) -> Action {
    Action {
        command,
        args,
        shape,
    }
}

/// Everything validated, nothing done yet.
enum Plan {
    Send(Action),
    /// `stations accept` without `--fingerprint`: look, ask, then send.
    InteractiveAccept {
        serial: String,
    },
    /// `audit verify`: page through the whole audit log.
    VerifyAudit,
    /// `call`: a command name only known at run time.
    Call {
        command: String,
        args: Value,
    },
}

fn plan(command: Top) -> anyhow::Result<Plan> {
    Ok(Plan::Send(match command {
        Top::Stations(command) => match command {
            StationCommand::List { state } => {
                let args = state.map_or_else(|| json!({}), |s| json!({ "state": s }));
                action("listStations", args, Shape::Stations)
            }
            StationCommand::Get { serial } => {
                action("getStation", json!({ "serial": serial }), Shape::Station)
            }
            StationCommand::Accept {
                serial,
                fingerprint: Some(fingerprint),
            } => action(
                "acceptStation",
                json!({ "serial": serial, "fingerprint": fingerprint.trim() }),
                Shape::Station,
            ),
            StationCommand::Accept {
                serial,
                fingerprint: None,
            } => return Ok(Plan::InteractiveAccept { serial }),
            StationCommand::Reject { serial } => {
                action("rejectStation", json!({ "serial": serial }), Shape::Station)
            }
            StationCommand::Rejected => action("listRejectedStations", json!({}), Shape::Stations),
            StationCommand::Clear { serial } => action(
                "clearRejectedStation",
                json!({ "serial": serial }),
                Shape::Done,
            ),
            StationCommand::Update { serial, version } => {
                let mut args = json!({ "serial": serial });
                if let Some(version) = version {
                    args["version"] = json!(version);
                }
                action("startStationUpdate", args, Shape::Station)
            }
            StationCommand::Reset {
                serial,
                delete_authentication,
                delete_configuration,
            } => action(
                "resetStation",
                json!({
                    "serial": serial,
                    "delete_authentication": delete_authentication,
                    "delete_configuration": delete_configuration,
                }),
                Shape::Station,
            ),
            StationCommand::Remove { serial } => {
                action("removeStation", json!({ "serial": serial }), Shape::Done)
            }
        },
        Top::Phones(command) => match command {
            PhoneCommand::Create {
                mac,
                vendor,
                phone_type,
                site,
            } => action(
                "createPhone",
                json!({ "mac": mac, "vendor": vendor, "type": phone_type, "site": site }),
                Shape::Phone,
            ),
            PhoneCommand::List => action("listPhones", json!({}), Shape::Phones),
            PhoneCommand::Get { mac } => action("getPhone", json!({ "mac": mac }), Shape::Phone),
            PhoneCommand::Suspend { mac } => action(
                "suspendPhoneAuthentication",
                json!({ "mac": mac }),
                Shape::Phone,
            ),
            PhoneCommand::ResetAuthentication { mac } => action(
                "resetPhoneAuthentication",
                json!({ "mac": mac }),
                Shape::Phone,
            ),
            PhoneCommand::Delete { mac } => {
                action("deletePhone", json!({ "mac": mac }), Shape::Done)
            }
            PhoneCommand::Import { file } => {
                let csv = std::fs::read_to_string(&file)
                    .with_context(|| format!("cannot read {}", file.display()))?;
                action("importPhonesCsv", json!({ "csv": csv }), Shape::Import)
            }
            PhoneCommand::Export => action("exportDevicesCsv", json!({}), Shape::Csv),
        },
        Top::Whitelist(command) => match command {
            WhitelistCommand::Add { entry } => {
                action("addWhitelistEntry", json!({ "entry": entry }), Shape::Done)
            }
            WhitelistCommand::Remove { entry } => action(
                "removeWhitelistEntry",
                json!({ "entry": entry }),
                Shape::Done,
            ),
            WhitelistCommand::List => action("listWhitelist", json!({}), Shape::Whitelist),
        },
        Top::Audit {
            command: Some(AuditCommand::Verify),
            ..
        } => return Ok(Plan::VerifyAudit),
        Top::Audit {
            limit,
            command: None,
        } => {
            let args = limit.map_or_else(|| json!({}), |l| json!({ "limit": l }));
            action("listAuditLog", args, Shape::Audit)
        }
        Top::ExportCsv => action("exportDevicesCsv", json!({}), Shape::Csv),
        Top::Call { command, args } => {
            let args: Value = serde_json::from_str(&args).context("ARGS must be a JSON object")?;
            if !args.is_object() {
                bail!("ARGS must be a JSON object");
            }
            return Ok(Plan::Call { command, args });
        }
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
    let plan = plan(cli.command)?;
    let client = OperatorClient::connect(
        &cli.server,
        &credentials.ca_pem,
        &credentials.cert_pem,
        &credentials.key_pem,
        &credentials.name,
    )
    .await
    .with_context(|| format!("cannot reach fleetd at {}", cli.server))?
    .with_timeout(Duration::from_secs(cli.timeout));
    let (data, shape) = match plan {
        Plan::Send(action) => (
            client.call(action.command, action.args).await?,
            action.shape,
        ),
        Plan::Call { command, args } => (client.call(&command, args).await?, Shape::Raw),
        Plan::VerifyAudit => {
            let verdict = verify_audit(&client).await?;
            return show_verdict(cli.json, &verdict);
        }
        Plan::InteractiveAccept { serial } => (
            accept_interactively(&client, &serial).await?,
            Shape::Station,
        ),
    };
    show(cli.json, shape, &data)?;
    Ok(ExitCode::SUCCESS)
}

/// Records per `listAuditLog` page of `audit verify`.
const AUDIT_PAGE: u64 = 1000;

/// What `audit verify` found.
struct Verdict {
    /// Records fetched and checked, up to and including a break.
    records: u64,
    /// Leading records from before the chain, not covered by it.
    unchained: u64,
    broken: Option<ChainBreak>,
}

/// Pages through the operator's whole audit log, oldest first, checking the chain as it goes.
async fn verify_audit(client: &OperatorClient) -> anyhow::Result<Verdict> {
    let mut verifier = ChainVerifier::new(None);
    let mut after_seq = 0;
    loop {
        let data = client
            .call(
                "listAuditLog",
                json!({ "after_seq": after_seq, "limit": AUDIT_PAGE }),
            )
            .await?;
        let Some(records) = data.get("records").and_then(Value::as_array) else {
            bail!("listAuditLog answered without a list of records");
        };
        let last_page = (records.len() as u64) < AUDIT_PAGE;
        for record in records {
            // A fleetd that ignores `after_seq` answers every page with the newest records.
            if let Some(seq) = record.get("seq").and_then(Value::as_u64) {
                if seq <= after_seq {
                    bail!(
                        "fleetd answered for records after seq {after_seq} with seq {seq}: \
                         it does not page the audit log (older than this fleetctl?)"
                    );
                }
            }
            if let Err(broken) = verifier.push(record) {
                return Ok(Verdict {
                    records: verifier.records() + 1,
                    unchained: verifier.unchained(),
                    broken: Some(broken),
                });
            }
        }
        // Every listAuditLog is itself audited, so a page is never empty for long: the log ends,
        // for this check, at the first page that is not full.
        match verifier.last_seq() {
            Some(seq) if !last_page => after_seq = seq,
            _ => {
                return Ok(Verdict {
                    records: verifier.records(),
                    unchained: verifier.unchained(),
                    broken: None,
                })
            }
        }
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
async fn accept_interactively(client: &OperatorClient, serial: &str) -> anyhow::Result<Value> {
    let station = client
        .call("getStation", json!({ "serial": serial }))
        .await?;
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
    Ok(client
        .call(
            "acceptStation",
            json!({ "serial": serial, "fingerprint": expected }),
        )
        .await?)
}
