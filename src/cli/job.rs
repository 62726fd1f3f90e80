//! `strata generate --input prompts.jsonl --output results.jsonl`: a batch job that survives interruption.
//!
//! Each input line is one prompt (`id`, `prompt` or `prompt_ids`, optional `max_new_tokens`, `temperature`, `top_p`,
//! `top_k`, `repetition_penalty`, `seed`, `stop`). The prompts not yet in the output run in blocks of the policy's
//! `gpu_batch_size x num_gpu_batches`, sorted by length so a block wastes little padding; each finished block is
//! appended to the output as one write, flushed and synced, while a signal waits ([`super::process::uninterrupted`]).
//! Rerunning the same command resumes: ids already in the output are skipped, and a torn last line (a run killed
//! mid-write) is cut off first. Each sequence's draws depend only on its own seed, so a result never depends on
//! which block it ran in.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context};
use serde_json::Value;
use strata_runtime::config::OptConfig;
use strata_runtime::generate::{Generator, Sampling, TokenChoice};
use strata_runtime::tokenizer::Tokenizer;

use super::complete::{run_block, Control, Request};
use super::process::{pause_point, uninterrupted};
use super::sampling_args::{choice_of, SamplingSettings};
use super::JSON_SCHEMA_VERSION;

/// One input line, resolved.
#[derive(Clone, Debug)]
pub struct JobItem {
    /// The line's `id`, as given (string or number).
    pub id: Value,
    /// What to run.
    pub request: Request,
}

/// A job: the items still to run, and how many the input had.
#[derive(Debug)]
pub struct Job {
    /// Items not yet in the output, in input order.
    pub pending: Vec<JobItem>,
    /// Lines in the input.
    pub total: usize,
}

impl Job {
    /// The longest pending prompt and the most tokens any pending item generates.
    pub fn workload(&self) -> (usize, usize) {
        let longest = self
            .pending
            .iter()
            .map(|i| i.request.prompt_ids.len())
            .max()
            .unwrap_or(0);
        let gen = self
            .pending
            .iter()
            .map(|i| i.request.max_new_tokens)
            .max()
            .unwrap_or(0);
        (longest, gen)
    }
}

/// The key an id is deduplicated by: its JSON text (so `1` and `"1"` are different ids).
fn id_key(id: &Value) -> String {
    id.to_string()
}

/// A sequence's seed when its line gives none: the job's seed mixed with the id (FNV-1a), so equal prompts under
/// different ids draw differently and a rerun draws the same.
fn item_seed(job_seed: u64, id: &Value) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ job_seed;
    for byte in id_key(id).bytes() {
        h ^= u64::from(byte);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h & 0xffff_ffff
}

/// Reads the output file (when it exists) and returns the ids already done. A last line without its newline, or
/// that does not parse, is a write cut short: the file is truncated to the lines before it. Any other bad line is
/// an error (the file is not strata's, or was edited).
pub fn done_ids(output: &Path) -> anyhow::Result<HashSet<String>> {
    let mut done = HashSet::new();
    let Ok(file) = File::open(output) else {
        return Ok(done);
    };
    let mut reader = BufReader::new(file);
    let mut good_end = 0u64;
    let mut line = String::new();
    let mut number = 0;
    loop {
        line.clear();
        let read = reader
            .read_line(&mut line)
            .with_context(|| format!("reading {}", output.display()))?;
        if read == 0 {
            break;
        }
        number += 1;
        let complete = line.ends_with('\n');
        let parsed = serde_json::from_str::<Value>(line.trim_end())
            .ok()
            .and_then(|v| v.get("id").cloned());
        match parsed {
            Some(id) if complete => {
                if !done.insert(id_key(&id)) {
                    bail!(
                        "{} line {number}: id {id} appears twice; the file was not written by this job",
                        output.display()
                    );
                }
                good_end += read as u64;
            }
            _ => {
                // A write cut short leaves a last line without its newline; anything else is not strata's.
                let mut rest = String::new();
                reader.read_line(&mut rest)?;
                if complete || !rest.is_empty() {
                    bail!(
                        "{} line {number} is not a result line; refusing to resume into a file strata did not \
                         write (move it away or fix the line)",
                        output.display()
                    );
                }
                eprintln!(
                    "strata: {} ended in a torn line (an interrupted write): removing it",
                    output.display()
                );
                let file = OpenOptions::new()
                    .write(true)
                    .open(output)
                    .with_context(|| format!("repairing {}", output.display()))?;
                file.set_len(good_end)?;
                file.sync_all()?;
                break;
            }
        }
    }
    Ok(done)
}

