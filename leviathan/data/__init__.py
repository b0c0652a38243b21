"""Data: documents -> SentencePiece tokenizer -> token shards + index -> batches.

See docs/design.md, Data. `prepare(cfg.data)` builds (or reuses) a dataset folder;
`load_index` / `load_tokens` read it back (shards memory-mapped end to end);
`get_batch` / `eval_windows` make batches.
"""

from leviathan.data.bundled import bundled_documents
from leviathan.data.documents import Document, iter_documents, read_documents, split_point
from leviathan.data.folder import recorded_inputs
from leviathan.data.prepare import prepare
from leviathan.data.sampler import eval_windows, get_batch, global_batch_starts
from leviathan.data.scan import split_documents
from leviathan.data.shards import DataIndex, TokenStream, load_index, load_tokens, token_dtype
from leviathan.data.tokenizer import Tokenizer

__all__ = [
    "DataIndex",
    "Document",
    "TokenStream",
    "Tokenizer",
    "bundled_documents",
    "eval_windows",
    "get_batch",
    "global_batch_starts",
    "iter_documents",
    "load_index",
    "load_tokens",
    "prepare",
    "read_documents",
    "recorded_inputs",
    "split_documents",
    "split_point",
    "token_dtype",
]
