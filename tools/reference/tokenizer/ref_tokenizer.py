#!/usr/bin/env python3
"""Reference token ids for pagoda's GGUF tokenizer (actors/src/tokenizer.rs).

Needs only `pip install gguf tokenizers jinja2` (no torch). It rebuilds the tokenizer from the
GGUF metadata two ways, with the HF `tokenizers` library:

* "transformers": as transformers' GGUF loader does (integrations/gguf/gguf_tokenizer_mapping.py,
  transformers 5.x): GPT2Tokenizer = plain ByteLevel pre-tokenizer (GPT-2 regex) for any `pre`
  it has no split regex for -- including "smollm".
* "pagoda": what pagoda builds (and llama.cpp does): for pre = "smollm" the digits are split one
  by one before the GPT-2 regex (HF: Sequence[Digits(individual_digits=True), ByteLevel]), as in
  the original SmolLM2 tokenizer.json.

If llama-cpp-python is installed it also tokenizes with llama.cpp itself (vocab only); when it
lives in another venv, use llama_cpp_ids.py beside this file instead.

It also renders the chat template with jinja2 the way transformers does
(ImmutableSandboxedEnvironment, trim_blocks, lstrip_blocks).

Usage: ref_tokenizer.py MODEL.gguf [OUT.json]
"""

import json
import sys

from gguf import GGUFReader
from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE

CASES = [
    "Hello, world!",
    "hello world",
    " leading space",
    "trailing space ",
    "double  space",
    "   three leading",
    "tab\there",
    "new\nline",
    "two\n\nnewlines",
    "\n\n\n",
    "12345",
    " 123",
    "a 1 b 22 c 333",
    "3.14159 and 2024-01-01",
    "x=12345;y=0.5",
    "I'm don't you'll we've they're she'd",
    "CAPS'S AND 'LL",
    "café naïve résumé Ångström",
    "日本語のテキスト",
    "中文测试，标点。",
    "Привет, мир!",
    "emoji 😀👍🏽 family 👨‍👩‍👧",
    "def f(x):\n    return x ** 2  # square\n",
    "fn main() { println!(\"{}\", 1 + 2); }",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more",
    "<|im_start|><|im_end|>",
    "<|im_start",
    "a\u00a0b",  # no-break space
    "\u200bzero width",
    "",
    " ",
    "!!!???...",
    "http://example.com/path?q=1&r=2",
]

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
    ],
]


def field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def build(meta, flavor):
    tokens = meta["tokens"]
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    merges = [tuple(m.split(" ", 1)) for m in meta["merges"]]
    tok = Tokenizer(BPE(vocab, merges))
    pre = meta["pre"]
    if flavor == "pagoda" and pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    types = meta["token_type"]
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t, ty in zip(tokens, types) if ty == 3])
    user = [AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types) if ty == 4]
    if user:
        tok.add_tokens(user)
    return tok


def render(template, messages, add_generation_prompt, bos, eos):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg):
        raise RuntimeError(msg)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(
        messages=messages, add_generation_prompt=add_generation_prompt, bos_token=bos, eos_token=eos
    )


def main():
    path = sys.argv[1]
    r = GGUFReader(path)
    meta = {
        "tokens": field(r, "tokenizer.ggml.tokens"),
        "token_type": field(r, "tokenizer.ggml.token_type"),
        "merges": field(r, "tokenizer.ggml.merges"),
        "pre": field(r, "tokenizer.ggml.pre"),
    }
    bos = meta["tokens"][field(r, "tokenizer.ggml.bos_token_id")]
    eos = meta["tokens"][field(r, "tokenizer.ggml.eos_token_id")]
    template = field(r, "tokenizer.chat_template")
    flavors = {f: build(meta, f) for f in ("transformers", "pagoda")}
    llama = None
    try:
        import llama_cpp

        llama = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
    except Exception as e:  # noqa: BLE001 - optional
        print(f"(no llama.cpp reference: {e})", file=sys.stderr)

    out = {"model": path.split("/")[-1], "pre": meta["pre"], "cases": [], "chat": []}
    for text in CASES:
        case = {"text": text}
        for name, tok in flavors.items():
            case[f"ids_{name}"] = tok.encode(text, add_special_tokens=False).ids
        case["decoded"] = flavors["pagoda"].decode(case["ids_pagoda"], skip_special_tokens=True)
        if llama is not None:
            case["ids_llama_cpp"] = llama.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        out["cases"].append(case)
    for messages in CONVERSATIONS:
        for agp in (False, True):
            out["chat"].append(
                {
                    "messages": messages,
                    "add_generation_prompt": agp,
                    "rendered": render(template, messages, agp, bos, eos),
                }
            )
    text = json.dumps(out, ensure_ascii=False, indent=1)
    if len(sys.argv) > 2:
        with open(sys.argv[2], "w", encoding="utf-8") as f:
            f.write(text)
    else:
        print(text)
    diffs = [c["text"] for c in out["cases"] if c["ids_transformers"] != c["ids_pagoda"]]
    print(f"transformers vs pagoda flavor differ on: {diffs!r}", file=sys.stderr)
    if llama is not None:
        diffs = [c["text"] for c in out["cases"] if c["ids_llama_cpp"] != c["ids_pagoda"]]
        print(f"llama.cpp vs pagoda flavor differ on: {diffs!r}", file=sys.stderr)


if __name__ == "__main__":
    main()
