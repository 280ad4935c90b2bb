#!/usr/bin/env python3
"""Makes a draft model for speculative decoding out of a GGUF model: its first N decoder
layers, with the same embeddings, final norm, output head and tokenizer (an "early exit"
draft). It shares the target's tokenizer by construction, so pagoda accepts it as
`[speculative] draft_model`; how often its proposals are accepted is what the benchmark
measures.

    pip install gguf==0.17.1          # numpy comes with it
    python3 benches/make_draft_gguf.py models/SmolLM2-135M-Instruct.Q4_1.gguf \
        /tmp/smollm2-draft-8.gguf --layers 8

Used for the draft-model rows of docs/performance.md.
"""

import argparse
import re
import sys

import gguf


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("input")
    ap.add_argument("output")
    ap.add_argument("--layers", type=int, required=True, help="decoder layers kept")
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
    if not 1 <= args.layers <= total:
        sys.exit(f"--layers must be in 1..={total}")

    writer = gguf.GGUFWriter(args.output, arch=arch, endianess=reader.endianess)
    alignment = reader.get_field(gguf.Keys.General.ALIGNMENT)
    if alignment is not None:
        writer.data_alignment = alignment.contents()
    for field in reader.fields.values():
        # The writer adds the architecture and the GGUF.* header fields itself.
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        value = args.layers if field.name == count_key else field.contents()
        writer.add_key_value(field.name, value, kind, sub_type=sub)

    block = re.compile(r"^blk\.(\d+)\.")
    kept = []
    for t in reader.tensors:
        m = block.match(t.name)
        if m and int(m.group(1)) >= args.layers:
            continue
        kept.append(t)
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in kept:
        writer.write_tensor_data(t.data)
    writer.close()
    print(f"{args.output}: {args.layers} of {total} layers, {len(kept)} tensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
