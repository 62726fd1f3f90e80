//! Bandwidth of the paths the tiers really use, for the profiler and the cost model.
//!
//! Each figure times the same calls the schedule makes: CPU -> GPU is [`CpuTier::fetch`] + submit + wait (one DMA
//! copy, or the staging belt's CPU copy and GPU copy), GPU -> CPU is [`CpuTier::write_back`] + submit + wait (+ the
//! readback copy on the host-memory path), disk write/read are [`DiskTier::write`] / [`DiskTier::read`] with the
//! tier's threads. Disk reads right after a write may come from the OS page cache, so they can overstate a cold read.
//! On lavapipe the GPU numbers measure memcpy on the CPU, not a GPU.

use std::fmt;
use std::time::Instant;

use super::{wait_idle, CpuPath, CpuTier, DiskTier, Result, Tiers};

/// Measured bandwidths in GB/s (10^9 bytes per second).
#[derive(Clone, Debug, PartialEq)]
pub struct BandwidthReport {
    /// The CPU tier path measured.
    pub cpu_path: CpuPath,
    /// Bytes moved per transfer.
    pub bytes: u64,
    /// CPU tier -> GPU slot.
    pub cpu_to_gpu: f64,
    /// GPU slot -> CPU tier.
    pub gpu_to_cpu: f64,
    /// Host memory -> new offload file; `None` without a disk tier.
    pub disk_write: Option<f64>,
    /// Offload file -> host memory; `None` without a disk tier.
    pub disk_read: Option<f64>,
}

impl fmt::Display for BandwidthReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} MiB, cpu path {}: cpu->gpu {:.2} GB/s, gpu->cpu {:.2} GB/s",
            self.bytes >> 20,
            self.cpu_path,
            self.cpu_to_gpu,
            self.gpu_to_cpu
        )?;
        if let (Some(w), Some(r)) = (self.disk_write, self.disk_read) {
            write!(f, ", disk write {w:.2} GB/s, disk read {r:.2} GB/s")?;
        }
        Ok(())
    }
}

/// Best of `iters` timings of `op` (after one warm-up run), as GB/s for `bytes` bytes.
fn best_gbps(bytes: u64, iters: usize, mut op: impl FnMut() -> Result<()>) -> Result<f64> {
    op()?;
    let mut best = f64::INFINITY;
    for _ in 0..iters.max(1) {
        let start = Instant::now();
        op()?;
        best = best.min(start.elapsed().as_secs_f64());
    }
    Ok(bytes as f64 / best.max(1e-9) / 1e9)
}

/// Measures every tier path with `bytes`-byte transfers, best of `iters`. Allocates one GPU slot and one CPU tensor
/// of `bytes` (and writes one offload file) for the duration.
pub fn measure_bandwidth(tiers: &Tiers, bytes: u64, iters: usize) -> Result<BandwidthReport> {
    let device = tiers.device();
    let queue = tiers.queue();
    let cpu: &CpuTier = tiers.cpu();
    let data: Vec<u8> = (0..bytes).map(|i| (i * 31 % 251) as u8).collect();
    let mut host = cpu.upload(&data)?;
    let slot = tiers.gpu().acquire(bytes)?;
    let encoder = || {
        device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("strata bandwidth"),
        })
    };

    let cpu_to_gpu = best_gbps(bytes, iters, || {
        let mut enc = encoder();
        cpu.fetch(&host, slot.buffer(), 0, &mut enc)?;
        cpu.prepare_submit(&enc);
        queue.submit([enc.finish()]);
        wait_idle(device)
    })?;
    let gpu_to_cpu = best_gbps(bytes, iters, || {
        let mut enc = encoder();
        let pending = cpu.write_back(slot.buffer(), 0, &mut host, &mut enc)?;
        queue.submit([enc.finish()]);
        wait_idle(device)?;
        match pending {
            super::PendingStore::Done => Ok(()),
            super::PendingStore::Readback { readback, offset } => {
                host.fill_from_readback(readback, offset)
            }
        }
    })?;

    let (disk_write, disk_read) = match tiers.disk() {
        Ok(disk) => {
            let (w, r) = measure_disk(disk, &data, iters)?;
            (Some(w), Some(r))
        }
        Err(_) => (None, None),
    };
    Ok(BandwidthReport {
        cpu_path: cpu.path(),
        bytes,
        cpu_to_gpu,
        gpu_to_cpu,
        disk_write,
        disk_read,
    })
}

fn measure_disk(disk: &DiskTier, data: &[u8], iters: usize) -> Result<(f64, f64)> {
    let bytes = data.len() as u64;
    let write = best_gbps(bytes, iters, || {
        disk.write("bandwidth-probe", data).map(drop)
    })?;
    let file = disk.write("bandwidth-probe", data)?;
    let mut out = vec![0u8; data.len()];
    let read = best_gbps(bytes, iters, || disk.read_into(&file, &mut out))?;
    Ok((write, read))
}
