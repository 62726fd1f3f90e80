//! Text <-> token ids for OPT models, over the `tokenizers` crate.
//!
//! A model directory ships either a `tokenizer.json` (the fast tokenizer) or GPT-2 style `vocab.json` + `merges.txt`;
//! from the latter [`Tokenizer`] builds the same byte-level BPE Hugging Face's GPT2 tokenizer is: a ByteLevel
//! pre-tokenizer without a prefix space and a ByteLevel decoder. Like transformers' OPT tokenizer, [`Tokenizer::encode`]
//! puts the BOS token (`</s>`, id 2) in front of every text; the tokenizer's own post-processor is not run, so BOS is
//! never doubled. `tokenizer_config.json`, when present, may turn BOS off (`add_bos_token`) or ask for transformers'
//! `clean_up_tokenization_spaces` on decode (" ." -> ".", " n't" -> "n't", ...); both default to what the fields'
//! absence means for OPT in current transformers: BOS on, no clean-up.

use std::path::{Path, PathBuf};

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::AddedToken;

/// The fast-tokenizer file of a model directory.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// GPT-2 style vocabulary (token -> id).
pub const VOCAB_FILE: &str = "vocab.json";
/// GPT-2 style merge rules, one pair per line.
pub const MERGES_FILE: &str = "merges.txt";
/// The tokens OPT's vocabulary reserves (ids 0..=3); special, so they are matched whole and skipped on request.
const SPECIAL_TOKENS: [&str; 4] = ["<s>", "<pad>", "</s>", "<unk>"];
/// transformers' tokenizer settings file.
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";
/// OPT's BOS and EOS token text.
const BOS_TOKEN: &str = "</s>";

/// Why a tokenizer could not be loaded or used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenizerError {
    /// The directory has neither tokenizer.json nor vocab.json + merges.txt.
    #[error("{} has no tokenizer: expected tokenizer.json, or vocab.json and merges.txt (copy them from the model's repository, or pass token ids instead of text)", dir.display())]
    NotFound {
        /// The model directory.
        dir: PathBuf,
    },
    /// A tokenizer file could not be read or parsed.
    #[error("{}: cannot load tokenizer: {reason}", path.display())]
    Load {
        /// The file.
        path: PathBuf,
        /// The tokenizers crate's message.
        reason: String,
    },
    /// Encoding failed.
    #[error("cannot tokenize text: {0}")]
    Encode(String),
    /// Decoding failed.
    #[error("cannot decode token ids: {0}")]
    Decode(String),
}

/// A byte-level BPE tokenizer for an OPT model.
#[derive(Clone, Debug)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<u32>,
    eos: Option<u32>,
    clean_up_spaces: bool,
}

