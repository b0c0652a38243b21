"""Throughput and peak memory of `leviathan prepare` (the local path) against corpus size
and the number of worker processes.

    python -m benchmarks.prepare --sizes 50 400 --workers 1 2   # or: make bench-prepare

Corpora are generated, not downloaded: folders of 2 MB text files of the bundled
Shakespeare's lines, shuffled with a seed per file (so no two files are alike), `SIZE` MB
in all. Each case runs `leviathan prepare --input DIR --workers N` (default settings:
BPE 2048, `data.tokenizer.sample_chars` 10M, `data.batch_chars` 4M) in a fresh process, as
a user would, and reports:

- MB/s: corpus MB / the wall time of the whole command (interpreter start included);
- peak RSS: the largest resident set of the process tree (the command and its workers)
  summed, sampled every 50 ms; and the same in PSS, which counts pages the forked workers
  share with their parent once (the memory the machine actually gives up).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from benchmarks.harness import RESULTS, markdown_table, write_json

FILE_MB = 2


def make_corpus(folder: Path, size_mb: int) -> int:
    """`size_mb` MB of shuffled Shakespeare lines in 2 MB files; the bytes written."""
    from leviathan.data import bundled_documents

    lines = [line for d in bundled_documents() for line in d.text.splitlines() if line.strip()]
    folder.mkdir(parents=True, exist_ok=True)
    total, target = 0, size_mb * 10**6
    for number in range(-(-size_mb // FILE_MB)):
        rng = random.Random(number)
        rng.shuffle(lines)
        text, at, want = [], 0, min(FILE_MB * 10**6, target - total)
        for line in lines:
            text.append(line)
            at += len(line) + 1
            if at >= want:
                break
        data = ("\n".join(text) + "\n").encode("utf-8")
        (folder / f"part-{number:05d}.txt").write_bytes(data)
        total += len(data)
    return total


class PeakMemory:
    """Samples the summed RSS and PSS of a process and its children until stopped."""

    def __init__(self, pid: int, every: float = 0.05):
        self.root, self.every = psutil.Process(pid), every
        self.rss = self.pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = pss = 0
            try:
                for proc in [self.root, *self.root.children(recursive=True)]:
                    info = proc.memory_full_info()
                    rss, pss = rss + info.rss, pss + info.pss
            except psutil.Error:
                pass  # a worker ended between the listing and the reading
            self.rss, self.pss = max(self.rss, rss), max(self.pss, pss)
            self._stop.wait(self.every)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def measure(corpus: Path, nbytes: int, workers: int, scratch: Path) -> dict:
    out = scratch / f"ds-{workers}"
    shutil.rmtree(out, ignore_errors=True)
    command = [
        sys.executable,
        "-m",
        "leviathan.cli",
        "prepare",
        "--input",
        str(corpus),
        "--workers",
        str(workers),
        f"data.dir={out}",
    ]
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    memory = PeakMemory(proc.pid)
    log, _ = proc.communicate()
    wall = time.perf_counter() - started
    memory.stop()
    if proc.returncode:
        raise SystemExit(f"prepare failed:\n{log}")
    index = json.loads((out / "index.json").read_text())
    shutil.rmtree(out)
    return {
        "corpus_mb": nbytes / 1e6,
        "workers": workers,
        "wall_s": round(wall, 2),
        "mb_per_s": round(nbytes / 1e6 / wall, 2),
        "peak_rss_mb": round(memory.rss / 2**20),
        "peak_pss_mb": round(memory.pss / 2**20),
        "train_tokens": index["splits"]["train"]["tokens"],
        "shards": len(index["splits"]["train"]["shards"]),
        "tokenizer_trained_on": index["tokenizer"]["trained_on_characters"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[50, 400], metavar="MB")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", default=str(RESULTS / "prepare.json"))
    parser.add_argument("--scratch", help="folder for the corpora (default: a temporary one)")
    args = parser.parse_args()
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="prepare-bench-"))
    rows = []
    try:
        for size in args.sizes:
            corpus = scratch / f"corpus-{size}mb"
            shutil.rmtree(corpus, ignore_errors=True)
            nbytes = make_corpus(corpus, size)
            for workers in args.workers:
                row = measure(corpus, nbytes, workers, scratch)
                rows.append(row)
                print(json.dumps(row), flush=True)
            shutil.rmtree(corpus)
    finally:
        if not args.scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    header = ["corpus MB", "workers", "wall s", "MB/s", "peak RSS MB", "peak PSS MB", "shards"]
    cells = [
        [f"{r['corpus_mb']:.0f}", r["workers"], f"{r['wall_s']:.1f}", f"{r['mb_per_s']:.2f}"]
        + [r["peak_rss_mb"], r["peak_pss_mb"], r["shards"]]
        for r in rows
    ]
    print("\n" + markdown_table(header, cells))
    result = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "settings": "defaults of configs/tiny.yaml's data section, data.inputs a folder",
        "results": rows,
    }
    write_json(args.out, result, indent=1)


if __name__ == "__main__":
    main()
