"""Data at scale (issue 9): sharded token files, worker processes, Parquet and compressed
inputs, a bounded tokenizer sample, bad inputs named, self-contained runs, Ray Data."""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm
import torch
import zstandard
from ray_cluster import run_on_cluster
from test_data import TRICKY, WORDS, DataCfg, TokCfg, make_text, parts_between_eos
from test_train import small_config

from leviathan.cli import main
from leviathan.data import DataIndex, Tokenizer, prepare, read_documents, split_documents
from leviathan.data.sampler import get_batch, global_batch_starts
from leviathan.data.shards import load_index, load_tokens
from leviathan.data.tokenizer import word_pieces
from leviathan.errors import DataError
from leviathan.train.evaluate import evaluate, unigram_bpc
from leviathan.train.trainer import train


def quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def texts() -> list[str]:
    import random

    rng = random.Random(11)
    return [make_text(rng, rng.randint(20, 120)) for _ in range(24)]


@pytest.fixture(scope="module")
def folder(texts, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("docs")
    for i, text in enumerate(texts):
        (root / f"d{i:03d}.txt").write_text(text, encoding="utf-8")
    return root


def build(folder: Path, out: Path, **changes) -> DataIndex:
    tokenizer = changes.pop("tokenizer", TokCfg())
    cfg = replace(DataCfg(inputs=[str(folder)], dir=str(out)), tokenizer=tokenizer, **changes)
    return prepare(cfg, log=quiet, check_all=True)


def files_of(index: DataIndex) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(index.dir.iterdir())}


# ---------------------------------------------------------------- encoding


def test_word_pieces_encode_as_the_whole(folder):
    tok = Tokenizer.train([d.text for d in read_documents(folder)], "bpe", 400)
    text = " ".join(TRICKY) + "".join(d.text for d in read_documents(folder))
    for size in (7, 64, 1000):
        pieces = list(word_pieces(text, size))
        assert "".join(pieces) == text and len(pieces) > 1
        assert all(p[0] == " " and q[-1] != " " for q, p in zip(pieces, pieces[1:], strict=False))
        joined = [i for p in pieces for i in tok.encode(p)]
        assert joined == tok.encode(text), size
    (arr,) = tok.encode_arrays([text], np.dtype(np.uint16))
    assert arr.tolist() == tok.encode(text)
    assert list(word_pieces("x" * 50, 8)) == ["x" * 50]  # no word start: not cut


# ---------------------------------------------------------------- shards


def test_sharded_and_unsharded_hold_the_same_stream(folder, texts, tmp_path):
    whole = build(folder, tmp_path / "whole")
    sharded = build(folder, tmp_path / "sharded", shard_tokens=300)
    assert len(whole.shards["train"]) == 1 and len(sharded.shards["train"]) > 5
    assert len(sharded.shards["val"]) > 1
    tok = sharded.tokenizer()
    train_parts, val_parts, _ = split_documents(read_documents(folder), 0.1)
    for split, parts in (("train", train_parts), ("val", val_parts)):
        a, b = load_tokens(whole.dir, split), load_tokens(sharded.dir, split)
        assert len(a) == len(b) == whole.splits[split]["tokens"]
        assert np.array_equal(np.asarray(a), np.asarray(b))
        assert whole.splits[split] == sharded.splits[split]
        decoded = []
        for shard in sharded.shards[split]:  # each shard: whole documents, counted exactly
            ids = np.fromfile(sharded.dir / shard["file"], dtype=np.uint16)
            docs = [tok.decode(p) for p in parts_between_eos(ids, tok.eos_id)]
            assert shard["tokens"] == len(ids) and shard["documents"] == len(docs)
            assert shard["characters"] == sum(len(d) for d in docs)
            assert shard["tokens"] <= 300 or shard["documents"] == 1
            decoded += docs
        assert decoded == [p.text for p in parts]
    meta = json.loads((sharded.dir / "index.json").read_text())
    assert meta["splits"]["train"]["shards"][1]["file"] == "train-00001.bin"


