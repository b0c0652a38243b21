"""leviathan.data: documents, tokenizer, prepared shards, batches."""

from __future__ import annotations

import json
import random
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from leviathan.data import (
    DataIndex,
    Document,
    Tokenizer,
    bundled_documents,
    eval_windows,
    get_batch,
    global_batch_starts,
    load_index,
    load_tokens,
    prepare,
    read_documents,
    split_documents,
    split_point,
    token_dtype,
)
from leviathan.data.bundled import bundled_archive
from leviathan.data.tokenizer import training_chunks
from leviathan.errors import ConfigError, DataError

WORDS = (
    "the of and to a in that is was he for it with as his on be at by I had not are but from "
    "or have an they which one you were her all she there would their we him been has when "
    "who will more no if out so said what up its about into than them can only other new "
    "some could time these two may then do first any my now such like our over man me even "
    "most made after also did many before must through back years where much your way well"
).split()


@dataclass
class TokCfg:
    kind: str = "bpe"
    vocab_size: int = 320
    model: str | None = None
    sample_chars: int = 10_000_000


@dataclass
class DataCfg:
    inputs: list[str] = field(default_factory=list)
    dir: str = "data"
    val_fraction: float = 0.1
    tokenizer: TokCfg = field(default_factory=TokCfg)
    text_field: str = "text"
    workers: int = 1
    batch_chars: int = 4_000_000
    shard_tokens: int = 100_000_000


def make_text(rng: random.Random, lines: int) -> str:
    out = []
    for _ in range(lines):
        n = rng.randint(0, 12)
        line = " ".join(rng.choice(WORDS) for _ in range(n))
        if rng.random() < 0.2:
            line = line.capitalize() + rng.choice([".", ",", "!", "?", " 42", ":"])
        if rng.random() < 0.05:
            line = "  " + line + "\t"
        out.append(line)
    return "\n".join(out) + rng.choice(["", "\n", "\n\n"])


def write_corpus(root: Path, n_docs: int = 6, lines: int = 80, seed: int = 0) -> Path:
    rng = random.Random(seed)
    folder = root / "corpus"
    (folder / "sub").mkdir(parents=True)
    for i in range(n_docs):
        where = folder / "sub" if i % 2 else folder
        (where / f"doc{i:02d}.txt").write_text(make_text(rng, lines), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def tok(corpus) -> Tokenizer:
    texts = [d.text for d in read_documents([str(corpus)])]
    texts.append("é ü ñ ß 漢字 🎉 — “quotes”\n" * 5)
    return Tokenizer.train(texts, "bpe", 400)


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory) -> tuple[DataCfg, DataIndex]:
    out = tmp_path_factory.mktemp("prepared")
    cfg = DataCfg(inputs=[str(corpus)], dir=str(out / "ds"))
    return cfg, prepare(cfg, log=lambda _: None)


# ---------------------------------------------------------------- tokenizer


