//! Property tests over everything strata reads from a user: config.json, safetensors headers, shard indexes, packed
//! checkpoints, .npy files, sizes and percents. Arbitrary and mutated inputs must give a value or an error: never a
//! panic, a hang, or an allocation out of proportion (this binary's allocator refuses any single allocation over
//! 1 GiB, which aborts the test). Each property runs for a bounded time (arbtest's budget; set
//! `ARBTEST_BUDGET_MS` for longer runs, or use the `cargo fuzz` targets in fuzz/).

use std::alloc::{GlobalAlloc, Layout, System};

use arbitrary::{Result, Unstructured};
use strata_runtime::checkpoint::{check_safetensors, parse_config_json, parse_index_json};
use strata_runtime::checkpoint::{from_packed_bytes, to_packed_bytes, StoredTensor};
use strata_runtime::compress::CompressionConfig;
use strata_runtime::config::DType;
use strata_runtime::offload::policy::{format_bytes_exact, parse_bytes, Percent, Policy};
use strata_runtime::weights::HostTensor;

/// The system allocator, refusing any single allocation over [`MAX_ALLOCATION`]: a parser that sizes a buffer from
/// an untrusted header would abort this binary instead of passing.
struct Bounded;

const MAX_ALLOCATION: usize = 1 << 30;

