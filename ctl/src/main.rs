//! `fleetctl`: the operator's command line for fleetd (PROTOCOL §8).

mod table;
mod watch;

use std::io::{BufRead as _, IsTerminal as _, Write as _};
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand};
use fleet_ctl::audit::Head;
use fleet_ctl::filter::{self, AuditFilter, PhoneFilter, Since};
use fleet_ctl::paging::{
    fetch_pages, ChainCheck, ListPager, Listing, NewestRecords, Verdict, MAX_PAGE,
};
use fleet_ctl::printable;
use fleet_ctl::{fingerprint_matches, operator_name, ClientError, OperatorClient};
use fleet_protocol::command::arg;
use fleet_protocol::OperatorCommand as C;
use fleet_protocol::{
    FirmwareVersion, IpAddress, PageLimit, PhoneState, Serial, StationState, Text,
};
use serde_json::{json, Value};
use table::{Clock, Shape};

/// The heading of the options every subcommand takes, apart from its own.
const CONNECTION: &str = "Connection and output (every subcommand)";

#[derive(Parser)]
#[command(
    name = "fleetctl",
    version,
    about = "Operate a fleetgate fleet",
    after_help = "Lists are fetched a page at a time, following fleetd's `next`. A page answered \
                  rate_limited is asked again after the wait fleetd names (1 s if it names \
                  none), up to 10 times in a row; one answered too_large is asked again half \
                  as big. Other commands print such errors and exit non-zero.\n\n\
                  Commands that delete or cut (stations reject, reset, remove; phones delete, \
                  reset-authentication) ask before they act when stdin is a terminal; --yes \
                  skips the question. Without a terminal (a script) they act without asking."
)]
struct Cli {
    /// fleetd's address, HOST:PORT.
    #[arg(long, global = true, default_value = "127.0.0.1:8883", help_heading = CONNECTION)]
    server: String,
    /// Fleet CA certificate [default: DATA_DIR/ca.pem].
    #[arg(long, global = true, value_name = "FILE", help_heading = CONNECTION)]
    ca: Option<PathBuf>,
    /// Operator certificate [default: DATA_DIR/admin.pem].
    #[arg(long, global = true, value_name = "FILE", help_heading = CONNECTION)]
    cert: Option<PathBuf>,
    /// Operator private key [default: DATA_DIR/admin.key].
    #[arg(long, global = true, value_name = "FILE", help_heading = CONNECTION)]
    key: Option<PathBuf>,
    /// fleetd's data directory, for the files not given one by one.
    #[arg(long, global = true, default_value = "./fleet-data", help_heading = CONNECTION)]
    data_dir: PathBuf,
    /// Operator name [default: the CN of the certificate].
    #[arg(long, global = true, help_heading = CONNECTION)]
    name: Option<String>,
    /// Print the response data as JSON (`watch`: each event's payload, one a line).
    #[arg(long, global = true, help_heading = CONNECTION)]
    json: bool,
    /// Seconds to wait for the answer (to each page, for lists).
    #[arg(long, global = true, default_value_t = 10, value_name = "SECS", help_heading = CONNECTION)]
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
    /// The audit log (listAuditLog), without operators' connects and read-only commands unless
    /// `--all`; `audit verify` checks its hash chain, `audit head` prints its newest record.
    #[command(
        args_conflicts_with_subcommands = true,
        after_help = "The filters, and the leaving out of operators' connects and reads, are \
                      applied by fleetctl to the newest --limit records (fleetd filters none of \
                      them): raise --limit to look further back."
    )]
    Audit {
        /// Look through the newest this many records, oldest first [default: 500, one
        /// listAuditLog; with --all and no filter fleetd's, 100]. Up to 500 is one request;
        /// above that fleetctl pages back through the log with after_seq until it has them.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        limit: Option<u64>,
        #[command(flatten)]
        filter: AuditArgs,
        #[command(subcommand)]
        command: Option<AuditCommand>,
    },
    /// Follow the tenant's events live (fleet/events/TENANT/…), one line each, until Ctrl-C.
    Watch {
        /// Also the audit records of operators' connects and of read-only commands.
        #[arg(long)]
        all: bool,
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
        /// The command's wire name, e.g. getStation.
        command: String,
        /// A JSON object.
        #[arg(default_value = "{}")]
        args: String,
    },
}

