"""``precompute dataset=`` over parquet / arrow / webdataset tars read in place (fewstep.data.image_datasets):
the rows equal what ``datasets.load_dataset`` gives, memory stays at a record batch (a subprocess' peak RSS)
and nothing is copied into the ``datasets`` cache; an end-to-end precompute equals an image folder's."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import textwrap

import numpy as np
import pytest

from fewstep.data.image_datasets import DatasetImages, DatasetSourceError


def png(rng, height: int, width: int, level: int = 6) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buffer, "PNG", compress_level=level)
    return buffer.getvalue()


def caption(i: int):
    """Row ``i``'s caption: none for every 7th row, else text (unicode included)."""
    return None if i % 7 == 3 else f"a caption number {i} é"


def write_parquet(folder, n: int, side=lambda i: 4 + i % 5, row_group: int = 250, files: int = 2, level: int = 6,
                  raw: bool = True):  # fmt: skip
    """``n`` rows in ``files`` parquet files under ``folder/data`` named as a sharded train split (rows in order),
    plus a 3-row test split; ``image``: an Image-like ``{bytes, path}`` struct, ``png`` (if ``raw``): the same
    bytes raw, ``caption``; ``row_group`` rows per row group. Returns the rows' (image bytes, caption)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    rows = [(png(rng, side(i), side(i) + 1, level), caption(i)) for i in range(n)]
    (folder / "data").mkdir(parents=True)

    def table(part):
        images = [{"bytes": b, "path": None} for b, _ in part]
        columns = {"image": images, "png": [b for b, _ in part], "caption": [c for _, c in part]}
        return pa.table(columns if raw else {k: v for k, v in columns.items() if k != "png"})

    bounds = np.linspace(0, n, files + 1).astype(int)
    for k in range(files):
        part = rows[bounds[k] : bounds[k + 1]]
        pq.write_table(table(part), folder / "data" / f"train-{k:05d}-of-{files:05d}.parquet", row_group_size=row_group)
    pq.write_table(table(rows[:3][::-1]), folder / "data" / "test-00000-of-00001.parquet")
    return rows


def read_all(source: DatasetImages, order=None) -> tuple[list, list]:
    """``rows()`` as (name, image bytes, caption) and the bytes ``open_named`` gives for each row (in ``order``)."""
    planned = [(name, opener().read(), text) for name, opener, text in source.rows()]
    names = [name for name, _, _ in planned]
    opened = {name: source.open_named(name).read() for name in (order or names)}
    return planned, [opened[name] for name in names]


def reference(path, image_column: str, caption_column: str, split: str = "train"):
    """The rows as ``datasets.load_dataset`` (the former reader) gives them: names, image bytes, captions."""
    import datasets

    data = datasets.load_dataset(str(path), split=split)
    if isinstance(data.features[image_column], datasets.Image):
        data = data.cast_column(image_column, datasets.Image(decode=False))
    out = []
    for index, row in enumerate(data):
        image = row[image_column]
        image = image["bytes"] if isinstance(image, dict) else image
        text = row[caption_column]
        out.append((f"row {index}", image, None if text is None else str(text)))
    return out


@pytest.fixture(scope="module")
def parquet_dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("parquet")
    return folder, write_parquet(folder, 3000)


def test_parquet_rows_equal_the_datasets_rows_planned_and_opened_in_any_order(parquet_dataset):
    folder, rows = parquet_dataset
    import pyarrow.parquet as pq

    assert [pq.read_metadata(f).num_row_groups for f in sorted((folder / "data").glob("train-*"))] == [6, 6]
    expected = [(f"row {i}", image, text) for i, (image, text) in enumerate(rows)]
    assert sum(text is None for _, _, text in expected) == 429
    for column in ("image", "png"):  # a {bytes, path} struct and raw bytes
        source = DatasetImages(str(folder), image_column=column, caption_column="caption")
        assert len(source) == 3000
        # opened in increasing order, then in an order that goes back and forth across row groups and files
        shuffled = [f"row {i}" for i in np.random.default_rng(1).permutation(3000)]
        for order in (None, shuffled):
            planned, opened = read_all(source, order)
            assert planned == expected, column
            assert opened == [image for image, _ in rows], column
    assert reference(folder, "image", "caption") == expected  # what the former datasets reader gave
    test = DatasetImages(str(folder), image_column="png", caption_column="caption", split="test")
    assert read_all(test)[0] == [(f"row {i}", rows[2 - i][0], rows[2 - i][1]) for i in range(3)]
    one = DatasetImages(str(folder / "data" / "train-00001-of-00002.parquet"), "png", "caption")  # a single file
    assert [(text, opener().read()) for _, opener, text in one.rows()] == [(t, b) for b, t in rows[1500:]]


def test_dataset_errors_name_the_columns_and_splits_there_are(parquet_dataset, tmp_path):
    folder, _ = parquet_dataset
    with pytest.raises(DatasetSourceError) as err:
        DatasetImages(str(folder), image_column="picture", caption_column="caption")
    assert str(err.value) == (
        f"dataset={folder} (split train) has no column 'picture': set image_column= to one of image, png, caption"
    )
    with pytest.raises(DatasetSourceError) as err:
        DatasetImages(str(folder), image_column="png", caption_column="text")
    assert str(err.value) == (
        f"dataset={folder} (split train) has no column 'text': set caption_column= to one of image, png, caption"
    )
    with pytest.raises(DatasetSourceError) as err:
        DatasetImages(str(folder), image_column="png", caption_column="caption", split="validation")
    assert str(err.value) == f"dataset={folder} has no split 'validation': set split= to one of train, test"
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet")
    with pytest.raises(DatasetSourceError, match=r"could not be opened \(ArrowInvalid: .*give a hub id"):
        DatasetImages(str(bad))


def test_arrow_files_and_save_to_disk_folders_equal_the_datasets_rows(tmp_path):
    import datasets
    import pyarrow as pa

    rng = np.random.default_rng(2)
    rows = [(png(rng, 4 + i % 3, 5), caption(i)) for i in range(300)]
    pictures = [{"bytes": b, "path": None} for b, _ in rows]
    data = datasets.Dataset.from_dict({"picture": pictures, "caption": [c for _, c in rows]})
    data = data.cast_column("picture", datasets.Image())
    data.save_to_disk(str(tmp_path / "saved"), num_shards=3)  # three arrow (IPC stream) files
    datasets.DatasetDict({"train": data.select(range(10)), "test": data.select(range(5, 9))}).save_to_disk(
        str(tmp_path / "dict")
    )
    (tmp_path / "arrow").mkdir()  # a folder of arrow files: the IPC file format, batches of 64 rows
    table = data.data.table
    with pa.ipc.new_file(str(tmp_path / "arrow" / "train.arrow"), table.schema) as writer:
        writer.write_table(table, max_chunksize=64)
    expected = [(f"row {i}", image, text) for i, (image, text) in enumerate(rows)]
    for name in ("saved", "arrow"):
        source = DatasetImages(str(tmp_path / name), image_column="picture", caption_column="caption")
        planned, opened = read_all(source, [f"row {i}" for i in np.random.default_rng(3).permutation(300)])
        assert planned == expected and opened == [image for image, _ in rows], name
    assert reference(tmp_path / "arrow", "picture", "caption") == expected
    test = DatasetImages(str(tmp_path / "dict"), image_column="picture", caption_column="caption", split="test")
    assert read_all(test)[0] == [(f"row {i}", *rows[5 + i]) for i in range(4)]
    with pytest.raises(DatasetSourceError) as err:
        DatasetImages(str(tmp_path / "dict"), split="valid")
    assert str(err.value) == f"dataset={tmp_path / 'dict'} has no split 'valid': set split= to one of train, test"


def write_tars(folder, rows, per_tar: int, json_captions: bool):
    """Webdataset shards ``train-NNNNN.tar``: ``sub/NNNNNN.png`` + ``.txt`` (or ``.json`` ``{"caption", "id"}``)
    per row (a row without a caption has no caption member), a directory entry and a hidden file mixed in."""
    folder.mkdir(parents=True)

    def add(tar, name, data: bytes):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    for k, start in enumerate(range(0, len(rows), per_tar)):
        with tarfile.open(folder / f"train-{k:05d}.tar", "w") as tar:
            directory = tarfile.TarInfo("sub")
            directory.type = tarfile.DIRTYPE
            tar.addfile(directory)
            add(tar, "sub/._macos", b"junk")
            for i in range(start, min(start + per_tar, len(rows))):
                image, text = rows[i]
                add(tar, f"sub/{i:06d}.png", image)
                if json_captions:
                    add(tar, f"sub/{i:06d}.json", json.dumps({"caption": text, "id": i}).encode())
                elif text is not None:
                    add(tar, f"sub/{i:06d}.txt", text.encode())


def test_webdataset_tars_equal_the_datasets_rows(tmp_path):
    rng = np.random.default_rng(4)
    # datasets infers the fields from the first 5 samples, all captioned here
    rows = [(png(rng, 5, 4 + i % 4), caption(i) if i > 5 else f"first {i}") for i in range(250)]
    write_tars(tmp_path / "txt", rows, 100, json_captions=False)
    write_tars(tmp_path / "json", rows, 60, json_captions=True)
    expected = [(f"row {i}", image, text) for i, (image, text) in enumerate(rows)]
    shuffled = [f"row {i}" for i in np.random.default_rng(5).permutation(250)]
    for name, column in (("txt", "txt"), ("json", "caption")):
        source = DatasetImages(str(tmp_path / name), image_column="png", caption_column=column)
        planned, opened = read_all(source, shuffled)
        assert planned == expected and opened == [image for image, _ in rows], name
        assert len(source) == 250
    assert reference(tmp_path / "txt", "png", "txt") == expected  # datasets' webdataset builder: the same rows
    by_datasets = reference(tmp_path / "json", "png", "json")  # there the caption is the whole json object
    assert [(n, b) for n, b, _ in by_datasets] == [(n, b) for n, b, _ in expected]
    assert by_datasets[10][2] == str({"caption": None, "id": 10}) and expected[10][2] is None
    with pytest.raises(DatasetSourceError) as err:
        DatasetImages(str(tmp_path / "json"), image_column="jpg", caption_column="caption")
    assert str(err.value) == (
        f"dataset={tmp_path / 'json'} (split train) has no column 'jpg': set image_column= to one of png, json, "
        "caption, id"
    )


# --------------------------------------------------------------------------- memory and copies, in a subprocess

MEASURE = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path

    def status(key):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    import datasets, pyarrow, pyarrow.parquet, PIL.Image
    from fewstep.data.image_datasets import DatasetImages

    path, how = sys.argv[1], sys.argv[2]
    Path("/proc/self/clear_refs").write_text("5")  # the peak RSS (VmHWM) restarts from the RSS now
    base = status("VmRSS")
    total, images = 0, 0
    if how == "fewstep":
        source = DatasetImages(path, image_column="image", caption_column="caption")
        names = []
        for name, opener, text in source.rows():
            total += len(opener().read())
            names.append(name)
        for name in names:
            images += len(source.open_named(name).read())
    else:  # the former reader: datasets.load_dataset, every caption in one list, rows opened by index
        data = datasets.load_dataset(path, split="train")
        data = data.cast_column("image", datasets.Image(decode=False))
        captions = data["caption"]
        for index, text in enumerate(captions):
            total += len(data[index]["image"]["bytes"])
        for index in range(len(captions)):
            images += len(data[index]["image"]["bytes"])
    cache = sum(f.stat().st_size for f in Path(os.environ["HF_DATASETS_CACHE"]).rglob("*.arrow"))
    print(json.dumps({"peak": status("VmHWM") - base, "read": total, "opened": images, "cache": cache}))
    """
)


