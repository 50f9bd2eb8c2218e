"""fewstep.export's model card (README.md: base model, objective options, NFE and sampler, training, the final
grid, the base model's license, how to load) and ``hub_repo=`` pushes, against a mocked hub API."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from fewstep.export.card import base_model_card, load_code, write_model_card
from fewstep.export.hub import HubPushError, check_push_args, push_export

from helpers import FAST, compose

BASE_CARD = """---
license: other
license_name: stabilityai-ai-community
license_link: LICENSE.md
tags:
- text-to-image
---
# Stable Diffusion 3.5 Medium
"""


@pytest.fixture
def fake_run(tmp_path):
    """A run dir as the card reads it (config, final grids, summary) and a base pipeline folder with a card."""
    run = tmp_path / "run"
    (run / "samples").mkdir(parents=True)
    cfg = compose(["objective=twinflow", "sampler=ucgm", "model=sd35_lora", "data=latents", "data.path=/cache",
                   "trainer.max_steps=300", "trainer.lr=1e-4", "data.batch_size=8", "trainer.grad_accum=2",
                   "objective.enhanced_ratio=0.5"])  # fmt: skip
    for n, value in ((1, 10), (2, 20)):
        (run / "samples" / f"nfe_{n}.png").write_bytes(bytes([value]) * 64)
    (run / "summary.json").write_text(json.dumps({"eval": {"nfe_2": {"digits_fd": 1.5}}}))
    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text(BASE_CARD)
    return cfg, run, base


def test_model_card_names_base_objective_sampling_training_grid_license_and_loading(fake_run, tmp_path):
    cfg, run, base = fake_run
    out = tmp_path / "export"
    (out / "lora").mkdir(parents=True)
    info = {"step": 300, "weights": "ema", "family": "sd3", "lora": True, "default_steps": 2}
    info["load_code"] = load_code("StableDiffusion3Pipeline", "me/tiny", 2, lora=True)
    card = write_model_card(out, cfg, info, run, str(base)).read_text()
    front = card.split("---\n")[1]
    assert front.splitlines()[:3] == [
        "license: other", "license_name: stabilityai-ai-community", "license_link: LICENSE.md"
    ]  # fmt: skip
    assert "library_name: diffusers" in front and "pipeline_tag: text-to-image" in front and "- lora" in front
    assert "base_model" not in front  # a local folder is no hub id
    body = card.split("---\n", 2)[2]
    assert "# export: TwinFlow few-step sd3 (LoRA)" in body
    assert f"- **Base model**: `{base}`" in body
    assert "  - `estimate_order`: 2" in body and "  - `enhanced_ratio`: 0.5" in body and "  - `delta_t`: 0.01" in body
    assert "  - `probs`: e2e=1.0, mul=1.0, any=1.0, adv=1.0" in body
    assert ("- **Steps**: 300 of `trainer.max_steps=300`; batch 8 per process × `grad_accum=2`; learning rate "
            "0.0001 (cosine, betas [0.9, 0.999]); mixed precision `no`") in body  # fmt: skip
    assert '- **LoRA**: rank 64, alpha 64.0, targets ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj"' in body
    assert "- **NFE**: 2 network evaluations per image (`num_inference_steps=2`, `guidance_scale=0`)" in body
    assert "`TwinFlowScheduler`, set up like the run's `UCGMSampler` sampler: style=few" in body
    assert "| nfe_2 | digits_fd=1.5 |" in body
    assert "![samples at the end of training](samples.png)" in body
    assert (out / "samples.png").read_bytes() == bytes([20]) * 64  # the 2-NFE final grid, copied
    assert "carry its license: `other` (stabilityai-ai-community), LICENSE.md." in body
    assert 'pipe = StableDiffusion3Pipeline.from_pretrained("me/tiny", torch_dtype=torch.bfloat16)' in body
    assert "num_inference_steps=2, guidance_scale=0.0" in body and 'load_lora_pipeline("BASE_PIPELINE"' in body
    assert 'DiffusionPipeline.from_pretrained("me/tiny", trust_remote_code=True' in body and "import fewstep  #" in body
    assert (out / "lora" / "README.md").read_text() == card and (out / "lora" / "samples.png").exists()


def test_model_card_without_a_base_card_or_grid(fake_run, tmp_path):
    cfg, run, _ = fake_run
    for grid in (run / "samples").iterdir():
        grid.unlink()
    out = tmp_path / "export"
    out.mkdir()
    info = {"step": 3, "family": "sd3", "lora": False, "default_steps": 4, "load_code": []}
    card = write_model_card(out, cfg, info, run, "owner/base-model").read_text()
    # a run that sampled with CFG (a guided Euler baseline): the card's code passes the family pipeline's own
    # guidance argument (it printed guidance_scale=0.0 before, unguided images unlike the run's grid)
    from fewstep.models.family import families

    qwen = families()["qwenimage"].pipeline_guidance(4.0)
    assert qwen == {"true_cfg_scale": 4.0, "negative_prompt": "Generate an image."}
    assert families()["sd3"].pipeline_guidance(4.5) == {"guidance_scale": 4.5}
    # the saved config of a few-step run keeps a guidance_scale given on the command line, which training forced
    # to 0: its card must not guide
    from omegaconf import OmegaConf

    from fewstep.config.validate import sampling_guidance

    guided_cfg = OmegaConf.merge(cfg, {"sampler": {"guidance_scale": 3.0}})
    assert sampling_guidance(guided_cfg) == 0.0  # fake_run is TwinFlow
    assert sampling_guidance(OmegaConf.create({"objective": {}, "sampler": {"guidance_scale": 3.0}})) == 3.0
    code = load_code("QwenImagePipeline", "me/q", 12, lora=False, style="mul", guidance=qwen)
    assert (
        "num_inference_steps=12, true_cfg_scale=4.0, negative_prompt='Generate an image.', generator=generator)"
        ".images[0]" in code[-6]
    )
    assert code[-7].startswith("generator = torch.Generator().manual_seed(0)  # one seed, one image")
    guided = write_model_card(out, cfg, {**info, "guidance": {"guidance_scale": 4.5}}, run, "o/b").read_text()
    assert "A 4-step (guidance 4.5) text-to-image model" in guided
    assert "- **NFE**: 8 network evaluations per image (`num_inference_steps=4`, `guidance_scale=4.5`" in guided
    assert "base_model: owner/base-model" in card and "license: other" in card
    assert "the base model's card was not found; `owner/base-model`'s license applies" in card
    assert "## Samples" not in card and not (out / "samples.png").exists()
    assert base_model_card(str(tmp_path / "none")) == {}


class FakeHub:
    """Records HfApi.create_repo / upload_folder calls (the real ones need the network). Each fake takes the
    arguments of the real method (its ``inspect.signature``): a keyword the installed huggingface_hub rejects raises
    TypeError here as it would there."""

    def __init__(self, monkeypatch, fail: Exception | None = None):
        import huggingface_hub

        self.calls = []
        self.fail = fail

        def create_repo(a):
            self.calls.append(("create_repo", a["repo_id"], a["repo_type"], a["private"], a["exist_ok"]))
            if self.fail is not None:
                raise self.fail
            return f"https://huggingface.co/{a['repo_id']}"

        def upload_folder(a):
            folder = a["folder_path"]
            files = sorted(p.relative_to(folder).as_posix() for p in Path(folder).rglob("*"))
            self.calls.append(("upload_folder", a["repo_id"], folder, a["repo_type"], a["commit_message"], files))
            return "commit-1"

        for record in (create_repo, upload_folder):
            monkeypatch.setattr(huggingface_hub.HfApi, record.__name__, _as_real(record))


def _as_real(record):
    """A stand-in for the HfApi method of ``record``'s name: its arguments are bound to the real method's
    signature (defaults applied) and passed to ``record`` by name."""
    import inspect

    import huggingface_hub

    signature = inspect.signature(getattr(huggingface_hub.HfApi, record.__name__))

    def method(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)  # TypeError: an argument the real method does not take
        bound.apply_defaults()
        return record(bound.arguments)

    return method


def test_the_fake_hub_takes_only_what_the_real_hfapi_takes(monkeypatch, tmp_path):
    import huggingface_hub

    hub = FakeHub(monkeypatch)
    api = huggingface_hub.HfApi()
    with pytest.raises(TypeError, match="multi_commits"):  # a keyword of older huggingface_hub releases
        api.upload_folder(repo_id="me/x", folder_path=str(tmp_path), multi_commits=True)
    with pytest.raises(TypeError):  # keyword-only there
        api.upload_folder("me/x", str(tmp_path))
    with pytest.raises(TypeError, match="is_private"):
        api.create_repo("me/x", is_private=True)
    assert hub.calls == []
    api.create_repo("me/x", exist_ok=True)
    assert hub.calls == [("create_repo", "me/x", None, None, True)]  # the real defaults


def test_push_uploads_the_pipeline_or_the_lora(tmp_path, monkeypatch):
    hub = FakeHub(monkeypatch)
    out = tmp_path / "export"
    (out / "transformer").mkdir(parents=True)
    (out / "README.md").write_text("card")
    (out / "transformer" / "config.json").write_text("{}")
    pushed = push_export(out, "me/full", "auto")
    assert pushed["pushed"] == "pipeline" and pushed["url"] == "https://huggingface.co/me/full"
    assert hub.calls == [
        ("create_repo", "me/full", "model", False, True),
        ("upload_folder", "me/full", str(out), "model", "fewstep export (pipeline)",
         ["README.md", "transformer", "transformer/config.json"]),
    ]  # fmt: skip
    with pytest.raises(HubPushError, match="has no lora/ .*use hub_push=pipeline"):
        push_export(out, "me/full", "lora")
    (out / "lora").mkdir()
    (out / "lora" / "pytorch_lora_weights.safetensors").write_bytes(b"x")
    hub.calls.clear()
    assert push_export(out, "me/lora", "auto", private=True)["pushed"] == "lora"
    assert hub.calls[0] == ("create_repo", "me/lora", "model", True, True)
    assert hub.calls[1][2] == str(out / "lora") and hub.calls[1][5] == ["pytorch_lora_weights.safetensors"]


def test_push_errors_are_one_line(tmp_path, monkeypatch):
    for bad in ("me", "me/", "/name", "a/b/c", "me/na me"):
        with pytest.raises(HubPushError, match=f"hub_repo={bad} is not a hub repo id: give USER/NAME"):
            check_push_args(bad, "auto")
    with pytest.raises(HubPushError, match="hub_push=weights must be one of auto, pipeline, lora"):
        check_push_args("me/name", "weights")
    FakeHub(monkeypatch, fail=PermissionError("401 Unauthorized\nmore lines"))
    with pytest.raises(HubPushError) as err:
        push_export(tmp_path, "me/name", "pipeline")
    assert str(err.value) == (
        "hub_repo=me/name: the push failed (PermissionError: 401 Unauthorized); log in (hf auth login or HF_TOKEN "
        f"with write access) and check the network; the export itself is complete in {tmp_path}"
    )


@pytest.fixture(scope="module")
def tiny_lora_run(tmp_path_factory):
    """A 3-step TwinFlow LoRA run on the tiny SD3 pipeline and a 16 px cache (what fewstep.export reads)."""
    from fewstep.precompute import main as precompute_main
    from fewstep.training.loop import train

    from helpers.tiny_sd3 import save_captioned_images, save_tiny_sd3_pipeline

    root = tmp_path_factory.mktemp("lora_run")
    pipe = save_tiny_sd3_pipeline(root / "pipe")
    (pipe / "README.md").write_text(BASE_CARD)
    images = save_captioned_images(root / "images", caption="a cat number {i}")
    precompute_main([f"pretrained={pipe}", f"images={images}", f"out={root / 'cache'}", "resolution=16",
                     "max_sequence_length=8", "embeds_dtype=float32", "progress=false"])  # fmt: skip
    cfg = compose(["objective=twinflow", "sampler=ucgm", "model=sd35_lora", f"model.pretrained={pipe}",
                   "model.lora.rank=4", "model.lora.alpha=8", "data=latents", f"data.path={root / 'cache'}",
                   "data.batch_size=2", "trainer.max_steps=3", "trainer.final_nfe=[1,2]", "trainer.grid_size=4",
                   *FAST])  # fmt: skip
    run = root / "run"
    train(cfg, run_dir=run)
    (run / ".hydra").mkdir(exist_ok=True)
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    return pipe, run


@pytest.mark.slow
def test_export_writes_the_card_and_pushes_the_lora(tiny_lora_run, tmp_path, monkeypatch):
    from fewstep.export.command import main as export_main

    pipe, run = tiny_lora_run
    hub = FakeHub(monkeypatch)
    out = tmp_path / "export"
    info = export_main([f"run_dir={run}", f"out={out}", "hub_repo=me/tiny-twinflow"])
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlicense: other\nlicense_name: stabilityai-ai-community\n")
    assert "- **Steps**: 3 of `trainer.max_steps=3`; batch 2 per process" in card
    assert "- **NFE**: 2 network evaluations per image" in card
    assert (out / "samples.png").read_bytes() == (run / "samples" / "nfe_2.png").read_bytes()
    assert 'from_pretrained("me/tiny-twinflow"' in card
    assert info["hub"]["pushed"] == "lora" and hub.calls[1][2] == str(out / "lora")
    assert {"README.md", "samples.png", "pytorch_lora_weights.safetensors"} <= set(hub.calls[1][5])
    with pytest.raises(HubPushError, match="hub_repo=nope is not a hub repo id"):  # before any export work
        export_main([f"run_dir={run}", f"out={tmp_path / 'x'}", "hub_repo=nope"])
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_export_of_a_guided_flow_matching_run_writes_its_guidance_into_the_card(tiny_lora_run, tmp_path):
    """A flow-matching run sampled with CFG (sampler=euler, sampler.guidance_scale=3): the export's card says
    guidance 3, counts two network evaluations per step, and its loading code passes the pipeline guidance_scale=3.0
    (as the run's grids were sampled), which fewstep_export.json records. Without it the card's code samples
    unguided images unlike the run's."""
    from fewstep.export.command import main as export_main
    from fewstep.training.loop import train

    pipe, lora_run = tiny_lora_run
    cfg = compose(["objective=flow_matching", "objective.target_step_count=4", "sampler=euler",
                   "sampler.guidance_scale=3.0", "model=sd35_lora", f"model.pretrained={pipe}", "model.lora.rank=4",
                   "model.lora.alpha=8", "data=latents", f"data.path={lora_run.parent / 'cache'}", "data.batch_size=2",
                   "trainer.max_steps=1", "trainer.final_nfe=[]", *FAST])  # fmt: skip
    run = tmp_path / "run"
    train(cfg, run_dir=run)
    (run / ".hydra").mkdir(exist_ok=True)
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    out = tmp_path / "export"
    info = export_main([f"run_dir={run}", f"out={out}"])
    card = (out / "README.md").read_text()
    assert info["guidance"] == {"guidance_scale": 3.0}
    assert json.loads((out / "fewstep_export.json").read_text())["guidance"] == {"guidance_scale": 3.0}
    assert "A 4-step (guidance 3) text-to-image model trained with fewstep" in card and "FlowMatching" in card
    assert "- **NFE**: 8 network evaluations per image (`num_inference_steps=4`, `guidance_scale=3.0`: a " in card
    assert "num_inference_steps=4, guidance_scale=3.0, generator=generator).images[0]" in card  # the loading code
    assert "guidance_scale=0" not in card


NO_FEWSTEP = """
import sys, torch
try:
    import fewstep  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("fewstep is importable here")
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)
pipe.set_progress_bar_config(disable=True)
print(type(pipe).__name__, type(pipe.transformer).__module__, type(pipe.transformer).__name__,
      type(pipe.scheduler).__module__, type(pipe.scheduler).__name__)
latents = torch.load(sys.argv[2])
torch.manual_seed(1234)
out = pipe("a red cat", height=16, width=16, num_inference_steps=2, guidance_scale=0.0, latents=latents,
           max_sequence_length=8, output_type="latent").images
torch.save(out, sys.argv[3])
"""


@pytest.mark.slow
def test_export_is_self_contained_and_loads_with_a_bare_import(tiny_lora_run, tmp_path):
    """Without fewstep (importing it fails), DiffusionPipeline.from_pretrained(DIR, trust_remote_code=True) loads
    the export from the code in its component folders and generates; with fewstep, a bare
    StableDiffusion3Pipeline.from_pretrained(DIR) loads the installed classes. Both generate the same latents."""
    import ast
    import os
    import subprocess
    import sys

    import torch
    from diffusers import StableDiffusion3Pipeline

    import fewstep  # noqa: F401 - all a user with fewstep installed needs
    from fewstep.export.command import main as export_main
    from fewstep.models.sd3 import SD3TwinFlowTransformer2DModel
    from fewstep.samplers.scheduler import TwinFlowScheduler

    _, run = tiny_lora_run
    out = tmp_path / "export"
    export_main([f"run_dir={run}", f"out={out}"])
    index = json.loads((out / "model_index.json").read_text())
    assert index["transformer"] == ["fewstep_models_sd3", "SD3TwinFlowTransformer2DModel"]
    assert index["scheduler"] == ["fewstep_samplers_scheduler", "TwinFlowScheduler"]
    assert sorted(p.name for p in (out / "transformer").glob("*.py")) == [
        "fewstep_errors.py", "fewstep_models_family.py", "fewstep_models_sd3.py"
    ]  # fmt: skip
    assert sorted(p.name for p in (out / "scheduler").glob("*.py")) == [
        "fewstep_models_diff2flow.py", "fewstep_path.py", "fewstep_samplers_scheduler.py",
        "fewstep_samplers_step_noise.py", "fewstep_samplers_ucgm.py",
    ]  # fmt: skip
    for code in [*(out / "transformer").glob("*.py"), *(out / "scheduler").glob("*.py")]:
        for node in ast.parse(code.read_text()).body:  # nothing of fewstep is imported when the module loads
            assert not (isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.startswith("fewstep"))

    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    torch.save(latents, tmp_path / "latents.pt")
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "fewstep.py").write_text("raise ImportError('fewstep is not installed on this machine')\n")
    env = {**os.environ, "PYTHONPATH": str(blocker), "HF_MODULES_CACHE": str(tmp_path / "modules"),
           "HF_HUB_OFFLINE": "1"}  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-c", NO_FEWSTEP, str(out), str(tmp_path / "latents.pt"), str(tmp_path / "remote.pt")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    kinds = proc.stdout.split()
    assert kinds[0] == "StableDiffusion3Pipeline" and kinds[2] == "SD3TwinFlowTransformer2DModel"
    assert kinds[1].startswith("diffusers_modules.local.") and kinds[3].startswith("diffusers_modules.local.")
    assert kinds[4] == "TwinFlowScheduler"

    pipe = StableDiffusion3Pipeline.from_pretrained(out)  # bare: fewstep imported, no trust_remote_code
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.transformer) is SD3TwinFlowTransformer2DModel and type(pipe.scheduler) is TwinFlowScheduler
    torch.manual_seed(1234)
    local = pipe("a red cat", height=16, width=16, num_inference_steps=2, guidance_scale=0.0, latents=latents,
                 max_sequence_length=8, output_type="latent").images  # fmt: skip
    remote = torch.load(tmp_path / "remote.pt")
    assert torch.isfinite(local).all() and (local - latents).abs().max() > 1e-3
    assert (remote - local).abs().max().item() < 1e-6