def test_sampler_is_the_same_across_shard_counts(folder, tmp_path):
    """The batch of (seed, step, rank, world) does not depend on how the split is sharded,
    windows that span two shards included."""
    streams = [
        load_tokens(build(folder, tmp_path / f"s{n}", shard_tokens=n).dir, "train")
        for n in (10**9, 3000, 97)
    ]
    assert len({len(s.parts) for s in streams}) == 3
    boundaries = np.array(streams[2].starts[1:-1])
    spans = 0
    for step in range(25):
        want = get_batch(streams[0], 64, 8, seed=3, step=step)
        for stream in streams[1:]:
            for world in (1, 2, 4):
                rows = [get_batch(stream, 64, 8, 3, step, r, world) for r in range(world)]
                assert torch.equal(torch.cat([x for x, _ in rows]), want[0])
                assert torch.equal(torch.cat([y for _, y in rows]), want[1])
        begin = global_batch_starts(len(streams[0]), 64, 8, 3, step)[:, None]
        spans += int(((boundaries > begin) & (boundaries < begin + 65)).sum())
    assert spans  # some windows of the 97-token shards crossed a boundary


class Bigram(torch.nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        torch.manual_seed(0)
        self.table = torch.nn.Embedding(vocab, vocab)

    def forward(self, x):
        return self.table(x), None


def test_sharded_and_unsharded_give_the_same_bpc(folder, tmp_path):
    whole = build(folder, tmp_path / "whole")
    sharded = build(folder, tmp_path / "sharded", shard_tokens=200)
    model = Bigram(whole.vocab_size)
    results = []
    for index in (whole, sharded):
        val = load_tokens(index.dir, "val")
        chars = index.splits["val"]["characters"]
        results.append(evaluate(model, val, 16, 4, chars))
        results.append(unigram_bpc(load_tokens(index.dir, "train"), val, index.vocab_size, chars))
    assert results[0].exact and results[2].exact
    assert results[0].bpc == results[2].bpc and results[0].tokens == results[2].tokens
    assert results[1] == results[3]


def test_workers_and_batch_size_do_not_change_the_dataset(folder, tmp_path):
    one = build(folder, tmp_path / "one", workers=1)
    two = build(folder, tmp_path / "two", workers=2, batch_chars=2000, shard_tokens=700)
    two_again = build(folder, tmp_path / "again", workers=3, batch_chars=5000, shard_tokens=700)
    assert files_of(two) == files_of(two_again)
    assert files_of(one)["tokenizer.model"] == files_of(two)["tokenizer.model"]
    for split in ("train", "val"):
        assert np.array_equal(
            np.asarray(load_tokens(one.dir, split)), np.asarray(load_tokens(two.dir, split))
        )


def test_format_1_datasets_still_load_and_are_rebuilt(folder, tmp_path):
    index = build(folder, tmp_path / "ds")
    meta = json.loads((index.dir / "index.json").read_text())
    meta["format"] = 1
    meta["fingerprint"] = "f" * 64  # format 1 fingerprinted other settings
    for split in ("train", "val"):
        del meta["splits"][split]["shards"]
        os.rename(index.dir / f"{split}-00000.bin", index.dir / f"{split}.bin")
    (index.dir / "index.json").write_text(json.dumps(meta))
    old = load_index(index.dir)
    assert old.shards["train"][0]["file"] == "train.bin"
    assert np.array_equal(
        np.asarray(load_tokens(index.dir, "val")),
        np.fromfile(index.dir / "val.bin", dtype=np.uint16),
    )
    logs: list[str] = []
    rebuilt = prepare(DataCfg(inputs=[str(folder)], dir=str(index.dir)), log=logs.append)
    assert any("rebuilding" in m for m in logs) and rebuilt.meta["format"] == 2
    assert sorted(p.name for p in index.dir.iterdir()) == [
        "index.json",
        "tokenizer.model",
        "train-00000.bin",
        "val-00000.bin",
    ]


# ---------------------------------------------------------------- tokenizer sample


def test_tokenizer_trains_on_a_bounded_seeded_sample(folder, tmp_path):
    train_chars = sum(len(d.text) for d in split_documents(read_documents(folder), 0.1)[0])
    whole = build(folder, tmp_path / "whole")
    assert whole.meta["tokenizer"]["trained_on_characters"] == train_chars
    small = build(folder, tmp_path / "small", tokenizer=TokCfg(sample_chars=20_000))
    again = build(folder, tmp_path / "again", tokenizer=TokCfg(sample_chars=20_000))
    used = small.meta["tokenizer"]["trained_on_characters"]
    assert 15_000 < used <= 20_000 < train_chars
    assert small.tokenizer_path.read_bytes() == again.tokenizer_path.read_bytes()
    assert small.tokenizer_path.read_bytes() != whole.tokenizer_path.read_bytes()
    assert small.fingerprint != whole.fingerprint  # the sample size is a setting


# ---------------------------------------------------------------- inputs


def write_formats(root: Path, texts: list[str], field: str = "text") -> dict[str, Path]:
    rows = "".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)).encode()
    out = {
        "jsonl": root / "r.jsonl",
        "gz": root / "r.jsonl.gz",
        "zst": root / "r.jsonl.zst",
        "parquet": root / "r.parquet",
    }
    out["jsonl"].write_bytes(rows)
    out["gz"].write_bytes(gzip.compress(rows))
    out["zst"].write_bytes(zstandard.ZstdCompressor().compress(rows))
    table = pa.table({"id": list(range(len(texts))), field: texts})
    pq.write_table(table, out["parquet"], row_group_size=5)
    return out


