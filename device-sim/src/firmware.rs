//! The station side of the firmware transfer on `stations/<serial>/firmware/…`: a resumable,
//! checksummed download that pulls the image chunk by chunk. No MQTT here: the shell sends the
//! [`ChunkRequest`]s this returns and feeds it the [`ChunkMessage`]s that arrive.

use std::fs;
use std::io::{self, Read, Write};
use std::path::PathBuf;

use sha2::{Digest, Sha256};

/// Bytes asked for per chunk.
pub const DEFAULT_CHUNK_LEN: u64 = 16_384;
/// How often a download is restarted from 0 after a checksum mismatch before giving up.
pub const MAX_RESTARTS: u32 = 3;

/// The `update` command: which image to fetch and how to check it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpdateOrder {
    /// Version to install.
    pub version: String,
    /// SHA-256 of the whole image.
    pub sha256: [u8; 32],
    /// Size of the image in bytes.
    pub size: u64,
}

impl UpdateOrder {
    /// The checksum as lower-case hex, as kept in `station.json`.
    pub fn sha256_hex(&self) -> String {
        hex::encode(self.sha256)
    }
}

pub use fleet_protocol::payload::{
    ChunkError, FirmwareChunk as ChunkMessage, FirmwareRequest as ChunkRequest,
};

/// Where the downloaded bytes go; its length is the resume offset.
pub trait PartFile {
    /// Bytes stored so far.
    fn len(&self) -> io::Result<u64>;
    /// Whether nothing is stored yet.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Appends bytes.
    fn append(&mut self, data: &[u8]) -> io::Result<()>;
    /// SHA-256 of everything stored.
    fn sha256(&self) -> io::Result<[u8; 32]>;
    /// Forgets everything stored.
    fn remove(&mut self) -> io::Result<()>;
}

/// A part file on disk (`<dir>/firmware-<version>.part`); a missing file is an empty one.
#[derive(Clone, Debug)]
pub struct DiskPartFile {
    path: PathBuf,
}

impl DiskPartFile {
    /// The part file at `path`.
    pub fn new(path: PathBuf) -> Self {
        DiskPartFile { path }
    }
}

impl PartFile for DiskPartFile {
    fn len(&self) -> io::Result<u64> {
        match fs::metadata(&self.path) {
            Ok(meta) => Ok(meta.len()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(e),
        }
    }

    fn append(&mut self, data: &[u8]) -> io::Result<()> {
        let mut file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        file.write_all(data)?;
        file.sync_data()
    }

    fn sha256(&self) -> io::Result<[u8; 32]> {
        let mut hasher = Sha256::new();
        let mut file = match fs::File::open(&self.path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(hasher.finalize().into()),
            Err(e) => return Err(e),
        };
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            let read = file.read(&mut buffer)?;
            if read == 0 {
                break;
            }
            hasher.update(&buffer[..read]);
        }
        Ok(hasher.finalize().into())
    }

