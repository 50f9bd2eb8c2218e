"""Each family's exported pipeline (SD3, SANA, Qwen-Image, OpenUni; tiny, offline) on the stochastic few-step grid
(``stochast_ratio=1.0``, the reference's few-step preset) is reproducible as diffusers users expect:

* two calls with one ``generator`` seed give the same latents, bit for bit;
* a batch built with a generator list equals the single calls (within 1e-5);
* the native UCGM sampler with ``step_noise="latents"`` (``fewstep.sample`` / ``fewstep.eval`` on a run) on the same
  model gives the pipeline's latents for the noise that seed draws (Qwen-Image included: its pipeline steps packed
  tokens, the native sampler latents);
* (slow) the folder saved as ``fewstep.export`` writes it, loaded in a fresh process after ``import fewstep``, gives
  the same latents bit for bit, and so does a pipeline the user saves with ``TwinFlowScheduler`` swapped in
  (``model_index.json`` then names ``["fewstep.samplers.scheduler", "TwinFlowScheduler"]``).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FAMILIES = ["sd3", "sana", "qwenimage", "openuni"]
SIDE = {"sd3": 16, "sana": 32, "qwenimage": 16, "openuni": 32}
MAX_SEQ = {"sd3": 8, "sana": 8, "qwenimage": 200, "openuni": None}  # tiny Qwen: a ~180-token chat template
PROMPTS = ["a red cat", "a blue bird on a branch"]
TESTS = Path(__file__).resolve().parents[1]


def call_kwargs(family: str) -> dict:
    """The family pipeline's arguments for 2 steps at guidance 0, as latents."""
    kwargs = {"height": SIDE[family], "width": SIDE[family], "num_inference_steps": 2, "output_type": "latent"}
    if family in ("sd3", "sana"):
        kwargs.update(guidance_scale=0.0, max_sequence_length=MAX_SEQ[family])
    if family == "sana":
        kwargs.update(complex_human_instruction=None, use_resolution_binning=False)
    if family == "qwenimage":
        kwargs.update(max_sequence_length=MAX_SEQ[family])
    return kwargs


def as_latents(family: str, out: torch.Tensor) -> torch.Tensor:
    """The pipeline's output latents as (B, C, h, w) (Qwen-Image's are packed 2×2 tokens, square here)."""
    if family != "qwenimage":
        return out
    from fewstep.models.qwenimage import unpack_latents

    side = 2 * math.isqrt(out.shape[1])
    return unpack_latents(out, side, side)


def generate(pipe, family: str, prompts, seeds) -> torch.Tensor:
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    with torch.no_grad():
        out = pipe(prompts, generator=generators if len(generators) > 1 else generators[0], **call_kwargs(family))
    return as_latents(family, out.images)


def save_base(family: str, folder: Path) -> Path:
    if family == "sd3":
        from helpers.tiny_sd3 import save_tiny_sd3_pipeline

        return save_tiny_sd3_pipeline(folder)
    from helpers.tiny_families import save_tiny_pipeline

    return save_tiny_pipeline(family, folder)


@pytest.fixture(scope="module", params=FAMILIES)
def exported(request, tmp_path_factory):
    """(family, the family's TwinFlow model with trained-looking time-pair embeddings, its exported pipeline with the
    stochastic few-step TwinFlowScheduler, the folder fewstep.export's way of saving wrote)."""
    import diffusers

    from fewstep.export.code import vendor_components
    from fewstep.models.family import family_named
    from fewstep.samplers.scheduler import TwinFlowScheduler

    family = request.param
    root = tmp_path_factory.mktemp(family)
    base = save_base(family, root / "base")
    spec = family_named(family)
    model = spec.model_class(pretrained=str(base), time_pair=True).eval()
    emb = model.transformer.get_submodule(model.time_embed_attr)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in [*emb.target_embedder.parameters(), emb.sign_embedding.weight]:
            p.normal_(0, 0.3)
    import fewstep  # noqa: F401 - lets diffusers resolve OpenUniPipeline

    pipe = diffusers.DiffusionPipeline.from_pretrained(base)
    scheduler = TwinFlowScheduler(sampling_style="few", stochast_ratio=1.0)
    pipe = type(pipe)(**{**pipe.components, "transformer": model.export_transformer(), "scheduler": scheduler})
    pipe.set_progress_bar_config(disable=True)
    out = root / "export"
    pipe.save_pretrained(out)
    vendor_components(out)  # as fewstep.export does
    return family, model, pipe, out


