"""Export a trained `TransformerLM` to Hugging Face: `BertForMaskedLM` or `GPT2LMHeadModel`.

`to_hf(model, plan)` copies the weights into a fresh HF model whose layer i is physical layer
`plan[i]`, so a mid-training Apollo model with shared layers becomes a plain len(plan)-layer
model. `export_checkpoint` does the same for a checkpoint file and writes a folder that
`AutoModelForMaskedLM` / `AutoModelForCausalLM` and `AutoTokenizer` `.from_pretrained` read.

Its command line is `python -m apollo_ray.export CHECKPOINT OUT_DIR [--tokenizer PATH]`
(`apollo_ray/export.py`); the registered best model of a study is exported the same way.
`transformers` is imported only when exporting.
Tests (parity of logits against HF): `pytest tests/training/test_export.py`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import ValidationError
from torch import nn

from apollo_ray.config import ModelConfig, format_validation_error
from apollo_ray.method.model import TransformerLM
from apollo_ray.storage import fetch, is_uri, redact
from apollo_ray.training import checkpoints

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

__all__ = ["ExportError", "export_checkpoint", "to_hf"]

# Special tokens the tokenizer must contain, as transformers' tokenizer arguments.
SPECIAL_TOKENS = {
    "bert": {
        "pad_token": "[PAD]",
        "unk_token": "[UNK]",
        "cls_token": "[CLS]",
        "sep_token": "[SEP]",
        "mask_token": "[MASK]",
    },
    "gpt": {
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
    },
}


class ExportError(ValueError):
    """The checkpoint or tokenizer cannot be exported; the message says which file and why."""


def to_hf(
    model: TransformerLM, plan: Sequence[int] | None = None, **config_kwargs: Any
) -> PreTrainedModel:
    """A `BertForMaskedLM` or `GPT2LMHeadModel` (eval mode) computing `model(..., plan=plan)`.

    `config_kwargs` go to the HF config (e.g. `pad_token_id`). Dropout rates are carried over.
    """
    try:
        import transformers
    except ImportError:
        raise ImportError("exporting needs `transformers`: pip install 'apollo_ray[dev]'") from None
    cfg, plan = model.cfg, model.resolve_plan(plan)
    if cfg.kind == "bert":
        config = transformers.BertConfig(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.d_model,
            num_hidden_layers=len(plan),
            num_attention_heads=cfg.n_head,
            intermediate_size=cfg.ff_dim,
            hidden_act="gelu",  # exact (erf) GELU
            hidden_dropout_prob=cfg.dropout,
            attention_probs_dropout_prob=cfg.dropout,
            max_position_embeddings=cfg.max_seq_len,
            type_vocab_size=2,
            layer_norm_eps=cfg.eps,
            **config_kwargs,
        )
        hf, weights = transformers.BertForMaskedLM(config), _bert_weights(model, plan)
    else:
        config_kwargs = {"bos_token_id": None, "eos_token_id": None, **config_kwargs}
        config = transformers.GPT2Config(
            vocab_size=cfg.vocab_size,
            n_positions=cfg.max_seq_len,
            n_embd=cfg.d_model,
            n_layer=len(plan),
            n_head=cfg.n_head,
            n_inner=cfg.ff_dim,
            activation_function="gelu_new",  # tanh-approximate GELU
            resid_pdrop=cfg.dropout,
            embd_pdrop=cfg.dropout,
            attn_pdrop=cfg.dropout,
            layer_norm_epsilon=cfg.eps,
            **config_kwargs,
        )
        hf, weights = transformers.GPT2LMHeadModel(config), _gpt_weights(model, plan)
    with torch.no_grad():
        hf.load_state_dict(weights, strict=True)  # raises on any missing or unexpected key
    if hf.get_output_embeddings().weight is not hf.get_input_embeddings().weight:
        raise RuntimeError("transformers untied the output embeddings; the export would be wrong")
    return hf.eval()


def _linear(prefix: str, m: nn.Linear, conv1d: bool = False) -> dict[str, torch.Tensor]:
    # HF GPT-2's Conv1D stores the weight as (in, out), the transpose of nn.Linear's (out, in).
    return {f"{prefix}.weight": m.weight.t() if conv1d else m.weight, f"{prefix}.bias": m.bias}


def _norm(prefix: str, m: nn.LayerNorm) -> dict[str, torch.Tensor]:
    return {f"{prefix}.weight": m.weight, f"{prefix}.bias": m.bias}


def _bert_weights(model: TransformerLM, plan: list[int]) -> dict[str, torch.Tensor]:
    head = model.head
    w = {
        "bert.embeddings.word_embeddings.weight": model.wte.weight,
        "bert.embeddings.position_embeddings.weight": model.wpe.weight,
        "bert.embeddings.token_type_embeddings.weight": torch.zeros(2, model.cfg.d_model),
        **_norm("bert.embeddings.LayerNorm", model.ln_emb),
        **_linear("cls.predictions.transform.dense", head.dense),
        **_norm("cls.predictions.transform.LayerNorm", head.ln),
        "cls.predictions.decoder.weight": model.wte.weight,  # tied
        "cls.predictions.decoder.bias": head.bias,  # tied to cls.predictions.bias
        "cls.predictions.bias": head.bias,
    }
    for i, p in enumerate(plan):
        layer, pre = model.layers[p], f"bert.encoder.layer.{i}"
        qkv_w, qkv_b = layer.attn.qkv.weight.chunk(3), layer.attn.qkv.bias.chunk(3)
        for name, wt, b in zip(("query", "key", "value"), qkv_w, qkv_b, strict=True):
            w |= {f"{pre}.attention.self.{name}.weight": wt, f"{pre}.attention.self.{name}.bias": b}
        w |= _linear(f"{pre}.attention.output.dense", layer.attn.proj)
        w |= _norm(f"{pre}.attention.output.LayerNorm", layer.ln_attn)
        w |= _linear(f"{pre}.intermediate.dense", layer.mlp.fc)
        w |= _linear(f"{pre}.output.dense", layer.mlp.proj)
        w |= _norm(f"{pre}.output.LayerNorm", layer.ln_mlp)
    return w


def _gpt_weights(model: TransformerLM, plan: list[int]) -> dict[str, torch.Tensor]:
    w = {
        "transformer.wte.weight": model.wte.weight,
        "transformer.wpe.weight": model.wpe.weight,
        **_norm("transformer.ln_f", model.head.ln_f),
        "lm_head.weight": model.wte.weight,  # tied
    }
    for i, p in enumerate(plan):
        block, pre = model.layers[p], f"transformer.h.{i}"
        w |= _norm(f"{pre}.ln_1", block.ln_1) | _norm(f"{pre}.ln_2", block.ln_2)
        w |= _linear(f"{pre}.attn.c_attn", block.attn.qkv, conv1d=True)
        w |= _linear(f"{pre}.attn.c_proj", block.attn.proj, conv1d=True)
        w |= _linear(f"{pre}.mlp.c_fc", block.mlp.fc, conv1d=True)
        w |= _linear(f"{pre}.mlp.c_proj", block.mlp.proj, conv1d=True)
    return w


def export_checkpoint(
    checkpoint: str | Path, out_dir: str | Path, tokenizer: str | Path | None = None
) -> Path:
    """Write `checkpoint` as a Hugging Face model folder (safetensors) at `out_dir`.

    The checkpoint's `"plan"` (default: each physical layer once) becomes the HF layers. The
    tokenizer (`tokenizer`, else the checkpoint's `"tokenizer_json"`; a tokenizer.json or a
    folder holding one) is written alongside, with its special tokens, when there is one.
    """
    ckpt = _load_checkpoint(Path(checkpoint))
    try:
        cfg = ModelConfig.model_validate(ckpt["model_config"])
    except ValidationError as e:
        raise ExportError(format_validation_error(e, f"{checkpoint}: model_config")) from None
    if cfg.vocab_size is None:
        raise ExportError(f"{checkpoint}: model_config has no vocab_size")
    state = ckpt["model"]
    n_physical = 1 + max(
        (int(k.split(".")[1]) for k in state if k.startswith("layers.")), default=0
    )
    model = TransformerLM(cfg, n_physical)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ExportError(f"{checkpoint}: weights do not match model_config: {e}") from None
    try:
        plan = model.resolve_plan(ckpt.get("plan"))
    except (TypeError, ValueError) as e:
        raise ExportError(f"{checkpoint}: bad 'plan': {e}") from None

    tok_path = tokenizer if tokenizer is not None else ckpt.get("tokenizer_json")
    fast = _hf_tokenizer(str(tok_path), cfg) if tok_path is not None else None
    special_ids = {}
    if fast is not None:  # record the special token ids in the model config too
        names = ("pad_token_id",) if cfg.kind == "bert" else ("bos_token_id", "eos_token_id")
        special_ids = {n: getattr(fast, n) for n in names}

    hf = to_hf(model, plan, **special_ids)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out)
    if fast is not None:
        fast.save_pretrained(out)
    return out


def _load_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ExportError(f"{path}: no such checkpoint file")
    try:
        return checkpoints.load(path)
    except ValueError as e:
        raise ExportError(str(e)) from None
    except Exception as e:  # pickle, zip and weights_only errors all mean "not a checkpoint"
        raise ExportError(f"{path}: not a checkpoint readable by torch.load: {e}") from None


def _hf_tokenizer(location: str, cfg: ModelConfig) -> PreTrainedTokenizerFast:
    """A PreTrainedTokenizerFast for the tokenizer.json at `location` (a file, its folder, or
    a URI such as the `s3://` data folder a cluster trained from), checked against the model."""
    from transformers import PreTrainedTokenizerFast

    path = redact(location)  # what messages name
    raw = _read_tokenizer(location)
    if raw.get_vocab_size() > cfg.vocab_size:
        raise ExportError(
            f"{path}: tokenizer has {raw.get_vocab_size()} tokens, more than the model's "
            f"vocab_size {cfg.vocab_size}"
        )
    specials = SPECIAL_TOKENS[cfg.kind]
    missing = sorted({t for t in specials.values() if raw.token_to_id(t) is None})
    if missing:
        raise ExportError(f"{path}: tokenizer lacks the {cfg.kind} special tokens {missing}")
    return PreTrainedTokenizerFast(
        tokenizer_object=raw, model_max_length=cfg.max_seq_len, **specials
    )


def _read_tokenizer(location: str) -> Tokenizer:
    """The `tokenizers` Tokenizer in the tokenizer.json at `location` (a file, or a local
    folder holding one; a URI is fetched to a temporary file first)."""
    from tokenizers import Tokenizer

    missing = ExportError(f"{redact(location)}: no such tokenizer file (pass --tokenizer PATH)")
    with tempfile.TemporaryDirectory() as tmp:
        if is_uri(location):
            path = Path(tmp) / "tokenizer.json"
            if not fetch(location, path):
                raise missing
        else:
            path = Path(location)
            path = path / "tokenizer.json" if path.is_dir() else path
            if not path.is_file():
                raise missing
        try:
            return Tokenizer.from_file(str(path))
        except Exception as e:
            raise ExportError(f"{redact(location)}: not a tokenizers tokenizer.json: {e}") from None
