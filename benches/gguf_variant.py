#!/usr/bin/env python3
"""Writes a variant of a GGUF model for draft-model benchmarks (docs/performance.md), with
the same tokenizer and metadata:

  --dequantize f16|f32   quantized tensors dequantized (1-D ones stay F32): the same model,
                         slower, a target for which the quantized original is a cheap
                         draft that mostly agrees with it;
  --layers N             only the first N decoder layers, with the same embeddings, final
                         norm and output head: an "early exit" draft of the model.

    pip install gguf==0.17.1          # numpy comes with it
    python3 benches/gguf_variant.py models/SmolLM2-135M-Instruct.Q4_1.gguf /tmp/smol-f16.gguf --dequantize f16
    python3 benches/gguf_variant.py models/SmolLM2-135M-Instruct.Q4_1.gguf /tmp/smol-4.gguf --layers 4
"""

import argparse
import re
import sys

import numpy as np

import gguf
from gguf.quants import dequantize

FLOAT = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16}
BLOCK = re.compile(r"^blk\.(\d+)\.")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("input")
    ap.add_argument("output")
    ap.add_argument("--dequantize", choices=["f16", "f32"])
    ap.add_argument("--layers", type=int, help="decoder layers kept")
    args = ap.parse_args()

    reader = gguf.GGUFReader(args.input)
    arch_field = reader.get_field(gguf.Keys.General.ARCHITECTURE)
    if arch_field is None:
        sys.exit(f"{args.input}: no general.architecture")
    arch = arch_field.contents()
    count_key = f"{arch}.block_count"
    count_field = reader.get_field(count_key)
    if count_field is None:
        sys.exit(f"{args.input}: no {count_key}")
    total = int(count_field.contents())
    layers = total if args.layers is None else args.layers
    if not 1 <= layers <= total:
        sys.exit(f"--layers must be in 1..={total}")

    writer = gguf.GGUFWriter(args.output, arch=arch, endianess=reader.endianess)
    alignment = reader.get_field(gguf.Keys.General.ALIGNMENT)
    if alignment is not None:
        writer.data_alignment = alignment.contents()
    for field in reader.fields.values():
        # The writer adds the architecture and the GGUF.* header fields itself; a
        # dequantized file no longer has the quantized file type.
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        if args.dequantize and field.name == gguf.Keys.General.FILE_TYPE:
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        value = layers if field.name == count_key else field.contents()
        writer.add_key_value(field.name, value, kind, sub_type=sub)

    out_dtype = np.float16 if args.dequantize == "f16" else np.float32
    kept = 0
    for t in reader.tensors:
        m = BLOCK.match(t.name)
        if m and int(m.group(1)) >= layers:
            continue
        kept += 1
        if args.dequantize and t.tensor_type not in FLOAT:
            # gguf's shapes are innermost-first; numpy wants them outermost-first.
            shape = tuple(int(d) for d in reversed(t.shape))
            data = dequantize(t.data, t.tensor_type).reshape(shape)
            writer.add_tensor(t.name, data.astype(out_dtype if data.ndim > 1 else np.float32))
        else:
            writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    what = f"{layers} of {total} layers, {kept} tensors"
    if args.dequantize:
        what += f", quantized ones as {args.dequantize}"
    print(f"{args.output}: {what}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