def test_one_seed_gives_the_same_latents_bit_for_bit(exported):
    family, _, pipe, _ = exported
    first, second = generate(pipe, family, PROMPTS[:1], [7]), generate(pipe, family, PROMPTS[:1], [7])
    other = generate(pipe, family, PROMPTS[:1], [8])
    print(f"{family}: two calls, seed 7: max |diff| = {(first - second).abs().max().item():.3e}")
    assert torch.equal(first, second)
    assert (first - other).abs().max().item() > 0.1  # the seed matters


def test_a_batch_from_a_generator_list_equals_the_single_calls(exported):
    family, _, pipe, _ = exported
    batch = generate(pipe, family, PROMPTS, [1, 2])
    single = torch.cat([generate(pipe, family, [p], [s]) for p, s in zip(PROMPTS, [1, 2])])
    diff = (batch - single).abs().max().item()
    print(f"{family}: batch of 2 vs single calls: max |diff| = {diff:.3e}")
    assert diff < 1e-5 and (batch[0] - batch[1]).abs().max().item() > 0.1


def test_the_native_sampler_on_the_same_model_and_seed_gives_the_pipelines_latents(exported):
    from fewstep.models.family import family_named
    from fewstep.samplers.ucgm import UCGMSampler

    family, model, pipe, _ = exported
    generated = generate(pipe, family, PROMPTS[:1], [5])
    noise = torch.randn(generated.shape, generator=torch.Generator().manual_seed(5))  # what the pipeline drew
    options = {"complex_human_instruction": "none"} if family == "sana" else {}
    with torch.no_grad():
        cond = family_named(family).encode_text(pipe, PROMPTS[:1], torch.device("cpu"), MAX_SEQ[family], options)
        native = UCGMSampler(style="few", stochast_ratio=1.0, step_noise="latents").sample(model, noise, cond, 2)
        previous = UCGMSampler(style="few", stochast_ratio=1.0).sample(  # the generator's draws, as before
            model, noise, cond, 2, generator=torch.Generator().manual_seed(5)
        )
    diff = (native - generated).abs().max().item()
    print(f"{family}: pipeline vs native (step_noise=latents), seed 5: max |diff| = {diff:.3e}")
    assert diff < 1e-5
    assert (previous - generated).abs().max().item() > 0.1


WORKER = textwrap.dedent(
    """
    import sys, torch
    from safetensors.torch import save_file
    import fewstep  # all diffusers needs to find fewstep's classes
    import diffusers
    sys.path.insert(0, sys.argv[3])
    from export.test_pipeline_reproducibility import generate
    folder, family, out = sys.argv[1], sys.argv[2], sys.argv[4]
    pipe = diffusers.DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__module__ == "fewstep.samplers.scheduler", type(pipe.scheduler)
    save_file({"x": generate(pipe, family, ["a red cat"], [7]).contiguous()}, out)
    """
)


def generate_in_a_fresh_process(folder: Path, family: str, out: Path) -> torch.Tensor:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(TESTS)}
    result = subprocess.run(
        [sys.executable, "-c", WORKER, str(folder), family, str(TESTS), str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return load_file(str(out))["x"]


@pytest.mark.slow
def test_saved_then_loaded_in_a_fresh_process_gives_the_same_latents(exported, tmp_path):
    family, _, pipe, folder = exported
    here = generate(pipe, family, PROMPTS[:1], [7])
    index = json.loads((folder / "model_index.json").read_text())
    assert index["scheduler"] == ["fewstep_samplers_scheduler", "TwinFlowScheduler"]
    loaded = generate_in_a_fresh_process(folder, family, tmp_path / "export.safetensors")
    print(f"{family}: export → fresh process: max |diff| = {(loaded - here).abs().max().item():.3e}")
    assert torch.equal(loaded, here)
    # a user's own save_pretrained of the pipeline (no vendored code): the module path in model_index.json
    pipe.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["scheduler"] == ["fewstep.samplers.scheduler", "TwinFlowScheduler"]
    resaved = generate_in_a_fresh_process(tmp_path / "saved", family, tmp_path / "saved.safetensors")
    assert torch.equal(resaved, here)
