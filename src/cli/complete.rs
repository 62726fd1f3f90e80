//! One block of completion requests through a [`Generator`]: each request with its own length, token choice and stop
//! strings, text streamed as it is produced. `generate`, its batch jobs and `serve` all run requests through here.

use strata_runtime::generate::{
    FinishReason, GenerateOptions, Generator, Sampling, StepTokens, TokenChoice,
};
use strata_runtime::tokenizer::Tokenizer;

/// One prompt to complete.
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    /// The prompt's token ids.
    pub prompt_ids: Vec<u32>,
    /// Tokens to generate at most.
    pub max_new_tokens: usize,
    /// How tokens are chosen.
    pub choice: TokenChoice,
    /// The sequence ends when its text contains one of these; the text ends before it.
    pub stop: Vec<String>,
}

/// What a request produced.
#[derive(Clone, Debug, PartialEq)]
pub struct Completion {
    /// Generated ids (ending with EOS, or with the token that completed a stop string).
    pub ids: Vec<u32>,
    /// The text of `ids` (cut before a stop string), when there is a tokenizer.
    pub text: Option<String>,
    /// Why it stopped.
    pub finish: FinishReason,
}

/// A block's completions and the time of each step.
#[derive(Debug)]
pub struct BlockOutput {
    /// In request order.
    pub completions: Vec<Completion>,
    /// Seconds of each step (0: prefill).
    pub step_seconds: Vec<f64>,
    /// With `record_logits`: float32 `[steps, requests, vocab]` (see [`strata_runtime::generate::GenerateOutput`]).
    pub logits: Option<Vec<f32>>,
}

/// What one sequence gained in a step.
#[derive(Clone, Debug, PartialEq)]
pub struct Delta {
    /// The new token.
    pub id: u32,
    /// The text that became final with it (may be empty: an incomplete character or a possible stop string).
    pub text: String,
    /// Set when the sequence ended at this step.
    pub finish: Option<FinishReason>,
}

/// How the callback of [`run_block`] answers: which sequences to end now (their clients left).
#[derive(Debug, Default)]
pub struct Control {
    /// Sequences to end with [`FinishReason::Cancelled`].
    pub cancel: Vec<usize>,
}

/// The callback of [`run_block`]: `(step, seconds, each sequence's delta)`.
pub type OnStep<'a> = dyn FnMut(usize, f64, &[Option<Delta>]) -> Control + 'a;

/// Where one sequence's text stands: the text printed so far is final, the rest is held back until no stop string
/// can start in it and no character is cut.
#[derive(Debug, Default)]
struct TextState {
    /// Bytes of the decoded text already handed out.
    emitted: usize,
    /// The text at its stop string, once found.
    stopped: Option<String>,
}

/// The byte index of the earliest stop string in `text`, if any.
fn find_stop(text: &str, stop: &[String]) -> Option<usize> {
    stop.iter().filter_map(|s| text.find(s.as_str())).min()
}

/// How many bytes at the end of `text` may be the start of a stop string (so must not be printed yet).
fn held_for_stop(text: &str, stop: &[String]) -> usize {
    let mut held = 0;
    for s in stop {
        for (cut, _) in s.char_indices().skip(1) {
            if text.ends_with(&s[..cut]) {
                held = held.max(cut);
            }
        }
    }
    held
}

/// Whether a request needs the host's token choice when the block runs on the GPU's shared sampler.
fn needs_host(choice: &TokenChoice) -> bool {
    choice.top_k != 0 || choice.repetition_penalty != 1.0
}

