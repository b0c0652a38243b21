"""DeepSpeed under the one loop, for real: `deepspeed --num_gpus 2 launch/train.py` on gloo.

Every run here is a real launch of separate processes on loopback. The oracle is the
plain one-process engine in this process: with dropout off, 2 ranks with micro-batch b
take the same steps as 1 rank with micro-batch b and 2 accumulation steps (same global
batch, same seed), so their losses agree to float tolerance, at every ZeRO stage, for
expert parallelism, and across a resume on another number of ranks.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from ray_cluster import HEAD, run_on_cluster

from leviathan.config import config_from_dict, load_config
from leviathan.errors import ConfigError
from leviathan.parallel.world import check_parallel
from leviathan.train.trainer import train

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
STEPS, LOSS_TOL = 8, 2e-4
MOE = {"kind": "moe", "n_experts": 4, "top_k": 2, "expert_hidden_mult": 2.0}


@pytest.fixture(scope="module")
def base(tmp_path_factory, corpus) -> dict:
    """A tiny model on three plays, its dataset prepared once for every launch."""
    root = tmp_path_factory.mktemp("dist")
    raw = {
        "model": {"block_size": 32, "n_layer": 2, "n_head": 2, "d_model": 32, "dropout": 0.0},
        "data": {
            "inputs": [str(corpus)],
            "dir": str(root / "data"),
            "tokenizer": {"vocab_size": 384},
        },
        "train": {
            "seq_len": 32,
            "micro_batch_size": 4,
            "max_steps": STEPS,
            "lr": 3e-3,
            "warmup_steps": 2,
            "eval_interval": STEPS,
            "eval_tokens": 512,
            "ckpt_interval": 4,
            "threads": 1,
        },
        "run": {"wandb": "disabled", "sample_tokens": 4},
    }
    config_from_dict(raw)  # valid before anything launches
    return {"root": root, "raw": raw}


def config_file(base: dict, name: str, ffn: dict | None = None) -> Path:
    raw = json.loads(json.dumps(base["raw"]))
    if ffn:
        raw["model"]["ffn"] = ffn
    path = base["root"] / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def launch(
    config: Path,
    ranks: int,
    run_dir: Path,
    *overrides: str,
    flags=(),
    check=True,
    script="launch/train.py",
):
    """`deepspeed --num_gpus N <script>` (N > 1) or a plain one-rank DeepSpeed start."""
    args = ["--config", str(config), f"run.dir={run_dir}", *overrides, *flags]
    if ranks == 1:
        cmd = [sys.executable, str(REPO / script), *args, "parallel.engine=deepspeed"]
    else:
        port = str(29500 + os.getpid() % 2000)
        cmd = [
            str(Path(sys.executable).parent / "deepspeed"),
            "--num_gpus",
            str(ranks),
            "--master_port",
            port,
            str(REPO / script),
            *args,
        ]
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if check and done.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
        )
    return done


def losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, len(records) + 1))  # none repeated
    return [r["train_loss"] for r in records]


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def oracle(base) -> dict[str, list[float]]:
    """One process, plain engine, micro-batch 4 x 2 accumulation steps."""
    out = {}
    for name, ffn in (("dense", None), ("moe", MOE)):
        run_dir = base["root"] / f"oracle-{name}"
        cfg = load_config(
            config_file(base, name, ffn),
            [f"run.dir={run_dir}", "train.grad_accum=2", "parallel.engine=torch"],
        )
        train(cfg, log=lambda _: None)
        out[name] = losses(run_dir)
    return out


def assert_same_curve(got: list[float], want: list[float]) -> None:
    assert len(got) == len(want) == STEPS
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < LOSS_TOL, (got, want)


def dense_run(base, stage: int) -> Path:
    """The dense model trained on 2 ranks at ZeRO `stage` (launched once per session)."""
    run_dir = base["root"] / f"dense-z{stage}"
    if not (run_dir / "summary.json").is_file():
        launch(config_file(base, "dense"), 2, run_dir, f"parallel.zero_stage={stage}")
    return run_dir


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stages_on_two_ranks_equal_one_rank_with_accumulation(base, oracle, stage):
    run_dir = dense_run(base, stage)
    curve = losses(run_dir)
    assert curve[-1] < curve[0] - 0.3  # it learns
    assert_same_curve(curve, oracle["dense"])
    run = summary(run_dir)
    assert run["parallel"]["world_size"] == 2 and run["parallel"]["zero_stage"] == stage
    if stage == 3:  # every rank holds about half of every parameter
        assert 0.45 * run["params"] < run["parallel"]["local_params"] < 0.55 * run["params"]
    else:
        assert run["parallel"]["local_params"] == run["params"]


def expert_parallel_run(base) -> Path:
    """The MoE split over 2 expert-parallel ranks at ZeRO-2, stopped at step 4 and
    resumed (launched once per session)."""
    run_dir = base["root"] / "moe-ep2-z2"
    if not (run_dir / "summary.json").is_file():
        layout = ("parallel.zero_stage=2", "parallel.ep_size=2")
        config = config_file(base, "moe", MOE)
        launch(config, 2, run_dir, *layout, flags=["--stop-at", "4"])
        launch(config, 2, run_dir, *layout, flags=["--resume"])
    return run_dir


def test_moe_expert_parallel_and_zero3(base, oracle):
    config = config_file(base, "moe", MOE)
    runs = {"ep1-z2": "parallel.zero_stage=2", "ep1-z3": "parallel.zero_stage=3"}
    for name, stage in runs.items():
        launch(config, 2, base["root"] / f"moe-{name}", stage)
        assert_same_curve(losses(base["root"] / f"moe-{name}"), oracle["moe"])
    ep2 = expert_parallel_run(base)  # each rank's experts and their moments survive a resume
    assert_same_curve(losses(ep2), oracle["moe"])
    assert summary(ep2)["parallel"]["ep_size"] == 2


def test_zero3_builds_a_model_larger_than_one_rank_in_shards(base):
    """About 300M parameters built inside `deepspeed.zero.Init` on 2 ranks: each rank's
    peak resident memory while building, and while building and stepping, stays under
    0.65x of one rank's that builds the same model whole (the same engine and steps on a
    world of one), and the losses are that rank's (2 ranks x micro-batch 1 = 1 rank x 2
    accumulation steps)."""
    raw = json.loads(json.dumps(base["raw"]))
    raw["model"].update(n_layer=24, n_head=16, d_model=1024)
    raw["train"].update(micro_batch_size=1)
    few = 5_000_000  # elements: buckets and optimizer sub-groups far below the model's size
    raw["parallel"] = {
        "deepspeed": {
            "zero_optimization": {
                "reduce_bucket_size": few,
                "stage3_prefetch_bucket_size": few,
                "stage3_max_live_parameters": 4 * few,
                "stage3_max_reuse_distance": 0,
                "sub_group_size": 2 * few,
            }
        }
    }
    config = base["root"] / "big.yaml"
    config.write_text(yaml.safe_dump(raw), encoding="utf-8")
    figures = {}
    for name, ranks, extra in (("whole", 1, ["train.grad_accum=2"]), ("sharded", 2, [])):
        out = base["root"] / f"memory-{name}"
        probe = ["--out", str(out), "--steps", "2"]
        zero = ["parallel.zero_stage=3", *extra]
        launch(config, ranks, out, *zero, flags=probe, script="benchmarks/zero3_memory.py")
        figures[name] = [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]
    (whole,), sharded = figures["whole"], figures["sharded"]
    assert 2.9e8 < whole["params"] == sharded[0]["params"] < 3.1e8
    for rank in sharded:
        print(
            f"rank {rank['rank']}: build {rank['peak_build_mib']:.0f} MiB "
            f"(whole {whole['peak_build_mib']:.0f}), build + steps {rank['peak_mib']:.0f} MiB "
            f"(whole {whole['peak_mib']:.0f})"
        )
        assert rank["peak_build_mib"] < 0.65 * whole["peak_build_mib"]
        assert rank["peak_mib"] < 0.65 * whole["peak_mib"]
        assert len(rank["losses"]) == 2
        assert max(map(abs, np.subtract(rank["losses"], whole["losses"]))) < LOSS_TOL


def test_check_parallel_refuses_impossible_layouts(base):
    cfg = load_config(config_file(base, "moe", MOE), ["parallel.ep_size=2"])
    with pytest.raises(ConfigError, match="^parallel.ep_size: 2 does not divide the world size 3"):
        check_parallel(cfg, "deepspeed", 3)
    with pytest.raises(ConfigError, match="^parallel.ep_size: 2 with parallel.zero_stage 3"):
        check_parallel(
            load_config(
                config_file(base, "moe", MOE), ["parallel.ep_size=2", "parallel.zero_stage=3"]
            ),
            "deepspeed",
            2,
        )
    with pytest.raises(ConfigError, match="^parallel.ep_size: 2 splits experts"):
        check_parallel(cfg, "torch", 1)
    with pytest.raises(ConfigError, match="^parallel.zero_stage: must be 0, 1, 2 or 3, got 4"):
        load_config(config_file(base, "dense"), ["parallel.zero_stage=4"])


@pytest.mark.parametrize("name,stage", [("dense", 2), ("dense", 3), ("moe", 2), ("moe", 3)])
def test_resume_on_another_number_of_ranks(base, oracle, name, stage):
    """2 ranks to step 3, 1 rank (2 accumulation steps) to step 6, 2 ranks to the end: the
    loss curve is the uninterrupted one, so weights, optimizer state and data position
    all crossed both changes of layout intact."""
    config = config_file(base, name, MOE if name == "moe" else None)
    run_dir = base["root"] / f"resume-{name}-z{stage}"
    zero = f"parallel.zero_stage={stage}"
    launch(config, 2, run_dir, zero, flags=["--stop-at", "3"])
    one = launch(
        config, 1, run_dir, zero, "train.grad_accum=2", flags=["--resume", "--stop-at", "6"]
    )
    assert "(2 -> 1 ranks)" in one.stdout + one.stderr
    # a resume reads the run's own config.yaml, which the 1-rank session left at grad_accum 2
    two = launch(config, 2, run_dir, zero, "train.grad_accum=1", flags=["--resume"])
    assert "(1 -> 2 ranks)" in two.stdout + two.stderr
    assert_same_curve(losses(run_dir), oracle[name])


def test_expert_parallel_resume_on_another_world_size_and_ep_size(base, oracle):
    """Experts split over 2 ranks (ep_size 2) to step 3, all of them on 1 rank (ep_size 1,
    2 accumulation steps) to step 6, split over 2 ranks again to the end: the loss curve
    is the uninterrupted one, so every expert's weights and Adam moments crossed both
    changes of ep_size and world size."""
    config = config_file(base, "moe", MOE)
    run_dir = base["root"] / "resume-moe-ep"
    zero = "parallel.zero_stage=2"
    launch(config, 2, run_dir, zero, "parallel.ep_size=2", flags=["--stop-at", "3"])
    # a resume reads the run's own config.yaml: each session names the layout it changes
    one_rank = ("train.grad_accum=2", "parallel.ep_size=1")
    one = launch(config, 1, run_dir, zero, *one_rank, flags=["--resume", "--stop-at", "6"])
    assert "(2 -> 1 ranks)" in one.stdout + one.stderr
    two_ranks = ("train.grad_accum=1", "parallel.ep_size=2")
    launch(config, 2, run_dir, zero, *two_ranks, flags=["--resume"])
    assert_same_curve(losses(run_dir), oracle["moe"])
    assert summary(run_dir)["parallel"]["ep_size"] == 2


# The cluster: a head and a second node of one CPU each, so one worker runs on each. After
# the test kills the second node, a third joins (as an autoscaler would bring one) and the
# restarted group runs on the head and it. (The nodes share one session folder on this
# machine, so each node's log monitor forwards every worker's lines: the job's log shows
# each line once per node here, not on a real cluster.)
RAY_FAULTS = f"""add_node 2 || exit 1
SECONDS=0
ray job submit --address {HEAD} --working-dir . -- \\
    python "$OUT/killing_job.py" --config "$CONFIG" run.dir="$RUN" parallel.zero_stage=2 \\
    train.ckpt_interval=2 --workers 2 > "$OUT/job.log" 2>&1 &
