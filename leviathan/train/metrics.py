"""Where a run's numbers go: metrics.jsonl (the record of truth) and W&B."""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

from leviathan.errors import ConfigError, StorageError
from leviathan.storage import atomic_write_text, read_records


class MetricsLog:
    """Appends one JSON object per step; on resume, drops records past the resumed step
    so a run that crashed after its last checkpoint never shows a step twice, and a last
    line torn by a crash or a full disk (with a warning)."""

    def __init__(self, path: Path, resume_step: int = 0, log: Callable[[str], None] = print):
        self.path = path
        if resume_step and path.exists():
            kept = [r for r in read_records(path, log) if r["step"] <= resume_step]
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
        elif not resume_step:
            path.write_text("", encoding="utf-8")
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def log(self, record: dict[str, Any]) -> None:
        try:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        except OSError as err:
            raise StorageError(f"cannot write {self.path}: {err.strerror}") from err

    def close(self) -> None:
        self.file.close()


def resolve_wandb_mode(mode: str) -> tuple[str, str]:
    """The mode W&B starts in, and why (a line for the log). `run.wandb` other than `auto`
    is used as given. `auto` resolves as W&B itself does, so a user's `wandb login`,
    `wandb offline` or WANDB_MODE means here what it means to W&B: W&B's own mode when it
    says disabled or offline (WANDB_MODE, or a settings file), else online when W&B finds
    credentials for its server (WANDB_API_KEY, a settings file, the ~/.netrc entry `wandb
    login` writes), else offline."""
    if mode != "auto":
        return mode, f"run.wandb={mode}"
    settings = wandb_settings()
    if settings.mode == "disabled":
        return "disabled", "W&B's mode is disabled (WANDB_MODE or `wandb disabled`)"
    if settings.mode in ("offline", "dryrun"):
        return "offline", "W&B's mode is offline (WANDB_MODE or `wandb offline`)"
    if wandb_credentials(settings):
        return "online", f"W&B has credentials for {settings.base_url}"
    return "offline", (
        f"W&B has no credentials for {settings.base_url} (`wandb login` or WANDB_API_KEY); "
        "`wandb sync` uploads the offline run later"
    )


def wandb_settings() -> Any:
    """W&B's settings for this process, loaded by W&B from its environment variables and
    settings files; a value W&B rejects is a ConfigError naming its variable."""
    from pydantic import ValidationError
    from wandb.sdk import wandb_setup

    try:
        return wandb_setup.singleton().settings
    except ValidationError as err:
        problem = err.errors()[0]
        key = ".".join(str(part) for part in problem["loc"])
        raise ConfigError(
            f"W&B settings: WANDB_{key.upper()} (or {key} in a W&B settings file): "
            f"{problem['msg']}, got {problem['input']!r}"
        ) from None


def wandb_credentials(settings: Any) -> bool:
    """Whether W&B finds credentials for its server, looked up by W&B's own function (the
    one `wandb.login` and `wandb.init` call): no prompt, no network, nothing written."""
    import wandb
    from wandb.errors import AuthenticationError

    try:
        from wandb.sdk.lib import wbauth
    except ImportError:
        raise ConfigError(
            f"run.wandb=auto: wandb {wandb.__version__} has no wandb.sdk.lib.wbauth to look "
            "up credentials with; upgrade wandb, or set run.wandb to online or offline"
        ) from None
    try:
        host = wbauth.HostUrl(settings.base_url, app_url=settings.app_url)
        auth = wbauth.authenticate_session(
            host=host, source="leviathan", prompt=False, update_session=False
        )
    except (AuthenticationError, ValueError) as err:
        raise ConfigError(
            f"run.wandb=auto: W&B's credentials for {settings.base_url} (WANDB_API_KEY, "
            f"~/.netrc or a W&B settings file): {err}"
        ) from None
    return auth is not None


class WandbRun:
    """A W&B run resumed across restarts by an id kept in the run folder; `log` says which
    mode it runs in and why."""

    def __init__(
        self,
        run_dir: Path,
        mode: str,
        project: str,
        config: dict[str, Any],
        log: Callable[[str], None] = print,
    ):
        self.mode, why = resolve_wandb_mode(mode)
        self.run = None
        if mode != "disabled":  # asked for by name: nothing to explain
            log(f"W&B: {self.mode} ({why})")
        if self.mode == "disabled":
            return
        import wandb

        wandb_settings()  # a bad WANDB_* variable: one line, not wandb.init's traceback
        id_file = run_dir / "wandb_id"
        if not id_file.exists():
            id_file.write_text(secrets.token_hex(4), encoding="utf-8")
        try:
            self.run = wandb.init(
                project=project,
                dir=run_dir,
                id=id_file.read_text(encoding="utf-8").strip(),
                resume="allow",
                mode=self.mode,
                config=config,
                name=run_dir.name,
            )
        except wandb.errors.Error as err:  # no API key for online, a server that refuses
            raise ConfigError(
                f"run.wandb={mode}: W&B cannot start its {self.mode} run: {err}"
            ) from None

    def log(self, record: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.log(scalars(record), step=record["step"])

    def log_images(self, step: int, images: dict[str, Path]) -> None:
        """PNGs (the curves, the expert-load figures) as W&B images at `step`."""
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Image(str(path)) for key, path in images.items()}, step=step)

    def log_sample(self, step: int, text: str) -> None:
        """The run's sample (its prompt included) as text: a W&B table of one row, the way
        W&B shows text."""
        if self.run is not None:
            import wandb

            table = wandb.Table(columns=["step", "sample"], data=[[step, text]])
            self.run.log({"sample": table}, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()


def scalars(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Flatten nested metrics to `moe/layer1/imbalance` keys, keeping numbers only."""
    flat = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(scalars(value, f"{name}/"))
        elif isinstance(value, (int, float)) and name != "step":
            flat[name] = value
    return flat
