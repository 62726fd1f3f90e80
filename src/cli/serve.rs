//! `strata serve`: an OpenAI-compatible HTTP server (axum on tokio) over one [`Generator`].
//!
//! `POST /v1/completions` (prompt text or token ids, one or several; `max_tokens`, `temperature`, `top_p`, `top_k`,
//! `stop`, `n`, `seed`, `repetition_penalty`, `stream` as server-sent events), `GET /v1/models`, `GET /health`,
//! `GET /metrics` (Prometheus text). Requests are checked in the handler (JSON, size, lengths, ids, parameters) and
//! a bad one is answered with an OpenAI-style 400 before it reaches the queue. Accepted sequences wait in a bounded
//! queue (full: 429); one worker thread owns the GPU and runs them in blocks of the policy's
//! `gpu_batch_size x num_gpu_batches`, waiting at most `--batch-wait-ms` for a block to fill. A client that goes away
//! ends its sequences at the next step. SIGTERM, SIGINT or SIGHUP stop accepting connections, run what is queued, let
//! every open response finish, and exit 0 with the offload files removed.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use strata_runtime::config::{DType, OptConfig};
use strata_runtime::generate::{FinishReason, Generator};
use strata_runtime::gpu::{Gpu, GpuOptions};
use strata_runtime::offload::policy::Policy;
use strata_runtime::tokenizer::Tokenizer;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use super::auto::resolve_auto;
use super::complete::{run_block, Control, Request};
use super::headings;
use super::model_arg;
use super::policy_args::PolicyArgs;
use super::sampling_args::choice_of;

/// Arguments of `strata serve`.
#[derive(clap::Args, Clone)]
pub struct Args {
    /// A model directory (with config.json), or a model name such as `opt-1.3b` (then --weights or --dummy).
    #[arg(short, long, value_name = "NAME_OR_DIR", help_heading = headings::MODEL)]
    pub model: String,
    /// Use synthetic weights instead of a checkpoint.
    #[arg(long, conflicts_with = "weights", help_heading = headings::MODEL)]
    pub dummy: bool,
    /// Checkpoint directory for a model given by name.
    #[arg(long, value_name = "DIR", help_heading = headings::MODEL)]
    pub weights: Option<PathBuf>,
    /// Store weights on the GPU as f16 or f32 (default: the checkpoint's dtype).
    #[arg(long, value_name = "f16|f32", value_parser = parse_dtype, help_heading = headings::MODEL)]
    pub dtype: Option<DType>,
    /// Use the first GPU adapter whose name contains this.
    #[arg(long, value_name = "NAME", help_heading = headings::MODEL)]
    pub adapter: Option<String>,
    /// Address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: any free port; the address is printed).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on /v1/ requests.
    #[arg(long, value_name = "KEY")]
    pub api_key: Option<String>,
    /// Sequences per block without --gpu-batch-size / --num-gpu-batches (everything on the GPU).
    #[arg(long, default_value_t = 8, value_name = "N")]
    pub max_batch: usize,
    /// Sequences that may wait for the GPU; more are answered 429.
    #[arg(long, default_value_t = 256, value_name = "N")]
    pub max_queue: usize,
    /// How long a block waits for more requests to fill it, in milliseconds.
    #[arg(long, default_value_t = 20, value_name = "MS")]
    pub batch_wait_ms: u64,
    /// The largest `max_tokens` a request may ask for (default: the model's context).
    #[arg(long, value_name = "N")]
    pub max_tokens_limit: Option<usize>,
    /// The largest request body, in bytes.
    #[arg(long, default_value_t = 1 << 20, value_name = "BYTES")]
    pub max_body_bytes: usize,
    #[command(flatten)]
    pub policy: PolicyArgs,
}

fn parse_dtype(text: &str) -> Result<DType, String> {
    match DType::parse(text) {
        Some(d @ (DType::F16 | DType::F32)) => Ok(d),
        _ => Err(format!("`{text}` is not a storage dtype: use f16 or f32")),
    }
}

/// What a sequence's client hears from the worker.
#[derive(Debug)]
enum SeqEvent {
    /// A new token and the text that became final with it.
    Token { id: u32, text: String },
    /// The sequence finished.
    Done {
        ids: Vec<u32>,
        text: String,
        finish: FinishReason,
    },
    /// The block failed.
    Failed(String),
}

