"""A real Ray cluster on this machine for the Ray tests (tests/test_distributed.py,
tests/test_journeys_ray.py): a head on loopback, as the README starts it, and any nodes a
test adds with `ray start --address`.

It runs in network, PID and mount namespaces of its own (`unshare`; CI runs as root): Ray
resolves 127.0.0.1 only in a private network namespace, `ray stop` there sees this
cluster's processes and no one else's, Ray's /tmp/ray is the test's folder `$OUT/ray-tmp`,
and every process of the cluster ends when the script does, even on a timeout.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEAD = "http://127.0.0.1:8265"

# Before the test's script: the head up (with $HEAD_CPUS CPUs) and its job API answering,
# the working directory the repo. $NODE: the options of every node (a small object store:
# the jobs pass no big objects); `add_node N` starts another node of one CPU, its output in
# $OUT/node-N.log. At the end `ray stop`, as the README's last step: $OUT/stop.rc.
PRELUDE = f"""
set -u
ip link set lo up
mkdir -p /tmp/ray "$OUT/ray-tmp" && mount --bind "$OUT/ray-tmp" /tmp/ray || exit 1
export RAY_AUTH_MODE=disabled OMP_NUM_THREADS=1 PATH="$BIN:$PATH"
NODE="--disable-usage-stats --object-store-memory 100000000"
add_node() {{ ray start --address 127.0.0.1:6379 --num-cpus 1 $NODE > "$OUT/node-$1.log" 2>&1; }}
ray start --head --num-cpus "$HEAD_CPUS" --include-dashboard=true \\
    --dashboard-host 127.0.0.1 --dashboard-port 8265 $NODE > "$OUT/head.log" 2>&1 || exit 1
trap 'ray stop > "$OUT/stop.log" 2>&1; echo $? > "$OUT/stop.rc"' EXIT
for _ in $(seq 60); do
    ray job list --address {HEAD} > /dev/null 2>&1 && break
    sleep 1
done
cd "$REPO"
"""


def run_on_cluster(script: str, out: Path, timeout: int, head_cpus: int = 2, **env: str) -> None:
    """Run the bash `script` once the head is up, with `$OUT` (= `out`), `$REPO`, `$BIN`
    (this Python's bin folder) and `env` set. It writes what the test reads under `out`."""
    env = dict(
        os.environ,
        BIN=str(Path(sys.executable).parent),
        OUT=str(out),
        REPO=str(REPO),
        HEAD_CPUS=str(head_cpus),
        **env,
    )
    namespaces = ["unshare", "--net", "--pid", "--mount-proc", "--kill-child"]
    subprocess.run([*namespaces, "bash", "-c", PRELUDE + script], env=env, timeout=timeout)
