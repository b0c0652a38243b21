"""The Hugging Face export, unit by unit: every mixer kind, both position kinds, dense and
MoE FFNs give the native logits and greedy tokens through transformers in a process that
cannot import leviathan or moe (tests/hf_probe.py); the tokenizer gives the run's ids;
the folder is written whole or not at all."""

import dataclasses
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from leviathan.data import Tokenizer, bundled_documents
from leviathan.errors import CheckpointError, ConfigError, StorageError
from leviathan.export import hf as export_hf
from leviathan.model import MIXERS, Leviathan
from leviathan.model.gpt import model_config

PROBE = Path(__file__).with_name("hf_probe.py")
VOCAB, BLOCK, NEW = 384, 32, 12
MOE = {"kind": "moe", "n_experts": 4, "top_k": 2, "n_shared": 1, "expert_hidden_mult": 1.0}
OPTIONS = {"token_xcorr": {"window_q": 3, "window_k": 2, "rank": 2}}  # off the defaults


def mixer_cases() -> dict[str, dict]:
    """Every registered mixer kind, with learned positions and, where it takes them, rope
    (no positions: one case below)."""
    cases = {}
    for kind, mixer in MIXERS.items():
        options = {"kind": kind} | OPTIONS.get(kind, {})
        cases[kind] = {"mixer": options}
        if mixer.refuses_rope is None:
            cases[f"{kind}-rope"] = {"mixer": options, "positions": "rope"}
    return cases


CASES = mixer_cases() | {
    "involution-none": {"mixer": {"kind": "involution"}, "positions": "none"},
    "moe-dropless": {"ffn": MOE, "norm": "rmsnorm"},
    "moe-swiglu-every-2": {"ffn": MOE | {"activation": "swiglu", "moe_every": 2}},
    "moe-capacity": {"ffn": MOE | {"capacity_factor": 1.0}},  # generates uncached
}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread is fastest, and spares a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train([d.text[:40_000] for d in bundled_documents()[:2]], vocab_size=VOCAB)


def random_model(case: str) -> tuple[dict, Leviathan]:
    """A case's `model:` mapping, as a run's config.json holds it, and a model with
    weights far enough from their init that the lags matter and greedy tokens vary."""
    base = {"vocab_size": VOCAB, "block_size": BLOCK, "n_layer": 2, "n_head": 2, "d_model": 16}
    raw = dataclasses.asdict(model_config({"mixer": {"kind": "dot"}, "ffn": {"kind": "dense"}}))
    raw |= base | CASES[case]
    torch.manual_seed(0)
    model = Leviathan(model_config(raw))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return raw, model.eval()


