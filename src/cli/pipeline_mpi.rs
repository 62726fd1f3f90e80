//! The MPI transport of a pipeline (the `mpi` cargo feature, over the system's Open MPI through rsmpi): joining the
//! world, a [`StageLink`] with non-blocking sends and receives that poll against a deadline, the load barrier, the
//! benchmark's figures gathered on the last rank, and the abort that ends every rank when one fails.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use mpi::collective::CommunicatorCollectives;
use mpi::point_to_point::{Destination, Source};
use mpi::request::{Request, StaticScope};
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::traits::{Equivalence, Root};
use mpi::Threading;
use strata_runtime::pipeline::{StageError, StageLink, StageRange};

use super::pipeline::{no_launcher, PipelineArgs, Rank, StageStats};

/// Tag of hidden rows (previous stage to next).
const TAG_HIDDEN: i32 = 1;
/// Tag of a step's chosen ids (last stage to every other).
const TAG_IDS: i32 = 2;
/// How long a stage waits for the others to load their weights.
const LOAD_TIMEOUT: Duration = Duration::from_secs(3600);

/// The environment variables MPI launchers set in every process they start (Open MPI, PMI-based launchers such as
/// MPICH's hydra and Slurm's srun, PMIx).
const LAUNCHER_VARS: [&str; 4] = [
    "OMPI_COMM_WORLD_SIZE",
    "PMI_SIZE",
    "PMIX_RANK",
    "MPI_LOCALNRANKS",
];

/// This rank's MPI world and the figures its link counts.
pub struct World {
    world: SimpleCommunicator,
    rank: usize,
    size: usize,
    stats: Arc<Mutex<LinkStats>>,
}

/// What a link counted.
#[derive(Clone, Copy, Debug, Default)]
struct LinkStats {
    wait: Duration,
    sent: u64,
}

/// Runs `f` as this rank's stage (see [`super::pipeline::run`]).
pub fn run(
    what: &str,
    args: &PipelineArgs,
    f: impl FnOnce(&Rank) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let _ = args;
    if !LAUNCHER_VARS.iter().any(|v| std::env::var_os(v).is_some()) {
        bail!("{}", no_launcher(what));
    }
    // Serialized: the link moves with the generator (a lock guards it), but no two threads call MPI at once.
    let Some((universe, _)) = mpi::initialize_with_threading(Threading::Serialized) else {
        bail!("MPI was already initialised in this process");
    };
    let world = universe.world();
    let (rank, size) = (world.rank() as usize, world.size() as usize);
    let local_rank = [
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "MPI_LOCALRANKID",
        "SLURM_LOCALID",
    ]
    .iter()
    .find_map(|v| std::env::var(v).ok()?.parse().ok())
    .unwrap_or(rank);
    let me = Rank {
        rank,
        size,
        local_rank,
        world: World {
            world,
            rank,
            size,
            stats: Arc::default(),
        },
    };
    match f(&me) {
        Ok(()) => Ok(()),
        Err(e) => {
            // One clear error, naming the rank; then every rank ends (mpirun signals the others, whose handlers
            // remove their offload files), and this one removes its own before it goes.
            // One write: the launcher interleaves the ranks' stderr at each write.
            let line = format!("error: pipeline rank {rank} of {size} failed: {e:#}\n");
            eprint!("{line}");
            super::process::remove_run_files();
            me.world.world.abort(1)
        }
    }
}

impl World {
    /// Every rank's `mine`, in rank order.
    pub fn all_gather(&self, mine: [u64; 2]) -> Vec<[u64; 2]> {
        let mut all = vec![0u64; 2 * self.size];
        self.world.all_gather_into(&mine[..], &mut all[..]);
        all.chunks(2).map(|c| [c[0], c[1]]).collect()
    }

    /// The link of stage `range`, waiting `timeout_s` for each message.
    pub fn link(&self, range: StageRange, timeout_s: u64) -> Box<dyn StageLink + Send> {
        Box::new(MpiLink {
            world: SimpleCommunicator::world(),
            rank: self.rank,
            size: self.size,
            range,
            timeout: Duration::from_secs(timeout_s),
            pending: Vec::new(),
            stats: self.stats.clone(),
            fault: test_fault(),
        })
    }