TRICKY = [
    "",
    " ",
    "hello\n\nworld\n",
    "\n\n\nleading newlines and trailing spaces   ",
    "multiple     spaces\tand\ttabs\t\t\n\t  mixed \t \n",
    "windows\r\nline\r\nends\r\n",
    "non-ASCII: é ü ñ ß Ωmega 漢字 — “curly” ‘quotes’",
    "emoji 🎉🚀 and zwj 👩\u200d💻 and a combining e\u0301",
    "literal \u2581 meta \u2581\u2581 symbols\u2581",
    "control \x00 \x07 \x7f chars, BOM \ufeff mid-text",
    "markup that looks special: </s> <unk> <s> <0x41> <pad>",
    "digits 1234567890 and 3.14159",
]


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_is_exact(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.eos_id not in ids and 0 not in ids  # no separator, no <unk>


def test_batch_encode_save_and_load(tok, tmp_path):
    assert tok.encode_batch(TRICKY) == [tok.encode(t) for t in TRICKY]
    path = tmp_path / "tok.model"
    tok.save(path)
    loaded = Tokenizer.load(path)
    assert loaded.vocab_size == tok.vocab_size == 400
    assert loaded.eos_id == 1 and loaded.kind == "bpe"
    assert [loaded.encode(t) for t in TRICKY] == [tok.encode(t) for t in TRICKY]
    assert loaded.decode([loaded.eos_id, *loaded.encode("a b"), loaded.eos_id]) == "a b"
    # newlines are learnt pieces, not byte fallback
    assert "\n" in {loaded.id_to_piece(i) for i in range(loaded.vocab_size)}


def test_training_is_deterministic(corpus):
    texts = [d.text for d in read_documents([str(corpus)])]
    a = Tokenizer.train(texts, "bpe", 320)
    b = Tokenizer.train(texts, "bpe", 320)
    assert a.model_proto == b.model_proto


def test_training_chunks_cut_before_newlines():
    rng = random.Random(1)
    text = make_text(rng, 400) + " " + "word " * 300  # ends with one long line
    chunks = list(training_chunks([text], size=200))
    assert "".join(chunks) == text
    assert all(len(c) <= 200 for c in chunks)
    assert all(c.startswith(("\n", " ")) for c in chunks[1:])
    assert not any(c.endswith("\n") for c in chunks[:-1])


def test_vocab_too_large_names_the_size(corpus):
    texts = [d.text for d in read_documents([str(corpus)])]
    with pytest.raises(DataError, match=r"vocab_size 5000 is too large.*at most \d+"):
        Tokenizer.train(texts, "unigram", 5000)
    with pytest.raises(DataError, match="vocab_size 100 is too small"):
        Tokenizer.train(texts, "bpe", 100)
    with pytest.raises(DataError, match="training text is empty"):
        Tokenizer.train([" \n "], "bpe", 300)


def test_load_rejects_non_model(tmp_path):
    bad = tmp_path / "x.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(DataError, match="x.model"):
        Tokenizer.load(bad)
    with pytest.raises(DataError, match="missing.model"):
        Tokenizer.load(tmp_path / "missing.model")


# ---------------------------------------------------------------- documents


def test_read_documents_order_globs_jsonl(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.txt").write_text("zed\n")
    (tmp_path / "b" / "a.md").write_text("ay\n")
    (tmp_path / "b" / ".hidden").write_text("secret\n")
    (tmp_path / "b" / "blank.txt").write_text("  \n\n")
    (tmp_path / "c.txt").write_text("\ufeffsee\n")
    rows = [{"text": "first\nrecord"}, {"text": "second", "id": 2}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    docs = read_documents([str(tmp_path / "b"), str(tmp_path / "*.txt"), str(tmp_path / "d.jsonl")])
    names = [Path(d.name).name for d in docs]
    assert names == ["a.md", "z.txt", "c.txt", "d.jsonl:1", "d.jsonl:2"]
    assert [d.text for d in docs] == ["ay\n", "zed\n", "see\n", "first\nrecord", "second"]
    # the same file twice is read once; order is stable
    again = read_documents([str(tmp_path / "c.txt"), str(tmp_path / "*.txt")])
    assert [d.text for d in again] == ["see\n"]


@pytest.mark.parametrize(
    "setup, inputs, message",
    [
        (lambda p: None, ["nope.txt"], "nope.txt' does not exist"),
        (lambda p: None, ["*.nothing"], r"glob pattern '.*\*\.nothing' matches no file"),
        (lambda p: (p / "e.txt").write_text(" \n\t\n"), ["e.txt"], "empty corpus: .*e.txt"),
        (
            lambda p: (p / "bin.txt").write_bytes(b"good text\n\xff\xfe bad"),
            ["bin.txt"],
            r"bin.txt is not UTF-8 text: byte 10 \(0xff\)",
        ),
        (
            lambda p: (p / "r.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n'),
            ["r.jsonl"],
            r'r.jsonl:2: expected a JSON object with a "text" field',
        ),
        (
            lambda p: (p / "s.jsonl").write_text('{"text": "ok"}\n\n{"text": broken\n'),
            ["s.jsonl"],
            r"s.jsonl:3: invalid JSON",
        ),
        (
            lambda p: (p / "t.jsonl").write_text('{"text": 3}\n'),
            ["t.jsonl"],
            r't.jsonl:1: "text" must be a string',
        ),
    ],
)
def test_bad_inputs_name_the_culprit(tmp_path, monkeypatch, setup, inputs, message):
    monkeypatch.chdir(tmp_path)
    setup(tmp_path)
    with pytest.raises(DataError, match=message):
        read_documents(inputs)


def test_split_point_is_a_line_aligned_tail():
    rng = random.Random(3)
    for trial in range(300):
        text = make_text(rng, rng.randint(1, 60))
        fraction = rng.choice([0.0, 0.01, 0.05, 0.1, 0.3, 0.5])
        cut = split_point(text, fraction)
        train, val = text[:cut], text[cut:]
        assert train + val == text
        assert len(val) <= round(fraction * len(text))
        if val:
            assert cut > 0 and text[cut - 1] == "\n", trial  # val starts a line
            assert val.strip()
    assert split_point("one single line", 0.5) == len("one single line")  # tiny: all train
    assert split_point("a\nb\nc\nd\n", 0.5) == 4  # "a\nb\n" | "c\nd\n"


def test_whole_document_fallback():
    docs = [Document(f"r:{i}", f"record number {i} " * 5) for i in range(10)]
    train, val, fallback = split_documents(docs, 0.2)
    assert fallback and [d.name for d in val] == ["r:8", "r:9"]
    assert train + val == docs
    with pytest.raises(DataError, match="r:0 is a single document"):
        split_documents(docs[:1], 0.2)


# ---------------------------------------------------------------- prepare


def parts_between_eos(tokens: np.ndarray, eos: int) -> list[list[int]]:
    """The documents of a stream `eos d1 eos d2 ...`."""
    assert len(tokens) == 0 or tokens[0] == eos
    cuts = np.flatnonzero(tokens == eos).tolist() + [len(tokens)]
    return [tokens[a + 1 : b].tolist() for a, b in zip(cuts[:-1], cuts[1:], strict=True)]


def test_prepare_counts_are_exact(prepared):
    cfg, index = prepared
    docs = read_documents(cfg.inputs)
    tok = index.tokenizer()
    assert index.dtype == "uint16" and index.vocab_size == 320
    expect = {"train": [], "val": []}
    for doc in docs:
        cut = split_point(doc.text, cfg.val_fraction)
        assert doc.text[:cut] + doc.text[cut:] == doc.text  # no overlap, nothing lost
        expect["train"] += [doc.text[:cut]] if cut else []
        expect["val"] += [doc.text[cut:]] if cut < len(doc.text) else []
    assert len(expect["val"]) >= len(docs) - 1
    for split, texts in expect.items():
        stats = index.splits[split]
        tokens = load_tokens(index.dir, split)
        assert tokens.dtype == np.uint16 and len(tokens) == stats["tokens"]
        assert stats["characters"] == sum(len(t) for t in texts)
        assert stats["bytes"] == sum(len(t.encode()) for t in texts)
        assert stats["documents"] == len(texts)
        decoded = [tok.decode(p) for p in parts_between_eos(np.asarray(tokens), tok.eos_id)]
        assert decoded == texts  # the shards hold exactly the split texts, in order
    assert set(expect["train"]).isdisjoint(expect["val"])
    meta = json.loads((index.dir / "index.json").read_text())
    assert meta["config"]["val_fraction"] == cfg.val_fraction
    assert meta["tokenizer"]["kind"] == "bpe" and len(meta["fingerprint"]) == 64


def test_prepare_is_idempotent_and_rebuilds_on_change(prepared, tmp_path):
    cfg, index = prepared
    logs: list[str] = []
    before = {p.name: p.stat().st_mtime_ns for p in index.dir.iterdir()}
    again = prepare(cfg, log=logs.append)
    assert any("reusing" in m for m in logs)
    assert again.fingerprint == index.fingerprint
    assert {p.name: p.stat().st_mtime_ns for p in index.dir.iterdir()} == before

    other = DataCfg(inputs=cfg.inputs, dir=str(tmp_path / "ds"), val_fraction=0.2)
    first = prepare(other, log=lambda _: None)
    other.val_fraction = 0.3
    logs.clear()
    second = prepare(other, log=logs.append)
    assert any("rebuilding" in m for m in logs)
    assert second.fingerprint != first.fingerprint
    assert second.splits["val"]["characters"] > first.splits["val"]["characters"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ds.lock", "ds"]  # no leftovers


def test_failed_prepare_leaves_no_dataset(corpus, tmp_path):
    bad = DataCfg(inputs=[str(corpus)], dir=str(tmp_path / "ds"), tokenizer=TokCfg("unigram", 5000))
    with pytest.raises(DataError, match="vocab_size 5000"):
        prepare(bad, log=lambda _: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ds.lock"]
    with pytest.raises(DataError, match="run `leviathan prepare`"):
        load_index(tmp_path / "ds")

    good = DataCfg(inputs=[str(corpus)], dir=str(tmp_path / "ds"))
    index = prepare(good, log=lambda _: None)
    with pytest.raises(DataError, match="vocab_size 5000"):
        prepare(bad, log=lambda _: None)  # a failed rebuild keeps the old dataset whole
    assert load_index(tmp_path / "ds").fingerprint == index.fingerprint
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ds.lock", "ds"]


def test_broken_dataset_is_detected_and_rebuilt(corpus, tmp_path):
    cfg = DataCfg(inputs=[str(corpus)], dir=str(tmp_path / "ds"))
    index = prepare(cfg, log=lambda _: None)
    train = index.dir / "train-00000.bin"
    train.write_bytes(train.read_bytes()[:-2])  # truncated
    with pytest.raises(DataError, match=r"ds: train-00000.bin is .* bytes.*leviathan prepare"):
        load_tokens(index.dir, "train")
    logs: list[str] = []
    prepare(cfg, log=logs.append)
    assert any("rebuilding" in m for m in logs)
    assert len(load_tokens(index.dir, "train")) == index.splits["train"]["tokens"]
    (index.dir / "index.json").write_text("{not json")
    with pytest.raises(DataError, match="index.json is corrupt"):
        load_index(index.dir)


def test_prepare_refuses_a_foreign_folder(corpus, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    cfg = DataCfg(inputs=[str(corpus)], dir=str(tmp_path / "mine"))
    with pytest.raises(DataError, match="notes.txt.*refusing"):
        prepare(cfg, log=lambda _: None)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious"


def test_prepare_reuses_a_given_tokenizer(prepared, corpus, tmp_path):
    _, index = prepared
    cfg = DataCfg(
        inputs=[str(corpus)],
        dir=str(tmp_path / "ds"),
        tokenizer=TokCfg(vocab_size=999, model=str(index.tokenizer_path)),
    )
    again = prepare(cfg, log=lambda _: None)
    assert again.vocab_size == 320
    assert again.tokenizer_path.read_bytes() == index.tokenizer_path.read_bytes()
    assert np.array_equal(load_tokens(again.dir, "val"), load_tokens(index.dir, "val"))


def test_prepare_jsonl_single_line_records(tmp_path):
    rng = random.Random(5)
    rows = [{"text": " ".join(rng.choice(WORDS) for _ in range(40))} for _ in range(20)]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataCfg(inputs=[str(tmp_path / "r.jsonl")], dir=str(tmp_path / "ds"), val_fraction=0.1)
    logs: list[str] = []
    index = prepare(cfg, log=logs.append)
    assert any("whole document" in m for m in logs)
    assert index.splits["val"]["documents"] == 2 and index.splits["train"]["documents"] == 18
    assert index.splits["val"]["characters"] == sum(len(r["text"]) for r in rows[-2:])


def test_prepare_rejects_bad_val_fraction(corpus, tmp_path):
    with pytest.raises(ConfigError, match="val_fraction"):
        prepare(DataCfg(inputs=[str(corpus)], dir=str(tmp_path), val_fraction=1.0))


def test_token_dtype():
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


# ---------------------------------------------------------------- batches


def test_get_batch_is_a_pure_function_of_seed_and_step():
    tokens = np.arange(10_000, dtype=np.uint16)
    x, y = get_batch(tokens, 32, 8, seed=7, step=3)
    assert x.shape == y.shape == (8, 32) and x.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:])
    assert torch.equal(y[:, -1], x[:, -1] + 1)  # windows are contiguous token runs
    again, _ = get_batch(tokens, 32, 8, seed=7, step=3)
    assert torch.equal(x, again)
    assert not torch.equal(x, get_batch(tokens, 32, 8, seed=7, step=4)[0])
    assert not torch.equal(x, get_batch(tokens, 32, 8, seed=8, step=3)[0])
    halves = [get_batch(tokens, 32, 8, 7, 3, rank=r, world_size=2) for r in range(2)]
    assert torch.equal(torch.cat([h[0] for h in halves]), x)
    assert torch.equal(torch.cat([h[1] for h in halves]), y)
    quarters = [get_batch(tokens, 32, 8, 7, 3, rank=r, world_size=4)[0] for r in range(4)]
    assert torch.equal(torch.cat(quarters), x)
    starts = global_batch_starts(10_000, 32, 8, 7, 3)
    assert torch.equal(x[:, 0], torch.from_numpy(starts))


def test_get_batch_reaches_both_ends_and_checks_arguments():
    tokens = np.arange(6, dtype=np.uint16)
    seen = set()
    for step in range(50):
        x, y = get_batch(tokens, 5, 1, seed=0, step=step)
        seen.add(int(x[0, 0]))
    assert seen == {0}  # seq_len + 1 == len(tokens): one possible window
    starts = np.concatenate([global_batch_starts(100, 10, 64, 0, s) for s in range(20)])
    assert starts.min() == 0 and starts.max() == 89
    with pytest.raises(ValueError, match="6 rows does not split evenly over 4 ranks"):
        get_batch(np.arange(100), 4, 6, 0, 0, rank=0, world_size=4)
    with pytest.raises(DataError, match=r"holds 6 tokens, fewer than seq_len \+ 1 = 7"):
        get_batch(tokens, 6, 2, 0, 0)


@pytest.mark.parametrize(
    "n, seq_len, batch", [(1, 4, 2), (2, 4, 2), (17, 4, 3), (21, 4, 2), (100, 7, 5)]
)
def test_eval_windows_predict_every_token_once(n, seq_len, batch):
    tokens = np.arange(n, dtype=np.uint16) + 3
    xs, ys = [], []
    for x, y in eval_windows(tokens, seq_len, batch):
        assert x.shape == y.shape and x.shape[0] <= batch and x.shape[1] <= seq_len
        assert torch.equal(y[:, :-1], x[:, 1:])
        xs.append(x.flatten())
        ys.append(y.flatten())
    got_y = torch.cat(ys).numpy() if ys else np.zeros(0)
    got_x = torch.cat(xs).numpy() if xs else np.zeros(0)
    assert np.array_equal(got_y, tokens[1:]) and np.array_equal(got_x, tokens[:-1])
    limited = [y for _, y in eval_windows(tokens, seq_len, batch, max_tokens=5)]
    assert sum(y.numel() for y in limited) == min(5, n - 1)


# ---------------------------------------------------------------- bundled corpus


def test_bundled_archive():
    archive = bundled_archive()
    data = archive.read_bytes()
    assert len(data) < 2.5e6
    with tarfile.open(fileobj=__import__("io").BytesIO(data), mode="r:xz") as tar:
        names = tar.getnames()
    assert names == sorted(names)
    assert {"shakespeare/SOURCE.md", "shakespeare/metadata.ini"} <= set(names)
    docs = bundled_documents()
    assert [d.name for d in docs] == sorted(n for n in names if n.endswith("_gut.txt"))
    assert any(d.name == "shakespeare/hamlet_gut.txt" for d in docs)


def test_prepare_bundled_corpus(tmp_path):
    cfg = DataCfg(
        dir=str(tmp_path / "shakespeare"), val_fraction=0.05, tokenizer=TokCfg("bpe", 512)
    )
    index = prepare(cfg, log=lambda _: None)
    docs = bundled_documents()
    total = sum(len(d.text) for d in docs)
    assert 4.9e6 < total < 5.2e6
    train, val = index.splits["train"], index.splits["val"]
    assert train["characters"] + val["characters"] == total
    assert 0.04 < val["characters"] / total <= 0.05
    assert train["documents"] == val["documents"] == len(docs)
    assert index.vocab_size == 512 and index.dtype == "uint16"
    tokens = load_tokens(index.dir, "val")
    tok = index.tokenizer()
    first = parts_between_eos(np.asarray(tokens[:50_000]), tok.eos_id)[0]
    assert tok.decode(first) == docs[0].text[split_point(docs[0].text, 0.05) :]
    x, y = get_batch(load_tokens(index.dir, "train"), 64, 4, 0, 0)
    assert x.shape == (4, 64) and int(x.max()) < 512


# ---------------------------------------------------------------- held-out documents


def split_texts(index: DataIndex, split: str) -> list[str]:
    tok = index.tokenizer()
    tokens = np.asarray(load_tokens(index.dir, split))
    return [tok.decode(p) for p in parts_between_eos(tokens, tok.eos_id)]


@pytest.mark.parametrize(
    "val_documents,held",
    [
        (["doc02.txt", "*/sub/doc05.txt"], [2, 5]),  # a basename and a glob on the path
        (2, [2, 3]),  # two of six, spread: positions 1 and 4, the middles of [0, 3), [3, 6)
    ],
    ids=["named", "count"],
)
def test_val_documents_are_held_out_whole(corpus, tmp_path, val_documents, held):
    cfg = DataCfg(inputs=[str(corpus)], dir=str(tmp_path / "ds"))
    cfg.val_documents = val_documents
    index = prepare(cfg, log=lambda _: None)
    docs = read_documents(cfg.inputs)
    names = [Path(d.name).name for d in docs]
    assert names == [f"doc{i:02d}.txt" for i in (0, 2, 4, 1, 3, 5)]  # folder order: top first
    held_docs = [d for d in docs if int(Path(d.name).stem[3:]) in held]
    kept = [d for d in docs if d not in held_docs]
    assert split_texts(index, "heldout") == [d.text for d in held_docs]  # whole, in order
    assert index.meta["heldout_documents"] == [d.name for d in held_docs]
    # the others split as without held-out documents; none of the held-out text elsewhere
    cuts = [split_point(d.text, cfg.val_fraction) for d in kept]
    assert split_texts(index, "train") == [d.text[:c] for d, c in zip(kept, cuts, strict=True)]
    assert split_texts(index, "val") == [d.text[c:] for d, c in zip(kept, cuts, strict=True)]
    assert index.splits["heldout"]["documents"] == 2
    assert index.splits["heldout"]["characters"] == sum(len(d.text) for d in held_docs)


def test_val_documents_leave_the_tokenizer_sample(corpus):
    from leviathan.data.scan import scan

    docs = read_documents([str(corpus)])
    sources = [(str(corpus), docs)]
    plain = scan(sources, {}, 0.1, 10_000_000, "corpus")
    held = scan(sources, {}, 0.1, 10_000_000, "corpus", ["doc00.txt"])
    assert held.heldout == {0} and plain.heldout == frozenset()
    assert (
        "".join(held.sample)
        == "".join(plain.sample)[len(docs[0].text[: split_point(docs[0].text, 0.1)]) :]
    )


def test_val_documents_errors_name_the_key(corpus, tmp_path):
    cfg = DataCfg(inputs=[str(corpus)], dir=str(tmp_path / "ds"))
    cfg.val_documents = ["doc00.txt", "hamlet.txt"]
    with pytest.raises(DataError, match=r"data.val_documents: no document .* \['hamlet.txt'\]"):
        prepare(cfg, log=lambda _: None)
    cfg.val_documents = 6
    with pytest.raises(DataError, match="data.val_documents: 6 of the 6 document"):
        prepare(cfg, log=lambda _: None)
    assert not (tmp_path / "ds").exists()
    from leviathan.config import load_config

    with pytest.raises(ConfigError, match="data.val_documents: must be >= 0"):
        load_config(None, ["data.val_documents=-1"])
    with pytest.raises(ConfigError, match="data.val_documents"):
        load_config(None, ["data.val_documents=half"])


def test_val_documents_change_rebuilds(prepared, tmp_path):
    cfg, index = prepared
    other = DataCfg(inputs=cfg.inputs, dir=str(tmp_path / "ds"))
    first = prepare(other, log=lambda _: None)
    assert first.fingerprint == index.fingerprint and "heldout" not in first.splits
    other.val_documents = 1
    second = prepare(other, log=lambda _: None)
    assert second.fingerprint != first.fingerprint and "heldout" in second.splits


@pytest.mark.parametrize(
    ("changes", "fingerprint"),
    [
        ({}, "d96b4d994e8e03b09c4bebb686d4bd385b093f9d7468e060573760787704834d"),
        (
            {"val_fraction": 0.05, "val_documents": 2, "tokenizer": TokCfg("bpe", 400, None, 9000)},
            "0cc8c76885db8cd94caf3debbc3bcb7ed228f8497fe0dea026abbe4195a98140",
        ),
        (
            {
                "val_fraction": 0.05,
                "val_documents": ["doc00.txt", "*/sub/doc03.txt"],
                "shard_tokens": 500,
                "tokenizer": TokCfg("unigram", 400),
            },
            "dcd1fae2f066db3e9d02f9b38ed74761c98a9cffcc0bf4c8e9d166e5779a50aa",
        ),
    ],
    ids=["plain", "held-count", "held-names"],
)
def test_fingerprints_of_existing_datasets_stay_the_same(tmp_path, changes, fingerprint):
    """An existing dataset is reused only while its fingerprint is computed as when it was
    prepared: these were recorded by an earlier `prepare` (a FORMAT or TRAINER_VERSION bump
    changes them on purpose)."""
    from leviathan.data.scan import corpus_sources, scan
    from leviathan.data.settings import data_config, dataset_settings

    corpus = write_corpus(tmp_path, n_docs=8, lines=60, seed=3)
    raw = DataCfg(inputs=[str(corpus)], dir=str(tmp_path / "ds"))
    for key, value in changes.items():
        setattr(raw, key, value)
    cfg = data_config(raw)
    sources = corpus_sources(cfg.inputs, cfg.text_field)
    settings = dataset_settings(cfg, None)
    found = scan(sources, settings, cfg.val_fraction, 0, "corpus", cfg.val_documents)
    assert found.fingerprint == fingerprint