    fn remove(&mut self) -> io::Result<()> {
        match fs::remove_file(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// A part file in memory, for tests.
#[derive(Clone, Debug, Default)]
pub struct MemoryPartFile {
    /// The stored bytes.
    pub bytes: Vec<u8>,
}

impl PartFile for MemoryPartFile {
    fn len(&self) -> io::Result<u64> {
        Ok(self.bytes.len() as u64)
    }

    fn append(&mut self, data: &[u8]) -> io::Result<()> {
        self.bytes.extend_from_slice(data);
        Ok(())
    }

    fn sha256(&self) -> io::Result<[u8; 32]> {
        Ok(Sha256::digest(&self.bytes).into())
    }

    fn remove(&mut self) -> io::Result<()> {
        self.bytes.clear();
        Ok(())
    }
}

/// What the shell does next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Send this request; `offset` of `total` bytes are stored.
    Request {
        /// The next request.
        request: ChunkRequest,
        /// Bytes stored.
        offset: u64,
        /// Size of the image.
        total: u64,
    },
    /// The image did not match its checksum: it was deleted; send this request (from 0).
    Restart {
        /// The first request of the new attempt.
        request: ChunkRequest,
        /// Restarts so far, this one included (persist it).
        restarts: u32,
        /// Why.
        reason: String,
    },
    /// The chunk was not the one expected; wait for the right one.
    Ignored {
        /// Why.
        reason: String,
    },
    /// The whole image is stored and matches its checksum: install it.
    Complete,
    /// Give up; the part file is deleted.
    Failed {
        /// Why.
        reason: String,
    },
}

/// A download in progress.
#[derive(Debug)]
pub struct Download<P> {
    order: UpdateOrder,
    part: P,
    restarts: u32,
    chunk_len: u64,
}

impl<P: PartFile> Download<P> {
    /// A download of `order` into `part`, which may already hold a prefix of the image
    /// (resume); `restarts` is the count kept from earlier attempts.
    pub fn new(order: UpdateOrder, part: P, restarts: u32) -> Self {
        Download {
            order,
            part,
            restarts,
            chunk_len: DEFAULT_CHUNK_LEN,
        }
    }

    /// Asks for chunks of `chunk_len` bytes (at least 1).
    pub fn with_chunk_len(mut self, chunk_len: u64) -> Self {
        self.chunk_len = chunk_len.max(1);
        self
    }

    /// The order being carried out.
    pub fn order(&self) -> &UpdateOrder {
        &self.order
    }

    /// The part file.
    pub fn part(&self) -> &P {
        &self.part
    }

    /// Restarts so far.
    pub fn restarts(&self) -> u32 {
        self.restarts
    }

    /// The first step: ask for the bytes after what is stored, or check the image if it is
    /// all there already (a reboot between the last chunk and the check).
    pub fn start(&mut self) -> io::Result<Step> {
        let stored = self.part.len()?;
        if stored >= self.order.size {
            return self.verify();
        }
        Ok(self.request_from(stored, self.order.size))
    }

    fn chunk_request(&self, offset: u64) -> ChunkRequest {
        ChunkRequest {
            version: self.order.version.clone(),
            offset,
            length: self.chunk_len,
        }
    }

    fn request_from(&self, offset: u64, total: u64) -> Step {
        Step::Request {
            request: self.chunk_request(offset),
            offset,
            total,
        }
    }

    /// Takes a chunk message from the controller.
    pub fn on_chunk(&mut self, message: ChunkMessage) -> io::Result<Step> {
        match message {
            ChunkMessage::Error {
                version,
                error,
                code,
            } => {
                if version != self.order.version {
                    return Ok(Step::Ignored {
                        reason: format!(
                            "error for version {version}, downloading {}",
                            self.order.version
                        ),
                    });
                }
                self.part.remove()?;
                Ok(Step::Failed {
                    reason: format!("controller refused the download: {code}: {error}"),
                })
            }
            ChunkMessage::Data {
                version,
                offset,
                total,
                data,
            } => {
                if version != self.order.version {
                    return Ok(Step::Ignored {
                        reason: format!(
                            "chunk of version {version}, downloading {}",
                            self.order.version
                        ),
                    });
                }
                let expected = self.part.len()?;
                if offset != expected {
                    return Ok(Step::Ignored {
                        reason: format!("chunk at offset {offset}, expected {expected}"),
                    });
                }
                let end = offset.saturating_add(data.len() as u64);
                if end > total {
                    return Ok(Step::Ignored {
                        reason: format!("chunk ends at {end}, past the image size {total}"),
                    });
                }
                if data.is_empty() && end < total {
                    // Asking again would get the same empty answer for ever.
                    self.part.remove()?;
                    return Ok(Step::Failed {
                        reason: format!("empty chunk at offset {offset} of {total}"),
                    });
                }
                self.part.append(&data)?;
                if end == total {
                    self.verify()
                } else {
                    Ok(self.request_from(end, total))
                }
            }
        }
    }

    fn verify(&mut self) -> io::Result<Step> {
        let digest = self.part.sha256()?;
        if digest == self.order.sha256 {
            return Ok(Step::Complete);
        }
        self.part.remove()?;
        let reason = format!(
            "SHA-256 of the image is {}, expected {}",
            hex::encode(digest),
            self.order.sha256_hex()
        );
        if self.restarts >= MAX_RESTARTS {
            return Ok(Step::Failed {
                reason: format!("{reason}; gave up after {} restarts", self.restarts),
            });
        }
        self.restarts += 1;
        Ok(Step::Restart {
            request: self.chunk_request(0),
            restarts: self.restarts,
            reason,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    fn order_for(bytes: &[u8]) -> UpdateOrder {
        UpdateOrder {
            version: "6.1.0".into(),
            sha256: Sha256::digest(bytes).into(),
            size: bytes.len() as u64,
        }
    }

    /// The controller's side of the contract: answers a request from `image`.
    fn serve(image: &[u8], request: &ChunkRequest) -> ChunkMessage {
        let start = request.offset.min(image.len() as u64) as usize;
        let end = (start + request.length as usize).min(image.len());
        ChunkMessage::Data {
            version: request.version.clone(),
            offset: request.offset,
            total: image.len() as u64,
            data: image[start..end].to_vec(),
        }
    }

    /// Runs a download against a fake controller until it completes or fails.
    fn drive(download: &mut Download<MemoryPartFile>, image: &[u8]) -> (Step, Vec<u64>) {
        let mut offsets = Vec::new();
        let mut step = download.start().unwrap();
        loop {
            match step {
                Step::Request { ref request, .. } | Step::Restart { ref request, .. } => {
                    offsets.push(request.offset);
                    // Through the wire format, as the shell does.
                    let payload = serve(image, request).to_json().to_string();
                    step = download
                        .on_chunk(ChunkMessage::parse(payload.as_bytes()).unwrap())
                        .unwrap();
                }
                other => return (other, offsets),
            }
        }
    }

    #[test]
    fn downloads_in_chunks_and_verifies() {
        let bytes = image(40_000);
        let mut download = Download::new(order_for(&bytes), MemoryPartFile::default(), 0);
        let (step, offsets) = drive(&mut download, &bytes);
        assert_eq!(step, Step::Complete);
        assert_eq!(offsets, vec![0, 16_384, 32_768]);
        assert_eq!(download.part().bytes, bytes);
    }

    #[test]
    fn resumes_at_the_stored_length() {
        let bytes = image(40_000);
        let part = MemoryPartFile {
            bytes: bytes[..20_000].to_vec(),
        };
        let mut download = Download::new(order_for(&bytes), part, 0);
        let (step, offsets) = drive(&mut download, &bytes);
        assert_eq!(step, Step::Complete);
        assert_eq!(offsets, vec![20_000, 36_384]);
    }

    #[test]
    fn complete_part_file_is_checked_at_start() {
        let bytes = image(100);
        let part = MemoryPartFile {
            bytes: bytes.clone(),
        };
        let mut download = Download::new(order_for(&bytes), part, 0);
        assert_eq!(download.start().unwrap(), Step::Complete);
    }

    #[test]
    fn ignores_chunks_at_other_offsets_and_versions() {
        let bytes = image(100);
        let mut download =
            Download::new(order_for(&bytes), MemoryPartFile::default(), 0).with_chunk_len(10);
        download.start().unwrap();
        let wrong_offset = ChunkMessage::Data {
            version: "6.1.0".into(),
            offset: 10,
            total: 100,
            data: bytes[10..20].to_vec(),
        };
        assert!(matches!(
            download.on_chunk(wrong_offset).unwrap(),
            Step::Ignored { .. }
        ));
        let wrong_version = ChunkMessage::Data {
            version: "6.2.0".into(),
            offset: 0,
            total: 100,
            data: bytes[..10].to_vec(),
        };
        assert!(matches!(
            download.on_chunk(wrong_version).unwrap(),
            Step::Ignored { .. }
        ));
        let past_end = ChunkMessage::Data {
            version: "6.1.0".into(),
            offset: 0,
            total: 5,
            data: bytes[..10].to_vec(),
        };
        assert!(matches!(
            download.on_chunk(past_end).unwrap(),
            Step::Ignored { .. }
        ));
        assert!(download.part().bytes.is_empty());
    }

    #[test]
    fn checksum_mismatch_restarts_three_times_then_gives_up() {
        let bytes = image(1000);
        let mut order = order_for(&bytes);
        order.sha256[0] ^= 0xff;
        let mut download = Download::new(order, MemoryPartFile::default(), 0);
        let mut step = download.start().unwrap();
        let mut restarts = Vec::new();
        loop {
            step = match step {
                Step::Restart {
                    restarts: n,
                    ref request,
                    ..
                } => {
                    restarts.push(n);
                    assert_eq!(request.offset, 0);
                    assert!(download.part().bytes.is_empty());
                    download.on_chunk(serve(&bytes, request)).unwrap()
                }
                Step::Request { ref request, .. } => {
                    download.on_chunk(serve(&bytes, request)).unwrap()
                }
                Step::Failed { reason } => {
                    assert!(reason.contains("gave up"), "{reason}");
                    break;
                }
                other => panic!("unexpected {other:?}"),
            };
        }
        assert_eq!(restarts, vec![1, 2, 3]);
        assert!(download.part().bytes.is_empty());
    }

    #[test]
    fn controller_error_fails_the_download() {
        let bytes = image(10);
        let mut download = Download::new(order_for(&bytes), MemoryPartFile::default(), 0);
        download.start().unwrap();
        let payload = br#"{"version":"6.1.0","error":"no such image","code":"not_found"}"#;
        let step = download
            .on_chunk(ChunkMessage::parse(payload).unwrap())
            .unwrap();
        assert!(matches!(step, Step::Failed { reason } if reason.contains("not_found")));
    }

    #[test]
    fn malformed_chunks_are_errors_not_panics() {
        assert!(ChunkMessage::parse(b"not json").is_err());
        assert!(ChunkMessage::parse(br#"{"version":"1"}"#).is_err());
        assert!(
            ChunkMessage::parse(br#"{"version":"1","offset":0,"total":3,"data":"!!"}"#).is_err()
        );
        assert!(
            ChunkMessage::parse(br#"{"version":"1","offset":-1,"total":3,"data":""}"#).is_err()
        );
    }

    #[test]
    fn disk_part_file_keeps_the_offset_in_its_length() {
        let dir = tempfile::tempdir().unwrap();
        let mut part = DiskPartFile::new(dir.path().join("firmware-6.1.0.part"));
        assert_eq!(part.len().unwrap(), 0);
        part.append(b"abc").unwrap();
        part.append(b"def").unwrap();
        let reopened = DiskPartFile::new(dir.path().join("firmware-6.1.0.part"));
        assert_eq!(reopened.len().unwrap(), 6);
        assert_eq!(
            reopened.sha256().unwrap(),
            <[u8; 32]>::from(Sha256::digest(b"abcdef"))
        );
        part.remove().unwrap();
        assert_eq!(reopened.len().unwrap(), 0);
    }
}
