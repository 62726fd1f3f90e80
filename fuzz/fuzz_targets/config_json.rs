//! config.json text: parsed and validated, or refused; an accepted config's sizes are computable.
#![no_main]

libfuzzer_sys::fuzz_target!(|text: &str| {
    if let Ok(config) = strata_runtime::checkpoint::parse_config_json(text) {
        assert!(config.validate().is_ok());
        let _ = config.model_bytes();
        let _ = config.cache_bytes(1, config.max_seq_len as u64);
    }
});
