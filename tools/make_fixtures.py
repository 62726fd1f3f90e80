#!/usr/bin/env python3
"""Build strata's reference fixtures: tiny random OPT checkpoints and what Hugging Face generates from them.

Regenerate every fixture (from the repository root):

    python3 -m venv .venv && .venv/bin/pip install -r tools/requirements.txt
    .venv/bin/python tools/make_fixtures.py            # writes tests/fixtures/<name>/ for every fixture
    .venv/bin/python tools/make_fixtures.py f16 bf16   # only the named fixtures

Everything runs on the CPU in about ten seconds and is deterministic: each fixture's weights come from a fixed seed
(the first seed at or after the fixture's base seed whose greedy steps all have a clear top-1 over top-2 logit gap, so
tests are not decided by rounding, and whose generated tokens vary; moderate-64, made for lossy compression, asks
for a wide gap at step 0 instead of varied tokens). Each fixture is checked before it is kept: the
batched, left-padded generate() against one unpadded forward pass per sequence, against a float64 numpy forward pass
written from OPT's formulas, and the files read back against the config. The contract of the files written is
tests/fixtures/README.md.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import safetensors
import tokenizers
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import OPTConfig, OPTForCausalLM

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"

PAD, BOS, EOS = 1, 2, 2
# Scales of the random weights (see build_model).
DEFAULT_GAIN = 2.0
GAINS = {"out_proj": 5.0, "fc2": 5.0}
EMBED_STD = 1.0
POS_STD = 1.0
# Seeds are tried from a fixture's base seed upwards until every step's top-1 minus top-2 logit gap reaches the
# fixture's min_gap and at most MAX_REPEAT of the generated tokens repeat the token before them (so a runtime that
# ignored its KV cache and echoed the last token could not pass).
MAX_REPEAT = 0.35
SEED_TRIES = 200
# The "moderate" weights (see build_model): Hugging Face's init (zero biases, unit layer norms) with linear weights of
# std gain / sqrt(fan_in): gain 1 for q/k/v_proj and fc1 (what std 0.02 gives at fan-in 2500, about opt-2.7b's
# width: soft attention, no block amplifies an error), MODERATE_OUT_GAIN for out_proj and fc2.
MODERATE_OUT_GAIN = 3.0

# Text the fixture tokenizer is trained on (written for this project).
TOKENIZER_CORPUS = """\
The quick brown fox jumps over the lazy dog. Hello world, hello again, and hello to everyone reading this line.
A small model reads a prompt one token at a time and writes the next token after it, again and again.
Weights that do not fit on the graphics card wait in main memory or on the disk until the layer that needs them runs.
The cache of keys and values grows with every generated token; the scheduler moves it between the devices it owns.
Offloading trades bandwidth for capacity: a large batch hides the cost of moving the weights of each layer once.
There were three foxes in the wood, and the brown one was the quickest of them all, though not the wisest.
Numbers like 125, 350 and 2048 appear in configuration files; so do names such as hidden size and vocabulary.
She said: "Read the layer norm, add the residual, then apply the feed-forward block with its two linear maps."
We tested the tokenizer on short sentences, long sentences, punctuation (commas, dots; colons!) and spaces.
The quick brown fox came back the next day, and the lazy dog was still asleep in the warm afternoon sun.
"""


@dataclass
class Fixture:
    """One fixture: an OPT config, how it is stored, and the prompts it is run on."""

    name: str
    description: str
    config: dict
    base_seed: int
    prompts: list[list[int]] | None = None  # token ids with BOS; None for tokenizer fixtures
    texts: list[str] | None = None  # prompt texts (tokenizer fixtures)
    max_new_tokens: int = 8
    store_dtype: torch.dtype = torch.float32
    max_shard_size: str | None = None
    tokenizer_files: str | None = None  # "json" (tokenizer.json) or "vocab-merges" (vocab.json + merges.txt)
    min_gap: float = 0.1  # wider for f16 / bf16, where a runtime's arithmetic may differ more from the reference
    weights: str = "large"  # "large" (every fixture but one) or "moderate" (see build_model)
    first_gap: float = 0.0  # smallest step-0 top-1 minus top-2 logit gap per sequence
    max_repeat: float = MAX_REPEAT  # largest share of generated tokens equal to the one before
    max_bytes: int = 256 * 1024  # each fixture directory stays under this (the repository carries them all)


def base_config(**overrides) -> dict:
    """The tiny OPT every fixture starts from: 2 layers, hidden 32, 4 heads, vocab 256, 64 positions."""
    cfg = {
        "vocab_size": 256,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "ffn_dim": 128,
        "num_attention_heads": 4,
        "max_position_embeddings": 64,
        "word_embed_proj_dim": 32,
        "do_layer_norm_before": True,
        "activation_function": "relu",
        "enable_bias": True,
        "layer_norm_elementwise_affine": True,
        "_remove_final_layer_norm": False,
        "pad_token_id": PAD,
        "bos_token_id": BOS,
        "eos_token_id": EOS,
        "tie_word_embeddings": True,
        "dropout": 0.0,
        "attention_dropout": 0.0,
    }
    cfg.update(overrides)
    return cfg


def prompt(rng: np.random.Generator, length: int, vocab: int) -> list[int]:
    """A prompt of `length` ids: BOS, then ids drawn from 4.. (so no special token inside the prompt)."""
    return [BOS] + [int(t) for t in rng.integers(4, vocab, size=length - 1)]


def fixtures(tokenizer_vocab: int) -> list[Fixture]:
    rng = np.random.default_rng(20261128)
    p = lambda *lengths: [prompt(rng, n, 256) for n in lengths]
    common = (
        "Random tiny OPT (seeded; linear weights std gain/sqrt(fan_in), embeddings std 1, random biases and "
        "layer-norm affine parameters, so every parameter matters, top-1/top-2 logit gaps are wide and generated "
        "tokens vary); greedy generation by transformers on the CPU with left padding "
        "(pad id 1) and an attention mask, EOS ignored."
    )
    return [
        Fixture(
            name="pre-ln-relu",
            description="Pre-LN OPT, ReLU, biases, layer-norm affine, float32, LM head tied to embed_tokens. " + common,
            config=base_config(),
            base_seed=1000,
            prompts=p(5, 3, 7),
            max_new_tokens=8,
        ),
        Fixture(
            name="post-ln-proj",
            description=(
                "Post-LN OPT like opt-350m (do_layer_norm_before=false, so no final layer norm), "
                "word_embed_proj_dim 16 != hidden 32 (project_in / project_out), ffn_dim 48 != 4*hidden, float32, "
                "untied LM head "
                "(lm_head.weight [vocab, 16] stored in the file). " + common
            ),
            config=base_config(
                do_layer_norm_before=False, word_embed_proj_dim=16, ffn_dim=48, tie_word_embeddings=False
            ),
            base_seed=2000,
            prompts=p(4, 6),
            max_new_tokens=8,
        ),
        Fixture(
            name="gelu-no-bias",
            description=(
                "Galactica-style OPT: exact (erf) GELU, no biases in linear layers (enable_bias=false), layer norms "
                "without weight or bias (layer_norm_elementwise_affine=false), ffn_dim 64, float32, tied head, saved "
                "sharded (model-0000N-of-0000M.safetensors + model.safetensors.index.json). " + common
            ),
            config=base_config(
                activation_function="gelu", enable_bias=False, layer_norm_elementwise_affine=False, ffn_dim=64
            ),
            base_seed=3000,
            prompts=p(6, 2),
            max_new_tokens=7,
            max_shard_size="40KB",
        ),
        Fixture(
            name="f16",
            description=(
                "Pre-LN ReLU OPT stored in float16. The reference is transformers run in float32 on the "
                "float16-rounded weights (the f16 checkpoint loaded, then .float()), because strata computes with "
                "f32 accumulation over f16 storage: expect small differences, not bit equality. " + common
            ),
            config=base_config(),
            base_seed=4000,
            prompts=p(3, 6),
            max_new_tokens=8,
            store_dtype=torch.float16,
            min_gap=0.25,
        ),
        Fixture(
            name="bf16",
            description=(
                "Pre-LN ReLU OPT stored in bfloat16. The reference is transformers run in float32 on the "
                "bfloat16-rounded weights (the bf16 checkpoint loaded, then .float()), because strata computes with "
                "f32 accumulation over bf16 storage: expect small differences, not bit equality. " + common
            ),
            config=base_config(),
            base_seed=5000,
            prompts=p(6),
            max_new_tokens=8,
            store_dtype=torch.bfloat16,
            min_gap=0.25,
        ),
        Fixture(
            name="tokenizer",
            description=(
                "Pre-LN ReLU OPT, float32, whose vocabulary is the byte-level BPE tokenizer in tokenizer.json "
                "(trained for this fixture on the corpus in tools/make_fixtures.py, base alphabet = the corpus's "
                "characters; ids 0 <s>, 1 <pad>, 2 </s>, 3 <unk> as in OPT). Its post-processor "
                "prepends </s> (id 2) like OPT's tokenizer, so prompt_ids == encode(text, add_special_tokens=true) "
                "== [2] + encode(text, add_special_tokens=false). generated_text decodes generated_ids with special "
                "tokens skipped. " + common
            ),
            config=base_config(vocab_size=tokenizer_vocab, ffn_dim=64),
            base_seed=6000,
            texts=["Hello", "The quick brown fox"],
            max_new_tokens=8,
            tokenizer_files="json",
        ),
        Fixture(
            name="tokenizer-vocab-merges",
            description=(
                "The same model and tokenizer as the `tokenizer` fixture, but the tokenizer is stored the way "
                "released OPT checkpoints ship it: vocab.json + merges.txt (byte-level BPE, no tokenizer.json). Such a "
                "tokenizer does not add BOS itself: prompt_ids == [2] + encode(text). generated_text decodes "
                "generated_ids with special tokens skipped. " + common
            ),
            config=base_config(vocab_size=tokenizer_vocab, ffn_dim=64),
            base_seed=6000,
            texts=["Hello", "The quick brown fox"],
            max_new_tokens=8,
            tokenizer_files="vocab-merges",
        ),
        Fixture(
            name="moderate-64",
            description=(
                "Pre-LN ReLU OPT at a width the default 4-bit groups fit without padding: hidden 64, one head of "
                "head_dim 64 (OPT's head_dim), ffn 256 (4 * hidden, as OPT), stored in float16 as released OPT "
                "checkpoints are. Its weights are not made large like the other fixtures' (whose nearly hard "
                "attention and out_proj / fc2 gain 5 turn a 4-bit weight error into a different model): "
                "Hugging Face's init (zero biases, unit layer norms) with linear weights of std gain / sqrt(fan_in), "
                "gain 1 for q/k/v_proj and fc1 (std 0.02 at fan-in 2500, about opt-2.7b's width: soft attention) "
                f"and {MODERATE_OUT_GAIN} for out_proj and fc2 (so the blocks outweigh the embedding; with gain 1 "
                "there too the tied head mostly predicts the last prompt token again), token and position "
                "embeddings std 1 (logits of std ~8); the seed is the first whose step-0 top-1 leads its runner-up "
                "by 3 for every sequence. Meant for measuring lossy compression (tests/compress_e2e.rs), which uses "
                "steps 0..2; the greedy continuations settle on one token. Greedy generation by transformers on "
                "the CPU with left padding (pad id 1) and an attention mask, EOS ignored."
            ),
            config=base_config(hidden_size=64, num_attention_heads=1, ffn_dim=256, word_embed_proj_dim=64),
            base_seed=7000,
            prompts=p(5, 9, 12),
            max_new_tokens=8,
            store_dtype=torch.float16,
            min_gap=0.25,
            weights="moderate",
            first_gap=3.0,
            max_repeat=1.0,  # its continuations settle on one token; the compression tests use steps 0..2 only
            max_bytes=330 * 1024,
        ),
    ]


# --------------------------------------------------------------------------------------------------------------------
# Tokenizer


def train_tokenizer(vocab_size: int = 320) -> Tokenizer:
    """A GPT-2 / OPT style byte-level BPE with OPT's special tokens at ids 0..3, deterministic for a fixed corpus.

    Unlike GPT-2's, its base alphabet is only the characters of the corpus (not all 256 byte symbols), so every token
    decodes to printable text and generated_text is readable rather than a run of U+FFFD for partial UTF-8 bytes;
    a character outside the corpus encodes as <unk> (3).
    """
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        show_progress=False,
    )
    tok.train_from_iterator(TOKENIZER_CORPUS.splitlines(), trainer=trainer)
    assert tok.get_vocab_size() == vocab_size, f"tokenizer has {tok.get_vocab_size()} tokens, wanted {vocab_size}"
    for i, special in enumerate(["<s>", "<pad>", "</s>", "<unk>"]):
        assert tok.token_to_id(special) == i, f"special token {special} is not id {i}"
    # OPT's converted tokenizer prepends BOS (</s>, id 2) to every sequence.
    tok.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A </s> $B", special_tokens=[("</s>", BOS)]
    )
    return tok


# --------------------------------------------------------------------------------------------------------------------
# Reference quantiser: strata's packed format (runtime/src/compress/mod.rs), quantised and decoded in float32 exactly
# as strata's CPU code does, so that strata's compressed runs can be held to a reference rather than to floors.

# The setting every fixture's quantised reference uses: strata's default (--compress-weight / --compress-cache).
QUANT_BITS, QUANT_GROUP = 4, 64


def _f16_bits(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).view(np.uint16)


def _no_subnormal(h: np.ndarray, negative: np.ndarray, up: bool) -> np.ndarray:
    """strata never stores an fp16 subnormal: it becomes 0 or -2^-14 rounding down, 2^-14 rounding up."""
    bits = h.view(np.uint16)
    sub = ((bits & 0x7C00) == 0) & ((bits & 0x03FF) != 0)
    if up:
        fix = np.full_like(bits, 0x0400)
    else:
        fix = np.where(negative, np.uint16(0x8400), np.uint16(0)).astype(np.uint16)
    return np.where(sub, fix, bits).view(np.float16)


def f16_down(x: np.ndarray) -> np.ndarray:
    """The largest normal (or zero) fp16 not above each float32 `x` (strata's `f16_down`)."""
    h = x.astype(np.float16)  # round to nearest even, as the half crate's from_f32
    h = np.where(h.astype(np.float32) > x, np.nextafter(h, np.float16(-np.inf)), h)
    return _no_subnormal(h, h.view(np.uint16) >= 0x8000, up=False)


def f16_up(x: np.ndarray) -> np.ndarray:
    """The smallest normal fp16 not below each positive float32 `x` (strata's `f16_up`)."""
    h = x.astype(np.float16)
    h = np.where(h.astype(np.float32) < x, np.nextafter(h, np.float16(np.inf)), h)
    return _no_subnormal(h, np.zeros(h.shape, bool), up=True)


def quantize_dequantize(x: np.ndarray, bits: int, group: int) -> np.ndarray:
    """A row-major float32 [rows, cols] tensor through strata's packed format and back: groups of `group` consecutive
    elements along cols (the last one short when cols is not a multiple), min rounded down and step = (max - min) /
    (2^bits - 1) rounded up to fp16, q = round-half-away((x - min) / step) clamped to [0, 2^bits - 1], decoded as
    q * step + min, every operation in float32 as in runtime/src/compress/mod.rs."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    assert x.ndim == 2 and np.isfinite(x).all() and np.abs(x).max(initial=0) <= 65504.0
    levels = np.float32(2**bits - 1)
    out = np.empty_like(x)
    for start in range(0, x.shape[1], group):
        g = x[:, start : start + group]
        mn, mx = g.min(axis=1, keepdims=True), g.max(axis=1, keepdims=True)
        min_f = f16_down(mn).astype(np.float32)
        rng = mx - min_f
        with np.errstate(divide="ignore", invalid="ignore"):
            step = np.where(rng > 0, f16_up(np.where(rng > 0, rng / levels, np.float32(1))), np.float16(0))
            step_f = step.astype(np.float32)
            y = np.where(step_f > 0, (g - min_f) / step_f, np.float32(0)).astype(np.float32)
        whole = np.trunc(y)
        q = np.clip(whole + (y - whole >= np.float32(0.5)), 0, levels).astype(np.float32)  # half away from zero
        out[:, start : start + group] = q * step_f + min_f
    return out


def quantize_dequantize_torch(t: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """`quantize_dequantize` over the last axis of a torch tensor of any rank (a cache's rows of head_dim)."""
    flat = t.detach().float().reshape(-1, t.shape[-1]).numpy()
    return torch.from_numpy(quantize_dequantize(flat, bits, group)).reshape(t.shape).to(t.dtype)


def quantized_model(model: OPTForCausalLM, bits: int, group: int) -> OPTForCausalLM:
    """A float32 copy of `model` whose 2-D tensors (what strata packs: linear weights, token and position embeddings,
    an untied head, project_in/out) are replaced by their trip through the packed format; biases and layer norms
    unchanged."""
    q = copy.deepcopy(model).float().eval()
    with torch.no_grad():
        for _, param in q.named_parameters():  # a tied head is the embedding's parameter: quantised once
            if param.ndim == 2:
                param.copy_(quantize_dequantize_torch(param, bits, group))
    return q


@torch.no_grad()
def greedy_quantized_cache(
    model: OPTForCausalLM, prompts: list[list[int]], n: int, cache: tuple[int, int] | None
) -> tuple[list[list[int]], np.ndarray]:
    """Greedy generation on the left-padded batch, step by step, with the KV cache as strata's packed cache holds it
    when `cache` = (bits, group) is given: the prefill attends over its own unquantised keys and values, which are
    then packed (rows of head_dim); every decode step's new keys and values are packed before it attends over them.
    Returns (generated ids, float32 logits [n, batch, vocab])."""
    ids, mask = left_pad(prompts)
    heads = model.config.num_attention_heads
    rt = (lambda t: quantize_dequantize_torch(t, *cache)) if cache else None

    def pack_rows(_module, _inputs, output):  # k_proj / v_proj output [batch, tokens, hidden] -> rows of head_dim
        b, t, h = output.shape
        return rt(output.reshape(b, t, heads, h // heads)).reshape(b, t, h)

    out = model(input_ids=ids, attention_mask=mask, use_cache=True)
    past = out.past_key_values
    steps = [out.logits[:, -1].float()]
    hooks = []
    if rt:
        for layer in past.layers:
            layer.keys, layer.values = rt(layer.keys), rt(layer.values)
        for block in model.model.decoder.layers:
            hooks += [block.self_attn.k_proj.register_forward_hook(pack_rows)]
            hooks += [block.self_attn.v_proj.register_forward_hook(pack_rows)]
    try:
        for _ in range(1, n):
            nxt = steps[-1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
            out = model(input_ids=nxt, attention_mask=mask, past_key_values=past, use_cache=True)
            past = out.past_key_values
            steps.append(out.logits[:, -1].float())
    finally:
        for h in hooks:
            h.remove()
    logits = torch.stack(steps).numpy().astype(np.float32)
    return logits.argmax(-1).T.tolist(), logits


def write_quantized_reference(fx: Fixture, out: Path, ref_model: OPTForCausalLM, prompts: list[list[int]]) -> dict:
    """The reference quantiser's run (weights and cache at strata's default 4 bits, groups of 64), written as
    logits-q4g64.npy; the entry reference.json records it under."""
    # The step-by-step loop, unquantised, is generate() itself.
    generated, logits = greedy_quantized_cache(ref_model, prompts, fx.max_new_tokens, None)
    plain, plain_logits = generate(ref_model, prompts, fx.max_new_tokens)
    loop_diff = float(np.abs(logits - plain_logits).max())
    assert generated == plain and loop_diff < 1e-4, f"{fx.name}: the step-by-step loop differs by {loop_diff}"
    q_model = quantized_model(ref_model, QUANT_BITS, QUANT_GROUP)
    generated, logits = greedy_quantized_cache(q_model, prompts, fx.max_new_tokens, (QUANT_BITS, QUANT_GROUP))
    name = f"logits-q{QUANT_BITS}g{QUANT_GROUP}.npy"
    np.save(out / name, logits)
    return {
        "what": "the reference quantiser: every 2-D tensor (linear weights, token and position embeddings, untied "
        "head, project_in/out) and every KV cache row (head_dim) quantised and decoded in float32 exactly as strata's "
        "packed format (runtime/src/compress/mod.rs); the prefill attends over unquantised keys and values, each "
        "decode step over packed ones, its own included; greedy on its own tokens, transformers in float32",
        "bits": QUANT_BITS,
        "group_size": QUANT_GROUP,
        "weight": True,
        "cache": True,
        "generated_ids": generated,
        "logits": name,
        "min_top2_gap": round(min_top2_gap(logits), 6),
    }


# --------------------------------------------------------------------------------------------------------------------
# Model


def build_model(cfg: dict, seed: int, weights: str = "large") -> OPTForCausalLM:
    """A random float32 OPT in which every parameter matters and whose greedy choices are far from ties.

    Hugging Face's init (std 0.02 matrices, zero biases, unit layer norms) gives logits of std ~0.1 with near-tied
    top-1 / top-2 (gaps of 1e-3), and a residual stream dominated by the token embedding, so that the tied head
    mostly predicts the last token again. So every parameter is redrawn under `seed`: [out, in] linear weights with
    std gain / sqrt(in) (gain 2, and 5 for out_proj and fc2 so the attention and MLP outputs outweigh the
    embedding; attention is far from uniform), token embeddings and an untied LM head with std 1 (logits of std ~5),
    positions with std 1, biases with std 0.2, layer-norm weights 1 + 0.2 * N(0, 1) and biases 0.2 * N(0, 1).

    Those gains make the models very sensitive to small weight errors (attention is nearly hard, and out_proj / fc2
    amplify whatever the attention picked), which is what lossy compression produces. weights="moderate" is Hugging
    Face's init instead (zero biases, unit layer norms) with linear weights of std gain / sqrt(in): gain 1 for
    q/k/v_proj and fc1, MODERATE_OUT_GAIN for out_proj and fc2; token and position embeddings std 1.
    """
    torch.manual_seed(seed)
    model = OPTForCausalLM(OPTConfig(**cfg, attn_implementation="eager")).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn_like(param)
            if weights == "moderate":
                if "layer_norm" in name:
                    param.copy_(torch.ones_like(param) if name.endswith(".weight") else torch.zeros_like(param))
                elif name.endswith(".bias"):
                    param.zero_()
                elif "embed" in name or name.startswith("lm_head"):
                    param.copy_(noise)
                else:
                    gain = MODERATE_OUT_GAIN if "out_proj" in name or "fc2" in name else 1.0
                    param.copy_(gain / param.shape[1] ** 0.5 * noise)
                continue
            if "layer_norm" in name:
                param.copy_(1.0 + 0.2 * noise if name.endswith(".weight") else 0.2 * noise)
            elif name.endswith(".bias"):
                param.copy_(0.2 * noise)
            elif "embed_tokens" in name or name.startswith("lm_head"):
                param.copy_(EMBED_STD * noise)
            elif "embed_positions" in name:
                param.copy_(POS_STD * noise)
            else:
                gain = next((g for key, g in GAINS.items() if key in name), DEFAULT_GAIN)
                param.copy_(gain / param.shape[1] ** 0.5 * noise)
    return model


def left_pad(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    return ids, mask


@torch.no_grad()
def generate(model: OPTForCausalLM, prompts: list[list[int]], n: int) -> tuple[list[list[int]], np.ndarray]:
    """Greedy batched generation with left padding: (new ids per sequence, float32 logits [n, batch, vocab])."""
    ids, mask = left_pad(prompts)
    model.generation_config.eos_token_id = None
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        eos_token_id=None,
        pad_token_id=PAD,
    )
    new = out.sequences[:, ids.shape[1] :]
    assert new.shape[1] == n, f"generated {new.shape[1]} tokens, expected {n}"
    logits = torch.stack(out.logits).float().numpy().astype(np.float32)  # [n, batch, vocab]
    generated = new.tolist()
    # Greedy with EOS ignored: every token must be the argmax of its step's raw logits (no processor interfered).
    assert (logits.argmax(-1).T == np.array(generated)).all(), "generated ids are not the argmax of the logits"
    return generated, logits


@torch.no_grad()
def recompute(model: OPTForCausalLM, prompts: list[list[int]], generated: list[list[int]]) -> np.ndarray:
    """The same logits from one unpadded, uncached forward pass per sequence over prompt + generated[:-1]."""
    steps = []
    for p, g in zip(prompts, generated):
        seq = torch.tensor([p + g[:-1]])
        logits = model(input_ids=seq, attention_mask=torch.ones_like(seq)).logits[0]
        steps.append(logits[len(p) - 1 :].float().numpy())  # [n, vocab]
    return np.stack(steps, axis=1)  # [n, batch, vocab]


def repeat_fraction(generated: list[list[int]]) -> float:
    pairs = [(a, b) for seq in generated for a, b in itertools.pairwise(seq)]
    return sum(a == b for a, b in pairs) / len(pairs)


def numpy_logits(cfg: dict, w: dict[str, np.ndarray], ids: list[int]) -> np.ndarray:
    """OPT's forward pass for one unpadded sequence, written from the formulas (not from transformers), in float64.

    Used to confirm that the reference means what the contract says: positions start at row 2, q is scaled by
    head_dim^-0.5 after its bias, causal attention, pre- or post-LN, project_in / project_out, tied or untied head.
    """
    h, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    hd = h // nh
    get = lambda name: w.get("model.decoder." + name)

    def linear(x, name):
        y = x @ get(name + ".weight").T
        b = get(name + ".bias")
        return y if b is None else y + b

    def norm(x, name):
        x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
        wt, b = get(name + ".weight"), get(name + ".bias")
        return x if wt is None else x * wt + b

    def act(x):
        if cfg["activation_function"] == "relu":
            return np.maximum(x, 0.0)
        return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))

    t = len(ids)
    x = get("embed_tokens.weight")[ids]
    if get("project_in.weight") is not None:
        x = x @ get("project_in.weight").T
    x = x + get("embed_positions.weight")[np.arange(t) + 2]
    causal = np.triu(np.full((t, t), -np.inf), 1)
    pre = cfg["do_layer_norm_before"]
    for i in range(cfg["num_hidden_layers"]):
        L = f"layers.{i}."
        r = x
        y = norm(x, L + "self_attn_layer_norm") if pre else x
        q = linear(y, L + "self_attn.q_proj") * hd**-0.5
        k, v = linear(y, L + "self_attn.k_proj"), linear(y, L + "self_attn.v_proj")
        heads = []
        for j in range(nh):
            sl = slice(j * hd, (j + 1) * hd)
            s = q[:, sl] @ k[:, sl].T + causal
            s = np.exp(s - s.max(-1, keepdims=True))
            heads.append((s / s.sum(-1, keepdims=True)) @ v[:, sl])
        x = r + linear(np.concatenate(heads, -1), L + "self_attn.out_proj")
        if not pre:
            x = norm(x, L + "self_attn_layer_norm")
        r = x
        y = norm(x, L + "final_layer_norm") if pre else x
        x = r + linear(act(linear(y, L + "fc1")), L + "fc2")
        if not pre:
            x = norm(x, L + "final_layer_norm")
    if pre and not cfg["_remove_final_layer_norm"]:
        x = norm(x, "final_layer_norm")
    if get("project_out.weight") is not None:
        x = x @ get("project_out.weight").T
    head = w.get("lm_head.weight", get("embed_tokens.weight"))
    return x @ head.T


def load_tensors(out: Path) -> dict[str, np.ndarray]:
    tensors = {}
    for shard in sorted(out.glob("*.safetensors")):
        with safetensors.safe_open(shard, framework="pt") as st:
            for name in st.keys():  # noqa: SIM118 (safe_open is not iterable)
                tensors[name] = st.get_tensor(name).double().numpy()
    return tensors


def min_top2_gap(logits: np.ndarray) -> float:
    top2 = np.sort(logits, axis=-1)[..., -2:]
    return float((top2[..., 1] - top2[..., 0]).min())


def save_checkpoint(model: OPTForCausalLM, fx: Fixture, out: Path) -> OPTForCausalLM:
    """Writes config.json + safetensors in the fixture's dtype; returns the float32 model the reference runs."""
    stored = model.to(fx.store_dtype)
    kwargs = {"safe_serialization": True}
    if fx.max_shard_size:
        kwargs["max_shard_size"] = fx.max_shard_size
    stored.save_pretrained(out, **kwargs)
    gen_cfg = out / "generation_config.json"
    if gen_cfg.exists():  # not part of the contract; strata reads config.json only
        gen_cfg.unlink()
    # Reload what was written, so the reference runs on exactly the stored (rounded) weights, in float32.
    loaded = OPTForCausalLM.from_pretrained(out, attn_implementation="eager").float().eval()
    return loaded


CONFIG_KEYS = [
    "vocab_size", "hidden_size", "num_hidden_layers", "ffn_dim", "num_attention_heads", "max_position_embeddings",
    "word_embed_proj_dim", "do_layer_norm_before", "activation_function", "enable_bias",
    "layer_norm_elementwise_affine", "_remove_final_layer_norm", "pad_token_id", "bos_token_id", "eos_token_id",
    "tie_word_embeddings",
]  # fmt: skip


def expected_tensors(cfg: dict) -> dict[str, list[int]]:
    """Every tensor the checkpoint must hold, with its [out, in] shape, derived from the config alone."""
    h, p, f, v = cfg["hidden_size"], cfg["word_embed_proj_dim"], cfg["ffn_dim"], cfg["vocab_size"]
    t = {
        "model.decoder.embed_tokens.weight": [v, p],
        "model.decoder.embed_positions.weight": [cfg["max_position_embeddings"] + 2, h],
    }
    if p != h:
        t["model.decoder.project_in.weight"] = [h, p]
        t["model.decoder.project_out.weight"] = [p, h]
    affine = cfg["layer_norm_elementwise_affine"]

    def norm(name: str) -> None:
        if affine:
            t[f"{name}.weight"] = [h]
            t[f"{name}.bias"] = [h]

    if cfg["do_layer_norm_before"] and not cfg["_remove_final_layer_norm"]:
        norm("model.decoder.final_layer_norm")
    for i in range(cfg["num_hidden_layers"]):
        pre = f"model.decoder.layers.{i}"
        for name, shape in [("self_attn.q_proj", [h, h]), ("self_attn.k_proj", [h, h]),
                            ("self_attn.v_proj", [h, h]), ("self_attn.out_proj", [h, h]),
                            ("fc1", [f, h]), ("fc2", [h, f])]:  # fmt: skip
            t[f"{pre}.{name}.weight"] = shape
            if cfg["enable_bias"]:
                t[f"{pre}.{name}.bias"] = shape[:1]
        norm(f"{pre}.self_attn_layer_norm")
        norm(f"{pre}.final_layer_norm")
    if not cfg["tie_word_embeddings"]:
        t["lm_head.weight"] = [v, p]
    return t


def verify(fx: Fixture, out: Path) -> None:
    """Reads back what was written and checks it against the fixture's intent (config fields, tensors, shards)."""
    cfg = json.loads((out / "config.json").read_text())
    for key in CONFIG_KEYS:
        assert cfg.get(key) == fx.config[key], (
            f"{fx.name}: config.json {key}={cfg.get(key)!r}, wanted {fx.config[key]!r}"
        )
    dtype_name = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[fx.store_dtype]
    assert cfg.get("dtype", cfg.get("torch_dtype")) == dtype_name, f"{fx.name}: config.json dtype is not {dtype_name}"
    st_dtype = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}[fx.store_dtype]

    shards = sorted(out.glob("*.safetensors"))
    found: dict[str, list[int]] = {}
    for shard in shards:
        with safetensors.safe_open(shard, framework="pt") as st:
            for name in st.keys():  # noqa: SIM118 (safe_open is not iterable)
                sl = st.get_slice(name)
                assert sl.get_dtype() == st_dtype, f"{fx.name}: {name} is {sl.get_dtype()}, wanted {st_dtype}"
                assert name not in found, f"{fx.name}: {name} stored twice"
                found[name] = list(sl.get_shape())
    assert found == expected_tensors(fx.config), f"{fx.name}: tensors differ from the config's: {sorted(found)}"
    if fx.max_shard_size:
        assert len(shards) >= 2, f"{fx.name}: wanted several shards, got {len(shards)}"
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(found), f"{fx.name}: index weight_map does not list every tensor"
        for name, shard in index["weight_map"].items():
            with safetensors.safe_open(out / shard, framework="pt") as st:
                names = st.keys()
                assert name in names, f"{fx.name}: index puts {name} in {shard}, which lacks it"
    else:
        assert [s.name for s in shards] == ["model.safetensors"], f"{fx.name}: unexpected files {shards}"

    ref = json.loads((out / "reference.json").read_text())
    logits = np.load(out / ref["logits"])
    n, batch = ref["max_new_tokens"], len(ref["prompt_ids"])
    assert logits.dtype == np.float32 and logits.shape == (n, batch, fx.config["vocab_size"]), f"{fx.name}: logits"
    assert all(len(g) == n for g in ref["generated_ids"]) and all(p[0] == BOS for p in ref["prompt_ids"])
    quantized = np.load(out / ref["quantized"]["logits"])
    assert quantized.dtype == np.float32 and quantized.shape == logits.shape, f"{fx.name}: quantised logits"
    size = sum(f.stat().st_size for f in out.iterdir())
    assert size < fx.max_bytes, f"{fx.name}: {size} bytes on disk, over the {fx.max_bytes} budget"


def make(fx: Fixture, tok: Tokenizer) -> dict:
    out = FIXTURES / fx.name
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)

    if fx.texts is not None:
        plain = [tok.encode(t, add_special_tokens=False).ids for t in fx.texts]
        prompts = [[BOS] + ids for ids in plain]
        if fx.tokenizer_files == "json":
            with_special = [tok.encode(t).ids for t in fx.texts]
            assert with_special == prompts, "tokenizer.json does not prepend BOS as OPT's does"
    else:
        prompts = fx.prompts
    assert len({len(p) for p in prompts}) == len(prompts) or len(prompts) == 1, "prompt lengths must differ"

    # Pick the first seed whose reference (on the stored weights) has no near-tie anywhere.
    for seed in range(fx.base_seed, fx.base_seed + SEED_TRIES):
        model = build_model(fx.config, seed, fx.weights)
        for f in out.iterdir():
            f.unlink()
        ref_model = save_checkpoint(model, fx, out)
        generated, logits = generate(ref_model, prompts, fx.max_new_tokens)
        gap = min_top2_gap(logits)
        first = min_top2_gap(logits[:1])
        if gap >= fx.min_gap and first >= fx.first_gap and repeat_fraction(generated) <= fx.max_repeat:
            break
    else:
        raise SystemExit(
            f"{fx.name}: no seed in {SEED_TRIES} tries has a top-2 gap >= {fx.min_gap} (step 0: >= {fx.first_gap}) "
            "and few repeats"
        )

    return write_reference(fx, tok, out, ref_model, prompts, generated, logits, seed)


def write_reference(
    fx: Fixture,
    tok: Tokenizer | None,
    out: Path,
    ref_model: OPTForCausalLM,
    prompts: list[list[int]],
    generated: list[list[int]],
    logits: np.ndarray,
    seed: int,
    extra: dict | None = None,
) -> dict:
    """Checks the reference two independent ways, writes logits.npy, the reference quantiser's logits and
    reference.json next to the checkpoint in `out`, and verifies what was written."""
    gap = min_top2_gap(logits)
    # Independent check: unpadded single-sequence forward passes give the same logits as the batched padded run.
    single = recompute(ref_model, prompts, generated)
    step0_diff = float(np.abs(single[0] - logits[0]).max())
    all_diff = float(np.abs(single - logits).max())
    assert step0_diff < 1e-4 and all_diff < 1e-4, f"{fx.name}: batched vs single logits differ by {all_diff}"
    # Second independent check: a float64 numpy forward pass written from the formulas, on the stored weights.
    tensors = load_tensors(out)
    np_diff = 0.0
    for b, (p, g) in enumerate(zip(prompts, generated)):
        ref_steps = numpy_logits(fx.config, tensors, p + g[:-1])[len(p) - 1 :]
        np_diff = max(np_diff, float(np.abs(ref_steps - logits[:, b]).max()))
    assert np_diff < 1e-3, f"{fx.name}: the numpy forward pass differs from transformers by {np_diff}"

    np.save(out / "logits.npy", logits)
    ref = {
        "description": fx.description,
        "dtype": {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[fx.store_dtype],
        "prompt_ids": prompts,
        "max_new_tokens": fx.max_new_tokens,
        "generated_ids": generated,
        "logits": "logits.npy",
        "min_top2_gap": round(gap, 6),
        "repeat_fraction": round(repeat_fraction(generated), 4),
        "seed": seed,
        "check": {
            "what": "max |logit| difference between the batched left-padded generate() and one unpadded forward "
            "pass per sequence over prompt + generated tokens",
            "step0_max_abs_diff": step0_diff,
            "all_steps_max_abs_diff": all_diff,
            "numpy_float64_forward_max_abs_diff": np_diff,
        },
        "hf_versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "safetensors": safetensors.__version__,
        },
    }
    if fx.texts is not None:
        ref["prompts"] = fx.texts
        ref["generated_text"] = [tok.decode(g, skip_special_tokens=True) for g in generated]
        if fx.tokenizer_files == "json":
            tok.save(str(out / "tokenizer.json"))
        else:
            tok.model.save(str(out))  # vocab.json + merges.txt
    if extra:
        ref.update(extra)
    ref["quantized"] = write_quantized_reference(fx, out, ref_model, prompts)
    (out / "reference.json").write_text(json.dumps(ref, indent=1) + "\n")
    verify(fx, out)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(
        f"{fx.name:23s} seed {seed}  min_top2_gap {gap:.4f}  repeats {repeat_fraction(generated):.2f}  "
        f"diffs: step0 {step0_diff:.1e} all {all_diff:.1e} numpy {np_diff:.1e}  {size / 1024:.1f} KiB"
    )
    return ref


def main(argv: list[str]) -> None:
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(1)  # deterministic reductions, and a shared machine
    torch.use_deterministic_algorithms(True)
    tok = train_tokenizer()
    all_fx = fixtures(tok.get_vocab_size())
    names = {fx.name for fx in all_fx}
    unknown = [a for a in argv if a not in names]
    if unknown:
        raise SystemExit(f"unknown fixture(s) {unknown}; known: {sorted(names)}")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, tokenizer vocab {tok.get_vocab_size()}")
    for fx in all_fx:
        if not argv or fx.name in argv:
            make(fx, tok)


if __name__ == "__main__":
    main(sys.argv[1:])
