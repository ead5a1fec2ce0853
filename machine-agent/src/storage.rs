//! Durable configuration storage on the machine.
//!
//! A configuration is saved so that a crash at any instant leaves either the old or the
//! new file, never a torn one: the new content goes to a temporary file which is fsynced,
//! the current file is hard-linked to `config.previous` (kept as the last version), the
//! temporary file is renamed over `config.current`, and the directory is fsynced. A small
//! `config.meta` (generation and SHA-256) is written the same way afterwards; if a crash
//! separates the two, the content's hash tells the SCM what is applied.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::Digest;

/// File holding the configuration in force.
pub const CURRENT: &str = "config.current";
/// The version before it.
pub const PREVIOUS: &str = "config.previous";
/// Generation and hash of `config.current`.
pub const META: &str = "config.meta";

/// What is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// Generation from the SCM (0 if unknown, e.g. a version-0 CONFIG).
    pub generation: u64,
    /// SHA-256 of the content.
    pub sha256: [u8; 32],
    /// Size in bytes.
    pub len: usize,
}

/// Why storing failed.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot store the configuration in {dir}: {step}: {source}; check the storage directory's permissions and free space"
)]
pub struct StorageError {
    /// Storage directory.
    pub dir: PathBuf,
    /// Which step failed.
    pub step: &'static str,
    /// The I/O error.
    pub source: std::io::Error,
}

/// The agent's configuration directory (cheap to clone; the caller serialises saves).
#[derive(Debug, Clone)]
pub struct ConfigStore {
    dir: PathBuf,
}

fn sha(data: &[u8]) -> [u8; 32] {
    sha2::Sha256::digest(data).into()
}

impl ConfigStore {
    /// Opens (creating) the directory and removes temporary files a crash left behind.
    pub fn open(dir: &Path) -> Result<Self, StorageError> {
        let err = |step, source| StorageError {
            dir: dir.to_path_buf(),
            step,
            source,
        };
        fs::create_dir_all(dir).map_err(|e| err("create directory", e))?;
        if let Ok(entries) = fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().ends_with(".tmp") {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of the configuration in force.
    pub fn current_path(&self) -> PathBuf {
        self.dir.join(CURRENT)
    }

    /// Reads the current configuration's content.
    pub fn current(&self) -> Option<Vec<u8>> {
        fs::read(self.current_path()).ok()
    }

    /// Generation and hash of what is stored, if anything. The generation comes from
    /// `config.meta` only when its hash matches the content.
    pub fn applied(&self) -> Option<Applied> {
        let content = self.current()?;
        let digest = sha(&content);
        let generation = fs::read_to_string(self.dir.join(META))
            .ok()
            .and_then(|m| {
                let mut gen_ = None;
                let mut hash = None;
                for line in m.lines() {
                    if let Some(v) = line.strip_prefix("generation=") {
                        gen_ = v.trim().parse::<u64>().ok();
                    } else if let Some(v) = line.strip_prefix("sha256=") {
                        hash = hex::decode(v.trim()).ok();
                    }
                }
                (hash.as_deref() == Some(&digest[..]))
                    .then_some(gen_)
                    .flatten()
            })
            .unwrap_or(0);
        Some(Applied {
            generation,
            sha256: digest,
            len: content.len(),
        })
    }

    /// Stores `content` as generation `generation` durably; returns once it is on disk.
    pub fn save(&self, content: &[u8], generation: u64) -> Result<Applied, StorageError> {
        let err = |step, source| StorageError {
            dir: self.dir.clone(),
            step,
            source,
        };
        let digest = sha(content);
        let tmp = self.dir.join(format!("{CURRENT}.tmp"));
        write_synced(&tmp, content).map_err(|e| err("write temporary file", e))?;
        let current = self.current_path();
        if current.exists() {
            // Keep the old version: link it under a temporary name, then rename, so
            // `config.previous` is also never torn.
            let prev_tmp = self.dir.join(format!("{PREVIOUS}.tmp"));
            let _ = fs::remove_file(&prev_tmp);
            fs::hard_link(&current, &prev_tmp).map_err(|e| err("keep previous version", e))?;
            fs::rename(&prev_tmp, self.dir.join(PREVIOUS))
                .map_err(|e| err("keep previous version", e))?;
        }
        fs::rename(&tmp, &current).map_err(|e| err("replace current file", e))?;
        sync_dir(&self.dir).map_err(|e| err("sync directory", e))?;
        let meta = format!("generation={generation}\nsha256={}\n", hex::encode(digest));
        let meta_tmp = self.dir.join(format!("{META}.tmp"));
        write_synced(&meta_tmp, meta.as_bytes()).map_err(|e| err("write meta file", e))?;
        fs::rename(&meta_tmp, self.dir.join(META)).map_err(|e| err("write meta file", e))?;
        sync_dir(&self.dir).map_err(|e| err("sync directory", e))?;
        Ok(Applied {
            generation,
            sha256: digest,
            len: content.len(),
        })
    }
}

fn write_synced(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    f.write_all(data)?;
    f.sync_all()
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_keeps_previous_and_reports_generation() {
        let d = tempfile::tempdir().unwrap();
        let s = ConfigStore::open(d.path()).unwrap();
        assert_eq!(s.applied(), None);
        s.save(b"one\n", 1).unwrap();
        let a = s.save(b"two\n", 2).unwrap();
        assert_eq!(s.current().unwrap(), b"two\n");
        assert_eq!(fs::read(d.path().join(PREVIOUS)).unwrap(), b"one\n");
        assert_eq!(s.applied().unwrap(), a);
        assert_eq!(a.generation, 2);
        assert_eq!(hex::encode(a.sha256), hex::encode(sha(b"two\n")));
    }

    #[test]
    fn meta_that_does_not_match_content_gives_generation_zero() {
        let d = tempfile::tempdir().unwrap();
        let s = ConfigStore::open(d.path()).unwrap();
        s.save(b"one\n", 5).unwrap();
        // As if a crash happened after the content rename but before the meta rename.
        fs::write(d.path().join(CURRENT), b"two\n").unwrap();
        let a = s.applied().unwrap();
        assert_eq!(a.generation, 0);
        assert_eq!(a.sha256, sha(b"two\n"));
    }

    #[test]
    fn leftover_temporary_files_are_removed_on_open() {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join("config.current.tmp"), b"torn").unwrap();
        let s = ConfigStore::open(d.path()).unwrap();
        assert!(!d.path().join("config.current.tmp").exists());
        assert_eq!(s.current(), None);
    }

    #[test]
    fn unwritable_directory_gives_a_clear_error() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("not-a-dir");
        fs::write(&file, b"x").unwrap();
        let e = ConfigStore::open(&file.join("sub"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("create directory"), "{e}");
    }
}
