"""One process of a 2-process gloo group (``python -m torch.distributed.run --nproc_per_node 2``) that builds a
Qwen-Image TwinFlow model from ``PRETRAINED`` under :class:`fewstep.training.distributed.Sharded`, shards it, runs a
forward
pass and one AdamW step, and saves what the test compares to ``OUT/rank{r}.pt``. ``MODE``: ``rank0`` builds inside
``Sharded.building`` (only rank 0 reads the weights), ``every`` as before it (every rank reads them). Every call of
``safetensors.torch.load_file`` (diffusers' weight reader) is recorded. ``resume`` (:func:`resume`): checkpoint a
sharded model, EMA teacher and AdamW after one step, load it into fresh ones and record what each rank read;
``resume_bf16`` the same with bfloat16 weights, an EMA of decay 0.9 and three steps (the EMA's low bits).
``policy`` (:func:`policy`): what ``Sharded`` makes of the model: its FSDP modules, the dtypes inside a forward under
``trainer.mixed_precision`` no and bf16, and the reduce-scatters of a backward inside and after ``Sharded.no_sync``.
``MODE`` may list several modes (``rank0,every,resume``): they run in turn in the one process group (one launch),
each writing to ``OUT/<mode>/``."""

from __future__ import annotations

import contextlib
import sys
import types
from pathlib import Path

import safetensors.torch
import torch
import torch.distributed as dist


def inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 4, 6, 4, generator=g)
    t = torch.tensor([1.0, 0.7, -0.4, -0.9])
    tt = torch.tensor([0.0, 0.2, -0.4, -0.9])
    cond = {"prompt_embeds": torch.randn(4, 5, 16, generator=g), "prompt_embeds_mask": torch.ones(4, 5).long()}
    return x, t, tt, cond


class _Counted:
    """A ``safe_open`` file whose tensor reads are counted in bytes (``reads``: one entry per read)."""

    def __init__(self, file, reads: list):
        self.file, self.reads = file, reads

    def __enter__(self):
        self.file.__enter__()
        return self

    def __exit__(self, *exc):
        return self.file.__exit__(*exc)

    def keys(self):
        return self.file.keys()

    def get_tensor(self, key):
        return self._count(self.file.get_tensor(key))

    def get_slice(self, key):
        file = self

        class Slice:
            def __getitem__(self, index):
                return file._count(file.file.get_slice(key)[index])

        return Slice()

    def _count(self, tensor):
        self.reads.append(tensor.numel() * tensor.element_size())
        return tensor


