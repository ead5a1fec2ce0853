//! Durable configuration storage on the machine.
//!
//! A configuration is saved so that a crash or a full disk at any instant leaves the
//! content and what the agent reports about it (generation, SHA-256) in agreement:
//!
//! 1. `config.meta` is replaced first (temporary file, fsync, rename, directory fsync). It
//!    names two entries: the new generation with the new content's hash, and the entry of
//!    the content in force now. Whichever of the two contents `config.current` holds after
//!    a crash, its hash picks the right generation.
//! 2. The new content goes to a temporary file, which is fsynced; the current file is
//!    hard-linked to `config.previous` (kept as the last version); the temporary file is
//!    renamed over `config.current`, and the directory is fsynced.
//!
//! Every step that can run out of space (1 and the content's temporary file) happens
//! before `config.current` is replaced, so a full disk refuses the configuration with the
//! old one intact and reported as before; nothing after the rename allocates. Opening the
//! store removes temporary files a crash left and rewrites a `config.meta` that does not
//! describe `config.current` (the generation is then re-derived from whichever entry
//! matches, or unknown: 0).

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

/// What the generation fence decides about a version-1 CONFIG (docs/protocol.md section
/// 7), from what is stored: generations only move forward, so a retried, late or foreign
/// delivery can never roll the machine back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fence {
    /// Newer than what is stored (or nothing known is stored): store it.
    Store,
    /// The very generation stored, same content: answer ACK again without rewriting it.
    Repeat,
    /// Older than the stored generation, or the same generation with other content:
    /// refuse with NACK `STALE`, nothing written.
    Stale {
        /// The generation stored.
        stored: u64,
    },
}

impl Fence {
    /// Decides for a CONFIG of `generation` whose content hashes to `sha256`. A stored
    /// generation 0 (a version-0 CONFIG, or a `config.meta` that did not name the
    /// content) says nothing about order, so anything but a repeat of it is stored.
    pub fn decide(stored: Option<&Applied>, generation: u64, sha256: &[u8; 32]) -> Fence {
        let Some(stored) = stored else {
            return Fence::Store;
        };
        let same = stored.sha256 == *sha256;
        if generation == stored.generation && same {
            return Fence::Repeat;
        }
        if stored.generation == 0 || generation > stored.generation {
            return Fence::Store;
        }
        Fence::Stale {
            stored: stored.generation,
        }
    }
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

/// SHA-256 of `data`.
pub fn sha(data: &[u8]) -> [u8; 32] {
    sha2::Sha256::digest(data).into()
}

/// One step of [`ConfigStore::save`], named for fault injection and in errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Step {
    /// Writing and fsyncing `config.meta.tmp`.
    WriteMeta,
    /// Renaming it over `config.meta`.
    RenameMeta,
    /// Fsyncing the directory after the meta rename.
    SyncMeta,
    /// Writing and fsyncing `config.current.tmp`.
    WriteContent,
    /// Linking the current file as `config.previous`.
    KeepPrevious,
    /// Renaming the content over `config.current`.
    ReplaceCurrent,
    /// Fsyncing the directory after that rename.
    SyncDirectory,
}

impl Step {
    /// Every step, in order.
    pub const ALL: [Step; 7] = [
        Step::WriteMeta,
        Step::RenameMeta,
        Step::SyncMeta,
        Step::WriteContent,
        Step::KeepPrevious,
        Step::ReplaceCurrent,
        Step::SyncDirectory,
    ];

    fn describe(self) -> &'static str {
        match self {
            Step::WriteMeta => "write meta file",
            Step::RenameMeta => "replace meta file",
            Step::SyncMeta => "sync directory",
            Step::WriteContent => "write temporary file",
            Step::KeepPrevious => "keep previous version",
            Step::ReplaceCurrent => "replace current file",
            Step::SyncDirectory => "sync directory",
        }
    }

    /// The name of the agent's fail point just before this step (`SCM_FAILPOINTS`), used by
    /// the kill -9 tests.
    pub fn failpoint(self) -> &'static str {
        match self {
            Step::WriteMeta => "agent-save-write-meta",
            Step::RenameMeta => "agent-save-rename-meta",
            Step::SyncMeta => "agent-save-sync-meta",
            Step::WriteContent => "agent-save-write-content",
            Step::KeepPrevious => "agent-save-keep-previous",
            Step::ReplaceCurrent => "agent-save-replace-current",
            Step::SyncDirectory => "agent-save-sync-directory",
        }
    }
}

/// A (generation, hash) pair as `config.meta` records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    generation: u64,
    sha256: [u8; 32],
}

