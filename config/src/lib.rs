//! fleetgate's configuration: one TOML file, every key documented, every key optional.
//!
//! Unknown keys are errors that name the key, so a typo never silently falls back to a
//! default. [`load`] reads and checks a file; [`EXAMPLE`] is a commented file with every key
//! at its default.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The whole configuration file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `[server]`: the listener, the data directory and connection limits.
    pub server: ServerConfig,
    /// `[stations]`: firmware versions that decide a station's state.
    pub stations: StationsConfig,
    /// `[firmware]`: the firmware catalog and transfer.
    pub firmware: FirmwareConfig,
    /// `[phones]`: PAP, lockout and whitelist rules.
    pub phones: PhonesConfig,
    /// `[limits]`: payload sizes, rates and the most of each resource one client may hold.
    pub limits: LimitsConfig,
    /// `[log]`: what fleetd writes to its log.
    pub log: LogConfig,
    /// `[metrics]`: the Prometheus endpoint, off unless `listen` is set.
    pub metrics: MetricsConfig,
    /// `[store]`: where the controller keeps its state; the redb file in `data_dir` unless
    /// `url` names a PostgreSQL database.
    pub store: StoreConfig,
    /// `[cluster]`: what this fleetd is in a cluster (an edge, a controller, or both), its node
    /// name and the NATS servers of the bus; by default a single process and no cluster.
    pub cluster: ClusterConfig,
}

/// `[server]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// `listen`: address and port of the one MQTT-over-TLS listener. Default `0.0.0.0:8883`.
    pub listen: SocketAddr,
    /// `data_dir`: directory of the fleet CA, the server and admin certificates and the
    /// database. Default `./fleet-data`.
    pub data_dir: PathBuf,
    /// `server_names`: extra DNS names or IP addresses for the server certificate, besides
    /// `localhost`, `127.0.0.1`, `::1` and the host name. Default none.
    pub server_names: Vec<String>,
    /// `max_connections`: most clients connected at once; a CONNECT above it is refused with
    /// "server unavailable" (3.1.1) or "quota exceeded" (5). Default 15000.
    pub max_connections: u32,
    /// `handshake_timeout_ms`: a TLS handshake must finish within this. Default 30000: as long
    /// as a station waits for its connection (a server that gave up sooner would throw away,
    /// in a reboot storm, handshakes its stations would still finish).
    pub handshake_timeout_ms: u64,
    /// `connect_timeout_ms`: after the TLS handshake, CONNECT must arrive within this.
    /// Default 10000.
    pub connect_timeout_ms: u64,
    /// `max_packet_size`: largest MQTT packet in bytes; a larger one closes the connection.
    /// Default 262144.
    pub max_packet_size: usize,
    /// `idle_timeout_secs`: a client that asks for keepalive 0 is disconnected after this
    /// long without a packet. Default 300.
    pub idle_timeout_secs: u64,
    /// `cut_grace_ms`: how long a station that is cut off gets to receive its final `cmd`
    /// before the connection closes. Default 500.
    pub cut_grace_ms: u64,
    /// `write_timeout_ms`: a write to a client that does not finish in this time (a client that
    /// stopped reading) ends its session. Default 30000.
    pub write_timeout_ms: u64,
    /// `manufacturer_cas`: PEM files of CAs trusted to issue station certificates.
    /// Default none.
    pub manufacturer_cas: Vec<PathBuf>,
    /// `allow_self_signed_stations`: accept station certificates that are self-signed.
    /// Default true.
    pub allow_self_signed_stations: bool,
    /// `handshake_threads`: threads that open connections (TLS handshake, CONNECT, admission)
    /// apart from the threads that run established sessions and the controller, so that a
    /// connect storm does not delay them; 0 opens connections on the sessions' threads.
    /// Default 2, at most [`MAX_HANDSHAKE_THREADS`].
    pub handshake_threads: u32,
}

/// `server.handshake_threads` at most.
pub const MAX_HANDSHAKE_THREADS: u32 = 256;

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 8883)),
            data_dir: PathBuf::from("./fleet-data"),
            server_names: Vec::new(),
            max_connections: 15_000,
            handshake_timeout_ms: 30_000,
            connect_timeout_ms: 10_000,
            max_packet_size: 262_144,
            idle_timeout_secs: 300,
            cut_grace_ms: 500,
            write_timeout_ms: 30_000,
            manufacturer_cas: Vec::new(),
            allow_self_signed_stations: true,
            handshake_threads: 2,
        }
    }
}

impl ServerConfig {
    /// `handshake_timeout_ms` as a duration.
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms)
    }

    /// `connect_timeout_ms` as a duration.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    /// `idle_timeout_secs` as a duration.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs)
    }

    /// `cut_grace_ms` as a duration.
    pub fn cut_grace(&self) -> Duration {
        Duration::from_millis(self.cut_grace_ms)
    }

    /// `write_timeout_ms` as a duration.
    pub fn write_timeout(&self) -> Duration {
        Duration::from_millis(self.write_timeout_ms)
    }
}

/// `[stations]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StationsConfig {
    /// `min_firmware`: the first firmware that owns a key pair and may be authorized.
    /// Default `6.1.0`.
    pub min_firmware: String,
    /// `update_from`: the lowest firmware that can be updated; from it up to below
    /// `min_firmware` a station is Update Required, below it Unsupported. Default `6.0.2`.
    pub update_from: String,
}

impl Default for StationsConfig {
    fn default() -> Self {
        StationsConfig {
            min_firmware: "6.1.0".to_owned(),
            update_from: "6.0.2".to_owned(),
        }
    }
}

/// `[firmware]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FirmwareConfig {
    /// `chunk_size`: bytes of firmware image per transfer message. Default 16384.
    pub chunk_size: usize,
    /// `[[firmware.images]]`: the firmware catalog. Default empty.
    pub images: Vec<FirmwareImage>,
}

impl Default for FirmwareConfig {
    fn default() -> Self {
        FirmwareConfig {
            chunk_size: 16_384,
            images: Vec::new(),
        }
    }
}

/// One `[[firmware.images]]` entry. `version` and `file` are required.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FirmwareImage {
    /// `version`: the firmware version of the image, e.g. `6.1.0`.
    pub version: String,
    /// `file`: path of the image file; a relative path is relative to the working directory.
    pub file: PathBuf,
    /// `sha256`: SHA-256 of the image as 64 hex digits. Optional: if absent it is computed at
    /// start; if present the image is checked against it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

/// `[phones]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PhonesConfig {
    /// `pap_attempts`: consecutive wrong PAPs that lock a phone out. Default 3.
    pub pap_attempts: u32,
    /// `lockout_minutes`: how long a lockout (Authentication failed) lasts. Default 30.
    pub lockout_minutes: u64,
    /// `lockouts_before_block`: lockouts without a success before the phone is blocked for
    /// good. Default 3.
    pub lockouts_before_block: u32,
    /// `temporary_whitelist_hours`: how long a correct PAP or a provisioning keeps the
    /// client's IP on the tenant's temporary whitelist. Default 8.
    pub temporary_whitelist_hours: u64,
    /// `suspend_minutes`: how long Suspend Authentication lasts. Default 30.
    pub suspend_minutes: u64,
    /// `min_whitelist_prefix_v4`: an operator's permanent IPv4 whitelist range with a shorter
    /// prefix than this is refused unless the operator forces it (a typo such as `/4` for `/24`
    /// would spare a large part of the Internet the PAP). At most 32. Default 8.
    pub min_whitelist_prefix_v4: u8,
    /// `min_whitelist_prefix_v6`: the same for IPv6 ranges. At most 128. Default 32.
    pub min_whitelist_prefix_v6: u8,
}