/// The filters of `fleetctl audit`.
#[derive(Args, Debug, Default)]
struct AuditArgs {
    /// Also operators' connects and read-only commands (list…, get…, export…): recorded, but
    /// hidden by default.
    #[arg(long)]
    all: bool,
    /// Only records of this device: a serial or a MAC (in any of its forms).
    #[arg(long, value_name = "SERIAL|MAC")]
    device: Option<String>,
    /// Only records of this actor: an operator name, `station-SERIAL`, an address.
    #[arg(long = "operator", value_name = "ACTOR")]
    actor: Option<String>,
    /// Only records of this action, e.g. acceptStation, connect, auth_request.
    #[arg(long)]
    action: Option<String>,
    /// Only records of this outcome: ok, refused or error.
    #[arg(long, value_parser = filter::outcome)]
    outcome: Option<String>,
    /// Only records from this time on: an RFC 3339 time or a duration back from now (90s, 15m,
    /// 2h, 7d).
    #[arg(long, value_name = "TIME|DURATION")]
    since: Option<Since>,
}

impl AuditArgs {
    fn filter(self, now: time::OffsetDateTime) -> AuditFilter {
        AuditFilter {
            all: self.all,
            device: self.device,
            actor: self.actor,
            action: self.action,
            outcome: self.outcome,
            since: self.since.map(|since| since.at(now)),
        }
    }
}

/// `--yes` of the commands that delete or cut.
#[derive(Args, Debug, Clone, Copy, Default)]
struct Confirm {
    /// Do not ask before acting (asked only when stdin is a terminal).
    #[arg(long, short = 'y')]
    yes: bool,
}

#[derive(Subcommand)]
enum StationCommand {
    /// List stations (listStations), every page; `!` marks a station refused for presenting
    /// another key within the last 24 h.
    List {
        /// Only stations in this state, by its label or JSON name in any case: "Update
        /// Required", Updating, Unsupported, Unauthorized, Running, "Not Running", Rejected.
        #[arg(long, value_parser = filter::station_state)]
        state: Option<StationState>,
        /// Only the first N stations [default: all of them, page after page].
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
        limit: Option<u64>,
    },
    /// Show one station (getStation).
    Get {
        /// The station's serial number.
        serial: String,
    },
    /// Authorize a station (acceptStation) after checking its fingerprint.
    Accept {
        /// The station's serial number.
        serial: String,
        /// The fingerprint shown on the station's local admin page; asked for if absent.
        #[arg(long)]
        fingerprint: Option<String>,
    },
    /// Reject a station (rejectStation): it is cut and refused until cleared.
    Reject {
        /// The station's serial number.
        serial: String,
        #[command(flatten)]
        confirm: Confirm,
    },
    /// List rejected stations (listRejectedStations), every page.
    Rejected {
        /// Only the first N stations [default: all of them, page after page].
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
        limit: Option<u64>,
    },
    /// Clear a rejected station so it may ask again (clearRejectedStation).
    Clear {
        /// The station's serial number.
        serial: String,
    },
    /// Start a firmware update (startStationUpdate).
    Update {
        /// The station's serial number.
        serial: String,
        /// Version to install [default: the latest].
        #[arg(long)]
        version: Option<String>,
    },
    /// Reset Device (resetStation): the station is sent `reset` and cut.
    Reset {
        /// The station's serial number.
        serial: String,
        /// Unpin the station's key: it is Unauthorized again and must be accepted anew.
        #[arg(long)]
        delete_authentication: bool,
        /// Have the station delete its configuration (it stays authorized unless
        /// --delete-authentication).
        #[arg(long)]
        delete_configuration: bool,
        #[command(flatten)]
        confirm: Confirm,
    },
    /// Remove Device (removeStation): the record is deleted, the station cut.
    Remove {
        /// The station's serial number.
        serial: String,
        #[command(flatten)]
        confirm: Confirm,
    },
}

