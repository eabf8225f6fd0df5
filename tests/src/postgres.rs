//! A private PostgreSQL server for the tests (the store's suite, the controller's failover):
//! Debian's server binaries
//! (`/usr/lib/postgresql/*/bin`, the newest version found), a cluster made by `initdb` in a
//! temporary directory, listening on 127.0.0.1 on a free port (its Unix socket in that
//! directory), `fsync` on. One server serves every test of the process, each test in a
//! database of its own ([`database`]).
//!
//! `initdb` and `postgres` refuse to run as root, and CI runs as root: then they run as the
//! `postgres` user (which Debian's `postgresql` package creates) through `runuser`, in a
//! directory owned by that user. Missing binaries are a test failure that names the package.
//!
//! The server is stopped (`pg_ctl stop -m fast`) and its directory removed by a watchdog
//! shell that waits for EOF on a pipe whose only writer is this process: when the test
//! process ends, however it ends, the pipe closes and the watchdog cleans up. Dropping a
//! [`Server`] closes the pipe and waits for the watchdog.

use std::io::Write as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

/// The superuser of the private cluster (trust authentication, loopback only).
const SUPERUSER: &str = "fleet";
/// Who runs the server when the tests run as root.
const UNPRIVILEGED: &str = "postgres";

/// A running private server.
pub struct Server {
    port: u16,
    dir: PathBuf,
    /// The server binaries, and whether they run as [`UNPRIVILEGED`] (we are root).
    bin: PathBuf,
    root: bool,
    /// Closing it tells the watchdog to stop the server and remove `dir`.
    watchdog: Option<Child>,
}

/// Where Debian's PostgreSQL server binaries are: the newest `/usr/lib/postgresql/N/bin`
/// with `initdb` and `pg_ctl` in it.
fn server_binaries() -> Result<PathBuf, String> {
    let missing = || {
        "PostgreSQL's server binaries are missing: no /usr/lib/postgresql/*/bin/initdb. \
         Install Debian's `postgresql` package (apt-get install postgresql), as .ci/run does"
            .to_owned()
    };
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map_err(|_| missing())?
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            (bin.join("initdb").is_file() && bin.join("pg_ctl").is_file()).then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).ok_or_else(missing)
}