fn parse_meta(text: &str) -> Vec<Entry> {
    let mut cur = (None, None);
    let mut prev = (None, None);
    for line in text.lines() {
        let (k, v) = match line.split_once('=') {
            Some((k, v)) => (k.trim(), v.trim()),
            None => continue,
        };
        let hash = || {
            hex::decode(v)
                .ok()
                .and_then(|h| <[u8; 32]>::try_from(h).ok())
        };
        match k {
            "generation" => cur.0 = v.parse::<u64>().ok(),
            "sha256" => cur.1 = hash(),
            "previous_generation" => prev.0 = v.parse::<u64>().ok(),
            "previous_sha256" => prev.1 = hash(),
            _ => {}
        }
    }
    [cur, prev]
        .into_iter()
        .filter_map(|e| match e {
            (Some(generation), Some(sha256)) => Some(Entry { generation, sha256 }),
            _ => None,
        })
        .collect()
}

fn render_meta(current: Entry, previous: Option<Entry>) -> String {
    let mut s = format!(
        "generation={}\nsha256={}\n",
        current.generation,
        hex::encode(current.sha256)
    );
    if let Some(p) = previous {
        s.push_str(&format!(
            "previous_generation={}\nprevious_sha256={}\n",
            p.generation,
            hex::encode(p.sha256)
        ));
    }
    s
}

