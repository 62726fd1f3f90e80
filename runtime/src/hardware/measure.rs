//! Measuring a machine for its [`HardwareProfile`]: disk bandwidth in the offload directory and CPU attention /
//! GEMV rates here; GPU transfers and kernels through a [`GpuProbe`] the GPU runtime implements.
//!
//! [`profile_machine`] runs every step, reports progress through a callback (the CLI draws a bar), and returns the
//! base profile with the measured fields replaced and listed in [`HardwareProfile::measured`].

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use rayon::prelude::*;

use super::HardwareProfile;

const GIB: f64 = (1u64 << 30) as f64;

/// A quantity of the profile that only the GPU runtime can measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GpuField {
    /// CPU -> GPU copy bandwidth from the CPU tier's buffers ([`HardwareProfile::ctog`]).
    Ctog,
    /// GPU -> CPU bandwidth into the cache's CPU tier.
    GtocCache,
    /// GPU -> CPU bandwidth into the activations' CPU tier.
    GtocHidden,
    /// GEMM rate at prefill shapes.
    MmFlopsP,
    /// GEMM rate at decode shapes (one token per sequence).
    MmFlopsG,
    /// Attention rate at prefill shapes.
    BmmFlopsP,
    /// Attention rate at decode shapes.
    BmmFlopsG,
    /// A decode linear's weight bandwidth reading the CPU tier in place ([`HardwareProfile::ctog_zero_copy`]).
    CtogZeroCopy,
    /// The same linear with its weights copied up first ([`HardwareProfile::ctog_copy_linear`]).
    CtogCopyLinear,
    /// The part of a decode linear's time that does not grow with its rows, as weight bytes per second
    /// ([`HardwareProfile::gemv_weight_gib_s`]).
    GemvWeight,
    /// What each further row adds to a decode linear ([`HardwareProfile::mm_flops_g_row`]).
    MmFlopsGRow,
}

impl GpuField {
    /// Every field, in the order a profile run measures them.
    pub const ALL: [GpuField; 11] = [
        GpuField::Ctog,
        GpuField::GtocCache,
        GpuField::GtocHidden,
        GpuField::MmFlopsP,
        GpuField::MmFlopsG,
        GpuField::BmmFlopsP,
        GpuField::BmmFlopsG,
        GpuField::CtogZeroCopy,
        GpuField::CtogCopyLinear,
        GpuField::GemvWeight,
        GpuField::MmFlopsGRow,
    ];

    /// The profile field's name.
    pub const fn name(self) -> &'static str {
        match self {
            GpuField::Ctog => "ctog",
            GpuField::GtocCache => "gtoc_cache",
            GpuField::GtocHidden => "gtoc_hidden",
            GpuField::MmFlopsP => "mm_flops_p",
            GpuField::MmFlopsG => "mm_flops_g",
            GpuField::BmmFlopsP => "bmm_flops_p",
            GpuField::BmmFlopsG => "bmm_flops_g",
            GpuField::CtogZeroCopy => "ctog_zero_copy",
            GpuField::CtogCopyLinear => "ctog_copy_linear",
            GpuField::GemvWeight => "gemv_weight_gib_s",
            GpuField::MmFlopsGRow => "mm_flops_g_row",
        }
    }

    /// Whether the field is a bandwidth (GiB/s) rather than a compute rate (TFLOP/s).
    pub const fn is_bandwidth(self) -> bool {
        matches!(
            self,
            GpuField::Ctog
                | GpuField::GtocCache
                | GpuField::GtocHidden
                | GpuField::CtogZeroCopy
                | GpuField::CtogCopyLinear
                | GpuField::GemvWeight
        )
    }

    fn set(self, p: &mut HardwareProfile, value: f64) {
        *match self {
            GpuField::Ctog => &mut p.ctog,
            GpuField::GtocCache => &mut p.gtoc_cache,
            GpuField::GtocHidden => &mut p.gtoc_hidden,
            GpuField::MmFlopsP => &mut p.mm_flops_p,
            GpuField::MmFlopsG => &mut p.mm_flops_g,
            GpuField::BmmFlopsP => &mut p.bmm_flops_p,
            GpuField::BmmFlopsG => &mut p.bmm_flops_g,
            GpuField::CtogZeroCopy => p.ctog_zero_copy.insert(value),
            GpuField::CtogCopyLinear => p.ctog_copy_linear.insert(value),
            GpuField::GemvWeight => p.gemv_weight_gib_s.insert(value),
            GpuField::MmFlopsGRow => p.mm_flops_g_row.insert(value),
        } = value;
    }
}