/// One sequence waiting for the GPU.
struct Pending {
    request: Request,
    events: UnboundedSender<SeqEvent>,
}

/// The queue between the handlers and the worker.
#[derive(Default)]
struct Queue {
    waiting: Mutex<VecDeque<Pending>>,
    wake: Condvar,
}

/// Counters for /metrics.
#[derive(Default)]
struct Metrics {
    requests_ok: AtomicU64,
    requests_bad: AtomicU64,
    requests_refused: AtomicU64,
    running: AtomicU64,
    blocks: AtomicU64,
    block_sequences: AtomicU64,
    largest_block: AtomicU64,
    generated_tokens: AtomicU64,
    /// Microseconds the worker spent running blocks.
    busy_us: AtomicU64,
    tier_peak: Mutex<[u64; 3]>,
}

/// What every handler shares.
struct App {
    model: String,
    config: OptConfig,
    tokenizer: Option<Tokenizer>,
    api_key: Option<String>,
    max_queue: usize,
    max_tokens_limit: usize,
    max_body_bytes: usize,
    queue: Queue,
    metrics: Metrics,
    shutting_down: AtomicBool,
    next_id: AtomicU64,
    block: usize,
}

/// An OpenAI-style error: the status and `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    param: Option<&'static str>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": Value::Null,
        }});
        (self.status, Json(body)).into_response()
    }
}

fn error(
    status: StatusCode,
    message: impl Into<String>,
    kind: &'static str,
    param: Option<&'static str>,
) -> ApiError {
    ApiError {
        status,
        message: message.into(),
        kind,
        param,
    }
}

fn bad_request(message: impl Into<String>, param: Option<&'static str>) -> ApiError {
    error(
        StatusCode::BAD_REQUEST,
        message,
        "invalid_request_error",
        param,
    )
}

/// The prompts of a request: a string, an array of strings, an array of token ids or an array of such arrays.
fn prompts_of(app: &App, prompt: Option<&Value>) -> Result<Vec<Vec<u32>>, ApiError> {
    let encode = |text: &str| -> Result<Vec<u32>, ApiError> {
        let tokenizer = app.tokenizer.as_ref().ok_or_else(|| {
            bad_request(
                "this model has no tokenizer: send `prompt` as token ids",
                Some("prompt"),
            )
        })?;
        tokenizer
            .encode(text)
            .map_err(|e| bad_request(e.to_string(), Some("prompt")))
    };
    let ids = |v: &[Value]| -> Option<Vec<u32>> {
        v.iter()
            .map(|x| x.as_u64().and_then(|n| u32::try_from(n).ok()))
            .collect()
    };
    let prompts = match prompt {
        Some(Value::String(s)) => vec![encode(s)?],
        Some(Value::Array(items)) if items.iter().all(Value::is_number) && !items.is_empty() => {
            vec![ids(items).ok_or_else(|| bad_request("token ids must be non-negative integers", Some("prompt")))?]
        }
        Some(Value::Array(items)) if !items.is_empty() => items
            .iter()
            .map(|item| match item {
                Value::String(s) => encode(s),
                Value::Array(v) if !v.is_empty() => ids(v)
                    .ok_or_else(|| bad_request("token ids must be non-negative integers", Some("prompt"))),
                _ => Err(bad_request(
                    "`prompt` must be a string, an array of strings, token ids, or arrays of token ids",
                    Some("prompt"),
                )),
            })
            .collect::<Result<_, _>>()?,
        _ => {
            return Err(bad_request(
                "`prompt` is required: a non-empty string, array of strings, token ids, or arrays of token ids",
                Some("prompt"),
            ))
        }
    };
    for p in &prompts {
        if let Some(&id) = p.iter().find(|&&id| id as usize >= app.config.vocab_size) {
            return Err(bad_request(
                format!(
                    "token id {id} is outside the vocabulary of {}",
                    app.config.vocab_size
                ),
                Some("prompt"),
            ));
        }
    }
    Ok(prompts)
}

