"""Leaving the project, as a user does it: a run trained with the real CLI, exported with
`leviathan export`, then loaded by transformers in a process that cannot import leviathan
or moe (tests/hf_probe.py) and scored by `lm_eval` offline on the tasks that ship in
leviathan/eval_tasks. Every number is checked against the native model of the run:
`Leviathan.from_export` on the plain export, and `leviathan sample`'s greedy text."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import leviathan
from leviathan.data import Tokenizer, bundled_documents
from leviathan.model import Leviathan

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent  # the `leviathan` and `lm_eval` of this environment
PROBE = Path(__file__).with_name("hf_probe.py")
TASKS = Path(leviathan.__file__).parent / "eval_tasks"
PROMPT, NEW = "ROMEO:", 24
TRAIN = [
    "data.dir=data",
    "data.tokenizer.vocab_size=384",
    "model.n_layer=1",
    "model.d_model=32",
    "model.n_head=2",
    "train.max_steps=4",
    "train.micro_batch_size=8",
    "train.eval_interval=2",
    "train.eval_tokens=2048",
    "train.ckpt_interval=2",
    "train.compile=false",
    "run.dir=run",
    "run.wandb=disabled",
    "run.sample_tokens=8",
]


def user_env(home: Path) -> dict[str, str]:
    """Offline, one thread, Hugging Face's caches (remote-code modules, datasets) in `home`."""
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(home)}
    return os.environ | offline | {"OMP_NUM_THREADS": "1"}