#[derive(Subcommand)]
enum PhoneCommand {
    /// Create a phone (createPhone); shows its PAP.
    Create {
        /// The phone's MAC: aabbccddee01, AA:BB:CC:DD:EE:01 or aa-bb-….
        mac: String,
        /// The phone's vendor, e.g. Yealink.
        #[arg(long)]
        vendor: String,
        /// The phone's type (model), e.g. T54W.
        #[arg(long = "type")]
        phone_type: String,
        /// Where the phone is, e.g. Berlin.
        #[arg(long, default_value = "")]
        site: String,
    },
    /// List phones (listPhones), every page; lockouts and suspensions are noted under the table.
    List {
        /// Only phones in this state: its label or JSON name in any case, or needed, failed,
        /// blocked, successful.
        #[arg(long, value_parser = filter::phone_state)]
        state: Option<PhoneState>,
        /// Only phones of this site (in any case).
        #[arg(long)]
        site: Option<String>,
        /// Only phones of this vendor (in any case).
        #[arg(long)]
        vendor: Option<String>,
        /// Only the first N phones [default: all of them, page after page].
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
        limit: Option<u64>,
    },
    /// Show one phone (getPhone).
    Get {
        /// The phone's MAC, in any of its forms.
        mac: String,
    },
    /// Suspend Authentication (suspendPhoneAuthentication): no PAP needed for 30 minutes.
    Suspend {
        /// The phone's MAC, in any of its forms.
        mac: String,
    },
    /// Reset Authentication: a new PAP, the old PAP and certificate void at once
    /// (resetPhoneAuthentication).
    ResetAuthentication {
        /// The phone's MAC, in any of its forms.
        mac: String,
        #[command(flatten)]
        confirm: Confirm,
    },
    /// Delete a phone (deletePhone).
    Delete {
        /// The phone's MAC, in any of its forms.
        mac: String,
        #[command(flatten)]
        confirm: Confirm,
    },
    /// Import phones from a CSV file (importPhonesCsv); exits non-zero if any line is refused.
    Import {
        /// A CSV file with the columns vendor, type, mac and optionally site, delimited by `,`
        /// or `;`.
        file: PathBuf,
    },
    /// All devices as CSV on stdout (exportDevicesCsv): `fleetctl phones export > devices.csv`.
    Export,
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Fetch the tenant's whole audit log and check its hash chain; exits non-zero if broken.
    Verify {
        /// A head printed by `fleetctl audit head` earlier, SEQ:HASH: its record must still
        /// be in the chain with that hash, so that deleted newest records are noticed.
        #[arg(long, value_name = "SEQ:HASH")]
        head: Option<Head>,
    },
    /// Print the newest record's SEQ:HASH of the tenant's chain, to keep somewhere else and
    /// give to `audit verify --head` later.
    Head,
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
        /// An IPv4 or IPv6 address or CIDR range, e.g. 203.0.113.0/24.
        entry: String,
        /// Add a range broader than fleetd's minimum prefix (the whole Internet is refused
        /// even so).
        #[arg(long)]
        force: bool,
    },
    /// Remove an entry (removeWhitelistEntry).
    Remove {
        /// The entry as `whitelist list` shows it.
        entry: String,
    },
    /// Show both whitelists (listWhitelist).
    List,
}

#[derive(Subcommand)]
enum OperatorCommand {
    /// List the tenant's operators (listOperators).
    List,
    /// Revoke an operator's certificate (revokeOperator): fleetd admits it no more.
    Revoke {
        /// The operator's name, as `operators list` shows it.
        name: String,
    },
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
    /// The question to ask first (a command that deletes or cuts, without `--yes`).
    confirm: Option<String>,
}

fn action(command: C, shape: Shape) -> Action {
    Action {
        command,
        shape,
        confirm: None,
    }
}

/// An action that deletes or cuts: `question` is asked first, unless `--yes`.
fn destructive(command: C, shape: Shape, confirm: Confirm, question: String) -> Action {
    Action {
        confirm: (!confirm.yes).then_some(question),
        ..action(command, shape)
    }
}

/// How `fleetctl audit` fetches its records.
#[derive(Debug)]
enum AuditFetch {
    /// One listAuditLog.
    One(C),
    /// `--limit` above one page: page back through the audit log.
    Newest(NewestRecords),
}