def test_the_cards_loading_code_samples_an_any_style_export_as_the_native_sampler(tmp_path):
    """The default sampler (``sampler=ucgm_any``) exports a ``sampling_style="any"`` scheduler: each step jumps to
    the next grid time, so the transformer's target time must come from the scheduler. The card's snippet (run
    here on the CPU in float32) must give the native UCGM sampler's latents, the target time fed explicitly."""
    import torch

    import fewstep  # noqa: F401 - diffusers resolves the exported classes
    from fewstep.samplers.scheduler import TwinFlowScheduler
    from fewstep.samplers.ucgm import UCGMSampler

    from helpers.tiny_families import build_tiny_sana_pipeline, trained_twinflow_sana

    pipe = build_tiny_sana_pipeline()
    pipe.transformer = transformer = trained_twinflow_sana(pipe.transformer)
    pipe.scheduler = TwinFlowScheduler(sampling_style="any", stochast_ratio=0.0)
    pipe.save_pretrained(tmp_path / "export")

    code = load_code("SanaPipeline", str(tmp_path / "export"), 2, lora=False, style="any")
    code = code[: next(i for i, line in enumerate(code) if line.startswith("image = "))]
    namespace = {}
    exec("\n".join(code).replace('"cuda"', '"cpu"').replace("torch.bfloat16", "torch.float32"), namespace)
    loaded = namespace["pipe"]
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        embeds, mask, _, _ = loaded.encode_prompt("a red cat", do_classifier_free_guidance=False,
                                                  max_sequence_length=8, complex_human_instruction=None)  # fmt: skip
        out = loaded("a red cat", height=32, width=32, num_inference_steps=2, guidance_scale=0.0,
                     latents=latents.clone(), max_sequence_length=8, complex_human_instruction=None,
                     use_resolution_binning=False, output_type="latent").images  # fmt: skip

        def model(x, t, tt, cond):
            return transformer(x, embeds, t * 1000, encoder_attention_mask=mask, target_timestep=tt * 1000,
                               return_dict=False)[0]  # fmt: skip

        native = UCGMSampler(style="any", stochast_ratio=0.0).sample(model, latents.clone(), None, 2)
    assert (native - latents).abs().max().item() > 1.0
    assert (out - native).abs().max().item() < 1e-5
