//! The disk tier: one file per tensor in an offload directory, read and written by a small thread pool.
//!
//! Each large read or write is split into pieces that the pool's threads (4 by default, as FlexLLMGen's copy
//! threads) move in parallel with positional I/O, so a single tensor uses every thread and several prefetches share
//! them. [`DiskTier::prefetch`] runs in the background and returns a [`Ticket`]: the schedule prefetches layer j+1's
//! weights while layer j computes and waits on the ticket when it needs them.
//!
//! Files never outlive the run: a new file is written under a `.part` name and renamed only when complete (an error
//! removes it, so no partial tensor is ever left under its real name); a [`DiskTensor`] deletes its file when dropped;
//! the directory is removed when the tier and its tensors are gone if strata created it; and every file and created
//! directory is listed in a process-wide registry that [`cleanup_all`] empties, for the binary's Ctrl-C handler.
//!
//! Each tier keeps its files in a run directory of its own, `strata-run-*` inside the offload directory, holding an
//! owner record (`owner.lock`) that the tier keeps locked (`flock`) while it lives. The kernel drops the lock when
//! the process dies however it dies (SIGKILL, the OOM killer), so a run directory whose lock can be taken belongs to
//! no live run: [`remove_dead_runs`] (called by every new tier) removes it. Runs sharing an offload directory never
//! share a file name, even with the same PID (PID namespaces): each run directory is made with an exclusive `mkdir`.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use rayon::prelude::*;

use super::cpu::par_copy_slice;
use super::{lock, ByteCounter, Result, TierError, TierStats};
use crate::fault::{self, WriteKind};

/// The name prefix of a run directory inside an offload directory.
const RUN_PREFIX: &str = "strata-run-";
/// A run directory being set up: renamed to [`RUN_PREFIX`] once its owner record is locked.
const NEW_RUN_PREFIX: &str = ".strata-new-";
/// The owner record in a run directory: locked while its run lives; its text (PID, start time) is for people.
const OWNER_FILE: &str = "owner.lock";
/// A run directory still being set up is left alone this long (its maker may not have locked its record yet).
const SETUP_GRACE: std::time::Duration = std::time::Duration::from_secs(60);

/// Pieces each read or write is split into for the thread pool.
const IO_PIECE: usize = 8 << 20;

/// Where and how the disk tier stores files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskOptions {
    /// The offload directory.
    pub dir: PathBuf,
    /// Create `dir` if it does not exist (its parent must). A directory strata created is removed at the end.
    pub create_dir: bool,
    /// I/O threads (at least 1).
    pub threads: usize,
    /// A pause before every background job (prefetch, write-back): a slow or busy disk, simulated. Tests set it
    /// (through `STRATA_DISK_JOB_DELAY_US` for a whole process) to show that results and memory peaks do not depend
    /// on when I/O finishes.
    pub job_delay: std::time::Duration,
}

impl DiskOptions {
    /// `dir`, created if missing, with 4 I/O threads; background jobs delayed by `STRATA_DISK_JOB_DELAY_US`
    /// microseconds when that variable is set.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        let delay_us = std::env::var("STRATA_DISK_JOB_DELAY_US")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        DiskOptions {
            dir: dir.into(),
            create_dir: true,
            threads: 4,
            job_delay: std::time::Duration::from_micros(delay_us),
        }
    }
}

/// Every offload file and created directory of this process, for [`cleanup_all`].
struct Registry {
    files: BTreeSet<PathBuf>,
    /// Run directories (removed with their contents).
    runs: BTreeSet<PathBuf>,
    dirs: BTreeSet<PathBuf>,
    /// [`cleanup_all`] ran: the process is exiting, and no new file may appear behind its back.
    closed: bool,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    files: BTreeSet::new(),
    runs: BTreeSet::new(),
    dirs: BTreeSet::new(),
    closed: false,
});

/// Distinguishes tiers (their I/O threads' names) within one process.
static NEXT_TIER: AtomicU64 = AtomicU64::new(0);

/// What [`cleanup_all`] removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cleanup {
    /// Offload files removed.
    pub files: usize,
    /// Offload directories (created by strata) and run directories removed.
    pub dirs: usize,
}

/// What a dead run left in an offload directory, removed by [`remove_dead_runs`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadRun {
    /// Its run directory (gone now).
    pub dir: PathBuf,
    /// Offload files removed (the owner record not counted).
    pub files: usize,
    /// Their bytes.
    pub bytes: u64,
    /// Its owner record (`pid 1234, started at unix time 1764800000`), when readable.
    pub owner: String,
}

