//! The memory tiers on a real wgpu device (lavapipe on CPU machines): every path round-trips bytes exactly, the GPU
//! pool stops allocating once warm, disk files never outlive their tensors, and offload-dir errors say what is wrong.

use std::path::Path;

use strata_runtime::tiers::{
    self, measure_bandwidth, CpuPath, CpuTier, DiskOptions, DiskTier, DoubleBuffer, GpuPool,
    PendingStore, TensorHome, Tier, TierError, TierOptions, Tiers,
};

/// A device with the tier features the adapter offers (`dma`), or without any (`!dma`). `None` when `dma` is asked
/// for and the adapter lacks MAPPABLE_PRIMARY_BUFFERS.
fn device(dma: bool) -> Option<(wgpu::Device, wgpu::Queue)> {
    let instance = wgpu::Instance::default();
    let adapter = pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions::default()))
        .expect("no wgpu adapter: these tests need a Vulkan device (install mesa-vulkan-drivers for lavapipe)");
    let features = if dma {
        tiers::wanted_features(&adapter)
    } else {
        wgpu::Features::empty()
    };
    if dma && features.is_empty() {
        eprintln!(
            "adapter {:?} lacks MAPPABLE_PRIMARY_BUFFERS: DMA path not tested",
            adapter.get_info().name
        );
        return None;
    }
    let desc = wgpu::DeviceDescriptor {
        label: Some("tiers test"),
        required_features: features,
        required_limits: adapter.limits(),
        ..Default::default()
    };
    Some(pollster::block_on(adapter.request_device(&desc)).expect("request_device"))
}

/// The CPU paths this machine can test, each with its own device.
fn each_path() -> Vec<(CpuPath, wgpu::Device, wgpu::Queue)> {
    let mut out = Vec::new();
    let (d, q) = device(false).expect("portable device");
    out.push((CpuPath::HostMemory, d, q));
    if let Some((d, q)) = device(true) {
        out.push((CpuPath::DmaBuffer, d.clone(), q.clone()));
        // The host-memory path must also work on a device that has the feature.
        out.push((CpuPath::HostMemory, d, q));
    }
    out
}

/// Deterministic, position-dependent bytes (so a shifted or truncated copy cannot pass).
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 56) as u8
        })
        .collect()
}

fn tiers_with_disk(device: &wgpu::Device, queue: &wgpu::Queue, path: CpuPath, dir: &Path) -> Tiers {
    Tiers::new(
        device,
        queue,
        TierOptions {
            cpu_path: Some(path),
            disk: Some(DiskOptions::new(dir)),
        },
    )
    .expect("tiers")
}

fn gpu_buffer(home: &TensorHome) -> &wgpu::Buffer {
    match home {
        TensorHome::Gpu(t) => t.buffer(),
        other => panic!("expected a GPU home, got {:?}", other.tier()),
    }
}

fn encoder(device: &wgpu::Device) -> wgpu::CommandEncoder {
    device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
        label: Some("test"),
    })
}

#[test]
fn every_path_fetches_and_stores_byte_exact() {
    let tmp = tempfile::tempdir().unwrap();
    for (path, device, queue) in each_path() {
        let tiers = tiers_with_disk(&device, &queue, path, tmp.path());
        assert_eq!(tiers.report().cpu_path, path);
        // Odd lengths exercise the 4-byte padding; 40 MiB crosses the staging belt's 32 MiB chunk.
        for (i, len) in [1usize, 3, 4, 1001, 40 << 20].into_iter().enumerate() {
            let data = pattern(len, i as u64);
            let back = pattern(len, 100 + i as u64);
            for tier in [Tier::Cpu, Tier::Disk, Tier::Gpu] {
                let mut home = tiers.place(tier, "w", &data).unwrap();
                assert_eq!(home.len(), len as u64);
                assert_eq!(
                    tiers.read(&home).unwrap(),
                    data,
                    "{path} {tier} place/read {len}"
                );

                // home -> GPU slot.
                let slot = tiers.place(Tier::Gpu, "slot", &vec![0xEE; len]).unwrap();
                let mut enc = encoder(&device);
                tiers.fetch(&home, gpu_buffer(&slot), 0, &mut enc).unwrap();
                tiers.prepare_submit(&enc);
                queue.submit([enc.finish()]);
                assert_eq!(
                    tiers.read(&slot).unwrap(),
                    data,
                    "{path} {tier} fetch {len}"
                );

                // GPU -> home.
                let src = tiers.place(Tier::Gpu, "src", &back).unwrap();
                let mut enc = encoder(&device);
                let pending = tiers
                    .store(gpu_buffer(&src), 0, &mut home, &mut enc)
                    .unwrap();
                queue.submit([enc.finish()]);
                pending.complete(&tiers, &mut home).unwrap();
                assert_eq!(
                    tiers.read(&home).unwrap(),
                    back,
                    "{path} {tier} store {len}"
                );
            }
        }
        let report = tiers.report();
        assert_eq!(report.cpu.current_bytes, 0, "every CPU tensor was dropped");
        assert_eq!(
            report.disk.current_bytes, 0,
            "every disk tensor was dropped"
        );
        assert!(
            report.cpu.peak_bytes >= 40 << 20 && report.disk.peak_bytes >= 40 << 20,
            "{report:?}"
        );
        assert_eq!(report.gpu.in_use.current_bytes, 0);
    }
}

