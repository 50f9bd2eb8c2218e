"""The real SD3 path learns (issue #26), reduced: ``python -m fewstep.demo`` with few steps builds the captioned
digits, a tiny SD3 pipeline whose VAE is trained on them, a flow-matching teacher trained and exported by fewstep,
and a TwinFlow student distilled from it and exported; 2-step images generated through
``StableDiffusion3Pipeline`` show the digit their prompt names far above chance (0.1), and above the chain at step 0
(the pipeline's random transformer with the TwinFlow embeddings at their zero init). Reduced: a 400-step teacher at a
high constant LR, 60 TwinFlow steps, 200 samples."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_twinflow_through_the_sd3_pipeline_draws_the_prompted_digit(tmp_path):
    from fewstep.demo.run import main
    from fewstep.demo.score import load_sd3, score
    from fewstep.models.sd3 import SD3TwinFlowTransformer2DModel, TwinFlowTimeTextEmbedding

    out = tmp_path / "demo"
    args = [f"out={out}", "threads=1", "progress=false", "picture=false", "eval_n=200", "teacher_steps=20",
            "twinflow_nfe=[2]", "vae_steps=150", "teacher_train_steps=400", "teacher_lr=3e-3",
            "teacher_lr_schedule=constant", "teacher_decay=0.9", "twinflow_steps=60"]  # fmt: skip
    results = main(args)
    learned = next(r for r in results["rows"] if r["model"] == "twinflow" and r["steps"] == 2)["acc"]

    # step 0: the same chain on the random transformer the pipeline was built with, through the exported TwinFlow
    # class and scheduler, its target-time and sign embeddings added as training adds them (zero-initialised)
    pipe = load_sd3(out / "twinflow")
    step0 = SD3TwinFlowTransformer2DModel.from_pretrained(out / "base", subfolder="transformer", time_pair=False)
    step0.init_time_pair(TwinFlowTimeTextEmbedding, True, pipe.transformer.config.default_target_time)
    assert set(step0.state_dict()) == set(pipe.transformer.state_dict())
    pipe.transformer = step0.eval()
    before = score(pipe, 200, 2, 8)["acc"]
    assert learned > 0.4 and learned > before + 0.2, (learned, before, results["rows"])
    assert (out / "results.md").exists() and json.loads((out / "results.json").read_text())["rows"]