/// What the GPU runtime provides to `strata profile`: its adapter and a measurement of each [`GpuField`].
pub trait GpuProbe {
    /// The adapter's name (names the default profile file).
    fn adapter_name(&self) -> String;

    /// Measures one field, returning it in the profile's unit (GiB/s for bandwidths, TFLOP/s for rates), or a
    /// message saying why it could not.
    fn measure(&mut self, field: GpuField) -> Result<f64, String>;

    /// What was measured for `field` (path, shape), for the table `strata profile` prints.
    fn describe(&self, field: GpuField) -> String {
        format!("GPU {}", field.name())
    }
}

/// Sizes of the CPU and disk measurements.
#[derive(Clone, Debug)]
pub struct MeasureOptions {
    /// Directory the disk test writes its temporary files in (the offload directory).
    pub disk_dir: PathBuf,
    /// Bytes the disk test writes and reads back, over all threads.
    pub disk_bytes: u64,
    /// Threads the disk test uses (strata's disk tier reads with several).
    pub disk_threads: usize,
    /// Skip the disk test.
    pub skip_disk: bool,
}

impl MeasureOptions {
    /// 256 MiB over 4 threads in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        MeasureOptions {
            disk_dir: dir.into(),
            disk_bytes: 256 << 20,
            disk_threads: 4,
            skip_disk: false,
        }
    }
}

/// One measured number, for the table `strata profile` prints.
#[derive(Clone, Debug, PartialEq)]
pub struct Measurement {
    /// The profile field it sets (or an informational name).
    pub field: &'static str,
    /// What was measured.
    pub what: String,
    /// The value, in `unit`.
    pub value: f64,
    /// `GiB/s` or `TFLOP/s`.
    pub unit: &'static str,
}

/// Why a measurement failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MeasureError {
    /// An I/O error in the disk test.
    #[error("disk test in {dir}: {source} (pass a writable --offload-dir)")]
    Disk {
        /// The directory.
        dir: PathBuf,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// Disk bandwidths measured in one directory.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DiskBandwidth {
    /// Sequential write with fsync, bytes per second.
    pub write: f64,
    /// Sequential read, bytes per second.
    pub read: f64,
    /// Whether reads bypassed the page cache (O_DIRECT, F_NOCACHE); if not, `read` may be the page cache's speed.
    pub direct_read: bool,
}

