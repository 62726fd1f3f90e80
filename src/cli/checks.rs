//! Checks a run passes before it costs anything: output paths are writable places, sizes fit their types, and the
//! plan fits the memory the device and the host really have. Each refusal names the numbers and the flag to change.

use std::path::Path;

use anyhow::bail;
use strata_runtime::config::OptConfig;
use strata_runtime::gpu::memory::{device_memory, DeviceMemory};
use strata_runtime::gpu::Gpu;
use strata_runtime::offload::placement::TierBytes;
use strata_runtime::offload::policy::format_bytes;

/// Removes what runs that did not finish (SIGKILL, the OOM killer, a power cut) left in the offload directory, and
/// says so: every run directory no live process holds locked. Live runs sharing the directory are left alone.
pub fn dead_runs(offload_dir: Option<&Path>) {
    let Some(dir) = offload_dir else {
        return;
    };
    for dead in strata_runtime::tiers::remove_dead_runs(dir) {
        let owner = if dead.owner.is_empty() {
            String::new()
        } else {
            format!(" ({})", dead.owner)
        };
        eprintln!(
            "strata: removed {} offload files ({}) that a run which did not finish{owner} left in {}",
            dead.files,
            format_bytes(dead.bytes),
            dead.dir.display()
        );
    }
}