def run(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        env=user_env(cwd / "hf-home"),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def work(tmp_path_factory, corpus) -> Path:
    """A folder holding a tiny run trained by `leviathan train` on the three-play corpus,
    exported both ways by `leviathan export`."""
    work = tmp_path_factory.mktemp("journey")
    trained = run(BIN / "leviathan", "train", f"data.inputs=[{corpus}]", *TRAIN, cwd=work)
    assert trained.returncode == 0, trained.stderr[-3000:]
    for extra in ([], ["--format", "hf", "--out", "hf"]):
        exported = run(BIN / "leviathan", "export", "--run", "run", *extra, cwd=work)
        assert exported.returncode == 0, exported.stderr[-3000:]
        assert exported.stdout.startswith("exported run/checkpoints/step_0000004 to ")
    return work


@pytest.fixture(scope="module")
def native(work) -> tuple[Leviathan, Tokenizer]:
    """The run's model from its plain export, and its tokenizer."""
    model = Leviathan.from_export(work / "run" / "model.safetensors")
    assert model.head.weight is model.tok_emb.weight
    return model, Tokenizer.load(work / "run" / "tokenizer.model")


def test_bad_input_is_one_error_line_and_nothing_written(work):
    before = sorted(p.name for p in (work / "hf").iterdir())
    cases = {
        ("--run", "run", "--format", "hf", "--out", "hf"): "--out hf: the folder exists; pass "
        "--force to replace it",
        ("--run", "nowhere", "--format", "hf"): "nowhere has no checkpoint",
        ("--run", "run", "--format", "hf", "--out", "no/hf"): "--out no/hf: the folder no does "
        "not exist",
    }
    for args, message in cases.items():
        refused = run(BIN / "leviathan", "export", *args, cwd=work)
        lines = refused.stderr.splitlines()
        assert refused.returncode == 2 and len(lines) == 1, refused.stderr
        assert lines[0].startswith("error: ") and message in lines[0]
    assert sorted(p.name for p in (work / "hf").iterdir()) == before
    assert not (work / "no").exists() and not (work / "nowhere").exists()
    assert not [p for p in work.iterdir() if p.name.startswith(".hf")]  # no temporary left


def test_transformers_computes_what_the_run_computes(work, native):
    model, tokenizer = native
    docs = bundled_documents()
    rng = random.Random(0)
    texts = []
    for doc in docs:  # a sample of every play of the bundled corpus
        start = rng.randrange(len(doc.text) - 2000)
        texts.append(doc.text[start : start + 2000])
    ids = [tokenizer.encode(texts[0])[: model.cfg.block_size]]
    prompt = tokenizer.encode(PROMPT)
    request = {"dir": str(work / "hf"), "ids": ids, "prompt": prompt, "new": NEW, "texts": texts}
    (work / "probe.json").write_text(json.dumps({"out": "probe.pt", "folders": [request]}))
    probed = run(sys.executable, PROBE, "probe.json", cwd=work)
    assert probed.returncode == 0, probed.stderr[-3000:]
    got = torch.load(work / "probe.pt")
    hf = got[str(work / "hf")]
    assert got["imported"] == [] and hf["tied"]
    assert hf["info"] == {k: [] for k in hf["info"]}  # strict: nothing missing or unexpected
    with torch.no_grad():
        diff = (hf["logits"] - model(torch.tensor(ids))[0]).abs().max().item()
    print(f"max |logit diff| of the journey's run: {diff:.1e}")
    assert diff <= 1e-5
    assert hf["ids"] == [tokenizer.encode(t) for t in texts] and hf["decoded"] == texts

    sampled = run(BIN / "leviathan", "sample", "--run", "run", "--temperature", "0",
                  "--prompt", PROMPT, "--max-new-tokens", str(NEW), cwd=work)  # fmt: skip
    assert sampled.returncode == 0, sampled.stderr
    greedy = model.generate(torch.tensor([prompt]), NEW, temperature=0)[0].tolist()
    assert sampled.stdout == tokenizer.decode(greedy) + "\n"
    eos = tokenizer.eos_id  # generate stops at the end of a document
    stop = greedy.index(eos, len(prompt)) + 1 if eos in greedy[len(prompt) :] else len(greedy)
    assert hf["cached"] == hf["uncached"] == greedy[:stop]


def lm_eval_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list, list]:
    """lm-evaluation-harness's split of a request into context and continuation ids: the
    context's trailing spaces move to the continuation, the whole is encoded once."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    start = len(tokenizer.encode(context))
    return whole[:start], whole[start:]


def loglikelihood(model: Leviathan, context: list[int], continuation: list[int]) -> float:
    """log P(continuation | context) under the native model (the whole fits its window)."""
    ids = torch.tensor([context + continuation])
    assert ids.shape[1] <= model.cfg.block_size + 1
    with torch.no_grad():
        logp = model(ids[:, :-1])[0][0].log_softmax(-1)
    n = len(continuation)
    return logp[-n:].gather(1, ids[0, -n:, None]).sum().item()


def test_lm_eval_scores_as_the_native_model(work, native):
    model, tokenizer = native
    scored = run(BIN / "lm_eval", "--model", "hf",
                 "--model_args", "pretrained=hf,trust_remote_code=True,dtype=float32",
                 "--tasks", "shakespeare_mc,shakespeare_lines", "--include_path", TASKS,
                 "--device", "cpu", "--batch_size", "1", "--log_samples",
                 "--output_path", "lm-eval", cwd=work)  # fmt: skip
    assert scored.returncode == 0, scored.stderr[-3000:]
    results = json.loads(next((work / "lm-eval").rglob("results_*.json")).read_text())
    assert {"shakespeare_mc", "shakespeare_lines"} <= results["results"].keys()
    diffs = []
    for path in (work / "lm-eval").rglob("samples_shakespeare_mc_*.jsonl"):
        for sample in map(json.loads, path.read_text().splitlines()):
            for arguments, resp in zip(sample["arguments"].values(), sample["resps"], strict=True):
                pair = lm_eval_pair(tokenizer, arguments["arg_0"], arguments["arg_1"])
                diffs.append(float(resp[0][0]) - loglikelihood(model, *pair))
    assert len(diffs) == 8 * 3
    for path in (work / "lm-eval").rglob("samples_shakespeare_lines_*.jsonl"):
        for sample in map(json.loads, path.read_text().splitlines()):
            ids = tokenizer.encode(sample["doc"]["text"])  # one window, after the eos
            native_ll = loglikelihood(model, [tokenizer.eos_id], ids)
            diffs.append(float(sample["resps"][0][0]) - native_ll)
    assert len(diffs) == 8 * 3 + 8
    print(f"max |loglikelihood diff| lm_eval vs native: {max(map(abs, diffs)):.1e}")
    assert max(map(abs, diffs)) <= 1e-4
