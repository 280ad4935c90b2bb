#!/usr/bin/env python3
"""Optional second opinion: checks the committed SmolLM2 goldens against llama.cpp
(llama-cpp-python, which compiles llama.cpp from its PyPI sdist).

  python tools/reference/crosscheck_llama_cpp.py [--model models/SmolLM2-135M-Instruct.Q4_1.gguf]

Tokenizer: every case of tests/goldens/smollm2_tokenizer.json is tokenized by llama.cpp
(add_bos=False, parse_special=True) and detokenized; must agree exactly.
Model: llama.cpp computes with the quantized weights (Q4_1 x Q8_1 dot products), not with
dequantized f32 like the transformers reference, so logits differ slightly. We report the
top-1 agreement over the teacher-forced positions and the logit differences at the last
prompt position. Exits non-zero on any tokenizer mismatch or if top-1 agreement where the
reference margin is >= 0.5 is not 100 %.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import llama_cpp.llama_cpp as llama_cpp_c
import numpy as np
from llama_cpp import Llama

# llama.cpp built with GGML_NATIVE on a CPU that reports AMX repacks Q4_1 weights for its AMX
# kernels, which segfault on this (virtualised) machine. Turn the extra (repacking) buffer types
# off: Llama() has no argument for it, so patch the defaults it starts from.
_default_model_params = llama_cpp_c.llama_model_default_params


def _model_params_without_repack():
    p = _default_model_params()
    p.use_extra_bufts = False
    return p


llama_cpp_c.llama_model_default_params = _model_params_without_repack

ROOT = Path(__file__).resolve().parents[2]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf")
    args = ap.parse_args()
    tg = json.loads((ROOT / "tests/goldens/smollm2_tokenizer.json").read_text())
    mg = json.loads((ROOT / "tests/goldens/smollm2_q4_1.json").read_text())

    llm = Llama(model_path=str(args.model), n_ctx=512, logits_all=True, n_threads=2, verbose=False, seed=0)
    bad = 0

    # --- tokenizer
    for c in tg["cases"]:
        got = llm.tokenize(c["text"].encode("utf-8"), add_bos=False, special=True)
        if got != c["ids"]:
            bad += 1
            print(f"TOKENIZER MISMATCH {c['text']!r}\n  golden    {c['ids']}\n  llama.cpp {got}")
        dec = llm.detokenize(c["ids"], special=True).decode("utf-8", errors="replace")
        if dec != c["decoded"]:
            bad += 1
            print(f"DETOKENIZE MISMATCH {c['text']!r}: {dec!r} vs {c['decoded']!r}")
    for c in tg["chat_template"]["cases"]:
        got = llm.tokenize(c["rendered"].encode("utf-8"), add_bos=False, special=True)
        if got != c["ids"]:
            bad += 1
            print(f"CHAT IDS MISMATCH {c['rendered']!r}")
    print(f"tokenizer: {len(tg['cases'])} cases + {len(tg['chat_template']['cases'])} chat renderings, {bad} mismatches")

    # --- model
    agree = total = 0
    agree_confident = total_confident = 0
    worst = 0.0
    for p in mg["prompts"]:
        seq = p["prompt_ids"] + p["forced_ids"]
        llm.reset()
        llm.eval(seq)
        scores = np.asarray(llm.scores[: len(seq)], dtype=np.float32)
        P = len(p["prompt_ids"])
        rows = scores[P - 1 : P - 1 + len(p["forced_ids"])]
        am = rows.argmax(-1)
        for i, (a, t, m) in enumerate(zip(am, p["top1"], p["top1_margin"])):
            total += 1
            agree += int(a == t)
            if m >= 0.5:
                total_confident += 1
                agree_confident += int(a == t)
            elif a != t:
                pass
        last = scores[P - 1]
        top5 = p["last_prompt_top5"]
        diff = max(abs(float(last[i]) - float(v)) for i, v in zip(top5["ids"], top5["logits"]))
        worst = max(worst, diff)
        l5 = [int(i) for i in np.argsort(-last)[:5]]
        print(f"  [{p['name']}] top1 agree {int((am == np.array(p['top1'])).sum())}/{len(am)}; "
              f"last-prompt top5 golden {top5['ids']} llama.cpp {l5}; max |dlogit| on golden top5 {diff:.4f}")
    print(f"model: top1 agreement {agree}/{total}; where golden margin >= 0.5: {agree_confident}/{total_confident}; "
          f"worst |dlogit| on last-prompt top5: {worst:.4f}")
    if agree_confident != total_confident:
        bad += 1
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