/// Everything validated, nothing done yet.
#[derive(Debug)]
enum Plan {
    Send(Action),
    /// A list command, page after page.
    List(ListPager),
    /// `audit`: the newest records, filtered here.
    Audit {
        fetch: AuditFetch,
        filter: AuditArgs,
    },
    /// `stations accept` without `--fingerprint`: look, ask, then send.
    InteractiveAccept {
        serial: Serial,
    },
    /// `audit verify`: page through the whole audit log, finding `head` in it if given.
    VerifyAudit {
        head: Option<Head>,
    },
    /// `audit head`: the newest record's seq and hash.
    AuditHead,
    /// `phones suspend`: read the phone, suspend, say what changed.
    Suspend {
        mac: fleet_protocol::Mac,
    },
    /// `phones import`; `semicolons` when the file was read as `;`-delimited.
    Import {
        command: C,
        semicolons: bool,
    },
    /// `watch`: the tenant's events until Ctrl-C.
    Watch {
        all: bool,
    },
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
            command: Some(AuditCommand::Verify { head }),
            ..
        } => return Ok(Plan::VerifyAudit { head }),
        Top::Audit {
            command: Some(AuditCommand::Head),
            ..
        } => return Ok(Plan::AuditHead),
        Top::Audit {
            limit,
            filter,
            command: None,
        } => {
            // Records are left out (always, unless --all without filters): look through a
            // whole page, not fleetd's default 100, so that what is left is worth reading.
            let hides = !filter.all
                || filter.device.is_some()
                || filter.actor.is_some()
                || filter.action.is_some()
                || filter.outcome.is_some()
                || filter.since.is_some();
            let limit = limit.or(hides.then_some(MAX_PAGE));
            let fetch = match limit {
                Some(limit) if limit > MAX_PAGE => AuditFetch::Newest(NewestRecords::new(limit)),
                limit => AuditFetch::One(C::ListAuditLog {
                    limit: limit
                        .map(PageLimit::new)
                        .transpose()
                        .map_err(ClientError::from)?,
                    after_seq: None,
                }),
            };
            return Ok(Plan::Audit { fetch, filter });
        }
        Top::Watch { all } => return Ok(Plan::Watch { all }),
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
        StationCommand::Reject { serial: s, confirm } => {
            let serial = serial(&s)?;
            let question = format!(
                "Reject station {serial}? It is cut and refused until cleared (stations clear)."
            );
            destructive(
                C::RejectStation { serial },
                Shape::Station,
                confirm,
                question,
            )
        }
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
            confirm,
        } => {
            let serial = serial(&s)?;
            let question = format!(
                "Reset station {serial}{}? It is sent `reset` and cut.",
                match (delete_authentication, delete_configuration) {
                    (true, true) => ", deleting its authentication and configuration",
                    (true, false) => ", deleting its authentication",
                    (false, true) => ", deleting its configuration",
                    (false, false) => "",
                }
            );
            let command = C::ResetStation {
                serial,
                delete_authentication,
                delete_configuration,
            };
            destructive(command, Shape::Station, confirm, question)
        }
        StationCommand::Remove { serial: s, confirm } => {
            let serial = serial(&s)?;
            let question = format!("Remove station {serial}? Its record is deleted and it is cut.");
            destructive(C::RemoveStation { serial }, Shape::Done, confirm, question)
        }
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
        PhoneCommand::List {
            state,
            site,
            vendor,
            limit,
        } => {
            let filter = PhoneFilter {
                state,
                site,
                vendor,
            };
            let pager = ListPager::new(Listing::Phones, limit).filtered(filter);
            return Ok(Plan::List(pager));
        }
        PhoneCommand::Get { mac: m } => action(C::GetPhone { mac: mac(&m)? }, Shape::Phone),
        PhoneCommand::Suspend { mac: m } => return Ok(Plan::Suspend { mac: mac(&m)? }),
        PhoneCommand::ResetAuthentication { mac: m, confirm } => {
            let mac = mac(&m)?;
            let question = format!(
                "Reset the authentication of phone {mac}? Its PAP and certificate are void at \
                 once and its session is cut."
            );
            let command = C::ResetPhoneAuthentication { mac };
            destructive(command, Shape::Phone, confirm, question)
        }
        PhoneCommand::Delete { mac: m, confirm } => {
            let mac = mac(&m)?;
            let question = format!("Delete phone {mac}? Its certificate is void at once.");
            destructive(C::DeletePhone { mac }, Shape::Done, confirm, question)
        }
        PhoneCommand::Import { file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let (csv, semicolons) = comma_delimited(&text)
                .with_context(|| format!("cannot read {} as CSV", file.display()))?;
            let command = C::ImportPhonesCsv { csv };
            return Ok(Plan::Import {
                command,
                semicolons,
            });
        }
        PhoneCommand::Export => action(C::ExportDevicesCsv, Shape::Csv),
    }))
}