impl Default for PhonesConfig {
    fn default() -> Self {
        PhonesConfig {
            pap_attempts: 3,
            lockout_minutes: 30,
            lockouts_before_block: 3,
            temporary_whitelist_hours: 8,
            suspend_minutes: 30,
            min_whitelist_prefix_v4: 8,
            min_whitelist_prefix_v6: 32,
        }
    }
}

impl PhonesConfig {
    /// `lockout_minutes` as a duration.
    pub fn lockout(&self) -> Duration {
        Duration::from_secs(self.lockout_minutes.saturating_mul(60))
    }

    /// `temporary_whitelist_hours` as a duration.
    pub fn temporary_whitelist(&self) -> Duration {
        Duration::from_secs(self.temporary_whitelist_hours.saturating_mul(3600))
    }

    /// `suspend_minutes` as a duration.
    pub fn suspend(&self) -> Duration {
        Duration::from_secs(self.suspend_minutes.saturating_mul(60))
    }
}

/// `[limits]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// `max_payload_bytes`: largest JSON payload accepted from a device or an operator;
    /// at most `server.max_packet_size`. Default 65536.
    pub max_payload_bytes: usize,
    /// `connections_per_ip_per_minute`: new TCP connections accepted from one source address
    /// per minute (a token bucket that refills evenly); beyond it a connection is closed before
    /// its TLS handshake. Default 600.
    pub connections_per_ip_per_minute: u32,
    /// `failed_auth_per_ip`: failed authentications (wrong PAP, unknown device, identity that
    /// does not fit) from one source address within `failed_auth_window_minutes`, across all
    /// devices, after which every CONNECT from that address is refused for
    /// `failed_auth_block_minutes`. Half-way there, each failure is answered only after
    /// `failed_auth_delay_ms` (slowed). Default 20.
    pub failed_auth_per_ip: u32,
    /// `failed_auth_window_minutes`: the window of `failed_auth_per_ip`. Default 10.
    pub failed_auth_window_minutes: u64,
    /// `failed_auth_block_minutes`: how long an address stays refused. Default 15.
    pub failed_auth_block_minutes: u64,
    /// `failed_auth_delay_ms`: delay of a failed authentication once an address is half-way
    /// to the limit. Default 1000.
    pub failed_auth_delay_ms: u64,
    /// `refusal_audits_per_ip_per_minute`: refused CONNECTs audited per source address and
    /// minute; the rest are counted and logged, so that a flood cannot fill the disk. Default 10.
    pub refusal_audits_per_ip_per_minute: u32,
    /// `max_commands_per_request`: most commands in one operator request; a larger request is
    /// refused whole. Between 1 and 1000. Default 100.
    pub max_commands_per_request: u32,
    /// `max_page_size`: most items a list command returns in one page, whatever page size the
    /// operator asks for. Between 1 and 10000. Default 500.
    pub max_page_size: u32,
    /// `max_response_bytes`: most bytes of one operator request's whole response; the
    /// commands past it are answered with an error instead of their data, so that one request
    /// cannot make the server build an unbounded reply. At least 65536. Default 4194304 (4 MiB).
    pub max_response_bytes: usize,
    /// `operator_commands_per_second`: commands one operator may run per second, on average (a
    /// token bucket that refills evenly); the commands beyond it are answered `rate_limited`.
    /// Default 20.
    pub operator_commands_per_second: u32,
    /// `operator_command_burst`: commands one operator may run at once after a quiet spell
    /// (the size of that token bucket). Default 200.
    pub operator_command_burst: u32,
    /// `pending_stations_per_ip`: most stations waiting for approval (records created by
    /// devices, not yet accepted or rejected) whose last request came from one source address;
    /// past it a new station from that address is refused without a record. Default 1000.
    pub pending_stations_per_ip: u32,
    /// `max_pending_stations`: most stations waiting for approval in total. Default 20000.
    pub max_pending_stations: u32,
    /// `pending_expiry_hours`: a station waiting for approval that has not been seen for this
    /// long is deleted. Default 168 (7 days).
    pub pending_expiry_hours: u64,
    /// `sessions_per_ip`: most live sessions from one source address. Default 5000.
    pub sessions_per_ip: u32,
    /// `reserved_operator_sessions`: slots of `server.max_connections` (and of
    /// `sessions_per_ip`) that only operators may use, so that a flood of devices cannot lock
    /// the operators out; less than `server.max_connections`. Default 16.
    pub reserved_operator_sessions: u32,
    /// `handshakes_per_ip`: most unfinished TLS handshakes (and CONNECT reads) from one source
    /// address at once. Default 256.
    pub handshakes_per_ip: u32,
    /// `max_undelivered_messages`: most messages queued to one session and not written yet;
    /// past it the session is ended (a client that does not read must not grow the server's
    /// memory). Default 1024.
    pub max_undelivered_messages: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_payload_bytes: 65_536,
            connections_per_ip_per_minute: 600,
            failed_auth_per_ip: 20,
            failed_auth_window_minutes: 10,
            failed_auth_block_minutes: 15,
            failed_auth_delay_ms: 1000,
            refusal_audits_per_ip_per_minute: 10,
            max_commands_per_request: 100,
            max_page_size: 500,
            max_response_bytes: 4 * 1024 * 1024,
            operator_commands_per_second: 20,
            operator_command_burst: 200,
            pending_stations_per_ip: 1000,
            max_pending_stations: 20_000,
            pending_expiry_hours: 168,
            sessions_per_ip: 5000,
            reserved_operator_sessions: 16,
            handshakes_per_ip: 256,
            max_undelivered_messages: 1024,
        }
    }
}

impl LimitsConfig {
    /// `pending_expiry_hours` as a duration.
    pub fn pending_expiry(&self) -> Duration {
        Duration::from_secs(self.pending_expiry_hours.saturating_mul(3600))
    }
}

/// `[log]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `level`: the least severe level logged: `error`, `warn`, `info`, `debug` or `trace`.
    /// `RUST_LOG`, when set, wins over it (and may name targets). Default `info`.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
        }
    }
}

/// The levels `[log] level` takes, least verbose first.
pub const LOG_LEVELS: [&str; 5] = ["error", "warn", "info", "debug", "trace"];

/// `[metrics]`
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// `listen`: address and port of the Prometheus endpoint (`/metrics`, `/healthz`), plain
    /// HTTP. Must be a loopback address unless `insecure_listen_anywhere` is set. Default none:
    /// no endpoint.
    pub listen: Option<SocketAddr>,
    /// `insecure_listen_anywhere`: allow a `listen` address that is not loopback. The endpoint
    /// has no TLS and no login, and its figures (sessions, refusals, pending stations) tell an
    /// attacker much about the fleet: put it behind a firewall. Default false.
    pub insecure_listen_anywhere: bool,
}

/// `[cluster]` `role`: what one fleetd runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The whole system in one process: front door, router, controller and store.
    #[default]
    Single,
    /// A front door and its router, no store: admissions are asked of the controller over
    /// the bus.
    Edge,
    /// The controller and the store, no listener: it answers the edges over the bus.
    Controller,
    /// An edge and a controller in one process, on the bus like any other node.
    Both,
}

impl Role {
    /// Whether this role runs a front door.
    pub fn has_edge(self) -> bool {
        matches!(self, Role::Single | Role::Edge | Role::Both)
    }

    /// Whether this role runs the controller.
    pub fn has_controller(self) -> bool {
        matches!(self, Role::Single | Role::Controller | Role::Both)
    }
}

