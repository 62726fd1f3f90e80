//! A whole safetensors file: accepted only when every tensor lies inside it.
#![no_main]

libfuzzer_sys::fuzz_target!(|bytes: &[u8]| {
    let _ = strata_runtime::checkpoint::check_safetensors(bytes);
});