/// Runs `requests` as one block. `shared_sampler`: when every request has the same choice that the GPU's sampler can
/// make (no top-k, no penalty), draws are keyed by the row as `generate` always did; otherwise (and always for jobs
/// and the server) each sequence's draws depend only on its own seed and step, so a sequence's output does not depend
/// on its block. `on_step(step, seconds, deltas)` sees each sequence's new token and final text (None: finished
/// before).
pub fn run_block(
    generator: &Generator,
    tokenizer: Option<&Tokenizer>,
    requests: &[Request],
    ignore_eos: bool,
    shared_sampler: bool,
    record_logits: bool,
    on_step: &mut OnStep<'_>,
) -> anyhow::Result<BlockOutput> {
    let max_new_tokens = requests.iter().map(|r| r.max_new_tokens).max().unwrap_or(0);
    let prompts: Vec<Vec<u32>> = requests.iter().map(|r| r.prompt_ids.clone()).collect();
    let first = requests.first().map_or(TokenChoice::GREEDY, |r| r.choice);
    let uniform = requests.iter().all(|r| r.choice == first) && !needs_host(&first);
    let (sampling, choices): (Sampling, Vec<TokenChoice>) = if shared_sampler && uniform {
        (first.sampling, Vec::new())
    } else {
        (
            Sampling::Greedy,
            requests.iter().map(|r| r.choice).collect(),
        )
    };
    if requests.iter().any(|r| !r.stop.is_empty()) && tokenizer.is_none() {
        anyhow::bail!(
            "stop strings need the model's tokenizer (a model directory with tokenizer.json)"
        );
    }
    let options = GenerateOptions {
        max_new_tokens,
        sampling,
        ignore_eos,
        record_logits,
    };
    let mut texts: Vec<TextState> = requests.iter().map(|_| TextState::default()).collect();
    let mut ids: Vec<Vec<u32>> = vec![Vec::new(); requests.len()];
    let mut failure: Option<anyhow::Error> = None;
    let mut on_tokens = |step: &mut StepTokens<'_>| {
        let mut deltas: Vec<Option<Delta>> = vec![None; requests.len()];
        for (b, token) in step.tokens.iter().enumerate() {
            let Some(id) = *token else { continue };
            let request = &requests[b];
            if ids[b].len() >= request.max_new_tokens {
                // A request for no tokens still rides along in the block's prefill: nothing of it is kept.
                step.finish(b, FinishReason::Length);
                continue;
            }
            ids[b].push(id);
            if step.finished(b).is_none() && ids[b].len() >= request.max_new_tokens {
                step.finish(b, FinishReason::Length);
            }
            let mut text = String::new();
            if let Some(tokenizer) = tokenizer {
                match decode_delta(tokenizer, &ids[b], request, &mut texts[b], step.finished(b)) {
                    Ok((delta, stopped)) => {
                        text = delta;
                        if stopped {
                            step.finish(b, FinishReason::Stop);
                        }
                    }
                    Err(e) => {
                        failure.get_or_insert(e);
                        step.finish(b, FinishReason::Cancelled);
                    }
                }
            }
            deltas[b] = Some(Delta {
                id,
                text,
                finish: step.finished(b),
            });
        }
        let control = on_step(step.step, step.seconds, &deltas);
        for b in control.cancel {
            step.finish(b, FinishReason::Cancelled);
        }
    };
    let output = generator.generate_streaming(&prompts, &options, &choices, &mut on_tokens)?;
    if let Some(e) = failure {
        return Err(e);
    }
    let completions = output
        .generated_ids
        .into_iter()
        .zip(output.finish_reasons)
        .zip(texts)
        .zip(requests)
        .map(|(((mut ids, finish), state), request)| {
            ids.truncate(request.max_new_tokens);
            let finish = if request.max_new_tokens == 0 {
                FinishReason::Length
            } else {
                finish
            };
            let text = match tokenizer {
                None => None,
                Some(t) => Some(match state.stopped {
                    Some(text) => text,
                    None => t.decode(&ids, true)?,
                }),
            };
            Ok(Completion { ids, text, finish })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(BlockOutput {
        completions,
        step_seconds: output.step_seconds,
        logits: output.logits,
    })
}

/// The text that became final after the newest token of `ids`, and whether a stop string ended the sequence.
/// `finished`: the sequence ends at this token anyway (everything left is final).
fn decode_delta(
    tokenizer: &Tokenizer,
    ids: &[u32],
    request: &Request,
    state: &mut TextState,
    finished: Option<FinishReason>,
) -> anyhow::Result<(String, bool)> {
    let text = tokenizer.decode(ids, true)?;
    if let Some(at) = find_stop(&text, &request.stop) {
        let kept = text[..at].to_string();
        let delta = kept.get(state.emitted..).unwrap_or_default().to_string();
        state.emitted = kept.len();
        state.stopped = Some(kept);
        return Ok((delta, true));
    }
    let end = if finished.is_some() {
        text.len()
    } else if text.ends_with('\u{FFFD}') {
        // An incomplete UTF-8 character: wait for the token that completes it.
        state.emitted
    } else {
        text.len() - held_for_stop(&text, &request.stop)
    };
    // A later token may change how earlier bytes decode (rare with byte-level BPE); never step backwards.
    let end = end.max(state.emitted);
    let delta = text.get(state.emitted..end).unwrap_or_default().to_string();
    state.emitted = end;
    Ok((delta, false))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_strings_are_found_and_their_prefixes_held() {
        let stop = vec!["\n\n".to_string(), "END".to_string()];
        assert_eq!(find_stop("a\n\nbEND", &stop), Some(1));
        assert_eq!(find_stop("abc", &stop), None);
        assert_eq!(held_for_stop("abc\n", &stop), 1);
        assert_eq!(held_for_stop("abcEN", &stop), 2);
        assert_eq!(held_for_stop("abc", &stop), 0);
    }
}
