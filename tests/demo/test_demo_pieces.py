"""The demo's pieces that need no training: the captioned digit folder (training split only, captions naming the
digit, the way back to 8×8 digits exact) and the word-level tokenizers of the tiny SD3 pipeline."""

from __future__ import annotations

import json

import numpy as np

from fewstep.data.digits_split import load_digits_split
from fewstep.demo.images import PHRASINGS, WORDS, caption, prompts_for, to_digits, to_rgb, write_digit_folder


def test_digit_folder_holds_the_training_split_with_captions_naming_the_digit(tmp_path):
    from PIL import Image

    folder = write_digit_folder(tmp_path / "images", side=16)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    d = load_digits_split()
    assert len(rows) == len(d["y_train"]) == 1500  # the 297 held-out digits are not there
    for row, label, x in zip(rows[:50], d["y_train"][:50], d["x_train"][:50], strict=True):
        assert row["file_name"].endswith(f"_{label}.png")
        assert WORDS[label] in row["text"].split() or str(label) in row["text"].split()
        with Image.open(folder / row["file_name"]) as im:
            assert im.size == (16, 16) and im.mode == "RGB"
            back = to_digits(np.asarray(im, dtype=np.float32)[None] / 255.0)[0]
        assert np.abs(back - x).max() < 1.0 / 127.5 + 1e-6  # the uint8 rounding only
    texts = {r["text"] for r in rows}
    assert len(texts) == len(PHRASINGS) * 10  # every digit in every phrasing
    first = (folder / "metadata.jsonl").stat().st_mtime_ns
    write_digit_folder(folder, side=16)  # written once
    assert (folder / "metadata.jsonl").stat().st_mtime_ns == first


def test_prompts_cycle_the_phrasings_within_each_class():
    assert prompts_for([7, 7, 3, 7]) == [caption(7, 0), caption(7, 1), caption(3, 0), caption(7, 2)]
    assert caption(7, 0) == "a handwritten seven" and caption(7, 1) == "the digit 7"


def test_to_digits_averages_squares_and_channels():
    x = np.linspace(-1, 1, 64, dtype=np.float32)[None]
    rgb = to_rgb(x, 32).astype(np.float32) / 255.0
    assert rgb.shape == (1, 32, 32, 3)
    assert np.abs(to_digits(rgb) - x).max() < 1.0 / 127.5 + 1e-6
    tinted = rgb.copy()
    tinted[..., 0] = 0.0  # the grey value is the channel mean
    assert np.allclose(
        to_digits(tinted),
        (rgb.mean(-1, keepdims=True) * 2 / 3 * 2 - 1).reshape(1, 8, 4, 8, 4).mean((2, 4)).reshape(1, 64),
        atol=1e-6,
    )


def test_tokenizers_keep_caption_words_whole(tmp_path):
    from transformers import CLIPTokenizer, T5TokenizerFast

    from fewstep.demo.images import vocabulary
    from fewstep.demo.pipeline import write_clip_tokenizer, write_t5_tokenizer

    words = vocabulary()
    clip = CLIPTokenizer.from_pretrained(str(write_clip_tokenizer(tmp_path / "clip", words)))
    t5 = T5TokenizerFast.from_pretrained(str(write_t5_tokenizer(tmp_path / "t5", words)))
    for text in ("a handwritten seven", "the number eight", "the digit 7"):
        n = len(text.split())
        assert len(clip(text).input_ids) == n + 2  # start, one token a word, end
        assert len(t5(text).input_ids) == n + 1  # one token a word, </s>
    ids = {tuple(clip(caption(d, 0)).input_ids) for d in range(10)}
    assert len(ids) == 10
    assert len(clip("a handwritten cat").input_ids) == 2 + 2 + 3  # an unknown word falls back to its letters
