//! A private NATS cluster for the tests: three `nats-server` processes (Debian's package) on
//! free loopback ports, routed to each other, each with its monitoring port (to know when the
//! routes are up). Clients must authenticate (user [`USER`], a password of the cluster's own):
//! every cluster test runs on a bus that refuses strangers, with the credentials in the URLs
//! as a node's configuration gives them.
//!
//! Each server runs under a watchdog shell that kills it when its stdin closes: when the test
//! process ends, however it ends, no server is left behind. Dropping a [`NatsCluster`] closes
//! the pipes.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpStream;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

/// One server of the cluster.
struct NatsServer {
    port: u16,
    monitor: u16,
    pid: u32,
    watchdog: Child,
    stdin: Option<ChildStdin>,
}

/// The user the servers require.
pub const USER: &str = "fleet";

/// A running cluster of NATS servers.
pub struct NatsCluster {
    servers: Vec<NatsServer>,
    password: String,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// 32 hex digits from the system's generator.
fn random_password() -> String {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .expect("/dev/urandom");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `GET path` of an HTTP server on loopback, its body.
fn http_get(port: u16, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    text.split_once("\r\n\r\n").map(|(_, body)| body.to_owned())
}

impl NatsCluster {
    /// Starts `n` servers routed to each other, and returns once every one is connected to
    /// all the others. Panics, naming the package, when `nats-server` is missing. A free port
    /// may be taken by another test between its choice and the server's bind: then the
    /// cluster is started again on other ports, up to three times.
    pub fn start(n: usize) -> NatsCluster {
        for _ in 0..3 {
            if let Some(cluster) = Self::try_start(n, Duration::from_secs(10)) {
                return cluster;
            }
        }
        let installed = Command::new("sh")
            .arg("-c")
            .arg("command -v nats-server")
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            installed,
            "nats-server is missing: install Debian's `nats-server` package \
             (apt-get install nats-server), as .ci/run does"
        );
        panic!("three times, the NATS servers did not route to each other within 10 s");
    }

    /// One try of [`NatsCluster::start`]: `None` (and the servers stopped) when they are not
    /// all routed within `patience`.
    fn try_start(n: usize, patience: Duration) -> Option<NatsCluster> {
        let password = random_password();
        let ports: Vec<(u16, u16, u16)> = (0..n)
            .map(|_| (free_port(), free_port(), free_port()))
            .collect();
        let routes: Vec<String> = ports
            .iter()
            .map(|(_, cluster, _)| format!("nats://127.0.0.1:{cluster}"))
            .collect();
        let servers = ports
            .iter()
            .enumerate()
            .map(|(i, &(port, cluster, monitor))| {
                let others: Vec<&str> = routes
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| *j != i)
                    .map(|(_, r)| r.as_str())
                    .collect();
                let command = format!(
                    "nats-server -a 127.0.0.1 -p {port} -m {monitor} --cluster_name fleet-test \
                     --user {USER} --pass {password} \
                     --cluster nats://127.0.0.1:{cluster} --routes {} --no_advertise \
                     >/dev/null 2>&1 & p=$!; echo $p; read _; kill -9 $p",
                    others.join(",")
                );
                let mut watchdog = Command::new("sh")
                    .arg("-c")
                    .arg(command)
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .spawn()
                    .expect("sh runs");
                let mut line = String::new();
                let stdout = watchdog.stdout.take().expect("stdout");
                BufReader::new(stdout)
                    .read_line(&mut line)
                    .expect("the server's pid");
                let pid = line.trim().parse().expect("a pid");
                NatsServer {
                    port,
                    monitor,
                    pid,
                    stdin: watchdog.stdin.take(),
                    watchdog,
                }
            })
            .collect();
        let cluster = NatsCluster { servers, password };
        let deadline = Instant::now() + patience;
        let routed = |s: &NatsServer| {
            http_get(s.monitor, "/routez").is_some_and(|body| {
                body.contains(&format!("\"num_routes\": {}", n - 1))
                    || body.contains(&format!("\"num_routes\":{}", n - 1))
            })
        };
        while !cluster.servers.iter().all(routed) {
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(cluster)
    }

    /// Every server's client URL, with the credentials.
    pub fn urls(&self) -> Vec<String> {
        (0..self.servers.len()).map(|i| self.url(i)).collect()
    }

    /// The client URL of server `i` alone, with the credentials.
    pub fn url(&self, i: usize) -> String {
        self.url_as(i, &self.password)
    }

    /// The client URL of server `i` with another password (a stranger's).
    pub fn url_as(&self, i: usize, password: &str) -> String {
        format!(
            "nats://{USER}:{password}@127.0.0.1:{}",
            self.servers[i].port
        )
    }

    /// The server that a client named with `name` (its CONNECT's name) is connected to.
    pub fn server_of(&self, name: &str) -> Option<usize> {
        self.servers.iter().position(|s| {
            http_get(s.monitor, "/connz").is_some_and(|body| body.contains(&format!("\"{name}\"")))
        })
    }

    /// Kills server `i` (SIGKILL): the others go on.
    pub fn kill(&self, i: usize) {
        let _ = Command::new("kill")
            .arg("-9")
            .arg(self.servers[i].pid.to_string())
            .status();
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for server in &mut self.servers {
            drop(server.stdin.take());
        }
        for server in &mut self.servers {
            let _ = server.watchdog.wait();
        }
    }
}
