#!/usr/bin/env python3
"""Writes a GGUF model with its quantized tensors dequantized to F16 (or F32): the same
model, slower and without the quantizer's rounding in the activations' path. With the
quantized original as `[speculative] draft_model`, it is a target/draft pair that shares
its tokenizer and mostly agrees — the setting a draft model is for (a cheap model proposing
for an expensive one), with the one model family this machine can fetch.

    pip install gguf==0.17.1          # numpy comes with it
    python3 benches/dequantize_gguf.py models/SmolLM2-135M-Instruct.Q4_1.gguf \
        /tmp/smollm2-f16.gguf --type f16

Used for the draft-model rows of docs/performance.md.
"""

import argparse
import sys

import numpy as np

import gguf
from gguf.quants import dequantize

FLOAT = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("input")
    ap.add_argument("output")
    ap.add_argument("--type", choices=["f16", "f32"], default="f16")
    args = ap.parse_args()

    reader = gguf.GGUFReader(args.input)
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    writer = gguf.GGUFWriter(args.output, arch=arch, endianess=reader.endianess)
    alignment = reader.get_field(gguf.Keys.General.ALIGNMENT)
    if alignment is not None:
        writer.data_alignment = alignment.contents()
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        if field.name == gguf.Keys.General.FILE_TYPE:
            continue  # no longer the quantized file type
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)

    out_dtype = np.float16 if args.type == "f16" else np.float32
    tensors = []
    for t in reader.tensors:
        if t.tensor_type in FLOAT:
            data = np.asarray(t.data)
        else:
            # gguf's shapes are innermost-first; numpy wants them outermost-first.
            shape = tuple(int(d) for d in reversed(t.shape))
            data = dequantize(t.data, t.tensor_type).reshape(shape)
            # 1-D tensors (norms) stay F32, as llama.cpp's converters write them.
            data = data.astype(out_dtype if data.ndim > 1 else np.float32)
        tensors.append((t.name, data))
        writer.add_tensor(t.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    print(f"{args.output}: {len(tensors)} tensors, quantized ones as {args.type}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
