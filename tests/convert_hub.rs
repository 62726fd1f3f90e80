//! Checkpoints as they come: `strata convert` on the PyTorch copies of the reference fixtures
//! (tests/fixtures/pytorch, made by tools/make_pytorch_fixtures.py with torch) gives the very tensors of the
//! safetensors fixtures and Hugging Face's tokens; `--model ORG/NAME` downloads from a local server that answers as
//! the Hub does (HF_ENDPOINT), converting `.bin` repositories, reuses the cache when the endpoint is unreachable,
//! and fails clearly when there is neither.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use strata_runtime::checkpoint::Checkpoint;
use strata_runtime::config::OptConfig;
use strata_runtime::weights::{model_tensors, WeightSource};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn strata() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_strata"));
    for var in [
        "HF_HOME",
        "HF_HUB_CACHE",
        "HF_ENDPOINT",
        "HF_TOKEN",
        "HF_HUB_OFFLINE",
        "XDG_CACHE_HOME",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("strata runs")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "strata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every tensor the loader serves has the same dtype, shape and bytes in both directories.
fn assert_same_tensors(converted: &Path, original: &Path) {
    let a = Checkpoint::open(converted).unwrap();
    let b = Checkpoint::open(original).unwrap();
    // The name comes from the directory's name; everything else must agree.
    let unnamed = |c: &OptConfig| OptConfig { name: "", ..*c };
    assert_eq!(unnamed(a.config()), unnamed(b.config()));
    for spec in model_tensors(a.config()) {
        let (ta, tb) = (a.load(&spec).unwrap(), b.load(&spec).unwrap());
        assert_eq!(ta.dtype, tb.dtype, "{}", spec.name);
        assert_eq!(ta.shape, tb.shape, "{}", spec.name);
        assert!(ta.bytes == tb.bytes, "{}: bytes differ", spec.name);
    }
}

/// `strata generate --json` on `model` with the fixture's prompts: its generated ids must be the reference's.
fn assert_hf_tokens(cmd: &mut Command, fixture: &str) {
    let text = std::fs::read_to_string(fixtures().join(fixture).join("reference.json")).unwrap();
    let reference: serde_json::Value = serde_json::from_str(&text).unwrap();
    cmd.arg("--max-new-tokens")
        .arg(reference["max_new_tokens"].to_string())
        .args(["--ignore-eos", "--json"]);
    if let Some(prompts) = reference["prompts"].as_array() {
        for p in prompts {
            cmd.args(["--prompt", p.as_str().unwrap()]);
        }
    } else {
        for ids in reference["prompt_ids"].as_array().unwrap() {
            let ids: Vec<String> = ids
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.to_string())
                .collect();
            cmd.args(["--prompt-ids", &ids.join(",")]);
        }
    }
    let out: serde_json::Value = serde_json::from_str(&ok(&run(cmd))).unwrap();
    assert_eq!(
        out["generated_ids"], reference["generated_ids"],
        "{fixture}"
    );
    if let Some(texts) = reference.get("generated_text") {
        assert_eq!(&out["text"], texts, "{fixture}");
    }
}

fn file_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn convert_gives_the_safetensors_fixtures_tensors_and_hf_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, flags) in [
        ("f16", &[][..]),
        ("bf16", &[]),
        ("post-ln-proj", &["--max-shard-size", "40KiB"]),
    ] {
        let out_dir = tmp.path().join(name);
        let stdout = ok(&run(strata()
            .arg("convert")
            .arg(fixtures().join("pytorch").join(name))
            .arg("--out")
            .arg(&out_dir)
            .args(flags)));
        let files = file_names(&out_dir);
        if flags.is_empty() {
            assert_eq!(
                files,
                ["config.json", "model.safetensors"],
                "{name}: {stdout}"
            );
        } else {
            // save_pretrained's names: model-0000i-of-0000n.safetensors, then the index.
            let n = files.len() - 2;
            assert!(n >= 2, "{files:?}");
            let mut expected: Vec<String> = (1..=n)
                .map(|i| format!("model-{i:05}-of-{n:05}.safetensors"))
                .collect();
            expected.insert(0, "config.json".into());
            expected.push("model.safetensors.index.json".into());
            assert_eq!(files, expected);
            for shard in &files[1..=n] {
                let size = std::fs::metadata(out_dir.join(shard)).unwrap().len();
                assert!(size <= 40 * 1024 + 4096, "{shard}: {size} bytes");
            }
        }
        // The tied head of bf16's state dict is left out, as save_pretrained leaves it out.
        assert_eq!(
            stdout.contains("lm_head.weight"),
            name == "bf16",
            "{stdout}"
        );
        assert_same_tensors(&out_dir, &fixtures().join(name));
        assert_hf_tokens(strata().args(["generate", "--model"]).arg(&out_dir), name);
    }
}