/// Removes what runs that died without cleaning up (SIGKILL, the OOM killer, a power cut) left in the offload
/// directory `dir`: every run directory whose owner record no live process holds locked. Live runs, this process's
/// included, are never touched. Returns what was removed, for the caller to say so; a missing `dir` has nothing.
pub fn remove_dead_runs(dir: &Path) -> Vec<DeadRun> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let setting_up = name.starts_with(NEW_RUN_PREFIX);
        if !(name.starts_with(RUN_PREFIX) || setting_up) {
            continue;
        }
        let run = entry.path();
        if setting_up {
            // Its maker may be between mkdir and lock: only an old one is abandoned.
            let young = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_none_or(|age| age < SETUP_GRACE);
            if young {
                continue;
            }
        }
        let owner_path = run.join(OWNER_FILE);
        let Ok(owner) = OpenOptions::new().read(true).write(true).open(&owner_path) else {
            continue; // No record (not a run directory strata made), or gone meanwhile.
        };
        if fs4::FileExt::try_lock(&owner).is_err() {
            continue; // Its run is alive (or another process is removing it now).
        }
        let record = fs::read_to_string(&owner_path).unwrap_or_default();
        let (mut files, mut bytes) = (0, 0);
        if let Ok(inner) = fs::read_dir(&run) {
            for file in inner.flatten() {
                if file.file_name() == OWNER_FILE {
                    continue;
                }
                let len = file.metadata().map_or(0, |m| m.len());
                if fs::remove_file(file.path()).is_ok() {
                    files += 1;
                    bytes += len;
                }
            }
        }
        let _ = fs::remove_file(&owner_path);
        drop(owner);
        if fs::remove_dir(&run).is_ok() || files > 0 {
            removed.push(DeadRun {
                dir: run,
                files,
                bytes,
                owner: record.trim().to_string(),
            });
        }
    }
    removed
}

/// Makes this run's directory in `dir`, its owner record locked: `(run dir, record)`. The record's text is written
/// for real, so it also proves that files can be written in `dir`.
fn make_run_dir(dir: &Path) -> io::Result<(PathBuf, File)> {
    static NEXT_RUN: AtomicU64 = AtomicU64::new(0);
    let pid = std::process::id();
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    // An exclusive mkdir makes the name this run's alone; the clock and a counter make a clash (same PID in
    // another PID namespace) unlikely, and a clash only means another try.
    for attempt in 0..64u32 {
        let tag = format!(
            "{pid}-{}-{}-{attempt}",
            started.as_nanos(),
            NEXT_RUN.fetch_add(1, Ordering::Relaxed)
        );
        let setup = dir.join(format!("{NEW_RUN_PREFIX}{tag}"));
        match fs::create_dir(&setup) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
        let made = (|| {
            let owner = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(setup.join(OWNER_FILE))?;
            fs4::FileExt::try_lock(&owner).map_err(io::Error::from)?;
            use io::Write;
            (&owner).write_all(
                format!("pid {pid}, started at unix time {}\n", started.as_secs()).as_bytes(),
            )?;
            let run = dir.join(format!("{RUN_PREFIX}{tag}"));
            fs::rename(&setup, &run)?;
            Ok((run, owner))
        })();
        if made.is_err() {
            let _ = fs::remove_dir_all(&setup);
        }
        return made;
    }
    Err(io::Error::other("no free run directory name"))
}

/// Removes every offload file this process has open and every offload directory it created. For a Ctrl-C handler
/// (`ctrlc::set_handler(|| { strata_runtime::tiers::cleanup_all(); std::process::exit(130) })`): disk tensors still
/// alive afterwards read and write deleted or missing files, so exit after calling it.
pub fn cleanup_all() -> Cleanup {
    let mut reg = lock(&REGISTRY);
    reg.closed = true;
    let mut done = Cleanup::default();
    for file in std::mem::take(&mut reg.files) {
        if fs::remove_file(&file).is_ok() {
            done.files += 1;
        }
    }
    for run in std::mem::take(&mut reg.runs) {
        if fs::remove_dir_all(&run).is_ok() {
            done.dirs += 1;
        }
    }
    for dir in std::mem::take(&mut reg.dirs) {
        if fs::remove_dir(&dir).is_ok() {
            done.dirs += 1;
        }
    }
    done
}