/// A field as `T`, a 400 naming it otherwise.
fn field<T: serde::de::DeserializeOwned>(
    body: &Value,
    name: &'static str,
) -> Result<Option<T>, ApiError> {
    match body.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => serde_json::from_value(v.clone())
            .map(Some)
            .map_err(|_| bad_request(format!("`{name}` has the wrong type: {v}"), Some(name))),
    }
}

/// A checked request: its sequences (prompt x n) and whether it streams.
struct Parsed {
    sequences: Vec<Request>,
    prompt_tokens: usize,
    stream: bool,
}

fn parse_request(app: &App, body: &[u8]) -> Result<Parsed, ApiError> {
    let body: Value = serde_json::from_slice(body)
        .map_err(|e| bad_request(format!("the body is not valid JSON: {e}"), None))?;
    if !body.is_object() {
        return Err(bad_request("the body must be a JSON object", None));
    }
    if let Some(model) = field::<String>(&body, "model")? {
        if model != app.model {
            return Err(error(
                StatusCode::NOT_FOUND,
                format!(
                    "the model `{model}` does not exist; this server runs `{}`",
                    app.model
                ),
                "invalid_request_error",
                Some("model"),
            ));
        }
    }
    for unsupported in ["logprobs", "suffix"] {
        if body.get(unsupported).is_some_and(|v| !v.is_null()) {
            return Err(bad_request(
                format!("`{unsupported}` is not supported"),
                Some(unsupported),
            ));
        }
    }
    let prompts = prompts_of(app, body.get("prompt"))?;
    let max_tokens = field::<usize>(&body, "max_tokens")?.unwrap_or(16);
    if max_tokens > app.max_tokens_limit {
        return Err(bad_request(
            format!(
                "`max_tokens` is {max_tokens}, above this server's limit of {}",
                app.max_tokens_limit
            ),
            Some("max_tokens"),
        ));
    }
    let n = field::<usize>(&body, "n")?.unwrap_or(1);
    if n == 0 || n > 16 {
        return Err(bad_request("`n` must be between 1 and 16", Some("n")));
    }
    let total = prompts.len() * n;
    if total > app.max_queue {
        return Err(bad_request(
            format!(
                "{total} sequences (prompts x n) exceed this server's queue of {}",
                app.max_queue
            ),
            Some("n"),
        ));
    }
    for p in &prompts {
        // The last generated token is never fed back, so prompt + max_tokens - 1 positions.
        if p.len() + max_tokens.saturating_sub(1) > app.config.max_seq_len {
            return Err(bad_request(
                format!(
                    "this model's context is {} tokens, but the prompt has {} and max_tokens is {max_tokens}",
                    app.config.max_seq_len,
                    p.len()
                ),
                Some("prompt"),
            ));
        }
    }
    let temperature = field::<f32>(&body, "temperature")?.unwrap_or(1.0);
    let top_p = field::<f32>(&body, "top_p")?;
    let top_k = field::<usize>(&body, "top_k")?;
    let penalty = field::<f32>(&body, "repetition_penalty")?;
    let seed = field::<u64>(&body, "seed")?.unwrap_or_else(super::sampling_args::random_seed);
    let stop: Vec<String> = match body.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(_) => field::<Vec<String>>(&body, "stop")?.unwrap_or_default(),
    };
    if stop.len() > 4 || stop.iter().any(String::is_empty) {
        return Err(bad_request(
            "`stop`: up to 4 non-empty strings",
            Some("stop"),
        ));
    }
    if !stop.is_empty() && app.tokenizer.is_none() {
        return Err(bad_request(
            "`stop` needs the model's tokenizer",
            Some("stop"),
        ));
    }
    let stream = field::<bool>(&body, "stream")?.unwrap_or(false);
    let mut sequences = Vec::new();
    for prompt in &prompts {
        for j in 0..n {
            let choice = choice_of(
                Some(temperature),
                top_p,
                top_k,
                penalty,
                seed.wrapping_add(j as u64),
                ["temperature", "top_p", "top_k", "repetition_penalty"],
            )
            .map_err(|e| bad_request(e.to_string(), None))?;
            sequences.push(Request {
                prompt_ids: prompt.clone(),
                max_new_tokens: max_tokens,
                choice,
                stop: stop.clone(),
            });
        }
    }
    Ok(Parsed {
        prompt_tokens: prompts.iter().map(Vec::len).sum(),
        sequences,
        stream,
    })
}

