//! `fleetctl console`: its arguments, checked before anything is bound, and the run that binds
//! the console, prints its login link as the first line on stdout, and serves until Ctrl-C.

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;

use serde_json::Value;
use tokio::io::AsyncBufReadExt as _;
use tokio::net::TcpListener;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::session::RandomError;
use crate::{serve, Console, Fleetd};

/// The arguments of `fleetctl console`.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct ConsoleArgs {
    /// Address for the console's web server [default: 127.0.0.1 and a free port].
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Open the login link in the default browser.
    #[arg(long)]
    pub open: bool,
    /// Allow --listen on an address that is not loopback. Anyone who can reach it and gets a
    /// login link acts as your operator; the console speaks plain HTTP.
    #[arg(long)]
    pub insecure_listen_anywhere: bool,
}

/// Why the console did not run.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// `--listen` names an address other computers can reach, without the flag that allows it.
    #[error(
        "--listen {0} is not a loopback address: other computers could reach the console; \
         add --insecure-listen-anywhere if that is what you want"
    )]
    NotLoopback(SocketAddr),
    /// The address could not be bound.
    #[error("cannot listen on {addr}: {error}")]
    Bind {
        addr: SocketAddr,
        error: std::io::Error,
    },
    /// No login token could be made.
    #[error(transparent)]
    Random(#[from] RandomError),
    /// Serving failed.
    #[error("console: {0}")]
    Io(#[from] std::io::Error),
}

impl ConsoleArgs {
    /// Checks the arguments; nothing is bound yet.
    pub fn check(&self) -> Result<(), ConsoleError> {
        if !self.listen.ip().is_loopback() && !self.insecure_listen_anywhere {
            return Err(ConsoleError::NotLoopback(self.listen));
        }
        Ok(())
    }
}

/// A bound console, not yet serving: [`start`]'s result.
pub struct Started {
    pub listener: TcpListener,
    pub console: Arc<Console>,
    /// The first login link.
    pub link: String,
}

/// Checks the arguments, binds, and makes the console and its first login link.
pub async fn start(
    args: &ConsoleArgs,
    fleetd: Arc<dyn Fleetd>,
    tenant: &str,
) -> Result<Started, ConsoleError> {
    args.check()?;
    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|error| ConsoleError::Bind {
            addr: args.listen,
            error,
        })?;
    let addr = listener.local_addr()?;
    if !addr.ip().is_loopback() {
        tracing::warn!("the console listens on {addr}, reachable from other computers");
        eprintln!("warning: the console listens on {addr}: other computers can reach it");
    }
    let console = Console::new(fleetd, tenant, addr);
    let link = console.login_link()?;
    Ok(Started {
        listener,
        console,
        link,
    })
}

/// Runs the console for the operator `fleetd` of `tenant` until Ctrl-C: binds, prints
/// `console: http://127.0.0.1:PORT/login?token=…` as the first line on stdout (scripts read it),
/// and prints a new link on stdout each time Enter is pressed.
pub async fn run(
    args: ConsoleArgs,
    fleetd: Arc<dyn Fleetd>,
    tenant: &str,
    events: UnboundedReceiver<(String, Value)>,
) -> Result<(), ConsoleError> {
    let Started {
        listener,
        console,
        link,
    } = start(&args, fleetd, tenant).await?;
    print_link(&link)?;
    if args.open {
        open_browser(&link);
    }
    let issuing = Arc::clone(&console);
    tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(_)) = lines.next_line().await {
            match issuing.login_link() {
                Ok(link) => {
                    if print_link(&link).is_err() {
                        break;
                    }
                }
                Err(e) => eprintln!("error: {e}"),
            }
        }
    });
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    serve(listener, console, events, shutdown).await?;
    Ok(())
}

/// The line that announces a login link.
pub fn link_line(link: &str) -> String {
    format!("console: {link}")
}

/// The console's stdout: its login links, one a line, flushed at once for the script that waits
/// for the first.
#[allow(
    clippy::print_stdout,
    reason = "the login link on stdout is the console's interface"
)]
fn print_link(link: &str) -> std::io::Result<()> {
    println!("{}", link_line(link));
    std::io::stdout().flush()
}

/// Opens `link` in the default browser; a failure is told, and the printed link still works.
fn open_browser(link: &str) {
    let opener = if cfg!(target_os = "macos") {
        "open"
    } else {
        "xdg-open"
    };
    if let Err(e) = std::process::Command::new(opener)
        .arg(link)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
    {
        eprintln!("cannot open a browser ({opener}: {e}); open the link above by hand");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        console: ConsoleArgs,
    }

    fn parsed(args: &[&str]) -> ConsoleArgs {
        Cli::try_parse_from(std::iter::once("console").chain(args.iter().copied()))
            .unwrap()
            .console
    }

    #[tokio::test]
    async fn the_first_link_logs_in_over_real_http_once() {
        let fleetd = Arc::new(crate::memory::MemoryFleetd::new("admin"));
        let started = start(&parsed(&[]), fleetd, "default").await.unwrap();
        let port = started.listener.local_addr().unwrap().port();
        let line = link_line(&started.link);
        let prefix = format!("console: http://127.0.0.1:{port}/login?token=");
        assert!(line.starts_with(&prefix), "{line}");
        assert_eq!(line.len(), prefix.len() + 64);
        let link = started.link.clone();
        tokio::spawn(serve(
            started.listener,
            started.console,
            tokio::sync::mpsc::unbounded_channel().1,
            std::future::pending(),
        ));
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<axum::body::Body>();
        let get = |uri: &str| {
            axum::http::Request::get(uri)
                .body(axum::body::Body::empty())
                .unwrap()
        };
        let first = client.request(get(&link)).await.unwrap();
        assert_eq!(first.status(), axum::http::StatusCode::SEE_OTHER);
        assert!(first.headers().contains_key(axum::http::header::SET_COOKIE));
        let again = client.request(get(&link)).await.unwrap();
        assert_eq!(again.status(), axum::http::StatusCode::UNAUTHORIZED);
        let taken = start(
            &parsed(&["--listen", &format!("127.0.0.1:{port}")]),
            Arc::new(crate::memory::MemoryFleetd::new("admin")),
            "default",
        )
        .await;
        assert!(matches!(taken, Err(ConsoleError::Bind { .. })));
    }

    #[test]
    fn loopback_by_default_and_elsewhere_only_when_told() {
        let default = parsed(&[]);
        assert_eq!(default.listen, "127.0.0.1:0".parse().unwrap());
        assert!(default.check().is_ok());
        assert!(parsed(&["--listen", "[::1]:8080"]).check().is_ok());
        let anywhere = parsed(&["--listen", "0.0.0.0:8080"]);
        assert!(matches!(
            anywhere.check(),
            Err(ConsoleError::NotLoopback(_))
        ));
        assert!(
            parsed(&["--listen", "0.0.0.0:8080", "--insecure-listen-anywhere"])
                .check()
                .is_ok()
        );
    }
}
