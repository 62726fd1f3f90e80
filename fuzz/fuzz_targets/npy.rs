//! A float32 .npy file's bytes.
#![no_main]

libfuzzer_sys::fuzz_target!(|bytes: &[u8]| {
    let _ = strata_runtime::npy::parse_f32(bytes);
});
