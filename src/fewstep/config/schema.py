"""Typed schemas for every config group (Hydra ConfigStore).

Each YAML under ``conf/<group>/`` starts from one of these via its defaults
list (``/schema/<group>/<name>@_here_``), so a misspelt key or a wrong type
fails at compose time with a message naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from fewstep.config.searchpath import CONF_DIR, ConfigPathError, config_dirs, with_user_search_path
from fewstep.objectives.base import registered as registered_objectives


# --------------------------------------------------------------------------- teachers
@dataclass
class EMATeacherConfig:
    _target_: str = "fewstep.teachers.EMATeacher"
    decay: float = 0.99
    sampling_decay: float | None = None


@dataclass
class StudentTeacherConfig:
    _target_: str = "fewstep.teachers.StudentTeacher"
    allow_student_teacher: bool = False


@dataclass
class FrozenTeacherConfig:
    _target_: str = "fewstep.teachers.FrozenTeacher"


# --------------------------------------------------------------------------- samplers
@dataclass
class UCGMSamplerConfig:
    _target_: str = "fewstep.samplers.ucgm.UCGMSampler"
    preset: str | None = None
    style: str = "few"
    stochast_ratio: Any = 1.0  # float in [0, 1] or "SDE"
    extrapol_ratio: float = 0.0
    sampling_order: int = 1
    time_dist_ctrl: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    rfba_gap_steps: list[float] | None = None
    guidance_scale: float = 0.0
    shift: float = 1.0
    step_noise: str = "latents"  # latents: each sample's step noise keyed on its initial noise (= exported pipelines)


@dataclass
class EulerSamplerConfig:
    _target_: str = "fewstep.samplers.euler.EulerSampler"
    guidance_scale: float = 0.0
    shift: float = 1.0


# --------------------------------------------------------------------------- models
@dataclass
class TinyModelConfig:
    _target_: str = "fewstep.models.tiny.TinyMLP"
    width: int = 256
    depth: int = 3
    emb_dim: int = 128
    dropout: float = 0.0
    prediction_type: str = "flow"  # the tiny nets are flow-matching models
    input_skip: bool = True  # conditioning-set per-pixel gains on x_t added to the output (docs/defaults.md)
    out_modulation: bool = True  # adaLN shift/scale before the output layer (as in DiT's final layer)
    time_scale: float = 1000.0  # time features of t·time_scale; objective=scm wants 1 (docs/objectives.md)


@dataclass
class LoraModelConfig:
    """peft LoRA on the model (``enabled=false``: full fine-tune). SPEC §7 defaults: r=64, alpha=64."""

    enabled: bool = False
    rank: int = 64
    alpha: float = 64.0
    target_modules: list[str] = field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj"]
    )
    dropout: float = 0.0
    init: str = "gaussian"  # peft init_lora_weights: gaussian | true (both start with B = 0: identity)


@dataclass
class SD35ModelConfig:
    _target_: str = "fewstep.models.sd3.SD3Model"
    pretrained: str = "stabilityai/stable-diffusion-3.5-medium"  # hub id, pipeline folder or transformer folder
    subfolder: str | None = None  # None: transformer/ for a pipeline, the folder itself for a bare transformer
    revision: str | None = None
    # weights: float32 | bfloat16 | float16 | auto (models/family.py weight_dtype_name); LoRA trainables: float32
    dtype: str = "float32"
    gradient_checkpointing: bool = False
    prediction_type: str = "flow"
    lora: LoraModelConfig = field(default_factory=LoraModelConfig)
    no_grad_chunk: int = 0  # > 0: no-grad passes (teacher, sampling) run in row chunks of this size (less memory)
    # Real size without weights (step time / memory only; export and eval refuse such a run): the shipped
    # architecture (fewstep/models/architectures/*.json) with random weights, num_layers overriding its depth.
    random_init: bool = False
    architecture: str = "sd35_medium"
    num_layers: int | None = None


@dataclass
class SanaModelConfig(SD35ModelConfig):
    _target_: str = "fewstep.models.sana.SanaModel"
    pretrained: str = "Efficient-Large-Model/Sana_1600M_1024px_diffusers"
    architecture: str = "sana_1600m_1024px"
    lora: LoraModelConfig = field(
        default_factory=lambda: LoraModelConfig(target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    )


OPENUNI_LORA_TARGETS = [  # the reference's (inclusionAI/TwinFlow openuni_lora_*) that SANA has
    "to_q", "to_k", "to_v", "to_out.0", "time_embed.linear", "timestep_embedder.linear_1", "timestep_embedder.linear_2",
]  # fmt: skip


@dataclass
class OpenUniModelConfig(SanaModelConfig):
    _target_: str = "fewstep.models.openuni.OpenUniModel"
    pretrained: str = ""  # the OpenUniPipeline folder of python -m fewstep.convert_openuni
    architecture: str = "openuni_l_512"  # model.random_init: OpenUni-L-512's SANA-1.6B-512 DiT, 256 query embeddings
    lora: LoraModelConfig = field(default_factory=lambda: LoraModelConfig(target_modules=list(OPENUNI_LORA_TARGETS)))


QWENIMAGE_LORA_TARGETS = [  # the reference's target list (SPEC §9)
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2",
    "timestep_embedder.linear_1", "timestep_embedder.linear_2",
]  # fmt: skip


@dataclass
class QwenImageModelConfig(SD35ModelConfig):
    _target_: str = "fewstep.models.qwenimage.QwenImageModel"
    pretrained: str = "Qwen/Qwen-Image"
    architecture: str = "qwen_image"
    lora: LoraModelConfig = field(default_factory=lambda: LoraModelConfig(target_modules=list(QWENIMAGE_LORA_TARGETS)))


@dataclass
class SD15ModelConfig:
    _target_: str = "fewstep.models.diffusion.DiffusionUNetModel"
    pretrained: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    subfolder: str | None = None  # None: unet/ for a pipeline, the folder itself for a bare UNet
    revision: str | None = None
    prediction_type: str = "epsilon"  # epsilon | v_prediction (bridged to flow by diff2flow)
    dtype: str = "float32"
    gradient_checkpointing: bool = False
    lora: LoraModelConfig = field(
        default_factory=lambda: LoraModelConfig(target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    )
    no_grad_chunk: int = 0
    # DDPM schedule (alphas_cumprod); read from <pretrained>/scheduler when schedule_from_pretrained
    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    schedule_from_pretrained: bool = True
    # model.random_init: the shipped UNet architecture (fewstep/models/architectures/*.json) with random weights
    random_init: bool = False
    architecture: str | None = None
    num_layers: int | None = None  # (transformers only: a UNet is built whole)


@dataclass
class SDXLModelConfig(SD15ModelConfig):
    _target_: str = "fewstep.models.sdxl.SDXLUNetModel"
    pretrained: str = "stabilityai/stable-diffusion-xl-base-1.0"
    architecture: str | None = "sdxl_base"
    vae_scale_factor: int | None = None  # None: from <pretrained>/vae (the size/crop ids are in pixels)


# --------------------------------------------------------------------------- data
@dataclass
class DigitsDataConfig:
    _target_: str = "fewstep.data.digits.DigitsData"
    batch_size: int = 128
    split: str = "train"  # train (1,500 images) | all (1,797)


@dataclass
class Toy2DDataConfig:
    _target_: str = "fewstep.data.toy2d.Toy2DData"
    batch_size: int = 256
    name: str = "moons"  # moons | checkerboard | 8gaussians


@dataclass
class LatentsDataConfig:
    _target_: str = "fewstep.data.latents.LatentData"
    path: str = ""  # a cache written by `python -m fewstep.precompute ... out=DIR`
    batch_size: int = 8
    vae: str = ""  # decode grids with this pipeline's VAE; empty = the `pretrained` recorded in the cache
    decode_device: str | None = None  # None: the latents' device
    prefetch: int = 2  # batches each stream reads ahead in a background thread (pinned on CUDA); 0: read in the step


@dataclass
class SyntheticDataConfig:
    _target_: str = "fewstep.data.synthetic.SyntheticData"
    architecture: str = "sd35_medium"  # a shipped architecture (fewstep/models/architectures/*.json)
    resolution: int = 1024  # pixels; latents are resolution / the VAE factor on a side
    batch_size: int = 1
    # valid prompt tokens per sample (the rest is masked padding): null = the whole padded length; for the
    # families whose prompts are padded and masked (SANA, Qwen-Image); Qwen-Image's cost follows it
    text_tokens: int | None = None


# --------------------------------------------------------------------------- trainer / logger
@dataclass
class TrainerConfig:
    max_steps: int = 3000
    seed: int = 42
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    eps: float = 1e-8
    warmup_steps: int = 0  # linear warm-up over this many steps (0 = none)
    lr_schedule: str = "constant"  # constant | cosine | linear (decay to lr·min_lr_ratio at max_steps)
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0
    grad_accum: int = 1
    mixed_precision: str = "no"  # no | bf16 | fp16
    log_every: int = 50
    sample_every: int = 1000
    checkpoint_every: int = 1000
    keep_last: int = 2
    resume: str = "auto"  # auto | none | PATH (a checkpoint dir or a run dir)
    init_from: str | None = None  # start from a finished run's weights (run dir or checkpoint dir); docs/objectives.md
    init_from_ema: bool = True  # with init_from: use that run's EMA teacher weights (what it sampled with)
    max_nonfinite: int = 20  # abort after this many non-finite steps in a row
    time_limit_s: float = 0.0  # stop early after this many seconds of training (0 = no limit)
    # checkpoint and exit (128 + signal number) on these; SLURM sends SIGUSR1 ahead of the time limit (--signal)
    stop_signals: list[str] = field(default_factory=lambda: ["SIGINT", "SIGTERM", "SIGUSR1"])
    # seconds a rank waits in a collective (torch's default: 600 for NCCL): covers rank 0 writing a whole-state
    # checkpoint (245 GB for a full Qwen-Image at 100 MB/s: 2,450 s) and its final evaluation
    dist_timeout_s: float = 3600.0
    # the GPU's dense bf16/fp16 TFLOP/s for the logged MFU; null: the published figure of a known GPU (H100, A100, ...)
    peak_tflops: float | None = None
    final_nfe: list[int] = field(default_factory=lambda: [1, 2, 4])
    baseline_steps: int = 50  # multi-step Euler baseline sampled and evaluated at the end (0 = skip)
    evaluate: bool = True
    torch_threads: int = 0  # 0 = chosen at start from the cores free now (fewstep/training/threads.py)
    compile: bool = False  # torch.compile the model's forward (student, teacher and sampling passes)
    grid_size: int = 100
    # ddp: Accelerate's DDP replicas across processes | fsdp: the student sharded over the processes (torch FSDP2,
    # per transformer block). Launch both with accelerate launch --multi_gpu --num_processes N
    distributed: str = "ddp"
    # auto: sharded under fsdp (each rank writes its shards, torch.distributed.checkpoint), full otherwise | full:
    # whole tensors gathered on rank 0 (safetensors) | sharded (fsdp only). Either format resumes, exports and samples
    checkpoint_format: str = "auto"
    # sharded checkpoints only: each rank copies its shards to host memory and a thread writes them while training
    # goes on (the checkpoint is committed before the next save; the last save of a run waits)
    async_checkpoint: bool = False


@dataclass
class LoggerConfig:
    kind: str = "jsonl"  # jsonl | wandb | none
    progress: bool = True
    project: str = "fewstep"
    entity: str | None = None
    mode: str = "offline"  # wandb: offline (default, no account needed) | online


@dataclass
class Diff2FlowConfig:
    enabled: bool = False


@dataclass
class LaunchConfig:
    """How a run is meant to be launched (the paper rows, ``experiment=table6/...``). Read by the docs and the
    tests only (no start-up check or warning); the loop itself takes its process count from Accelerate."""

    num_processes: int = 1  # processes / GPUs: accelerate launch --num_processes N
    distributed: str = "ddp"  # ddp | fsdp: documents the row; the run's strategy is trainer.distributed
    resolution: int | None = None  # image size (px) the latent cache is precomputed at
    model_family: str | None = None  # tiny | sd35 | qwenimage | openuni
    paper_steps: str | None = None  # the step count(s) the paper reports for this row
    reference_config: str | None = None  # the inclusionAI/TwinFlow config file the row reproduces
    hardware: str | None = None  # the GPUs the row expects
    notes: str | None = None  # where fewstep differs from the reference for this row


@dataclass
class Config:
    objective: Any = MISSING
    teacher: Any = MISSING
    sampler: Any = MISSING
    model: Any = MISSING
    data: Any = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    diff2flow: Diff2FlowConfig = field(default_factory=Diff2FlowConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    optimize_metric: str | None = None  # dotted path into summary.json returned to a Hydra sweeper


SCHEMAS = {
    # "objective": each objective's schema lives with the objective (Objective.config_schema): schemas()
    "teacher": {"ema": EMATeacherConfig, "student": StudentTeacherConfig, "frozen": FrozenTeacherConfig},
    "sampler": {"ucgm": UCGMSamplerConfig, "ucgm_any": UCGMSamplerConfig, "euler": EulerSamplerConfig},
    "model": {
        "tiny": TinyModelConfig,
        "sd35": SD35ModelConfig,
        "sd15": SD15ModelConfig,
        "sdxl": SDXLModelConfig,
        "sana": SanaModelConfig,
        "openuni": OpenUniModelConfig,
        "qwenimage": QwenImageModelConfig,
    },
    "data": {
        "digits": DigitsDataConfig,
        "toy2d": Toy2DDataConfig,
        "latents": LatentsDataConfig,
        "synthetic": SyntheticDataConfig,
    },
    "trainer": {"default": TrainerConfig},
    "logger": {"default": LoggerConfig},
}


def schemas() -> dict[str, dict[str, type]]:
    """Every group's schemas by name: :data:`SCHEMAS` and the registered objectives' (read now, so an objective
    defined after this module was imported is there)."""
    objectives = {name: cls.config_schema for name, cls in registered_objectives().items()}
    return {"objective": objectives, **SCHEMAS}


HELP_GROUPS = ("objective", "teacher", "sampler", "model", "data", "trainer", "logger", "experiment")


def help_template() -> str:
    """``--help`` text: every user-facing group with its choices (read from the shipped conf/)."""
    lines = [
        "fewstep: few-step training of flow-matching generators (TwinFlow / RCGM).",
        "",
        "Usage: python -m fewstep [group=choice ...] [key=value ...]   (-m for a multirun sweep)",
        "",
        "== Config groups (group=choice) ==",
    ]

    try:
        roots = config_dirs()
    except ConfigPathError:  # reported when the command runs
        roots = [CONF_DIR]
    for group in HELP_GROUPS:
        choices = sorted(
            {
                str(p.relative_to(root / group).with_suffix(""))
                for root in roots
                for p in (root / group).rglob("*.yaml")
                if not p.name.startswith("_")
            }
        )
        lines.append(f"{group}: {', '.join(choices) if choices else '(none)'}")
    lines += [
        "",
        "== Config (the composed defaults; override any key as key=value) ==",
        "$CONFIG",
        "Other commands: python -m fewstep.sample | fewstep.eval | fewstep.bench | fewstep.report | "
        "fewstep.precompute | fewstep.export | fewstep.convert_openuni",
        "Hydra's own options: python -m fewstep --hydra-help",
    ]
    return "\n".join(lines)


def when(value, expected, result, otherwise=None):
    """``${fewstep_when:a,b,c[,d]}`` is ``c`` when ``a == b``, else ``d`` (default null): a setting for one arm
    of a multirun over another key (experiment=sweep/objectives gives trainer.init_from to the dmd2 arm)."""
    return result if str(value) == str(expected) else otherwise


def register_schemas() -> None:
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("fewstep_when", when, replace=True)
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    cs.store(
        group="hydra/help",
        name="fewstep",
        node={"app_name": "fewstep", "header": "", "footer": "", "template": help_template()},
    )
    for group, nodes in schemas().items():
        for name, node in nodes.items():
            cs.store(group=f"schema/{group}", name=name, node=node)


def compose_config(overrides: list[str], return_hydra_config: bool = False):
    """The config ``python -m fewstep <overrides>`` composes (no run dir, no job), via Hydra's compose API,
    with the user's config folders (``./conf``, ``FEWSTEP_CONFIG_PATH``) on the search path as there."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_schemas()
    overrides = with_user_search_path(list(overrides))
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name="config", overrides=overrides, return_hydra_config=return_hydra_config)
    finally:
        GlobalHydra.instance().clear()
