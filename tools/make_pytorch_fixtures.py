#!/usr/bin/env python3
"""Write PyTorch-pickle (`pytorch_model*.bin`) copies of three reference fixtures, for `strata convert` and the Hub
download tests (tests/convert_hub.rs).

    .venv/bin/python tools/make_pytorch_fixtures.py     # from the repository root, after tools/make_fixtures.py

Each copy holds the very tensors of tests/fixtures/<name>/model*.safetensors, saved with torch.save the way released
checkpoints ship them, so the converted safetensors must equal the originals byte for byte and generate the
fixture's reference tokens:
- f16: one pytorch_model.bin with `decoder.*` names and no lm_head (as facebook/opt-* .bin files, saved from OPTModel);
- bf16: one pytorch_model.bin with `model.decoder.*` names and `lm_head.weight` tied to the embedding (one shared
  storage, as torch.save writes OPTForCausalLM.state_dict());
- post-ln-proj: float32, its untied lm_head kept, sharded into two files with pytorch_model.bin.index.json.
Only config.json is copied besides the weights; reference.json stays with the original fixture.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
OUT = FIXTURES / "pytorch"


def load(name: str) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted((FIXTURES / name).glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def fresh(name: str) -> Path:
    out = OUT / name
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    shutil.copy(FIXTURES / name / "config.json", out / "config.json")
    return out


def main() -> None:
    # f16: OPTModel's names (no `model.` prefix), no head.
    out = fresh("f16")
    sd = {k.removeprefix("model."): v for k, v in load("f16").items() if k != "lm_head.weight"}
    torch.save(sd, out / "pytorch_model.bin")

    # bf16: OPTForCausalLM's state dict, the head tied to the embedding (the same storage, saved once).
    out = fresh("bf16")
    sd = load("bf16")
    assert "lm_head.weight" not in sd
    sd["lm_head.weight"] = sd["model.decoder.embed_tokens.weight"]
    torch.save(sd, out / "pytorch_model.bin")

    # post-ln-proj: float32 with its own head, two shards and an index.
    out = fresh("post-ln-proj")
    sd = load("post-ln-proj")
    assert "lm_head.weight" in sd
    names = sorted(sd)
    half = len(names) // 2
    weight_map = {}
    total = 0
    for i, part in enumerate([names[:half], names[half:]]):
        file = f"pytorch_model-{i + 1:05d}-of-00002.bin"
        torch.save({k: sd[k] for k in part}, out / file)
        for k in part:
            weight_map[k] = file
            total += sd[k].numel() * sd[k].element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    for d in sorted(OUT.iterdir()):
        size = sum(f.stat().st_size for f in d.iterdir())
        print(f"{d.relative_to(ROOT)}: {size} bytes")


if __name__ == "__main__":
    main()
