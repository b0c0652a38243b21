"""The encode pass of `prepare` on a Ray cluster, with Ray Data.

One row per input file; Ray Data workers read their file (it must be on storage every node
sees), split and encode its documents with the same `encode_batch` the local path uses,
and the driver receives the results in corpus order (`preserve_order`) and writes the
shards: the dataset is byte for byte the one the local path writes. A worker holds one
file's documents and ids at a time: keep input files to a few hundred MB (FineWeb-style
dumps come in such shards).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterator

import numpy as np

from leviathan.data.documents import file_documents
from leviathan.errors import DataError


def encode_files(
    address: str, files: list[tuple[str, int]], plan, text_field: str
) -> Iterator[dict]:
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
                include_dashboard=False if address == "local" else None,
            )
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise DataError(f"--ray {address}: cannot reach the Ray cluster ({e})") from None
    try:
        ray.data.DataContext.get_current().execution_options.preserve_order = True
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
            yield pickle.loads(row["encoded"])
    except ray.exceptions.RayTaskError as e:
        cause = e.cause if isinstance(getattr(e, "cause", None), DataError) else None
        raise (cause or DataError(f"a Ray Data worker failed: {e}")) from None
    finally:
        if owned:
            ray.shutdown()


def _encode_rows(batch: dict[str, np.ndarray], plan, text_field: str) -> dict[str, np.ndarray]:
    """Ray Data UDF: read and encode each row's file; the result pickled (ids of varying
    length, in one binary column)."""
    from leviathan.data.prepare import encode_batch

    out = []
    for path, first, count in zip(batch["path"], batch["first"], batch["count"], strict=True):
        docs = list(file_documents(str(path), text_field))
        if len(docs) != int(count):
            raise DataError(f"{path} changed while being prepared; run prepare again")
        out.append(pickle.dumps(encode_batch(plan, int(first), docs)))
    return {"encoded": np.array(out, dtype=object)}
