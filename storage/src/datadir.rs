//! The files of a data dir around the log: its identity and the
//! clean-shutdown marker, and the atomic file writes they need.
//!
//! The identity says which cluster (and which replica of it) a data dir
//! belongs to. It is written once, atomically, when the data dir is created
//! (or adopted, for a data dir from before identities), and the same cluster
//! id is stored inside `log.redb`. A data dir with an identity whose log is
//! missing, empty or another cluster's is refused at start-up: starting a
//! brand-new cluster there would reuse job ids, output files and work dirs
//! of the jobs whose log was lost.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// The identity file inside a data dir.
pub const IDENTITY_FILE_NAME: &str = "identity";
/// Present only between a clean shutdown and the next start: without it,
/// start-up runs redb's integrity check over the whole file.
pub const CLEAN_SHUTDOWN_FILE_NAME: &str = "clean-shutdown";
/// The version of the data dir layout the identity file describes.
pub const DATA_DIR_FORMAT_VERSION: u32 = 1;

/// Who a data dir belongs to. Written once, never changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// 32 hex digits, random, the same in `identity` and inside `log.redb`.
    pub cluster_id: String,
    pub replica_id: u64,
    pub format_version: u32,
    /// When the data dir was created (or adopted), Unix ms.
    pub created_unix_ms: u64,
}

impl Identity {
    /// A fresh identity with a random cluster id.
    pub fn generate(replica_id: u64) -> std::io::Result<Identity> {
        let mut bytes = [0u8; 16];
        File::open("/dev/urandom")?.read_exact(&mut bytes)?;
        let cluster_id = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let created_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        Ok(Identity {
            cluster_id,
            replica_id,
            format_version: DATA_DIR_FORMAT_VERSION,
            created_unix_ms,
        })
    }

    pub fn encode(&self) -> String {
        format!(
            "# rustci data dir identity: written once, never edit\n\
             format_version = {}\ncluster_id = {}\nreplica_id = {}\ncreated_unix_ms = {}\n",
            self.format_version, self.cluster_id, self.replica_id, self.created_unix_ms
        )
    }

    /// Parses [`Identity::encode`]'s output; `Err` says what is wrong.
    pub fn decode(text: &str) -> Result<Identity, String> {
        let mut format_version = None;
        let mut cluster_id = None;
        let mut replica_id = None;
        let mut created = None;
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (key, value) = line
                .split_once('=')
                .map(|(k, v)| (k.trim(), v.trim()))
                .ok_or_else(|| format!("line {line:?} is not `key = value`"))?;
            let number = |v: &str| {
                v.parse::<u64>()
                    .map_err(|_| format!("{key} = {v:?} is not a number"))
            };
            match key {
                "format_version" => format_version = Some(number(value)?),
                "cluster_id" => {
                    if value.len() != 32 || !value.bytes().all(|b| b.is_ascii_hexdigit()) {
                        return Err(format!("cluster_id {value:?} is not 32 hex digits"));
                    }
                    cluster_id = Some(value.to_string())
                }
                "replica_id" => replica_id = Some(number(value)?),
                "created_unix_ms" => created = Some(number(value)?),
                _ => {} // Later versions may add keys.
            }
        }
        let format_version = format_version.ok_or("format_version is missing")?;
        if format_version != u64::from(DATA_DIR_FORMAT_VERSION) {
            return Err(format!(
                "format_version {format_version} is not supported (this rustci reads {DATA_DIR_FORMAT_VERSION})"
            ));
        }
        Ok(Identity {
            cluster_id: cluster_id.ok_or("cluster_id is missing")?,
            replica_id: replica_id.ok_or("replica_id is missing")?,
            format_version: DATA_DIR_FORMAT_VERSION,
            created_unix_ms: created.ok_or("created_unix_ms is missing")?,
        })
    }

    /// Reads `data_dir/identity`: `Ok(None)` when there is none.
    pub fn read(data_dir: &Path) -> Result<Option<Identity>, (PathBuf, String)> {
        let path = data_dir.join(IDENTITY_FILE_NAME);
        match std::fs::read_to_string(&path) {
            Ok(text) => Identity::decode(&text).map(Some).map_err(|e| (path, e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err((path, e.to_string())),
        }
    }

    /// Writes `data_dir/identity` atomically (temp file, fsync, rename, fsync dir).
    pub fn write(&self, data_dir: &Path) -> std::io::Result<()> {
        write_atomically(&data_dir.join(IDENTITY_FILE_NAME), self.encode().as_bytes())
    }
}

/// Writes `path` so that it either holds `bytes` whole or is as before:
/// a temp file beside it, fsync, rename over it, fsync of the directory.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = temp_path(path);
    let result = (|| {
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, path)?;
        sync_dir(path.parent().unwrap_or(Path::new(".")))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// `path` with `.tmp` appended: where a file is built before it is renamed in.
pub fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Makes the directory entries of `dir` (renames, creations, removals) durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_round_trips_and_rejects_garbage() {
        let id = Identity::generate(1).unwrap();
        assert_eq!(Identity::decode(&id.encode()).unwrap(), id);
        assert!(Identity::decode("").is_err());
        assert!(Identity::decode("format_version = 9\ncluster_id = x").is_err());
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Identity::read(dir.path()).unwrap(), None);
        id.write(dir.path()).unwrap();
        assert_eq!(Identity::read(dir.path()).unwrap(), Some(id));
        assert!(!temp_path(&dir.path().join(IDENTITY_FILE_NAME)).exists());
    }
}