def run_probe(tmp_path: Path, folders: list[dict]) -> dict:
    """tests/hf_probe.py on the folders, from a folder of its own, caches kept in tmp_path."""
    out = tmp_path / "probe.pt"
    request = tmp_path / "probe.json"
    request.write_text(json.dumps({"out": str(out), "folders": folders}))
    env = os.environ | {"HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "1"}
    env |= {"OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(PROBE), str(request)],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out)


def corpus_sample(n: int = 24, seed: int = 0) -> list[str]:
    """Slices of every play of the bundled corpus, a few hundred to 3000 characters."""
    rng = random.Random(seed)
    docs = bundled_documents()
    texts = []
    for i in range(n):
        text = docs[i % len(docs)].text
        start = rng.randrange(len(text) - 3000)
        texts.append(text[start : start + rng.randrange(200, 3000)])
    return texts + ["a \u2581 b", "  lead\tand trail  ", "caf\u00e9 \u4e2d \U0001f600", "12345"]


def test_every_mixer_position_and_ffn_matches_native(tokenizer, tmp_path):
    ids = torch.randint(0, VOCAB, (2, BLOCK), generator=torch.Generator().manual_seed(1))
    prompt = ids[:1, :8]
    native, folders = {}, []
    for case in CASES:
        raw, model = random_model(case)
        (tmp_path / case).mkdir()  # one name for all: transformers imports the code once
        folder = export_hf.save_hf(tmp_path / case / "hf", raw, model.state_dict(), tokenizer)
        with torch.no_grad():
            native[str(folder)] = (model(ids)[0], model.generate(prompt, NEW, 0.0)[0].tolist())
        probe = {"dir": str(folder), "ids": ids.tolist(), "prompt": prompt[0].tolist()}
        folders.append(probe | {"new": NEW})
    texts = folders[0]["texts"] = corpus_sample()
    got = run_probe(tmp_path, folders)
    assert got["imported"] == []
    diffs = {}
    for folder, (logits, greedy) in native.items():
        hf = got[folder]
        assert hf["info"] == {k: [] for k in hf["info"]} and hf["tied"], folder
        diffs[Path(folder).parent.name] = (hf["logits"] - logits).abs().max().item()
        eos, start = hf["eos"], prompt.shape[1]
        cut = greedy[: greedy.index(eos, start) + 1] if eos in greedy[start:] else greedy
        assert hf["cached"] == hf["uncached"] == cut, folder  # generate stops at eos
    print("max |logit diff| per case:", {k: f"{v:.1e}" for k, v in diffs.items()})
    assert max(diffs.values()) <= 1e-5, diffs
    hf = got[folders[0]["dir"]]
    assert hf["ids"] == [tokenizer.encode(t) for t in texts]
    assert hf["decoded"] == texts


def test_capacity_moe_generates_uncached_by_default(tokenizer, tmp_path):
    raw, model = random_model("moe-capacity")
    folder = export_hf.save_hf(tmp_path / "hf", raw, model.state_dict(), tokenizer)
    assert json.loads((folder / "generation_config.json").read_text())["use_cache"] is False
    raw, model = random_model("dot")
    folder = export_hf.save_hf(tmp_path / "dot", raw, model.state_dict(), tokenizer)
    assert json.loads((folder / "generation_config.json").read_text())["use_cache"] is True


def test_transformers_copies_every_source_file(tokenizer, tmp_path):
    from transformers.dynamic_module_utils import get_relative_import_files

    raw, model = random_model("moe-dropless")
    folder = export_hf.save_hf(tmp_path / "hf", raw, model.state_dict(), tokenizer)
    config = json.loads((folder / "config.json").read_text())
    entries = [folder / (ref.split(".")[0] + ".py") for ref in config["auto_map"].values()]
    reached = {Path(f).name for e in entries for f in get_relative_import_files(e)}
    reached |= {e.name for e in entries}
    assert reached == {p.name for p in folder.glob("*.py")}
    assert {"gpt.py", "mixers.py", "moe.py", "layer.py", "errors.py"} <= reached
    absolute = re.compile(r"^\s*(from|import)\s+(leviathan|moe)\b", re.MULTILINE)
    assert not [p.name for p in folder.glob("*.py") if absolute.search(p.read_text())]


def test_existing_folder_is_refused_unless_forced(tokenizer, tmp_path):
    raw, model = random_model("dot")
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(StorageError, match=r"--out .*hf: the folder exists; pass --force"):
        export_hf.save_hf(out, raw, model.state_dict(), tokenizer)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    export_hf.save_hf(out, raw, model.state_dict(), tokenizer, force=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    with pytest.raises(StorageError, match=r"the folder .*missing does not exist"):
        export_hf.save_hf(tmp_path / "missing" / "hf", raw, model.state_dict(), tokenizer)


def test_a_failed_export_leaves_nothing(tokenizer, tmp_path, monkeypatch):
    raw, model = random_model("dot")

    def fail_halfway(folder: Path, *args) -> None:
        (folder / "config.json").write_text("{}")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export_hf, "write_folder", fail_halfway)
    with pytest.raises(StorageError, match=r"--out .*hf: cannot write it: No space left"):
        export_hf.save_hf(tmp_path / "hf", raw, model.state_dict(), tokenizer)
    assert list(tmp_path.iterdir()) == []


def test_without_transformers_the_export_names_the_extra(tokenizer, tmp_path, monkeypatch):
    raw, model = random_model("dot")
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"--format hf: needs transformers, the `hf` extra"):
        export_hf.save_hf(tmp_path / "hf", raw, model.state_dict(), tokenizer)
    assert list(tmp_path.iterdir()) == []


def test_from_export_is_strict(tmp_path):
    from safetensors.torch import save_file

    raw, model = random_model("token_xcorr")
    state = {k: v for k, v in model.state_dict().items() if k != "head.weight"}
    metadata = {"config": json.dumps({"model": raw}), "step": "7"}
    save_file(state, tmp_path / "whole.safetensors", metadata=metadata)
    loaded = Leviathan.from_export(tmp_path / "whole.safetensors")
    assert loaded.head.weight is loaded.tok_emb.weight and not loaded.training
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in state.items())
    del state["blocks.0.mixer.qkv.weight"]
    save_file(state, tmp_path / "short.safetensors", metadata=metadata)
    with pytest.raises(CheckpointError, match=r"short.safetensors: .*blocks.0.mixer.qkv.weight"):
        Leviathan.from_export(tmp_path / "short.safetensors")


def test_a_unigram_tokenizer_converts_too():
    from leviathan.hf.tokenizer import hf_tokenizer

    texts = [d.text[:40_000] for d in bundled_documents()[:2]]
    run = Tokenizer.train(texts, kind="unigram", vocab_size=VOCAB)
    converted = hf_tokenizer(run.model_proto, BLOCK)
    sample = corpus_sample(8, seed=1)
    assert [converted.encode(t) for t in sample] == [run.encode(t) for t in sample]
    assert [converted.decode(run.encode(t)) for t in sample] == sample