def test_parquet_and_compressed_inputs_read_alike(texts, tmp_path):
    paths = write_formats(tmp_path, texts)
    for kind, path in paths.items():
        docs = read_documents(path)
        assert [d.text for d in docs] == texts, kind
    assert read_documents(paths["parquet"])[3].name == f"{paths['parquet']}:4"
    plain = tmp_path / "one.txt"
    plain.write_text(texts[0])
    (tmp_path / "one.txt.gz").write_bytes(gzip.compress(plain.read_bytes()))
    (tmp_path / "one.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(plain.read_bytes()))
    for name in ("one.txt.gz", "one.txt.zst"):
        assert [d.text for d in read_documents(tmp_path / name)] == [texts[0]]

    base = {"workers": 1, "val_fraction": 0.1}
    streams = {}
    for kind in ("jsonl", "zst", "parquet"):
        cfg = DataCfg(inputs=[str(paths[kind])], dir=str(tmp_path / f"ds-{kind}"), **base)
        index = prepare(cfg, log=quiet, check_all=True)
        streams[kind] = np.asarray(load_tokens(index.dir, "train"))
        assert index.splits["train"]["documents"] + index.splits["val"]["documents"] >= 24
    assert np.array_equal(streams["jsonl"], streams["zst"])
    assert np.array_equal(streams["jsonl"], streams["parquet"])


def test_text_field_names_another_column(texts, tmp_path):
    paths = write_formats(tmp_path, texts, field="body")
    for kind in ("jsonl", "parquet"):
        assert [d.text for d in read_documents(paths[kind], text_field="body")] == texts
    with pytest.raises(DataError, match=r'r.jsonl:1: expected a JSON object with a "text" field'):
        read_documents(paths["jsonl"])


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("nocol.parquet", "parquet", r'nocol.parquet: no column "text" \(it has id, body\)'),
        ("bad.parquet", b"PAR1 this is not parquet", r"bad.parquet is not a readable Parquet"),
        ("cut.jsonl.gz", "truncated-gzip", r"cut.jsonl.gz is corrupt or truncated"),
        ("junk.txt.gz", b"\x1f\x8b\x08\x00garbage bytes here", r"junk.txt.gz is corrupt"),
        ("junk.jsonl.zst", b"(\xb5/\xfd not really zstd", r"junk.jsonl.zst is not valid zstd"),
        ("latin.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', r"latin.jsonl:2 .*not UTF-8"),
    ],
)
def test_bad_inputs_are_named(tmp_path, name, content, message):
    path = tmp_path / name
    if content == "parquet":
        pq.write_table(pa.table({"id": [1], "body": ["x"]}), path)
    elif content == "truncated-gzip":
        rows = "".join(json.dumps({"text": str(i * 7919 % 10007)}) + "\n" for i in range(5000))
        data = gzip.compress(rows.encode())
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        read_documents(path)
    cfg = DataCfg(inputs=[str(path)], dir=str(tmp_path / "ds"))
    with pytest.raises(DataError, match=message):
        prepare(cfg, log=quiet)
    assert not (tmp_path / "ds").exists()