/// A phones CSV as fleetd reads it, `,`-delimited: a file whose header line has more `;` than
/// `,` (a German spreadsheet's export) is read as `;`-delimited and written again with `,`,
/// quoting as needed; true then.
fn comma_delimited(text: &str) -> anyhow::Result<(String, bool)> {
    let header = text.lines().next().unwrap_or("");
    if header.matches(';').count() <= header.matches(',').count() {
        return Ok((text.to_owned(), false));
    }
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(b';')
        .has_headers(false)
        .flexible(true)
        .from_reader(text.as_bytes());
    let mut writer = csv::WriterBuilder::new()
        .flexible(true)
        .from_writer(Vec::new());
    for (at, record) in reader.records().enumerate() {
        let record = record.with_context(|| format!("line {}", at + 1))?;
        writer.write_record(&record)?;
    }
    let bytes = writer.into_inner().context("writing the CSV")?;
    Ok((String::from_utf8(bytes)?, true))
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
    // Before the runtime's threads: the local offset can only be read while there is one.
    let clock = Clock::of_this_machine();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(Cli::parse(), clock)) {
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

/// The tenant of an operator certificate: its O, `default` without one (PROTOCOL §1).
fn tenant_of(credentials: &Credentials) -> anyhow::Result<String> {
    Ok(fleet_certs::inspect_pem(&credentials.cert_pem)?
        .organization
        .unwrap_or_else(|| "default".to_owned()))
}

async fn run(cli: Cli, clock: Clock) -> anyhow::Result<ExitCode> {
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
        Plan::Send(action) => {
            if let Some(question) = &action.confirm {
                if !confirmed(question)? {
                    eprintln!("not confirmed: nothing was changed");
                    return Ok(ExitCode::FAILURE);
                }
            }
            (client.run(&action.command).await?, action.shape)
        }
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
        Plan::Audit { fetch, filter } => {
            let data = match fetch {
                AuditFetch::One(command) => client.run(&command).await?,
                AuditFetch::Newest(pager) => fetch_pages(&client, pager).await?,
            };
            let (data, hidden) = filtered_audit(data, &filter.filter(clock.now));
            if !cli.json && hidden > 0 {
                eprintln!("({hidden} of the newest records not shown: filtered, or operators' connects and read-only commands without --all)");
            }
            (data, Shape::Audit)
        }
        Plan::Call { command, args } => (client.call(&command, args).await?, Shape::Raw),
        Plan::VerifyAudit { head } => {
            let remembered = head.as_ref().map(|head| head.seq);
            let check = match head {
                Some(head) => ChainCheck::with_head(head),
                None => ChainCheck::new(),
            };
            let verdict = fetch_pages(&client, check).await?;
            return show_verdict(cli.json, &verdict, remembered);
        }
        Plan::AuditHead => return audit_head(&client, cli.json).await,
        Plan::InteractiveAccept { serial } => (
            accept_interactively(&client, &serial).await?,
            Shape::Station,
        ),
        Plan::Suspend { mac } => return suspend(&client, mac, cli.json, &clock).await,
        Plan::Import {
            command,
            semicolons,
        } => {
            if semicolons {
                eprintln!("(read as `;`-delimited, sent to fleetd `,`-delimited)");
            }
            let data = client.run(&command).await?;
            show(cli.json, Shape::Import, &data, &clock)?;
            let refused = data
                .get("errors")
                .and_then(Value::as_array)
                .map_or(0, Vec::len);
            return Ok(if refused == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
        Plan::Watch { all } => {
            let tenant = tenant_of(&credentials)?;
            let events = client.subscribe_events(&tenant).await?;
            eprintln!("watching the events of tenant {tenant} (Ctrl-C ends)");
            watch::follow(events, all, cli.json, clock.offset).await?;
            return Ok(ExitCode::SUCCESS);
        }
    };
    match why && !cli.json {
        true => {
            std::io::stdout().write_all(printable(&fleet_ctl::why::render(&data)).as_bytes())?
        }
        false => show(cli.json, shape, &data, &clock)?,
    }
    Ok(ExitCode::SUCCESS)
}

/// The records of a listAuditLog answer that `filter` lets through, and how many it did not.
fn filtered_audit(mut data: Value, filter: &AuditFilter) -> (Value, usize) {
    let mut hidden = 0;
    if let Some(Value::Array(records)) = data.get_mut("records") {
        let before = records.len();
        records.retain(|record| filter.matches(record));
        hidden = before - records.len();
    }
    (data, hidden)
}

/// Asks `question` on the terminal; true for yes. Without a terminal on stdin (a script) it
/// asks nothing and says yes, as fleetctl did before it asked at all.
fn confirmed(question: &str) -> anyhow::Result<bool> {
    if !std::io::stdin().is_terminal() {
        return Ok(true);
    }
    eprint!("{question} [y/N] ");
    std::io::stderr().flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    Ok(is_yes(&answer))
}

/// Whether an answer to a question is yes: `y` or `yes`, in any case.
fn is_yes(answer: &str) -> bool {
    matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes")
}

/// `audit head`: the newest record of the operator's chain, as SEQ:HASH.
#[allow(clippy::print_stdout)]
async fn audit_head(client: &OperatorClient, json: bool) -> anyhow::Result<ExitCode> {
    let newest = C::ListAuditLog {
        limit: Some(PageLimit::saturating(1)),
        after_seq: None,
    };
    let data = client.run(&newest).await?;
    let record = data
        .get("records")
        .and_then(Value::as_array)
        .and_then(|records| records.last())
        .context("the audit log has no records yet")?;
    let head = Head::of(record).with_context(|| {
        format!("the newest record has no hash (stored before the chain existed): {record}")
    })?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"seq": head.seq, "hash": head.hash}))?
        );
    } else {
        println!("{head}");
    }
    Ok(ExitCode::SUCCESS)
}

