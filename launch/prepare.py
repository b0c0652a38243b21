"""`leviathan prepare` as a Ray job: the encode pass runs on the cluster with Ray Data.

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python launch/prepare.py --input /shared/corpus data.dir=/shared/data/web

Inputs and data.dir must be on storage every node sees. Every option of `leviathan
prepare` applies; the job connects to the cluster it runs on (`--ray auto`).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

from leviathan.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["prepare", "--ray", "auto", *sys.argv[1:]]))