#[test]
fn tensors_move_through_every_tier_pair() {
    let tmp = tempfile::tempdir().unwrap();
    for (path, device, queue) in each_path() {
        let tiers = tiers_with_disk(&device, &queue, path, tmp.path());
        let data = pattern(777_777, 7);
        let mut home = tiers.place(Tier::Gpu, "t", &data).unwrap();
        for tier in [
            Tier::Cpu,
            Tier::Disk,
            Tier::Gpu,
            Tier::Disk,
            Tier::Cpu,
            Tier::Gpu,
            Tier::Cpu,
        ] {
            home = tiers.move_to(home, tier, "t").unwrap();
            assert_eq!(home.tier(), tier);
            assert_eq!(
                tiers.read(&home).unwrap(),
                data,
                "{path}: after moving to {tier}"
            );
        }
    }
}

#[test]
fn cpu_tier_reads_writes_and_counts_bytes() {
    for (path, device, queue) in each_path() {
        let cpu = CpuTier::new(&device, &queue, path).unwrap();
        let mut t = cpu.upload(&pattern(4096 + 2, 1)).unwrap();
        let before = cpu.stats().current_bytes;
        assert!(before >= 4098);
        // A partial write in the middle, then one ending on the odd tail.
        let mid = pattern(1024, 2);
        cpu.write(&mut t, 512, &mid).unwrap();
        cpu.write(&mut t, 4096, &[9, 8]).unwrap();
        let mut want = pattern(4098, 1);
        want[512..1536].copy_from_slice(&mid);
        want[4096..].copy_from_slice(&[9, 8]);
        assert_eq!(cpu.read(&t).unwrap(), want, "{path}");
        assert_eq!(cpu.with_bytes(&t, |b| b[4097]).unwrap(), 8);
        assert_eq!(t.host_bytes().is_some(), path == CpuPath::HostMemory);

        let err = cpu.write(&mut t, 4000, &[0; 200]).unwrap_err();
        assert!(matches!(err, TierError::Size { .. }), "{err}");
        if path == CpuPath::DmaBuffer {
            let err = cpu.write(&mut t, 2, &[0; 4]).unwrap_err();
            assert!(matches!(err, TierError::Alignment { .. }), "{err}");
        }
        drop(t);
        assert_eq!(cpu.stats().current_bytes, 0);
        assert_eq!(cpu.stats().peak_bytes, before);
    }
}

#[test]
fn dma_path_without_the_feature_is_a_clear_error() {
    let (device, queue) = device(false).unwrap();
    let err = CpuTier::new(&device, &queue, CpuPath::DmaBuffer).unwrap_err();
    assert!(
        err.to_string().contains("MAPPABLE_PRIMARY_BUFFERS"),
        "{err}"
    );
    assert_eq!(CpuPath::best_for(device.features()), CpuPath::HostMemory);
    assert_eq!(
        CpuPath::best_for(wgpu::Features::MAPPABLE_PRIMARY_BUFFERS),
        CpuPath::DmaBuffer
    );
}