def resume(pretrained: str, out: str, dtype: str = "float32", steps: int = 1, decay: float = 0.5) -> None:
    """Rank ``r`` saves ``OUT/rank{r}.pt``: ``read`` (bytes read from each safetensors file by ``load_checkpoint``),
    ``whole_reads`` (files read whole), ``optim_mmap`` (how ``optim.pt`` was opened), ``local`` (the bytes of this
    rank's shards of the trainable parameters), the gathered ``saved`` and ``restored`` weights, EMA (and its low
    bits, bfloat16) and AdamW moments, and ``history``: the gathered trainable weights after each step."""
    import fewstep.training.checkpoint as ckpt_io
    from fewstep.models.qwenimage import QwenImageModel
    from fewstep.teachers.base import EMATeacher
    from fewstep.training.distributed import Sharded, full_optimizer_state, gathered

    rank = dist.get_rank()
    strategy = Sharded(types.SimpleNamespace(process_index=rank, num_processes=2, device=torch.device("cpu")))

    def build():
        with strategy.building():
            model = QwenImageModel(pretrained=pretrained, time_pair=True, data_shape=[4, 6, 4], dtype=dtype)
        strategy.place(model)
        teacher = EMATeacher(decay=decay)
        teacher.bind(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        return model, teacher, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)

    def snapshot(model, teacher, optimizer):
        moments = full_optimizer_state(optimizer)["state"]
        return {"model": gathered(model.state_dict()), "ema": gathered(teacher.shadow),
                "ema_low": gathered(teacher.shadow_low),
                "moments": {(i, k): v for i, e in moments.items() for k, v in e.items()}}  # fmt: skip

    model, teacher, optimizer, scheduler = build()
    x, t, tt, cond = inputs()
    history = []
    for step in range(1, steps + 1):
        model(x, t, tt, cond).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        history.append(gathered({k: p for k, p in model.named_parameters() if p.requires_grad}))
        teacher.update(model, step)
    folder = ckpt_io.save_checkpoint(Path(out) / "ckpt", steps, model, teacher, optimizer, scheduler, 0,
                                     write=rank == 0)  # fmt: skip
    saved = snapshot(model, teacher, optimizer)
    dist.barrier()

    model, teacher, optimizer, scheduler = build()
    read, whole_reads, optim_mmap = {}, [], []
    safe_open, load_file, torch_load = ckpt_io.safe_open, ckpt_io.load_file, torch.load
    ckpt_io.safe_open = lambda path, **kw: _Counted(safe_open(path, **kw), read.setdefault(Path(path).name, []))
    ckpt_io.load_file = lambda path, *a, **kw: whole_reads.append(Path(path).name) or load_file(path, *a, **kw)

    def recorded_load(path, *args, **kwargs):
        if Path(path).name == "optim.pt":
            optim_mmap.append(kwargs.get("mmap"))
        return torch_load(path, *args, **kwargs)

    torch.load = recorded_load
    ckpt_io.load_checkpoint(folder, model, teacher, optimizer, scheduler, restore_rng=False, rank=rank)
    torch.load = torch_load
    ckpt_io.safe_open, ckpt_io.load_file = safe_open, load_file
    local = {k: p.to_local().numel() * p.element_size() for k, p in model.named_parameters() if p.requires_grad}
    torch.save(
        {"read": {k: sum(v) for k, v in read.items()}, "whole_reads": whole_reads, "optim_mmap": optim_mmap,
         "local": local, "saved": saved, "restored": snapshot(model, teacher, optimizer), "history": history},
        Path(out) / f"rank{rank}.pt",
    )  # fmt: skip


def policy(pretrained: str, out: str) -> None:
    """Rank ``r`` saves ``OUT/rank{r}.pt``: per ``trainer.mixed_precision`` (``no``, ``bf16``) of a sharded tiny
    Qwen-Image model, ``fsdp_modules`` (the names of its FSDP modules), ``inside`` (a Linear's weight, input and
    output dtypes during the forward: in the first shard unit, ``block``, and outside every unit, ``root``),
    ``param_dtypes`` / ``shards`` (the parameters between forwards: dtypes, whether all are DTensor shards),
    ``grad_dtypes`` and ``reduce_dtypes`` (the sharded gradients' dtypes and those of the reduce-scatter inputs);
    ``reduces``: the reduce-scatter calls made by a backward inside ``Sharded.no_sync`` (micro-batch 1, rows 0-1)
    and by the next one after it (micro-batch 2, rows 2-3); ``grads_inside`` (sharded gradients set by the first
    backward) and ``grads`` (the gathered gradients after both: the sum of the two micro-batches')."""
    from torch.distributed.fsdp import FSDPModule

    from fewstep.models.qwenimage import QwenImageModel
    from fewstep.training.distributed import Sharded, gathered, is_shard, shard_units

    rank = dist.get_rank()
    calls: list = []
    originals = {name: getattr(dist, name) for name in ("reduce_scatter_single", "reduce_scatter_tensor")
                 if hasattr(dist, name)}  # fmt: skip

    def counted(original):
        def reduce_scatter(*args, **kwargs):
            calls.append((kwargs["input"] if "input" in kwargs else args[1]).dtype)
            return original(*args, **kwargs)

        return reduce_scatter

    x, t, tt, cond = inputs()
    micro = [(x[rows], t[rows], tt[rows], {k: v[rows] for k, v in cond.items()}) for rows in (slice(0, 2), slice(2, 4))]
    record = {}
    for precision in ("no", "bf16"):
        accelerator = types.SimpleNamespace(process_index=rank, num_processes=2, device=torch.device("cpu"))
        strategy = Sharded(accelerator, precision)
        with strategy.building():
            model = QwenImageModel(pretrained=pretrained, time_pair=True, data_shape=[4, 6, 4])
        units = shard_units(model)  # by class name: FSDP renames the classes it wraps
        strategy.place(model)
        in_units = {id(m) for unit in units for m in unit.modules()}
        linears = {
            "block": next(m for m in units[0].modules() if isinstance(m, torch.nn.Linear)),
            "root": next(m for m in model.modules() if isinstance(m, torch.nn.Linear) and id(m) not in in_units),
        }
        inside = {}

        def spy(where, inside=inside):
            def hook(module, args, output):  # returns None: the output stays as it is
                inside.setdefault(where, (module.weight.dtype, args[0].dtype, output.dtype))

            return hook

        for where, linear in linears.items():
            linear.register_forward_hook(spy(where))
        for name, original in originals.items():
            setattr(dist, name, counted(original))
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")  # as the loop's
        try:
            with strategy.no_sync(model):
                with autocast:
                    loss = model(*micro[0]).float().square().mean()
                loss.backward()
            reduces = [len(calls)]
            grads_inside = [p.grad is not None for p in model.parameters()]
            with autocast:
                loss = model(*micro[1]).float().square().mean()
            loss.backward()
            reduces.append(len(calls))
        finally:
            for name, original in originals.items():
                setattr(dist, name, original)
        record[precision] = {
            "fsdp_modules": [name for name, m in model.named_modules() if isinstance(m, FSDPModule)],
            "inside": inside,
            "param_dtypes": {p.dtype for p in model.parameters()},
            "shards": all(is_shard(p) for p in model.parameters()),
            "grad_dtypes": {p.grad.dtype for p in model.parameters() if p.grad is not None},
            "reduce_dtypes": set(calls),
            "reduces": reduces,
            "grads_inside": grads_inside,
            "grads": gathered({k: p.grad for k, p in model.named_parameters() if p.grad is not None}),
        }
        calls.clear()
    torch.save(record, Path(out) / f"rank{rank}.pt")


