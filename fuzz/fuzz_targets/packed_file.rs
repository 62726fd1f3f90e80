//! A packed checkpoint's bytes: its header, metadata and every packed tensor's layout.
#![no_main]

libfuzzer_sys::fuzz_target!(|bytes: &[u8]| {
    let _ = strata_runtime::checkpoint::from_packed_bytes(bytes);
});