def test_a_short_shard_is_named(folder, tmp_path):
    index = build(folder, tmp_path / "ds", shard_tokens=400)
    shard = index.dir / "train-00002.bin"
    shard.write_bytes(shard.read_bytes()[:-6])
    with pytest.raises(DataError, match=r"train-00002.bin is .* bytes, index.json says .*prepare"):
        load_tokens(index.dir, "train")
    shard.unlink()
    with pytest.raises(DataError, match=r"train-00002.bin is missing"):
        load_index(index.dir)


def write_raw_model(path: Path) -> None:
    """A SentencePiece model without byte fallback: it cannot encode what it never saw."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([" ".join(WORDS)] * 50),
        model_writer=model,
        vocab_size=200,
        model_type="bpe",
        eos_id=1,
        unk_id=0,
        bos_id=-1,
        minloglevel=2,
    )
    path.write_bytes(model.getvalue())


def test_a_failure_while_encoding_leaves_no_dataset(folder, tmp_path):
    """The round-trip check fails in the encode pass (a model without byte fallback meets
    characters it lacks): nothing is left that loads as a dataset."""
    write_raw_model(tmp_path / "raw.model")
    cfg = DataCfg(
        inputs=[str(folder)],
        dir=str(tmp_path / "ds"),
        tokenizer=TokCfg(model=str(tmp_path / "raw.model")),
        workers=2,
        batch_chars=3000,
    )
    with pytest.raises(DataError, match="does not reproduce .*/d000.txt exactly"):
        prepare(cfg, log=quiet, check_all=True)
    with pytest.raises(DataError, match="does not reproduce .*/d000.txt exactly"):
        prepare(cfg, log=quiet)  # the sampled check (first piece of a batch) too
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ds.lock", "raw.model"]


# ---------------------------------------------------------------- runs


def test_a_copied_run_evaluates_from_another_directory(folder, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    cfg = small_config(folder, Path("data/ds"), Path("runs/r"), train={"max_steps": 2})
    cfg.data.val_fraction = 0.2
    train(cfg, log=quiet)
    capsys.readouterr()
    record = json.loads((work / "runs/r/dataset.json").read_text())
    assert record["dir"] == str(work / "data/ds")
    assert main(["eval", "--run", "runs/r", "--threads", "1"]) == 0
    own = capsys.readouterr().out.split("val BPC ")[1].split()[0]

    shutil.copytree(work / "runs/r", tmp_path / "copy")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["eval", "--run", str(tmp_path / "copy")]) == 0
    assert capsys.readouterr().out.split("val BPC ")[1].split()[0] == own

    os.rename(work / "data/ds", tmp_path / "moved")
    assert main(["eval", "--run", str(tmp_path / "copy")]) == 2
    err = capsys.readouterr().err
    assert "dataset.json" in err and "--data-dir" in err
    argv = ["eval", "--run", str(tmp_path / "copy"), "--data-dir", str(tmp_path / "moved")]
    assert main(argv) == 0
    assert capsys.readouterr().out.split("val BPC ")[1].split()[0] == own

    other = build(folder, tmp_path / "other", val_fraction=0.3)
    assert main([*argv[:3], "--data-dir", str(other.dir)]) == 2
    assert "holds another dataset than" in capsys.readouterr().err
    assert main([*argv[:3], "--data", "missing.txt"]) == 2
    assert "error: --data: 'missing.txt' does not exist" in capsys.readouterr().err


def test_prepare_cli_takes_workers_and_ray_before_overrides(folder, tmp_path, monkeypatch):
    from leviathan.cli import build_parser, parse_args

    args = parse_args(build_parser(), ["prepare", "--ray", "data.dir=x", "--workers", "2"])
    assert args.ray == "data.dir=x" and args.workers == 2  # cmd_prepare takes it as override
    monkeypatch.chdir(tmp_path)
    argv = ["prepare", "--input", str(folder), "--workers", "2", "data.dir=ds"]
    assert main([*argv, "data.shard_tokens=500", "data.tokenizer.vocab_size=320"]) == 0
    assert len(load_index(tmp_path / "ds").shards["train"]) > 2


# ---------------------------------------------------------------- Ray Data

RAY_PREPARE = """
SECONDS=0
leviathan prepare --ray 127.0.0.1:6379 --input "$CORPUS" data.dir="$OUT/ray" \\
    data.shard_tokens=2000 data.tokenizer.vocab_size=320 data.val_fraction=0.1 > "$OUT/ray.log" 2>&1
