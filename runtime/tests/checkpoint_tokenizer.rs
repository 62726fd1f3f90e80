//! The OPT tokenizer wrapper, on a byte-level BPE built by hand here: its merges make the expected ids derivable on
//! paper, the way GPT-2's merges.txt drives the real tokenizer.

use std::collections::BTreeMap;
use std::path::Path;

use strata_runtime::tokenizer::{clean_up_tokenization_spaces, Tokenizer, TokenizerError};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;

/// Merge rules in rank order: "hello" and "Ġworld" (Ġ is the byte-level form of a space) become single tokens.
const MERGES: [(&str, &str); 9] = [
    ("h", "e"),
    ("l", "l"),
    ("he", "ll"),
    ("hell", "o"),
    ("Ġ", "w"),
    ("o", "r"),
    ("Ġw", "or"),
    ("l", "d"),
    ("Ġwor", "ld"),
];

/// OPT's four special tokens at ids 0..=3, the 256 byte-level symbols, then each merge's result.
fn vocab() -> BTreeMap<String, u32> {
    let mut vocab = BTreeMap::new();
    for (i, t) in ["<s>", "<pad>", "</s>", "<unk>"].iter().enumerate() {
        vocab.insert(t.to_string(), i as u32);
    }
    let mut symbols: Vec<char> = ByteLevel::alphabet().into_iter().collect();
    symbols.sort();
    assert_eq!(symbols.len(), 256);
    for c in symbols {
        let id = vocab.len() as u32;
        vocab.insert(c.to_string(), id);
    }
    for (a, b) in MERGES {
        let id = vocab.len() as u32;
        vocab.insert(format!("{a}{b}"), id);
    }
    vocab
}

fn write_vocab_merges(dir: &Path) -> BTreeMap<String, u32> {
    let vocab = vocab();
    std::fs::write(
        dir.join("vocab.json"),
        serde_json::to_string(&vocab).unwrap(),
    )
    .unwrap();
    let mut merges = String::from("#version: 0.2\n");
    for (a, b) in MERGES {
        merges.push_str(&format!("{a} {b}\n"));
    }
    std::fs::write(dir.join("merges.txt"), merges).unwrap();
    vocab
}

fn check_opt_behaviour(tok: &Tokenizer, vocab: &BTreeMap<String, u32>) {
    let id = |t: &str| vocab[t];
    assert_eq!(tok.bos_token_id(), Some(2));
    assert_eq!(tok.eos_token_id(), Some(2));
    assert_eq!(tok.vocab_size(), vocab.len());

    // BOS first, then the merged words; no prefix space is added before "hello".
    let ids = tok.encode("hello world").unwrap();
    assert_eq!(ids, vec![2, id("hello"), id("Ġworld")]);
    assert_eq!(tok.decode(&ids, true).unwrap(), "hello world");
    assert_eq!(tok.decode(&ids, false).unwrap(), "</s>hello world");

    // A special token in the text is matched whole; "world" without its space only merges as far as the rules go.
    let ids = tok.encode("hello</s>world").unwrap();
    assert_eq!(ids, vec![2, id("hello"), 2, id("w"), id("or"), id("ld")]);

    // Non-ASCII text goes through bytes: é is C3 A9, whose byte-level symbols are Ã and ©.
    let ids = tok.encode("é").unwrap();
    assert_eq!(ids, vec![2, id("Ã"), id("©")]);
    assert_eq!(tok.decode(&ids, true).unwrap(), "é");

    let text = "Hello, world! 123 — ünïcödé\nnew line";
    assert_eq!(tok.decode(&tok.encode(text).unwrap(), true).unwrap(), text);

    // Padding is special too, and ids past the vocabulary (OPT's spare embedding rows) decode to nothing.
    assert_eq!(
        tok.decode(&[1, 1, id("hello"), 50270], true).unwrap(),
        "hello"
    );

    let plain = tok.clone().with_bos(None);
    assert_eq!(plain.encode("hello").unwrap(), vec![id("hello")]);
}

#[test]
fn vocab_and_merges_build_gpt2_byte_level_bpe() {
    let dir = tempfile::tempdir().unwrap();
    let vocab = write_vocab_merges(dir.path());
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    check_opt_behaviour(&tok, &vocab);
}

#[test]
fn tokenizer_json_behaves_the_same_and_is_preferred() {
    let source = tempfile::tempdir().unwrap();
    let vocab = write_vocab_merges(source.path());
    let built = Tokenizer::from_dir(source.path()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    built
        .inner()
        .save(dir.path().join("tokenizer.json"), false)
        .unwrap();
    // A broken vocab.json next to it must not be read.
    std::fs::write(dir.path().join("vocab.json"), "not json").unwrap();
    std::fs::write(dir.path().join("merges.txt"), "").unwrap();
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    check_opt_behaviour(&tok, &vocab);
}

#[test]
fn bos_comes_from_config_json_when_present() {
    let dir = tempfile::tempdir().unwrap();
    let vocab = write_vocab_merges(dir.path());
    std::fs::write(dir.path().join("config.json"), r#"{"bos_token_id": 0}"#).unwrap();
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(tok.bos_token_id(), Some(0));
    assert_eq!(tok.encode("hello").unwrap(), vec![0, vocab["hello"]]);
}

#[test]
fn tokenizer_config_can_turn_bos_off_and_clean_up_spaces() {
    let dir = tempfile::tempdir().unwrap();
    let vocab = write_vocab_merges(dir.path());
    let settings = r#"{"add_bos_token": false, "clean_up_tokenization_spaces": true}"#;
    std::fs::write(dir.path().join("tokenizer_config.json"), settings).unwrap();
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(tok.bos_token_id(), None);
    assert_eq!(tok.encode("hello").unwrap(), vec![vocab["hello"]]);
    // "hello ." byte-level tokens: hello, Ġ, . -> with clean-up the space before the period goes.
    let ids = tok.encode("hello . world ,it isn't").unwrap();
    assert_eq!(tok.decode(&ids, true).unwrap(), "hello. world,it isn't");
    assert_eq!(
        tok.clone()
            .with_clean_up_spaces(false)
            .decode(&ids, true)
            .unwrap(),
        "hello . world ,it isn't"
    );
    assert_eq!(
        clean_up_tokenization_spaces("I 'm sure it 's they 're , yes !"),
        "I'm sure it's they're, yes!"
    );
}

#[test]
fn missing_or_broken_tokenizer_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let err = Tokenizer::from_dir(dir.path()).unwrap_err();
    assert!(matches!(err, TokenizerError::NotFound { .. }));
    let text = err.to_string();
    assert!(
        text.contains("tokenizer.json") && text.contains("vocab.json and merges.txt"),
        "{text}"
    );

    std::fs::write(dir.path().join("tokenizer.json"), "{ broken").unwrap();
    let text = Tokenizer::from_dir(dir.path()).unwrap_err().to_string();
    assert!(
        text.contains("tokenizer.json: cannot load tokenizer"),
        "{text}"
    );

    let dir = tempfile::tempdir().unwrap();
    write_vocab_merges(dir.path());
    std::fs::write(dir.path().join("merges.txt"), "#version: 0.2\nh e x\n").unwrap();
    let text = Tokenizer::from_dir(dir.path()).unwrap_err().to_string();
    assert!(text.contains("merges.txt"), "{text}");
}
