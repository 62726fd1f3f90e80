//! Byte sizes as typed after --gpu-mem, --cpu-mem, --disk-mem.
#![no_main]

libfuzzer_sys::fuzz_target!(|text: &str| {
    let _ = strata_runtime::offload::policy::parse_bytes(text);
});