job=$!
until [ -f "$OUT/killed-node" ] || ! kill -0 $job 2> /dev/null; do sleep 0.2; done
add_node 3
wait $job
echo $? > "$OUT/job.rc"
echo $SECONDS > "$OUT/job.seconds"
ray list nodes --address {HEAD} --format json > "$OUT/nodes.json"
"""


# The job: launch/train_moe.py with its `worker` wrapped so that, once each, rank 1 SIGKILLs
# itself at step {process_step}, and the worker on the second node SIGKILLs that node's
# raylet (its parent; the node's agents follow it) and then itself at step {node_step}: the
# node is gone at once, as a lost machine is. The file OUT/killed-<what> says it happened
# and names the (first) process killed. Ray puts the job's copy of the repo on the path of
# its driver and of every worker, so a worker imports the real `worker` from
# `launch.train_moe`; the wrapper, defined in this __main__, travels by value.
KILLING_JOB = """\
import os
import signal
from pathlib import Path

import launch.train_moe as job
from leviathan.entry import run_script

OUT, PROCESS_STEP, NODE_STEP = Path({out!r}), {process_step}, {node_step}


def kill_once(what: str, *pids: int) -> None:
    marker = OUT / f"killed-{{what}}"
    if not marker.exists():
        marker.write_text(Path(f"/proc/{{pids[0]}}/comm").read_text())
        for pid in pids:
            os.kill(pid, signal.SIGKILL)


