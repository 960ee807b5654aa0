"""Pretraining data: read text sources, train a tokenizer, write token shards, serve batches.

Prepare once (see `python -m apollo_ray.data --help`):

    python -m apollo_ray.data prepare demo --out data/bert --kind bert

then train from `DataConfig(path="data/bert")` with `batches.Batches(config, "bert", "train", seed)`
(`apollo_ray.data.batches`, the one module here that needs torch: not imported by the package,
so preparing data and the commands' pre-flight checks start without it).
"""

from .shards import Manifest, ShardInfo, SplitInfo, check_data, load_manifest, open_split, prepare
from .sources import DataError, Source, iter_documents, resolve_source
from .tokenizer import SPECIAL_TOKENS, load_tokenizer, train_tokenizer

__all__ = [
    "SPECIAL_TOKENS",
    "DataError",
    "Manifest",
    "ShardInfo",
    "Source",
    "SplitInfo",
    "check_data",
    "iter_documents",
    "load_manifest",
    "load_tokenizer",
    "open_split",
    "prepare",
    "resolve_source",
    "train_tokenizer",
]
