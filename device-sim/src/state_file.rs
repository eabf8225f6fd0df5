//! A simulated device's directory, kept like a real device keeps its flash: one JSON state file
//! ([`StateFile`], `station.json` or `phone.json`) that is only ever replaced whole, beside key
//! and certificate files that may or may not exist yet.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

/// What went wrong with a file of a device's directory.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The state file is not valid.
    #[error("{}: {source}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// The directory already holds a device.
    #[error("{} already holds a {device}", dir.display())]
    AlreadyInitialized {
        /// The directory.
        dir: PathBuf,
        /// What it holds: "station" or "phone".
        device: &'static str,
    },
}

/// A record that a device keeps as the state file of its directory.
pub trait Record: Serialize + DeserializeOwned {
    /// The file's name in the directory.
    const FILE: &'static str;
    /// The device, as errors name it.
    const DEVICE: &'static str;
    /// The errors of the device's state; a file error is one of them.
    type Error: From<FileError>;
}

/// A device's state directory and what its state file holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateFile<R> {
    dir: PathBuf,
    /// Everything in the state file.
    pub record: R,
}

impl<R: Record> StateFile<R> {
    /// Creates `dir` (if needed) and a new state file in it, holding what `make` returns; fails
    /// if the directory already holds one.
    pub(crate) fn create(
        dir: &Path,
        make: impl FnOnce() -> Result<R, R::Error>,
    ) -> Result<Self, R::Error> {
        fs::create_dir_all(dir).map_err(io_error(dir))?;
        if Self::exists(dir) {
            return Err(FileError::AlreadyInitialized {
                dir: dir.to_owned(),
                device: R::DEVICE,
            }
            .into());
        }
        let state = StateFile {
            dir: dir.to_owned(),
            record: make()?,
        };
        state.save()?;
        Ok(state)
    }

    /// Reads the state file of `dir`.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, R::Error> {
        let dir = dir.as_ref();
        let file = dir.join(R::FILE);
        let text = fs::read(&file).map_err(io_error(&file))?;
        let record = serde_json::from_slice(&text)
            .map_err(|source| FileError::Json { path: file, source })?;
        Ok(StateFile {
            dir: dir.to_owned(),
            record,
        })
    }

    /// Whether `dir` holds such a device.
    pub fn exists(dir: impl AsRef<Path>) -> bool {
        dir.as_ref().join(R::FILE).is_file()
    }

    /// Reads the state file, lets `change` edit it and writes it back: every change goes
    /// through the file, so a local admin edit made meanwhile is not overwritten.
    pub fn update(dir: impl AsRef<Path>, change: impl FnOnce(&mut R)) -> Result<Self, R::Error> {
        let mut state = Self::open(dir)?;
        change(&mut state.record);
        state.save()?;
        Ok(state)
    }

    /// Writes the state file (through a temporary file, so a crash never leaves half of it).
    pub fn save(&self) -> Result<(), R::Error> {
        let file = self.dir.join(R::FILE);
        let text = serde_json::to_vec_pretty(&self.record).map_err(|source| FileError::Json {
            path: file.clone(),
            source,
        })?;
        Ok(write_atomically(&file, &text)?)
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

pub(crate) fn io_error(path: &Path) -> impl FnOnce(io::Error) -> FileError + '_ {
    move |source| FileError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Writes a file through a temporary one beside it, so a crash never leaves half of it.
pub(crate) fn write_atomically(path: &Path, data: &[u8]) -> Result<(), FileError> {
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    let temporary = PathBuf::from(temporary);
    fs::write(&temporary, data).map_err(io_error(&temporary))?;
    fs::rename(&temporary, path).map_err(io_error(path))
}

/// A text file that may not exist.
pub(crate) fn read_optional(path: &Path) -> Result<Option<String>, FileError> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_error(path)(e)),
    }
}

/// Removes a file that may not exist.
pub(crate) fn remove_optional(path: &Path) -> Result<(), FileError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_error(path)(e)),
    }
}

/// Writes a private key readable by the owner only.
pub(crate) fn write_private(path: &Path, text: &str) -> Result<(), FileError> {
    use std::io::Write;
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(io_error(path))?;
    file.write_all(text.as_bytes()).map_err(io_error(path))
}