/// A field of a line as `T`, or a clear error naming the line and field.
fn field<T: serde::de::DeserializeOwned>(
    v: &Value,
    name: &str,
    line: usize,
) -> anyhow::Result<Option<T>> {
    match v.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => serde_json::from_value(x.clone())
            .map(Some)
            .with_context(|| format!("line {line}: field `{name}`: {x}")),
    }
}

/// Reads and checks every input line (before the GPU opens); items whose id is in `done` are left out.
pub fn read_job(
    input: &Path,
    done: &HashSet<String>,
    config: &OptConfig,
    tokenizer: Option<&Tokenizer>,
    default_max_new_tokens: Option<usize>,
    settings: &SamplingSettings,
) -> anyhow::Result<Job> {
    let text = std::fs::read_to_string(input)
        .with_context(|| format!("reading --input {}", input.display()))?;
    let mut pending = Vec::new();
    let mut seen = HashSet::new();
    let mut total = 0;
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        if raw.trim().is_empty() {
            continue;
        }
        total += 1;
        let item = parse_line(
            raw,
            line,
            config,
            tokenizer,
            default_max_new_tokens,
            settings,
        )
        .with_context(|| format!("--input {}", input.display()))?;
        if !seen.insert(id_key(&item.id)) {
            bail!(
                "--input {} line {line}: id {} appears twice (ids name results, so each must be unique)",
                input.display(),
                item.id
            );
        }
        if !done.contains(&id_key(&item.id)) {
            pending.push(item);
        }
    }
    Ok(Job { pending, total })
}

