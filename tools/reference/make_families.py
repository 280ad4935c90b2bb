#!/usr/bin/env python3
"""Tiny checkpoints of each model family, and their goldens, made by Hugging Face
transformers (PyTorch, CPU, float32): the independent reference for pagoda's families.

For every family:
  tests/fixtures/tiny-<family>/        config.json + model.safetensors (random weights) +
                                       a small byte-level BPE tokenizer (tokenizer.json,
                                       tokenizer_config.json)
  tests/fixtures/tiny-<family>.gguf    the same weights (float32) in a GGUF file, written
                                       with the `gguf` package under llama.cpp's names
                                       (families llama.cpp loads from GGUF)
  tests/goldens/tiny_<family>.json     for 3 prompts: float32 logits at the first and the
                                       last position, and 64 greedy tokens (KV cache)

The tokenizer is trained here (tokenizers' BpeTrainer on a fixed text, 400 ids), so that
embeddings stay small: every fixture is well under a MiB.

Usage (environment: tools/reference/README.md):
  .tools/refenv/bin/python tools/reference/make_families.py [--only qwen2,...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_goldens as mg  # noqa: E402  (shared helpers: JSON, float formatting, greedy)

ROOT = mg.ROOT
FIXTURES = mg.FIXTURES
GOLDENS = mg.GOLDENS
N_GREEDY = 64
VOCAB = 400

CORPUS = [
    "The lighthouse keeper climbed the stairs every night to light the lamp.",
    "Ships passed the rocky coast, and the keeper wrote their names in a book.",
    "In winter the sea was grey and the wind sang through the windows.",
    "def add(a, b):\n    return a + b\n",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 3.14",
    "<|im_start|>user\nHello there!<|im_end|>\n<|im_start|>assistant\nHi! How can I help?<|im_end|>\n",
    "Über café naïve — déjà vu. 🙂",
    "QUESTION: why is the sky blue? ANSWER: light scatters.",
]

# Qwen2's pre-tokenizer (its tokenizer.json: Split on this pattern, then ByteLevel without
# its own regex).
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def train_tokenizer(style: str) -> PreTrainedTokenizerFast:
    """A byte-level BPE of VOCAB ids, pre-tokenized as `style` ("gpt2" or "qwen2")."""
    tok = Tokenizer(models.BPE())
    if style == "qwen2":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
    )
    fast.chat_template = (
        "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n'}}"
        "{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\\n'}}{% endif %}"
    )
    return fast


def roughen_norms(model) -> None:
    """Norm weights start at exactly 1.0; make them non-trivial so that a forgotten or
    mis-indexed norm fails the goldens."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.25 * torch.randn(p.shape, generator=g))


def goldens(model, tok, family: str, description: str, out_dir: Path, gguf: Path | None, meta: dict) -> dict:
    rng = np.random.default_rng(0)
    texts = [
        "The keeper wrote the names of the ships in a book every night.",
        None,
        "<|im_start|>user\nHello there!<|im_end|>\n<|im_start|>assistant\n",
    ]
    prompts = []
    for i, t in enumerate(texts):
        if t is None:
            ids = [int(x) for x in rng.integers(len(SPECIALS), VOCAB, size=20)]
            src = "random ids (numpy default_rng(0).integers(3, vocab, 20))"
        else:
            ids = tok.encode(t, add_special_tokens=False)
            src = f"the fixture tokenizer's encoding of {t!r}"
        assert 8 <= len(ids) <= 40, (len(ids), t)
        logits = mg.full_logits(model, ids)
        greedy = mg.greedy_kv(model, ids, N_GREEDY)
        seq = list(ids)
        for _ in range(8):
            seq.append(int(mg.full_logits(model, seq)[-1].argmax()))
        assert seq[len(ids):] == greedy[:8], "cached and uncached greedy decoding differ"
        prompts.append(
            {
                "source": src,
                "ids": ids,
                "logits_pos0": mg.f32_list(logits[0]),
                "logits_last": mg.f32_list(logits[-1]),
                "greedy64": greedy,
            }
        )
        print(f"  {family} prompt {i}: {len(ids)} ids, greedy {greedy[:8]}...")
    files = {p.name: {"bytes": p.stat().st_size, "sha256": mg.sha256(p)} for p in sorted(out_dir.iterdir())}
    if gguf is not None:
        files[gguf.name] = {"bytes": gguf.stat().st_size, "sha256": mg.sha256(gguf)}
    strings = [c for c in CORPUS] + ["  leading spaces", "tabs\tand\nnewlines\r\n", "'s 're 'LL", "x1234y"]
    return {
        "meta": {
            **meta,
            "generator": "tools/reference/make_families.py",
            "family": family,
            "model": description,
            "fixture_dir": str(out_dir.relative_to(ROOT)),
            "gguf": str(gguf.relative_to(ROOT)) if gguf else None,
            "fixture_files": files,
            "logits": "full forward pass over `ids` (no cache), float32, eager attention on CPU; "
            "logits_pos0 after ids[0] alone, logits_last after all of ids",
            "greedy64": "64 argmax tokens after `ids`, KV cache, no EOS stop",
        },
        "tokenizer_cases": [{"text": s, "ids": tok.encode(s, add_special_tokens=False)} for s in strings],
        "prompts": prompts,
    }


