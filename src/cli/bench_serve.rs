//! `strata bench serve`: starts `strata serve` (a child process on a free loopback port), sends `--requests`
//! completions from `--clients` concurrent clients, and reports throughput and latency percentiles, with how full
//! the server's blocks were (from its /metrics).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::json;

use super::process::outln;
use super::JSON_SCHEMA_VERSION;

/// Arguments of `strata bench serve`.
#[derive(clap::Args)]
pub struct Args {
    /// Concurrent clients.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Requests in all (spread over the clients).
    #[arg(long, default_value_t = 64)]
    requests: usize,
    /// Prompt tokens per request (token ids, so a dummy model needs no tokenizer).
    #[arg(long, default_value_t = 32)]
    prompt_len: usize,
    /// `max_tokens` per request (greedy, so each request generates exactly this many unless EOS).
    #[arg(long, default_value_t = 16)]
    max_tokens: usize,
    /// Print one JSON document (docs/json.md).
    #[arg(long)]
    json: bool,
    /// Everything after `--` goes to `strata serve` (model, policy, --max-batch, --batch-wait-ms, ...), e.g.
    /// `-- --model opt-125m --dummy --max-batch 8`.
    #[arg(last = true, required = true, value_name = "SERVE_ARGS")]
    serve: Vec<String>,
}

/// One HTTP/1.1 request over a fresh connection: the status and the body.
fn http(addr: &str, method: &str, path: &str, body: &str) -> anyhow::Result<(u16, String)> {
    let mut stream = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(3600)))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("not an HTTP response")?;
    let body = response
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_string());
    Ok((status, body))
}

/// The value of metric `name` in Prometheus text.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.clients == 0 || args.requests == 0 || args.prompt_len == 0 || args.max_tokens == 0 {
        bail!("--clients, --requests, --prompt-len and --max-tokens must be at least 1");
    }
    let exe = std::env::current_exe().context("finding the strata binary")?;
    let mut child = Command::new(exe)
        .arg("serve")
        .args(&args.serve)
        .args(["--host", "127.0.0.1", "--port", "0"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting strata serve")?;
    let stderr = child.stderr.take().context("the server's stderr")?;
    let mut lines = BufReader::new(stderr).lines();
    let mut addr = None;
    for line in lines.by_ref() {
        let line = line?;
        eprintln!("{line}");
        if let Some(at) = line.find("http://") {
            addr = line[at + 7..].split_whitespace().next().map(str::to_string);
            break;
        }
    }
    let Some(addr) = addr else {
        let _ = child.wait();
        bail!("strata serve stopped before listening (its messages are above)");
    };
    // Keep draining the server's stderr so it never blocks on a full pipe.
    let drain = std::thread::spawn(move || lines.map_while(Result::ok).count());
    let result = drive(&args, &addr);
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    let _ = drain.join();
    result
}

fn drive(args: &Args, addr: &str) -> anyhow::Result<()> {
    let (_, models) = http(addr, "GET", "/v1/models", "")?;
    let models: serde_json::Value = serde_json::from_str(&models)?;
    let model = models["data"][0]["id"].as_str().unwrap_or("?").to_string();
    let started = Instant::now();
    let outcomes: Vec<anyhow::Result<(f64, usize)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..args.clients)
            .map(|client| {
                scope.spawn(move || {
                    let mut done = Vec::new();
                    for r in (client..args.requests).step_by(args.clients) {
                        // A distinct prompt per request: ids from 4 (after OPT's special tokens), BOS first.
                        let prompt: Vec<u32> = std::iter::once(2)
                            .chain((1..args.prompt_len).map(|j| 4 + ((r * 7919 + j * 31) % 200) as u32))
                            .collect();
                        let body = json!({"prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0});
                        let sent = Instant::now();
                        let outcome = http(addr, "POST", "/v1/completions", &body.to_string()).and_then(
                            |(status, text)| {
                                if status != 200 {
                                    bail!("HTTP {status}: {text}");
                                }
                                let v: serde_json::Value = serde_json::from_str(&text)?;
                                let tokens = v["usage"]["completion_tokens"].as_u64().unwrap_or(0);
                                Ok((sent.elapsed().as_secs_f64(), tokens as usize))
                            },
                        );
                        done.push(outcome);
                    }
                    done
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    });
    let wall = started.elapsed().as_secs_f64();
    let mut latencies = Vec::new();
    let mut tokens = 0;
    for outcome in outcomes {
        let (seconds, n) = outcome?;
        latencies.push(seconds);
        tokens += n;
    }
    latencies.sort_by(f64::total_cmp);
    let (_, metrics) = http(addr, "GET", "/metrics", "")?;
    let blocks = metric(&metrics, "strata_blocks_total");
    let sequences = metric(&metrics, "strata_block_sequences_total");
    let capacity = metric(&metrics, "strata_block_capacity_sequences");
    let p = |q| percentile(&latencies, q);
    if args.json {
        let object = json!({
            "schema_version": JSON_SCHEMA_VERSION,
            "model": model,
            "clients": args.clients,
            "requests": args.requests,
            "prompt_len": args.prompt_len,
            "max_tokens": args.max_tokens,
            "wall_s": wall,
            "generated_tokens": tokens,
            "throughput_tok_s": tokens as f64 / wall,
            "requests_per_s": args.requests as f64 / wall,
            "latency_s": {"p50": p(50.0), "p90": p(90.0), "p99": p(99.0), "max": p(100.0)},
            "blocks": blocks,
            "mean_block_sequences": if blocks > 0.0 { sequences / blocks } else { 0.0 },
            "block_capacity": capacity,
        });
        outln!("{object}");
    } else {
        outln!(
            "{model}: {} requests from {} clients, prompt {} + {} tokens, in {wall:.2} s",
            args.requests,
            args.clients,
            args.prompt_len,
            args.max_tokens
        );
        outln!(
            "throughput: {:.1} tokens/s, {:.2} requests/s",
            tokens as f64 / wall,
            args.requests as f64 / wall
        );
        outln!(
            "latency: p50 {:.3} s, p90 {:.3} s, p99 {:.3} s, max {:.3} s",
            p(50.0),
            p(90.0),
            p(99.0),
            p(100.0)
        );
        outln!(
            "blocks: {blocks} of {:.1} sequences on average (capacity {capacity})",
            if blocks > 0.0 {
                sequences / blocks
            } else {
                0.0
            }
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 5.0);
        assert_eq!(percentile(&v, 90.0), 9.0);
        assert_eq!(percentile(&v, 99.0), 10.0);
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
    }
}
