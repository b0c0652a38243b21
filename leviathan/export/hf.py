"""A run as a Hugging Face folder: `AutoModelForCausalLM.from_pretrained(DIR,
trust_remote_code=True)` and `AutoTokenizer.from_pretrained(DIR)` load it where neither
`leviathan` nor `moe` can be imported.

The folder holds config.json (the run's `model:` and an `auto_map` to the classes),
the modelling code (`leviathan.hf`'s wrapper and the model's own source, imports made
relative: `export.sources`), model.safetensors (the tied head stored once and declared),
generation_config.json, and tokenizer.json with its config, converted from the run's
SentencePiece model. It is built under a temporary name and renamed into place; an
existing folder is replaced only when asked (`force`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from leviathan.data import Tokenizer
from leviathan.data.folder import staging
from leviathan.errors import CheckpointError, ConfigError, StorageError
from leviathan.export.safetensors import TIED, checked_state
from leviathan.export.sources import flat_name, write_sources
from leviathan.model import Leviathan
from leviathan.model.gpt import model_config
from leviathan.storage import fsync_file

HF_EXPORT = "hf"  # the folder's default name, in the run folder
CONFIG = "leviathan.hf.configuration_leviathan"
MODELING = "leviathan.hf.modeling_leviathan"
PREFIX = "model."  # the wrapper holds the native model as `model`


def export_hf(
    run_dir: Path, checkpoint: Path, out: Path | None = None, force: bool = False
) -> Path:
    """Write checkpoint `checkpoint` of `run_dir` as a Hugging Face folder (default
    RUN/hf); an existing `out` is refused unless `force`."""
    out = out or run_dir / HF_EXPORT
    check_target(out, force)
    tokenizer = Tokenizer.load(run_dir / "tokenizer.model")
    state = checked_state(checkpoint)
    raw = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))["model"]
    return save_hf(out, raw, state, tokenizer, force, source=checkpoint)


def save_hf(
    out: Path,
    raw: dict,
    state: dict[str, torch.Tensor],
    tokenizer: Tokenizer,
    force: bool = False,
    source: Path | None = None,
) -> Path:
    """Write the model of config `raw` (a config's `model:`) with weights `state` and its
    tokenizer as the folder `out`, built aside and renamed into place; `source` names
    where the weights came from in errors."""
    check_target(out, force)
    model = checked_model(raw, state, source or out)
    if tokenizer.vocab_size != model.cfg.vocab_size:
        raise CheckpointError(
            f"{tokenizer.path or 'tokenizer'}: {tokenizer.vocab_size} pieces, but the model of "
            f"{source or out} has vocab_size {model.cfg.vocab_size}"
        )
    try:
        with staging(out) as folder:
            write_folder(folder, raw, state, tokenizer, model.can_cache())
    except OSError as err:
        raise StorageError(f"--out {out}: cannot write it: {err.strerror or err}") from None
    return out


def check_target(out: Path, force: bool) -> None:
    """Before any work: the parent folder exists, `out` is new or may be replaced, and
    transformers is installed."""
    if not out.parent.is_dir():
        raise StorageError(f"--out {out}: the folder {out.parent} does not exist")
    if out.exists() and not out.is_dir():
        raise StorageError(f"--out {out}: exists and is not a folder")
    if out.exists() and not force:
        raise StorageError(f"--out {out}: the folder exists; pass --force to replace it")
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise ConfigError(
            "--format hf: needs transformers, the `hf` extra: pip install -e '.[hf]'"
        ) from None


def checked_model(raw: dict, state: dict[str, torch.Tensor], checkpoint: Path) -> Leviathan:
    """The model of the config, its weights checked against the state key by key (built
    on the meta device: no memory, no initialisation)."""
    try:
        with torch.device("meta"):
            model = Leviathan(model_config(raw))
        model.load_state_dict(state, assign=True)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(
            f"{checkpoint}: not this version's model: {' '.join(str(err).split())}"
        ) from None
    return model


def write_folder(
    folder: Path, raw: dict, state: dict[str, torch.Tensor], tokenizer: Tokenizer, cache: bool
) -> None:
    """Every file of the export, fsynced (the caller renames the folder into place)."""
    from safetensors.torch import save
    from transformers import GenerationConfig

    from leviathan.hf.configuration_leviathan import LeviathanConfig
    from leviathan.hf.tokenizer import hf_tokenizer

    config, modeling = map(flat_name, (CONFIG, MODELING))
    write_sources(folder, [CONFIG, MODELING])
    LeviathanConfig(
        leviathan=raw,
        eos_token_id=tokenizer.eos_id,
        use_cache=cache,
        architectures=["LeviathanForCausalLM"],
        auto_map={
            "AutoConfig": f"{config}.LeviathanConfig",
            "AutoModelForCausalLM": f"{modeling}.LeviathanForCausalLM",
        },
        dtype="float32",
    ).save_pretrained(folder)
    GenerationConfig(eos_token_id=tokenizer.eos_id, use_cache=cache).save_pretrained(folder)
    tensors = {PREFIX + k: v.contiguous() for k, v in state.items() if k not in TIED}
    (folder / "model.safetensors").write_bytes(save(tensors, metadata={"format": "pt"}))
    hf_tokenizer(tokenizer.model_proto, raw["block_size"]).save_pretrained(folder)
    for path in folder.iterdir():
        fsync_file(path)