/// A background job's simulated wait for a busy disk ([`DiskOptions::job_delay`]).
fn pause(delay: std::time::Duration) {
    if !delay.is_zero() {
        std::thread::sleep(delay);
    }
}

fn unregister(path: &Path) {
    lock(&REGISTRY).files.remove(path);
}

/// Whether `e` means "no space left" (or "quota exceeded").
pub(crate) fn is_disk_full(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    )
}

fn io_error(op: &'static str, path: &Path, bytes: u64, e: io::Error) -> TierError {
    if e.kind() == io::ErrorKind::FileTooLarge {
        TierError::FileSizeLimit {
            path: path.to_owned(),
        }
    } else if is_disk_full(&e) {
        TierError::DiskFull {
            path: path.to_owned(),
            bytes,
        }
    } else {
        TierError::Io {
            op,
            path: path.to_owned(),
            source: e,
        }
    }
}

#[derive(Debug)]
struct Shared {
    dir: PathBuf,
    /// This tier's run directory inside `dir`.
    run: PathBuf,
    /// The run directory's owner record, locked while this lives.
    _owner: File,
    created_dir: bool,
    counter: ByteCounter,
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Every file has gone with its tensor (each holds this struct); the record goes with the directory.
        let _ = fs::remove_dir_all(&self.run);
        lock(&REGISTRY).runs.remove(&self.run);
        if self.created_dir {
            let _ = fs::remove_dir(&self.dir);
            lock(&REGISTRY).dirs.remove(&self.dir);
        }
    }
}

/// The disk tier: an offload directory and its I/O threads.
#[derive(Debug)]
pub struct DiskTier {
    shared: Arc<Shared>,
    pool: Arc<rayon::ThreadPool>,
    job_delay: std::time::Duration,
    next_file: AtomicU64,
}

/// A tensor stored in a file; the file is deleted when the tensor is dropped.
#[derive(Debug)]
pub struct DiskTensor {
    file: Arc<DiskFile>,
}

#[derive(Debug)]
struct DiskFile {
    path: PathBuf,
    file: File,
    len: u64,
    /// What it holds (for the fault-injection hook).
    kind: WriteKind,
    shared: Arc<Shared>,
}

impl Drop for DiskFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
        unregister(&self.path);
        self.shared.counter.sub(self.len);
    }
}

impl DiskTensor {
    /// Logical length in bytes.
    pub fn len(&self) -> u64 {
        self.file.len
    }

    /// Whether the tensor is empty.
    pub fn is_empty(&self) -> bool {
        self.file.len == 0
    }

    /// The file holding it.
    pub fn path(&self) -> &Path {
        &self.file.path
    }
}

/// The answer to a background disk job: [`Ticket::wait`] blocks until it is done.
#[derive(Debug)]
#[must_use = "a ticket's job result (and any error) is only seen by waiting on it"]
pub struct Ticket<T> {
    rx: mpsc::Receiver<Result<T>>,
}

impl<T> Ticket<T> {
    /// Blocks until the job is done and returns its result.
    pub fn wait(self) -> Result<T> {
        self.rx.recv().unwrap_or(Err(TierError::JobLost))
    }
}

