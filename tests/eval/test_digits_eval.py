"""The fixed digits quality protocol: classifier, cache, floor/ceiling, input handling, feature hook."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fewstep.eval.digits as D
from fewstep.data.digits_split import load_digits_split
from fewstep.eval.features import FeatureExtractorEvaluator, load_features


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("fewstep_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEWSTEP_CACHE", str(path))
        yield path


@pytest.fixture(scope="module")
def classifier(cache_dir):
    return D.load_classifier()  # trained once (~2 s) into the temporary cache


@pytest.fixture(scope="module")
def evaluator(classifier):
    return D.DigitsEvaluator(classifier)


@pytest.fixture(scope="module")
def refpoints(evaluator):
    return evaluator.reference_points()


@pytest.fixture(scope="module")
def digits():
    return load_digits_split()


def test_classifier_heldout_accuracy(classifier, digits):
    with torch.no_grad():
        pred = classifier(torch.from_numpy(digits["x_test"])).argmax(1).numpy()
    assert (pred == digits["y_test"]).mean() >= 0.95
    assert not classifier.training


def test_classifier_cache_file_and_reuse(classifier, cache_dir, monkeypatch):
    path = D.classifier_cache_path()
    assert path.parent == cache_dir and path.exists()
    assert D.protocol_hash() in path.name
    assert path.stat().st_size < 2_000_000
    # a fresh process (empty memo) loads the file instead of retraining
    monkeypatch.setattr(D, "_MEMO", {})
    monkeypatch.setattr(D, "train_classifier", lambda: pytest.fail("retrained despite a valid cache"))
    loaded = D.load_classifier()
    for k, v in classifier.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])


@pytest.mark.slow
def test_training_is_deterministic(classifier):
    state = torch.get_rng_state()
    with torch.inference_mode():  # lazily trained from a caller's no-grad block must still work
        fresh = D.train_classifier()
    assert torch.equal(torch.get_rng_state(), state)  # global RNG untouched
    for k, v in classifier.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]), k


def test_protocol_change_invalidates_cache(monkeypatch):
    before = D.classifier_cache_path()
    monkeypatch.setitem(D.CLASSIFIER_PROTOCOL, "epochs", D.CLASSIFIER_PROTOCOL["epochs"] + 1)
    assert D.classifier_cache_path() != before


@pytest.mark.parametrize("content", [b"not a torch file", "truncated"])
def test_corrupt_cache_retrains_with_warning(classifier, tmp_path, monkeypatch, content):
    path = D.classifier_cache_path(tmp_path)
    good = D.classifier_cache_path().read_bytes()
    path.write_bytes(good[: len(good) // 2] if content == "truncated" else content)
    calls = []

    def fake_train():  # skip the real training: only the recovery path is under test
        calls.append(1)
        return D._build_classifier().eval().requires_grad_(False)

    monkeypatch.setattr(D, "train_classifier", fake_train)
    with pytest.warns(UserWarning, match="unreadable"):
        model = D.load_classifier(tmp_path)
    assert calls == [1] and isinstance(model, D.DigitsMLP)
    monkeypatch.setattr(D, "_MEMO", {})
    D._load_cached(path)  # rewritten and readable now


def test_heldout_real_digits_near_floor(evaluator, refpoints, digits):
    m = evaluator.evaluate(digits["x_test"], digits["y_test"])
    ceiling = refpoints["ceiling"]
    assert m["acc"] >= 0.95
    assert m["fd"] < 0.05 * ceiling["fd"] and m["fd"] < 5.0
    assert m["pixel_fd"] < 0.05 * ceiling["pixel_fd"]
    assert m["precision"] > 0.9 and m["recall"] > 0.5


def test_floor_reference(refpoints):
    floor = refpoints["floor"]
    assert floor["fd"] < 1.0 and floor["pixel_fd"] < 0.15
    assert floor["acc"] >= 0.98 and floor["precision"] > 0.95 and floor["recall"] > 0.9


def test_ceiling_reference(refpoints):
    ceiling = refpoints["ceiling"]
    assert ceiling["fd"] > 50 and ceiling["pixel_fd"] > 30
    assert ceiling["acc"] < 0.3 and ceiling["precision"] < 0.3 and ceiling["recall"] < 0.3


def test_floor_samples_are_balanced_real_digits(digits):
    x, y = D.floor_samples()
    assert x.shape == (1000, 64) and np.bincount(y, minlength=10).tolist() == [100] * 10
    x2, y2 = D.floor_samples()
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    # every sample is a real digit with its true label
    lookup = {row.tobytes(): label for row, label in zip(digits["x_all"], digits["y_all"])}
    assert all(lookup[row.tobytes()] == label for row, label in zip(x, y))


def test_input_shapes_clamp_and_types(evaluator, digits):
    x = digits["x_test"][:200]
    y = digits["y_test"][:200]
    base = evaluator.evaluate(x, y)
    t = torch.from_numpy(x)
    for variant in (t, t.reshape(-1, 8, 8), t.reshape(-1, 1, 8, 8), t.double()):
        assert evaluator.evaluate(variant, torch.from_numpy(y)) == pytest.approx(base, rel=1e-6, abs=1e-9)
    # values outside [-1, 1] are clamped before anything else
    stretched = np.where(x > 0.99, 5.0, np.where(x < -0.99, -3.0, x)).astype(np.float32)
    assert evaluator.evaluate(stretched, y) == pytest.approx(base, rel=1e-6, abs=1e-9)
    with pytest.raises(ValueError):
        evaluator.evaluate(np.zeros((10, 63)), np.zeros(10))
    with pytest.raises(ValueError):
        evaluator.evaluate(x, y[:10])
    assert np.isnan(evaluator.evaluate(x)["acc"])


def test_nonfinite_samples_warn_not_crash(evaluator):
    x = D.eval_noise((64,), 100)
    x[0, 0] = float("nan")
    x[1, :] = float("inf")
    with pytest.warns(UserWarning, match="non-finite"):
        m = evaluator.evaluate(x, D.eval_labels(100))
    assert all(np.isfinite(v) for v in m.values())


def test_eval_labels_and_noise():
    y = D.eval_labels()
    assert y.dtype == torch.long and y.shape == (1000,)
    assert torch.bincount(y).tolist() == [100] * 10 and y[:12].tolist() == [*range(10), 0, 1]
    state = torch.get_rng_state()
    n1 = D.eval_noise((1, 8, 8))
    assert torch.equal(torch.get_rng_state(), state)  # global RNG untouched
    assert n1.shape == (1000, 1, 8, 8) and n1.dtype == torch.float32
    assert torch.equal(n1, D.eval_noise((1, 8, 8)))
    assert torch.equal(n1.reshape(1000, 64), D.eval_noise(64))
    assert D.EVAL_NOISE_SEED == 1234


@pytest.mark.slow
def test_feature_extractor_evaluator_matches_digits_fd(classifier, evaluator, tmp_path, digits):
    x, y = D.floor_samples()
    expected = evaluator.evaluate(x, y)
    for name in ("real.npy", "real.npz", "real.pt"):
        path = tmp_path / name
        FeatureExtractorEvaluator.save_real_features(classifier.features, digits["x_all"], path, batch_size=500)
        np.testing.assert_allclose(load_features(path), evaluator.real_stats["feats"], rtol=1e-6, atol=1e-6)
        ev = FeatureExtractorEvaluator(classifier.features, path, batch_size=300)
        m = ev.evaluate(torch.from_numpy(x))
        assert m["fd"] == pytest.approx(expected["fd"], rel=1e-4)
        assert m["precision"] == pytest.approx(expected["precision"], abs=2e-3)
        assert m["recall"] == pytest.approx(expected["recall"], abs=2e-3)
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        FeatureExtractorEvaluator(classifier.features, tmp_path / "missing.npy").evaluate(torch.from_numpy(x))