/// Runs `command` and says what it printed if it failed.
fn run(mut command: Command, what: &str) -> Result<(), String> {
    let output = command
        .output()
        .map_err(|e| format!("cannot run {what}: {e}"))?;
    if output.status.success() {
        return Ok(());
    }
    Err(format!(
        "{what} failed ({}): {}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    ))
}

/// The user and group ids of `user`, from `id`.
fn ids_of(user: &str) -> Result<(u32, u32), String> {
    let id = |flag: &str| -> Result<u32, String> {
        let output = Command::new("id")
            .args([flag, user])
            .output()
            .map_err(|e| format!("cannot run id: {e}"))?;
        String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .map_err(|_| {
                format!(
                    "the tests run as root, and PostgreSQL refuses to: they need the user \
                     {user:?}, which Debian's `postgresql` package creates (apt-get install \
                     postgresql)"
                )
            })
    };
    Ok((id("-u")?, id("-g")?))
}

/// A command for a PostgreSQL binary: as `postgres` through `runuser` when we are root.
fn as_server_user(program: &Path, root: bool) -> Command {
    if root {
        let mut command = Command::new("runuser");
        command.args(["-u", UNPRIVILEGED, "--"]).arg(program);
        command
    } else {
        Command::new(program)
    }
}

impl Server {
    /// Makes a cluster and starts it.
    pub fn start() -> Result<Server, String> {
        let bin = server_binaries()?;
        let root = rustix::process::geteuid().is_root();
        let dir = tempfile::Builder::new()
            .prefix("fleet-pg-")
            .tempdir()
            .map_err(|e| format!("cannot make a directory for PostgreSQL: {e}"))?;
        if root {
            let (uid, gid) = ids_of(UNPRIVILEGED)?;
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).map_err(|e| {
                format!(
                    "cannot give {} to {UNPRIVILEGED}: {e}",
                    dir.path().display()
                )
            })?;
        }
        let data = dir.path().join("data");
        // The watchdog first, so that from here on the directory is always cleaned up.
        let mut stop = as_server_user(&bin.join("pg_ctl"), root);
        stop.arg("-D").arg(&data).args(["stop", "-m", "fast"]);
        let script = format!(
            "read _; {} >/dev/null 2>&1; rm -rf '{}'",
            shell_words(&stop),
            dir.path().display()
        );
        let watchdog = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group: a ^C of the tests does not kill it before it cleans up.
            .process_group(0)
            .spawn()
            .map_err(|e| format!("cannot start the watchdog: {e}"))?;
        let dir = dir.keep();
        let mut server = Server {
            port: 0,
            dir,
            bin: bin.clone(),
            root,
            watchdog: Some(watchdog),
        };

        let mut initdb = as_server_user(&bin.join("initdb"), root);
        initdb
            .arg("-D")
            .arg(&data)
            .args(["-U", SUPERUSER, "--auth=trust", "-E", "UTF8", "--locale=C"])
            // initdb's own files need no fsync for a throwaway cluster; the server itself runs
            // with fsync on (below), which is what the store's durability relies on.
            .arg("--no-sync");
        run(initdb, "initdb")?;

        // A free port, as the kernel hands one out; another process could take it before the
        // server binds it, so a failed start is tried again on another.
        let mut last_error = String::new();
        for _ in 0..3 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|listener| listener.local_addr())
                .map_err(|e| format!("cannot find a free port: {e}"))?
                .port();
            let start = server.pg_ctl_start(port);
            match run(start, "pg_ctl start") {
                Ok(()) => {
                    server.port = port;
                    return Ok(server);
                }
                Err(error) => {
                    let log =
                        std::fs::read_to_string(server.dir.join("server.log")).unwrap_or_default();
                    last_error = format!("{error}\n{log}");
                }
            }
        }
        Err(last_error)
    }

    /// `pg_ctl start` of this server's cluster on `port`, waiting until it accepts
    /// connections.
    fn pg_ctl_start(&self, port: u16) -> Command {
        let mut start = as_server_user(&self.bin.join("pg_ctl"), self.root);
        start
            .arg("-D")
            .arg(self.dir.join("data"))
            .arg("-l")
            .arg(self.dir.join("server.log"))
            .args(["-w", "-t", "60", "-o"])
            .arg(format!(
                "-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={} \
                 -c fsync=on -c synchronous_commit=on -c max_connections=200",
                self.dir.display()
            ))
            .arg("start");
        start
    }

    /// Stops the server (`pg_ctl stop -m fast`: every connection is ended), keeping its data.
    pub fn stop(&self) -> Result<(), String> {
        let mut stop = as_server_user(&self.bin.join("pg_ctl"), self.root);
        stop.arg("-D")
            .arg(self.dir.join("data"))
            .args(["stop", "-w", "-m", "fast"]);
        run(stop, "pg_ctl stop")
    }

    /// Starts the stopped server again, on the same port.
    pub fn restart(&self) -> Result<(), String> {
        run(self.pg_ctl_start(self.port), "pg_ctl start")
    }

    /// The URL of `database` on this server.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://{SUPERUSER}@127.0.0.1:{}/{database}", self.port)
    }

    /// Creates a database, and returns its URL.
    pub fn create_database(&self, name: &str) -> Result<String, String> {
        execute(&self.url("postgres"), &format!("CREATE DATABASE {name}"))?;
        Ok(self.url(name))
    }

    /// The server's directory (data, log and socket).
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut watchdog) = self.watchdog.take() {
            // EOF on its stdin: it stops the server and removes the directory.
            if let Some(mut stdin) = watchdog.stdin.take() {
                let _ = stdin.flush();
            }
            let _ = watchdog.wait();
        }
    }
}