/// `[cluster]`
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// `role`: `single` (default), `edge`, `controller` or `both`.
    pub role: Role,
    /// `node`: this node's name in the cluster, unique among the edges (letters, digits, `-`
    /// and `_`, at most 64). Required unless `role` is `single`.
    pub node: String,
    /// `nats`: the NATS servers of the bus (`nats://HOST:PORT`), any of which will do.
    /// Required unless `role` is `single`. `nats://USER:PASSWORD@HOST:PORT` (or
    /// `nats://TOKEN@HOST:PORT`) authenticates to servers that require it: every URL that
    /// names credentials must name the same ones. Shown and logged without the password.
    pub nats: Vec<String>,
    /// `request_timeout_ms`: how long an edge waits for the controller's answer to an
    /// admission or a device's message before it refuses it as "server unavailable".
    /// Default 5000.
    pub request_timeout_ms: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            role: Role::Single,
            node: String::new(),
            nats: Vec::new(),
            request_timeout_ms: 5000,
        }
    }
}

/// Shown without the passwords the `nats` URLs may carry.
impl fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nats: Vec<String> = self.nats.iter().map(|url| redacted_url(url)).collect();
        f.debug_struct("ClusterConfig")
            .field("role", &self.role)
            .field("node", &self.node)
            .field("nats", &nats)
            .field("request_timeout_ms", &self.request_timeout_ms)
            .finish()
    }
}

impl ClusterConfig {
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }
}

/// `[store]`
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// `url`: a PostgreSQL database (`postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE`, or
    /// `postgresql://…`, with libpq's `?key=value` options) instead of the redb file
    /// `fleet.redb` in `server.data_dir`. Default none: the redb file.
    pub url: Option<String>,
    /// `cache_mib`: the redb file's page cache at most, in MiB (1 to [`MAX_STORE_CACHE_MIB`]).
    /// Default [`DEFAULT_STORE_CACHE_MIB`]. A smaller cache grows fleetd's memory less under
    /// churn (the audit log's new pages fill it) and reads from disk sooner. Only for the redb
    /// file: with `url` it is an error.
    pub cache_mib: Option<u32>,
}

/// `[store] cache_mib` when not set.
pub const DEFAULT_STORE_CACHE_MIB: u32 = 16;
/// `[store] cache_mib` at most (64 GiB).
pub const MAX_STORE_CACHE_MIB: u32 = 65_536;

impl StoreConfig {
    /// The redb file's page cache, in bytes (`cache_mib`, or its default).
    pub fn cache_bytes(&self) -> usize {
        (self.cache_mib.unwrap_or(DEFAULT_STORE_CACHE_MIB) as usize) << 20
    }
}

/// Shown without the password a `url` may carry (a configuration dump, an error message).
impl fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreConfig")
            .field("url", &self.url.as_deref().map(redacted_url))
            .field("cache_mib", &self.cache_mib)
            .finish()
    }
}

/// The schemes `[store] url` takes.
pub const STORE_URL_SCHEMES: [&str; 2] = ["postgres://", "postgresql://"];

/// `url` with the password of its user information, if any, replaced by `***` (and a NATS
/// URL's token, a user information without a password): what may be logged or shown of a
/// store or bus URL.
pub fn redacted_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    // The user information ends at the last `@`: a password may hold `@`, `/` or `?` only
    // percent-encoded, but a careless one is still hidden whole.
    let Some((userinfo, host)) = rest.rsplit_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _password)) => format!("{scheme}://{user}:***@{host}"),
        // A user alone: a PostgreSQL user is not a secret; anything else (a NATS token) is.
        None if STORE_URL_SCHEMES.contains(&format!("{scheme}://").as_str()) => url.to_owned(),
        None => format!("{scheme}://***@{host}"),
    }
}

/// The user information of a `nats://` URL (`USER:PASSWORD` or `TOKEN`), if it has one.
pub fn nats_userinfo(url: &str) -> Option<&str> {
    let rest = url.strip_prefix("nats://")?;
    rest.rsplit_once('@')
        .map(|(userinfo, _)| userinfo)
        .filter(|u| !u.is_empty())
}

/// `url` without its user information (`nats://USER:PASSWORD@HOST:PORT` -> `nats://HOST:PORT`):
/// what is handed to a client library that may log the URL it connects to.
pub fn without_userinfo(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((_, host)) => format!("{scheme}://{host}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

/// Largest packet MQTT can frame (remaining length of 4 bytes of 7 bits, plus header).
const MQTT_MAX_PACKET_SIZE: usize = 268_435_460;
/// Longest grace before a cut: "short and bounded" (PROTOCOL §4).
const MAX_CUT_GRACE_MS: u64 = 10_000;
/// Most commands in one operator request: beyond this a request is a flood, not a batch.
const MAX_COMMANDS_PER_REQUEST: u64 = 1000;
/// Largest page a list command may be configured to return.
const MAX_PAGE_SIZE: u64 = 10_000;
/// Smallest response budget: an error response for each of a few commands must still fit.
const MIN_RESPONSE_BYTES: usize = 65_536;

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The configuration file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The text is not valid TOML for this configuration: a syntax error, an unknown key, a
    /// value of the wrong type. The message names the key, on one line.
    #[error(
        "{}{}{}",
        path.as_ref().map(|p| format!("{}: ", p.display())).unwrap_or_default(),
        at.as_ref().map(|at| format!("{at}: ")).unwrap_or_default(),
        message
    )]
    Parse {
        /// The configuration file, if the text came from one.
        path: Option<PathBuf>,
        /// Where in the text the error is, if TOML says: the line's number and text (which
        /// names the key).
        at: Option<String>,
        /// TOML's message, on one line. TOML's error itself is not kept as a `source`: its
        /// message is this error's already (a chain would print it twice, and on several lines).
        message: String,
    },
    /// A value is of the right type but not usable.
    #[error("{}{key}: {reason}", path.as_ref().map(|p| format!("{}: ", p.display())).unwrap_or_default())]
    Invalid {
        /// The configuration file, if the text came from one.
        path: Option<PathBuf>,
        /// The dotted key, e.g. `server.connect_timeout_ms` or `firmware.images[0].sha256`.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl ConfigError {
    fn invalid(key: impl fmt::Display, reason: impl fmt::Display) -> Self {
        ConfigError::Invalid {
            path: None,
            key: key.to_string(),
            reason: reason.to_string(),
        }
    }

    fn in_file(self, file: &Path) -> Self {
        match self {
            ConfigError::Parse {
                path: None,
                at,
                message,
            } => ConfigError::Parse {
                path: Some(file.to_path_buf()),
                at,
                message,
            },
            ConfigError::Invalid {
                path: None,
                key,
                reason,
            } => ConfigError::Invalid {
                path: Some(file.to_path_buf()),
                key,
                reason,
            },
            other => other,
        }
    }
}

/// Reads and checks the configuration file at `path`; `None` gives the defaults.
pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
    let Some(path) = path else {
        let config = Config::default();
        config.validate()?;
        return Ok(config);
    };
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let config = Config::from_toml_str(&text).map_err(|e| e.in_file(path))?;
    config.validate().map_err(|e| e.in_file(path))?;
    Ok(config)
}

