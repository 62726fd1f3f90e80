//! Models from the Hugging Face Hub: `--model facebook/opt-1.3b` downloads config.json, the tokenizer files and the
//! weights into the standard Hugging Face cache (the `hf-hub` crate: `HF_HOME`, `HF_HUB_CACHE`, `HF_ENDPOINT`,
//! `HF_TOKEN`, `HF_HUB_OFFLINE` as `huggingface_hub` reads them), converting `pytorch_model*.bin` to safetensors
//! inside the snapshot when the repository has no safetensors ([`crate::convert`]).
//!
//! A repository already in the cache is used without asking the network when it is unreachable or
//! `HF_HUB_OFFLINE=1`; otherwise an unreachable endpoint is an error naming the model, the endpoint and what to do.

use std::path::{Path, PathBuf};

use hf_hub::api::sync::{Api, ApiBuilder, ApiError};
use hf_hub::api::Progress;
use hf_hub::{Cache, Repo, RepoType};

use crate::convert::{self, ConvertError, ConvertOptions, PYTORCH_FILE, PYTORCH_INDEX_FILE};
use strata_runtime::checkpoint::{CONFIG_FILE, INDEX_FILE, SINGLE_FILE};

/// The Hub's address when `HF_ENDPOINT` is not set.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Files besides the weights a model directory may have; each is fetched when the repository holds it.
pub const TOKENIZER_FILES: [&str; 6] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "generation_config.json",
];

/// Where and how to download.
#[derive(Debug, Clone)]
pub struct HubOptions {
    /// The Hub's base URL (`HF_ENDPOINT`, default [`DEFAULT_ENDPOINT`]).
    pub endpoint: String,
    /// The cache's `hub` directory (`HF_HUB_CACHE`, else `HF_HOME/hub`, else `XDG_CACHE_HOME/huggingface/hub`,
    /// else `~/.cache/huggingface/hub`).
    pub cache_dir: PathBuf,
    /// Access token for gated or private repositories (`HF_TOKEN`, else the file `huggingface-cli login` wrote).
    pub token: Option<String>,
    /// Use only the cache (`HF_HUB_OFFLINE=1`).
    pub offline: bool,
    /// Draw progress bars (on a terminal only).
    pub progress: bool,
}

impl HubOptions {
    /// The options `huggingface_hub` would use in this environment.
    pub fn from_env() -> HubOptions {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let cache_dir = var("HF_HUB_CACHE")
            .map(PathBuf::from)
            .or_else(|| var("HF_HOME").map(|home| Path::new(&home).join("hub")))
            .or_else(|| {
                var("XDG_CACHE_HOME").map(|xdg| Path::new(&xdg).join("huggingface").join("hub"))
            })
            // huggingface_hub's `~/.cache` on every platform (so a cache it filled is shared); hf-hub's own default
            // panics without a home directory, where the platform's cache directory is the last resort.
            .or_else(|| {
                dirs::home_dir().map(|home| home.join(".cache").join("huggingface").join("hub"))
            })
            .or_else(|| dirs::cache_dir().map(|cache| cache.join("huggingface").join("hub")))
            .unwrap_or_else(|| PathBuf::from(".cache").join("huggingface").join("hub"));
        let token = var("HF_TOKEN").or_else(|| Cache::new(cache_dir.clone()).token());
        // huggingface_hub's reading of a boolean variable.
        let offline = var("HF_HUB_OFFLINE")
            .is_some_and(|v| ["1", "ON", "YES", "TRUE"].contains(&v.to_ascii_uppercase().as_str()));
        HubOptions {
            endpoint: var("HF_ENDPOINT")
                .map(|e| e.trim_end_matches('/').to_owned())
                .unwrap_or_else(|| DEFAULT_ENDPOINT.to_owned()),
            cache_dir,
            token,
            offline,
            progress: true,
        }
    }
}

/// [`HubOptions::from_env`].
impl Default for HubOptions {
    fn default() -> Self {
        HubOptions::from_env()
    }
}

/// Why a model could not be had from the Hub.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HubError {
    /// The endpoint could not be reached and the cache has no complete copy.
    #[error("cannot download `{id}`: {endpoint} is unreachable ({reason}) and the Hugging Face cache ({}) has no complete copy of it. \