#[test]
fn gpu_pool_reuses_slots_after_warm_up() {
    let (device, queue) = device(false).unwrap();
    let pool = GpuPool::new(&device);
    let cpu = CpuTier::new(&device, &queue, CpuPath::HostMemory).unwrap();
    let layer = 3 << 20;
    pool.reserve(layer, 2).unwrap();
    pool.reserve(1000, 4).unwrap();
    let created = pool.stats().buffers_created;
    assert_eq!(created, 6);
    let weights: Vec<_> = (0..4)
        .map(|j| cpu.upload(&pattern(layer as usize - j, j as u64)).unwrap())
        .collect();
    for _step in 0..3 {
        let mut slots = DoubleBuffer::new(&pool, layer).unwrap();
        for w in &weights {
            let scratch: Vec<_> = (0..4)
                .map(|k| pool.acquire(900 + k * 30).unwrap())
                .collect();
            let mut enc = encoder(&device);
            cpu.fetch(w, slots.back().buffer(), 0, &mut enc).unwrap();
            cpu.prepare_submit(&enc);
            queue.submit([enc.finish()]);
            slots.swap();
            drop(scratch);
        }
    }
    let stats = pool.stats();
    assert_eq!(
        stats.buffers_created, created,
        "no allocation after warm-up"
    );
    assert_eq!(stats.in_use.current_bytes, 0);
    assert_eq!(stats.allocated.current_bytes, stats.allocated.peak_bytes);
    assert!(stats.in_use.peak_bytes >= 2 * layer + 4 * 900);
    // A request that fits no reserved buffer allocates, and trimming frees what is not handed out.
    let big = pool.acquire(5 << 20).unwrap();
    assert_eq!(pool.stats().buffers_created, created + 1);
    pool.trim();
    assert_eq!(pool.stats().allocated.current_bytes, big.size());
}

#[test]
fn gpu_slot_contents_survive_a_double_buffer_swap() {
    let (device, queue) = device(false).unwrap();
    let tiers = Tiers::new(&device, &queue, TierOptions::default()).unwrap();
    let a = tiers.place(Tier::Cpu, "a", &pattern(5000, 1)).unwrap();
    let b = tiers.place(Tier::Cpu, "b", &pattern(5000, 2)).unwrap();
    let mut slots = DoubleBuffer::new(tiers.gpu(), 5000).unwrap();
    let mut enc = encoder(&device);
    tiers.fetch(&a, slots.back().buffer(), 0, &mut enc).unwrap();
    slots.swap();
    tiers.fetch(&b, slots.back().buffer(), 0, &mut enc).unwrap();
    tiers.prepare_submit(&enc);
    queue.submit([enc.finish()]);
    let read = |buf: &wgpu::Buffer| {
        let mut enc = encoder(&device);
        let out = tiers.place(Tier::Gpu, "o", &[0; 5000]).unwrap();
        enc.copy_buffer_to_buffer(buf, 0, gpu_buffer(&out), 0, 5000);
        queue.submit([enc.finish()]);
        tiers.read(&out).unwrap()
    };
    assert_eq!(read(slots.front().buffer()), pattern(5000, 1));
    assert_eq!(read(slots.back().buffer()), pattern(5000, 2));
    assert!(tiers.disk().is_err(), "no disk tier configured");
    let err = tiers.place(Tier::Disk, "x", &[1]).unwrap_err();
    assert!(err.to_string().contains("--offload-dir"), "{err}");
}

#[test]
fn concurrent_prefetches_return_their_own_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let disk = DiskTier::new(DiskOptions::new(tmp.path())).unwrap();
    let sizes = [0usize, 1, 4097, 9 << 20, 17 << 20, 123_457, 8 << 20, 33];
    let tensors: Vec<_> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            disk.write(&format!("layer.{i}"), &pattern(n, i as u64))
                .unwrap()
        })
        .collect();
    // All in flight at once, waited on in reverse order.
    let tickets: Vec<_> = tensors.iter().map(|t| disk.prefetch(t)).collect();
    for (i, ticket) in tickets.into_iter().enumerate().rev() {
        assert_eq!(
            ticket.wait().unwrap(),
            pattern(sizes[i], i as u64),
            "tensor {i}"
        );
    }
    // From several threads, reusing buffers.
    std::thread::scope(|s| {
        for worker in 0..4 {
            let (disk, tensors) = (&disk, &tensors);
            s.spawn(move || {
                let mut buf = Vec::new();
                for round in 0..3 {
                    let i = (worker + round * 3) % tensors.len();
                    buf = disk.prefetch_into(&tensors[i], buf).wait().unwrap();
                    assert_eq!(
                        buf,
                        pattern(sizes[i], i as u64),
                        "worker {worker} tensor {i}"
                    );
                }
            });
        }
    });
    // Background writes in place, then a background new file.
    let data = pattern(9 << 20, 99);
    let back = disk
        .write_at_async(&tensors[3], 0, data.clone())
        .wait()
        .unwrap();
    assert_eq!(back, data);
    assert_eq!(disk.read(&tensors[3]).unwrap(), data);
    let (t, _) = disk.write_async("late", pattern(1234, 5)).wait().unwrap();
    assert_eq!(disk.read(&t).unwrap(), pattern(1234, 5));
    let err = disk
        .write_at_async(&t, 1000, vec![0; 300])
        .wait()
        .unwrap_err();
    assert!(matches!(err, TierError::Size { .. }), "{err}");
}