impl Config {
    /// Parses a configuration from TOML text, without [`Config::validate`].
    pub fn from_toml_str(text: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|error: toml::de::Error| ConfigError::Parse {
            path: None,
            at: error.span().and_then(|span| line_at(text, span.start)),
            message: one_line(error.message()),
        })
    }

    /// Checks every value; the error names the first key that is wrong.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_server()?;
        not_blank("stations.min_firmware", &self.stations.min_firmware)?;
        not_blank("stations.update_from", &self.stations.update_from)?;
        self.validate_firmware()?;
        self.validate_phones()?;
        self.validate_limits()?;
        self.validate_log_and_metrics()?;
        self.validate_store()?;
        self.validate_cluster()
    }

    /// `[cluster]`: a node name and NATS servers for any role but `single`.
    fn validate_cluster(&self) -> Result<(), ConfigError> {
        let cluster = &self.cluster;
        if cluster.role == Role::Single {
            return Ok(());
        }
        let node = &cluster.node;
        if node.is_empty()
            || node.len() > 64
            || !node
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(ConfigError::invalid(
                "cluster.node",
                format_args!(
                    "{node:?}: a node of a cluster needs a name of 1 to 64 letters, digits, \
                     '-' or '_'"
                ),
            ));
        }
        if cluster.nats.is_empty() {
            return Err(ConfigError::invalid(
                "cluster.nats",
                "a node of a cluster needs the NATS servers of its bus (nats://HOST:PORT)",
            ));
        }
        if let Some(bad) = cluster
            .nats
            .iter()
            .find(|url| !url.starts_with("nats://") || url.len() <= "nats://".len())
        {
            return Err(ConfigError::invalid(
                "cluster.nats",
                format_args!(
                    "{:?} is not a NATS URL: it must be nats://HOST:PORT",
                    redacted_url(bad)
                ),
            ));
        }
        let mut named = cluster.nats.iter().filter_map(|url| nats_userinfo(url));
        if let Some(first) = named.next() {
            if named.any(|other| other != first) {
                return Err(ConfigError::invalid(
                    "cluster.nats",
                    "the URLs name different credentials: one user and password (or token) \
                     is used for every server",
                ));
            }
        }
        if !(100..=60_000).contains(&cluster.request_timeout_ms) {
            return Err(ConfigError::invalid(
                "cluster.request_timeout_ms",
                "must be between 100 and 60000",
            ));
        }
        if cluster.role == Role::Edge && self.store.url.is_some() {
            return Err(ConfigError::invalid(
                "store.url",
                "an edge keeps no store: only a controller (or role = \"both\") names one",
            ));
        }
        Ok(())
    }

    /// `[store]`: a URL of a scheme PostgreSQL takes, with a host or socket and a database
    /// part; whether the server answers is for fleetd's start to tell.
    fn validate_store(&self) -> Result<(), ConfigError> {
        if let Some(mib) = self.store.cache_mib {
            if mib == 0 || mib > MAX_STORE_CACHE_MIB {
                return Err(ConfigError::invalid(
                    "store.cache_mib",
                    format_args!("must be between 1 and {MAX_STORE_CACHE_MIB}"),
                ));
            }
            if self.store.url.is_some() {
                return Err(ConfigError::invalid(
                    "store.cache_mib",
                    "is the redb file's cache: a PostgreSQL store (store.url) has none",
                ));
            }
        }
        let Some(url) = &self.store.url else {
            return Ok(());
        };
        let shown = redacted_url(url);
        let Some(rest) = STORE_URL_SCHEMES
            .iter()
            .find_map(|scheme| url.strip_prefix(scheme))
        else {
            return Err(ConfigError::invalid(
                "store.url",
                format_args!(
                    "{shown:?} is not a PostgreSQL URL: it must start with {}",
                    STORE_URL_SCHEMES.join(" or ")
                ),
            ));
        };
        if rest.is_empty() || rest.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(ConfigError::invalid(
                "store.url",
                format_args!("{shown:?}: no host, or a blank or control character in it"),
            ));
        }
        Ok(())
    }

    /// `[log]` and `[metrics]`.
    fn validate_log_and_metrics(&self) -> Result<(), ConfigError> {
        if !LOG_LEVELS.contains(&self.log.level.as_str()) {
            return Err(ConfigError::invalid(
                "log.level",
                format_args!(
                    "{:?} is not a level; use one of {}",
                    self.log.level,
                    LOG_LEVELS.join(", ")
                ),
            ));
        }
        let m = &self.metrics;
        if let Some(listen) = m.listen {
            if !listen.ip().is_loopback() && !m.insecure_listen_anywhere {
                return Err(ConfigError::invalid(
                    "metrics.listen",
                    format_args!(
                        "{listen} is not a loopback address; the endpoint has no TLS and no \
                         login: use 127.0.0.1 or [::1], or set \
                         metrics.insecure_listen_anywhere = true"
                    ),
                ));
            }
            if listen.port() == self.server.listen.port()
                && (listen.ip() == self.server.listen.ip()
                    || self.server.listen.ip().is_unspecified())
                && listen.port() != 0
            {
                return Err(ConfigError::invalid(
                    "metrics.listen",
                    format_args!("{listen} is the MQTT listener's address (server.listen)"),
                ));
            }
        }
        Ok(())
    }

    /// `[server]`.
    fn validate_server(&self) -> Result<(), ConfigError> {
        let s = &self.server;
        if s.data_dir.as_os_str().is_empty() {
            return Err(ConfigError::invalid("server.data_dir", "must not be empty"));
        }
        for (i, name) in s.server_names.iter().enumerate() {
            let ok = !name.is_empty()
                && name.len() <= 253
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b':' | b'*'));
            if !ok {
                return Err(ConfigError::invalid(
                    format_args!("server.server_names[{i}]"),
                    format_args!("{name:?} is not a DNS name or an IP address"),
                ));
            }
        }
        positive("server.max_connections", u64::from(s.max_connections))?;
        positive("server.handshake_timeout_ms", s.handshake_timeout_ms)?;
        positive("server.connect_timeout_ms", s.connect_timeout_ms)?;
        positive("server.idle_timeout_secs", s.idle_timeout_secs)?;
        if s.max_packet_size == 0 || s.max_packet_size > MQTT_MAX_PACKET_SIZE {
            return Err(ConfigError::invalid(
                "server.max_packet_size",
                format_args!("must be between 1 and {MQTT_MAX_PACKET_SIZE}"),
            ));
        }
        positive("server.write_timeout_ms", s.write_timeout_ms)?;
        if s.handshake_threads > MAX_HANDSHAKE_THREADS {
            return Err(ConfigError::invalid(
                "server.handshake_threads",
                format_args!("must be at most {MAX_HANDSHAKE_THREADS}"),
            ));
        }
        if s.cut_grace_ms > MAX_CUT_GRACE_MS {
            return Err(ConfigError::invalid(
                "server.cut_grace_ms",
                format_args!("must be at most {MAX_CUT_GRACE_MS}"),
            ));
        }
        for (i, ca) in s.manufacturer_cas.iter().enumerate() {
            if ca.as_os_str().is_empty() {
                return Err(ConfigError::invalid(
                    format_args!("server.manufacturer_cas[{i}]"),
                    "must not be empty",
                ));
            }
        }
        Ok(())
    }

    /// `[firmware]` and its images.
    fn validate_firmware(&self) -> Result<(), ConfigError> {
        let s = &self.server;
        let f = &self.firmware;
        if f.chunk_size == 0 || f.chunk_size > s.max_packet_size {
            return Err(ConfigError::invalid(
                "firmware.chunk_size",
                "must be between 1 and server.max_packet_size",
            ));
        }
        for (i, image) in f.images.iter().enumerate() {
            let key = |field: &str| format!("firmware.images[{i}].{field}");
            not_blank(&key("version"), &image.version)?;
            if f.images[..i].iter().any(|e| e.version == image.version) {
                return Err(ConfigError::invalid(
                    key("version"),
                    format_args!("{:?} is listed twice", image.version),
                ));
            }
            if image.file.as_os_str().is_empty() {
                return Err(ConfigError::invalid(key("file"), "must not be empty"));
            }
            if let Some(sha256) = &image.sha256 {
                if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(ConfigError::invalid(key("sha256"), "must be 64 hex digits"));
                }
            }
        }
        Ok(())
    }

    /// `[phones]`.
    fn validate_phones(&self) -> Result<(), ConfigError> {
        let p = &self.phones;
        positive("phones.pap_attempts", u64::from(p.pap_attempts))?;
        positive("phones.lockout_minutes", p.lockout_minutes)?;
        positive(
            "phones.lockouts_before_block",
            u64::from(p.lockouts_before_block),
        )?;
        positive(
            "phones.temporary_whitelist_hours",
            p.temporary_whitelist_hours,
        )?;
        positive("phones.suspend_minutes", p.suspend_minutes)?;
        between(
            "phones.min_whitelist_prefix_v4",
            p.min_whitelist_prefix_v4.into(),
            0,
            32,
        )?;
        between(
            "phones.min_whitelist_prefix_v6",
            p.min_whitelist_prefix_v6.into(),
            0,
            128,
        )?;
        Ok(())
    }

    /// `[limits]`, some of them against `[server]`.
    fn validate_limits(&self) -> Result<(), ConfigError> {
        let s = &self.server;
        let l = &self.limits;
        if l.max_payload_bytes == 0 || l.max_payload_bytes > s.max_packet_size {
            return Err(ConfigError::invalid(
                "limits.max_payload_bytes",
                "must be between 1 and server.max_packet_size",
            ));
        }
        positive(
            "limits.connections_per_ip_per_minute",
            l.connections_per_ip_per_minute.into(),
        )?;
        positive("limits.failed_auth_per_ip", l.failed_auth_per_ip.into())?;
        positive(
            "limits.failed_auth_window_minutes",
            l.failed_auth_window_minutes,
        )?;
        positive(
            "limits.failed_auth_block_minutes",
            l.failed_auth_block_minutes,
        )?;
        positive(
            "limits.refusal_audits_per_ip_per_minute",
            l.refusal_audits_per_ip_per_minute.into(),
        )?;
        between(
            "limits.max_commands_per_request",
            l.max_commands_per_request.into(),
            1,
            MAX_COMMANDS_PER_REQUEST,
        )?;
        between(
            "limits.max_page_size",
            l.max_page_size.into(),
            1,
            MAX_PAGE_SIZE,
        )?;
        if l.max_response_bytes < MIN_RESPONSE_BYTES {
            return Err(ConfigError::invalid(
                "limits.max_response_bytes",
                format_args!("must be at least {MIN_RESPONSE_BYTES}"),
            ));
        }
        positive(
            "limits.operator_commands_per_second",
            l.operator_commands_per_second.into(),
        )?;
        positive(
            "limits.operator_command_burst",
            l.operator_command_burst.into(),
        )?;
        positive(
            "limits.pending_stations_per_ip",
            l.pending_stations_per_ip.into(),
        )?;
        positive("limits.max_pending_stations", l.max_pending_stations.into())?;
        positive("limits.pending_expiry_hours", l.pending_expiry_hours)?;
        positive("limits.sessions_per_ip", l.sessions_per_ip.into())?;
        if l.reserved_operator_sessions >= s.max_connections {
            return Err(ConfigError::invalid(
                "limits.reserved_operator_sessions",
                "must be less than server.max_connections",
            ));
        }
        positive("limits.handshakes_per_ip", l.handshakes_per_ip.into())?;
        positive(
            "limits.max_undelivered_messages",
            l.max_undelivered_messages.into(),
        )?;
        Ok(())
    }
}

