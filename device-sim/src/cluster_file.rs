//! `cluster.json`, as `deploy/local-cluster.sh up DIR` writes it: where a load run's devices
//! connect (the edges), where the operator's files are, and which processes to measure.
//!
//! ```json
//! {"edges": ["127.0.0.1:P1", "127.0.0.1:P2"], "data_dir": "/path",
//!  "pids": {"nats": [..], "postgres": [..], "edges": [..], "controllers": [..]}}
//! ```
//!
//! The lists of `pids` are in the same order as the addresses (`pids.edges[i]` listens on
//! `edges[i]`).

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::processes::MeasuredProcess;

/// A cluster's `cluster.json`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct ClusterFile {
    /// The edges' addresses, `HOST:PORT`, where devices and operators connect.
    pub edges: Vec<String>,
    /// The directory of `ca.pem`, `admin.pem` and `admin.key`.
    pub data_dir: PathBuf,
    /// The cluster's processes, by kind.
    pub pids: ClusterPids,
}

/// The process ids of `cluster.json`, by kind; a kind that is missing has none.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct ClusterPids {
    /// The NATS servers.
    #[serde(default)]
    pub nats: Vec<u32>,
    /// PostgreSQL's postmaster (its backends are its children).
    #[serde(default)]
    pub postgres: Vec<u32>,
    /// The edges, in the order of [`ClusterFile::edges`].
    #[serde(default)]
    pub edges: Vec<u32>,
    /// The controllers; the first is the one that served when the file was written.
    #[serde(default)]
    pub controllers: Vec<u32>,
}

/// Why a `cluster.json` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ClusterFileError {
    /// It could not be read.
    #[error("{}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// It is not JSON of the expected shape.
    #[error("{}: {source}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: serde_json::Error,
    },
    /// Its contents make no cluster.
    #[error("{}: {why}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
}

impl ClusterFile {
    /// Reads and checks `path`. A relative `data_dir` is taken relative to the file's
    /// directory.
    pub fn read(path: &Path) -> Result<ClusterFile, ClusterFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| ClusterFileError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut file = Self::parse(&text).map_err(|e| match e {
            ParseError::Json(source) => ClusterFileError::Json {
                path: path.to_owned(),
                source,
            },
            ParseError::Invalid(why) => ClusterFileError::Invalid {
                path: path.to_owned(),
                why,
            },
        })?;
        if file.data_dir.is_relative() {
            if let Some(dir) = path.parent() {
                file.data_dir = dir.join(&file.data_dir);
            }
        }
        Ok(file)
    }

    /// The file from its text: at least one edge, each `HOST:PORT`, and one edge pid for each
    /// edge address or none.
    fn parse(text: &str) -> Result<ClusterFile, ParseError> {
        let file: ClusterFile = serde_json::from_str(text).map_err(ParseError::Json)?;
        if file.edges.is_empty() {
            return Err(ParseError::Invalid("\"edges\" is empty".into()));
        }
        if let Some(bad) = file
            .edges
            .iter()
            .find(|e| fleet_certs::split_server(e).is_none())
        {
            return Err(ParseError::Invalid(format!(
                "edge {bad:?} is not HOST:PORT"
            )));
        }
        let pids = file.pids.edges.len();
        if pids != 0 && pids != file.edges.len() {
            return Err(ParseError::Invalid(format!(
                "\"pids\".\"edges\" has {pids} pids for {} edge addresses",
                file.edges.len()
            )));
        }
        Ok(file)
    }

    /// The processes to measure: `edge-0`, `edge-1`, … (each the edge of its address among
    /// `servers`, if it is one of them), `controller-0`, …, `nats-0`, …, and `postgres-0`, …
    /// (the postmaster with its children, the backends).
    pub fn processes(&self, servers: &[String]) -> Vec<MeasuredProcess> {
        let named = |kind: &str, pids: &[u32]| -> Vec<MeasuredProcess> {
            pids.iter()
                .enumerate()
                .map(|(i, &pid)| MeasuredProcess::new(format!("{kind}-{i}"), pid))
                .collect()
        };
        let mut processes = named("edge", &self.pids.edges);
        for (process, address) in processes.iter_mut().zip(&self.edges) {
            process.edge = servers.iter().position(|s| s == address);
        }
        processes.extend(named("controller", &self.pids.controllers));
        processes.extend(named("nats", &self.pids.nats));
        processes.extend(named("postgres", &self.pids.postgres).into_iter().map(|p| {
            MeasuredProcess {
                with_children: true,
                ..p
            }
        }));
        processes
    }
}