#[test]
fn prefetched_disk_bytes_reach_the_gpu() {
    let tmp = tempfile::tempdir().unwrap();
    for (path, device, queue) in each_path() {
        let tiers = tiers_with_disk(&device, &queue, path, tmp.path());
        let layers: Vec<_> = (0..3)
            .map(|j| {
                tiers
                    .place(Tier::Disk, "layer", &pattern(300_001 + j, j as u64))
                    .unwrap()
            })
            .collect();
        let TensorHome::Disk(first) = &layers[0] else {
            unreachable!()
        };
        let mut ticket = Some(tiers.disk().unwrap().prefetch(first));
        for j in 0..layers.len() {
            let bytes = ticket.take().unwrap().wait().unwrap();
            // Issue layer j+1's read before "computing" layer j.
            if let Some(TensorHome::Disk(next)) = layers.get(j + 1) {
                ticket = Some(tiers.disk().unwrap().prefetch(next));
            }
            let slot = tiers
                .place(Tier::Gpu, "slot", &vec![0; bytes.len()])
                .unwrap();
            let mut enc = encoder(&device);
            tiers
                .fetch_host(&bytes, gpu_buffer(&slot), 0, &mut enc)
                .unwrap();
            tiers.prepare_submit(&enc);
            queue.submit([enc.finish()]);
            assert_eq!(
                tiers.read(&slot).unwrap(),
                pattern(300_001 + j, j as u64),
                "{path} layer {j}"
            );
        }
    }
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn disk_files_go_away_on_drop_panic_and_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("offload");
    let disk = DiskTier::new(DiskOptions::new(&dir)).unwrap();
    assert!(dir.is_dir(), "a missing offload dir is created");
    // The tier's files live in its run directory, beside its owner record.
    let run = disk.run_dir().to_owned();
    assert_eq!(files_in(&dir).len(), 1);
    assert!(run.starts_with(&dir) && run.is_dir());
    let files = |dir: &Path| -> Vec<String> {
        files_in(dir)
            .into_iter()
            .filter(|f| f != "owner.lock")
            .collect()
    };
    assert!(files(&run).is_empty());

    let t = disk
        .write("decoder.layers.0.fc1.weight", &pattern(5000, 1))
        .unwrap();
    let file = t.path().to_owned();
    assert!(file.is_file());
    assert!(file
        .file_name()
        .unwrap()
        .to_string_lossy()
        .contains("decoder.layers.0.fc1.weight"));
    assert_eq!(disk.stats().current_bytes, 5000);
    drop(t);
    assert!(!file.exists(), "dropping a disk tensor removes its file");
    assert_eq!(disk.stats().current_bytes, 0);

    // A panic while a tensor is alive still removes its file (unwinding drops it).
    let panicked = std::thread::scope(|s| {
        s.spawn(|| {
            let _t = disk.write("doomed", &pattern(100, 2)).unwrap();
            assert_eq!(files(&run).len(), 1);
            panic!("simulated failure mid-step");
        })
        .join()
    });
    assert!(panicked.is_err());
    assert!(files(&run).is_empty(), "{:?}", files(&run));

    // A failed write leaves nothing behind: block the final name with a non-empty directory so the rename fails
    // after the data was written. File names are `<n>-<name>.bin`, n counting up.
    let probe = disk.write("x", &[1]).unwrap();
    let name = probe
        .path()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let n: u64 = name.split('-').next().unwrap().parse().unwrap();
    let blocked = run.join(format!("{}-victim.bin", n + 1));
    std::fs::create_dir(&blocked).unwrap();
    std::fs::write(blocked.join("keep"), b"x").unwrap();
    let err = disk.write("victim", &pattern(3 << 20, 3)).unwrap_err();
    assert!(matches!(err, TierError::Io { op: "rename", .. }), "{err}");
    let left = files(&run);
    assert!(
        !left.iter().any(|f| f.ends_with(".part")),
        "partial file left: {left:?}"
    );
    assert_eq!(
        left.len(),
        2,
        "only the probe tensor and the blocker remain: {left:?}"
    );
    std::fs::remove_dir_all(&blocked).unwrap();
    drop(probe);

    // The directory strata created goes when the tier and its last tensor are gone.
    let last = disk.write("last", &[1, 2, 3]).unwrap();
    drop(disk);
    assert!(dir.is_dir(), "a live tensor keeps the directory");
    drop(last);
    assert!(!dir.exists(), "the created offload dir is removed");

    // A directory the user made is left in place.
    let mine = tmp.path().join("mine");
    std::fs::create_dir(&mine).unwrap();
    let disk = DiskTier::new(DiskOptions::new(&mine)).unwrap();
    drop(disk.write("a", &[1]).unwrap());
    drop(disk);
    assert!(mine.is_dir() && files_in(&mine).is_empty());
}