fn positive(key: &str, value: u64) -> Result<(), ConfigError> {
    if value == 0 {
        return Err(ConfigError::invalid(key, "must be greater than 0"));
    }
    Ok(())
}

/// `line N (TEXT)`: the line of `text` that holds byte `offset`, its text bounded.
fn line_at(text: &str, offset: usize) -> Option<String> {
    let before = text.get(..offset)?;
    let number = before.matches('\n').count() + 1;
    let start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = text.get(start..)?.lines().next().unwrap_or("").trim();
    let shown: String = line.chars().take(80).collect();
    Some(format!("line {number} ({shown})"))
}

/// `text` with its lines joined by spaces (TOML's messages may span lines).
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn between(key: &str, value: u64, min: u64, max: u64) -> Result<(), ConfigError> {
    if !(min..=max).contains(&value) {
        return Err(ConfigError::invalid(
            key,
            format_args!("must be between {min} and {max}"),
        ));
    }
    Ok(())
}

fn not_blank(key: &str, value: &str) -> Result<(), ConfigError> {
    if value.trim().is_empty() {
        return Err(ConfigError::invalid(key, "must not be empty"));
    }
    Ok(())
}

/// A configuration file with every key at its default, each explained.
pub const EXAMPLE: &str = r#"# fleetgate configuration (fleetd --config FILE).
# Every key is optional; the values below are the defaults. Unknown keys are errors.

[server]
# Address and port of the one MQTT-over-TLS listener (MQTT 3.1.1 and 5, TLS 1.3 and 1.2).
listen = "0.0.0.0:8883"
# Directory of the fleet CA (ca.pem, ca.key), the server certificate, admin.pem/admin.key
# and the database. Created on first start.
data_dir = "./fleet-data"
# Extra DNS names or IP addresses for the server certificate, besides localhost, 127.0.0.1,
# ::1 and the host name. Example: ["fleet.example.com", "203.0.113.7"]
server_names = []
# Most clients connected at once; a CONNECT above it is refused with "server unavailable"
# (MQTT 3.1.1) or "quota exceeded" (MQTT 5).
max_connections = 15000
# A TLS handshake must finish within this many milliseconds.
handshake_timeout_ms = 30000
# After the TLS handshake, CONNECT must arrive within this many milliseconds.
connect_timeout_ms = 10000
# Largest MQTT packet in bytes; a larger one closes the connection.
max_packet_size = 262144
# Seconds without a packet after which a client that asked for keepalive 0 is disconnected.
idle_timeout_secs = 300
# Milliseconds a station that is cut off gets to receive its final command (rejected, reset,
# removed) before the connection closes. At most 10000.
cut_grace_ms = 500
# A write to a client that does not finish in this time (a client that stopped reading) ends
# its session, in milliseconds.
write_timeout_ms = 30000
# PEM files of manufacturer CAs trusted to issue station certificates.
# Example: ["/etc/fleetgate/acme-stations-ca.pem"]
manufacturer_cas = []
# Accept station certificates that are self-signed (subject CN = serial).
allow_self_signed_stations = true
# Threads that open connections (TLS handshake, CONNECT, admission), apart from those that run
# established sessions and the controller, so that a connect storm does not delay them. 0 opens
# connections on the sessions' threads. At most 256.
handshake_threads = 2

[stations]
# The first firmware that owns a key pair and may be authorized.
min_firmware = "6.1.0"
# The lowest firmware that can be updated: from it up to below min_firmware a station is
# "Update Required"; below it, "Unsupported".
update_from = "6.0.2"

[firmware]
# Bytes of firmware image per transfer message; at most server.max_packet_size.
chunk_size = 16384
# The firmware catalog; empty by default. One [[firmware.images]] table per image:
# [[firmware.images]]
# version = "6.1.0"                 # required
# file = "firmware/6.1.0.bin"       # required; relative to the working directory
# sha256 = "<64 hex digits>"        # optional: checked if present, computed at start if not

[phones]
# Consecutive wrong PAPs that lock a phone out ("Authentication failed").
pap_attempts = 3
# Minutes a lockout lasts; then the phone is back to "Authentication needed" by itself.
lockout_minutes = 30
# Lockouts without a success after which the phone is "Authentication blocked" for good.
lockouts_before_block = 3
# Hours a correct PAP or a provisioning keeps the client's IP on the tenant's temporary
# whitelist.
temporary_whitelist_hours = 8
# Minutes Suspend Authentication lasts.
suspend_minutes = 30
# A permanent whitelist range with a shorter prefix than this is refused unless the operator
# forces it (0.0.0.0/0 and ::/0 are refused always). At most 32 for IPv4, 128 for IPv6.
min_whitelist_prefix_v4 = 8
min_whitelist_prefix_v6 = 32

