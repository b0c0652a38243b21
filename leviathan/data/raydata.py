"""The encode pass of `prepare` on a Ray cluster, with Ray Data.

One row per input file; Ray Data workers read their file (it must be on storage every node
sees), split and encode its documents with the same `encode_batch` the local path uses,
and the driver receives the results in corpus order (`preserve_order`) and writes the
shards: the dataset is byte for byte the one the local path writes. A worker holds one
file's documents and ids at a time: keep input files to a few hundred MB (FineWeb-style
dumps come in such shards).
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Iterator

import numpy as np

from leviathan.data.documents import file_documents
from leviathan.data.encode import Encoded, Plan, encode_batch
from leviathan.errors import DataError


def encode_files(
    address: str, files: list[tuple[str, int]], plan: Plan, text_field: str
) -> Iterator[Encoded]:
    """Encoded documents of `files` ((path, documents) in corpus order), file by file."""
    try:
        import ray
        import ray.data
    except ImportError as e:
        raise DataError(f"--ray needs Ray Data (pip install 'ray[data]'): {e}") from None
    owned = not ray.is_initialized()
    if owned:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        try:
            ray.init(
                address=None if address == "local" else address,
                log_to_driver=False,
                logging_level=logging.WARNING,
                include_dashboard=False if address == "local" else None,
            )
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise DataError(f"--ray {address}: cannot reach the Ray cluster ({e})") from None
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # no progress report per block
    try:
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True
        context.enable_progress_bars = False
        rows, first = [], 0
        for path, count in files:
            if count:
                rows.append({"path": os.path.abspath(path), "first": first, "count": count})
            first += count
        dataset = ray.data.from_items(rows, override_num_blocks=max(len(rows), 1))
        encoded = dataset.map_batches(
            _encode_rows,
            fn_kwargs={"plan": plan, "text_field": text_field},
            batch_size=1,
            batch_format="numpy",
        )
        for row in encoded.iter_rows():
            result = pickle.loads(row["encoded"])
            if isinstance(result, DataError):  # a worker's error about the data, as is
                raise result
            yield result
    finally:
        if owned:
            ray.shutdown()


def _encode_rows(
    batch: dict[str, np.ndarray], plan: Plan, text_field: str
) -> dict[str, np.ndarray]:
    """Ray Data UDF: read and encode each row's file; the result pickled (ids of varying
    length, in one binary column). A DataError is returned, not raised: Ray would wrap it
    in its own exceptions, and the user is owed the message naming the file."""
    out = []
    for path, first, count in zip(batch["path"], batch["first"], batch["count"], strict=True):
        try:
            docs = list(file_documents(str(path), text_field))
            if len(docs) != int(count):
                raise DataError(f"{path} changed while being prepared; run prepare again")
            result = encode_batch(plan, int(first), docs)
        except DataError as err:
            result = err
        out.append(pickle.dumps(result))
    return {"encoded": np.array(out, dtype=object)}
