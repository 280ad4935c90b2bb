#!/usr/bin/env python3
"""Reference log-probabilities for pagoda's `logprobs` / `prompt_logprobs` tests.

Independent reference: Hugging Face transformers (PyTorch, CPU, float32 forward), with the
log-softmax taken in float64 over the float32 logits of one full (no-cache) forward pass.

Writes tests/goldens/logprobs.json with, for each model and prompt:
  prompt_logprobs[i]  (i >= 1): the logprob of prompt_ids[i] given prompt_ids[:i], and the
                      top-5 [token_id, logprob] pairs at that position (entry 0 is null:
                      nothing predicts the first token)
  generated[j]:       the model's greedy token j (argmax, KV cache, no EOS stop), its
                      logprob given prompt + generated[:j], and the top-5 pairs there

Models:
  tiny_llama    tests/fixtures/tiny-llama (random float32 safetensors; prompt ids from
                tests/goldens/tiny_llama.json)
  smollm2_q4_1  models/SmolLM2-135M-Instruct.Q4_1.gguf, every tensor dequantized to float32
                by transformers + gguf (prompt ids from tests/goldens/smollm2_q4_1.json)

Usage (environment: tools/reference/README.md):
  .tools/refenv/bin/python tools/reference/make_logprobs.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_goldens import (  # noqa: E402
    DEFAULT_MODEL,
    FIXTURES,
    GOLDENS,
    dump_json,
    env_meta,
    f32_list,
    full_logits,
    greedy_kv,
    sha256,
)

N_GENERATED = 16
TOP = 5


def entry(logprobs_row: torch.Tensor, token: int) -> dict:
    top = logprobs_row.topk(TOP)
    return {
        "token_id": token,
        "logprob": f32_list(logprobs_row[token : token + 1].to(torch.float32))[0],
        "top_ids": [int(i) for i in top.indices],
        "top_logprobs": f32_list(top.values.to(torch.float32)),
    }


@torch.no_grad()
def model_goldens(model, prompt_ids: list[list[int]]) -> list[dict]:
    out = []
    for ids in prompt_ids:
        generated = greedy_kv(model, ids, N_GENERATED)
        seq = ids + generated
        logprobs = torch.log_softmax(full_logits(model, seq).to(torch.float64), dim=-1)
        P = len(ids)
        prompt = [None] + [entry(logprobs[i - 1], ids[i]) for i in range(1, P)]
        gen = [entry(logprobs[P - 1 + j], generated[j]) for j in range(N_GENERATED)]
        argmax = [e["top_ids"][0] for e in gen]
        if argmax != generated:
            print(f"  note: cached greedy vs full-forward argmax differ: {generated} vs {argmax}", file=sys.stderr)
        out.append({"prompt_ids": ids, "prompt_logprobs": prompt, "generated": gen})
    return out


def main() -> int:
    torch.manual_seed(0)
    meta = env_meta()
    meta["generator"] = "tools/reference/make_logprobs.py"
    meta["logprobs"] = (
        "log_softmax in float64 of the float32 logits of one full (no-cache) transformers "
        "forward pass over prompt_ids + the greedy tokens; eager attention, CPU"
    )
    meta["generated"] = f"{N_GENERATED} greedy tokens (argmax with the KV cache, no EOS stop)"
    meta["top"] = f"top {TOP} [token_id, logprob] per position, most likely first"

    tiny_dir = FIXTURES / "tiny-llama"
    tiny = LlamaForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32, attn_implementation="eager").eval()
    tiny_ids = [p["ids"] for p in json.loads((GOLDENS / "tiny_llama.json").read_text())["prompts"]]

    gguf = AutoModelForCausalLM.from_pretrained(
        str(DEFAULT_MODEL.parent), gguf_file=DEFAULT_MODEL.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    gguf_ids = [p["prompt_ids"] for p in json.loads((GOLDENS / "smollm2_q4_1.json").read_text())["prompts"][:3]]

    golden = {
        "meta": meta,
        "models": {
            "tiny_llama": {"path": "tests/fixtures/tiny-llama", "prompts": model_goldens(tiny, tiny_ids)},
            "smollm2_q4_1": {
                "path": f"models/{DEFAULT_MODEL.name}",
                "sha256": sha256(DEFAULT_MODEL),
                "prompts": model_goldens(gguf, gguf_ids),
            },
        },
    }
    dump_json(golden, GOLDENS / "logprobs.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