/// Writes `total` bytes in `dir` from `threads` threads (one file each, synced), then reads them back, and removes
/// the files.
pub fn disk_bandwidth(dir: &Path, total: u64, threads: usize) -> std::io::Result<DiskBandwidth> {
    const CHUNK: usize = 4 << 20;
    let threads = threads.max(1);
    let per_thread = (total / threads as u64)
        .max(CHUNK as u64)
        .div_ceil(CHUNK as u64)
        * CHUNK as u64;
    // Removed on drop, so even when a step fails.
    let files = (0..threads)
        .map(|_| {
            tempfile::Builder::new()
                .prefix(".strata-profile-")
                .suffix(".tmp")
                .tempfile_in(dir)
                .map(tempfile::NamedTempFile::into_temp_path)
        })
        .collect::<std::io::Result<Vec<_>>>()?;

    let start = Instant::now();
    std::thread::scope(|s| {
        let handles: Vec<_> = files
            .iter()
            .enumerate()
            .map(|(i, path)| {
                s.spawn(move || -> std::io::Result<()> {
                    // Data that does not compress, in case the filesystem does.
                    let chunk: Vec<u8> = (0..CHUNK)
                        .map(|j| ((j as u64).wrapping_mul(2654435761) >> 13) as u8 ^ i as u8)
                        .collect();
                    let mut f = File::create(path)?;
                    let mut written = 0;
                    while written < per_thread {
                        f.write_all(&chunk)?;
                        written += CHUNK as u64;
                    }
                    f.sync_all()
                })
            })
            .collect();
        handles.into_iter().try_for_each(|h| {
            h.join()
                .unwrap_or_else(|_| Err(std::io::Error::other("writer thread panicked")))
        })
    })?;
    let write_s = start.elapsed().as_secs_f64();

    let direct = AtomicFlag::default();
    let start = Instant::now();
    std::thread::scope(|s| {
        let handles: Vec<_> = files
            .iter()
            .map(|path| {
                let direct = &direct;
                s.spawn(move || -> std::io::Result<()> {
                    let (mut f, is_direct) = open_for_read(path)?;
                    if is_direct {
                        direct.set();
                    }
                    // O_DIRECT needs a buffer aligned to the block size: over-allocate and take an aligned window.
                    let mut raw = vec![0u8; CHUNK + 4096];
                    let offset = raw.as_ptr().align_offset(4096);
                    let buf = &mut raw[offset..offset + CHUNK];
                    let mut read = 0u64;
                    while read < per_thread {
                        let n = f.read(buf)?;
                        if n == 0 {
                            break;
                        }
                        read += n as u64;
                    }
                    Ok(())
                })
            })
            .collect();
        handles.into_iter().try_for_each(|h| {
            h.join()
                .unwrap_or_else(|_| Err(std::io::Error::other("reader thread panicked")))
        })
    })?;
    let read_s = start.elapsed().as_secs_f64();
    drop(files);

    let bytes = (per_thread * threads as u64) as f64;
    Ok(DiskBandwidth {
        write: bytes / write_s.max(1e-9),
        read: bytes / read_s.max(1e-9),
        direct_read: direct.get(),
    })
}

#[derive(Default)]
struct AtomicFlag(std::sync::atomic::AtomicBool);

impl AtomicFlag {
    fn set(&self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed)
    }
    fn get(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Opens a file for reading, bypassing the page cache where the platform and filesystem allow: `O_DIRECT` on Linux
/// and Android, `F_NOCACHE` on macOS and iOS; elsewhere (Windows) plain buffered reads, reported as not direct.
fn open_for_read(path: &Path) -> std::io::Result<(File, bool)> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        use std::os::unix::fs::OpenOptionsExt;
        if let Ok(f) = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
        {
            return Ok((f, true));
        }
    }
    let f = File::open(path)?;
    #[cfg(any(target_os = "macos", target_os = "ios"))]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: fcntl(F_NOCACHE) on a descriptor this function owns; it reads no memory.
        if unsafe { libc::fcntl(f.as_raw_fd(), libc::F_NOCACHE, 1) } != -1 {
            return Ok((f, true));
        }
    }
    Ok((f, false))
}