/// Refuses an output file (`flag` = its option, for the message) that cannot be created: a directory, or a path
/// whose directory does not exist. Run before any work, so no result is lost to a typo at the end.
pub fn output_file(flag: &str, path: &Path) -> anyhow::Result<()> {
    if path.is_dir() {
        bail!(
            "{flag} {}: is a directory; give a file name",
            path.display()
        );
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !parent.is_dir() {
        let what = if parent.exists() {
            "is not a directory"
        } else {
            "does not exist"
        };
        bail!(
            "{flag} {}: directory {} {what}; create it first, or choose another path",
            path.display(),
            parent.display()
        );
    }
    // A real file, since permission bits do not tell the whole story (read-only mounts, ACLs, root); removed at once.
    if let Err(e) = tempfile::Builder::new()
        .prefix(".strata-probe-")
        .tempfile_in(parent)
    {
        bail!(
            "{flag} {}: cannot write in {}: {e}",
            path.display(),
            parent.display()
        );
    }
    Ok(())
}

/// The names wgpu reads in `WGPU_BACKEND` (`wgpu::Backends::from_comma_list`), which ignores any other name and so
/// turns a typo into "no GPU adapter found among backends Backends(0x0)".
const BACKEND_NAMES: [&str; 11] = [
    "vulkan", "vk", "metal", "mtl", "dx12", "d3d12", "gl", "opengl", "gles", "webgpu", "noop",
];

/// Refuses a `WGPU_BACKEND` (`value`, when set) that names no wgpu backend, naming the bad value and the valid ones.
pub fn wgpu_backend(value: Option<&str>) -> anyhow::Result<()> {
    let Some(value) = value else {
        return Ok(());
    };
    let unknown: Vec<&str> = value
        .split(',')
        .map(str::trim)
        .filter(|name| !BACKEND_NAMES.contains(&name.to_lowercase().as_str()))
        .collect();
    if !unknown.is_empty() {
        bail!(
            "WGPU_BACKEND={value}: {} is not a wgpu backend; use a comma-separated list of vulkan (vk), metal (mtl), \
             dx12 (d3d12), gl (opengl, gles), webgpu or noop, or unset it for Vulkan, Metal and DX12",
            unknown
                .iter()
                .map(|n| format!("`{n}`"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}

/// Refuses `--max-new-tokens` that, after the longest prompt, runs past the model's context (the last generated
/// token needs no position), in arithmetic that cannot overflow.
pub fn new_tokens(config: &OptConfig, longest_prompt: usize, max_new: usize) -> anyhow::Result<()> {
    let positions = longest_prompt.checked_add(max_new.saturating_sub(1));
    if positions.is_none_or(|n| n > config.max_seq_len) {
        bail!(
            "--max-new-tokens {max_new} after a prompt of {longest_prompt} tokens exceeds {}'s context of {} tokens; \
             at most {} new tokens fit",
            config.name,
            config.max_seq_len,
            (config.max_seq_len + 1).saturating_sub(longest_prompt)
        );
    }
    Ok(())
}

/// Refuses an empty prompt or a token id outside `config`'s vocabulary, naming the prompt and the position.
pub fn prompt_ids(config: &OptConfig, prompts: &[Vec<u32>]) -> anyhow::Result<()> {
    for (i, prompt) in prompts.iter().enumerate() {
        if prompt.is_empty() {
            bail!("prompt {i} is empty: every prompt needs at least one token (OPT prompts start with BOS, id 2)");
        }
        if let Some((position, id)) = prompt
            .iter()
            .enumerate()
            .find(|(_, &id)| id as usize >= config.vocab_size)
        {
            bail!(
                "prompt {i} has token id {id} at position {position}, outside the vocabulary of {} tokens ({})",
                config.vocab_size,
                config.name
            );
        }
    }
    Ok(())
}

/// The effective batch of `--gpu-batch-size` x `--num-gpu-batches`, refused when the KV cache of that many
/// sequences of `seq_len` tokens would not even be countable in bytes (the planner's arithmetic then stays in range).
pub fn effective_batch(
    config: &OptConfig,
    gpu_batch_size: usize,
    num_gpu_batches: usize,
    seq_len: usize,
) -> anyhow::Result<usize> {
    let too_big = || {
        anyhow::anyhow!(
            "--gpu-batch-size {gpu_batch_size} x --num-gpu-batches {num_gpu_batches} sequences of {seq_len} tokens \
             need more than {} of KV cache for {}; lower --gpu-batch-size or --num-gpu-batches",
            format_bytes(SIZE_LIMIT),
            config.name
        )
    };
    let batch = gpu_batch_size
        .checked_mul(num_gpu_batches)
        .ok_or_else(too_big)?;
    let cache = [
        2,
        config.num_hidden_layers as u64,
        batch as u64,
        seq_len as u64,
        config.hidden_size as u64,
        4,
    ]
    .into_iter()
    .try_fold(1u64, u64::checked_mul);
    if cache.is_none_or(|bytes| bytes > SIZE_LIMIT) {
        return Err(too_big());
    }
    Ok(batch)
}

/// Larger than any machine's memory and disk, far enough below `u64::MAX` that sums and double buffers of such
/// sizes cannot overflow.
const SIZE_LIMIT: u64 = 1 << 60;

/// Memory the host can give a new allocation now (what `--policy auto` plans with); 0 when the OS does not say.
pub fn host_available() -> u64 {
    strata_runtime::cost_model::auto::MachineCaps::cpu_memory().unwrap_or(0)
}

/// Refuses a plan whose peak does not fit the memory `gpu` and this host really have, before any weight is read.
pub fn memory_fits(gpu: &Gpu, peak: TierBytes, gpu_mem_flag: Option<u64>) -> anyhow::Result<()> {
    let device = device_memory(gpu);
    if let Some(warning) = fits(
        peak,
        &device,
        host_available(),
        gpu_mem_flag,
        &gpu.info.name,
    )? {
        eprintln!("warning: {warning}");
    }
    Ok(())
}

/// [`memory_fits`] on given figures: `host` is the host's available bytes, `gpu_mem_flag` the `--gpu-mem` the user
/// passed (stating the size of a device that reports none). A device that reports no size is not refused (Metal and
/// DX12 report none, and refusing every run there would help nobody): the returned warning says what was not checked.
pub fn fits(
    peak: TierBytes,
    device: &DeviceMemory,
    host: u64,
    gpu_mem_flag: Option<u64>,
    adapter: &str,
) -> anyhow::Result<Option<String>> {
    const GPU_ADVICE: &str = "offload weights, cache or activations with --percent (and --offload-dir), lower \
                              --gpu-batch-size or --num-gpu-batches, store weights as f16 (--dtype f16) or 4-bit \
                              (--compress-weight), or use a smaller model";
    const CPU_ADVICE: &str =
        "move CPU shares in --percent to disk (with --offload-dir), lower --num-gpu-batches, \
                              or use a smaller model";
    let mut problems = Vec::new();
    let mut warning = None;
    match device {
        DeviceMemory::Host => {
            let needed = peak.gpu.saturating_add(peak.cpu);
            if needed > host {
                problems.push(format!(
                    "host memory: the plan needs {} on {adapter}, a CPU device computing in host memory, + {} in CPU \
                     memory = {}, but the host has {} available ({} over); {GPU_ADVICE}",
                    format_bytes(peak.gpu),
                    format_bytes(peak.cpu),
                    format_bytes(needed),
                    format_bytes(host),
                    format_bytes(needed - host)
                ));
            }
        }
        DeviceMemory::Dedicated { .. } => {
            let usable = device.usable().unwrap_or(0);
            if peak.gpu > usable {
                problems.push(format!(
                    "GPU memory: the plan needs {} but {adapter} has {} available ({} over); {GPU_ADVICE}",
                    format_bytes(peak.gpu),
                    format_bytes(usable),
                    format_bytes(peak.gpu - usable)
                ));
            }
        }
        DeviceMemory::Unknown { reason } => {
            if gpu_mem_flag.is_none() {
                warning = Some(format!(
                    "GPU memory not checked: the plan needs {} but {adapter}'s memory size is unknown ({reason}); \
                     pass --gpu-mem with the memory the run may use (e.g. --gpu-mem 15GiB) to have it checked",
                    format_bytes(peak.gpu)
                ));
            }
        }
    }
    if device != &DeviceMemory::Host && peak.cpu > host {
        problems.push(format!(
            "CPU memory: the plan needs {} but the host has {} available ({} over); {CPU_ADVICE}",
            format_bytes(peak.cpu),
            format_bytes(host),
            format_bytes(peak.cpu - host)
        ));
    }
    if !problems.is_empty() {
        bail!("{}", problems.join("; "));
    }
    Ok(warning)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn peak(gpu: u64, cpu: u64) -> TierBytes {
        TierBytes { gpu, cpu, disk: 0 }
    }

    #[test]
    fn a_plan_over_real_memory_is_refused_with_the_numbers() {
        let h200 = DeviceMemory::Dedicated {
            total: 141 * GIB,
            available: Some(139 * GIB),
        };
        assert!(fits(peak(100 * GIB, GIB), &h200, 64 * GIB, None, "H200").is_ok());
        let e = fits(peak(140 * GIB, GIB), &h200, 64 * GIB, None, "H200")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("GPU memory: the plan needs 140.00 GiB but H200 has 139.00 GiB available"),
            "{e}"
        );
        assert!(e.contains("--percent"), "{e}");
        let e = fits(peak(GIB, 80 * GIB), &h200, 64 * GIB, None, "H200")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("CPU memory: the plan needs 80.00 GiB but the host has 64.00 GiB"),
            "{e}"
        );
    }

    #[test]
    fn a_cpu_device_shares_host_memory_with_the_cpu_tier() {
        assert!(fits(
            peak(10 * GIB, 10 * GIB),
            &DeviceMemory::Host,
            21 * GIB,
            None,
            "llvmpipe"
        )
        .is_ok());
        let e = fits(
            peak(15 * GIB, 10 * GIB),
            &DeviceMemory::Host,
            21 * GIB,
            None,
            "llvmpipe",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("= 25.00 GiB, but the host has 21.00 GiB available"),
            "{e}"
        );
    }

    #[test]
    fn an_unknown_device_size_warns_and_asks_for_gpu_mem() {
        let unknown = DeviceMemory::Unknown {
            reason: "the Metal backend does not report memory sizes".into(),
        };
        let w = fits(peak(GIB, 0), &unknown, 64 * GIB, None, "M2")
            .unwrap()
            .expect("a warning");
        assert!(w.contains("unknown") && w.contains("pass --gpu-mem"), "{w}");
        assert_eq!(
            fits(peak(GIB, 0), &unknown, 64 * GIB, Some(8 * GIB), "M2").unwrap(),
            None
        );
        // The host is still checked.
        assert!(fits(peak(GIB, 100 * GIB), &unknown, 64 * GIB, None, "M2").is_err());
    }

    #[test]
    fn sizes_that_overflow_are_refused() {
        let config = strata::get_opt_config("opt-125m").unwrap();
        assert_eq!(effective_batch(&config, 4, 2, 544).unwrap(), 8);
        for (gbs, k) in [(usize::MAX, 2), (1 << 33, 1 << 20), (1 << 40, 1)] {
            let e = effective_batch(&config, gbs, k, 544)
                .unwrap_err()
                .to_string();
            assert!(e.contains("lower --gpu-batch-size"), "{e}");
        }
        assert!(new_tokens(&config, 2, usize::MAX).is_err());
        assert!(new_tokens(&config, 2, 2047).is_ok());
        let e = new_tokens(&config, 2, 2048).unwrap_err().to_string();
        assert!(e.contains("at most 2047 new tokens fit"), "{e}");
    }

    #[test]
    fn a_bad_wgpu_backend_is_named_with_the_valid_ones() {
        assert!(wgpu_backend(None).is_ok());
        assert!(wgpu_backend(Some("vulkan")).is_ok());
        assert!(wgpu_backend(Some("Vulkan, gl")).is_ok());
        let e = wgpu_backend(Some("banana")).unwrap_err().to_string();
        assert!(
            e.contains("`banana` is not a wgpu backend") && e.contains("vulkan (vk)"),
            "{e}"
        );
        let e = wgpu_backend(Some("vk,")).unwrap_err().to_string();
        assert!(e.contains("`` is not"), "{e}");
    }

    #[test]
    fn output_files_need_an_existing_directory() {
        let dir = tempfile::tempdir().unwrap();
        assert!(output_file("--dump-logits", &dir.path().join("x.npy")).is_ok());
        let e = output_file("--dump-logits", &dir.path().join("missing/x.npy"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not exist"), "{e}");
        let e = output_file("--out", dir.path()).unwrap_err().to_string();
        assert!(e.contains("is a directory"), "{e}");
    }
}