def save(model, tok, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for p in out_dir.iterdir():
        p.unlink()
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tok.save_pretrained(str(out_dir))
    for extra in ("chat_template.jinja", "special_tokens_map.json", "generation_config.json"):
        p = out_dir / extra
        if p.exists():
            p.unlink()
    for p in out_dir.iterdir():
        p.chmod(0o644)


def gguf_tokenizer(w, tok: PreTrainedTokenizerFast, pre: str) -> None:
    """Byte-level BPE tokenizer metadata as llama.cpp's converter writes it."""
    import gguf

    vocab = tok.backend_tokenizer.get_vocab(with_added_tokens=True)
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    assert all(t is not None for t in tokens)
    merges = [" ".join(m) if isinstance(m, (list, tuple)) else m for m in
              __import__("json").loads(tok.backend_tokenizer.to_str())["model"]["merges"]]
    types = [gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t in tokens]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tok.convert_tokens_to_ids("<|endoftext|>"))
    w.add_eos_token_id(tok.convert_tokens_to_ids("<|im_end|>"))
    w.add_add_bos_token(False)
    w.add_chat_template(tok.chat_template)


def f32(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).contiguous().numpy()


# ----------------------------------------------------------------------------- Qwen2


def make_qwen2(meta: dict) -> dict:
    from transformers import Qwen2Config, Qwen2ForCausalLM
    import gguf

    torch.manual_seed(0)
    tok = train_tokenizer("qwen2")
    cfg = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        initializer_range=0.4,
        use_sliding_window=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        torch_dtype="float32",
    )
    model = Qwen2ForCausalLM(cfg).to(torch.float32).eval()
    roughen_norms(model)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # biases start at zero: make them count
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    out_dir = FIXTURES / "tiny-qwen2"
    save(model, tok, out_dir)
    model = Qwen2ForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32, attn_implementation="eager").eval()

    path = FIXTURES / "tiny-qwen2.gguf"
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_name("tiny-qwen2")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    gguf_tokenizer(w, tok, "qwen2")
    sd = model.state_dict()
    w.add_tensor("token_embd.weight", f32(sd["model.embed_tokens.weight"]))
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        names = {
            "attn_norm.weight": "input_layernorm.weight",
            "ffn_norm.weight": "post_attention_layernorm.weight",
            "attn_q.weight": "self_attn.q_proj.weight",
            "attn_q.bias": "self_attn.q_proj.bias",
            "attn_k.weight": "self_attn.k_proj.weight",
            "attn_k.bias": "self_attn.k_proj.bias",
            "attn_v.weight": "self_attn.v_proj.weight",
            "attn_v.bias": "self_attn.v_proj.bias",
            "attn_output.weight": "self_attn.o_proj.weight",
            "ffn_gate.weight": "mlp.gate_proj.weight",
            "ffn_up.weight": "mlp.up_proj.weight",
            "ffn_down.weight": "mlp.down_proj.weight",
        }
        for g_name, hf in names.items():
            w.add_tensor(f"blk.{i}.{g_name}", f32(sd[p + hf]))
    w.add_tensor("output_norm.weight", f32(sd["model.norm.weight"]))
    w.add_tensor("output.weight", f32(sd["lm_head.weight"]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    path.chmod(0o644)

    desc = (
        "Qwen2ForCausalLM(Qwen2Config(vocab 400, hidden 64, ffn 96, 2 layers, 4 heads, 2 kv heads, "
        "head_dim 16, rope_theta 1e6, rms_eps 1e-6, untied lm_head, q/k/v biases, initializer_range 0.4)); "
        "torch.manual_seed(0); norms 1 + 0.25*randn (seed 1), biases 0.5*randn (seed 2); "
        "GGUF: arch qwen2, float32 tensors, tokenizer pre 'qwen2' (no Q/K permutation: NeoX rope)"
    )
    return goldens(model, tok, "qwen2", desc, out_dir, path, meta)


# ----------------------------------------------------------------------------- Mistral


def llama_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's converter reorders Q/K rows of llama-architecture models so that rotary
    pairs are adjacent (interleaved rope); pagoda undoes nothing and rotates interleaved."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(path: Path, arch: str, model, cfg, tok, extra=None) -> None:
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(path.stem)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    if extra:
        extra(w)
    gguf_tokenizer(w, tok, "gpt2")
    sd = model.state_dict()
    w.add_tensor("token_embd.weight", f32(sd["model.embed_tokens.weight"]))
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_norm.weight", f32(sd[p + "input_layernorm.weight"]))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", f32(sd[p + "post_attention_layernorm.weight"]))
        w.add_tensor(f"blk.{i}.attn_q.weight", f32(llama_permute(sd[p + "self_attn.q_proj.weight"], nh)))
        w.add_tensor(f"blk.{i}.attn_k.weight", f32(llama_permute(sd[p + "self_attn.k_proj.weight"], nkv)))
        w.add_tensor(f"blk.{i}.attn_v.weight", f32(sd[p + "self_attn.v_proj.weight"]))
        w.add_tensor(f"blk.{i}.attn_output.weight", f32(sd[p + "self_attn.o_proj.weight"]))
        if p + "mlp.gate_proj.weight" in sd:
            w.add_tensor(f"blk.{i}.ffn_gate.weight", f32(sd[p + "mlp.gate_proj.weight"]))
            w.add_tensor(f"blk.{i}.ffn_up.weight", f32(sd[p + "mlp.up_proj.weight"]))
            w.add_tensor(f"blk.{i}.ffn_down.weight", f32(sd[p + "mlp.down_proj.weight"]))
        else:  # Mixtral: experts stacked into one tensor each, and the router
            moe = p + "block_sparse_moe."
            n = cfg.num_local_experts
            w.add_tensor(f"blk.{i}.ffn_gate_inp.weight", f32(sd[moe + "gate.weight"]))
            for gg, hf in (("ffn_gate_exps", "w1"), ("ffn_down_exps", "w2"), ("ffn_up_exps", "w3")):
                stacked = torch.stack([sd[f"{moe}experts.{e}.{hf}.weight"] for e in range(n)])
                w.add_tensor(f"blk.{i}.{gg}.weight", f32(stacked))
    w.add_tensor("output_norm.weight", f32(sd["model.norm.weight"]))
    w.add_tensor("output.weight", f32(sd["lm_head.weight"]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    path.chmod(0o644)


def make_mistral(meta: dict) -> dict:
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    tok = train_tokenizer("gpt2")
    cfg = MistralConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        rope_theta=10_000.0,
        rms_norm_eps=1e-5,
        sliding_window=8,
        tie_word_embeddings=False,
        initializer_range=0.4,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        torch_dtype="float32",
    )
    model = MistralForCausalLM(cfg).to(torch.float32).eval()
    roughen_norms(model)
    out_dir = FIXTURES / "tiny-mistral"
    save(model, tok, out_dir)
    model = MistralForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32, attn_implementation="eager").eval()
    path = FIXTURES / "tiny-mistral.gguf"
    write_llama_gguf(path, "llama", model, cfg, tok,
                     extra=lambda w: w.add_uint32("llama.attention.sliding_window", cfg.sliding_window))
    desc = (
        "MistralForCausalLM(MistralConfig(vocab 400, hidden 64, ffn 96, 2 layers, 4 heads, 2 kv heads, "
        "head_dim 16, sliding_window 8, rope_theta 1e4, rms_eps 1e-5, untied lm_head, initializer_range 0.4)); "
        "torch.manual_seed(0); norms 1 + 0.25*randn (seed 1); GGUF: arch llama with "
        "llama.attention.sliding_window = 8, Q/K rows permuted as llama.cpp's converter does, float32"
    )
    return goldens(model, tok, "mistral", desc, out_dir, path, meta)


# ----------------------------------------------------------------------------- Mixtral


def make_mixtral(meta: dict) -> dict:
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    tok = train_tokenizer("gpt2")
    cfg = MixtralConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-5,
        num_local_experts=4,
        num_experts_per_tok=2,
        router_jitter_noise=0.0,
        sliding_window=None,
        tie_word_embeddings=False,
        initializer_range=0.4,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        torch_dtype="float32",
    )
    model = MixtralForCausalLM(cfg).to(torch.float32).eval()
    roughen_norms(model)
    out_dir = FIXTURES / "tiny-mixtral"
    save(model, tok, out_dir)
    model = MixtralForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32, attn_implementation="eager").eval()
    path = FIXTURES / "tiny-mixtral.gguf"

    def moe_meta(w):
        w.add_expert_count(cfg.num_local_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)

    write_llama_gguf(path, "llama", model, cfg, tok, extra=moe_meta)
    desc = (
        "MixtralForCausalLM(MixtralConfig(vocab 400, hidden 64, expert ffn 64, 2 layers, 4 heads, 2 kv heads, "
        "head_dim 16, 4 experts, 2 per token, rope_theta 1e6, rms_eps 1e-5, untied lm_head, initializer_range 0.4)); "
        "torch.manual_seed(0); norms 1 + 0.25*randn (seed 1); GGUF: arch llama with llama.expert_count 4 and "
        "llama.expert_used_count 2, experts stacked in ffn_{gate,up,down}_exps, router ffn_gate_inp, Q/K rows "
        "permuted as llama.cpp's converter does, float32"
    )
    return goldens(model, tok, "mixtral", desc, out_dir, path, meta)


