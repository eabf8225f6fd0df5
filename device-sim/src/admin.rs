//! The local admin channel: a Unix socket `<dir>/admin.sock` that a running station listens on,
//! so that `fleet-sim station reset|reboot|fingerprint` reach the running process like a
//! technician reaches a real station's local admin page. One JSON line each way.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinHandle;

use crate::state;
use crate::station::StationControl;

/// File name of the admin socket inside a station directory.
pub const ADMIN_SOCKET: &str = "admin.sock";

/// A local admin request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum AdminRequest {
    /// Show the station's fingerprint.
    Fingerprint,
    /// "Reset Device", then reboot.
    Reset {
        /// Restore the default configuration.
        delete_configuration: bool,
        /// Delete the key pair and the authorized flag.
        delete_authentication: bool,
    },
    /// Reboot.
    Reboot,
}

/// The answer to an [`AdminRequest`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminReply {
    /// Whether the request was carried out.
    pub ok: bool,
    /// The fingerprint, for [`AdminRequest::Fingerprint`] (absent for legacy firmware).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    /// Why the request failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl AdminReply {
    fn done() -> Self {
        AdminReply {
            ok: true,
            fingerprint: None,
            error: None,
        }
    }

    fn failed(error: String) -> Self {
        AdminReply {
            ok: false,
            fingerprint: None,
            error: Some(error),
        }
    }
}

/// What went wrong on the admin channel.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The socket could not be bound, reached, read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The socket.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Another process already serves this station.
    #[error("a station process already runs for {}", .0.display())]
    AlreadyRunning(PathBuf),
    /// The other side sent something that is not an admin message.
    #[error("malformed admin message: {0}")]
    Malformed(#[from] serde_json::Error),
}

/// A running admin listener; dropping it stops listening and removes the socket file.
#[derive(Debug)]
pub struct AdminServer {
    path: PathBuf,
    task: JoinHandle<()>,
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Listens on `<dir>/admin.sock` and carries out requests on the station in `dir`
/// through `control`. A stale socket left by a dead process is replaced.
pub async fn serve_admin(dir: &Path, control: StationControl) -> Result<AdminServer, AdminError> {
    let path = dir.join(ADMIN_SOCKET);
    if path.exists() {
        if UnixStream::connect(&path).await.is_ok() {
            return Err(AdminError::AlreadyRunning(dir.to_owned()));
        }
        std::fs::remove_file(&path).map_err(|source| AdminError::Io {
            path: path.clone(),
            source,
        })?;
    }
    let listener = UnixListener::bind(&path).map_err(|source| AdminError::Io {
        path: path.clone(),
        source,
    })?;
    let dir = dir.to_owned();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let dir = dir.clone();
            let control = control.clone();
            tokio::spawn(async move {
                if let Err(e) = answer(stream, &dir, &control).await {
                    tracing::warn!("admin request failed: {e}");
                }
            });
        }
    });
    Ok(AdminServer { path, task })
}

async fn answer(stream: UnixStream, dir: &Path, control: &StationControl) -> io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(read).read_line(&mut line).await?;
    let reply = match serde_json::from_str::<AdminRequest>(&line) {
        Ok(request) => carry_out(request, dir, control),
        Err(e) => AdminReply::failed(format!("malformed request: {e}")),
    };
    let mut text = serde_json::to_string(&reply).map_err(io::Error::other)?;
    text.push('\n');
    write.write_all(text.as_bytes()).await?;
    write.shutdown().await
}

fn carry_out(request: AdminRequest, dir: &Path, control: &StationControl) -> AdminReply {
    match request {
        AdminRequest::Fingerprint => match state::fingerprint(dir) {
            Ok(fingerprint) => AdminReply {
                fingerprint: fingerprint.map(|f| f.to_string()),
                ..AdminReply::done()
            },
            Err(e) => AdminReply::failed(e.to_string()),
        },
        AdminRequest::Reset {
            delete_configuration,
            delete_authentication,
        } => match state::local_reset(dir, delete_configuration, delete_authentication) {
            Ok(()) if control.reboot() => AdminReply::done(),
            Ok(()) => AdminReply::failed("reset applied, but the station is not running".into()),
            Err(e) => AdminReply::failed(e.to_string()),
        },
        AdminRequest::Reboot => {
            if control.reboot() {
                AdminReply::done()
            } else {
                AdminReply::failed("the station is not running".into())
            }
        }
    }
}

/// Sends `request` to the process running the station in `dir`; `None` when no process
/// listens there.
pub async fn admin_request(
    dir: &Path,
    request: &AdminRequest,
) -> Result<Option<AdminReply>, AdminError> {
    let path = dir.join(ADMIN_SOCKET);
    let io_error = |source| AdminError::Io {
        path: path.clone(),
        source,
    };
    let stream = match UnixStream::connect(&path).await {
        Ok(stream) => stream,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(io_error(e)),
    };
    let (read, mut write) = stream.into_split();
    let mut text = serde_json::to_string(request)?;
    text.push('\n');
    write.write_all(text.as_bytes()).await.map_err(io_error)?;
    let mut line = String::new();
    BufReader::new(read)
        .read_line(&mut line)
        .await
        .map_err(io_error)?;
    Ok(Some(serde_json::from_str(&line)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{StationProfile, StationState, KEY_FILE};
    use crate::station::{spawn_station, SimConfig, SimEvent};
    use std::time::Duration;

    #[tokio::test]
    async fn reset_through_the_socket_reboots_the_running_station() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("ST-7");
        StationState::init(&dir, &StationProfile::new("ST-7", "6.1.0")).unwrap();
        assert_eq!(
            admin_request(&dir, &AdminRequest::Reboot).await.unwrap(),
            None
        );

        let ca = fleet_certs::FleetCa::generate("test CA").unwrap();
        let config = SimConfig {
            server: "127.0.0.1:1".into(),
            ca_pem: ca.cert_pem().to_owned(),
            retry: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(30),
            source: None,
            dialer: None,
        };
        let mut station = spawn_station(&dir, config);
        let server = serve_admin(&dir, station.control()).await.unwrap();
        assert!(matches!(
            serve_admin(&dir, station.control()).await,
            Err(AdminError::AlreadyRunning(_))
        ));

        let reply = admin_request(&dir, &AdminRequest::Fingerprint)
            .await
            .unwrap()
            .unwrap();
        let first = reply.fingerprint.unwrap();
        let reset = AdminRequest::Reset {
            delete_configuration: false,
            delete_authentication: true,
        };
        assert!(admin_request(&dir, &reset).await.unwrap().unwrap().ok);
        // The reboot makes a new key pair.
        loop {
            match station.next_event().await.unwrap() {
                SimEvent::Rebooting => break,
                _ => continue,
            }
        }
        let booted = station.next_event().await.unwrap();
        let SimEvent::Booted {
            fingerprint: Some(second),
            ..
        } = booted
        else {
            panic!("unexpected {booted:?}");
        };
        assert_ne!(first, second);
        assert!(dir.join(KEY_FILE).exists());

        drop(server);
        assert!(!dir.join(ADMIN_SOCKET).exists());
        station.shutdown().await;
    }
}
