#!/usr/bin/env python3
"""Train strata's `trained` fixtures: a small pre-LN OPT learned from scratch on English text, with its own byte-level
BPE tokenizer, so that lossy compression can be measured on a model that predicts text (random fixtures amplify
4-bit errors whatever the implementation; see tests/fixtures/README.md).

    .venv/bin/python tools/train_fixture.py          # about 15 minutes on one CPU core; writes tests/fixtures/trained{,-f16}/
    .venv/bin/python tools/train_fixture.py --reuse  # the same fixtures from target/train_fixture.pt, without training

The corpus is the documentation topics that CPython's standard library ships as `pydoc_data.topics` (the text
`help("...")` prints: the language reference's chapters on statements, expressions, data model, ...), English prose
about Python with its code examples; the script checks its sha256 (CPython 3.11.7's), so a rebuild trains on the same
text. Every twentieth paragraph of each topic is held out to measure the model on text it never saw.

Deterministic: fixed seeds for the weights, the dropout and the batches, one CPU thread, deterministic algorithms, a
fixed number of steps; with the versions pinned in tools/requirements.txt a rebuild writes the same files. The two
fixtures hold the same trained model, stored in float32 (`trained`) and float16 (`trained-f16`); each has its
references written by tools/make_fixtures.py's machinery (transformers' greedy generation, per-step logits, text,
checks, and the reference quantiser's logits).
"""

from __future__ import annotations

