"""DMD2 (arXiv 2405.14867) in fewstep's conventions (SPEC §11; docs/objectives.md).

A one-step generator ``x̂ = z − f(z, 1, 0, c)`` (the student) is trained against two score networks:
the **real score**, a frozen copy of the student's initial weights (the pretrained teacher: start from a
finished flow-matching run with ``trainer.init_from=RUN_DIR``), and the **fake score**, initialised from the
same weights and trained by flow matching on the generator's detached samples. Both are velocity models;
their data estimates at a noised sample ``x_t`` of ``x̂`` give the distribution-matching direction.

Update schedule (``stepping``): ``critic_steps`` fake-score updates, then one generator update, repeating;
every training step updates one of the two (``trainer.max_steps`` counts both). In LoRA runs every copy shares
the frozen base weights: the fake score is a second adapter on the same base, the real score the first
adapter's initial state, so the base is held once.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F_nn
from torch import nn

from fewstep.config.checks import ConfigError, check_range
from fewstep.data.base import Batch, cond_cat
from fewstep.objectives.base import EvalCounter, Network, Objective, sample_time, wide
from fewstep.objectives.jvp import unwrap
from fewstep.path import expand_like, interpolate


class GanHead(nn.Module):
    """DMD2's optional GAN classifier, on the fake score's view of a noised sample: logits from
    ``(x_t, f_fake(x_t, t, t, c))`` (image data average-pooled to at most 8×8) and ``t``."""

    def __init__(self, data_shape: tuple[int, ...], width: int = 256, pool: int = 8):
        super().__init__()
        self.spatial = len(data_shape) == 3
        if self.spatial:
            c, h, w = data_shape
            self.pooled = (min(h, pool), min(w, pool))
            features = 2 * c * self.pooled[0] * self.pooled[1]
        else:
            features = 2 * math.prod(data_shape)
        self.net = nn.Sequential(
            nn.Linear(features + 1, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 1)
        )

    def forward(self, x_t: torch.Tensor, velocity: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = torch.cat([x_t, velocity.to(x_t.dtype)], dim=1).float()
        if self.spatial:
            h = F_nn.adaptive_avg_pool2d(h, self.pooled)
        return self.net(torch.cat([h.flatten(1), t.float()[:, None]], dim=1)).squeeze(1)


def share_frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose frozen parameters and constant buffers are the original's (shared, not
    copied). Constant buffers: all but a normalisation layer's running statistics, which training updates; in
    the transformers here they are positional and rotary tables (SD3.5's ``pos_embed`` is 0.9 GB in float32,
    which two DMD2 copies would otherwise hold twice more)."""
    memo = {id(p): p for p in module.parameters() if not p.requires_grad}
    for sub in module.modules():
        if not isinstance(sub, nn.modules.batchnorm._NormBase):
            memo.update({id(b): b for b in sub.buffers(recurse=False)})
    return copy.deepcopy(module, memo)


@dataclass
class DMD2Config:
    _target_: str = "fewstep.objectives.dmd2.DMD2"
    target_step_count: int = 1
    critic_steps: int = 5
    fake_lr: float | None = None
    guidance_scale: float = 1.0
    time_min: float = 0.02
    time_max: float = 0.98
    gan: bool = False
    gan_weight: float = 1e-3
    gan_critic_weight: float = 1e-2
    allow_diff2flow: bool = False