/// `command` as words for `sh`, each single-quoted.
fn shell_words(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|word| format!("'{}'", word.to_string_lossy().replace('\'', r"'\''")))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `f` on a thread of its own with a runtime of its own: the helpers here block, and
/// may be called from async tests too.
fn on_own_runtime<T: Send>(
    f: impl FnOnce(&tokio::runtime::Runtime) -> Result<T, String> + Send,
) -> Result<T, String> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())?;
                f(&runtime)
            })
            .join()
            .unwrap_or_else(|_| Err("the helper's thread panicked".to_owned()))
    })
}

/// Runs `sql` (one or more statements) on the database at `url`.
pub fn execute(url: &str, sql: &str) -> Result<(), String> {
    on_own_runtime(|runtime| execute_on(runtime, url, sql))
}

fn execute_on(runtime: &tokio::runtime::Runtime, url: &str, sql: &str) -> Result<(), String> {
    runtime.block_on(async {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .map_err(|e| format!("cannot connect to {url}: {e}"))?;
        let connection = tokio::spawn(connection);
        let result = client
            .batch_execute(sql)
            .await
            .map_err(|e| match e.as_db_error() {
                Some(db) => format!("{sql}: {db}"),
                None => format!("{sql}: {e}"),
            });
        drop(client);
        let _ = connection.await;
        result
    })
}

/// The first column of every row that `sql` returns on the database at `url`, as text.
pub fn query_text(url: &str, sql: &str) -> Result<Vec<String>, String> {
    on_own_runtime(|runtime| query_text_on(runtime, url, sql))
}

fn query_text_on(
    runtime: &tokio::runtime::Runtime,
    url: &str,
    sql: &str,
) -> Result<Vec<String>, String> {
    runtime.block_on(async {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .map_err(|e| format!("cannot connect to {url}: {e}"))?;
        let connection = tokio::spawn(connection);
        let result = match client.simple_query(sql).await {
            Ok(messages) => Ok(messages
                .iter()
                .filter_map(|message| match message {
                    tokio_postgres::SimpleQueryMessage::Row(row) => {
                        Some(row.get(0).unwrap_or_default().to_owned())
                    }
                    _ => None,
                })
                .collect()),
            Err(e) => Err(format!("{sql}: {e}")),
        };
        drop(client);
        let _ = connection.await;
        result
    })
}

/// A string as a SQL literal.
pub fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// The server that the tests of this process share, started by the first that asks.
pub fn shared() -> &'static Server {
    static SHARED: OnceLock<Result<Server, String>> = OnceLock::new();
    match SHARED.get_or_init(Server::start) {
        Ok(server) => server,
        Err(error) => panic!("no PostgreSQL server for the store's tests: {error}"),
    }
}

/// The URL of a new, empty database on the shared server, for one test.
pub fn database() -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let name = format!("store_test_{}", NEXT.fetch_add(1, Ordering::Relaxed));
    match shared().create_database(&name) {
        Ok(url) => url,
        Err(error) => panic!("cannot create a test database: {error}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_private_server_serves_databases_and_is_gone_once_dropped() {
        let server = Server::start().unwrap();
        let dir = server.dir().to_path_buf();
        assert!(dir.join("data/PG_VERSION").is_file());
        let url = server.create_database("scratch").unwrap();
        execute(&url, "CREATE TABLE t (x int); INSERT INTO t VALUES (1)").unwrap();
        // Durability is what the store's tests test: the server runs with fsync on.
        execute(&url, "DO $$ BEGIN IF current_setting('fsync') <> 'on' THEN RAISE 'fsync off'; END IF; END $$").unwrap();
        drop(server);
        assert!(!dir.exists(), "{} is left behind", dir.display());
        assert!(
            execute(&url, "SELECT 1").is_err(),
            "the server still answers"
        );
    }
}
