//! Measures the memory tiers' transfer paths on the first wgpu adapter:
//!
//! ```text
//! cargo run --release -p strata-runtime --example tier_bandwidth -- [--mib 256] [--iters 5] [--offload-dir DIR] [--host-memory]
//! ```
//!
//! Prints one line per CPU tier path the device supports (the DMA path only where the adapter offers
//! MAPPABLE_PRIMARY_BUFFERS; `--host-memory` measures only the portable path). On lavapipe the GPU figures measure
//! the CPU, not a GPU.

use std::error::Error;
use std::path::PathBuf;

use strata_runtime::tiers::{self, measure_bandwidth, CpuPath, DiskOptions, TierOptions, Tiers};

fn main() -> Result<(), Box<dyn Error>> {
    let mut mib = 256u64;
    let mut iters = 5usize;
    let mut dir: Option<PathBuf> = None;
    let mut host_only = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--mib" => mib = value("--mib")?.parse().map_err(|e| format!("--mib: {e}"))?,
            "--iters" => {
                iters = value("--iters")?
                    .parse()
                    .map_err(|e| format!("--iters: {e}"))?
            }
            "--offload-dir" => dir = Some(value("--offload-dir")?.into()),
            "--host-memory" => host_only = true,
            other => {
                return Err(
                    format!("unknown argument {other:?}; see the example's doc comment").into(),
                )
            }
        }
    }
    let instance = wgpu::Instance::default();
    let adapter = pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions {
        power_preference: wgpu::PowerPreference::HighPerformance,
        ..Default::default()
    }))
    .map_err(|e| {
        format!("no wgpu adapter ({e}); install a Vulkan driver (lavapipe: mesa-vulkan-drivers)")
    })?;
    let info = adapter.get_info();
    println!(
        "adapter: {} ({:?}, {:?})",
        info.name, info.device_type, info.backend
    );
    let features = if host_only {
        wgpu::Features::empty()
    } else {
        tiers::wanted_features(&adapter)
    };
    let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
        label: Some("tier_bandwidth"),
        required_features: features,
        required_limits: adapter.limits(),
        ..Default::default()
    }))?;
    let bytes = (mib << 20).min(device.limits().max_buffer_size);

    let tmp;
    let dir = match dir {
        Some(d) => d,
        None => {
            tmp = std::env::temp_dir().join(format!("strata-bandwidth-{}", std::process::id()));
            tmp
        }
    };
    let mut paths = vec![CpuPath::best_for(device.features())];
    if paths[0] != CpuPath::HostMemory {
        paths.push(CpuPath::HostMemory);
    }
    for path in paths {
        let tiers = Tiers::new(
            &device,
            &queue,
            TierOptions {
                cpu_path: Some(path),
                disk: Some(DiskOptions::new(&dir)),
            },
        )?;
        println!("{}", measure_bandwidth(&tiers, bytes, iters)?);
    }
    Ok(())
}