/// FLOP/s of decode attention on the CPU (the `cpu_cache_compute` path): for `batch` sequences and `heads` heads,
/// scores q.K over `seq` cached positions, softmax, then p.V; 4 * batch * seq * hidden FLOPs per call.
pub fn cpu_attention_flops(batch: usize, seq: usize, hidden: usize, heads: usize) -> f64 {
    let head_dim = hidden / heads.max(1);
    let rows = batch * heads;
    let k: Vec<f32> = (0..rows * seq * head_dim)
        .map(|i| ((i % 97) as f32) * 1e-3)
        .collect();
    let v = k.clone();
    let q: Vec<f32> = (0..rows * head_dim)
        .map(|i| ((i % 13) as f32) * 1e-2)
        .collect();
    let mut out = vec![0f32; rows * head_dim];
    let run = |out: &mut [f32]| {
        out.par_chunks_mut(head_dim).enumerate().for_each(|(r, o)| {
            let q = &q[r * head_dim..(r + 1) * head_dim];
            let kr = &k[r * seq * head_dim..(r + 1) * seq * head_dim];
            let vr = &v[r * seq * head_dim..(r + 1) * seq * head_dim];
            let mut scores: Vec<f32> = kr
                .chunks_exact(head_dim)
                .map(|krow| krow.iter().zip(q).map(|(a, b)| a * b).sum())
                .collect();
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0;
            for s in &mut scores {
                *s = (*s - max).exp();
                sum += *s;
            }
            o.fill(0.0);
            for (p, vrow) in scores.iter().zip(vr.chunks_exact(head_dim)) {
                let p = p / sum;
                for (acc, x) in o.iter_mut().zip(vrow) {
                    *acc += p * x;
                }
            }
        })
    };
    run(&mut out); // warm-up: page in the buffers, spin up the pool
    let iters = 3;
    let start = Instant::now();
    for _ in 0..iters {
        run(&mut out);
    }
    let secs = start.elapsed().as_secs_f64().max(1e-9);
    std::hint::black_box(&out);
    4.0 * (batch * seq * hidden) as f64 * iters as f64 / secs
}

/// FLOP/s of a `rows x cols` f32 matrix-vector product on all cores (2 * rows * cols FLOPs per call).
pub fn cpu_gemv_flops(rows: usize, cols: usize) -> f64 {
    let a: Vec<f32> = (0..rows * cols).map(|i| ((i % 31) as f32) * 1e-3).collect();
    let x: Vec<f32> = (0..cols).map(|i| ((i % 7) as f32) * 1e-1).collect();
    let mut y = vec![0f32; rows];
    let run = |y: &mut [f32]| {
        y.par_iter_mut()
            .zip(a.par_chunks_exact(cols))
            .for_each(|(y, row)| *y = row.iter().zip(&x).map(|(a, b)| a * b).sum())
    };
    run(&mut y);
    let iters = 5;
    let start = Instant::now();
    for _ in 0..iters {
        run(&mut y);
    }
    let secs = start.elapsed().as_secs_f64().max(1e-9);
    std::hint::black_box(&y);
    2.0 * (rows * cols) as f64 * iters as f64 / secs
}

/// The steps [`profile_machine`] will run, for sizing a progress bar.
pub fn step_count(options: &MeasureOptions, gpu: bool) -> usize {
    2 + usize::from(!options.skip_disk) + if gpu { GpuField::ALL.len() } else { 0 }
}