impl DiskTier {
    /// Opens the offload directory (creating it if asked and missing), checks that a file can be written there, and
    /// starts the I/O threads.
    pub fn new(options: DiskOptions) -> Result<Self> {
        let dir = options.dir;
        let bad = |reason: String| TierError::OffloadDir {
            path: dir.clone(),
            reason,
        };
        let created_dir = match fs::metadata(&dir) {
            Ok(m) if m.is_dir() => false,
            Ok(_) => return Err(bad("exists but is not a directory".into())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if !options.create_dir {
                    return Err(bad("does not exist".into()));
                }
                match fs::create_dir(&dir) {
                    Ok(()) => {
                        lock(&REGISTRY).dirs.insert(dir.clone());
                        true
                    }
                    // Another process made it meanwhile: use it, and leave removing it to its maker.
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => false,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        return Err(bad("does not exist, nor does its parent directory".into()))
                    }
                    Err(e) => {
                        return Err(bad(format!("does not exist and cannot be created: {e}")))
                    }
                }
            }
            Err(e) => return Err(bad(format!("cannot be inspected: {e}"))),
        };
        remove_dead_runs(&dir);
        // Made and registered under the registry's lock, so a Ctrl-C's cleanup either finds it or comes first.
        let made = {
            let mut reg = lock(&REGISTRY);
            if reg.closed {
                Err(io::Error::other("the process is exiting"))
            } else {
                // A real write, since permission bits do not tell the whole story (read-only mounts, ACLs, root).
                make_run_dir(&dir).inspect(|(run, _)| {
                    reg.runs.insert(run.clone());
                })
            }
        };
        let (run, owner) = match made {
            Ok(made) => made,
            Err(e) => {
                if created_dir {
                    let _ = fs::remove_dir(&dir);
                    lock(&REGISTRY).dirs.remove(&dir);
                }
                return Err(if is_disk_full(&e) {
                    TierError::DiskFull {
                        path: dir.join(OWNER_FILE),
                        bytes: 64,
                    }
                } else {
                    bad(format!("is not writable: {e}"))
                });
            }
        };
        let shared = Arc::new(Shared {
            dir: dir.clone(),
            run,
            _owner: owner,
            created_dir,
            counter: ByteCounter::default(),
        });
        let id = NEXT_TIER.fetch_add(1, Ordering::Relaxed);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(options.threads.max(1))
            .thread_name(move |i| format!("strata-disk-{id}-{i}"))
            .build()
            .map_err(|e| bad(format!("cannot start I/O threads: {e}")))?;
        Ok(DiskTier {
            shared,
            pool: Arc::new(pool),
            job_delay: options.job_delay,
            next_file: AtomicU64::new(0),
        })
    }

    /// The offload directory.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// This tier's run directory inside the offload directory, where its files are.
    pub fn run_dir(&self) -> &Path {
        &self.shared.run
    }

    /// Bytes in files now and at peak.
    pub fn stats(&self) -> TierStats {
        self.shared.counter.stats()
    }

    /// A fresh file name for a tensor called `name` (only its filename-safe characters are kept).
    fn file_path(&self, name: &str) -> PathBuf {
        let n = self.next_file.fetch_add(1, Ordering::Relaxed);
        let safe: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .take(96)
            .collect();
        self.shared.run.join(format!("{n}-{safe}.bin"))
    }

    /// Writes `data` to a new file (blocking; the pool's threads write pieces in parallel).
    pub fn write(&self, name: &str, data: &[u8]) -> Result<DiskTensor> {
        let path = self.file_path(name);
        let kind = WriteKind::of_offload(name);
        self.pool
            .install(|| write_new(&self.shared, path, kind, data))
    }

    /// Overwrites `tensor[offset .. offset + data.len()]` in place (KV cache write-back), blocking.
    pub fn write_at(&self, tensor: &DiskTensor, offset: u64, data: &[u8]) -> Result<()> {
        check_bounds("disk write", tensor, offset, data.len())?;
        let f = &tensor.file;
        self.pool
            .install(|| write_pieces(&f.file, f.kind, offset, data))
            .map_err(|e| io_error("write", &f.path, data.len() as u64, e))
    }

    /// [`DiskTier::write_at`] in the background; the ticket gives `data` back for reuse.
    pub fn write_at_async(
        &self,
        tensor: &DiskTensor,
        offset: u64,
        data: Vec<u8>,
    ) -> Ticket<Vec<u8>> {
        let (tx, rx) = mpsc::channel();
        if let Err(e) = check_bounds("disk write", tensor, offset, data.len()) {
            let _ = tx.send(Err(e));
            return Ticket { rx };
        }
        let file = Arc::clone(&tensor.file);
        let delay = self.job_delay;
        self.pool.spawn(move || {
            pause(delay);
            let result = write_pieces(&file.file, file.kind, offset, &data)
                .map(|()| data)
                .map_err(|e| io_error("write", &file.path, file.len, e));
            // The job lets go of the file before it answers, so a tensor dropped right after `wait` is gone (file
            // and byte count) at once, whatever the thread scheduler does.
            drop(file);
            let _ = tx.send(result);
        });
        Ticket { rx }
    }

    /// Reads the whole tensor (blocking).
    pub fn read(&self, tensor: &DiskTensor) -> Result<Vec<u8>> {
        let mut out = vec![0u8; tensor.len() as usize];
        self.read_into(tensor, &mut out)?;
        Ok(out)
    }

    /// Reads the whole tensor into `out`, which must be exactly its length (blocking).
    pub fn read_into(&self, tensor: &DiskTensor, out: &mut [u8]) -> Result<()> {
        if out.len() as u64 != tensor.len() {
            return Err(TierError::Size {
                what: "disk read",
                expected: tensor.len(),
                found: out.len() as u64,
            });
        }
        self.read_at(tensor, 0, out)
    }

    /// Reads `tensor[offset .. offset + out.len()]` into `out` (blocking).
    pub fn read_at(&self, tensor: &DiskTensor, offset: u64, out: &mut [u8]) -> Result<()> {
        check_bounds("disk read", tensor, offset, out.len())?;
        let f = &tensor.file;
        self.pool
            .install(|| read_pieces(&f.file, offset, out))
            .map_err(|e| io_error("read", &f.path, f.len, e))
    }

    /// Starts reading the tensor in the background into a new buffer.
    pub fn prefetch(&self, tensor: &DiskTensor) -> Ticket<Vec<u8>> {
        self.prefetch_into(tensor, Vec::new())
    }

    /// Starts reading the tensor in the background into `buf` (resized to the tensor's length; pass back a buffer
    /// from an earlier ticket so steady-state prefetches do not allocate).
    pub fn prefetch_into(&self, tensor: &DiskTensor, buf: Vec<u8>) -> Ticket<Vec<u8>> {
        self.prefetch_range_into(tensor, 0, tensor.len(), buf)
    }

    /// Starts reading `tensor[offset .. offset + len]` in the background into `buf` (resized to `len`).
    pub fn prefetch_range_into(
        &self,
        tensor: &DiskTensor,
        offset: u64,
        len: u64,
        mut buf: Vec<u8>,
    ) -> Ticket<Vec<u8>> {
        let (tx, rx) = mpsc::channel();
        if let Err(e) = check_bounds("disk prefetch", tensor, offset, len as usize) {
            let _ = tx.send(Err(e));
            return Ticket { rx };
        }
        let file = Arc::clone(&tensor.file);
        let delay = self.job_delay;
        self.pool.spawn(move || {
            pause(delay);
            buf.resize(len as usize, 0);
            let result = read_pieces(&file.file, offset, &mut buf)
                .map(|()| buf)
                .map_err(|e| io_error("read", &file.path, file.len, e));
            // As in `write_at_async`: release the file before answering.
            drop(file);
            let _ = tx.send(result);
        });
        Ticket { rx }
    }

    /// Writes a new file in the background (GPU -> disk write-back of a new tensor); the ticket gives the tensor and
    /// `data` back.
    pub fn write_async(&self, name: &str, data: Vec<u8>) -> Ticket<(DiskTensor, Vec<u8>)> {
        let (tx, rx) = mpsc::channel();
        let path = self.file_path(name);
        let kind = WriteKind::of_offload(name);
        let shared = Arc::clone(&self.shared);
        let delay = self.job_delay;
        self.pool.spawn(move || {
            pause(delay);
            let _ = tx.send(write_new(&shared, path, kind, &data).map(|t| (t, data)));
        });
        Ticket { rx }
    }

    /// Copies `src` into a host buffer with the pool's threads (used by the bandwidth probe to stage disk bytes).
    pub fn copy_host(&self, dst: &mut [u8], src: &[u8]) {
        self.pool.install(|| par_copy_slice(dst, src));
    }
}

