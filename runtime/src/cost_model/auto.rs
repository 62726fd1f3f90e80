//! `--policy auto`: the fastest policy for this GPU, model and workload, from this machine's measured profile.
//!
//! [`auto_policy`] loads the adapter's cached hardware profile ([`default_profile_path`], or a given file), measures
//! and caches it first when there is none ([`RuntimeProbe`] on the run's own device), fills in the memory caps the
//! caller left open ([`MachineCaps`]: the adapter's memory from a table of known GPUs, the RAM available now, the
//! free space in the offload directory), and runs [`search`] with strata's formulation.

use std::path::{Path, PathBuf};

use super::{
    search, Choice, CostModelError, CostModelKind, Problem, SearchKind, DEFAULT_MAX_BLOCK,
};
use crate::config::OptConfig;
use crate::gpu::{Gpu, GpuError};
use crate::hardware::gpu_probe::RuntimeProbe;
use crate::hardware::measure::{disk_bandwidth, profile_machine, MeasureError, MeasureOptions};
use crate::hardware::{default_profile_path, HardwareError, HardwareProfile};
use crate::offload::placement::{Caps, Workload};
use crate::offload::policy::{CompressionConfig, Policy, Transfer};

const GIB: u64 = 1 << 30;

/// Why no automatic policy could be chosen.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AutoError {
    /// The adapter's memory is not known and no GPU cap was given.
    #[error(
        "the memory of GPU adapter {0:?} is not known to strata: give the GPU memory the run may use \
         (--gpu-mem SIZE, e.g. --gpu-mem 15GiB)"
    )]
    UnknownGpuMemory(String),
    /// The CPU memory could not be read.
    #[error("cannot read the available CPU memory ({0}): give --cpu-mem SIZE")]
    CpuMemory(String),
    /// The free disk space could not be read.
    #[error(
        "cannot read the free space of the offload directory {dir}: {reason}; give --disk-mem SIZE"
    )]
    DiskSpace {
        /// The offload directory.
        dir: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The cached profile exists but is unusable.
    #[error("{0}; delete it or run `strata profile` again to re-measure")]
    Profile(#[source] HardwareError),
    /// Neither a profile path was given nor can the default one be found.
    #[error("no place for the hardware profile: no user cache directory (XDG_CACHE_HOME, else the platform's); pass a profile file")]
    NoProfilePath,
    /// Measuring the machine failed.
    #[error("measuring this machine: {0}")]
    Measure(#[from] MeasureError),
    /// Opening the probe on the GPU failed.
    #[error("measuring the GPU: {0}")]
    Gpu(#[from] GpuError),
    /// The search found nothing.
    #[error(transparent)]
    Search(#[from] CostModelError),
}

/// How [`auto_policy`] finds its inputs.
#[derive(Clone, Debug)]
pub struct AutoOptions {
    /// The profile file to use (measured and written there when absent) instead of the adapter's default path.
    pub profile: Option<PathBuf>,
    /// Directory for disk-resident tensors; without one nothing goes to disk.
    pub offload_dir: Option<PathBuf>,
    /// Fraction of each capacity the plan may use.
    pub headroom: f64,
    /// Most sequences per block (the prompts the run has).
    pub max_block: usize,
    /// Store weights quantised with this configuration.
    pub compress_weight: Option<CompressionConfig>,
    /// Store the KV cache quantised with this configuration.
    pub compress_cache: Option<CompressionConfig>,
    /// How the run will move CPU-resident weights to the decode kernels (the model prices that path).
    pub transfer: Transfer,
    /// Bytes the disk test writes when a profile is measured.
    pub disk_test_bytes: u64,
}

impl Default for AutoOptions {
    fn default() -> Self {
        AutoOptions {
            profile: None,
            offload_dir: None,
            headroom: 0.8,
            max_block: DEFAULT_MAX_BLOCK,
            compress_weight: None,
            compress_cache: None,
            transfer: Transfer::Auto,
            disk_test_bytes: 64 << 20,
        }
    }
}

/// Where the profile came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProfileSource {
    /// Loaded from this file.
    Cached(PathBuf),
    /// Measured now and written to this file.
    Measured(PathBuf),
}

/// The chosen policy with its prediction and what it was chosen from.
#[derive(Clone, Debug)]
pub struct AutoChoice {
    /// The policy to run: batch sizes, placement, caps and the offload directory set.
    pub policy: Policy,
    /// The cost model's prediction and memory plan for it.
    pub prediction: Choice,
    /// The hardware profile used.
    pub profile: HardwareProfile,
    /// Where it came from.
    pub source: ProfileSource,
    /// The caps the search used, given or found.
    pub caps: Caps,
}

/// Memory limits of this machine, found when the caller gives none.
pub struct MachineCaps;

impl MachineCaps {
    /// The memory of well-known GPUs, by adapter name (wgpu does not report it). Where a name covers several sizes
    /// (A100 40/80 GB), only the size spelled out in the name counts.
    pub fn gpu_memory(adapter: &str) -> Option<u64> {
        let name = adapter.to_ascii_lowercase();
        // Longest names first: "h100 nvl" before "h100". Sizes are what the driver reports, rounded down.
        const TABLE: &[(&str, u64)] = &[
            ("h200", 139 * GIB),
            ("h100 nvl", 93 * GIB),
            ("h100", 79 * GIB),
            ("a100-sxm4-80gb", 79 * GIB),
            ("a100 80gb", 79 * GIB),
            ("a100-pcie-40gb", 39 * GIB),
            ("a100-sxm4-40gb", 39 * GIB),
            ("l40s", 44 * GIB),
            ("l4", 22 * GIB),
            ("a10g", 22 * GIB),
            ("tesla t4", 15 * GIB),
            ("rtx 4090", 23 * GIB),
            ("rtx 3090", 23 * GIB),
        ];
        TABLE
            .iter()
            .find(|(needle, _)| name.contains(needle))
            .map(|&(_, bytes)| bytes)
    }

    /// The memory available to a new allocation now, as the OS reports it through `sysinfo` (`MemAvailable` on
    /// Linux; free plus reclaimable pages on macOS and Windows), within a cgroup's limit when the process runs in one.
    pub fn cpu_memory() -> Result<u64, AutoError> {
        let mut system = sysinfo::System::new();
        system.refresh_memory();
        let available = match system.cgroup_limits() {
            Some(limits) => system.available_memory().min(limits.free_memory),
            None => system.available_memory(),
        };
        match available {
            0 => Err(AutoError::CpuMemory(
                "the OS reported no available memory".into(),
            )),
            bytes => Ok(bytes),
        }
    }

    /// Free bytes (available to this user) in the filesystem holding `dir`.
    pub fn free_disk(dir: &Path) -> Result<u64, AutoError> {
        let err = |reason: String| AutoError::DiskSpace {
            dir: dir.to_path_buf(),
            reason,
        };
        if !dir.is_dir() {
            return Err(err("not a directory".into()));
        }
        fs4::available_space(dir).map_err(|e| err(e.to_string()))
    }
}

/// Fills the caps left open: the GPU's from [`MachineCaps::gpu_memory`], the CPU's from the OS (`sysinfo`), the disk's
/// from the offload directory's free space (0 without an offload directory: nothing goes to disk).
pub fn fill_caps(
    adapter: &str,
    given: Caps,
    offload_dir: Option<&Path>,
) -> Result<Caps, AutoError> {
    let gpu = match given.gpu {
        Some(b) => b,
        None => MachineCaps::gpu_memory(adapter)
            .ok_or_else(|| AutoError::UnknownGpuMemory(adapter.to_string()))?,
    };
    let cpu = match given.cpu {
        Some(b) => b,
        None => MachineCaps::cpu_memory()?,
    };
    let disk = match (given.disk, offload_dir) {
        (Some(b), Some(_)) => b,
        (_, None) => 0,
        (None, Some(dir)) => MachineCaps::free_disk(dir)?,
    };
    Ok(Caps {
        gpu: Some(gpu),
        cpu: Some(cpu),
        disk: Some(disk),
    })
}

/// The profile of `gpu`'s adapter: loaded from `path` (default: [`default_profile_path`]) when it exists, else
/// measured on `gpu` (disk test in `offload_dir` when given) and written there. A cached profile without measured
/// disk speeds gets them measured in `offload_dir` when one is given, and is saved again. `progress` names each step.
pub fn load_or_measure_profile(
    gpu: &Gpu,
    path: Option<&Path>,
    offload_dir: Option<&Path>,
    disk_test_bytes: u64,
    progress: &mut dyn FnMut(&str),
) -> Result<(HardwareProfile, ProfileSource), AutoError> {
    let path = match path {
        Some(p) => p.to_path_buf(),
        None => default_profile_path(&gpu.info.name).ok_or(AutoError::NoProfilePath)?,
    };
    if path.exists() {
        let mut profile = HardwareProfile::load(&path).map_err(AutoError::Profile)?;
        // A profile measured without an offload directory has no disk speeds: measure them now that one is used.
        if let Some(dir) = offload_dir {
            if !profile.measured.iter().any(|m| m == "dtoc") {
                progress("disk read/write");
                let d = disk_bandwidth(dir, disk_test_bytes, 4).map_err(|source| {
                    MeasureError::Disk {
                        dir: dir.to_path_buf(),
                        source,
                    }
                })?;
                let (read, write) = (d.read / GIB as f64, d.write / GIB as f64);
                profile.dtoc = read;
                profile.ctod_cache_p = write;
                profile.ctod_hidden_p = write;
                profile.ctod_g = write;
                for field in ["dtoc", "ctod_cache_p", "ctod_hidden_p", "ctod_g"] {
                    if !profile.measured.iter().any(|m| m == field) {
                        profile.measured.push(field.to_string());
                    }
                }
                profile.save(&path).map_err(AutoError::Profile)?;
            }
        }
        return Ok((profile, ProfileSource::Cached(path)));
    }
    let mut options =
        MeasureOptions::new(offload_dir.map_or_else(std::env::temp_dir, Path::to_path_buf));
    options.disk_bytes = disk_test_bytes;
    // Without an offload directory no policy uses the disk: its speed does not matter.
    options.skip_disk = offload_dir.is_none();
    let mut probe = RuntimeProbe::new(gpu)?;
    let (profile, _) =
        profile_machine(&HardwareProfile::t4(), &options, Some(&mut probe), progress)?;
    profile.save(&path).map_err(AutoError::Profile)?;
    Ok((profile, ProfileSource::Measured(path)))
}

/// Chooses the fastest policy for `config` on `workload` on `gpu`'s machine: the cached (or newly measured) profile,
/// the caps in `caps` with the open ones filled by [`fill_caps`], strata's formulation and search.
pub fn auto_policy(
    gpu: &Gpu,
    config: &OptConfig,
    workload: Workload,
    caps: Caps,
    options: &AutoOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<AutoChoice, AutoError> {
    let offload_dir = options.offload_dir.as_deref();
    let caps = fill_caps(&gpu.info.name, caps, offload_dir)?;
    let (profile, source) = load_or_measure_profile(
        gpu,
        options.profile.as_deref(),
        offload_dir,
        options.disk_test_bytes,
        progress,
    )?;
    let mut problem = Problem::new(config, workload, &profile, caps);
    problem.kind = CostModelKind::Strata;
    problem.headroom = options.headroom;
    problem.max_block = options.max_block;
    problem.transfer = options.transfer;
    if let Some(c) = options.compress_weight {
        problem.compress_weight = true;
        problem.compress_weight_config = c;
    }
    if let Some(c) = options.compress_cache {
        problem.compress_cache = true;
        problem.compress_cache_config = c;
    }
    let prediction = search(problem, SearchKind::Improved)?;
    let mut policy = prediction.policy.clone();
    policy.offload_dir = options.offload_dir.clone();
    Ok(AutoChoice {
        policy,
        prediction,
        profile,
        source,
        caps,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_table() {
        assert_eq!(MachineCaps::gpu_memory("NVIDIA H100 NVL"), Some(93 * GIB));
        assert_eq!(
            MachineCaps::gpu_memory("NVIDIA H100 80GB HBM3"),
            Some(79 * GIB)
        );
        assert_eq!(
            MachineCaps::gpu_memory("llvmpipe (LLVM 15.0.6, 256 bits)"),
            None
        );
        // An A100 without its size in the name is ambiguous.
        assert_eq!(MachineCaps::gpu_memory("NVIDIA A100"), None);
    }

    #[test]
    fn caps_are_filled_from_the_machine() {
        let dir = tempfile::tempdir().unwrap();
        let given = Caps {
            gpu: None,
            cpu: Some(5),
            disk: None,
        };
        let e = fill_caps("llvmpipe", given, None).unwrap_err().to_string();
        assert!(e.contains("--gpu-mem"), "{e}");
        let caps = fill_caps("NVIDIA H200", given, None).unwrap();
        assert_eq!(
            (caps.gpu, caps.cpu, caps.disk),
            (Some(139 * GIB), Some(5), Some(0))
        );
        let caps = fill_caps("NVIDIA H200", given, Some(dir.path())).unwrap();
        assert!(caps.disk.unwrap() > 0, "{caps:?}");
        let free = MachineCaps::free_disk(dir.path()).unwrap();
        // Another process may write meanwhile: only the order of magnitude is stable.
        assert!(free / 2 < caps.disk.unwrap() && caps.disk.unwrap() / 2 < free.max(1));
        let e = MachineCaps::free_disk(&dir.path().join("missing"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("not a directory") && e.contains("--disk-mem"),
            "{e}"
        );
        let ram = MachineCaps::cpu_memory().unwrap();
        assert!(ram > 1 << 20, "{ram}");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn cpu_memory_is_the_kernels_mem_available_within_the_cgroup() {
        // The kernel's own figure, read independently; other processes allocate meanwhile, so within a quarter.
        let kernel = std::fs::read_to_string("/proc/meminfo")
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("MemAvailable:"))
            .map(|v| {
                v.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .unwrap()
                    * 1024
            })
            .unwrap();
        let ram = MachineCaps::cpu_memory().unwrap();
        assert!(ram < kernel + kernel / 4, "{ram} vs {kernel}");
        let mut system = sysinfo::System::new();
        system.refresh_memory();
        if system.cgroup_limits().is_none() {
            assert!(ram.abs_diff(kernel) < kernel / 4, "{ram} vs {kernel}");
        }
    }
}