class DMD2(Objective):
    """DMD2 generator and fake-score losses (module docstring)."""

    needs_time_pair = False  # the generator is f(z, 1, 0): a vanilla model suffices
    name = "dmd2"
    config_schema = DMD2Config
    fsdp_problem = "its own networks (fake score, frozen real score) are not sharded"

    @classmethod
    def check_config(cls, cfg) -> None:
        """Ranges of the DMD2 options, and its pretrained teacher (SPEC §11)."""
        obj = cfg.objective
        if obj.target_step_count != 1:
            raise ConfigError(
                f"objective.target_step_count={obj.target_step_count}: DMD2 trains a one-step generator here "
                "(multi-step backward simulation is not implemented); use 1"
            )
        hint = " (fake-score updates per generator update)"
        check_range("objective.critic_steps", obj.critic_steps, 1, None, hint=hint)
        if obj.fake_lr is not None:
            check_range("objective.fake_lr", obj.fake_lr, 0, None, lo_open=True)
        check_range("objective.guidance_scale", obj.guidance_scale, 1, None, hint=" (1 = no CFG on the real score)")
        if not 0.0 <= obj.time_min < obj.time_max <= 1.0:
            raise ConfigError(
                f"objective.time_min={obj.time_min}, time_max={obj.time_max} must satisfy 0 <= min < max <= 1"
            )
        check_range("objective.gan_weight", obj.gan_weight, 0, None)
        check_range("objective.gan_critic_weight", obj.gan_critic_weight, 0, None)
        pretrained = cfg.model.get("pretrained") is not None and not cfg.model.get("random_init", False)
        if not pretrained and not cfg.trainer.get("init_from"):
            raise ConfigError(
                "objective=dmd2 needs a pretrained teacher and this model starts from random weights: set "
                "trainer.init_from=RUN_DIR (a finished run, e.g. objective=flow_matching on the same model and data)"
            )

    def __init__(
        self,
        target_step_count: int = 1,
        critic_steps: int = 5,
        fake_lr: float | None = None,
        guidance_scale: float = 1.0,
        time_min: float = 0.02,
        time_max: float = 0.98,
        gan: bool = False,
        gan_weight: float = 1e-3,
        gan_critic_weight: float = 1e-2,
        allow_diff2flow: bool = False,
    ):
        self.target_step_count = int(target_step_count)
        self.critic_steps = int(critic_steps)
        self.fake_lr = None if fake_lr is None else float(fake_lr)
        self.guidance_scale = float(guidance_scale)
        self.time_min, self.time_max = float(time_min), float(time_max)
        self.gan = bool(gan)
        self.gan_weight = float(gan_weight)
        self.gan_critic_weight = float(gan_critic_weight)
        self.allow_diff2flow = bool(allow_diff2flow)
        self.real_score: nn.Module | None = None

    # -- networks and schedule -------------------------------------------------------------------

    def setup(self, student: nn.Module, data=None) -> None:
        """Real score: a frozen copy of the initial student; fake score: a trainable copy; GAN head."""
        self.real_score = share_frozen_copy(student).requires_grad_(False).eval()
        self.networks = {"fake_score": Network(share_frozen_copy(student), lr=self.fake_lr)}
        if self.gan:
            self.networks["gan_head"] = Network(GanHead(tuple(data.shape)), lr=self.fake_lr)

    def bind(self, modules, averages=None) -> None:
        super().bind(modules, averages)
        device = next(unwrap(self.network("fake_score")).parameters()).device
        self.real_score.to(device)  # the loop moved the trained networks; the frozen copy follows them

    def generator_step(self, step: int) -> bool:
        return step % (self.critic_steps + 1) == self.critic_steps

    def stepping(self, step: int) -> tuple[str, ...]:
        if self.generator_step(step):
            return ("student",)
        return ("fake_score", "gan_head") if self.gan else ("fake_score",)

    # -- pieces ----------------------------------------------------------------------------------

    def generate(self, model, z: torch.Tensor, cond, counter: EvalCounter, grad: bool) -> torch.Tensor:
        """One-step samples ``x̂ = z − f(z, 1, 0, c)``."""
        ones = torch.ones(z.shape[0], device=z.device)
        counter.add("generator", z.shape[0], grad=grad)
        return z - model(z, ones, torch.zeros_like(ones), cond).to(z.dtype)

    @torch.no_grad()
    def real_velocity(self, x_t, t, cond, null, counter: EvalCounter) -> torch.Tensor:
        """The frozen teacher's velocity, with CFG ``f(∅) + g·(f(c) − f(∅))`` (one batched pass) when g ≠ 1."""
        n = x_t.shape[0]
        if self.guidance_scale == 1.0:
            counter.add("real_score", n, grad=False)
            return self.real_score(x_t, t, t, cond)
        counter.add("real_score", 2 * n, grad=False)
        out = self.real_score(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([t, t]), cond_cat(cond, null))
        return out[n:] + self.guidance_scale * (out[:n] - out[n:])

    def distribution_matching_loss(self, x_hat, cond, null, counter: EvalCounter) -> torch.Tensor:
        """``½‖x̂ − sg(x̂ − w·(x̂0_fake − x̂0_real))‖²`` (mean), ``w = 1/mean|x̂ − x̂0_real|`` per sample."""
        with torch.no_grad():
            b = x_hat.shape[0]
            t = self.time_min + (self.time_max - self.time_min) * torch.rand(b).to(x_hat.device)
            x_t = interpolate(x_hat.detach(), torch.randn_like(x_hat), t)
            tb = expand_like(t, x_t)
            x0_real = x_t - tb * self.real_velocity(x_t, t, cond, null, counter).to(x_t.dtype)
            counter.add("fake_score", b, grad=False)
            x0_fake = x_t - tb * unwrap(self.network("fake_score"))(x_t, t, t, cond).to(x_t.dtype)
            scale = (x_hat.detach() - x0_real).abs().flatten(1).mean(dim=1).clamp_min(1e-8)
            direction = (x0_fake - x0_real) / expand_like(scale, x0_real)
        return 0.5 * F_nn.mse_loss(wide(x_hat), wide(x_hat.detach() - direction))

    def gan_logits(self, head, fake_score, x, t, cond, counter: EvalCounter, name: str):
        x_t = interpolate(x, torch.randn_like(x), t)
        counter.add(name, x.shape[0], grad=True)
        return head(x_t, fake_score(x_t, t, t, cond), t)

    # -- the loss --------------------------------------------------------------------------------

    def loss(self, student, teacher, batch: Batch, step: int) -> tuple[torch.Tensor, dict]:
        x, cond, null = batch.x, batch.cond, batch.null_cond
        b = x.shape[0]
        counter = EvalCounter(batch=b)
        z = torch.randn_like(x)
        if self.generator_step(step):
            x_hat = self.generate(student, z, cond, counter, grad=True)
            dm = self.distribution_matching_loss(x_hat, cond, null, counter)
            total, logs = dm, {"loss/dm": dm.detach()}
            if self.gan:  # the fake score and head are not stepped here; their gradients are discarded
                t = sample_time(b, (1.0, 1.0, 1.0), x)
                fake_score, head = unwrap(self.network("fake_score")), unwrap(self.network("gan_head"))
                logits = self.gan_logits(head, fake_score, x_hat, t, cond, counter, "gan_generator")
                gan = F_nn.softplus(-logits).mean()
                total = total + self.gan_weight * gan
                logs["loss/gan_generator"] = gan.detach()
        else:
            with torch.no_grad():
                x_hat = self.generate(unwrap(student), z, cond, counter, grad=False)
            fake_score = self.network("fake_score")
            t = sample_time(b, (1.0, 1.0, 1.0), x)
            noise = torch.randn_like(x_hat)
            x_t = interpolate(x_hat, noise, t)
            counter.add("fake_score", b, grad=True)
            F_fake = fake_score(x_t, t, t, cond)
            critic = (wide(F_fake) - wide(noise - x_hat)).pow(2).mean()
            total, logs = critic, {"loss/fake_score": critic.detach()}
            if self.gan:
                head = self.network("gan_head")
                logits_fake = head(x_t, F_fake, t)
                logits_real = self.gan_logits(head, fake_score, x, sample_time(b, (1.0, 1.0, 1.0), x), cond,
                                              counter, "gan_real")  # fmt: skip
                gan = F_nn.softplus(logits_fake).mean() + F_nn.softplus(-logits_real).mean()
                total = total + self.gan_critic_weight * gan
                logs["loss/gan_critic"] = gan.detach()
        logs.update({"loss/main": total.detach(), **counter.logs()})
        ones = torch.ones(b, device=x.device)
        logs["times"] = (ones, torch.zeros_like(ones))
        return total, logs