/// Writes `data` to a new file at `path` through a `.part` file renamed when complete, on the current rayon pool.
/// On error nothing is left behind.
fn write_new(
    shared: &Arc<Shared>,
    path: PathBuf,
    kind: WriteKind,
    data: &[u8],
) -> Result<DiskTensor> {
    let part = path.with_extension("part");
    let len = data.len() as u64;
    let written = (|| {
        // Created and registered under the registry's lock, so a Ctrl-C (`cleanup_all`) either finds the file or
        // comes first and refuses it: no file appears after the cleanup.
        let file = {
            let mut reg = lock(&REGISTRY);
            if reg.closed {
                return Err(io_error(
                    "create",
                    &part,
                    len,
                    io::Error::other("the process is exiting and its offload files were removed"),
                ));
            }
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&part)
                .map_err(|e| io_error("create", &part, len, e))?;
            reg.files.insert(part.clone());
            reg.files.insert(path.clone());
            file
        };
        write_pieces(&file, kind, 0, data).map_err(|e| io_error("write", &part, len, e))?;
        fs::rename(&part, &path).map_err(|e| io_error("rename", &part, len, e))?;
        Ok(file)
    })();
    unregister(&part);
    match written {
        Ok(file) => {
            shared.counter.add(len);
            Ok(DiskTensor {
                file: Arc::new(DiskFile {
                    path,
                    file,
                    len,
                    kind,
                    shared: Arc::clone(shared),
                }),
            })
        }
        Err(e) => {
            let _ = fs::remove_file(&part);
            unregister(&path);
            Err(e)
        }
    }
}