[limits]
# Largest JSON payload accepted from a device or an operator, in bytes; at most
# server.max_packet_size.
max_payload_bytes = 65536
# New TCP connections accepted from one source address per minute; beyond it a connection is
# closed before its TLS handshake.
connections_per_ip_per_minute = 600
# Failed authentications from one source address (across all devices) within the window after
# which that address is refused for failed_auth_block_minutes; half-way there each failure is
# answered only after failed_auth_delay_ms.
failed_auth_per_ip = 20
failed_auth_window_minutes = 10
failed_auth_block_minutes = 15
failed_auth_delay_ms = 1000
# Refused CONNECTs audited per source address and minute (the rest are counted and logged).
refusal_audits_per_ip_per_minute = 10
# Most commands in one operator request (1 to 1000).
max_commands_per_request = 100
# Most items a list command returns in one page (1 to 10000).
max_page_size = 500
# Most bytes of one operator request's whole response (at least 65536); 4 MiB.
max_response_bytes = 4194304
# Commands one operator may run per second on average, and at once after a quiet spell;
# the rest are answered "rate_limited".
operator_commands_per_second = 20
operator_command_burst = 200
# Stations waiting for approval (created by devices, not yet accepted or rejected) whose last
# request came from one source address, and in total; past either a new station is refused.
pending_stations_per_ip = 1000
max_pending_stations = 20000
# Hours after which a station waiting for approval that has not been seen is deleted (7 days).
pending_expiry_hours = 168
# Live sessions from one source address at most.
sessions_per_ip = 5000
# Slots of server.max_connections (and of sessions_per_ip) that only operators may use; less
# than server.max_connections.
reserved_operator_sessions = 16
# Unfinished TLS handshakes (and CONNECT reads) from one source address at once.
handshakes_per_ip = 256
# Messages queued to one session and not written yet; past it the session is ended.
max_undelivered_messages = 1024

[log]
# Least severe level logged: error, warn, info, debug or trace. RUST_LOG, when set, wins
# (e.g. RUST_LOG=info,fleet_broker=debug). The format is chosen with fleetd --log-format.
level = "info"

[metrics]
# Prometheus endpoint (plain HTTP: /metrics and /healthz); none unless set. Must be a
# loopback address unless insecure_listen_anywhere = true.
# listen = "127.0.0.1:9464"
# Allow a metrics.listen address that is not loopback (no TLS, no login: firewall it).
insecure_listen_anywhere = false

[store]
# Where the controller keeps stations, phones, whitelists and the audit log: the file
# fleet.redb in server.data_dir, unless url names a PostgreSQL database (no TLS: loopback or
# a private network). Several fleetds may name one database: one serves, the others wait as
# standbys and take over when it dies (ARCHITECTURE.md, "Active/standby on PostgreSQL"). The
# schema is created and migrated by fleetd itself. A password in the URL is never logged; the
# environment variable PGPASSWORD keeps it out of this file.
# url = "postgres://fleet@127.0.0.1:5432/fleet"
# The redb file's page cache at most, in MiB (1 to 65536; not with url). A smaller cache grows
# fleetd's memory less under churn and reads from disk sooner.
# cache_mib = 16

