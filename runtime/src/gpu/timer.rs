//! GPU time of a recorded step, from timestamps the GPU writes itself (`TIMESTAMP_QUERY`).
//!
//! Wall time from submit to idle includes the submit (~40 us on an H200) and the host's wait, which is larger than a
//! decode-sized kernel; timestamps written at the start of a step's first compute pass and the end of its last
//! measure only the GPU's work. Devices without the feature have no timer, and callers fall back to wall time.

use crate::gpu::{Gpu, GpuError};

/// Two timestamps around one submitted step ([`crate::gpu::kernels::Recorder::submit_timed`]).
#[derive(Debug)]
pub struct GpuTimer {
    pub(crate) queries: wgpu::QuerySet,
    resolved: wgpu::Buffer,
}

impl GpuTimer {
    /// A timer on `gpu`, or `None` when the device cannot write timestamps.
    pub fn new(gpu: &Gpu) -> Option<GpuTimer> {
        if !gpu.features.contains(wgpu::Features::TIMESTAMP_QUERY) {
            return None;
        }
        let queries = gpu.device.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("step timestamps"),
            ty: wgpu::QueryType::Timestamp,
            count: 2,
        });
        let resolved = gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("resolved timestamps"),
            size: 16,
            usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        Some(GpuTimer { queries, resolved })
    }

    /// Records the resolve of both timestamps (after the step's last pass).
    pub(crate) fn resolve(&self, encoder: &mut wgpu::CommandEncoder) {
        encoder.resolve_query_set(&self.queries, 0..2, &self.resolved, 0);
    }

    /// Seconds between the two timestamps of the last timed submit (waits for it to finish).
    pub fn seconds(&self, gpu: &Gpu) -> Result<f64, GpuError> {
        let bytes = gpu.read_back(&[(&self.resolved, 0, 16)])?;
        let ticks: [u64; 2] = bytemuck::pod_read_unaligned(&bytes[0]);
        let period_ns = f64::from(gpu.queue.get_timestamp_period());
        Ok(ticks[1].saturating_sub(ticks[0]) as f64 * period_ns * 1e-9)
    }
}