fn authorized(app: &App, headers: &HeaderMap) -> bool {
    let Some(key) = &app.api_key else {
        return true;
    };
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|given| given == key)
}

fn unauthorized() -> Response {
    error(
        StatusCode::UNAUTHORIZED,
        "missing or incorrect API key: send `Authorization: Bearer KEY`",
        "invalid_request_error",
        None,
    )
    .into_response()
}

/// Queues `sequences`, or answers why not (a full queue: 429; shutting down: 503).
fn enqueue(
    app: &App,
    sequences: Vec<Request>,
) -> Result<Vec<UnboundedReceiver<SeqEvent>>, ApiError> {
    if app.shutting_down.load(Ordering::SeqCst) {
        app.metrics.requests_refused.fetch_add(1, Ordering::Relaxed);
        return Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is shutting down",
            "server_error",
            None,
        ));
    }
    let mut waiting = app.queue.waiting.lock().unwrap_or_else(|p| p.into_inner());
    if waiting.len() + sequences.len() > app.max_queue {
        app.metrics.requests_refused.fetch_add(1, Ordering::Relaxed);
        return Err(error(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "the queue is full ({} sequences waiting, at most {}): retry later",
                waiting.len(),
                app.max_queue
            ),
            "rate_limit_error",
            None,
        ));
    }
    let mut receivers = Vec::new();
    for request in sequences {
        let (tx, rx) = unbounded_channel();
        waiting.push_back(Pending {
            request,
            events: tx,
        });
        receivers.push(rx);
    }
    drop(waiting);
    app.queue.wake.notify_all();
    Ok(receivers)
}

fn openai_finish(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Length => "length",
        _ => "stop",
    }
}

async fn completions(State(app): State<Arc<App>>, headers: HeaderMap, body: Body) -> Response {
    if !authorized(&app, &headers) {
        return unauthorized();
    }
    let bytes = match axum::body::to_bytes(body, app.max_body_bytes).await {
        Ok(b) => b,
        Err(_) => {
            app.metrics.requests_bad.fetch_add(1, Ordering::Relaxed);
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the request body is larger than {} bytes",
                    app.max_body_bytes
                ),
                "invalid_request_error",
                None,
            )
            .into_response();
        }
    };
    let parsed = match parse_request(&app, &bytes) {
        Ok(p) => p,
        Err(response) => {
            app.metrics.requests_bad.fetch_add(1, Ordering::Relaxed);
            return response.into_response();
        }
    };
    let receivers = match enqueue(&app, parsed.sequences) {
        Ok(r) => r,
        Err(response) => return response.into_response(),
    };
    let id = format!("cmpl-{}", app.next_id.fetch_add(1, Ordering::Relaxed));
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if parsed.stream {
        return stream_response(app, receivers, id, created);
    }
    let mut choices = Vec::new();
    let mut completion_tokens = 0;
    for (index, mut rx) in receivers.into_iter().enumerate() {
        loop {
            match rx.recv().await {
                Some(SeqEvent::Token { .. }) => {}
                Some(SeqEvent::Done { ids, text, finish }) => {
                    completion_tokens += ids.len();
                    choices.push(json!({
                        "index": index,
                        "text": text,
                        "token_ids": ids,
                        "logprobs": Value::Null,
                        "finish_reason": openai_finish(finish),
                    }));
                    break;
                }
                Some(SeqEvent::Failed(message)) => {
                    return error(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        message,
                        "server_error",
                        None,
                    )
                    .into_response();
                }
                None => {
                    return error(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "the GPU worker stopped",
                        "server_error",
                        None,
                    )
                    .into_response();
                }
            }
        }
    }
    app.metrics.requests_ok.fetch_add(1, Ordering::Relaxed);
    Json(json!({
        "id": id,
        "object": "text_completion",
        "created": created,
        "model": app.model,
        "choices": choices,
        "usage": {
            "prompt_tokens": parsed.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": parsed.prompt_tokens + completion_tokens,
        },
    }))
    .into_response()
}