echo $? > "$OUT/ray.rc"
echo $SECONDS > "$OUT/ray.seconds"
leviathan prepare --ray 127.0.0.1:6379 --input "$OUT/nocol.parquet" data.dir="$OUT/bad" \\
    > "$OUT/bad.log" 2>&1
echo $? > "$OUT/bad.rc"
leviathan prepare --ray 127.0.0.1:6379 --input "$OUT/cjk.txt" data.dir="$OUT/cjk" \\
    data.tokenizer.model="$OUT/raw.model" > "$OUT/cjk.log" 2>&1
echo $? > "$OUT/cjk.rc"
ray job submit --address http://127.0.0.1:8265 --working-dir . -- python launch/prepare.py \\
    --input "$CORPUS" data.dir="$OUT/job" data.shard_tokens=2000 data.tokenizer.vocab_size=320 \\
    data.val_fraction=0.1 > "$OUT/job.log" 2>&1
echo $? > "$OUT/job.rc"
"""


@pytest.mark.slow
def test_ray_data_path_writes_the_local_shards(texts, folder, tmp_path):
    """A real Ray head in a private network namespace; `leviathan prepare --ray` encodes
    on it with Ray Data, and so does `launch/prepare.py` submitted as a Ray job: shards,
    tokenizer and index byte for byte the local path's."""
    corpus = tmp_path / "corpus"
    shutil.copytree(folder, corpus / "txt")
    write_formats(corpus, texts[:6])  # JSONL, gzip, zstd and Parquet files too
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "nocol.parquet")
    (tmp_path / "cjk.txt").write_text("漢字 is new\n" + "plain words\n" * 50, encoding="utf-8")
    write_raw_model(tmp_path / "raw.model")
    local = build(corpus, tmp_path / "local", shard_tokens=2000, workers=2, batch_chars=3000)
    run_on_cluster(RAY_PREPARE, tmp_path, 600, CORPUS=str(corpus))
    log = (tmp_path / "ray.log").read_text()
    assert (tmp_path / "ray.rc").read_text().strip() == "0", log[-4000:]
    assert "with Ray Data" in log
    ray_index = load_index(tmp_path / "ray")
    assert len(ray_index.shards["train"]) > 2
    assert files_of(ray_index) == files_of(local)
    assert (tmp_path / "bad.rc").read_text().strip() == "2"
    assert 'nocol.parquet: no column "text"' in (tmp_path / "bad.log").read_text()
    assert not (tmp_path / "bad").exists()
    cjk = (tmp_path / "cjk.log").read_text()  # a worker's error reaches the user, named
    assert (tmp_path / "cjk.rc").read_text().strip() == "2", cjk[-4000:]
    assert "error: the tokenizer does not reproduce" in cjk and "cjk.txt exactly" in cjk
    assert not (tmp_path / "cjk").exists()
    job = (tmp_path / "job.log").read_text()
    assert (tmp_path / "job.rc").read_text().strip() == "0", job[-4000:]
    assert files_of(load_index(tmp_path / "job")) == files_of(local)  # launch/prepare.py
    assert (tmp_path / "stop.rc").read_text().strip() == "0"
    print(f"ray prepare: {(tmp_path / 'ray.seconds').read_text().strip()} s")