// SAFETY: forwards to the system allocator; refusing (null) is allowed by GlobalAlloc's contract.
unsafe impl GlobalAlloc for Bounded {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > MAX_ALLOCATION {
            return std::ptr::null_mut();
        }
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > MAX_ALLOCATION {
            return std::ptr::null_mut();
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Bounded = Bounded;

/// Milliseconds each property runs: 3 s in CI, `ARBTEST_BUDGET_MS` for longer runs.
fn budget_ms() -> u64 {
    std::env::var("ARBTEST_BUDGET_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3_000)
}

/// JSON values that stress a field's type and range.
const JSON_VALUES: &[&str] = &[
    "0",
    "1",
    "-1",
    "2",
    "64",
    "18446744073709551615",
    "18446744073709551616",
    "9223372036854775807",
    "-9223372036854775808",
    "4294967296",
    "1e308",
    "1.5",
    "-0.0",
    "true",
    "null",
    "\"\"",
    "\"relu\"",
    "\"gelu\"",
    "\"float16\"",
    "\"opt\"",
    "\"bert\"",
    "[]",
    "[1, 2]",
    "{}",
    "{\"a\": 1}",
];

/// `text` (a JSON object) with some values replaced by stress values, some keys dropped, or the text cut short.
fn mutate_json(u: &mut Unstructured<'_>, text: &str) -> Result<String> {
    let mut value: serde_json::Value = serde_json::from_str(text).expect("a JSON base");
    mutate_value(u, &mut value, 0)?;
    let mut out = serde_json::to_string(&value).expect("serialisable");
    if u.ratio(1, 10)? {
        let cut = u.int_in_range(0..=out.len())?;
        out.truncate(cut);
    }
    Ok(out)
}

fn mutate_value(
    u: &mut Unstructured<'_>,
    value: &mut serde_json::Value,
    depth: usize,
) -> Result<()> {
    match value {
        serde_json::Value::Object(map) => {
            let keys: Vec<String> = map.keys().cloned().collect();
            for key in keys {
                match u.int_in_range(0..=9)? {
                    0 => {
                        map.remove(&key);
                    }
                    1 | 2 => {
                        let stress = u.choose(JSON_VALUES)?;
                        map.insert(
                            key,
                            serde_json::from_str(stress).expect("stress values parse"),
                        );
                    }
                    _ if depth < 3 => {
                        if let Some(v) = map.get_mut(&key) {
                            mutate_value(u, v, depth + 1)?;
                        }
                    }
                    _ => {}
                }
            }
        }
        serde_json::Value::Array(items) => {
            for item in items.iter_mut() {
                if u.ratio(1, 4)? {
                    *item =
                        serde_json::from_str(u.choose(JSON_VALUES)?).expect("stress values parse");
                } else if depth < 3 {
                    mutate_value(u, item, depth + 1)?;
                }
            }
        }
        _ => {}
    }
    Ok(())
}

fn fixture_file(name: &str, file: &str) -> Vec<u8> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
        .join(file);
    std::fs::read(path).unwrap()
}

#[test]
fn config_json_never_panics_and_accepted_configs_are_usable() {
    let bases: Vec<String> = ["pre-ln-relu", "post-ln-proj", "gelu-no-bias", "f16"]
        .iter()
        .map(|f| String::from_utf8(fixture_file(f, "config.json")).unwrap())
        .collect();
    arbtest::arbtest(|u| {
        let text = if u.ratio(1, 5)? {
            u.arbitrary::<String>()?
        } else {
            let base = u.choose(&bases)?;
            mutate_json(u, base)?
        };
        if let Ok(config) = parse_config_json(&text) {
            // What every consumer relies on holds, and the sizes a run computes from it are in range.
            config.validate().unwrap();
            let _ = config.params();
            let _ = config.model_bytes();
            let _ = config.cache_bytes(1, config.max_seq_len as u64);
        }
        Ok(())
    })
    .budget_ms(budget_ms());
}

#[test]
fn shard_indexes_never_panic() {
    let base =
        String::from_utf8(fixture_file("gelu-no-bias", "model.safetensors.index.json")).unwrap();
    arbtest::arbtest(|u| {
        let text = if u.ratio(1, 5)? {
            u.arbitrary::<String>()?
        } else {
            mutate_json(u, &base)?
        };
        let _ = parse_index_json(&text);
        Ok(())
    })
    .budget_ms(budget_ms());
}

/// A safetensors file with its header's JSON mutated (offsets, shapes, dtypes), its bytes flipped, or cut.
fn mutated_safetensors(u: &mut Unstructured<'_>, file: &[u8]) -> Result<Vec<u8>> {
    let n = u64::from_le_bytes(file[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&file[8..8 + n]).unwrap();
    let mut out = file.to_vec();
    match u.int_in_range(0..=3)? {
        0 => {
            let json = mutate_json(u, header.trim_end())?;
            out = (json.len() as u64).to_le_bytes().to_vec();
            out.extend_from_slice(json.as_bytes());
            out.extend_from_slice(&file[8 + n..]);
        }
        1 => {
            for _ in 0..u.int_in_range(1..=8)? {
                let at = u.choose_index(out.len())?;
                out[at] = u.arbitrary()?;
            }
        }
        2 => {
            let keep = u.int_in_range(0..=out.len())?;
            out.truncate(keep);
        }
        _ => {
            let len = u.int_in_range(0..=64)?;
            out.extend_from_slice(u.bytes(len)?);
        }
    }
    Ok(out)
}

#[test]
fn safetensors_headers_never_panic_and_accepted_ones_stay_in_bounds() {
    let bases = [
        fixture_file("pre-ln-relu", "model.safetensors"),
        fixture_file("f16", "model.safetensors"),
    ];
    arbtest::arbtest(|u| {
        let bytes = if u.ratio(1, 5)? {
            let len = u.arbitrary_len::<u8>()?;
            u.bytes(len)?.to_vec()
        } else {
            let base = u.choose(&bases)?;
            mutated_safetensors(u, base)?
        };
        if let Ok(names) = check_safetensors(&bytes) {
            // Accepted: safetensors' own reader agrees, and every tensor's bytes lie inside the file.
            let file = safetensors::SafeTensors::deserialize(&bytes)
                .expect("accepted by strata, so by safetensors");
            for name in names {
                assert!(file.tensor(&name).is_ok(), "{name}");
            }
        }
        Ok(())
    })
    .budget_ms(budget_ms());
}

/// A small packed checkpoint: one packed matrix and one dense vector.
fn packed_file(u: &mut Unstructured<'_>) -> Result<Vec<u8>> {
    let rows = u.int_in_range(1..=4)?;
    let cols = u.int_in_range(1..=80)?;
    let values: Vec<f32> = (0..rows * cols).map(|i| (i as f32 * 0.37).sin()).collect();
    let config = *u.choose(&[
        CompressionConfig::DEFAULT,
        CompressionConfig::new(8, 32).unwrap(),
        CompressionConfig::new(2, 16).unwrap(),
    ])?;
    let packed = strata_runtime::compress::quantize(&values, rows, cols, config).unwrap();
    let bias: Vec<u8> = (0..cols).flat_map(|i| (i as f32).to_le_bytes()).collect();
    Ok(to_packed_bytes(&[
        ("a.weight".to_owned(), StoredTensor::Packed(packed)),
        (
            "a.bias".to_owned(),
            StoredTensor::Dense(HostTensor {
                dtype: DType::F32,
                shape: vec![cols],
                bytes: bias.into(),
            }),
        ),
    ])
    .unwrap())
}

#[test]
fn packed_checkpoints_never_panic() {
    arbtest::arbtest(|u| {
        let bytes = if u.ratio(1, 5)? {
            let len = u.arbitrary_len::<u8>()?;
            u.bytes(len)?.to_vec()
        } else {
            let file = packed_file(u)?;
            if u.ratio(1, 4)? {
                // Round trip first: what is written reads back.
                assert_eq!(from_packed_bytes(&file).unwrap().len(), 2);
            }
            mutated_safetensors(u, &file)?
        };
        let _ = from_packed_bytes(&bytes);
        Ok(())
    })
    .budget_ms(budget_ms());
}

/// `file` (a packed checkpoint) with the JSON inside its `strata` metadata entry mutated: rows, cols, bits, group
/// sizes, the recorded source.
fn mutated_packed_metadata(u: &mut Unstructured<'_>, file: &[u8]) -> Result<Vec<u8>> {
    let n = u64::from_le_bytes(file[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&file[8..8 + n]).unwrap();
    let inner = header["__metadata__"]["strata"]
        .as_str()
        .unwrap()
        .to_owned();
    header["__metadata__"]["strata"] = mutate_json(u, &inner)?.into();
    let mut json = serde_json::to_vec(&header).unwrap();
    json.resize(json.len().next_multiple_of(8), b' ');
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    out.extend_from_slice(&file[8 + n..]);
    Ok(out)
}

#[test]
fn packed_models_with_broken_headers_are_refused_or_served_safely() {
    use strata_runtime::weights::{model_tensors, WeightSource};
    let tmp = tempfile::tempdir().unwrap();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pre-ln-relu");
    let checkpoint = strata_runtime::checkpoint::Checkpoint::open(&dir).unwrap();
    let config = *checkpoint.config();
    let good = tmp.path().join("good.packed");
    let packing = CompressionConfig::DEFAULT;
    strata_runtime::checkpoint::write_packed_model(&good, &checkpoint, packing).unwrap();
    let good = std::fs::read(good).unwrap();
    let path = tmp.path().join("fuzzed.packed");
    arbtest::arbtest(|u| {
        let bytes = if u.ratio(1, 2)? {
            mutated_packed_metadata(u, &good)?
        } else {
            mutated_safetensors(u, &good)?
        };
        std::fs::write(&path, &bytes).unwrap();
        if let Ok(weights) =
            strata_runtime::checkpoint::PackedWeights::open(&path, &config, packing)
        {
            // Accepted: every tensor is served, or refused by name; none panics or reads out of bounds.
            for spec in model_tensors(&config) {
                let _ = weights.load(&spec);
                let _ = weights.packed(&spec, packing);
            }
            let _ = weights.check_source(&checkpoint);
        }
        Ok(())
    })
    .budget_ms(budget_ms());
}

#[test]
fn npy_round_trips_and_garbage_never_panics() {
    arbtest::arbtest(|u| {
        let dims = u.int_in_range(0..=3)?;
        let shape: Vec<usize> = (0..dims)
            .map(|_| u.int_in_range(0..=6))
            .collect::<Result<_>>()?;
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|_| u.arbitrary()).collect::<Result<_>>()?;
        let mut bytes = strata_runtime::npy::header_f32(&shape).unwrap();
        bytes.extend(data.iter().flat_map(|v| v.to_le_bytes()));
        let read = strata_runtime::npy::parse_f32(&bytes).unwrap();
        assert_eq!(read.shape, shape);
        assert_eq!(
            read.data.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            data.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        // Mutated and arbitrary bytes: a value or an error.
        for _ in 0..u.int_in_range(0..=4)? {
            let at = u.choose_index(bytes.len())?;
            bytes[at] = u.arbitrary()?;
        }
        let _ = strata_runtime::npy::parse_f32(&bytes);
        // A well-formed header claiming any shape, with a few data bytes: sized by checked arithmetic, never trusted.
        let claimed: Vec<usize> = (0..u.int_in_range(0..=4)?)
            .map(|_| u.arbitrary())
            .collect::<Result<_>>()?;
        let mut lying = strata_runtime::npy::header_f32(&claimed).unwrap();
        lying.extend_from_slice(&[0; 16]);
        let _ = strata_runtime::npy::parse_f32(&lying);
        let len = u.arbitrary_len::<u8>()?;
        let _ = strata_runtime::npy::parse_f32(u.bytes(len)?);
        Ok(())
    })
    .budget_ms(budget_ms());
}

#[test]
fn sizes_and_percents_never_panic() {
    const UNITS: &[&str] = &[
        "", "B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB", "KB", "GB", "G", "gib", " GiB",
    ];
    arbtest::arbtest(|u| {
        // Sizes: arbitrary text, and numbers with units, which round-trip when exact.
        let _ = parse_bytes(&u.arbitrary::<String>()?);
        let number = match u.int_in_range(0..=2)? {
            0 => u.arbitrary::<u64>()?.to_string(),
            1 => format!("{}", u.arbitrary::<f64>()?),
            _ => format!("-{}", u.arbitrary::<u32>()?),
        };
        let unit = u.choose(UNITS)?;
        let _ = parse_bytes(&format!("{number}{unit}"));
        // Exact up to 2^53 bytes (8 PiB): parse_bytes reads the number as an f64, so larger sizes round.
        let bytes = u.arbitrary::<u64>()? >> 11;
        let text = format_bytes_exact(bytes);
        assert_eq!(parse_bytes(&text).ok(), Some(bytes), "{text}");
        // Percents: any six numbers validate or are refused.
        let p: [f64; 6] = u.arbitrary()?;
        let policy = Policy {
            percent: Percent::from_array(p),
            offload_dir: Some(".".into()),
            ..Policy::default()
        };
        let _ = policy.validate();
        Ok(())
    })
    .budget_ms(budget_ms());
}