/// `phones suspend`: what the suspension changed, read from the phone before and after.
#[allow(clippy::print_stdout)]
async fn suspend(
    client: &OperatorClient,
    mac: fleet_protocol::Mac,
    json: bool,
    clock: &Clock,
) -> anyhow::Result<ExitCode> {
    let before = client.run(&C::GetPhone { mac: mac.clone() }).await?;
    let after = client
        .run(&C::SuspendPhoneAuthentication { mac: mac.clone() })
        .await?;
    if json {
        show(json, Shape::Phone, &after, clock)?;
    } else {
        print!("{}", printable(&table::suspension(&before, &after, clock)));
        print!("{}", printable(&table::render(Shape::Phone, &after, clock)));
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
    let tenant = tenant_of(credentials)?;
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
fn show_verdict(json: bool, verdict: &Verdict, head: Option<u64>) -> anyhow::Result<ExitCode> {
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
                if let Some(seq) = head {
                    println!("(the remembered head, seq {seq}, is in it)");
                }
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
fn show(json: bool, shape: Shape, data: &Value, clock: &Clock) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(data)?);
    } else {
        print!("{}", printable(&table::render(shape, data, clock)));
    }
    Ok(())
}

/// The manual's authorize page: show serial and MACs (not the fingerprint, which the operator
/// must read on the station itself, not copy from here), ask for the fingerprint shown on the
/// station's local admin page, and accept only when it is the key the station presented.
#[allow(clippy::print_stdout)]
async fn accept_interactively(client: &OperatorClient, serial: &Serial) -> anyhow::Result<Value> {
    let get = C::GetStation {
        serial: serial.clone(),
    };
    let station = client.run(&get).await?;
    print!("{}", printable(&table::station_to_accept(&station)));
    let Some(expected) = station.get("fingerprint").and_then(Value::as_str) else {
        bail!("station {serial} has no fingerprint (legacy firmware): update it first");
    };
    print!("Type or paste the fingerprint shown on the station's local admin page: ");
    std::io::stdout().flush()?;
    let mut typed = String::new();
    std::io::stdin().lock().read_line(&mut typed)?;
    if let Some(refusal) = fingerprint_refusal(&typed, expected, serial) {
        bail!(refusal);
    }
    let accept = C::AcceptStation {
        serial: serial.clone(),
        fingerprint: arg::fingerprint(expected).map_err(ClientError::from)?,
    };
    Ok(client.run(&accept).await?)
}