Check the network connection, or set HF_ENDPOINT to a reachable mirror; on a machine without network, download the \
repository elsewhere (`huggingface-cli download {id}`) and pass its directory with --model DIR", cache.display())]
    Unreachable {
        /// The model id.
        id: String,
        /// The endpoint tried.
        endpoint: String,
        /// The cache directory looked in.
        cache: PathBuf,
        /// The transport error.
        reason: String,
    },
    /// `HF_HUB_OFFLINE` is set and the cache has no complete copy.
    #[error("HF_HUB_OFFLINE is set and the Hugging Face cache ({}) has no complete copy of `{id}`; unset HF_HUB_OFFLINE to download it from {endpoint}", cache.display())]
    NotCached {
        /// The model id.
        id: String,
        /// The endpoint that would be used.
        endpoint: String,
        /// The cache directory.
        cache: PathBuf,
    },
    /// The Hub answered with an error status.
    #[error("{endpoint} answered {status} for `{id}` ({url}){}", hint(*status))]
    Status {
        /// The model id.
        id: String,
        /// The endpoint.
        endpoint: String,
        /// The URL requested.
        url: String,
        /// The HTTP status.
        status: u16,
    },
    /// The repository holds no weights strata can use.
    #[error("`{id}` at {endpoint} has no model.safetensors, model.safetensors.index.json, pytorch_model.bin or pytorch_model.bin.index.json (files: {files})")]
    NoWeights {
        /// The model id.
        id: String,
        /// The endpoint.
        endpoint: String,
        /// What the repository holds.
        files: String,
    },
    /// Any other download failure.
    #[error("downloading {file} of `{id}` from {endpoint}: {source}")]
    Download {
        /// The model id.
        id: String,
        /// The endpoint.
        endpoint: String,
        /// The file.
        file: String,
        /// hf-hub's error.
        #[source]
        source: Box<ApiError>,
    },
    /// A downloaded index is unusable.
    #[error("{}: {reason}", path.display())]
    Index {
        /// The index file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Converting downloaded `.bin` weights failed.
    #[error("converting the PyTorch weights of `{id}`: {source}")]
    Convert {
        /// The model id.
        id: String,
        /// The converter's error.
        #[source]
        source: ConvertError,
    },
}

fn hint(status: u16) -> &'static str {
    match status {
        401 | 403 => {
            ": the repository is gated or private; set HF_TOKEN to a token that may read it"
        }
        404 => ": no such model repository, and no local directory of that name (check the id, the path, or HF_ENDPOINT)",
        _ => "",
    }
}