#[test]
fn convert_in_place_then_refuses_to_overwrite() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    std::fs::create_dir(&dir).unwrap();
    for f in ["config.json", "pytorch_model.bin"] {
        std::fs::copy(fixtures().join("pytorch/f16").join(f), dir.join(f)).unwrap();
    }
    // Before: the loader names the converter.
    let err = Checkpoint::open(&dir).unwrap_err().to_string();
    assert!(err.contains("strata convert"), "{err}");
    // `--out` naming the same directory another way converts in place and copies nothing onto itself.
    ok(&run(strata()
        .arg("convert")
        .arg(&dir)
        .arg("--out")
        .arg(dir.join("."))));
    assert_eq!(
        std::fs::read(dir.join("config.json")).unwrap(),
        std::fs::read(fixtures().join("pytorch/f16/config.json")).unwrap()
    );
    assert_same_tensors(&dir, &fixtures().join("f16"));
    let again = run(strata().arg("convert").arg(&dir));
    assert!(!again.status.success());
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(err.contains("already has safetensors weights"), "{err}");
    // No partial file is left anywhere.
    assert!(file_names(&dir).iter().all(|n| !n.ends_with(".part")));
    // A cut-off download is an error naming the file, and leaves nothing behind.
    let cut = tmp.path().join("cut");
    std::fs::create_dir(&cut).unwrap();
    std::fs::copy(
        fixtures().join("pytorch/f16/config.json"),
        cut.join("config.json"),
    )
    .unwrap();
    let bytes = std::fs::read(fixtures().join("pytorch/f16/pytorch_model.bin")).unwrap();
    std::fs::write(cut.join("pytorch_model.bin"), &bytes[..bytes.len() / 2]).unwrap();
    let out = run(strata().arg("convert").arg(&cut));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("pytorch_model.bin"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(file_names(&cut), ["config.json", "pytorch_model.bin"]);
    // A directory without PyTorch weights says what it found.
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let out = run(strata().arg("convert").arg(&empty));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("has no PyTorch weights"));
}

/// Every request the server saw: (path, authorization header).
type Requests = Arc<Mutex<Vec<(String, Option<String>)>>>;

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// A local server answering as the Hub does for what hf-hub asks: the repository listing
/// (`/api/models/{id}/revision/main`) and files (`/{id}/resolve/main/{file}`, with ranges, an ETag and the
/// commit). It stops when dropped, and after two minutes in any case.
struct Hub {
    port: u16,
    stop: Arc<AtomicBool>,
    requests: Requests,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Hub {
    fn serve(repos: HashMap<String, PathBuf>) -> Hub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let requests: Requests = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (stop, requests) = (stop.clone(), requests.clone());
            std::thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(120);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            let _ = handle(stream, &repos, &requests);
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            })
        };
        Hub {
            port,
            stop,
            requests,
            thread: Some(thread),
        }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn etag(bytes: &[u8]) -> String {
    // FNV-1a: any content hash names the blob.
    let h = bytes.iter().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x100000001b3)
    });
    format!("{h:016x}")
}

fn handle(
    stream: TcpStream,
    repos: &HashMap<String, PathBuf>,
    requests: &Mutex<Vec<(String, Option<String>)>>,
) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let path = line.split_whitespace().nth(1).unwrap_or("").to_owned();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
        }
    }
    requests
        .lock()
        .unwrap()
        .push((path.clone(), headers.get("authorization").cloned()));
    let mut out = stream;
    let respond = |out: &mut TcpStream, status: &str, extra: &[(String, String)], body: &[u8]| {
        let mut head = format!(
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
            body.len()
        );
        for (k, v) in extra {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        out.write_all(head.as_bytes())?;
        out.write_all(body)?;
        out.flush()
    };
    let not_found = |out: &mut TcpStream| respond(out, "404 Not Found", &[], b"not found");
    if let Some(rest) = path.strip_prefix("/api/models/") {
        let Some(id) = rest.strip_suffix("/revision/main") else {
            return not_found(&mut out);
        };
        let Some(dir) = repos.get(id) else {
            return not_found(&mut out);
        };
        let siblings: Vec<serde_json::Value> = std::fs::read_dir(dir)?
            .map(|e| serde_json::json!({"rfilename": e.unwrap().file_name().to_string_lossy()}))
            .collect();
        let body = serde_json::json!({"sha": COMMIT, "siblings": siblings}).to_string();
        let json = [("Content-Type".to_owned(), "application/json".to_owned())];
        return respond(&mut out, "200 OK", &json, body.as_bytes());
    }
    let found = repos.iter().find_map(|(id, dir)| {
        let file = path.strip_prefix(&format!("/{id}/resolve/main/"))?;
        Some(dir.join(file))
    });
    let Some(file) = found.filter(|f| f.is_file()) else {
        return not_found(&mut out);
    };
    let mut data = Vec::new();
    std::fs::File::open(&file)?.read_to_end(&mut data)?;
    let n = data.len();
    let (start, end) = match headers.get("range").and_then(|r| r.strip_prefix("bytes=")) {
        Some(r) => {
            let (a, b) = r.split_once('-').unwrap_or((r, ""));
            let a: usize = a.parse().unwrap_or(0);
            let b: usize = b.parse().unwrap_or(n.saturating_sub(1));
            (a.min(n), (b + 1).min(n))
        }
        None => (0, n),
    };
    let extra = [
        ("ETag".to_owned(), format!("\"{}\"", etag(&data))),
        ("X-Repo-Commit".to_owned(), COMMIT.to_owned()),
        (
            "Content-Range".to_owned(),
            format!("bytes {start}-{}/{n}", end.saturating_sub(1)),
        ),
    ];
    respond(&mut out, "206 Partial Content", &extra, &data[start..end])
}

