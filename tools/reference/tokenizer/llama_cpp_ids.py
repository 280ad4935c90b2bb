#!/usr/bin/env python3
"""Token ids from llama.cpp itself (llama-cpp-python, vocab only) for a list of texts.

Usage: llama_cpp_ids.py MODEL.gguf TEXTS.json > IDS.json
TEXTS.json: a JSON list of strings, or a goldens/ref file with "cases": [{"text": ...}].
Special tokens in the text are parsed (special=True), no BOS is added.
"""

import json
import sys

import llama_cpp

model, texts_path = sys.argv[1], sys.argv[2]
with open(texts_path, encoding="utf-8") as f:
    data = json.load(f)
texts = data if isinstance(data, list) else [c["text"] for c in data["cases"]]
llama = llama_cpp.Llama(model_path=model, vocab_only=True, verbose=False)
out = [{"text": t, "ids": llama.tokenize(t.encode("utf-8"), add_bos=False, special=True)} for t in texts]
json.dump(out, sys.stdout, ensure_ascii=False, indent=1)