/// Server-sent events: one `text_completion` chunk per token of each sequence, the last with its finish reason, then
/// `[DONE]`.
fn stream_response(
    app: Arc<App>,
    receivers: Vec<UnboundedReceiver<SeqEvent>>,
    id: String,
    created: u64,
) -> Response {
    let (tx, rx) = unbounded_channel::<Result<Event, Infallible>>();
    let model = app.model.clone();
    tokio::spawn(async move {
        let chunk = |index: usize, text: &str, ids: &[u32], finish: Option<&str>| {
            Event::default().data(
                json!({
                    "id": id,
                    "object": "text_completion",
                    "created": created,
                    "model": model,
                    "choices": [{
                        "index": index,
                        "text": text,
                        "token_ids": ids,
                        "logprobs": Value::Null,
                        "finish_reason": finish,
                    }],
                })
                .to_string(),
            )
        };
        // Every sequence's events, as they come, merged into one stream.
        let mut merged = tokio_stream::StreamMap::new();
        for (index, rx) in receivers.into_iter().enumerate() {
            merged.insert(
                index,
                tokio_stream::wrappers::UnboundedReceiverStream::new(rx),
            );
        }
        use tokio_stream::StreamExt as _;
        while let Some((index, event)) = merged.next().await {
            let event = match event {
                SeqEvent::Token { id, text } => chunk(index, &text, &[id], None),
                SeqEvent::Done { finish, .. } => chunk(index, "", &[], Some(openai_finish(finish))),
                SeqEvent::Failed(message) => Event::default().data(
                    json!({"error": {"message": message, "type": "server_error"}}).to_string(),
                ),
            };
            if tx.send(Ok(event)).is_err() {
                // The client left: dropping the receivers ends its sequences at the next step.
                return;
            }
        }
        let _ = tx.send(Ok(Event::default().data("[DONE]")));
        app.metrics.requests_ok.fetch_add(1, Ordering::Relaxed);
    });
    Sse::new(tokio_stream::wrappers::UnboundedReceiverStream::new(rx)).into_response()
}

async fn models(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if !authorized(&app, &headers) {
        return unauthorized();
    }
    Json(json!({
        "object": "list",
        "data": [{"id": app.model, "object": "model", "created": 0, "owned_by": "strata"}],
    }))
    .into_response()
}

