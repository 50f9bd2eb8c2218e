"""Open a finished (or running) run directory: its composed config, components and last weights.

Shared by ``fewstep.sample``, ``fewstep.eval`` and ``fewstep.export``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from fewstep.errors import FewstepError
from fewstep.models.family import loading_onto
from fewstep.training import checkpoint as ckpt_io
from fewstep.training.threads import set_torch_threads
from fewstep.training.trainables import build_components


class RunDirError(FewstepError, FileNotFoundError):
    """Not a usable run directory."""


@dataclass
class LoadedRun:
    run_dir: Path
    cfg: DictConfig
    data: object
    objective: object
    student: torch.nn.Module
    teacher: object
    sampler: object
    checkpoint: Path
    step: int
    device: torch.device

    def model_fn(self, weights: str = "ema"):
        """The weights to sample with: ``ema`` (the teacher's average where one is kept) or ``student``."""
        if weights == "student":
            return self.student
        if weights != "ema":
            raise RunDirError(f"weights={weights!r} must be 'ema' or 'student'")
        return self.teacher.sampling_model


def refuse_random_init(cfg: DictConfig, run_dir: str | Path, command: str) -> None:
    """A ``model.random_init=true`` run trained random weights of a published architecture to measure speed
    and memory: sampling, evaluating or exporting it as a trained model is refused with one line."""
    if cfg.get("model") is not None and cfg.model.get("random_init", False):
        raise RunDirError(
            f"run_dir={run_dir} trained a random-weight architecture (model.random_init=true, for step time and "
            f"memory only): fewstep.{command} refuses it; train from real weights (model.pretrained=...)"
        )


def read_run_config(run_dir: str | Path, command: str) -> DictConfig:
    """The run's composed config (``.hydra/config.yaml``); a random-weight run is refused
    (:func:`refuse_random_init`)."""
    cfg_path = Path(run_dir) / ".hydra" / "config.yaml"
    if not cfg_path.exists():
        raise RunDirError(f"{run_dir} is not a fewstep run dir (no .hydra/config.yaml); pass run_dir=<a run dir>")
    cfg = resolve_hydra_interpolations(OmegaConf.load(cfg_path), Path(run_dir))
    refuse_random_init(cfg, run_dir, command)
    return cfg


def _hydra_interpolations(node, path: str = "") -> list[str]:
    """Dotted paths of the string values of ``node`` (a plain container) that use ``${hydra:...}``."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    found = []
    for key, value in items:
        where = f"{path}[{key}]" if isinstance(node, list) else f"{path}.{key}" if path else str(key)
        if isinstance(value, str) and "${hydra:" in value:
            found.append(where)
        else:
            found += _hydra_interpolations(value, where)
    return found


def resolve_hydra_interpolations(cfg: DictConfig, run_dir: Path) -> DictConfig:
    """``cfg`` with every value that uses ``${hydra:...}`` replaced by what it was in the run: a preset may set a
    key from the job's Hydra state (experiment=sweep/objectives: ``model.time_scale`` and ``trainer.init_from``
    from ``${hydra:runtime.choices.objective}`` and ``${hydra:runtime.output_dir}``), which only a Hydra job
    resolves. They resolve here from the run's ``.hydra/hydra.yaml``, with ``runtime.output_dir`` the run dir as
    it is now (a moved sweep folder still finds its sibling runs). Other interpolations are left as written."""
    paths = _hydra_interpolations(OmegaConf.to_container(cfg, resolve=False))
    if not paths:
        return cfg
    from fewstep.config.schema import register_schemas

    register_schemas()  # the ${fewstep_when:...} resolver such values are wrapped in
    hydra_yaml = run_dir / ".hydra" / "hydra.yaml"
    if not hydra_yaml.is_file():
        raise RunDirError(
            f"{run_dir}/.hydra/config.yaml sets {paths[0]} from Hydra's job state (${{hydra:...}}) but "
            f"{hydra_yaml} is missing; copy the run's whole .hydra folder"
        )
    state = OmegaConf.load(hydra_yaml).get("hydra") or OmegaConf.create()
    OmegaConf.update(state, "runtime.output_dir", str(run_dir.resolve()), force_add=True)
    scratch = cfg.copy()
    OmegaConf.set_struct(scratch, False)
    scratch.hydra = state
    for path in paths:
        written = str(_written(cfg, path))
        OmegaConf.update(scratch, path, written.replace("${hydra:", "${hydra."), merge=False)
        try:
            value = OmegaConf.select(scratch, path, throw_on_missing=True)
        except Exception as err:  # noqa: BLE001 - omegaconf raises several types for a key hydra.yaml lacks
            raise RunDirError(
                f"{run_dir}: {path}={written} does not resolve from {hydra_yaml} ({str(err).splitlines()[0]})"
            ) from None
        OmegaConf.update(cfg, path, value, merge=False)
    return cfg


def _written(cfg: DictConfig, path: str) -> str:
    """The value at ``path`` as written (an interpolation unresolved)."""
    node = cfg
    for part in path.replace("[", ".").replace("]", "").split("."):
        node = node._get_node(int(part) if part.isdigit() and not isinstance(node, DictConfig) else part)
    return node._value()


def find_checkpoint(run_dir: str | Path, checkpoint: str | None, warn=print) -> Path:
    """``checkpoint`` (checked before any model is built), else the run's newest valid checkpoint."""
    if checkpoint:
        ckpt = Path(checkpoint)
        if not (ckpt / "state.json").is_file():
            what = "is incomplete (no state.json)" if ckpt.is_dir() else "does not exist"
            raise RunDirError(
                f"checkpoint={checkpoint} {what}; give a folder {run_dir}/checkpoints/step_* or leave checkpoint= "
                "out for the newest valid one"
            )
        ckpt_io.verify(ckpt)
        return ckpt
    ckpt = ckpt_io.latest_valid(Path(run_dir) / "checkpoints", warn=warn)
    if ckpt is None:
        raise RunDirError(f"{run_dir}/checkpoints holds no valid checkpoint; train longer or pass checkpoint=")
    return ckpt


def load_run(
    run_dir: str | Path, device: str | None = None, checkpoint: str | None = None, command: str = "sample"
) -> LoadedRun:
    """Rebuild a run's components from ``.hydra/config.yaml`` and load its newest valid checkpoint."""
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir, command)
    ckpt = find_checkpoint(run_dir, checkpoint)
    # the run's trainer.torch_threads (0: chosen from the cores free now, as training does): sampling beside a busy
    # process at one thread per core is as slow as training there
    trainer = cfg.get("trainer") or {}
    logging.getLogger("fewstep").info("%s", set_torch_threads(int(trainer.get("torch_threads", 0) or 0)))
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    with loading_onto(dev):  # pretrained weights straight onto the device
        data, objective, student, teacher, sampler = build_components(cfg, device=dev)
    state = ckpt_io.load_checkpoint(ckpt, student, teacher, restore_rng=False)
    student.eval()
    return LoadedRun(run_dir, cfg, data, objective, student, teacher, sampler, ckpt, state["step"], dev)