#[test]
fn offload_dir_errors_say_what_is_wrong() {
    let tmp = tempfile::tempdir().unwrap();
    let message = |options: DiskOptions| match DiskTier::new(options) {
        Ok(_) => panic!("expected an offload dir error"),
        Err(e @ TierError::OffloadDir { .. }) => e.to_string(),
        Err(other) => panic!("wrong error kind: {other}"),
    };
    let missing = tmp.path().join("missing");
    let m = message(DiskOptions {
        create_dir: false,
        ..DiskOptions::new(&missing)
    });
    assert!(
        m.contains("does not exist") && m.contains("missing") && m.contains("--offload-dir"),
        "{m}"
    );
    assert!(!missing.exists());

    let m = message(DiskOptions::new(tmp.path().join("no/such/parent")));
    assert!(m.contains("nor does its parent"), "{m}");

    let file = tmp.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let m = message(DiskOptions::new(&file));
    assert!(m.contains("not a directory"), "{m}");

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let ro = tmp.path().join("read-only");
        std::fs::create_dir(&ro).unwrap();
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
        // Root ignores permission bits; only check where they bind.
        if std::fs::write(ro.join("t"), b"x").is_err() {
            let m = message(DiskOptions::new(&ro));
            assert!(m.contains("not writable"), "{m}");
        } else {
            eprintln!("running as root: the read-only dir case is not checked");
        }
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
}

#[test]
fn bandwidth_probe_runs_every_path() {
    let tmp = tempfile::tempdir().unwrap();
    for (path, device, queue) in each_path() {
        let tiers = tiers_with_disk(&device, &queue, path, tmp.path());
        let report = measure_bandwidth(&tiers, 4 << 20, 2).unwrap();
        assert_eq!(report.cpu_path, path);
        for (what, v) in [
            ("cpu->gpu", report.cpu_to_gpu),
            ("gpu->cpu", report.gpu_to_cpu),
            ("disk write", report.disk_write.unwrap()),
            ("disk read", report.disk_read.unwrap()),
        ] {
            assert!(v.is_finite() && v > 0.0, "{what}: {v}");
        }
        assert!(report.to_string().contains(path.as_str()));
        assert_eq!(tiers.report().cpu.current_bytes, 0);
        assert_eq!(tiers.report().disk.current_bytes, 0);
    }
}

#[test]
fn pending_store_to_gpu_is_done_at_once() {
    let (device, queue) = device(false).unwrap();
    let tiers = Tiers::new(&device, &queue, TierOptions::default()).unwrap();
    let src = tiers.place(Tier::Gpu, "src", &pattern(64, 1)).unwrap();
    let mut dst = tiers.place(Tier::Gpu, "dst", &[0; 64]).unwrap();
    let mut enc = encoder(&device);
    let pending = tiers
        .store(gpu_buffer(&src), 0, &mut dst, &mut enc)
        .unwrap();
    assert!(matches!(pending, PendingStore::Done));
    queue.submit([enc.finish()]);
    pending.complete(&tiers, &mut dst).unwrap();
    assert_eq!(tiers.read(&dst).unwrap(), pattern(64, 1));
}