fn check_bounds(what: &'static str, tensor: &DiskTensor, offset: u64, len: usize) -> Result<()> {
    let end = offset.checked_add(len as u64);
    if end.is_none_or(|end| end > tensor.len()) {
        return Err(TierError::Size {
            what,
            expected: tensor.len(),
            found: offset.saturating_add(len as u64),
        });
    }
    Ok(())
}

/// Writes `data` at `offset` in pieces on the current rayon pool.
fn write_pieces(file: &File, kind: WriteKind, offset: u64, data: &[u8]) -> io::Result<()> {
    fault::check_write(kind)?;
    data.par_chunks(IO_PIECE)
        .enumerate()
        .try_for_each(|(i, piece)| write_all_at(file, piece, offset + (i * IO_PIECE) as u64))
}

/// Fills `out` from `offset` in pieces on the current rayon pool.
fn read_pieces(file: &File, offset: u64, out: &mut [u8]) -> io::Result<()> {
    out.par_chunks_mut(IO_PIECE)
        .enumerate()
        .try_for_each(|(i, piece)| read_exact_at(file, piece, offset + (i * IO_PIECE) as u64))
}

#[cfg(unix)]
fn write_all_at(file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
    std::os::unix::fs::FileExt::write_all_at(file, buf, offset)
}

#[cfg(unix)]
fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
}

#[cfg(windows)]
fn write_all_at(file: &File, mut buf: &[u8], mut offset: u64) -> io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buf.is_empty() {
        match file.seek_write(buf, offset)? {
            0 => return Err(io::ErrorKind::WriteZero.into()),
            n => {
                buf = &buf[n..];
                offset += n as u64;
            }
        }
    }
    Ok(())
}

#[cfg(windows)]
fn read_exact_at(file: &File, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buf.is_empty() {
        match file.seek_read(buf, offset)? {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_sharing_a_directory_in_one_process_never_collide_and_dead_runs_go() {
        // Two tiers of one process share a PID, as two runs in different PID namespaces may.
        let dir = tempfile::tempdir().unwrap();
        let a = DiskTier::new(DiskOptions::new(dir.path())).unwrap();
        let b = DiskTier::new(DiskOptions::new(dir.path())).unwrap();
        assert_ne!(a.run_dir(), b.run_dir());
        let ta = a.write("x", &[1; 64]).unwrap();
        let tb = b.write("x", &[2; 64]).unwrap();
        assert_ne!(ta.path(), tb.path());
        // Live runs are never swept, this process's own included (flock is per open file, not per process).
        assert_eq!(remove_dead_runs(dir.path()), Vec::new());
        assert_eq!(a.read(&ta).unwrap(), vec![1; 64]);

        // A dead run: a run directory whose owner record nobody holds locked.
        let dead = dir.path().join(format!("{RUN_PREFIX}dead"));
        fs::create_dir(&dead).unwrap();
        fs::write(dead.join(OWNER_FILE), "pid 1, started at unix time 0").unwrap();
        fs::write(dead.join("0-w.bin"), [0u8; 100]).unwrap();
        // Not strata's: left alone.
        fs::create_dir(dir.path().join("strata-run-foreign")).unwrap();
        let removed = remove_dead_runs(dir.path());
        assert_eq!(
            removed,
            vec![DeadRun {
                dir: dead.clone(),
                files: 1,
                bytes: 100,
                owner: "pid 1, started at unix time 0".into(),
            }]
        );
        assert!(!dead.exists() && dir.path().join("strata-run-foreign").exists());
        drop((ta, tb, a));
        assert!(b.run_dir().exists());
        let b_run = b.run_dir().to_path_buf();
        drop(b);
        assert!(!b_run.exists());
        fs::remove_dir(dir.path().join("strata-run-foreign")).unwrap();
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn enospc_and_quota_are_disk_full() {
        // Linux errno values: ENOSPC 28, EDQUOT 122.
        assert!(is_disk_full(&io::Error::from_raw_os_error(28)));
        assert!(is_disk_full(&io::Error::from_raw_os_error(122)));
        assert!(!is_disk_full(&io::Error::from_raw_os_error(13)));
        let e = io_error(
            "write",
            Path::new("/x/y.bin"),
            10,
            io::Error::from_raw_os_error(28),
        );
        assert!(matches!(e, TierError::DiskFull { bytes: 10, .. }), "{e}");
        assert!(e.to_string().contains("disk full"), "{e}");
    }
}
