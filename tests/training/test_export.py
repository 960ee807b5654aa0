"""Parity of exported weights against Hugging Face transformers, and the export CLI.

Run: `pytest tests/training/test_export.py` (needs the dev extra: transformers).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from apollo_ray.config import ModelConfig
from apollo_ray.export import main
from apollo_ray.method.model import TransformerLM
from apollo_ray.training.checkpoints import CHECKPOINT_FORMAT
from apollo_ray.training.export import ExportError, export_checkpoint, to_hf

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

V, B, T = 100, 2, 16
SPECIALS = {"bert": ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], "gpt": ["<|endoftext|>"]}


def minimal_checkpoint(model: TransformerLM) -> dict:
    """What export reads of a training checkpoint: weights and model config."""
    return {
        "format": CHECKPOINT_FORMAT,
        "model": model.state_dict(),
        "model_config": model.cfg.model_dump(),
    }


def scrambled_model(kind: str, n_physical: int = 3) -> TransformerLM:
    """A tiny model with every parameter perturbed, so any mis-mapped weight shows in logits."""
    torch.manual_seed(0)
    cfg = ModelConfig(kind=kind, n_layer=3, d_model=64, n_head=4, vocab_size=V, max_seq_len=32)
    model = TransformerLM(cfg, n_physical)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def ids() -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))


def max_diff(model: TransformerLM, hf: torch.nn.Module, plan: list[int] | None) -> float:
    with torch.no_grad():
        return (model(ids(), plan=plan)[0] - hf(ids()).logits).abs().max().item()


def write_tokenizer(path: Path, kind: str) -> Path:
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(unk_token=SPECIALS[kind][0]))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    trainer = tokenizers.trainers.WordLevelTrainer(special_tokens=SPECIALS[kind])
    tok.train_from_iterator(["the cat sat on the mat", "a dog ate my homework"], trainer)
    tok.save(str(path))
    return path


@pytest.mark.parametrize("plan", [None, [0, 0, 1, 2, 2]])
@pytest.mark.parametrize("kind", ["bert", "gpt"])
def test_logits_match_hf(kind: str, plan: list[int] | None) -> None:
    model = scrambled_model(kind)
    hf = to_hf(model, plan)
    assert hf.config.num_hidden_layers == len(plan or model.layers)
    assert max_diff(model, hf, plan) < 1e-4


def test_hf_is_sensitive_to_every_layer() -> None:
    # Guards the parity test itself: exporting the wrong plan must be visible in the logits.
    model = scrambled_model("gpt")
    assert max_diff(model, to_hf(model, [0, 1, 2]), [0, 1, 1]) > 1e-2


@pytest.mark.parametrize("kind", ["bert", "gpt"])
def test_checkpoint_round_trip(tmp_path: Path, kind: str) -> None:
    model = scrambled_model(kind, n_physical=2)
    plan = [0, 0, 1, 1]
    tok = write_tokenizer(tmp_path / "tokenizer.json", kind)
    ckpt = tmp_path / "step.pt"
    torch.save(
        {
            "format": CHECKPOINT_FORMAT,
            "model": model.state_dict(),
            "model_config": model.cfg.model_dump(),
            "plan": plan,
            "tokenizer_json": str(tok),
        },
        ckpt,
    )
    out = export_checkpoint(ckpt, tmp_path / "hf")
    assert (out / "model.safetensors").is_file()
    auto = (
        transformers.AutoModelForMaskedLM if kind == "bert" else transformers.AutoModelForCausalLM
    )
    hf = auto.from_pretrained(out)
    assert hf.config.num_hidden_layers == 4
    assert max_diff(model, hf, plan) < 1e-4

    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert (
        tokenizer("the cat")["input_ids"]
        == tokenizers.Tokenizer.from_file(str(tok)).encode("the cat").ids
    )
    if kind == "bert":
        assert tokenizer.mask_token == "[MASK]" and tokenizer.pad_token_id == hf.config.pad_token_id
    else:
        assert tokenizer.eos_token == "<|endoftext|>" == tokenizer.bos_token
        assert tokenizer.eos_token_id == hf.config.eos_token_id


def test_export_errors(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="no such checkpoint"):
        export_checkpoint(tmp_path / "missing.pt", tmp_path / "out")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ExportError, match=r"torch\.load"):
        export_checkpoint(junk, tmp_path / "out")
    torch.save({"weights": {}}, tmp_path / "other.pt")
    with pytest.raises(ExportError, match="not an apollo_ray checkpoint"):
        export_checkpoint(tmp_path / "other.pt", tmp_path / "out")

    model = scrambled_model("bert")
    ckpt = tmp_path / "ok.pt"
    torch.save(minimal_checkpoint(model), ckpt)
    torch.save({**torch.load(ckpt, weights_only=True), "plan": [0, 3]}, tmp_path / "bad_plan.pt")
    with pytest.raises(ExportError, match="bad 'plan'"):
        export_checkpoint(tmp_path / "bad_plan.pt", tmp_path / "out")
    with pytest.raises(ExportError, match="no such tokenizer"):
        export_checkpoint(ckpt, tmp_path / "out", tokenizer=tmp_path / "nope.json")
    gpt_tok = write_tokenizer(tmp_path / "gpt.json", "gpt")
    with pytest.raises(ExportError, match=r"lacks the bert special tokens"):
        export_checkpoint(ckpt, tmp_path / "out", tokenizer=gpt_tok)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = scrambled_model("gpt")
    ckpt = tmp_path / "ok.pt"
    torch.save(minimal_checkpoint(model), ckpt)
    assert main([str(ckpt), str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "config.json").is_file()
    assert capsys.readouterr().out.strip() == str(tmp_path / "hf")
    assert main([str(tmp_path / "missing.pt"), str(tmp_path / "hf")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_cli_entry_point(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "apollo_ray.export"]
    run = subprocess.run([*cmd, "--help"], capture_output=True, text=True, check=False)
    assert run.returncode == 0 and "--tokenizer" in run.stdout
    run = subprocess.run([*cmd, "nope.pt", str(tmp_path)], capture_output=True, text=True)
    assert run.returncode == 2 and "error: " in run.stderr and "Traceback" not in run.stderr