enum ParseError {
    Json(serde_json::Error),
    Invalid(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"{
  "edges": ["127.0.0.1:40001", "127.0.0.1:40002"],
  "data_dir": "/tmp/c/operator",
  "pids": {
    "nats": [11, 12, 13],
    "postgres": [20],
    "edges": [31, 32],
    "controllers": [41, 42]
  }
}"#;

    fn parse(text: &str) -> Result<ClusterFile, String> {
        ClusterFile::parse(text).map_err(|e| match e {
            ParseError::Json(e) => e.to_string(),
            ParseError::Invalid(why) => why,
        })
    }

    #[test]
    fn the_scripts_cluster_json_names_every_process() {
        let file = parse(FILE).unwrap();
        assert_eq!(file.edges, ["127.0.0.1:40001", "127.0.0.1:40002"]);
        assert_eq!(file.data_dir, PathBuf::from("/tmp/c/operator"));
        let processes = file.processes(&file.edges);
        let names: Vec<(&str, u32, Option<usize>, bool)> = processes
            .iter()
            .map(|p| (p.name.as_str(), p.pid, p.edge, p.with_children))
            .collect();
        assert_eq!(
            names,
            [
                ("edge-0", 31, Some(0), false),
                ("edge-1", 32, Some(1), false),
                ("controller-0", 41, None, false),
                ("controller-1", 42, None, false),
                ("nats-0", 11, None, false),
                ("nats-1", 12, None, false),
                ("nats-2", 13, None, false),
                ("postgres-0", 20, None, true),
            ]
        );
        // Servers given otherwise: an edge is matched by its address, or is none of them.
        let processes = file.processes(&["127.0.0.1:40002".to_owned()]);
        assert_eq!(processes[0].edge, None);
        assert_eq!(processes[1].edge, Some(0));
    }

    #[test]
    fn a_cluster_json_of_another_shape_is_refused_with_its_reason() {
        let missing_kinds = r#"{"edges": ["h:1"], "data_dir": "d", "pids": {}}"#;
        assert!(parse(missing_kinds).unwrap().processes(&[]).is_empty());
        for (text, why) in [
            (r#"{"edges": [], "data_dir": "d", "pids": {}}"#, "empty"),
            (
                r#"{"edges": ["nowhere"], "data_dir": "d", "pids": {}}"#,
                "nowhere",
            ),
            (
                r#"{"edges": ["h:1"], "data_dir": "d", "pids": {"edges": [1, 2]}}"#,
                "2 pids for 1",
            ),
            (r#"{"edges": ["h:1"], "pids": {}}"#, "data_dir"),
            (
                r#"{"edges": ["h:1"], "data_dir": "d", "pids": {"nats": [-1]}}"#,
                "-1",
            ),
            ("not json", "expected"),
        ] {
            let error = parse(text).unwrap_err();
            assert!(error.contains(why), "{text}: {error}");
        }
    }

    #[test]
    fn a_relative_data_dir_is_beside_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster.json");
        std::fs::write(&path, FILE.replace("/tmp/c/operator", "operator")).unwrap();
        let file = ClusterFile::read(&path).unwrap();
        assert_eq!(file.data_dir, dir.path().join("operator"));
        let missing = ClusterFile::read(&dir.path().join("none.json")).unwrap_err();
        assert!(
            matches!(missing, ClusterFileError::Read { .. }),
            "{missing}"
        );
        std::fs::write(&path, "{").unwrap();
        let broken = ClusterFile::read(&path).unwrap_err();
        assert!(broken.to_string().contains("cluster.json"), "{broken}");
    }
}