#[test]
fn ranged_fetch_and_store_act_like_a_kv_cache() {
    let tmp = tempfile::tempdir().unwrap();
    for (path, device, queue) in each_path() {
        let tiers = tiers_with_disk(&device, &queue, path, tmp.path());
        // A cache of 6 "tokens" of 12 bytes each plus an odd 2-byte tail, filled one token per step.
        let token = 12u64;
        let len = 6 * token + 2;
        for tier in [Tier::Gpu, Tier::Cpu, Tier::Disk] {
            let mut cache = tiers.place(tier, "cache", &vec![0; len as usize]).unwrap();
            let mut want = vec![0u8; len as usize];
            for step in 0..6u64 {
                let kv = pattern(token as usize, step);
                let src = tiers.place(Tier::Gpu, "kv", &kv).unwrap();
                let mut enc = encoder(&device);
                let pending = tiers
                    .store_range(
                        gpu_buffer(&src),
                        0,
                        &mut cache,
                        step * token,
                        token,
                        &mut enc,
                    )
                    .unwrap();
                queue.submit([enc.finish()]);
                // Odd steps write in the background (a disk home's write goes to the I/O threads).
                if step % 2 == 1 {
                    let ticket = pending.complete_in_background(&tiers, &mut cache).unwrap();
                    assert_eq!(ticket.is_some(), tier == Tier::Disk);
                    if let Some(ticket) = ticket {
                        assert_eq!(ticket.wait().unwrap(), kv);
                    }
                } else {
                    pending.complete(&tiers, &mut cache).unwrap();
                }
                want[(step * token) as usize..((step + 1) * token) as usize].copy_from_slice(&kv);
            }
            // The odd tail, which may end unaligned because it ends the tensor.
            let src = tiers.place(Tier::Gpu, "tail", &[7, 9]).unwrap();
            let mut enc = encoder(&device);
            let pending = tiers
                .store_range(gpu_buffer(&src), 0, &mut cache, 6 * token, 2, &mut enc)
                .unwrap();
            queue.submit([enc.finish()]);
            pending.complete(&tiers, &mut cache).unwrap();
            want[72..].copy_from_slice(&[7, 9]);
            assert_eq!(tiers.read(&cache).unwrap(), want, "{path} {tier}");

            // Fetch tokens 2..5 into the front of a slot.
            let slot = tiers.place(Tier::Gpu, "slot", &[0; 64]).unwrap();
            let mut enc = encoder(&device);
            tiers
                .fetch_range(&cache, 2 * token, 3 * token, gpu_buffer(&slot), 0, &mut enc)
                .unwrap();
            tiers.prepare_submit(&enc);
            queue.submit([enc.finish()]);
            assert_eq!(
                tiers.read(&slot).unwrap()[..36],
                want[24..60],
                "{path} {tier}"
            );

            // Bad ranges are errors, not wgpu panics.
            let mut enc = encoder(&device);
            let err = tiers
                .fetch_range(&cache, 2, 8, gpu_buffer(&slot), 0, &mut enc)
                .unwrap_err();
            assert!(matches!(err, TierError::Alignment { .. }), "{err}");
            let err = tiers
                .fetch_range(&cache, 0, len + 4, gpu_buffer(&slot), 0, &mut enc)
                .unwrap_err();
            assert!(matches!(err, TierError::Size { .. }), "{err}");
            let err = tiers
                .fetch(&cache, gpu_buffer(&slot), 0, &mut enc)
                .unwrap_err();
            assert!(
                err.to_string().contains("destination"),
                "a 74-byte tensor into a 64-byte slot: {err}"
            );
            let err = tiers
                .store_range(gpu_buffer(&slot), 0, &mut cache, 4, 6, &mut enc)
                .unwrap_err();
            assert!(matches!(err, TierError::Alignment { .. }), "{err}");
        }
    }
}

#[test]
fn handles_cross_threads() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<Tiers>();
    send_sync::<TensorHome>();
    send_sync::<GpuPool>();
    send::<strata_runtime::tiers::Ticket<Vec<u8>>>();
    send::<PendingStore>();
}

#[test]
fn impossible_allocations_are_errors() {
    let (device, queue) = device(false).unwrap();
    let cpu = CpuTier::new(&device, &queue, CpuPath::HostMemory).unwrap();
    // More than any machine has: an error naming the tier, not an abort.
    let err = cpu.alloc(1 << 62).unwrap_err();
    assert!(
        matches!(err, TierError::OutOfMemory { .. }) && err.to_string().contains("cpu tier"),
        "{err}"
    );
    let pool = GpuPool::new(&device);
    let max = device.limits().max_buffer_size;
    let err = pool.acquire(max + 4).unwrap_err();
    assert!(
        matches!(err, TierError::TooLarge { .. }) && err.to_string().contains("max_buffer_size"),
        "{err}"
    );
    assert_eq!(pool.stats().allocated.current_bytes, 0);
}