def measure(path, how: str, cache) -> dict:
    env = {"HF_DATASETS_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", MEASURE, str(path), how], env=env, capture_output=True, text=True,
                         timeout=240, check=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_reading_a_large_parquet_keeps_memory_at_a_record_batch_and_copies_nothing(tmp_path):
    """8000 rows of 96×97 uncompressed PNGs and captions (a 214 MiB parquet, 80 row groups in 2 files): rows()
    and open_named of every row grow the peak RSS by under 64 MiB (the reader's imports and allocator included)
    and write nothing to the datasets cache; the former datasets reader, over the same rows, peaks far above that
    bound (its arrow copy, memory-mapped, is resident) after copying the whole dataset into the cache."""
    rows = write_parquet(tmp_path / "big", 8000, side=lambda i: 96, row_group=100, files=2, level=0, raw=False)
    size = sum(len(image) for image, _ in rows)
    files = sum(f.stat().st_size for f in (tmp_path / "big" / "data").glob("train-*"))
    assert 220e6 < size < files < 230e6
    new = measure(tmp_path / "big", "fewstep", tmp_path / "cache_new")
    old = measure(tmp_path / "big", "datasets", tmp_path / "cache_old")
    peaks, caches = (f"{new[k] / 2**20:.1f} vs {old[k] / 2**20:.1f} MiB" for k in ("peak", "cache"))
    print(f"parquet {files / 2**20:.1f} MiB; fewstep vs datasets: peak RSS growth {peaks}, arrow cache {caches}")
    assert new["read"] == new["opened"] == old["read"] == old["opened"] == size
    assert new["peak"] < 64 * 2**20 < 3 * 64 * 2**20 < old["peak"]
    assert new["cache"] == 0 and old["cache"] > size


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_precompute_from_parquet_and_tars_equals_the_image_folder(tmp_path):
    """The tiny SD3 pipeline encodes 14 images of three aspect ratios (three buckets, so the shards open the
    parquet's 3-row row groups out of order) from an image folder, a parquet folder and webdataset tars: the
    same shards, names mapped ``imgNN.png`` → ``row N``, tensor for tensor; the uncaptioned rows are skipped."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from safetensors.torch import load_file

    from fewstep.precompute import main as precompute_main

    from helpers.tiny_sd3 import save_tiny_sd3_pipeline

    pipeline = save_tiny_sd3_pipeline(tmp_path / "pipe")
    rng = np.random.default_rng(6)
    shapes = [(8, 8), (8, 12), (12, 8)]
    rows = [(png(rng, *shapes[i % 3]), caption(i)) for i in range(14)]
    folder = tmp_path / "images"
    folder.mkdir()
    for i, (image, text) in enumerate(rows):
        (folder / f"img{i:02d}.png").write_bytes(image)
        if text is not None:
            (folder / f"img{i:02d}.txt").write_text(text)
    (tmp_path / "parquet").mkdir()
    table = pa.table({"jpeg": [{"bytes": b, "path": None} for b, _ in rows], "text": [t for _, t in rows]})
    pq.write_table(table, tmp_path / "parquet" / "train.parquet", row_group_size=3)
    write_tars(tmp_path / "tars", rows, 5, json_captions=False)

    def run(name, *source):
        out = tmp_path / name
        args = [f"pretrained={pipeline}", f"out={out}", "batch_size=2", "max_sequence_length=8", "resolution=8",
                "embeds_dtype=float32", "progress=false", "shard_size=2", *source]  # fmt: skip
        manifest = precompute_main(args)
        shards = [(s["files"], load_file(str(out / s["file"]))) for s in manifest["shards"]]
        return manifest, shards

    manifest, expected = run("folder", f"images={folder}")
    assert manifest["summary"]["encoded"] == 12
    assert [s["file"] for s in manifest["skipped"]] == ["img03.png", "img10.png"]
    assert len(expected) == 6 and {tuple(t["latents"].shape[2:]) for _, t in expected} == {(8, 8), (7, 10), (10, 7)}
    for name, source in (("parquet", ["image_column=jpeg"]), ("tars", ["image_column=png", "caption_column=txt"])):
        manifest, got = run(name, f"dataset={tmp_path / name}", *source)
        assert [s["file"] for s in manifest["skipped"]] == ["row 3", "row 10"], name
        assert [files for files, _ in got] == [[f"row {int(f[3:5])}" for f in files] for files, _ in expected]
        for (_, a), (_, b) in zip(got, expected):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