def on_head_node() -> bool:
    import ray

    me = ray.get_runtime_context().get_node_id()
    head = [n["NodeID"] for n in ray.nodes() if "node:__internal_head__" in n["Resources"]]
    return me in head


def worker(config: dict) -> None:
    import ray.train

    from launch.train_moe import worker as train_rank
    from leviathan.train import trainer

    rank, train = ray.train.get_context().get_world_rank(), trainer.train
    remote = not on_head_node()

    def train_and_die(cfg, *, on_step=None, **options):
        def step(record: dict) -> None:
            if on_step:
                on_step(record)
            if rank == 1 and record["step"] == PROCESS_STEP:
                kill_once("process", os.getpid())
            if remote and record["step"] == NODE_STEP:
                kill_once("node", os.getppid(), os.getpid())

        return train(cfg, on_step=step, **options)

    trainer.train = train_and_die  # what train_rank calls
    try:
        train_rank(config)
    finally:
        trainer.train = train


job.worker = worker
run_script(job.main)
"""


def test_ray_job_survives_a_killed_worker_and_a_lost_node(base, oracle, tmp_path):
    """`ray job submit` runs the MoE job on 2 workers over two Ray nodes, checkpointing
    every 2 steps. Rank 1 is SIGKILLed at step 3: Ray restarts the group, which resumes
    from step 2. At step 5 the second node's raylet and worker are SIGKILLed: the node is
    lost, a new one joins, the group resumes from step 4 on it. The run ends exactly where
    the uninterrupted run ends."""
    script = KILLING_JOB.format(out=str(tmp_path), process_step=3, node_step=5)
    (tmp_path / "killing_job.py").write_text(script, encoding="utf-8")
    run_dir = tmp_path / "run"
    config = str(config_file(base, "moe", MOE))
    run_on_cluster(RAY_FAULTS, tmp_path, 900, head_cpus=1, CONFIG=config, RUN=str(run_dir))
    log = (tmp_path / "job.log").read_text()
    assert (tmp_path / "job.rc").read_text().strip() == "0", log[-5000:]
    assert (tmp_path / "killed-process").is_file()
    assert (tmp_path / "killed-node").read_text().strip() == "raylet"
    assert "at step 2 (2 -> 2 ranks)" in log and "at step 4 (2 -> 2 ranks)" in log  # resumed
    states = sorted(n["state"] for n in json.loads((tmp_path / "nodes.json").read_text()))
    assert states == ["ALIVE", "ALIVE", "DEAD"]  # the head, the new node; the lost one
    assert_same_curve(losses(run_dir), oracle["moe"])  # steps 1..8 once each, same losses
    ray_checkpoints = sorted(p for p in (run_dir / "ray").glob("*/checkpoint_*") if p.is_dir())
    assert len(ray_checkpoints) >= 4 and (ray_checkpoints[-1] / "MANIFEST.json").is_file()
    assert (tmp_path / "stop.rc").read_text().strip() == "0"
    print(f"ray job with two restarts: {(tmp_path / 'job.seconds').read_text().strip()} s")


def run_script(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "launch" / script), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_unreachable_cluster_inputs_are_named(base, tmp_path):
    config = str(config_file(base, "dense"))
    hosts = tmp_path / "hosts"
    hosts.write_text("worker-1.invalid slots=2\n")
    done = run_script("train.py", "--hostfile", str(hosts), "--config", config)
    assert done.returncode == 2
    assert (
        f"error: hostfile {hosts}: host 'worker-1.invalid': the name does not resolve"
        in done.stderr
    )
    hosts.write_text("node1 slots=two\n")
    done = run_script("train.py", "--hostfile", str(hosts), "--config", config)
    assert done.returncode == 2 and f"hostfile {hosts}:1: expected `HOST slots=N`" in done.stderr
    done = run_script("train_moe.py", "--address", "http://127.0.0.1:9", "--config", config)
    assert done.returncode == 2
    assert "error: Ray address 'http://127.0.0.1:9': cannot connect to port 9" in done.stderr


def test_resuming_another_models_checkpoint_names_the_key(base):
    run_dir = base["root"] / "wrong-model"
    config = config_file(base, "dense")
    launch(config, 1, run_dir, "parallel.zero_stage=2", flags=["--stop-at", "2"])
    done = launch(config, 1, run_dir, "model.d_model=48", flags=["--resume"], check=False)
    assert done.returncode == 2
    assert f"error: model.d_model: 48, but the run in {run_dir} has 32" in done.stderr


def test_export_consolidates_any_layout_for_eval_and_sample(base, oracle):
    """A ZeRO-3 run sharded over 2 ranks, an MoE whose experts were split over 2 ranks and
    a plain one-process run export to one safetensors file each; `eval` on it scores the
    val split exactly as training did."""
    from leviathan.errors import CheckpointError
    from leviathan.export import read_export

    cli = [sys.executable, "-m", "leviathan.cli"]
    runs = (dense_run(base, 3), expert_parallel_run(base), base["root"] / "oracle-dense")
    for run_dir in runs:
        done = subprocess.run(
            [*cli, "export", "--run", str(run_dir)], capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        state, config, step = read_export(run_dir / "model.safetensors")
        assert step == STEPS and config["model"]["d_model"] == 32
        experts = [v.shape[0] for k, v in state.items() if k.endswith("experts.w_in")]
        assert experts == ([MOE["n_experts"]] * 2 if "moe" in run_dir.name else [])
        done = subprocess.run([*cli, "eval", "--run", str(run_dir)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        bpc = float(done.stdout.split("val BPC ")[1].split()[0])
        assert abs(bpc - summary(run_dir)["val_bpc"]) < 1e-4, (bpc, summary(run_dir))
        done = subprocess.run(
            [*cli, "sample", "--run", str(run_dir), "--max-new-tokens", "5"],
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0 and done.stdout.strip(), done.stderr
    broken = base["root"] / "broken.safetensors"
    broken.write_bytes((run_dir / "model.safetensors").read_bytes()[:100])
    with pytest.raises(CheckpointError, match="not a readable Leviathan export"):
        read_export(broken)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_under_deepspeed(base, precision):
    """bf16 weights with fp32 masters; fp16 with DeepSpeed's dynamic loss scaling."""
    from deepspeed.accelerator import get_accelerator

    if precision == "fp16" and not get_accelerator().is_fp16_supported():
        pytest.skip("DeepSpeed's CPU accelerator refuses fp16 on this CPU (no fp16 support)")
    run_dir = base["root"] / f"dense-{precision}"
    launch(
        config_file(base, "dense"),
        1,
        run_dir,
        "parallel.zero_stage=2",
        f"train.precision={precision}",
    )
    curve = losses(run_dir)
    assert all(math.isfinite(x) for x in curve)
    assert curve[-1] < curve[0] - 0.2, curve


def test_ray_job_refuses_a_used_run_dir_without_resume(base):
    run_dir = dense_run(base, 2)
    config = str(config_file(base, "dense"))
    done = run_script("train_moe.py", "--config", config, f"run.dir={run_dir}")
    assert done.returncode == 2
    assert f"error: run.dir {run_dir} already holds checkpoints: pass --resume" in done.stderr
