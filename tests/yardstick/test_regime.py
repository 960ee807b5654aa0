"""The regime said beside a speedup: tokens per parameter, epochs, scratch against the unigram
entropy."""

import collections
import math

from conftest import tiny_run

from apollo_ray.data import load_manifest, open_split
from apollo_ray.method.model import TransformerLM
from apollo_ray.yardstick.regime import Regime, regime


def test_the_regime_of_a_run_counts_what_it_trains_on(gpt_data, tmp_path):
    cfg = tiny_run(gpt_data, tmp_path, train={"steps": 10, "micro_batch": 4, "grad_accum": 2})
    r = regime(cfg, scratch_loss=3.0)
    manifest = load_manifest(gpt_data)
    model = TransformerLM(cfg.model.model_copy(update={"vocab_size": manifest.vocab_size}))
    assert r.params == sum(p.numel() for p in model.layers.parameters())
    assert r.tokens == 10 * 2 * 4 * cfg.data.seq_len
    assert r.epochs == r.tokens / manifest.splits["train"].tokens
    counts = collections.Counter(t for shard in open_split(gpt_data, "train") for t in shard)
    total = sum(counts.values())
    entropy = -sum(c / total * math.log(c / total) for c in counts.values())
    assert math.isclose(r.entropy, entropy, rel_tol=1e-9)


def test_a_scratch_loss_near_the_unigram_entropy_is_said_to_be_on_the_plateau():
    off = Regime(params=1000, tokens=22_000, train_tokens=10_000, entropy=3.0, scratch_loss=2.0)
    assert off.describe() == (
        "22 tokens per parameter, 2.2 epochs, scratch at 2 nats against a unigram entropy of 3"
    )
    on = Regime(1000, 500, 10_000, 3.0, 2.9)
    assert on.on_plateau and on.describe().endswith("(still near the unigram plateau)")
    assert Regime(1000, 500, 10_000, 3.0, None).on_plateau is None
