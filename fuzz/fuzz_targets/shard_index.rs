//! model.safetensors.index.json text.
#![no_main]

libfuzzer_sys::fuzz_target!(|text: &str| {
    let _ = strata_runtime::checkpoint::parse_index_json(text);
});