# ----------------------------------------------------------------------------- DeepSeek-V2


def make_deepseek2(meta: dict, q_lora: bool = False) -> dict:
    """The Lite attention shape with group-limited routing; with `q_lora`, the full V2
    shape (queries through a low-rank bottleneck) with greedy routing."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    fam = "deepseek2-qlora" if q_lora else "deepseek2"
    torch.manual_seed(0)
    tok = train_tokenizer("gpt2")
    cfg = DeepseekV2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        rope_theta=10_000.0,
        rope_scaling=None,
        rms_norm_eps=1e-6,
        q_lora_rank=24 if q_lora else None,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        first_k_dense_replace=1,
        n_routed_experts=8,
        n_shared_experts=2,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        topk_method="greedy" if q_lora else "group_limited_greedy",
        n_group=None if q_lora else 4,
        topk_group=None if q_lora else 2,
        routed_scaling_factor=1.5,
        tie_word_embeddings=False,
        initializer_range=0.4,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        torch_dtype="float32",
    )
    model = DeepseekV2ForCausalLM(cfg).to(torch.float32).eval()
    for pname, p in model.named_parameters():
        assert torch.isfinite(p).all(), pname
    roughen_norms(model)
    out_dir = FIXTURES / f"tiny-{fam}"
    save(model, tok, out_dir)
    model = DeepseekV2ForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32, attn_implementation="eager").eval()
    path = FIXTURES / f"tiny-{fam}.gguf"
    write_deepseek2_gguf(path, model, cfg, tok)
    desc = (
        "DeepseekV2ForCausalLM(DeepseekV2Config(vocab 400, hidden 64, dense ffn 96, 3 layers (the first dense), "
        "4 heads, q_lora_rank None (the Lite shape), kv_lora_rank 32, qk_nope 16, qk_rope 8, v_head 16, "
        "8 routed experts of ffn 32, 2 shared, 2 per token, group_limited_greedy with 4 groups / top 2, "
        "routed_scaling_factor 1.5, rope_theta 1e4, no rope scaling, untied lm_head, initializer_range 0.4)); "
        "torch.manual_seed(0); norms 1 + 0.25*randn (seed 1); GGUF: arch deepseek2 with llama.cpp's names "
        "(attn_kv_a_mqa, attn_kv_a_norm, attn_kv_b, ffn_*_exps, ffn_*_shexp, ffn_gate_inp) and keys "
        "(kv_lora_rank, key_length = nope + rope, value_length, rope.dimension_count, leading_dense_block_count, "
        "expert_*), group routing in expert_group_count / expert_group_used_count, float32"
    )
    if q_lora:
        desc = desc.replace("q_lora_rank None (the Lite shape)", "q_lora_rank 24 (the full V2 shape)").replace(
            "group_limited_greedy with 4 groups / top 2", "greedy routing")
    return goldens(model, tok, fam, desc, out_dir, path, meta)


def write_deepseek2_gguf(path: Path, model, cfg, tok) -> None:
    import gguf

    arch = "deepseek2"
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(path.stem)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_attention_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    if cfg.q_lora_rank is not None:
        w.add_q_lora_rank(cfg.q_lora_rank)
    w.add_kv_lora_rank(cfg.kv_lora_rank)
    w.add_key_length(cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
    w.add_value_length(cfg.v_head_dim)
    w.add_rope_dimension_count(cfg.qk_rope_head_dim)
    w.add_leading_dense_block_count(cfg.first_k_dense_replace)
    w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    w.add_expert_count(cfg.n_routed_experts)
    w.add_expert_shared_count(cfg.n_shared_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_expert_weights_scale(cfg.routed_scaling_factor)
    if cfg.topk_method == "group_limited_greedy":
        w.add_uint32(f"{arch}.expert_group_count", cfg.n_group)
        w.add_uint32(f"{arch}.expert_group_used_count", cfg.topk_group)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    gguf_tokenizer(w, tok, "gpt2")
    sd = model.state_dict()
    w.add_tensor("token_embd.weight", f32(sd["model.embed_tokens.weight"]))
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        names = {
            "attn_norm": "input_layernorm",
            "ffn_norm": "post_attention_layernorm",
            "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa",
            "attn_kv_a_norm": "self_attn.kv_a_layernorm",
            "attn_kv_b": "self_attn.kv_b_proj",
            "attn_output": "self_attn.o_proj",
        }
        if cfg.q_lora_rank is None:
            names["attn_q"] = "self_attn.q_proj"
        else:
            names.update({
                "attn_q_a": "self_attn.q_a_proj",
                "attn_q_a_norm": "self_attn.q_a_layernorm",
                "attn_q_b": "self_attn.q_b_proj",
            })
        if i < cfg.first_k_dense_replace:
            names.update({"ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"})
        else:
            names.update({
                "ffn_gate_inp": "mlp.gate",
                "ffn_gate_shexp": "mlp.shared_experts.gate_proj",
                "ffn_up_shexp": "mlp.shared_experts.up_proj",
                "ffn_down_shexp": "mlp.shared_experts.down_proj",
            })
            for gg, hf in (("ffn_gate_exps", "gate_proj"), ("ffn_up_exps", "up_proj"), ("ffn_down_exps", "down_proj")):
                stacked = torch.stack([sd[f"{p}mlp.experts.{e}.{hf}.weight"] for e in range(cfg.n_routed_experts)])
                w.add_tensor(f"blk.{i}.{gg}.weight", f32(stacked))
        for g_name, hf in names.items():
            w.add_tensor(f"blk.{i}.{g_name}.weight", f32(sd[p + hf + ".weight"]))
    w.add_tensor("output_norm.weight", f32(sd["model.norm.weight"]))
    w.add_tensor("output.weight", f32(sd["lm_head.weight"]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    path.chmod(0o644)


FAMILIES = {
    "qwen2": make_qwen2,
    "mistral": make_mistral,
    "mixtral": make_mixtral,
    "deepseek2": make_deepseek2,
    "deepseek2-qlora": lambda meta: make_deepseek2(meta, q_lora=True),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(FAMILIES), help="comma list of: " + ",".join(FAMILIES))
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    meta = mg.env_meta()
    for name in args.only.split(","):
        print(f"{name}:")
        g = FAMILIES[name](meta)
        mg.dump_json(g, GOLDENS / f"tiny_{name.replace('-', '_')}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
