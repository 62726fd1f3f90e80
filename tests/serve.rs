//! `strata serve` with a real HTTP client over loopback, on the tokenizer fixture: greedy completions equal
//! `generate`'s (transformers' reference), streaming sends one event per token, concurrent requests share one block,
//! bad requests get OpenAI-style 400 bodies and never reach the GPU, a full queue answers 429, the API key is
//! required, and SIGTERM drains the queue and exits 0 with no offload file left.
#![cfg(unix)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::{json, Value};

fn fixture() -> (PathBuf, Value) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer");
    let reference =
        serde_json::from_slice(&std::fs::read(dir.join("reference.json")).unwrap()).unwrap();
    (dir, reference)
}

/// A running server: the child, its base URL, and its stderr so far (collected by a thread).
struct Server {
    child: Child,
    url: String,
    stderr: std::thread::JoinHandle<String>,
}

fn start(extra: &[&str]) -> Server {
    let (dir, _) = fixture();
    let mut child = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(["serve", "--model"])
        .arg(&dir)
        .args(["--port", "0"])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let stderr = std::thread::spawn(move || {
        let mut text = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(at) = line.find("http://") {
                let url = line[at..].split_whitespace().next().unwrap().to_string();
                let _ = tx.send(url);
            }
            text += &line;
            text.push('\n');
        }
        text
    });
    let url = rx
        .recv_timeout(Duration::from_secs(240))
        .expect("the server never said where it listens");
    Server { child, url, stderr }
}

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(240))
        .build()
        .unwrap()
}

fn post(server: &Server, body: &Value) -> (u16, Value) {
    let r = client()
        .post(format!("{}/v1/completions", server.url))
        .bearer_auth("secret")
        .json(body)
        .send()
        .unwrap();
    (r.status().as_u16(), r.json().unwrap())
}

fn metric(server: &Server, name: &str) -> f64 {
    let text = client()
        .get(format!("{}/metrics", server.url))
        .send()
        .unwrap()
        .text()
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
}

fn sigterm(child: &Child) {
    let sent = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
}

#[test]
fn completions_equal_generate_stream_per_token_batch_and_refuse_bad_requests() {
    let (_, reference) = fixture();
    let mut server = start(&[
        "--api-key",
        "secret",
        "--max-batch",
        "2",
        "--batch-wait-ms",
        "5000",
        "--max-body-bytes",
        "4096",
    ]);
    let texts: Vec<String> = serde_json::from_value(reference["generated_text"].clone()).unwrap();
    let prompts: Vec<String> = serde_json::from_value(reference["prompts"].clone()).unwrap();

    // Two clients at once: one block serves both (it waits up to 5 s to fill, and fills with the second).
    let handles: Vec<_> = prompts
        .iter()
        .map(|p| {
            let body =
                json!({"model": "tokenizer", "prompt": p, "max_tokens": 8, "temperature": 0});
            let url = server.url.clone();
            std::thread::spawn(move || {
                client()
                    .post(format!("{url}/v1/completions"))
                    .bearer_auth("secret")
                    .json(&body)
                    .send()
                    .unwrap()
                    .json::<Value>()
                    .unwrap()
            })
        })
        .collect();
    for (h, want) in handles.into_iter().zip(&texts) {
        let v = h.join().unwrap();
        assert_eq!(v["choices"][0]["text"], json!(want), "{v}");
        assert_eq!(v["choices"][0]["finish_reason"], "length");
        assert_eq!(v["object"], "text_completion");
        assert_eq!(v["usage"]["completion_tokens"], 8);
    }
    assert_eq!(metric(&server, "strata_blocks_total"), 1.0);
    assert_eq!(metric(&server, "strata_largest_block_sequences"), 2.0);

    // Token ids in, the fixture's ids out.
    let (status, v) = post(
        &server,
        &json!({"prompt": reference["prompt_ids"][1], "max_tokens": 8, "temperature": 0.0}),
    );
    assert_eq!(status, 200);
    assert_eq!(v["choices"][0]["token_ids"], reference["generated_ids"][1]);

    // Streaming: one event per token, the text adds up, then [DONE].
    let body = client()
        .post(format!("{}/v1/completions", server.url))
        .bearer_auth("secret")
        .json(&json!({"prompt": prompts[0], "max_tokens": 8, "temperature": 0, "stream": true}))
        .send()
        .unwrap()
        .text()
        .unwrap();
    let data: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(data.last(), Some(&"[DONE]"));
    let events: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(events.len(), 8 + 1, "8 tokens and the finish:\n{body}");
    let text: String = events
        .iter()
        .map(|e| e["choices"][0]["text"].as_str().unwrap())
        .collect();
    assert_eq!(text, texts[0]);
    assert_eq!(
        events.last().unwrap()["choices"][0]["finish_reason"],
        "length"
    );

    // Bad requests: 400 with a message, and no block ran for them.
    let blocks = metric(&server, "strata_blocks_total");
    let bad = |body: reqwest::blocking::RequestBuilder| {
        let r = body.bearer_auth("secret").send().unwrap();
        (r.status().as_u16(), r.json::<Value>().unwrap())
    };
    let url = format!("{}/v1/completions", server.url);
    let (status, v) = bad(client().post(&url).body("{not json"));
    assert_eq!(status, 400);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not valid JSON"),
        "{v}"
    );
    assert_eq!(v["error"]["type"], "invalid_request_error");
    for (body, message) in [
        (
            json!({"prompt": "Hello", "max_tokens": 100000}),
            "max_tokens",
        ),
        (
            json!({"prompt": [2, 100000], "max_tokens": 2}),
            "outside the vocabulary",
        ),
        (json!({"max_tokens": 2}), "`prompt` is required"),
        (json!({"prompt": "Hello", "temperature": -1}), "temperature"),
        (json!({"prompt": "Hello", "n": 0}), "`n`"),
        (
            json!({"prompt": "Hello", "model": "gpt-4"}),
            "does not exist",
        ),
    ] {
        let (status, v) = post(&server, &body);
        assert!(status == 400 || status == 404, "{body}: {status}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(message),
            "{body}: {v}"
        );
    }
    let long = json!({"prompt": "x".repeat(5000), "max_tokens": 1});
    let (status, v) = bad(client().post(&url).json(&long));
    assert_eq!(status, 413, "{v}");
    assert_eq!(metric(&server, "strata_blocks_total"), blocks);
    // The context: a prompt that leaves no room.
    let context = 64; // tests/fixtures/tokenizer/config.json max_position_embeddings
    let (status, v) = post(
        &server,
        &json!({"prompt": vec![2; context], "max_tokens": 2}),
    );
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("context"),
        "{v}"
    );

    // Without the key: 401. /health and /v1/models.
    let r = client()
        .post(&url)
        .json(&json!({"prompt": "Hello"}))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let models: Value = client()
        .get(format!("{}/v1/models", server.url))
        .bearer_auth("secret")
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(models["data"][0]["id"], "tokenizer");
    let health = client()
        .get(format!("{}/health", server.url))
        .send()
        .unwrap();
    assert_eq!(health.status().as_u16(), 200);

    sigterm(&server.child);
    assert_eq!(server.child.wait().unwrap().code(), Some(0));
    let _ = server.stderr.join();
}

