"""Metric sinks: ``metrics.jsonl`` (always, the output contract), plus W&B or nothing.

Only the main process writes. The (t, tt) pairs a step trained on go to
``trajectory.jsonl`` (sigma = |t|, tt, sign), drawn as ``trajectory.png`` at the
end and as a W&B scatter when ``logger=wandb``.
"""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path

import torch

TRAJECTORY_ROWS = 64  # (t, tt) pairs recorded per logged step


def to_float(v) -> float:
    return float(v.item()) if isinstance(v, torch.Tensor) else float(v)


WANDB_ID_FILE = "wandb_run_id.txt"


def wandb_run_id(run_dir: Path) -> str:
    """The run dir's W&B run id (``wandb_run_id.txt``, made on its first start): every resume of the run logs into
    the one W&B run instead of starting a new one."""
    path = Path(run_dir) / WANDB_ID_FILE
    if path.exists() and path.read_text().strip():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:16]
    path.write_text(run_id + "\n")
    return run_id


class MetricsWriter:
    def __init__(self, run_dir: Path, cfg, resume_step: int | None = None, enabled: bool = True):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.traj_path = self.run_dir / "trajectory.jsonl"
        self.wandb = None
        if not enabled:
            return
        # A resumed run drops rows logged after its checkpoint, so the file reads as one run.
        for p in (self.path, self.traj_path):
            if p.exists():
                keep = []
                if resume_step is not None:
                    for line in p.read_text().splitlines():
                        try:
                            if json.loads(line)["step"] <= resume_step:
                                keep.append(line)
                        except (ValueError, KeyError):
                            break
                p.write_text("".join(k + "\n" for k in keep))
        # Created at the start: a run stopped before its first log step (trainer.time_limit_s, a signal) still has
        # the file, with no rows (its final loss terms are in summary.json).
        self.path.touch()
        if cfg.logger.kind == "wandb":
            import wandb
            from omegaconf import OmegaConf

            self.wandb = wandb.init(
                project=cfg.logger.project,
                entity=cfg.logger.entity,
                mode=cfg.logger.mode,
                dir=str(self.run_dir),
                config=OmegaConf.to_container(cfg, resolve=True),
                id=wandb_run_id(self.run_dir),
                resume="allow",
            )
        elif cfg.logger.kind not in ("jsonl", "none"):
            raise ValueError(f"logger.kind={cfg.logger.kind!r} is unknown; use jsonl, wandb or none")

    def log(self, step: int, metrics: dict, times: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
        row = {"step": step}
        for k, v in metrics.items():
            f = to_float(v)
            row[k] = f if math.isfinite(f) else str(f)
        if not self.enabled:
            return row
        with self.path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        traj = None
        if times is not None:
            # an even stride over the batch, so every group (e2e, mul, any, adv) is represented
            rows = torch.linspace(0, times[0].shape[0] - 1, min(TRAJECTORY_ROWS, times[0].shape[0])).long()
            t, tt = (a.detach()[rows.to(a.device)].float().cpu() for a in times)
            traj = {"step": step, "sigma": t.abs().tolist(), "tt": tt.tolist(), "sign": torch.sign(t).tolist()}
            with self.traj_path.open("a") as fh:
                fh.write(json.dumps(traj) + "\n")
        if self.wandb is not None:
            payload = {k: v for k, v in row.items() if k != "step" and isinstance(v, float)}
            if traj is not None:
                import wandb

                table = wandb.Table(
                    data=[[s, a, b] for s, a, b in zip(traj["sigma"], traj["tt"], traj["sign"])],
                    columns=["sigma", "tt", "sign"],
                )
                payload["trajectory"] = wandb.plot.scatter(table, "sigma", "tt", title="sigma vs tt (sign column)")
            self.wandb.log(payload, step=step)
        return row

    def log_images(self, step: int, images: dict[str, Path]) -> None:
        if self.wandb is not None:
            import wandb

            self.wandb.log({k: wandb.Image(str(v)) for k, v in images.items()}, step=step)

    def finish(self, summary: dict) -> None:
        if self.enabled:
            plot_trajectory(self.traj_path, self.run_dir / "trajectory.png")
        if self.wandb is not None:
            self.wandb.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float))})
            self.wandb.finish()


def plot_trajectory(traj_path: Path, out: Path) -> Path | None:
    """Scatter of sigma = |t| against tt, coloured by sign (negative = adversarial fake trajectory)."""
    if not traj_path.exists():
        return None
    sig, tts, signs = [], [], []
    for line in traj_path.read_text().splitlines():
        row = json.loads(line)
        sig += row["sigma"]
        tts += row["tt"]
        signs += row["sign"]
    if not sig:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4), dpi=100)
    pos = [i for i, s in enumerate(signs) if s >= 0]
    neg = [i for i, s in enumerate(signs) if s < 0]
    ax.scatter([sig[i] for i in pos], [tts[i] for i in pos], s=3, alpha=0.4, label="real trajectory (t >= 0)")
    ax.scatter([sig[i] for i in neg], [tts[i] for i in neg], s=3, alpha=0.4, c="C3", label="fake trajectory (t < 0)")
    ax.set_xlabel("sigma = |t|")
    ax.set_ylabel("target time tt (signed)")
    ax.axhline(0, color="0.6", lw=0.5)
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title("sampled training times", fontsize=9)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