async fn health(State(app): State<Arc<App>>) -> Response {
    if app.shutting_down.load(Ordering::SeqCst) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "shutting down"})),
        )
            .into_response();
    }
    Json(json!({"status": "ok"})).into_response()
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    let m = &app.metrics;
    let queued = app.queue.waiting.lock().map_or(0, |w| w.len());
    let busy = m.busy_us.load(Ordering::Relaxed) as f64 / 1e6;
    let tokens = m.generated_tokens.load(Ordering::Relaxed);
    let tiers = *m.tier_peak.lock().unwrap_or_else(|p| p.into_inner());
    let mut text = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, f64)]| {
        text += &format!("# HELP strata_{name} {help}\n# TYPE strata_{name} {kind}\n");
        for (labels, value) in samples {
            text += &format!("strata_{name}{labels} {value}\n");
        }
    };
    metric(
        "queue_depth",
        "gauge",
        "Sequences waiting for the GPU.",
        &[("", queued as f64)],
    );
    metric(
        "running_sequences",
        "gauge",
        "Sequences in the running block.",
        &[("", m.running.load(Ordering::Relaxed) as f64)],
    );
    metric(
        "requests_total",
        "counter",
        "Completion requests by outcome.",
        &[
            (
                "{outcome=\"ok\"}",
                m.requests_ok.load(Ordering::Relaxed) as f64,
            ),
            (
                "{outcome=\"bad_request\"}",
                m.requests_bad.load(Ordering::Relaxed) as f64,
            ),
            (
                "{outcome=\"refused\"}",
                m.requests_refused.load(Ordering::Relaxed) as f64,
            ),
        ],
    );
    metric(
        "blocks_total",
        "counter",
        "Blocks run on the GPU.",
        &[("", m.blocks.load(Ordering::Relaxed) as f64)],
    );
    metric(
        "block_sequences_total",
        "counter",
        "Sequences run, summed over blocks.",
        &[("", m.block_sequences.load(Ordering::Relaxed) as f64)],
    );
    metric(
        "largest_block_sequences",
        "gauge",
        "The most sequences one block has run.",
        &[("", m.largest_block.load(Ordering::Relaxed) as f64)],
    );
    metric(
        "block_capacity_sequences",
        "gauge",
        "Sequences one block holds (gpu_batch_size x num_gpu_batches).",
        &[("", app.block as f64)],
    );
    metric(
        "generated_tokens_total",
        "counter",
        "Tokens generated.",
        &[("", tokens as f64)],
    );
    metric(
        "busy_seconds_total",
        "counter",
        "Seconds the GPU worker spent running blocks.",
        &[("", busy)],
    );
    metric(
        "tokens_per_second",
        "gauge",
        "Generated tokens per second of running blocks.",
        &[(
            "",
            if busy > 0.0 {
                tokens as f64 / busy
            } else {
                0.0
            },
        )],
    );
    metric(
        "tier_peak_bytes",
        "gauge",
        "The most bytes a run has held per memory tier.",
        &[
            ("{tier=\"gpu\"}", tiers[0] as f64),
            ("{tier=\"cpu\"}", tiers[1] as f64),
            ("{tier=\"disk\"}", tiers[2] as f64),
        ],
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

/// The worker: owns the GPU, runs queued sequences block by block until shutdown has emptied the queue.
fn worker(app: &App, generator: &Generator, block: usize, wait: Duration) {
    loop {
        let batch: Vec<Pending> = {
            let mut waiting = app.queue.waiting.lock().unwrap_or_else(|p| p.into_inner());
            while waiting.is_empty() {
                if app.shutting_down.load(Ordering::SeqCst) {
                    return;
                }
                waiting = app
                    .queue
                    .wake
                    .wait_timeout(waiting, Duration::from_millis(200))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            // Give a block a moment to fill; shutdown runs what is there at once.
            let deadline = Instant::now() + wait;
            while waiting.len() < block && !app.shutting_down.load(Ordering::SeqCst) {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                waiting = app
                    .queue
                    .wake
                    .wait_timeout(waiting, deadline - now)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            let take = waiting.len().min(block);
            waiting.drain(..take).collect()
        };
        // Clients gone while queued never reach the GPU.
        let batch: Vec<Pending> = batch
            .into_iter()
            .filter(|p| !p.events.is_closed())
            .collect();
        if batch.is_empty() {
            continue;
        }
        run_one_block(app, generator, &batch);
    }
}

fn run_one_block(app: &App, generator: &Generator, batch: &[Pending]) {
    let m = &app.metrics;
    m.blocks.fetch_add(1, Ordering::Relaxed);
    m.block_sequences
        .fetch_add(batch.len() as u64, Ordering::Relaxed);
    m.largest_block
        .fetch_max(batch.len() as u64, Ordering::Relaxed);
    m.running.store(batch.len() as u64, Ordering::Relaxed);
    let started = Instant::now();
    let requests: Vec<Request> = batch.iter().map(|p| p.request.clone()).collect();
    let result = run_block(
        generator,
        app.tokenizer.as_ref(),
        &requests,
        false,
        false,
        false,
        &mut |_, _, deltas| {
            let mut control = Control::default();
            for (b, delta) in deltas.iter().enumerate() {
                let Some(delta) = delta else { continue };
                let sent = batch[b].events.send(SeqEvent::Token {
                    id: delta.id,
                    text: delta.text.clone(),
                });
                if sent.is_err() && delta.finish.is_none() {
                    control.cancel.push(b);
                }
            }
            control
        },
    );
    m.running.store(0, Ordering::Relaxed);
    m.busy_us
        .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
    let peak = generator.ledger().peak();
    *m.tier_peak.lock().unwrap_or_else(|p| p.into_inner()) = [peak.gpu, peak.cpu, peak.disk];
    match result {
        Ok(out) => {
            for (pending, completion) in batch.iter().zip(out.completions) {
                m.generated_tokens
                    .fetch_add(completion.ids.len() as u64, Ordering::Relaxed);
                let _ = pending.events.send(SeqEvent::Done {
                    ids: completion.ids,
                    text: completion.text.unwrap_or_default(),
                    finish: completion.finish,
                });
            }
        }
        Err(e) => {
            let message = super::process::render_chain(&e);
            eprintln!("strata: a block failed: {message}");
            for pending in batch {
                let _ = pending.events.send(SeqEvent::Failed(message.clone()));
            }
        }
    }
}

/// The policy a server runs: the flags' (everything on the GPU in blocks of --max-batch when no batching is given),
/// or `--policy auto` sized for blocks of --max-batch sequences of half the context each.
fn server_policy(args: &Args, gpu: &Gpu, config: &OptConfig) -> anyhow::Result<Policy> {
    let mut policy = if args.policy.is_auto() {
        let half = config.max_seq_len / 2;
        resolve_auto(gpu, config, half, half, args.max_batch, &args.policy)?
    } else {
        let mut policy = args.policy.to_policy()?;
        if args.policy.gpu_batch_size.is_none() && args.policy.num_gpu_batches.is_none() {
            policy.gpu_batch_size = args.max_batch;
            policy.num_gpu_batches = 1;
        }
        policy
    };
    policy.weight_dtype = args.dtype;
    Ok(policy)
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.max_batch == 0 || args.max_queue == 0 {
        bail!("--max-batch and --max-queue must be at least 1");
    }
    let choice = model_arg::resolve(&args.model, args.weights.as_deref(), args.dummy)?;
    let source = choice.open_for_text(args.dummy)?;
    let config = *source.config();
    let tokenizer = choice.dir().and_then(|dir| match Tokenizer::from_dir(dir) {
        Ok(t) => Some(t),
        Err(e) => {
            eprintln!("note: text prompts are refused: {e}");
            None
        }
    });
    let addr: SocketAddr = format!("{}:{}", args.host, args.port)
        .parse()
        .with_context(|| format!("--host {} --port {}: not an address", args.host, args.port))?;
    let gpu = Gpu::new(&GpuOptions {
        adapter: args.adapter.clone(),
        max_binding_override: None,
    })?;
    eprintln!("strata: {} on {}", config.name, gpu.describe());
    let policy = server_policy(&args, &gpu, &config)?;
    let block = policy.effective_batch();
    let generator = Generator::with_policy(&gpu, source.as_ref(), &policy, &|_| {})?;
    drop(source);
    let app = Arc::new(App {
        model: config.name.to_string(),
        config,
        tokenizer,
        api_key: args.api_key.clone(),
        max_queue: args.max_queue,
        max_tokens_limit: args.max_tokens_limit.unwrap_or(config.max_seq_len),
        max_body_bytes: args.max_body_bytes,
        queue: Queue::default(),
        metrics: Metrics::default(),
        shutting_down: AtomicBool::new(false),
        next_id: AtomicU64::new(0),
        block,
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the server's runtime")?;
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(addr))
        .with_context(|| format!("listening on {addr}"))?;
    let local = listener.local_addr()?;
    eprintln!(
        "strata: serving {} on http://{local} ({}; blocks of {block}, queue {}) — POST /v1/completions",
        app.model,
        policy.to_flags(),
        app.max_queue
    );
    let router = Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .with_state(app.clone());
    let wait = Duration::from_millis(args.batch_wait_ms);
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let worker_app = app.clone();
        let generator = &generator;
        scope.spawn(move || worker(&worker_app, generator, block, wait));
        let shutdown_app = app.clone();
        let served = runtime.block_on(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(async move {
                    shutdown_signal().await;
                    eprintln!("strata: shutting down: finishing the queued requests");
                    shutdown_app.shutting_down.store(true, Ordering::SeqCst);
                    shutdown_app.queue.wake.notify_all();
                })
                .await
        });
        // The listener is closed and every response finished; let the worker see the empty queue.
        app.shutting_down.store(true, Ordering::SeqCst);
        app.queue.wake.notify_all();
        served.context("serving")
    })?;
    eprintln!("strata: stopped");
    Ok(())
}

/// SIGTERM, SIGINT or SIGHUP (Ctrl-C elsewhere); a second one exits at once, with the run's files removed.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
        ) else {
            eprintln!("warning: no signal handler: stop the server with SIGKILL");
            return std::future::pending().await;
        };
        let first = tokio::select! {
            _ = term.recv() => 15,
            _ = int.recv() => 2,
            _ = hup.recv() => 1,
        };
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
                _ = hup.recv() => {}
            }
            super::process::remove_run_files();
            std::process::exit(128 + first);
        });
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