impl Tokenizer {
    /// Loads the tokenizer of a model directory: `tokenizer.json` if present, else `vocab.json` + `merges.txt`.
    /// The BOS id is config.json's `bos_token_id` when the directory has one, else the id of `</s>`.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Tokenizer, TokenizerError> {
        let dir = dir.as_ref();
        let json = dir.join(TOKENIZER_FILE);
        let (vocab, merges) = (dir.join(VOCAB_FILE), dir.join(MERGES_FILE));
        let tokenizer = if json.is_file() {
            Tokenizer::from_file(&json)?
        } else if vocab.is_file() && merges.is_file() {
            Tokenizer::from_vocab_merges(&vocab, &merges)?
        } else {
            return Err(TokenizerError::NotFound {
                dir: dir.to_path_buf(),
            });
        };
        let mut tokenizer = match config_bos(dir) {
            Some(bos) => tokenizer.with_bos(Some(bos)),
            None => tokenizer,
        };
        let settings = read_json(&dir.join(TOKENIZER_CONFIG_FILE));
        let flag = |key: &str| settings.as_ref().and_then(|s| s.get(key)?.as_bool());
        if flag("add_bos_token") == Some(false) {
            tokenizer = tokenizer.with_bos(None);
        }
        if let Some(clean) = flag("clean_up_tokenization_spaces") {
            tokenizer = tokenizer.with_clean_up_spaces(clean);
        }
        Ok(tokenizer)
    }

    /// Loads a `tokenizer.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Tokenizer, TokenizerError> {
        let path = path.as_ref();
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| TokenizerError::Load {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        Ok(Tokenizer::wrap(inner))
    }

    /// Builds GPT-2's byte-level BPE from `vocab.json` and `merges.txt`, with OPT's special tokens.
    pub fn from_vocab_merges(
        vocab: impl AsRef<Path>,
        merges: impl AsRef<Path>,
    ) -> Result<Tokenizer, TokenizerError> {
        let (vocab, merges) = (vocab.as_ref(), merges.as_ref());
        let load_error = |reason: String| TokenizerError::Load {
            path: vocab.to_path_buf(),
            reason,
        };
        let (vocab_text, merges_text) = (utf8_path(vocab)?, utf8_path(merges)?);
        let model = BPE::from_file(vocab_text, merges_text)
            .build()
            .map_err(|e| load_error(format!("with {}: {e}", merges.display())))?;
        let mut inner = tokenizers::Tokenizer::new(model);
        inner.with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        let specials: Vec<AddedToken> = SPECIAL_TOKENS
            .iter()
            .filter(|t| inner.token_to_id(t).is_some())
            .map(|t| AddedToken::from(*t, true))
            .collect();
        inner
            .add_special_tokens(specials)
            .map_err(|e| load_error(e.to_string()))?;
        Ok(Tokenizer::wrap(inner))
    }

    fn wrap(inner: tokenizers::Tokenizer) -> Tokenizer {
        let special = inner.token_to_id(BOS_TOKEN);
        Tokenizer {
            inner,
            bos: special,
            eos: special,
            clean_up_spaces: false,
        }
    }

    /// Whether [`Tokenizer::decode`] applies transformers' `clean_up_tokenization_spaces` rewrite.
    pub fn with_clean_up_spaces(self, clean_up_spaces: bool) -> Tokenizer {
        Tokenizer {
            clean_up_spaces,
            ..self
        }
    }

    /// Sets the token [`Tokenizer::encode`] prepends (`None`: prepend nothing).
    pub fn with_bos(self, bos: Option<u32>) -> Tokenizer {
        Tokenizer { bos, ..self }
    }

    /// The token prepended to every encoded text, if any.
    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos
    }

    /// The id of `</s>`, OPT's end-of-sequence token, if the vocabulary has it.
    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos
    }

    /// Number of tokens, special tokens included. OPT's embedding has a few more rows than this (50272 vs 50265).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of a token's text, if it is in the vocabulary.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Token ids of `text`, BOS first (as transformers' OPT tokenizer does). Special tokens written in the text
    /// (`</s>`) are recognised as such.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        let mut ids = Vec::with_capacity(encoding.len() + 1);
        ids.extend(self.bos);
        ids.extend_from_slice(encoding.get_ids());
        Ok(ids)
    }

    /// The text of `ids`; with `skip_special`, special tokens (BOS, padding) are left out. Ids past the tokenizer's
    /// vocabulary (OPT's unused embedding rows) decode to nothing, as in transformers.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, TokenizerError> {
        let text = self
            .inner
            .decode(ids, skip_special)
            .map_err(|e| TokenizerError::Decode(e.to_string()))?;
        Ok(if self.clean_up_spaces {
            clean_up_tokenization_spaces(&text)
        } else {
            text
        })
    }
}

/// transformers' `clean_up_tokenization`: drops the space a word-level tokenizer would have put before punctuation
/// and English contractions.
pub fn clean_up_tokenization_spaces(text: &str) -> String {
    const REWRITES: [(&str, &str); 10] = [
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ];
    let mut out = text.to_owned();
    for (from, to) in REWRITES {
        out = out.replace(from, to);
    }
    out
}

/// The tokenizers crate takes file paths as `&str`.
fn utf8_path(path: &Path) -> Result<&str, TokenizerError> {
    path.to_str().ok_or_else(|| TokenizerError::Load {
        path: path.to_path_buf(),
        reason: "the path is not valid UTF-8".into(),
    })
}

/// A JSON file's contents, or `None` if it is absent or unreadable (these settings files are optional).
fn read_json(path: &Path) -> Option<serde_json::Value> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

/// `bos_token_id` from `dir/config.json`, if the file exists and has it.
fn config_bos(dir: &Path) -> Option<u32> {
    let value = read_json(&dir.join("config.json"))?;
    u32::try_from(value.get("bos_token_id")?.as_u64()?).ok()
}
