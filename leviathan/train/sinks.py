"""Where a step's record goes, behind one `log(record)`: metrics.jsonl (the record of
truth), W&B, the progress display and the expert-load figures. Rank 0 only: on the other
ranks every call is a no-op, so the loop never asks which rank it is on."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from leviathan.config import Config
from leviathan.storage import read_records
from leviathan.train.checkpoint import quiet
from leviathan.train.metrics import MetricsLog, WandbRun
from leviathan.train.plots import balance_figure, curves_figure, expert_load_figure, save
from leviathan.train.progress import Progress
from leviathan.train.run_folder import METRICS_FILE

CURVES_PNG = "curves.png"
MOE_FIGURES = {  # W&B key: (file in the run folder, the figure of the routing records)
    "moe/expert_load": ("expert_load.png", expert_load_figure),
    "moe/balance": ("moe_balance.png", balance_figure),
}


class ExpertLoad:
    """The routing records of an MoE run (those kept on resume, then each step's), drawn
    as the expert-load and balance figures at the end and, for W&B, at every evaluation."""

    def __init__(self, run_dir: Path, wandb: WandbRun):
        self.run_dir, self.wandb = run_dir, wandb
        self.records = [r for r in read_records(run_dir / METRICS_FILE, quiet) if "moe" in r]

    def log(self, record: dict[str, Any]) -> None:
        if "moe" not in record:
            return
        self.records.append(record)
        if "val_loss" in record and self.wandb.run is not None:
            self.wandb.log_images(record["step"], self.draw())

    def draw(self) -> dict[str, Path]:
        """Write the figures; their paths by W&B key."""
        paths = {}
        for key, (name, figure) in MOE_FIGURES.items():
            paths[key] = self.run_dir / name
            save(figure(self.records), paths[key])
        return paths


class Sinks:
    """The run's outputs on rank 0, opened at the session's first step."""

    def __init__(
        self,
        cfg: Config,
        start_step: int,
        parallel: dict[str, Any],
        *,
        routed: bool,
        enabled: bool,
        log: Callable[[str], None],
    ):
        t, self.enabled = cfg.train, enabled
        self.run_dir = Path(cfg.run.dir)
        self.progress = Progress(
            t.max_steps,
            start_step,
            enabled=enabled,
            mode=t.progress,
            interval=t.log_interval,
            log=log,
        )
        if not enabled:
            return
        self.metrics = MetricsLog(self.run_dir / METRICS_FILE, start_step, log)
        config = cfg.to_dict() | {"layout": parallel}  # the config, and how it was laid out
        self.wandb = WandbRun(
            self.run_dir, cfg.run.wandb, cfg.run.wandb_project, config, self.progress.write
        )
        self.expert_load = ExpertLoad(self.run_dir, self.wandb) if routed else None

    def log(self, record: dict[str, Any]) -> None:
        """One step's record, to every sink."""
        if not self.enabled:
            return
        self.metrics.log(record)
        self.wandb.log(record)
        if self.expert_load is not None:
            self.expert_load.log(record)
        self.progress.step(record)

    def write(self, message: str) -> None:
        """A message between steps (an evaluation's line), through the progress display."""
        self.progress.write(message)

    def close(self) -> None:
        """End of the loop: the last progress line out, metrics.jsonl closed."""
        self.progress.close()
        if self.enabled:
            self.metrics.close()

    def finish(
        self,
        step: int,
        val_bpc: float | None,
        unigram: float | None,
        heldout: float | None,
        sample: str,
    ) -> None:
        """After the final evaluation: the plots, and to W&B the final scores, the figures
        and the sample; W&B closed."""
        if not self.enabled:
            return
        records = read_records(self.run_dir / METRICS_FILE, quiet)
        images = {"curves": self.run_dir / CURVES_PNG}
        save(curves_figure(records), images["curves"])
        if self.expert_load is not None and self.expert_load.records:
            images |= self.expert_load.draw()
        if val_bpc is not None:
            self.wandb.log({"step": step, "final_val_bpc": val_bpc, "unigram_bpc": unigram})
        if heldout is not None:
            self.wandb.log({"step": step, "final_heldout_bpc": heldout})
        self.wandb.log_images(step, images)
        self.wandb.log_sample(step, sample)
        self.wandb.finish()