fn parse_line(
    raw: &str,
    line: usize,
    config: &OptConfig,
    tokenizer: Option<&Tokenizer>,
    default_max_new_tokens: Option<usize>,
    settings: &SamplingSettings,
) -> anyhow::Result<JobItem> {
    let v: Value = serde_json::from_str(raw).with_context(|| format!("line {line} is not JSON"))?;
    if !v.is_object() {
        bail!("line {line}: expected a JSON object with `id` and `prompt` or `prompt_ids`");
    }
    let id = match v.get("id") {
        Some(id @ (Value::String(_) | Value::Number(_))) => id.clone(),
        _ => bail!("line {line}: `id` (a string or a number) is required"),
    };
    let prompt_ids = match (
        field::<String>(&v, "prompt", line)?,
        field::<Vec<u32>>(&v, "prompt_ids", line)?,
    ) {
        (Some(_), Some(_)) => bail!("line {line}: give `prompt` or `prompt_ids`, not both"),
        (Some(text), None) => tokenizer
            .with_context(|| {
                format!("line {line}: `prompt` needs the model's tokenizer; use `prompt_ids`")
            })?
            .encode(&text)?,
        (None, Some(ids)) => ids,
        (None, None) => bail!("line {line}: `prompt` or `prompt_ids` is required"),
    };
    let max_new_tokens = field::<usize>(&v, "max_new_tokens", line)?
        .or(default_max_new_tokens)
        .with_context(|| format!("line {line}: no `max_new_tokens` and no --max-new-tokens"))?;
    super::checks::prompt_ids(config, std::slice::from_ref(&prompt_ids))
        .with_context(|| format!("line {line}"))?;
    super::checks::new_tokens(config, prompt_ids.len(), max_new_tokens)
        .with_context(|| format!("line {line}"))?;
    let base = settings.choice;
    let (base_t, base_p, base_k) = match base.sampling {
        Sampling::Greedy => (None, None, None),
        Sampling::Sample {
            temperature, top_p, ..
        } => (Some(temperature), Some(top_p), Some(base.top_k)),
    };
    let seed = field::<u64>(&v, "seed", line)?.unwrap_or_else(|| item_seed(settings.seed, &id));
    let temperature = field::<f32>(&v, "temperature", line)?.or(base_t);
    let top_p = field::<f32>(&v, "top_p", line)?.or(base_p);
    let top_k = field::<usize>(&v, "top_k", line)?.or(base_k);
    let penalty = field::<f32>(&v, "repetition_penalty", line)?.or(Some(base.repetition_penalty));
    let choice: TokenChoice = choice_of(
        temperature,
        top_p,
        top_k,
        penalty,
        seed,
        ["temperature", "top_p", "top_k", "repetition_penalty"],
    )
    .with_context(|| format!("line {line}"))?;
    let stop = match v.get("stop") {
        None | Some(Value::Null) => settings.stop.clone(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(_) => field::<Vec<String>>(&v, "stop", line)?.unwrap_or_default(),
    };
    if !stop.is_empty() && tokenizer.is_none() {
        bail!("line {line}: `stop` needs the model's tokenizer");
    }
    if stop.iter().any(String::is_empty) {
        bail!("line {line}: an empty stop string");
    }
    Ok(JobItem {
        id,
        request: Request {
            prompt_ids,
            max_new_tokens,
            choice,
            stop,
        },
    })
}

/// Runs the pending items in blocks of `block` prompts, appending each finished block to `output`.
pub fn run_job(
    generator: &Generator,
    tokenizer: Option<&Tokenizer>,
    job: Job,
    block: usize,
    ignore_eos: bool,
    output: &Path,
) -> anyhow::Result<()> {
    let done_before = job.total - job.pending.len();
    let mut pending = job.pending;
    // Shortest first; equal lengths keep input order.
    pending.sort_by_key(|i| i.request.prompt_ids.len());
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(output)
        .with_context(|| format!("opening --output {}", output.display()))?;
    if done_before > 0 {
        eprintln!(
            "strata: resuming: {done_before} of {} prompts already in {}",
            job.total,
            output.display()
        );
    }
    let bar = indicatif::ProgressBar::new(job.total as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} prompts  {msg}  eta {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_position(done_before as u64);
    bar.reset_eta();
    let started = Instant::now();
    let mut tokens = 0usize;
    for chunk in pending.chunks(block.max(1)) {
        let requests: Vec<Request> = chunk.iter().map(|i| i.request.clone()).collect();
        let out = run_block(
            generator,
            tokenizer,
            &requests,
            ignore_eos,
            false,
            false,
            &mut |_, _, _| Control::default(),
        )?;
        let mut lines = String::new();
        for (item, completion) in chunk.iter().zip(&out.completions) {
            let seed = match item.request.choice.sampling {
                Sampling::Sample { seed, .. } => Some(seed),
                Sampling::Greedy => None,
            };
            let mut object = serde_json::json!({
                "schema_version": JSON_SCHEMA_VERSION,
                "id": item.id,
                "prompt_ids": item.request.prompt_ids,
                "generated_ids": completion.ids,
                "finish_reason": completion.finish.as_str(),
                "seed": seed,
            });
            if let Some(text) = &completion.text {
                object["text"] = serde_json::json!(text);
            }
            lines += &object.to_string();
            lines.push('\n');
            tokens += completion.ids.len();
        }
        uninterrupted(|| -> std::io::Result<()> {
            file.write_all(lines.as_bytes())?;
            file.flush()?;
            file.sync_data()
        })
        .with_context(|| format!("writing to --output {}", output.display()))?;
        bar.inc(chunk.len() as u64);
        bar.set_message(format!(
            "{:.1} tokens/s",
            tokens as f64 / started.elapsed().as_secs_f64().max(1e-9)
        ));
        pause_point("job-block");
    }
    bar.finish_and_clear();
    eprintln!(
        "strata: {} prompts done ({} this run, {tokens} tokens in {:.1} s), results in {}",
        job.total,
        pending.len(),
        started.elapsed().as_secs_f64(),
        output.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_torn_last_line_is_cut_and_other_bad_lines_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        std::fs::write(&path, "{\"id\":1}\n{\"id\":\"a\"}\n{\"id\":3,\"gen").unwrap();
        let done = done_ids(&path).unwrap();
        assert_eq!(done.len(), 2);
        assert!(done.contains("1") && done.contains("\"a\""));
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "{\"id\":1}\n{\"id\":\"a\"}\n"
        );
        // A complete JSON line without its newline is torn too: the write may have stopped right before it.
        std::fs::write(&path, "{\"id\":1}\n{\"id\":2}").unwrap();
        assert_eq!(done_ids(&path).unwrap().len(), 1);
        std::fs::write(&path, "{\"id\":1}\nnot json\n{\"id\":2}\n").unwrap();
        assert!(done_ids(&path).unwrap_err().to_string().contains("line 2"));
        assert!(done_ids(&dir.path().join("missing")).unwrap().is_empty());
    }

    #[test]
    fn seeds_depend_on_the_id_only() {
        assert_eq!(
            item_seed(7, &Value::from("a")),
            item_seed(7, &Value::from("a"))
        );
        assert_ne!(
            item_seed(7, &Value::from("a")),
            item_seed(7, &Value::from("b"))
        );
        assert_ne!(
            item_seed(7, &Value::from(1)),
            item_seed(7, &Value::from("1"))
        );
    }
}
