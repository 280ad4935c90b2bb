#!/usr/bin/env python3
"""Reference outputs ("goldens") that pagoda's Rust model and tokenizer are tested against.

Independent reference: Hugging Face transformers (PyTorch, CPU, float32).

Writes (paths relative to the repository root):
  tests/goldens/smollm2_q4_1.json      teacher-forcing / greedy goldens for the default GGUF model
  tests/goldens/smollm2_tokenizer.json tokenizer encode/decode + chat-template goldens
  tests/fixtures/tiny-llama/           a tiny random float32 llama in HF format (safetensors)
  tests/goldens/tiny_llama.json        full-precision logits + greedy ids for that tiny model

Usage (see tools/reference/README.md for the environment):
  .tools/refenv/bin/python tools/reference/make_goldens.py [--only gguf,tokenizer,tiny]

Everything is deterministic except the `date` fields; reruns on another CPU may differ in the
last bits of the logits (BLAS summation order), never in the token ids unless a near-tie flips
(see `top1_margin`).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import math
import os
import platform
import sys
from pathlib import Path

import numpy as np
import torch

import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformers import PreTrainedTokenizerFast
import tokenizers
from tokenizers import Tokenizer

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
GOLDENS = ROOT / "tests" / "goldens"
FIXTURES = ROOT / "tests" / "fixtures"

N_FORCED = 64
N_GREEDY = 32
N_TINY_GREEDY = 64

# Plain-text (not chat) prompts for the GGUF model. Chosen so that the greedy continuation
# does not run into an end-of-sequence token within N_FORCED tokens (checked below).
GGUF_PROMPTS = [
    ("capital", "The capital of France is Paris, and the capital of Germany is"),
    ("story", "Once upon a time, in a small village at the edge of a dark forest, there lived"),
    ("python", "The following Python function returns the sum of a list:\n\ndef total(xs):"),
    ("list", "Here are five tips for better sleep:\n1."),
    ("question", "Q: Why is the sky blue?\nA:"),
    ("recipe", "To make a cup of tea, first"),
    ("science", "Photosynthesis is the process by which plants"),
    ("numbers", "The first ten prime numbers are 2, 3, 5, 7,"),
    ("letter", "Dear Sir or Madam,\n\nI am writing to"),
    ("history", "In 1969, Neil Armstrong became the first person to"),
]

TOKENIZER_STRINGS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "12345 and 3.14",
    "Price: $1,234.56 (USD), x = [1, 22, 333, 4444]",
    "  multiple   spaces  here  ",
    "   leading spaces",
    "trailing spaces   ",
    "line one\nline two\n\nline four\n",
    "tab\tseparated\tvalues\t\t end",
    "\t\n \r\n  \n\n\n",
    "HTTP/1.1 200 OK\r\nContent-Length: 42\r\n",
    "emoji: \U0001F600\U0001F680\U0001F44D\U0001F3FD and \u2764\ufe0f",
    "Caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00fcber \u00c0\u00c9\u00ce\u00d5\u00dc \u00df \u1e9e",
    "\u4e2d\u6587\u6d4b\u8bd5\uff1a\u4f60\u597d\uff0c\u4e16\u754c\u3002",
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8\u3068\u30ab\u30bf\u30ab\u30ca",
    "\u041f\u0440\u0438\u0432\u0435\u0442, \u043c\u0438\u0440!",
    "\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645",
    "Unicode numbers: \u00bd \u00b2 \u0663\u0664 \u2460 \u2167 \uff11\uff12",
    "def add(a, b):\n    return a + b\n",
    "fn main() { println!(\"hi {}\", 1 + 2); }",
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>assistant\n",
    "Mixed<|endoftext|>special <|im_end|>tokens",
    "not special: <|im_start| and <im_end>",
    "I'm sure they'll've done it, don't you think? It's John's.",
    "https://example.com/path?q=1&r=two#frag email@example.com",
    "a\u00a0b zero\u200bwidth",
    "",
    " ",
    "a",
    "Large language models are trained on vast amounts of text. They learn to predict the "
    "next token, and with enough data and parameters, they can write essays, answer "
    "questions, and generate code.",
]

CHAT_CASES = [
    {
        "messages": [
            {"role": "system", "content": "You are a concise assistant."},
            {"role": "user", "content": "What is the capital of France?"},
        ],
        "add_generation_prompt": True,
    },
    {
        # no system message: the template injects its default system prompt
        "messages": [{"role": "user", "content": "Hi!"}],
        "add_generation_prompt": True,
    },
    {
        "messages": [
            {"role": "user", "content": "Say hello."},
            {"role": "assistant", "content": "Hello."},
        ],
        "add_generation_prompt": False,
    },
]


# ----------------------------------------------------------------------------- helpers


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def f32_list(t: torch.Tensor) -> list:
    """Float32 values as shortest decimal strings that round-trip to the same float32
    (also through f64 parsing + cast to f32, which is what serde_json + `as f32` does)."""
    a = t.detach().to(torch.float32).cpu().numpy().astype(np.float32).ravel()
    out = []
    for x in a:
        s = np.format_float_scientific(x, unique=True, trim="-") if (x != 0 and (abs(x) < 1e-4 or abs(x) >= 1e6)) \
            else np.format_float_positional(x, unique=True, trim="-")
        v = float(s)
        assert np.float32(v) == x or (math.isnan(v) and math.isnan(x)), (s, x)
        out.append(RawJson(s))
    return out


class RawJson(str):
    """A pre-formatted JSON number."""


def dump_json(obj, path: Path) -> None:
    """JSON writer that emits RawJson numbers verbatim and keeps number lists on one line."""

    def enc(o, indent):
        pad = "  " * indent
        if isinstance(o, RawJson):
            return str(o)
        if isinstance(o, dict):
            if not o:
                return "{}"
            items = [f"{pad}  {json.dumps(k, ensure_ascii=False)}: {enc(v, indent + 1)}" for k, v in o.items()]
            return "{\n" + ",\n".join(items) + "\n" + pad + "}"
        if isinstance(o, (list, tuple)):
            if all(isinstance(x, (int, float, RawJson, bool)) or x is None for x in o):
                return "[" + ",".join(enc(x, 0) if isinstance(x, RawJson) else json.dumps(x) for x in o) + "]"
            items = [f"{pad}  {enc(v, indent + 1)}" for v in o]
            return "[\n" + ",\n".join(items) + "\n" + pad + "]"
        if isinstance(o, float):
            assert math.isfinite(o)
            return repr(o)
        return json.dumps(o, ensure_ascii=False)

    path.parent.mkdir(parents=True, exist_ok=True)
    text = enc(obj, 0) + "\n"
    json.loads(text)  # must be valid JSON
    path.write_text(text, encoding="utf-8")
    print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size} bytes)")


def env_meta() -> dict:
    import gguf  # noqa: F401  (version only)

    return {
        "generator": "tools/reference/make_goldens.py",
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "gguf": getattr(sys.modules["gguf"], "__version__", None) or _pkg_version("gguf"),
        "numpy": np.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }


def _pkg_version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # pragma: no cover
        return None


# ----------------------------------------------------------------------------- tokenizer


def gguf_fields(model_path: Path) -> dict:
    from gguf import GGUFReader

    r = GGUFReader(str(model_path))
    out = {}
    for k in (
        "tokenizer.ggml.model",
        "tokenizer.ggml.pre",
        "tokenizer.ggml.add_bos_token",
        "tokenizer.ggml.add_space_prefix",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.unknown_token_id",
        "tokenizer.ggml.padding_token_id",
        "tokenizer.chat_template",
    ):
        f = r.fields.get(k)
        if f is None:
            continue
        v = f.contents()
        out[k] = v
    return out


def build_reference_tokenizer(model_dir: Path, model_file: str, gf: dict):
    """Returns (reference tokenizer, raw transformers-GGUF tokenizer).

    transformers' GGUF tokenizer conversion (4.57) is lossy for this model: it uses a plain
    GPT-2 ByteLevel pre-tokenizer (no isolated-digit split that tokenizer.ggml.pre="smollm"
    means), a llama-style decoder, a post-processor that prepends BOS, add_bos_token=true and
    eos_token=<|im_start|> (it reads bos_token_id for the eos). We keep its vocab and merges
    (read from the GGUF) and rebuild the pipeline the way SmolLM2's own tokenizer.json and
    llama.cpp's "smollm" pre-tokenizer define it:
      normalizer none; pre-tokenizer Digits(individual_digits) then ByteLevel(GPT-2 regex,
      no prefix space); BPE without byte fallback; ByteLevel decoder; no BOS/EOS added.
    """
    raw = AutoTokenizer.from_pretrained(str(model_dir), gguf_file=model_file)
    assert gf["tokenizer.ggml.model"] == "gpt2" and gf["tokenizer.ggml.pre"] == "smollm", gf
    assert gf["tokenizer.ggml.add_bos_token"] is False

    spec = json.loads(raw.backend_tokenizer.to_str())
    spec["normalizer"] = None
    spec["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        ],
    }
    spec["post_processor"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}
    spec["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    m = spec["model"]
    m["byte_fallback"] = False
    m["fuse_unk"] = False
    m["unk_token"] = None
    backend = Tokenizer.from_str(json.dumps(spec))

    toks = raw.convert_ids_to_tokens(list(range(3)))
    bos = toks[gf["tokenizer.ggml.bos_token_id"]]
    eos = toks[gf["tokenizer.ggml.eos_token_id"]]
    unk = toks[gf["tokenizer.ggml.unknown_token_id"]]
    pad = toks[gf["tokenizer.ggml.padding_token_id"]]
    ref = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=eos,
        unk_token=unk,
        pad_token=pad,
        additional_special_tokens=[bos, eos],
        clean_up_tokenization_spaces=False,
        model_max_length=8192,
        chat_template=gf["tokenizer.chat_template"],
    )
    return ref, raw


def encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def decode(tok, ids, skip_special=False) -> str:
    return tok.decode(ids, skip_special_tokens=skip_special, clean_up_tokenization_spaces=False)


def make_tokenizer_goldens(ref, raw, gf: dict, model_path: Path, meta: dict, llama_cpp_ids=None) -> dict:
    cases = []
    n_raw_disagree = 0
    for text in TOKENIZER_STRINGS:
        ids = encode(ref, text)
        raw_ids = encode(raw, text)
        dec = decode(ref, ids)
        case = {
            "text": text,
            "ids": ids,
            "tokens": ref.convert_ids_to_tokens(ids),
            "decoded": dec,
            "decoded_skip_special": decode(ref, ids, skip_special=True),
            "roundtrip": dec == text,
            "transformers_gguf_ids_agree": raw_ids == ids,
        }
        if raw_ids != ids:
            n_raw_disagree += 1
            case["transformers_gguf_ids"] = raw_ids
        cases.append(case)

    # decode-only cases: pieces that are not valid UTF-8 on their own, specials.
    decode_cases = []
    emoji_ids = encode(ref, "\U0001F600")
    cjk_ids = encode(ref, "\u4e16\u754c")
    for ids in (emoji_ids[:1], emoji_ids, cjk_ids[:1], cjk_ids, [1, 2, 0], encode(ref, " hello") + [2]):
        decode_cases.append(
            {
                "ids": ids,
                "decoded": decode(ref, ids),
                "decoded_skip_special": decode(ref, ids, skip_special=True),
            }
        )

    chat = []
    for c in CHAT_CASES:
        rendered = ref.apply_chat_template(
            c["messages"], tokenize=False, add_generation_prompt=c["add_generation_prompt"]
        )
        ids = encode(ref, rendered)
        tmpl_ids = ref.apply_chat_template(c["messages"], tokenize=True, add_generation_prompt=c["add_generation_prompt"])
        if hasattr(tmpl_ids, "keys"):
            tmpl_ids = tmpl_ids["input_ids"]
        assert list(tmpl_ids) == ids, (tmpl_ids, ids)
        chat.append({**c, "rendered": rendered, "ids": ids})

    special = [
        {"id": int(i), "content": t.content, "special": bool(t.special)}
        for i, t in sorted(ref.added_tokens_decoder.items())
    ]

    return {
        "meta": {
            **meta,
            "model_file": model_path.name,
            "model_sha256": sha256(model_path),
            "encode": "tokenizer(text, add_special_tokens=False): no BOS/EOS added; special-token "
            "strings that occur in the text (e.g. <|im_start|>) ARE matched and become their ids",
            "decode": "tokenizer.decode(ids, skip_special_tokens=False|True, clean_up_tokenization_spaces=False)",
            "reference_tokenizer": "vocab+merges from the GGUF via transformers, pipeline rebuilt as "
            "SmolLM2/llama.cpp define it: no normalizer; pre-tokenizer Digits(individual_digits=true) "
            "then ByteLevel(add_prefix_space=false, GPT-2 regex); BPE (no byte fallback); ByteLevel decoder",
            "transformers_gguf_ids_agree_all": n_raw_disagree == 0,
            "gguf_tokenizer_metadata": {k: v for k, v in gf.items() if k != "tokenizer.chat_template"},
        },
        "bos_id": gf["tokenizer.ggml.bos_token_id"],
        "eos_id": gf["tokenizer.ggml.eos_token_id"],
        "unk_id": gf["tokenizer.ggml.unknown_token_id"],
        "pad_id": gf["tokenizer.ggml.padding_token_id"],
        "add_bos": False,
        "vocab_size": len(ref),
        "special_tokens": special,
        "cases": cases,
        "decode_cases": decode_cases,
        "chat_template": {"template": gf["tokenizer.chat_template"], "cases": chat},
    }


# ----------------------------------------------------------------------------- model runs


@torch.no_grad()
def greedy_kv(model, prompt_ids: list[int], n: int) -> list[int]:
    """Plain argmax decoding with the KV cache, one token per step, no EOS stop."""
    out = model(torch.tensor([prompt_ids]), use_cache=True)
    past = out.past_key_values
    nxt = int(out.logits[0, -1].argmax())
    ids = [nxt]
    for _ in range(n - 1):
        out = model(torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
        past = out.past_key_values
        nxt = int(out.logits[0, -1].argmax())
        ids.append(nxt)
    return ids


@torch.no_grad()
def full_logits(model, ids: list[int]) -> torch.Tensor:
    """Logits for every position of one full (no-cache) forward pass: [seq, vocab] f32."""
    return model(torch.tensor([ids]), use_cache=False).logits[0].to(torch.float32)


def make_gguf_goldens(model_path: Path, ref_tok, meta: dict) -> dict:
    model = AutoModelForCausalLM.from_pretrained(
        str(model_path.parent), gguf_file=model_path.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    cfg = model.config
    eos_like = {0, 1, 2}
    prompts = []
    for name, text in GGUF_PROMPTS:
        pids = encode(ref_tok, text)
        forced = greedy_kv(model, pids, N_FORCED)
        logits = full_logits(model, pids + forced)
        P = len(pids)
        pos = logits[P - 1 : P - 1 + N_FORCED]  # row i = after prompt + forced[:i]
        top2 = pos.topk(2, dim=-1)
        top1 = [int(x) for x in top2.indices[:, 0]]
        margin = top2.values[:, 0] - top2.values[:, 1]
        last = logits[P - 1].topk(5)
        mism = [i for i in range(N_FORCED) if top1[i] != forced[i]]
        if mism:
            print(f"  note: {name}: KV-cached greedy vs full-forward argmax differ at {mism}", file=sys.stderr)
        hit = [i for i, t in enumerate(forced) if t in eos_like]
        if hit:
            raise SystemExit(f"error: {name}: special token in the greedy continuation at {hit}; pick another prompt")
        cont = decode(ref_tok, forced)
        print(f"  [{name}] {text!r} -> {cont!r}")
        prompts.append(
            {
                "name": name,
                "prompt": text,
                "prompt_ids": pids,
                "forced_ids": forced,
                "top1": top1,
                "top1_margin": f32_list(margin),
                "greedy32": forced[:N_GREEDY],
                "forced_text": cont,
                "last_prompt_top5": {"ids": [int(i) for i in last.indices], "logits": f32_list(last.values)},
            }
        )
    return {
        "meta": {
            **meta,
            "model_file": model_path.name,
            "model_sha256": sha256(model_path),
            "model_config": {
                "arch": cfg.model_type,
                "n_layers": cfg.num_hidden_layers,
                "hidden": cfg.hidden_size,
                "n_heads": cfg.num_attention_heads,
                "n_kv_heads": cfg.num_key_value_heads,
                "ffn": cfg.intermediate_size,
                "vocab": cfg.vocab_size,
                "rope_theta": cfg.rope_theta,
                "rms_eps": cfg.rms_norm_eps,
                "tie_word_embeddings": cfg.tie_word_embeddings,
            },
            "logits": "transformers LlamaForCausalLM on CPU in float32, eager attention; all GGUF tensors "
            "(Q4_1 linear weights, Q8_0 token_embd, f32 norms) dequantized to float32 by transformers+gguf "
            "at load; Wq/Wk rows un-permuted by transformers (HF rotate_half rope), which is the same "
            "math as llama.cpp's interleaved rope on the GGUF layout",
            "prompt_ids": "reference tokenizer (see smollm2_tokenizer.json), add_special_tokens=False, no BOS",
            "forced_ids": f"the reference model's own greedy continuation ({N_FORCED} tokens), argmax "
            "decoding with the KV cache, one token per step, no EOS stop",
            "top1": "top1[i] = argmax of the logits after prompt_ids + forced_ids[:i], from ONE full "
            "(no-cache) forward pass over prompt_ids + forced_ids",
            "top1_margin": "logit(top1) - logit(second best) at the same positions; near-ties (say < 0.05) "
            "may legitimately flip under other numerics (quantized matmuls, other summation order)",
            "greedy32": f"forced_ids[:{N_GREEDY}] (greedy, no EOS stop)",
            "last_prompt_top5": "top-5 token ids and float32 logits at the last prompt position",
        },
        "prompts": prompts,
    }


def make_tiny(ref_tok, meta: dict, out_dir: Path) -> dict:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(ref_tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        initializer_range=0.5,
        bos_token_id=ref_tok.bos_token_id,
        eos_token_id=ref_tok.eos_token_id,
        pad_token_id=ref_tok.pad_token_id,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(cfg).to(torch.float32).eval()
    # Norm weights are initialised to exactly 1.0; make them non-trivial so that an
    # implementation that forgets (or mis-indexes) them fails the goldens.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.25 * torch.randn(p.shape, generator=g))
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)

    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    ref_tok.save_pretrained(str(out_dir), save_jinja_files=False)
    for extra in ("chat_template.jinja",):
        p = out_dir / extra
        if p.exists():
            p.unlink()

    # Reload from disk so the goldens describe exactly the committed files.
    model = LlamaForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32, attn_implementation="eager").eval()
    rng = np.random.default_rng(0)
    texts = [
        "The quick brown fox jumps over the lazy dog near the old river bank, twice a day.",
        None,  # random ids
        "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n",
    ]
    prompts = []
    for i, t in enumerate(texts):
        if t is None:
            ids = [int(x) for x in rng.integers(17, len(ref_tok), size=20)]
            src = "random ids (numpy default_rng(0).integers(17, vocab, 20))"
        else:
            ids = encode(ref_tok, t)
            src = f"reference tokenizer encoding of {t!r}"
        assert 16 <= len(ids) <= 24, (len(ids), t)
        logits = full_logits(model, ids)
        greedy = greedy_kv(model, ids, N_TINY_GREEDY)
        # Cross-check: greedy via full forward passes (no cache) must agree.
        seq = list(ids)
        for _ in range(8):
            seq.append(int(full_logits(model, seq)[-1].argmax()))
        if seq[len(ids):] != greedy[:8]:
            print(f"  note: tiny prompt {i}: cached vs uncached greedy differ in first 8", file=sys.stderr)
        prompts.append(
            {
                "source": src,
                "ids": ids,
                "logits_pos0": f32_list(logits[0]),
                "logits_last": f32_list(logits[-1]),
                "argmax_pos0": int(logits[0].argmax()),
                "argmax_last": int(logits[-1].argmax()),
                "greedy64": greedy,
            }
        )
        l = logits[-1]
        print(f"  tiny prompt {i}: len {len(ids)}, last logits mean {l.mean():.3f} std {l.std():.3f} "
              f"max {l.max():.3f}; greedy {greedy[:10]}...")

    for p in out_dir.iterdir():
        p.chmod(0o644)
    files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256(p)} for p in sorted(out_dir.iterdir())}
    return {
        "meta": {
            **meta,
            "fixture_dir": str(out_dir.relative_to(ROOT)),
            "fixture_files": files,
            "model": "LlamaForCausalLM(LlamaConfig(vocab 49152, hidden 64, ffn 128, 2 layers, 4 heads, "
            "2 kv heads, head_dim 16, rope_theta 10000, rms_eps 1e-5, untied lm_head, initializer_range 0.5)), "
            "torch.manual_seed(0); every *norm.weight then set to 1 + 0.25*randn (torch.Generator seed 1); "
            "saved float32 safetensors; HF layout, i.e. rotate_half (NeoX-style, non-interleaved) rope "
            "on q/k as stored",
            "logits": "full forward pass over `ids` (no cache), float32, eager attention on CPU; "
            "logits_pos0 = logits after ids[0] alone; logits_last = after all of ids. Numbers are "
            "shortest decimal strings that round-trip to the exact float32",
            "greedy64": "64 argmax tokens after `ids`, KV cache, no EOS stop",
            "tokenizer": "the fixture's tokenizer.json is the reference SmolLM2 tokenizer "
            "(see smollm2_tokenizer.json meta)",
        },
        "prompts": prompts,
    }


# ----------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--only", default="tokenizer,gguf,tiny", help="comma list of: tokenizer,gguf,tiny")
    args = ap.parse_args()
    sys.stdout.reconfigure(line_buffering=True)
    only = set(args.only.split(","))
    model_path = args.model.resolve()
    if not model_path.exists():
        print(f"error: {model_path} missing; run scripts/fetch-model.sh", file=sys.stderr)
        return 1
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    meta = env_meta()

    gf = gguf_fields(model_path)
    ref_tok, raw_tok = build_reference_tokenizer(model_path.parent, model_path.name, gf)

    if "tokenizer" in only:
        tg = make_tokenizer_goldens(ref_tok, raw_tok, gf, model_path, meta)
        dump_json(tg, GOLDENS / "smollm2_tokenizer.json")
    if "gguf" in only:
        gg = make_gguf_goldens(model_path, ref_tok, meta)
        dump_json(gg, GOLDENS / "smollm2_q4_1.json")
    if "tiny" in only:
        tl = make_tiny(ref_tok, meta, FIXTURES / "tiny-llama")
        dump_json(tl, GOLDENS / "tiny_llama.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