    /// Waits (up to an hour) until every rank has loaded its weights, so that no step's deadline counts loading.
    pub fn loaded(&self) -> anyhow::Result<()> {
        let mut barrier = self.world.immediate_barrier();
        let deadline = Instant::now() + LOAD_TIMEOUT;
        loop {
            match barrier.test() {
                Ok(_) => return Ok(()),
                Err(again) => barrier = again,
            }
            if Instant::now() > deadline {
                // A request must complete before it is dropped: this one never will, and the process is ending.
                std::mem::forget(barrier);
                bail!(
                    "the other stages did not finish loading within {} s",
                    LOAD_TIMEOUT.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The benchmark's figures of every stage, on the last rank (`None` elsewhere): each rank's wall-clock seconds
    /// `wall`, layers, waits and bytes sent.
    pub fn gather_stats(
        &self,
        wall: f64,
        range: &StageRange,
    ) -> anyhow::Result<Option<Vec<StageStats>>> {
        let stats = *self.stats.lock().unwrap_or_else(|e| e.into_inner());
        let mine = [
            range.layers.start as f64,
            range.layers.end as f64,
            wall,
            stats.wait.as_secs_f64(),
            stats.sent as f64,
        ];
        let root = self.world.process_at_rank(self.size as i32 - 1);
        if self.rank + 1 != self.size {
            root.gather_into(&mine[..]);
            return Ok(None);
        }
        let mut all = vec![0f64; mine.len() * self.size];
        root.gather_into_root(&mine[..], &mut all[..]);
        Ok(Some(
            all.chunks(mine.len())
                .map(|c| StageStats {
                    layers: (c[0] as usize, c[1] as usize),
                    wall_s: c[2],
                    wait_s: c[3],
                    sent_bytes: c[4] as u64,
                })
                .collect(),
        ))
    }
}

/// A test seam: `STRATA_TEST_PIPELINE_FAULT=RANK:STEP:die|hang` makes rank RANK, at token step STEP, die at once
/// (SIGABRT, no cleanup, like a crash) or hang (sleep for an hour).
fn test_fault() -> Option<(usize, usize, bool)> {
    let spec = std::env::var("STRATA_TEST_PIPELINE_FAULT").ok()?;
    let mut parts = spec.split(':');
    let rank = parts.next()?.parse().ok()?;
    let step = parts.next()?.parse().ok()?;
    let die = parts.next()? == "die";
    Some((rank, step, die))
}

/// An MPI send in flight with the buffer it reads, freed when the send completes.
struct Pending {
    request: Request<'static, [u8], StaticScope>,
    buffer: *mut [u8],
}

/// The MPI link of one stage.
struct MpiLink {
    world: SimpleCommunicator,
    rank: usize,
    size: usize,
    range: StageRange,
    timeout: Duration,
    pending: Vec<Pending>,
    stats: Arc<Mutex<LinkStats>>,
    fault: Option<(usize, usize, bool)>,
}

// SAFETY: MPI runs with MPI_THREAD_SERIALIZED, so its handles may be used from any thread as long as no two threads
// call MPI at once: the link is only reached through the generator's lock, and the main thread makes no MPI call while
// a generation runs. The buffers behind `pending` are owned by the link (leaked boxes it frees).
unsafe impl Send for MpiLink {}

impl MpiLink {
    fn count(&self, f: impl FnOnce(&mut LinkStats)) {
        f(&mut self.stats.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// Frees the buffers of completed sends.
    fn progress(&mut self) {
        let mut still = Vec::with_capacity(self.pending.len());
        for p in self.pending.drain(..) {
            match p.request.test() {
                // SAFETY: `buffer` came from `Box::into_raw` in `send`, and the send that read it has completed.
                Ok(_) => drop(unsafe { Box::from_raw(p.buffer) }),
                Err(request) => still.push(Pending {
                    request,
                    buffer: p.buffer,
                }),
            }
        }
        self.pending = still;
    }

    /// Starts sending `bytes` to `to` without waiting for it to receive them.
    fn send(&mut self, to: usize, tag: i32, bytes: Vec<u8>) {
        self.progress();
        let len = bytes.len() as u64;
        let buffer = Box::into_raw(bytes.into_boxed_slice());
        // SAFETY: the box is leaked until the send completes (`progress` or `Drop` frees it), so the reference lives
        // as long as the request reads it, and nothing else touches it meanwhile.
        let data: &'static [u8] = unsafe { &*buffer };
        let request = self
            .world
            .process_at_rank(to as i32)
            .immediate_send_with_tag(StaticScope, data, tag);
        self.pending.push(Pending { request, buffer });
        self.count(|s| s.sent += len);
    }

    /// Receives the next message tagged `tag` from `from`, polling until the deadline: a dead or hung neighbour
    /// becomes an error naming it, never a hang.
    fn recv(
        &mut self,
        from: usize,
        tag: i32,
        what: &str,
        step: usize,
    ) -> Result<Vec<u8>, StageError> {
        let started = Instant::now();
        let deadline = started + self.timeout;
        let mut pause = Duration::from_micros(20);
        loop {
            self.progress();
            let probed = self
                .world
                .process_at_rank(from as i32)
                .immediate_matched_probe_with_tag(tag);
            if let Some((message, status)) = probed {
                let len = status.count(u8::equivalent_datatype()).max(0) as usize;
                let mut bytes = vec![0u8; len];
                message.matched_receive_into(&mut bytes[..]);
                let waited = started.elapsed();
                self.count(|s| s.wait += waited);
                return Ok(bytes);
            }
            if Instant::now() > deadline {
                return Err(StageError::Timeout {
                    what: what.into(),
                    peer: from,
                    seconds: self.timeout.as_secs(),
                    step,
                });
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(1));
        }
    }

    /// The test seam, once per step.
    fn fault_point(&self, step: usize) {
        if let Some((rank, at, die)) = self.fault {
            if rank == self.rank && at == step {
                let what = if die { "dies" } else { "hangs" };
                let line = format!(
                    "strata: rank {rank} {what} at step {step} (STRATA_TEST_PIPELINE_FAULT)\n"
                );
                eprint!("{line}");
                if die {
                    std::process::abort();
                }
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
    }
}

fn check_len(
    got: Vec<u8>,
    expected: usize,
    what: &str,
    peer: usize,
    step: usize,
) -> Result<Vec<u8>, StageError> {
    match got.len() == expected {
        true => Ok(got),
        false => Err(StageError::Size {
            what: what.into(),
            peer,
            got: got.len(),
            expected,
            step,
        }),
    }
}

impl StageLink for MpiLink {
    fn range(&self) -> &StageRange {
        &self.range
    }

    fn recv_hidden(
        &mut self,
        step: usize,
        batch: usize,
        bytes: usize,
    ) -> Result<Vec<u8>, StageError> {
        let what = format!("hidden rows of GPU batch {batch}");
        let from = self.rank - 1;
        let got = self.recv(from, TAG_HIDDEN, &what, step)?;
        check_len(got, bytes, &what, from, step)
    }

    fn send_hidden(
        &mut self,
        _step: usize,
        _batch: usize,
        rows: Vec<u8>,
    ) -> Result<(), StageError> {
        self.send(self.rank + 1, TAG_HIDDEN, rows);
        Ok(())
    }

    fn send_ids(&mut self, step: usize, ids: &[u32]) -> Result<(), StageError> {
        self.fault_point(step);
        for to in 0..self.size - 1 {
            self.send(to, TAG_IDS, bytemuck_ids(ids));
        }
        Ok(())
    }

    fn recv_ids(&mut self, step: usize, count: usize) -> Result<Vec<u32>, StageError> {
        self.fault_point(step);
        let last = self.size - 1;
        let got = self.recv(last, TAG_IDS, "token ids", step)?;
        let got = check_len(got, count * 4, "token ids", last, step)?;
        Ok(got
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }
}

fn bytemuck_ids(ids: &[u32]) -> Vec<u8> {
    ids.iter().flat_map(|id| id.to_le_bytes()).collect()
}

impl Drop for MpiLink {
    /// Waits (up to the deadline) for the sends still in flight: their buffers must outlive them, and MPI must not
    /// finalise under them. A send that cannot complete is left to the process's end.
    fn drop(&mut self) {
        let deadline = Instant::now() + self.timeout;
        while !self.pending.is_empty() && Instant::now() < deadline {
            self.progress();
            std::thread::sleep(Duration::from_micros(100));
        }
        for p in self.pending.drain(..) {
            std::mem::forget(p.request);
        }
    }
}
