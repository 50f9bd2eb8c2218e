"""One process of a 2-process gloo group (``python -m torch.distributed.run --nproc_per_node 2``) that builds a
Qwen-Image TwinFlow model from ``PRETRAINED`` under :class:`fewstep.distributed.Sharded`, shards it, runs a forward
pass and one AdamW step, and saves what the test compares to ``OUT/rank{r}.pt``. ``MODE``: ``rank0`` builds inside
``Sharded.building`` (only rank 0 reads the weights), ``every`` as before it (every rank reads them). Every call of
``safetensors.torch.load_file`` (diffusers' weight reader) is recorded."""

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


def main(pretrained: str, out: str, mode: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    reads = []
    load_file = safetensors.torch.load_file

    def recorded(path, *args, **kwargs):
        reads.append(str(path))
        return load_file(path, *args, **kwargs)

    safetensors.torch.load_file = recorded
    from fewstep.distributed import Sharded, gathered
    from fewstep.models.qwenimage import QwenImageModel

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
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