#[test]
fn a_full_queue_answers_429_and_sigterm_drains_with_no_file_left() {
    let (_, reference) = fixture();
    let offload = tempfile::tempdir().unwrap();
    let offload_dir = offload.path().to_str().unwrap().to_string();
    let mut server = start(&[
        "--api-key",
        "secret",
        "--max-batch",
        "8",
        "--batch-wait-ms",
        "60000",
        "--max-queue",
        "2",
        "--percent",
        "0",
        "0",
        "100",
        "0",
        "100",
        "0",
        "--offload-dir",
        &offload_dir,
    ]);
    // Two requests wait for a block that would take a minute to fill.
    let waiting: Vec<_> = (0..2)
        .map(|_| {
            let url = server.url.clone();
            std::thread::spawn(move || {
                let r = client()
                    .post(format!("{url}/v1/completions"))
                    .bearer_auth("secret")
                    .json(&json!({"prompt": "Hello", "max_tokens": 8, "temperature": 0}))
                    .send()
                    .unwrap();
                (r.status().as_u16(), r.json::<Value>().unwrap())
            })
        })
        .collect();
    for _ in 0..600 {
        if metric(&server, "strata_queue_depth") == 2.0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(metric(&server, "strata_queue_depth"), 2.0);
    let (status, v) = post(&server, &json!({"prompt": "Hello", "max_tokens": 8}));
    assert_eq!(status, 429, "{v}");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("queue is full"));

    // SIGTERM: the queued requests run at once and complete; then the process exits 0 and its files are gone.
    sigterm(&server.child);
    for h in waiting {
        let (status, v) = h.join().unwrap();
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["choices"][0]["text"], reference["generated_text"][0]);
    }
    assert_eq!(server.child.wait().unwrap().code(), Some(0));
    let log = server.stderr.join().unwrap();
    assert!(log.contains("shutting down"), "{log}");
    let left: Vec<_> = std::fs::read_dir(offload.path()).unwrap().collect();
    assert!(left.is_empty(), "offload files left: {left:?}");
    assert!(client()
        .get(format!("{}/health", server.url))
        .send()
        .is_err());
}

#[test]
fn bench_serve_reports_throughput_latency_and_blocks() {
    let (dir, _) = fixture();
    let out = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args([
            "bench",
            "serve",
            "--json",
            "--clients",
            "2",
            "--requests",
            "4",
        ])
        .args(["--prompt-len", "4", "--max-tokens", "4", "--", "--model"])
        .arg(&dir)
        .args(["--max-batch", "2", "--batch-wait-ms", "2000"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["schema_version"], 1);
    assert_eq!(v["requests"], 4);
    // Greedy with EOS: at most 4 tokens per request, at least one.
    let tokens = v["generated_tokens"].as_u64().unwrap();
    assert!((4..=16).contains(&tokens), "{v}");
    let latency = &v["latency_s"];
    assert!(latency["p50"].as_f64().unwrap() <= latency["p99"].as_f64().unwrap());
    assert!(v["throughput_tok_s"].as_f64().unwrap() > 0.0);
    // Two clients at once, blocks of two that wait up to 2 s to fill: every block is full.
    assert_eq!(v["block_capacity"], 2.0);
    assert_eq!(v["mean_block_sequences"], 2.0, "{v}");
}