impl ConfigStore {
    /// Opens (creating) the directory, removes temporary files a crash left behind, and
    /// rewrites `config.meta` when it does not describe `config.current`.
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
        let store = Self {
            dir: dir.to_path_buf(),
        };
        store.repair().map_err(|e| err("repair meta file", e))?;
        Ok(store)
    }

    /// Makes `config.meta` name exactly the content in force (after a crash between the
    /// meta rename and the content rename it names the new content first).
    fn repair(&self) -> std::io::Result<()> {
        let Some(content) = self.current() else {
            return Ok(());
        };
        let digest = sha(&content);
        let entries = fs::read_to_string(self.dir.join(META))
            .map(|t| parse_meta(&t))
            .unwrap_or_default();
        if entries.first().is_some_and(|e| e.sha256 == digest) {
            return Ok(());
        }
        let current = entries
            .iter()
            .find(|e| e.sha256 == digest)
            .copied()
            .unwrap_or(Entry {
                generation: 0,
                sha256: digest,
            });
        tracing::warn!(
            generation = current.generation,
            "config.meta did not describe config.current; rewritten"
        );
        let tmp = self.dir.join(format!("{META}.tmp"));
        write_synced(&tmp, render_meta(current, None).as_bytes())?;
        fs::rename(&tmp, self.dir.join(META))?;
        sync_dir(&self.dir)
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

    /// Generation and hash of what is stored, if anything. The generation is the one
    /// `config.meta` gives for this content's hash (0 if it names none).
    pub fn applied(&self) -> Option<Applied> {
        let content = self.current()?;
        let digest = sha(&content);
        let generation = fs::read_to_string(self.dir.join(META))
            .ok()
            .and_then(|m| {
                parse_meta(&m)
                    .into_iter()
                    .find(|e| e.sha256 == digest)
                    .map(|e| e.generation)
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
        self.save_with(content, generation, &mut |step| {
            if scm_common::failpoint::is_active(step.failpoint()) {
                tracing::warn!("failpoint {} reached; pausing", step.failpoint());
                loop {
                    std::thread::park();
                }
            }
            Ok(())
        })
    }

    /// [`save`](Self::save), calling `before` ahead of each step: an error it returns is
    /// taken as that step's failure (fault injection).
    pub fn save_with(
        &self,
        content: &[u8],
        generation: u64,
        before: &mut dyn FnMut(Step) -> std::io::Result<()>,
    ) -> Result<Applied, StorageError> {
        let mut run = |step: Step, f: &mut dyn FnMut() -> std::io::Result<()>| {
            before(step)
                .and_then(|()| f())
                .map_err(|source| StorageError {
                    dir: self.dir.clone(),
                    step: step.describe(),
                    source,
                })
        };
        let digest = sha(content);
        let new = Entry {
            generation,
            sha256: digest,
        };
        let old = self.applied().map(|a| Entry {
            generation: a.generation,
            sha256: a.sha256,
        });
        let meta_tmp = self.dir.join(format!("{META}.tmp"));
        let meta = render_meta(new, old.filter(|o| o.sha256 != digest));
        run(Step::WriteMeta, &mut || {
            write_synced(&meta_tmp, meta.as_bytes())
        })?;
        run(Step::RenameMeta, &mut || {
            fs::rename(&meta_tmp, self.dir.join(META))
        })?;
        run(Step::SyncMeta, &mut || sync_dir(&self.dir))?;
        let tmp = self.dir.join(format!("{CURRENT}.tmp"));
        run(Step::WriteContent, &mut || write_synced(&tmp, content))?;
        let current = self.current_path();
        run(Step::KeepPrevious, &mut || {
            if !current.exists() {
                return Ok(());
            }
            // Link under a temporary name, then rename, so `config.previous` is never torn.
            let prev_tmp = self.dir.join(format!("{PREVIOUS}.tmp"));
            let _ = fs::remove_file(&prev_tmp);
            fs::hard_link(&current, &prev_tmp)?;
            fs::rename(&prev_tmp, self.dir.join(PREVIOUS))
        })?;
        run(Step::ReplaceCurrent, &mut || fs::rename(&tmp, &current))?;
        // From here on the new content is in force and `config.meta` describes it; a
        // failed directory sync only means the rename's durability is not confirmed.
        run(Step::SyncDirectory, &mut || sync_dir(&self.dir))?;
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
    fn the_fence_only_lets_generations_move_forward() {
        let (a, b) = (sha(b"a"), sha(b"b"));
        let stored = |generation, sha256| Applied {
            generation,
            sha256,
            len: 1,
        };
        let cases = [
            (None, 1, a, Fence::Store, "nothing stored"),
            (Some(stored(5, a)), 6, b, Fence::Store, "newer"),
            (
                Some(stored(5, a)),
                6,
                a,
                Fence::Store,
                "newer, same content",
            ),
            (Some(stored(5, a)), 5, a, Fence::Repeat, "a retried push"),
            (
                Some(stored(5, a)),
                5,
                b,
                Fence::Stale { stored: 5 },
                "same generation, other content",
            ),
            (
                Some(stored(5, a)),
                4,
                b,
                Fence::Stale { stored: 5 },
                "older",
            ),
            (
                Some(stored(5, a)),
                4,
                a,
                Fence::Stale { stored: 5 },
                "older, same content",
            ),
            (Some(stored(5, a)), 0, b, Fence::Stale { stored: 5 }, "zero"),
            (
                Some(stored(0, a)),
                1,
                b,
                Fence::Store,
                "stored by version 0",
            ),
            (
                Some(stored(0, a)),
                0,
                a,
                Fence::Repeat,
                "version-0 content again",
            ),
        ];
        for (stored, generation, digest, want, what) in cases {
            assert_eq!(
                Fence::decide(stored.as_ref(), generation, &digest),
                want,
                "{what}"
            );
        }
    }

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

    fn enospc() -> std::io::Error {
        std::io::Error::from_raw_os_error(28)
    }

    /// The promise at every step: a save that fails leaves the old content reported with
    /// its own generation, a save that replaced the content reports the new one, and a
    /// restart (re-open) reports the same as before it.
    #[test]
    fn a_fault_at_any_step_never_leaves_content_and_generation_apart() {
        for fault in Step::ALL {
            let d = tempfile::tempdir().unwrap();
            let s = ConfigStore::open(d.path()).unwrap();
            s.save(b"old\n", 4).unwrap();
            let r = s.save_with(b"new\n", 5, &mut |step| {
                if step == fault { Err(enospc()) } else { Ok(()) }
            });
            let e = r.expect_err("the injected fault fails the save");
            assert!(e.to_string().contains(fault.describe()), "{fault:?}: {e}");
            let replaced = fault == Step::SyncDirectory;
            let (content, generation): (&[u8], u64) = if replaced {
                (b"new\n", 5)
            } else {
                (b"old\n", 4)
            };
            for (when, store) in [
                ("before restart", s.clone()),
                ("after restart", ConfigStore::open(d.path()).unwrap()),
            ] {
                assert_eq!(store.current().unwrap(), content, "{fault:?} {when}");
                let a = store.applied().unwrap();
                assert_eq!(a.generation, generation, "{fault:?} {when}");
                assert_eq!(a.sha256, sha(content), "{fault:?} {when}");
            }
            // The next save works and reports its own generation.
            let s = ConfigStore::open(d.path()).unwrap();
            assert_eq!(s.save(b"next\n", 6).unwrap().generation, 6);
            assert_eq!(s.applied().unwrap().generation, 6);
        }
    }

    /// A crash is a save that stops dead before some step; what is on disk then is read
    /// by a new process (open, then applied).
    #[test]
    fn a_crash_before_any_step_is_repaired_at_start() {
        for crash in Step::ALL {
            let d = tempfile::tempdir().unwrap();
            let s = ConfigStore::open(d.path()).unwrap();
            s.save(b"old\n", 4).unwrap();
            let _ = s.save_with(b"new\n", 5, &mut |step| {
                if step >= crash {
                    Err(std::io::Error::other("crash"))
                } else {
                    Ok(())
                }
            });
            let after = ConfigStore::open(d.path()).unwrap();
            let a = after.applied().unwrap();
            let expected: (&[u8], u64) = if crash > Step::ReplaceCurrent {
                (b"new\n", 5)
            } else {
                (b"old\n", 4)
            };
            assert_eq!(after.current().unwrap(), expected.0, "{crash:?}");
            assert_eq!(a.generation, expected.1, "{crash:?}");
            let meta = parse_meta(&fs::read_to_string(d.path().join(META)).unwrap());
            assert_eq!(
                meta[0].sha256,
                sha(expected.0),
                "meta repaired to name the content ({crash:?})"
            );
            assert!(
                !fs::read_dir(d.path())
                    .unwrap()
                    .flatten()
                    .any(|e| e.file_name().to_string_lossy().ends_with(".tmp")),
                "no temporary file left ({crash:?})"
            );
        }
    }

    #[test]
    fn a_meta_file_from_before_the_two_entry_format_is_read() {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join(CURRENT), b"x\n").unwrap();
        fs::write(
            d.path().join(META),
            format!("generation=9\nsha256={}\n", hex::encode(sha(b"x\n"))),
        )
        .unwrap();
        let s = ConfigStore::open(d.path()).unwrap();
        assert_eq!(s.applied().unwrap().generation, 9);
    }

    /// A real tiny file system: configurations sized at and around the free space left
    /// (where the content fits but nothing more does) are either stored and reported, or
    /// refused with the old one in force and reported. Needs root (mount); CI runs as root.
    #[test]
    fn a_full_tmpfs_refuses_before_replacing_and_never_reports_a_stale_generation() {
        if !nix_is_root() {
            eprintln!("skipped: mounting a tmpfs needs root");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let mnt = d.path().join("tiny");
        fs::create_dir(&mnt).unwrap();
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
            .arg(&mnt)
            .status()
            .expect("run mount");
        assert!(st.success(), "mount a 64 KiB tmpfs");
        struct Unmount(PathBuf);
        impl Drop for Unmount {
            fn drop(&mut self) {
                let _ = std::process::Command::new("umount").arg(&self.0).status();
            }
        }
        let _u = Unmount(mnt.clone());
        let free_bytes = || -> usize {
            let out = std::process::Command::new("stat")
                .args(["-f", "-c", "%a %S"])
                .arg(&mnt)
                .output()
                .expect("stat -f");
            let text = String::from_utf8_lossy(&out.stdout);
            let mut it = text.split_whitespace().map(|v| v.parse::<usize>().unwrap());
            it.next().unwrap() * it.next().unwrap()
        };
        let (mut stored, mut refused) = (0, 0);
        for round in 0..16 {
            // Start empty each round; a round keeps 0, 1 or 2 earlier versions (no
            // `config.previous` yet, or one that is freed when it is replaced).
            for e in fs::read_dir(&mnt).unwrap().flatten() {
                fs::remove_file(e.path()).unwrap();
            }
            let s = ConfigStore::open(&mnt).unwrap();
            let mut generation = 0;
            let mut in_force: Option<(Vec<u8>, u64)> = None;
            for small in [&b"small\n"[..], b"tiny\n"].iter().take(round % 3) {
                generation += 1;
                s.save(small, generation).unwrap();
                in_force = Some((small.to_vec(), generation));
            }
            let free = free_bytes();
            let size = match round / 3 % 4 {
                0 => free,
                1 => free - 100,
                2 => free - 4096,
                _ => free + 1,
            };
            generation += 1;
            let content = vec![b'a' + round as u8; size];
            match s.save(&content, generation) {
                Ok(a) => {
                    stored += 1;
                    assert_eq!(a.generation, generation);
                    in_force = Some((content, generation));
                }
                Err(e) => {
                    refused += 1;
                    assert_eq!(e.source.raw_os_error(), Some(28), "{e}");
                }
            }
            for store in [s.clone(), ConfigStore::open(&mnt).unwrap()] {
                match &in_force {
                    None => assert!(
                        store.current().is_none(),
                        "round {round}: a refused first configuration left {:?} bytes in force",
                        store.current().map(|c| c.len())
                    ),
                    Some((content, generation)) => {
                        let now = store.current().unwrap();
                        assert!(
                            now == *content,
                            "round {round}: {} bytes in force, expected {}",
                            now.len(),
                            content.len()
                        );
                        let a = store.applied().unwrap();
                        assert_eq!(a.sha256, sha(content), "round {round}");
                        assert_eq!(a.generation, *generation, "round {round}: generation");
                    }
                }
            }
        }
        assert!(
            stored >= 3 && refused >= 3,
            "both sides of the limit: {stored} stored, {refused} refused"
        );
    }

    fn nix_is_root() -> bool {
        std::process::Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
    }
}