/// Why the fingerprint the operator typed is not accepted for `serial`, or `None` when it is
/// `expected` (case, colons and spaces aside).
fn fingerprint_refusal(typed: &str, expected: &str, serial: &Serial) -> Option<String> {
    let digits = typed
        .chars()
        .filter(|c| !(matches!(c, ':' | '-') || c.is_whitespace()))
        .count();
    if typed.trim().is_empty() {
        return Some(format!(
            "no fingerprint typed: station {serial} was not accepted"
        ));
    }
    if digits != 64
        || !typed
            .chars()
            .all(|c| c.is_ascii_hexdigit() || matches!(c, ':' | '-') || c.is_whitespace())
    {
        return Some(format!(
            "that is not a fingerprint (64 hex digits, colons optional): station {serial} was \
             not accepted"
        ));
    }
    (!fingerprint_matches(typed, expected)).then(|| {
        format!(
            "the fingerprint typed is not the one of the key station {serial} presented: it was \
             not accepted. Read it again on the station's own admin page; if the station shows \
             another one, the device asking as {serial} may not be that station."
        )
    })
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

    /// The first request of `audit …` and its filter.
    fn audited(args: &[&str]) -> ((&'static str, Value), AuditArgs) {
        match planned(args) {
            Plan::Audit {
                fetch: AuditFetch::One(command),
                filter,
            } => (wire(&command), filter),
            Plan::Audit {
                fetch: AuditFetch::Newest(pager),
                filter,
            } => (wire(&pager.request()), filter),
            other => panic!("{args:?}: not the audit log but {other:?}"),
        }
    }

    #[test]
    fn audit_pages_only_beyond_one_listauditlog() {
        // Without --all a page is looked through, since records are left out.
        assert_eq!(
            audited(&["audit"]).0,
            ("listAuditLog", json!({"limit": 500}))
        );
        assert_eq!(audited(&["audit", "--all"]).0, ("listAuditLog", json!({})));
        assert_eq!(
            audited(&["audit", "--all", "--device", "ST-1"]).0,
            ("listAuditLog", json!({"limit": 500}))
        );
        assert_eq!(
            audited(&["audit", "--limit", "20"]).0,
            ("listAuditLog", json!({"limit": 20}))
        );
        assert_eq!(
            audited(&["audit", "--limit", "500"]).0,
            ("listAuditLog", json!({"limit": 500}))
        );
        assert!(matches!(
            planned(&["audit", "--limit", "501"]),
            Plan::Audit {
                fetch: AuditFetch::Newest(_),
                ..
            }
        ));
        assert_eq!(
            audited(&["audit", "--limit", "501"]).0,
            ("listAuditLog", json!({"limit": 500}))
        );
        assert!(matches!(
            planned(&["audit", "verify"]),
            Plan::VerifyAudit { head: None }
        ));
        assert!(matches!(planned(&["audit", "head"]), Plan::AuditHead));
        let head = format!("12:{}", "ab".repeat(32));
        assert!(matches!(
            planned(&["audit", "verify", "--head", &head]),
            Plan::VerifyAudit {
                head: Some(Head { seq: 12, .. })
            }
        ));
        assert!(parsed(&["audit", "verify", "--head", "12"]).is_err());
    }

    #[test]
    fn audit_filters_are_parsed_and_resolved() {
        let (_, args) = audited(&[
            "audit",
            "--device",
            "ST-1",
            "--operator",
            "bob",
            "--action",
            "rejectStation",
            "--outcome",
            "Refused",
            "--since",
            "2h",
            "--all",
        ]);
        let now = time::macros::datetime!(2026-05-01 12:00:00 UTC);
        let filter = args.filter(now);
        assert_eq!(
            filter,
            AuditFilter {
                all: true,
                device: Some("ST-1".into()),
                actor: Some("bob".into()),
                action: Some("rejectStation".into()),
                outcome: Some("refused".into()),
                since: Some(time::macros::datetime!(2026-05-01 10:00:00 UTC)),
            }
        );
        assert!(!audited(&["audit"]).1.filter(now).all);
        for wrong in [
            &["audit", "--outcome", "failed"][..],
            &["audit", "--since", "yesterday"],
        ] {
            let error = parsed(wrong).err().expect("refused").to_string();
            assert!(
                error.contains("one of") || error.contains("RFC 3339"),
                "{error}"
            );
        }
        let data = json!({"records": [
            {"action": "listPhones", "outcome": "ok"},
            {"action": "rejectStation", "outcome": "ok", "device": "ST-1"},
        ]});
        let (shown, hidden) = filtered_audit(data, &AuditFilter::default());
        assert_eq!(hidden, 1);
        assert_eq!(shown["records"][0]["action"], "rejectStation");
    }

    #[test]
    fn station_states_are_the_manuals_names_in_any_case() {
        for state in ["Not Running", "not running", "not_running", "NOT-RUNNING"] {
            assert_eq!(
                listed(&["stations", "list", "--state", state]).1,
                json!({"state": "not_running"}),
                "{state}"
            );
        }
        let error = parsed(&["stations", "list", "--state", "offline"])
            .err()
            .expect("refused")
            .to_string();
        for label in ["\"Update Required\"", "\"Not Running\"", "\"Unauthorized\""] {
            assert!(error.contains(label), "{error}");
        }
    }

    #[test]
    fn phones_list_filters_client_side() {
        // Nothing of the filter reaches fleetd, which has none.
        assert_eq!(
            listed(&[
                "phones", "list", "--state", "failed", "--site", "Berlin", "--vendor", "Snom"
            ]),
            ("listPhones", json!({}), Shape::Phones)
        );
        assert!(parsed(&["phones", "list", "--state", "locked"]).is_err());
    }

    /// The question a planned command asks first.
    fn question(args: &[&str]) -> Option<String> {
        match planned(args) {
            Plan::Send(action) => action.confirm,
            other => panic!("{args:?}: not one command but {other:?}"),
        }
    }

    #[test]
    fn destructive_commands_ask_unless_yes() {
        for args in [
            &["stations", "reject", "ST-1"][..],
            &["stations", "reset", "ST-1", "--delete-authentication"],
            &["stations", "remove", "ST-1"],
            &["phones", "delete", "aabbccddee01"],
            &["phones", "reset-authentication", "aabbccddee01"],
        ] {
            let asked = question(args).unwrap_or_else(|| panic!("{args:?} asks nothing"));
            assert!(asked.contains(args[2]), "{asked}");
            let yes: Vec<&str> = args.iter().copied().chain(["--yes"]).collect();
            assert_eq!(question(&yes), None, "{yes:?}");
            let y: Vec<&str> = args.iter().copied().chain(["-y"]).collect();
            assert_eq!(question(&y), None, "{y:?}");
        }
        assert!(
            question(&["stations", "reset", "ST-1", "--delete-authentication"])
                .unwrap()
                .contains("deleting its authentication")
        );
        for args in [
            &["stations", "clear", "ST-1"][..],
            &["phones", "get", "aabbccddee01"],
        ] {
            assert_eq!(question(args), None, "{args:?}");
        }
        assert!(is_yes("y\n") && is_yes(" YES ") && !is_yes("") && !is_yes("no"));
    }

    #[test]
    fn a_typed_fingerprint_is_compared_and_a_wrong_one_explained() {
        let serial = fleet_ctl_test_serial();
        let expected = ["AB"; 32].join(":");
        assert_eq!(
            fingerprint_refusal(&"ab".repeat(32), &expected, &serial),
            None
        );
        let other = format!("{}CD", "AB".repeat(31));
        let wrong = fingerprint_refusal(&other, &expected, &serial).unwrap();
        assert!(
            wrong.contains("not the one of the key station ST-1 presented"),
            "{wrong}"
        );
        assert!(
            !wrong.contains(&expected),
            "the expected one is never shown: {wrong}"
        );
        assert!(fingerprint_refusal("\n", &expected, &serial)
            .unwrap()
            .starts_with("no fingerprint typed"));
        assert!(fingerprint_refusal("ST-1", &expected, &serial)
            .unwrap()
            .starts_with("that is not a fingerprint"));
    }

    fn fleet_ctl_test_serial() -> Serial {
        arg::serial("ST-1").unwrap()
    }

    #[test]
    fn semicolon_csv_is_read_and_sent_comma_delimited() {
        let german = "vendor;type;mac;site\nYealink;T54W;aabbccddee01;\"K\u{f6}ln, Dom\"\n";
        let (csv, converted) = comma_delimited(german).unwrap();
        assert!(converted);
        assert_eq!(
            csv,
            "vendor,type,mac,site\nYealink,T54W,aabbccddee01,\"K\u{f6}ln, Dom\"\n"
        );
        let comma = "vendor,type,mac\nYealink,T54W,aabbccddee01\n";
        assert_eq!(comma_delimited(comma).unwrap(), (comma.to_owned(), false));
    }

    #[test]
    fn every_argument_has_a_help_text() {
        let missing = fleet_ctl::undocumented(&<Cli as clap::CommandFactory>::command());
        assert!(missing.is_empty(), "without help: {missing:#?}");
    }

    #[test]
    fn subcommand_help_sets_the_connection_options_apart() {
        let mut cli = <Cli as clap::CommandFactory>::command();
        cli.build();
        let stations = cli.find_subcommand_mut("stations").unwrap();
        let reset = stations.find_subcommand_mut("reset").unwrap();
        let help = reset.render_help().to_string();
        let own = help
            .find("--delete-authentication")
            .expect("its own option");
        let heading = help.find(CONNECTION).expect("the connection heading");
        let server = help.find("--server").expect("the global option");
        assert!(own < heading && heading < server, "{help}");
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