/// An endpoint nothing listens on: a port just freed.
fn unreachable_endpoint() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    format!("http://127.0.0.1:{port}")
}

#[test]
fn hub_models_download_convert_generate_and_fail_clearly_offline() {
    let tmp = tempfile::tempdir().unwrap();
    let hf_home = tmp.path().join("hf");
    let repos = HashMap::from([
        // PyTorch weights only: converted into the snapshot on the way.
        (
            "strata-test/opt-tiny-bin".to_owned(),
            fixtures().join("pytorch/bf16"),
        ),
        // Safetensors and a tokenizer: text prompts work from the download.
        (
            "strata-test/opt-tiny-tokenizer".to_owned(),
            fixtures().join("tokenizer"),
        ),
    ]);
    let hub = Hub::serve(repos);
    let online = |cmd: &mut Command| {
        cmd.env("HF_HOME", &hf_home)
            .env("HF_ENDPOINT", hub.endpoint())
            .env("HF_TOKEN", "hf_test_token");
    };

    let mut cmd = strata();
    online(cmd.args(["generate", "--model", "strata-test/opt-tiny-bin"]));
    assert_hf_tokens(&mut cmd, "bf16");
    let snapshot = hf_home
        .join("hub/models--strata-test--opt-tiny-bin/snapshots")
        .join(COMMIT);
    assert!(snapshot.join("pytorch_model.bin").exists());
    assert_same_tensors(&snapshot, &fixtures().join("bf16"));
    // The token travels with every request.
    let seen = hub.requests.lock().unwrap().clone();
    assert!(!seen.is_empty());
    assert!(
        seen.iter()
            .all(|(_, auth)| auth.as_deref() == Some("Bearer hf_test_token")),
        "{seen:?}"
    );

    let mut cmd = strata();
    online(cmd.args(["generate", "--model", "strata-test/opt-tiny-tokenizer"]));
    assert_hf_tokens(&mut cmd, "tokenizer");

    // A second run downloads nothing: only the listing is asked for.
    let before = hub.requests.lock().unwrap().len();
    let mut cmd = strata();
    online(cmd.args(["generate", "--model", "strata-test/opt-tiny-bin"]));
    assert_hf_tokens(&mut cmd, "bf16");
    let after: Vec<String> = hub.requests.lock().unwrap()[before..]
        .iter()
        .map(|r| r.0.clone())
        .collect();
    assert!(after.iter().all(|p| p.starts_with("/api/")), "{after:?}");

    // An unknown repository: the Hub's 404, said plainly.
    let mut cmd = strata();
    online(cmd.args([
        "generate",
        "--model",
        "strata-test/nothing",
        "--prompt-ids",
        "2,5",
        "--max-new-tokens",
        "1",
    ]));
    let out = run(&mut cmd);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("404") && err.contains("strata-test/nothing"),
        "{err}"
    );
    drop(hub);

    // Unreachable, but cached: the cached copy is used.
    let nowhere = unreachable_endpoint();
    let mut cmd = strata();
    cmd.env("HF_HOME", &hf_home).env("HF_ENDPOINT", &nowhere);
    cmd.args(["generate", "--model", "strata-test/opt-tiny-bin"]);
    assert_hf_tokens(&mut cmd, "bf16");

    // Unreachable and not cached: an error naming the model, the endpoint and what to do.
    let out = run(strata()
        .env("HF_HOME", tmp.path().join("empty-cache"))
        .env("HF_ENDPOINT", &nowhere)
        .args([
            "generate",
            "--model",
            "strata-test/opt-tiny-bin",
            "--prompt-ids",
            "2,5",
            "--max-new-tokens",
            "1",
        ]));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "strata-test/opt-tiny-bin",
        nowhere.as_str(),
        "unreachable",
        "HF_ENDPOINT",
        "--model DIR",
    ] {
        assert!(err.contains(needle), "missing `{needle}` in: {err}");
    }
    // HF_HUB_OFFLINE with nothing cached says so.
    let out = run(strata()
        .env("HF_HOME", tmp.path().join("empty-cache"))
        .env("HF_HUB_OFFLINE", "1")
        .args([
            "generate",
            "--model",
            "strata-test/opt-tiny-bin",
            "--prompt-ids",
            "2,5",
            "--max-new-tokens",
            "1",
        ]));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("HF_HUB_OFFLINE"), "{err}");
}