import copy
import hashlib
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pydoc_data.topics
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import OPTConfig, OPTForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402 (the fixtures' shared machinery, next to this file)

CORPUS_SHA256 = "71f2ff5d99bdc1f9c48c5c2353ad138201c5ca1c377e0226857ef8fa89b8bcee"  # CPython 3.11.7's topics
VOCAB = 2048
SEED = 20261204
SEQ = 128  # tokens per training sequence, BOS first: the model's max_position_embeddings
BATCH = 16
STEPS = 800
PEAK_LR = 3e-3
WARMUP = 100
DROPOUT = 0.1  # training only; the saved config has 0 (inference)
# The prompts: the openings of paragraphs, held-out ones (text the model never saw) first, then training ones; the
# first four (of different token lengths) whose step-0 top-1 logit leads its runner-up by MIN_FIRST_GAP and every greedy step's by MIN_GAP in the
# float32 model, so that "the same first token" and the exact comparisons of tests/generate_fixtures.rs (f16
# activations, f16 storage) are not decided by near-ties.
N_PROMPTS = 4
MIN_FIRST_GAP = 1.0
MIN_GAP = 0.25
MAX_NEW_TOKENS = 8

CONFIG = mf.base_config(
    vocab_size=VOCAB,
    hidden_size=128,
    num_hidden_layers=4,
    ffn_dim=512,
    num_attention_heads=2,  # head_dim 64, OPT's
    max_position_embeddings=SEQ,
    word_embed_proj_dim=128,
)


def corpus() -> tuple[list[str], list[str], str]:
    """(each topic's training paragraphs, each topic's held-out paragraphs, sha256 of the whole text), topics sorted
    by name."""
    names = sorted(pydoc_data.topics.topics)
    texts = [pydoc_data.topics.topics[n] for n in names]
    digest = hashlib.sha256("\n\n".join(texts).encode()).hexdigest()
    if digest != CORPUS_SHA256:
        raise SystemExit(
            f"pydoc_data.topics of Python {sys.version.split()[0]} has sha256 {digest}, not CPython 3.11.7's "
            f"{CORPUS_SHA256}: the model would differ from the committed one (run with Python 3.11.7)"
        )
    # Every twentieth paragraph of each topic is held out.
    paragraphs = [t.split("\n\n") for t in texts]
    train = ["\n\n".join(p for i, p in enumerate(ps) if i % 20 != 19) for ps in paragraphs]
    held = ["\n\n".join(p for i, p in enumerate(ps) if i % 20 == 19) for ps in paragraphs]
    return train, [h for h in held if h], digest


def train_tokenizer(texts: list[str]) -> Tokenizer:
    """Byte-level BPE like GPT-2 / OPT (all 256 byte symbols in the base alphabet, so any text encodes), VOCAB ids,
    OPT's special tokens at 0..3, and OPT's post-processor prepending </s> (2)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        min_frequency=2,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    assert tok.get_vocab_size() == VOCAB, f"tokenizer has {tok.get_vocab_size()} tokens, wanted {VOCAB}"
    for i, special in enumerate(["<s>", "<pad>", "</s>", "<unk>"]):
        assert tok.token_to_id(special) == i, f"special token {special} is not id {i}"
    tok.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A </s> $B", special_tokens=[("</s>", mf.BOS)]
    )
    return tok


def stream(tok: Tokenizer, texts: list[str]) -> np.ndarray:
    """Every text's ids after a BOS (OPT separates documents with </s>), concatenated."""
    return np.concatenate([np.array(tok.encode(t).ids, dtype=np.int64) for t in texts])


def unigram_entropy(ids: np.ndarray) -> float:
    """Entropy (nats per token) of the training stream's token frequencies: the loss of the best model that ignores
    context."""
    counts = np.bincount(ids, minlength=VOCAB).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def windows(ids: np.ndarray, starts: np.ndarray) -> torch.Tensor:
    """Sequences of SEQ tokens: BOS, then SEQ - 1 tokens of the stream from each start."""
    rows = [np.concatenate([[mf.BOS], ids[s : s + SEQ - 1]]) for s in starts]
    return torch.from_numpy(np.stack(rows))


@torch.no_grad()
def mean_loss(model: OPTForCausalLM, ids: np.ndarray) -> float:
    """Mean next-token loss (nats) over consecutive windows covering the stream (the first token of each window, a
    BOS, predicts nothing)."""
    model.eval()
    starts = np.arange(0, len(ids) - SEQ + 1, SEQ - 1)
    total, count = 0.0, 0
    for i in range(0, len(starts), 32):
        x = windows(ids, starts[i : i + 32])
        loss = model(input_ids=x, labels=x).loss
        n = x.shape[0] * (SEQ - 1)
        total, count = total + loss.item() * n, count + n
    return total / count


def train(train_ids: np.ndarray) -> tuple[OPTForCausalLM, dict]:
    torch.manual_seed(SEED)
    rng = np.random.default_rng(SEED)
    config = OPTConfig(**{**CONFIG, "dropout": DROPOUT}, attn_implementation="eager")
    model = OPTForCausalLM(config)
    decay = [p for n, p in model.named_parameters() if p.ndim == 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=PEAK_LR,
        betas=(0.9, 0.98),
        foreach=False,
    )

    def lr_at(step: int) -> float:
        if step < WARMUP:
            return PEAK_LR * (step + 1) / WARMUP
        t = (step - WARMUP) / max(1, STEPS - WARMUP)
        return PEAK_LR * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    start, recent = time.time(), []
    for step in range(STEPS):
        model.train()
        x = windows(train_ids, rng.integers(0, len(train_ids) - SEQ + 1, size=BATCH))
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.step()
        recent = (recent + [loss.item()])[-50:]
        if step % 100 == 0 or step == STEPS - 1:
            print(f"step {step:5d}  loss {np.mean(recent):.4f}  {time.time() - start:6.0f} s", flush=True)
    model.eval()
    log = {
        "steps": STEPS,
        "batch": BATCH,
        "sequence_tokens": SEQ,
        "tokens_seen": STEPS * BATCH * SEQ,
        "optimizer": f"AdamW betas (0.9, 0.98), weight decay 0.01 on 2-D tensors, peak lr {PEAK_LR}, {WARMUP} "
        "warm-up steps then cosine to 10%, gradient clip 1.0, dropout 0.1 (training only)",
        "last_50_steps_train_loss": round(float(np.mean(recent)), 4),
    }
    return model, log


def main() -> None:
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    train_texts, held_texts, digest = corpus()
    tok = train_tokenizer(train_texts)
    train_ids, held_ids = stream(tok, train_texts), stream(tok, held_texts)
    entropy = unigram_entropy(train_ids)
    print(f"corpus: {len(train_ids)} training tokens, {len(held_ids)} held out; unigram entropy {entropy:.4f} nats")
    # The trained weights are kept under target/ so that `--reuse` rewrites the fixtures without training again.
    saved = mf.ROOT / "target" / "train_fixture.pt"
    if "--reuse" in sys.argv[1:]:
        state = torch.load(saved)
        model = OPTForCausalLM(OPTConfig(**CONFIG, attn_implementation="eager")).eval()
        model.load_state_dict(state["model"])
        log = {k: v for k, v in state["log"].items() if k != "seconds"}  # wall time is no part of the fixture
    else:
        model, log = train(train_ids)
        saved.parent.mkdir(exist_ok=True)
        torch.save({"model": model.state_dict(), "log": log}, saved)
    model.config.dropout = 0.0
    log.update(
        {
            "corpus": "pydoc_data.topics of CPython 3.11.7's standard library (Python's documentation topics, the "
            "text help() prints), topics sorted by name, every twentieth paragraph held out",
            "corpus_sha256": digest,
            "training_tokens": int(len(train_ids)),
            "held_out_tokens": int(len(held_ids)),
            "unigram_entropy_nats": round(entropy, 4),
            "train_loss_nats": round(mean_loss(model, train_ids), 4),
            "held_out_loss_nats": round(mean_loss(model, held_ids), 4),
        }
    )
    print({k: v for k, v in log.items() if "loss" in k or "entropy" in k})

    variants = [("trained", torch.float32), ("trained-f16", torch.float16)]
    prompts_text: list[str] | None = None
    for name, dtype in variants:
        out = mf.FIXTURES / name
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        stored = "float16" if dtype == torch.float16 else "float32"
        fx = mf.Fixture(
            name=name,
            description=(
                f"A pre-LN OPT trained from scratch (tools/train_fixture.py) on Python's documentation topics "
                f"(pydoc_data.topics of CPython 3.11.7) with its own byte-level BPE tokenizer of {VOCAB} tokens "
                "(tokenizer.json; OPT's special ids: <s> 0, <pad> 1, </s> 2, <unk> 3; </s> prepended as BOS): "
                f"4 layers, hidden 128, 2 heads of head_dim 64, ffn 512, ReLU, tied head, 128 positions, stored in "
                f"{stored}. Training loss {log['train_loss_nats']} nats per token ({log['held_out_loss_nats']} on "
                f"held-out paragraphs) against a unigram entropy of {log['unigram_entropy_nats']}. For measuring lossy "
                "compression on a model that predicts text (tests/compress_e2e.rs). Greedy generation by "
                "transformers on the CPU with left padding (pad id 1) and an attention mask, EOS ignored."
            ),
            config=CONFIG,
            base_seed=SEED,
            texts=[],
            max_new_tokens=MAX_NEW_TOKENS,
            store_dtype=dtype,
            tokenizer_files="json",
            max_bytes=6 * 1024 * 1024,
        )
        ref_model = mf.save_checkpoint(copy_of(model), fx, out)
        if prompts_text is None:  # chosen once, on the float32 model, for both
            prompts_text = choose_prompts(ref_model, tok, candidate_prompts(held_texts + train_texts))
        fx.texts = prompts_text
        prompts = [tok.encode(t).ids for t in prompts_text]
        generated, logits = mf.generate(ref_model, prompts, MAX_NEW_TOKENS)
        mf.write_reference(fx, tok, out, ref_model, prompts, generated, logits, SEED, {"training": log})


def copy_of(model: OPTForCausalLM) -> OPTForCausalLM:
    """save_checkpoint converts the model it is given to the stored dtype: give it a copy."""
    return copy.deepcopy(model)


def candidate_prompts(held_texts: list[str]) -> list[str]:
    """The first 4..9 words (cycling) of each paragraph that opens with a capitalised word and reads as
    prose (letters, spaces and light punctuation), in corpus order."""
    out = []
    for text in held_texts:
        for para in text.split("\n\n"):
            words = " ".join(para.split()).split(" ")
            n = 4 + len(out) % 6
            if len(words) <= n or not words[0][:1].isupper():
                continue
            cand = " ".join(words[:n]).rstrip(",;:")
            if all(c.isalpha() or c in " ,.'-" for c in cand):
                out.append(cand)
    return out


def choose_prompts(model: OPTForCausalLM, tok: Tokenizer, candidates: list[str]) -> list[str]:
    chosen = []
    for text in candidates:
        ids = tok.encode(text).ids
        _, logits = mf.generate(model, [ids], MAX_NEW_TOKENS)
        first, gap = mf.min_top2_gap(logits[:1]), mf.min_top2_gap(logits)
        ok = first >= MIN_FIRST_GAP and gap >= MIN_GAP and all(len(tok.encode(c).ids) != len(ids) for c in chosen)
        print(f"prompt {text!r}: {len(ids)} tokens, top-2 gap step 0 {first:.3f}, all steps {gap:.3f}{' *' * ok}")
        if ok:
            chosen.append(text)
        if len(chosen) == N_PROMPTS:
            return chosen
    raise SystemExit(f"fewer than {N_PROMPTS} candidate prompts have clear greedy steps (see above)")


if __name__ == "__main__":
    main()