/// Whether `arg` reads as a Hub model id (`org/name`): one `/`, both sides non-empty, of the characters the Hub
/// allows, not starting with `.` (so `./x` and `../x` stay paths). Callers check first that no such path exists.
pub fn is_hub_id(arg: &str) -> bool {
    let mut parts = arg.split('/');
    let (Some(org), Some(name), None) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let ok = |s: &str| {
        !s.is_empty()
            && !s.starts_with(['.', '-'])
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    ok(org) && ok(name)
}

/// A model directory for Hub id `id`, downloading (and converting) what the cache lacks. Returns the snapshot
/// directory, which holds config.json, the tokenizer files and safetensors weights.
pub fn download(id: &str, options: &HubOptions) -> Result<PathBuf, HubError> {
    let cache = Cache::new(options.cache_dir.clone());
    let repo = Repo::new(id.to_owned(), RepoType::Model);
    if options.offline {
        return cached_snapshot(&cache, &repo).ok_or_else(|| HubError::NotCached {
            id: id.into(),
            endpoint: options.endpoint.clone(),
            cache: options.cache_dir.clone(),
        });
    }
    let api: Api = ApiBuilder::from_cache(cache.clone())
        .with_endpoint(options.endpoint.clone())
        .with_token(options.token.clone())
        .with_progress(false)
        .build()
        .map_err(|e| download_error(id, options, "the repository listing", e))?;
    let api_repo = api.repo(repo.clone());
    let files: Vec<String> = match api_repo.info() {
        Ok(info) => info.siblings.into_iter().map(|s| s.rfilename).collect(),
        Err(e) if is_transport(&e) => {
            // Offline with a complete copy: use it, as huggingface_hub does.
            if let Some(dir) = cached_snapshot(&cache, &repo) {
                eprintln!(
                    "note: {} is unreachable; using the cached copy of `{id}` in {}",
                    options.endpoint,
                    dir.display()
                );
                return Ok(dir);
            }
            return Err(HubError::Unreachable {
                id: id.into(),
                endpoint: options.endpoint.clone(),
                cache: options.cache_dir.clone(),
                reason: transport_reason(&e),
            });
        }
        Err(e) => return Err(download_error(id, options, "the repository listing", e)),
    };
    let has = |name: &str| files.iter().any(|f| f == name);
    let fetch = |file: &str| -> Result<PathBuf, HubError> {
        let bar = options.progress.then(|| DownloadBar::new(file));
        let found = cache.repo(repo.clone()).get(file);
        match found {
            Some(path) => Ok(path),
            None => match bar {
                Some(bar) => api_repo.download_with_progress(file, bar),
                None => api_repo.download_with_progress(file, ()),
            }
            .map_err(|e| download_error(id, options, file, e)),
        }
    };

    let config = fetch(CONFIG_FILE)?;
    let snapshot = config
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    for file in TOKENIZER_FILES.iter().filter(|f| has(f)) {
        fetch(file)?;
    }
    let (index, single, pytorch) = if has(INDEX_FILE) || has(SINGLE_FILE) {
        (INDEX_FILE, SINGLE_FILE, false)
    } else if has(PYTORCH_INDEX_FILE) || has(PYTORCH_FILE) {
        (PYTORCH_INDEX_FILE, PYTORCH_FILE, true)
    } else {
        return Err(HubError::NoWeights {
            id: id.into(),
            endpoint: options.endpoint.clone(),
            files: files.join(", "),
        });
    };
    if pytorch && converted(&snapshot) {
        return Ok(snapshot);
    }
    if has(index) {
        let path = fetch(index)?;
        let text = std::fs::read_to_string(&path).map_err(|e| HubError::Index {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let shards =
            convert::index_shards(&text).map_err(|reason| HubError::Index { path, reason })?;
        for shard in &shards {
            fetch(shard)?;
        }
    } else {
        fetch(single)?;
    }
    if pytorch {
        let bar = options
            .progress
            .then(|| bytes_bar("converting .bin to safetensors"));
        convert::convert_pytorch(&snapshot, &ConvertOptions::default(), &|done, total| {
            if let Some(bar) = &bar {
                bar.set_length(total);
                bar.set_position(done);
            }
        })
        .map_err(|source| HubError::Convert {
            id: id.into(),
            source,
        })?;
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
    }
    Ok(snapshot)
}

/// Whether `dir` holds safetensors weights (downloaded, or converted by an earlier run).
fn converted(dir: &Path) -> bool {
    dir.join(SINGLE_FILE).is_file() || dir.join(INDEX_FILE).is_file()
}

/// The cached snapshot of `repo`'s main revision when it is complete: config.json and safetensors weights.
fn cached_snapshot(cache: &Cache, repo: &Repo) -> Option<PathBuf> {
    let config = cache.repo(repo.clone()).get(CONFIG_FILE)?;
    let dir = config.parent()?.to_path_buf();
    converted(&dir).then_some(dir)
}

fn is_transport(e: &ApiError) -> bool {
    matches!(e, ApiError::RequestError(inner) if matches!(**inner, ureq::Error::Transport(_)))
}

fn transport_reason(e: &ApiError) -> String {
    match e {
        ApiError::RequestError(inner) => match &**inner {
            ureq::Error::Transport(t) => t.to_string(),
            other => other.to_string(),
        },
        other => other.to_string(),
    }
}

fn download_error(id: &str, options: &HubOptions, file: &str, e: ApiError) -> HubError {
    if let ApiError::RequestError(inner) = &e {
        match &**inner {
            ureq::Error::Status(status, response) => {
                return HubError::Status {
                    id: id.into(),
                    endpoint: options.endpoint.clone(),
                    url: response.get_url().to_owned(),
                    status: *status,
                }
            }
            ureq::Error::Transport(t) => {
                return HubError::Unreachable {
                    id: id.into(),
                    endpoint: options.endpoint.clone(),
                    cache: options.cache_dir.clone(),
                    reason: t.to_string(),
                }
            }
        }
    }
    HubError::Download {
        id: id.into(),
        endpoint: options.endpoint.clone(),
        file: file.into(),
        source: Box::new(e),
    }
}

fn bytes_bar(message: &str) -> indicatif::ProgressBar {
    // indicatif draws to stderr only when it is a terminal.
    let bar = indicatif::ProgressBar::new(0);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(message.to_owned());
    bar
}

/// hf-hub's progress callbacks on an indicatif bar.
struct DownloadBar(indicatif::ProgressBar);

impl DownloadBar {
    fn new(file: &str) -> DownloadBar {
        DownloadBar(bytes_bar(file))
    }
}

impl Progress for DownloadBar {
    fn init(&mut self, size: usize, _filename: &str) {
        self.0.set_length(size as u64);
    }
    fn update(&mut self, size: usize) {
        self.0.inc(size as u64);
    }
    fn finish(&mut self) {
        self.0.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_are_org_slash_name() {
        for id in ["facebook/opt-1.3b", "org_x/model.v2", "a/b"] {
            assert!(is_hub_id(id), "{id}");
        }
        for not in [
            "opt-1.3b",
            "./opt",
            "../x/y",
            "a/b/c",
            "/abs",
            "a/",
            "a b/c",
            "org/.hidden",
        ] {
            assert!(!is_hub_id(not), "{not}");
        }
    }
}