[cluster]
# What this fleetd runs: "single" (front door, router, controller and store in one process),
# "edge" (a front door and its router, no store: it asks the controller over the bus),
# "controller" (the controller and its store, no listener) or "both". A cluster's nodes share
# one bus of NATS servers and start from copies of one data directory (README, "Scaling out").
role = "single"
# This node's name, unique among the edges: letters, digits, '-' and '_'.
node = ""
# The NATS servers of the bus (no TLS: loopback or a private network), e.g.
# ["nats://127.0.0.1:4222", "nats://127.0.0.1:4223"]. Servers that require a user and
# password (they should): "nats://USER:PASSWORD@HOST:PORT" (or "nats://TOKEN@HOST:PORT"),
# the same credentials in every URL that names any; never logged.
nats = []
# How long an edge waits for the controller's answer before it refuses a device as
# "server unavailable".
request_timeout_ms = 5000
"#;

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_error(text: &str) -> String {
        Config::from_toml_str(text).unwrap_err().to_string()
    }

    fn invalid_key(text: &str) -> String {
        match Config::from_toml_str(text).unwrap().validate().unwrap_err() {
            ConfigError::Invalid { key, .. } => key,
            other => panic!("unexpected error {other}"),
        }
    }

    #[test]
    fn the_bus_credentials_are_one_and_never_shown() {
        let config =
            |urls: &str| format!("[cluster]\nrole = \"edge\"\nnode = \"e\"\nnats = [{urls}]\n");
        let same = config("\"nats://fleet:s3cret@a:4222\", \"nats://fleet:s3cret@b:4222\"");
        let parsed = Config::from_toml_str(&same).expect("parses");
        parsed.validate().expect("one user and password");
        let shown = format!("{parsed:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("nats://fleet:***@a:4222"), "{shown}");
        let differ = config("\"nats://fleet:s3cret@a:4222\", \"nats://fleet:other@b:4222\"");
        assert_eq!(invalid_key(&differ), "cluster.nats");
        // A server without credentials beside one with them takes the same ones.
        let one = config("\"nats://fleet:s3cret@a:4222\", \"nats://b:4222\"");
        Config::from_toml_str(&one)
            .expect("parses")
            .validate()
            .expect("valid");
        assert_eq!(redacted_url("nats://t0ken@h:4222"), "nats://***@h:4222");
        assert_eq!(nats_userinfo("nats://u:p@h:1"), Some("u:p"));
        assert_eq!(nats_userinfo("nats://h:1"), None);
        // Careless passwords (unencoded `/`, `?`, `@`) are hidden whole, and stripped.
        assert_eq!(redacted_url("nats://u:a/b?c@d@h:1"), "nats://u:***@h:1");
        assert_eq!(redacted_url("tls://t0ken@h:1"), "tls://***@h:1");
        assert_eq!(nats_userinfo("nats://u:a/b@h:1"), Some("u:a/b"));
        assert_eq!(without_userinfo("nats://u:a/b@h:1"), "nats://h:1");
        assert_eq!(without_userinfo("nats://h:1"), "nats://h:1");
        let bad = Config::from_toml_str(&config("\"tls://u:s3cret@h:1\""))
            .expect("parses")
            .validate()
            .unwrap_err()
            .to_string();
        assert!(!bad.contains("s3cret"), "{bad}");
    }

    #[test]
    fn a_cluster_node_needs_a_name_and_its_bus() {
        assert_eq!(invalid_key("[cluster]\nrole = \"edge\"\n"), "cluster.node");
        assert_eq!(
            invalid_key("[cluster]\nrole = \"edge\"\nnode = \"a b\"\n"),
            "cluster.node"
        );
        assert_eq!(
            invalid_key("[cluster]\nrole = \"controller\"\nnode = \"c1\"\n"),
            "cluster.nats"
        );
        assert_eq!(
            invalid_key("[cluster]\nrole = \"edge\"\nnode = \"e1\"\nnats = [\"tcp://x\"]\n"),
            "cluster.nats"
        );
        assert_eq!(
            invalid_key(
                "[store]\nurl = \"postgres://h/db\"\n[cluster]\nrole = \"edge\"\nnode = \"e1\"\n\
                 nats = [\"nats://127.0.0.1:4222\"]\n"
            ),
            "store.url"
        );
        let edge = Config::from_toml_str(
            "[cluster]\nrole = \"edge\"\nnode = \"e1\"\nnats = [\"nats://127.0.0.1:4222\"]\n",
        )
        .unwrap();
        edge.validate().unwrap();
        assert!(edge.cluster.role.has_edge() && !edge.cluster.role.has_controller());
        assert!(Config::from_toml_str("[cluster]\nrole = \"leader\"\n").is_err());
    }

    #[test]
    fn no_file_gives_the_defaults() {
        let config = load(None).unwrap();
        assert_eq!(config, Config::default());
        assert_eq!(config.server.listen, "0.0.0.0:8883".parse().unwrap());
        assert_eq!(config.server.data_dir, PathBuf::from("./fleet-data"));
        assert_eq!(config.server.max_connections, 15_000);
        assert_eq!(config.server.connect_timeout(), Duration::from_secs(10));
        assert_eq!(config.phones.lockout(), Duration::from_secs(30 * 60));
        assert_eq!(
            config.phones.temporary_whitelist(),
            Duration::from_secs(8 * 3600)
        );
        assert!(config.server.allow_self_signed_stations);
        assert_eq!(Config::from_toml_str("").unwrap(), Config::default());
    }

    #[test]
    fn a_file_sets_only_what_it_names() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fleetgate.toml");
        std::fs::write(
            &path,
            r#"
            [server]
            listen = "[::1]:9883"
            server_names = ["fleet.example", "203.0.113.7"]
            [[firmware.images]]
            version = "6.1.0"
            file = "firmware/6.1.0.bin"
            [[firmware.images]]
            version = "6.1.1"
            file = "firmware/6.1.1.bin"
            sha256 = "ABCDEF0123456789abcdef0123456789ABCDEF0123456789abcdef0123456789"
            [phones]
            pap_attempts = 5
            "#,
        )
        .unwrap();
        let config = load(Some(&path)).unwrap();
        assert_eq!(config.server.listen, "[::1]:9883".parse().unwrap());
        assert_eq!(config.server.server_names.len(), 2);
        assert_eq!(config.server.max_connections, 15_000);
        assert_eq!(config.firmware.images.len(), 2);
        assert_eq!(config.firmware.images[0].sha256, None);
        assert!(config.firmware.images[1].sha256.is_some());
        assert_eq!(config.phones.pap_attempts, 5);
        assert_eq!(config.phones.lockout_minutes, 30);
    }

    #[test]
    fn unknown_keys_are_errors_that_name_the_key() {
        assert!(parse_error("colour = 1").contains("colour"));
        assert!(parse_error("[serverr]\nlisten = \"0.0.0.0:1\"").contains("serverr"));
        assert!(parse_error("[server]\nmax_conections = 5").contains("max_conections"));
        assert!(parse_error("[phones]\npap_attempt = 5").contains("pap_attempt"));
        assert!(
            parse_error("[[firmware.images]]\nversion = \"1\"\nfile = \"f\"\nsha = \"x\"")
                .contains("sha")
        );
    }

    #[test]
    fn wrong_types_and_values_are_errors() {
        let err = parse_error("[server]\nmax_connections = \"many\"");
        assert!(err.contains("max_connections"), "{err}");
        assert!(parse_error("[server]\nlisten = \"not an address\"").contains("listen"));
        assert!(parse_error("[server]\nmax_connections = -1").contains("max_connections"));
        assert!(parse_error("[limits]\nmax_payload_bytes = 1.5").contains("max_payload_bytes"));
        assert!(parse_error("server = 3").contains("server"));
        let err = parse_error("[[firmware.images]]\nversion = \"6.1.0\"");
        assert!(err.contains("file"), "{err}");
    }

    #[test]
    fn validation_names_the_key() {
        assert_eq!(
            invalid_key("[server]\nconnect_timeout_ms = 0"),
            "server.connect_timeout_ms"
        );
        assert_eq!(
            invalid_key("[server]\nhandshake_timeout_ms = 0"),
            "server.handshake_timeout_ms"
        );
        assert_eq!(
            invalid_key("[server]\nmax_connections = 0"),
            "server.max_connections"
        );
        assert_eq!(
            invalid_key("[server]\ncut_grace_ms = 60000"),
            "server.cut_grace_ms"
        );
        assert_eq!(
            invalid_key("[server]\nserver_names = [\"bad name\"]"),
            "server.server_names[0]"
        );
        assert_eq!(
            invalid_key("[phones]\nlockout_minutes = 0"),
            "phones.lockout_minutes"
        );
        assert_eq!(
            invalid_key("[stations]\nmin_firmware = \" \""),
            "stations.min_firmware"
        );
        assert_eq!(
            invalid_key("[limits]\nmax_payload_bytes = 300000"),
            "limits.max_payload_bytes"
        );
        assert_eq!(
            invalid_key("[firmware]\nchunk_size = 0"),
            "firmware.chunk_size"
        );
        let image = |sha: &str| {
            format!(
                "[[firmware.images]]\nversion = \"6.1.0\"\nfile = \"f.bin\"\nsha256 = \"{sha}\""
            )
        };
        assert_eq!(invalid_key(&image("abc")), "firmware.images[0].sha256");
        assert_eq!(
            invalid_key(&image(&"g".repeat(64))),
            "firmware.images[0].sha256"
        );
        let twice = "[[firmware.images]]\nversion = \"6.1.0\"\nfile = \"a\"\n\
                     [[firmware.images]]\nversion = \"6.1.0\"\nfile = \"b\"";
        assert_eq!(invalid_key(twice), "firmware.images[1].version");
    }

    #[test]
    fn the_new_limits_have_their_defaults_and_validate() {
        let config = Config::default();
        config.validate().unwrap();
        let l = &config.limits;
        assert_eq!(l.max_commands_per_request, 100);
        assert_eq!(l.max_page_size, 500);
        assert_eq!(l.max_response_bytes, 4_194_304);
        assert_eq!(l.operator_commands_per_second, 20);
        assert_eq!(l.operator_command_burst, 200);
        assert_eq!(l.pending_stations_per_ip, 1000);
        assert_eq!(l.max_pending_stations, 20_000);
        assert_eq!(l.pending_expiry(), Duration::from_secs(7 * 24 * 3600));
        assert_eq!(l.sessions_per_ip, 5000);
        assert_eq!(l.reserved_operator_sessions, 16);
        assert_eq!(l.handshakes_per_ip, 256);
        assert_eq!(l.max_undelivered_messages, 1024);
        assert_eq!(config.phones.min_whitelist_prefix_v4, 8);
        assert_eq!(config.phones.min_whitelist_prefix_v6, 32);
    }

    /// Each new rule refuses the value just past its bound and accepts the bound itself.
    #[test]
    fn the_new_limits_are_checked_at_their_bounds() {
        let refused = [
            ("limits", "max_commands_per_request", "0"),
            ("limits", "max_commands_per_request", "1001"),
            ("limits", "max_page_size", "0"),
            ("limits", "max_page_size", "10001"),
            ("limits", "max_response_bytes", "65535"),
            ("limits", "operator_commands_per_second", "0"),
            ("limits", "operator_command_burst", "0"),
            ("limits", "pending_stations_per_ip", "0"),
            ("limits", "max_pending_stations", "0"),
            ("limits", "pending_expiry_hours", "0"),
            ("limits", "sessions_per_ip", "0"),
            ("limits", "handshakes_per_ip", "0"),
            ("limits", "max_undelivered_messages", "0"),
            ("phones", "min_whitelist_prefix_v4", "33"),
            ("phones", "min_whitelist_prefix_v6", "129"),
            ("server", "handshake_threads", "257"),
            ("store", "cache_mib", "0"),
            ("store", "cache_mib", "65537"),
        ];
        for (table, key, value) in refused {
            let text = format!("[{table}]\n{key} = {value}");
            assert_eq!(invalid_key(&text), format!("{table}.{key}"), "{text}");
            let message = Config::from_toml_str(&text)
                .unwrap()
                .validate()
                .unwrap_err()
                .to_string();
            assert!(message.contains(key), "{message}");
        }
        let accepted = [
            ("limits", "max_commands_per_request", "1"),
            ("limits", "max_commands_per_request", "1000"),
            ("limits", "max_page_size", "1"),
            ("limits", "max_page_size", "10000"),
            ("limits", "max_response_bytes", "65536"),
            ("limits", "operator_command_burst", "1"),
            ("limits", "reserved_operator_sessions", "0"),
            ("phones", "min_whitelist_prefix_v4", "0"),
            ("phones", "min_whitelist_prefix_v4", "32"),
            ("phones", "min_whitelist_prefix_v6", "0"),
            ("phones", "min_whitelist_prefix_v6", "128"),
            ("server", "handshake_threads", "0"),
            ("server", "handshake_threads", "256"),
            ("store", "cache_mib", "1"),
            ("store", "cache_mib", "65536"),
        ];
        for (table, key, value) in accepted {
            let text = format!("[{table}]\n{key} = {value}");
            let config = Config::from_toml_str(&text).unwrap();
            assert!(config.validate().is_ok(), "{text}");
        }
        // A u8 key cannot even hold a larger or negative prefix; TOML says so and names it.
        assert!(parse_error("[phones]\nmin_whitelist_prefix_v6 = 300")
            .contains("min_whitelist_prefix_v6"));
        assert!(parse_error("[phones]\nmin_whitelist_prefix_v4 = -1")
            .contains("min_whitelist_prefix_v4"));
    }

    #[test]
    fn reserved_operator_sessions_must_leave_room_for_devices() {
        let text = |max: u32, reserved: u32| {
            format!(
                "[server]\nmax_connections = {max}\n\
                 [limits]\nreserved_operator_sessions = {reserved}"
            )
        };
        assert_eq!(
            invalid_key(&text(16, 16)),
            "limits.reserved_operator_sessions"
        );
        assert_eq!(
            invalid_key(&text(10, 16)),
            "limits.reserved_operator_sessions"
        );
        let config = Config::from_toml_str(&text(17, 16)).unwrap();
        config.validate().unwrap();
    }

    #[test]
    fn load_reports_the_file_and_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fleetgate.toml");
        std::fs::write(&path, "[server]\nidle_timeout_secs = 0\n").unwrap();
        let err = load(Some(&path)).unwrap_err().to_string();
        assert!(err.contains("fleetgate.toml"), "{err}");
        assert!(err.contains("server.idle_timeout_secs"), "{err}");
        std::fs::write(&path, "[server]\nbogus = 1\n").unwrap();
        let err = load(Some(&path)).unwrap_err().to_string();
        assert!(
            err.contains("fleetgate.toml") && err.contains("bogus"),
            "{err}"
        );
        assert!(err.contains("line 2"), "{err}");
        assert!(!err.contains('\n'), "one line: {err}");
        let missing = dir.path().join("missing.toml");
        assert!(matches!(
            load(Some(&missing)),
            Err(ConfigError::Read { .. })
        ));
    }

    #[test]
    fn the_log_level_and_the_metrics_address_are_checked() {
        assert_eq!(invalid_key("[log]\nlevel = \"loud\""), "log.level");
        for level in LOG_LEVELS {
            let config = Config::from_toml_str(&format!("[log]\nlevel = \"{level}\"")).unwrap();
            config.validate().unwrap();
        }
        assert!(parse_error("[log]\nlevle = \"info\"").contains("levle"));
        assert_eq!(
            invalid_key("[metrics]\nlisten = \"0.0.0.0:9464\""),
            "metrics.listen"
        );
        assert_eq!(
            invalid_key("[metrics]\nlisten = \"192.0.2.1:9464\""),
            "metrics.listen"
        );
        for ok in [
            "[metrics]\nlisten = \"127.0.0.1:9464\"",
            "[metrics]\nlisten = \"[::1]:9464\"",
            "[metrics]\nlisten = \"0.0.0.0:9464\"\ninsecure_listen_anywhere = true",
        ] {
            Config::from_toml_str(ok).unwrap().validate().unwrap();
        }
        assert_eq!(
            invalid_key(
                "[server]\nlisten = \"127.0.0.1:8883\"\n[metrics]\nlisten = \"127.0.0.1:8883\""
            ),
            "metrics.listen"
        );
        assert_eq!(Config::default().metrics.listen, None, "off by default");
    }

    #[test]
    fn the_redb_cache_is_16_mib_unless_set_and_not_for_postgresql() {
        assert_eq!(Config::default().store.cache_bytes(), 16 << 20);
        let config = Config::from_toml_str("[store]\ncache_mib = 64").unwrap();
        assert!(config.validate().is_ok());
        assert_eq!(config.store.cache_bytes(), 64 << 20);
        let both = "[store]\nurl = \"postgres://h/db\"\ncache_mib = 16";
        assert_eq!(invalid_key(both), "store.cache_mib");
    }

    #[test]
    fn a_store_url_must_be_postgres_and_its_password_is_never_shown() {
        let config = Config::from_toml_str(
            "[store]\nurl = \"postgres://fleet:s3cret@127.0.0.1:5432/fleet?sslmode=disable\"",
        )
        .unwrap();
        config.validate().unwrap();
        let shown = format!("{:?}", config.store);
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(
            shown.contains("fleet:***@127.0.0.1:5432/fleet?sslmode=disable"),
            "{shown}"
        );
        for url in [
            "mysql://x@h/db",
            "postgres://",
            "postgres://a b@h/db",
            "h:5432/db",
        ] {
            let text = format!("[store]\nurl = {url:?}");
            assert_eq!(invalid_key(&text), "store.url", "{url}");
        }
        let error = Config::from_toml_str("[store]\nurl = \"mysql://u:pw@h/db\"")
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(!error.contains(":pw@"), "{error}");
        assert_eq!(redacted_url("postgresql://u@h/db"), "postgresql://u@h/db");
        assert_eq!(
            redacted_url("postgres://u:p@ss@h/db"),
            "postgres://u:***@h/db"
        );
        let unknown = parse_error("[store]\nuri = \"postgres://h/db\"");
        assert!(unknown.contains("uri"), "{unknown}");
    }

    #[test]
    fn example_parses_to_the_defaults() {
        let config = Config::from_toml_str(EXAMPLE).unwrap();
        assert_eq!(config, Config::default());
        config.validate().unwrap();
    }

    /// Every key of the configuration appears, uncommented, in EXAMPLE (the image catalog
    /// is shown commented, as it is empty by default).
    #[test]
    fn example_lists_every_key() {
        fn keys(table: &toml::Table, prefix: &str, out: &mut Vec<String>) {
            for (key, value) in table {
                let path = format!("{prefix}{key}");
                match value {
                    toml::Value::Table(inner) => keys(inner, &format!("{path}."), out),
                    _ => out.push(path),
                }
            }
        }
        let example: toml::Table = toml::from_str(EXAMPLE).unwrap();
        let defaults = toml::Table::try_from(Config::default()).unwrap();
        let (mut in_example, mut in_defaults) = (Vec::new(), Vec::new());
        keys(&example, "", &mut in_example);
        keys(&defaults, "", &mut in_defaults);
        in_defaults.retain(|k| k != "firmware.images");
        in_example.sort();
        in_defaults.sort();
        assert_eq!(in_example, in_defaults);
        for field in ["version", "file", "sha256"] {
            assert!(EXAMPLE.contains(&format!("# {field} = ")), "{field}");
        }
    }
}
