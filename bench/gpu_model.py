"""Write a Llama-3-8B-shaped model folder for ``--load-format dummy`` serving benchmarks.

    python bench/gpu_model.py /tmp/model8b [--layers 32] [--max-len 32768]
    python bench/gpu_model.py --real smollm2-135m   # GGUF already in the cache -> folder

The folder holds ``config.json`` (Llama-3-8B's shape: 32 layers, hidden 4096, 32 query
heads, 8 KV heads of 128, vocabulary 128256, bf16), ``generation_config.json`` and a
byte-level BPE tokenizer whose vocabulary has exactly the model's 128256 entries (3
specials, the 256 byte tokens, then filler tokens ``<|fN|>``), so that
``sglang.bench_serving --dataset-name random-ids`` draws token ids over the whole
embedding table and 20 random prompts practically never repeat (a repeated prompt hits
the prefix cache). No weights: SGLang fills them with ``--load-format dummy``. Needs only
the ``tokenizers`` package.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "mlp_bias": False,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 128256,
}
SPECIALS = ["<unk>", "<s>", "</s>"]


def byte_level_chars() -> list[str]:
    """The 256 printable stand-ins GPT-2's byte-level BPE uses for the bytes 0..255."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tokenizer(folder: str, vocab_size: int, max_len: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in byte_level_chars():
        vocab[ch] = len(vocab)
    while len(vocab) < vocab_size:
        vocab[f"<|f{len(vocab)}|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    tok.save(os.path.join(folder, "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "</s>",
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,
    }
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=1)


def write_model(folder: str, layers: int = 32, max_len: int = 32768) -> dict:
    os.makedirs(folder, exist_ok=True)
    config = dict(LLAMA3_8B, num_hidden_layers=layers, max_position_embeddings=max_len)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    with open(os.path.join(folder, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": 2}, f)
    write_tokenizer(folder, config["vocab_size"], max_len)
    return config


def kv_bytes_per_token(config: dict, dtype_bytes: int = 2) -> int:
    """Bytes of K and V per token over all layers (16-bit: what mooncake sends)."""
    return (
        2
        * config["num_hidden_layers"]
        * config["num_key_value_heads"]
        * config["head_dim"]
        * dtype_bytes
    )


def real_model(name: str) -> str:
    """The safetensors folder of a real model whose verified GGUF is already in the cache
    (scripts/gpu_setup.sh puts it there): ``sglang_spectrum.models.ensure_model``, the
    project's conversion with its round-trip check. transformers 5.x refuses
    ``save_pretrained`` on a GGUF-loaded model ("quantized with GGUF and is not
    serializable") although the weights are dequantised by then: for the conversion,
    models loaded from a GGUF are handed over without their quantizer."""
    import transformers

    from sglang_spectrum.models import ensure_model

    try:
        return str(ensure_model(name, progress=False))
    except ValueError as e:
        if "not serializable" not in str(e):
            raise
    auto = transformers.AutoModelForCausalLM
    original = auto.from_pretrained

    def from_pretrained(*args, **kwargs):
        model = original(*args, **kwargs)
        if kwargs.get("gguf_file"):
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
        return model

    auto.from_pretrained = from_pretrained
    try:
        return str(ensure_model(name, progress=False))
    finally:
        auto.from_pretrained = original


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--real":
        print(f"{sys.argv[2]}: {real_model(sys.argv[2])}")
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=32768)
    args = ap.parse_args()
    config = write_model(args.folder, args.layers, args.max_len)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(args.folder, "tokenizer.json"))
    ids = tok.encode("Hello, my name is").ids
    print(
        f"{args.folder}: Llama-3-8B shape ({config['num_hidden_layers']} layers, "
        f"{config['num_key_value_heads']}x{config['head_dim']} KV heads, "
        f"{kv_bytes_per_token(config) / 2**10:.0f} KiB KV per token), tokenizer vocab "
        f"{tok.get_vocab_size()}, 'Hello, my name is' -> {ids[:6]}..., "
        f"decode(5000, 100000) -> {tok.decode([5000, 100000])!r}"
    )


if __name__ == "__main__":
    main()