/// Measures this machine: disk (unless skipped), CPU attention and GEMV, and every [`GpuField`] when a probe is
/// given. Fields not measured keep `base`'s values. `progress(step_name)` is called before each step.
pub fn profile_machine(
    base: &HardwareProfile,
    options: &MeasureOptions,
    gpu: Option<&mut dyn GpuProbe>,
    progress: &mut dyn FnMut(&str),
) -> Result<(HardwareProfile, Vec<Measurement>), MeasureError> {
    let mut p = base.clone();
    p.measured.clear();
    p.source = format!(
        "measured by strata profile; unmeasured fields from `{}`",
        base.name
    );
    let mut table = Vec::new();
    let mut record =
        |p: &mut HardwareProfile, field: &'static str, what: String, value: f64, unit| {
            p.measured.push(field.to_string());
            table.push(Measurement {
                field,
                what,
                value,
                unit,
            });
        };

    if !options.skip_disk {
        progress("disk read/write");
        let d = disk_bandwidth(&options.disk_dir, options.disk_bytes, options.disk_threads)
            .map_err(|source| MeasureError::Disk {
                dir: options.disk_dir.clone(),
                source,
            })?;
        let w = d.write / GIB;
        let r = d.read / GIB;
        p.dtoc = r;
        p.ctod_cache_p = w;
        p.ctod_hidden_p = w;
        p.ctod_g = w;
        let how = if d.direct_read {
            if cfg!(target_os = "macos") {
                "F_NOCACHE"
            } else {
                "O_DIRECT"
            }
        } else {
            "buffered: may be the page cache"
        };
        record(&mut p, "dtoc", format!("disk read ({how})"), r, "GiB/s");
        for field in ["ctod_cache_p", "ctod_hidden_p", "ctod_g"] {
            record(&mut p, field, "disk write + fsync".into(), w, "GiB/s");
        }
    }

    progress("CPU attention");
    // The correction factor is 1 at gbs 64, hidden 4096: measure there so the constant is the raw rate.
    let attn = cpu_attention_flops(8, 512, 4096, 32) / 1e12;
    p.cpu_flops = attn;
    record(
        &mut p,
        "cpu_flops",
        "CPU decode attention (f32)".into(),
        attn,
        "TFLOP/s",
    );

    progress("CPU GEMV");
    let gemv = cpu_gemv_flops(4096, 4096) / 1e12;
    p.cpu_gemv_flops = Some(gemv);
    record(
        &mut p,
        "cpu_gemv_flops",
        "CPU GEMV 4096x4096 (f32)".into(),
        gemv,
        "TFLOP/s",
    );

    p.name = format!("this machine; GPU fields from `{}`", base.name);
    if let Some(probe) = gpu {
        p.name = probe.adapter_name();
        for field in GpuField::ALL {
            progress(field.name());
            // A failed GPU step keeps the base value: the table shows which ones were measured.
            if let Ok(value) = probe.measure(field) {
                if value.is_finite() && value > 0.0 {
                    field.set(&mut p, value);
                    let unit = if field.is_bandwidth() {
                        "GiB/s"
                    } else {
                        "TFLOP/s"
                    };
                    record(&mut p, field.name(), probe.describe(field), value, unit);
                }
            }
        }
    }
    Ok((p, table))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_test_measures_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let d = disk_bandwidth(dir.path(), 16 << 20, 2).unwrap();
        assert!(d.read > 0.0 && d.write > 0.0, "{d:?}");
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "temp files left behind"
        );
    }

    struct FakeGpu;
    impl GpuProbe for FakeGpu {
        fn adapter_name(&self) -> String {
            "Fake GPU".into()
        }
        fn measure(&mut self, field: GpuField) -> Result<f64, String> {
            match field {
                GpuField::Ctog => Ok(50.0),
                GpuField::BmmFlopsG => Err("not implemented".into()),
                _ => Ok(1.0),
            }
        }
    }

    #[test]
    fn probe_results_replace_base_fields() {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = MeasureOptions::new(dir.path());
        opts.disk_bytes = 8 << 20;
        let mut steps = Vec::new();
        let mut gpu = FakeGpu;
        let base = HardwareProfile::t4();
        let (p, table) = profile_machine(&base, &opts, Some(&mut gpu), &mut |s| {
            steps.push(s.to_string())
        })
        .unwrap();
        assert_eq!(steps.len(), step_count(&opts, true));
        assert_eq!(p.name, "Fake GPU");
        assert_eq!(p.ctog, 50.0);
        assert_eq!(
            p.bmm_flops_g, base.bmm_flops_g,
            "a failed step keeps the base value"
        );
        assert!(!p.measured.contains(&"bmm_flops_g".to_string()));
        assert!(p.measured.contains(&"dtoc".to_string()) && p.cpu_gemv_flops.is_some());
        assert_eq!(table.len(), p.measured.len());
        p.validate().unwrap();
    }
}
