"""The default corpus, shipped inside the package: Shakespeare's plays, sonnets and poems.

`corpus/shakespeare.tar.xz` holds the `*_gut.txt` files of the Open Knowledge
Foundation's Shakespeare corpus (Project Gutenberg texts, public domain) with its
SOURCE.md and metadata.ini (attribution, CC BY 2.5 packaging). Rebuild it, byte for byte,
from a folder of those files (the archive unpacked is one) with

    python -m leviathan.data.bundled FOLDER
"""

from __future__ import annotations

import functools
import io
import lzma
import os
import sys
import tarfile
from importlib import resources
from pathlib import Path

from leviathan.data.documents import Document, decode_utf8
from leviathan.errors import DataError

ARCHIVE = "shakespeare.tar.xz"
PREFIX = "shakespeare"
ATTRIBUTION = ("SOURCE.md", "metadata.ini")
MTIME = 1704067200  # 2024-01-01T00:00:00Z, fixed so the archive is reproducible


def bundled_archive() -> resources.abc.Traversable:
    return resources.files("leviathan.data").joinpath("corpus", ARCHIVE)


def bundled_documents() -> list[Document]:
    """The bundled corpus, one document per text, sorted by name (`shakespeare/<file>`)."""
    return list(_bundled_documents())


@functools.lru_cache(maxsize=1)
def _bundled_documents() -> tuple[Document, ...]:
    archive = bundled_archive()
    try:
        data = archive.read_bytes()
    except OSError as e:
        raise DataError(f"the bundled corpus {ARCHIVE} is missing from the package: {e}") from None
    docs = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:xz") as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            if member.isfile() and member.name.endswith("_gut.txt"):
                raw = tar.extractfile(member).read()
                docs.append(Document(member.name, decode_utf8(raw, f"{ARCHIVE}/{member.name}")))
    if not docs:
        raise DataError(f"the bundled corpus {ARCHIVE} holds no text")
    return tuple(docs)


def build_bundle(source: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the archive of `source`'s `*_gut.txt` files plus attribution, reproducibly."""
    source, out = Path(source), Path(out)
    texts = sorted(p.name for p in source.glob("*_gut.txt"))
    if not texts:
        raise DataError(f"{source} holds no *_gut.txt file")
    names = sorted(texts + [n for n in ATTRIBUTION if (source / n).is_file()])
    tmp = out.with_name(out.name + ".tmp")
    with lzma.open(tmp, "wb", preset=9 | lzma.PRESET_EXTREME) as xz:
        with tarfile.open(fileobj=xz, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for name in names:
                data = (source / name).read_bytes()
                info = tarfile.TarInfo(f"{PREFIX}/{name}")
                info.size, info.mtime, info.mode = len(data), MTIME, 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, out)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m leviathan.data.bundled FOLDER (the corpus's *_gut.txt files)")
    src = sys.argv[1]
    dst = Path(__file__).parent / "corpus" / ARCHIVE
    print(f"wrote {build_bundle(src, dst)} ({dst.stat().st_size:,} bytes)")