READS: list[str] = []  # the weight files read by safetensors.torch.load_file in the current mode
_load_file = safetensors.torch.load_file


def _recorded(path, *args, **kwargs):
    READS.append(str(path))
    return _load_file(path, *args, **kwargs)


def main(pretrained: str, out: str, modes: str) -> None:
    dist.init_process_group("gloo")
    safetensors.torch.load_file = _recorded  # before diffusers is imported
    for mode in modes.split(","):
        folder = Path(out) / mode
        folder.mkdir(parents=True, exist_ok=True)
        if mode in ("resume", "resume_bf16"):
            resume(pretrained, str(folder), *(("bfloat16", 3, 0.9) if mode == "resume_bf16" else ()))
        elif mode == "policy":
            policy(pretrained, str(folder))
        else:
            load(pretrained, folder, mode)
        dist.barrier()
    dist.destroy_process_group()


def load(pretrained: str, out: Path, mode: str) -> None:
    rank = dist.get_rank()
    READS.clear()
    reads = READS
    from fewstep.models.qwenimage import QwenImageModel
    from fewstep.training.distributed import Sharded, gathered

    strategy = Sharded(types.SimpleNamespace(process_index=rank, num_processes=2, device=torch.device("cpu")))
    with strategy.building() if mode == "rank0" else contextlib.nullcontext():
        model = QwenImageModel(pretrained=pretrained, time_pair=True, data_shape=[4, 6, 4])
    on_meta = [p.is_meta for p in model.parameters()]
    persistent = set(model.state_dict())
    strategy.place(model)
    buffers = {k: v.clone() for k, v in model.named_buffers() if k not in persistent}
    buffers.update({k: v.clone() for k, v in vars(model.transformer.pos_embed).items() if torch.is_tensor(v)})
    placed = gathered(model.state_dict())
    x, t, tt, cond = inputs()
    with torch.no_grad():
        before = model(x, t, tt, cond)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(x, t, tt, cond).square().mean().backward()
    optimizer.step()
    with torch.no_grad():
        after = model(x, t, tt, cond)
    stepped = gathered(model.state_dict())
    torch.save(
        {"reads": reads, "on_meta": on_meta, "buffers": buffers, "placed": placed, "before": before,
         "after": after, "stepped": stepped},
        Path(out) / f"rank{rank}.pt",
    )  # fmt: skip


if __name__ == "__main__":
    main(*sys.argv[1:4])
