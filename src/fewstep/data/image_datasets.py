"""Images + captions of a dataset, for ``python -m fewstep.precompute dataset=...``, read without loading it.

``dataset=`` is a folder (or one file) of parquet, arrow or webdataset tar shards, a folder written by
``Dataset.save_to_disk``, a hub id (``owner/name``) or any other folder ``datasets.load_dataset`` reads (an
imagefolder with ``metadata.jsonl``, csv, json). ``image_column`` holds the images (an ``Image`` feature's
``{bytes, path}``, raw bytes or a path), ``caption_column`` the captions; ``split`` picks the split, found as
``datasets`` finds it (``data/train-00000-of-00002.parquet``, a ``test/`` folder, ...; files without a split
name are ``train``), so the rows and their order are those ``datasets.load_dataset`` gives.

Parquet, arrow and tar shards are read in place, a few rows at a time; nothing is converted or copied into the
``datasets`` cache, and memory stays at about one record batch whatever the dataset's size:

- parquet: ``pyarrow.parquet.ParquetFile.iter_batches`` over the two columns; a row is opened again through
  its row group, with a cursor kept on the last one (precompute opens rows in increasing order within a
  shard, so a shard reads each row group it touches about once).
- arrow (``.arrow`` files, ``save_to_disk`` folders): memory-mapped, the same rows zero-copy.
- webdataset tars (uncompressed ``.tar``): a sample is the consecutive members sharing a key
  (``dir/000123.jpg``, ``dir/000123.txt``), its columns are the extensions (``image_column=jpg
  caption_column=txt``) and the top-level keys of its ``.json`` member (``caption_column=caption``);
  a row's image is read at its offset in the tar, from an index of the tar's headers.

A hub id or another format goes through ``datasets.load_dataset`` (downloaded and cached as ``datasets``
does), the captions read in batches. Rows are planned in dataset order from the image headers alone (images
are not decoded), named ``row N`` (:func:`row_name`), so a rerun plans the same shards and precompute resumes
as for a folder.
"""

from __future__ import annotations

import bisect
import io
import itertools
import json
import os
import tarfile
from pathlib import Path

from fewstep.errors import FewstepError

BATCH_ROWS = 16  # rows per record batch read at a time: about 16 images in memory (plus a row group's pages)
DIRECT = {"parquet": ".parquet", "arrow": ".arrow", "webdataset": ".tar"}  # read in place, by file suffix


class DatasetSourceError(FewstepError, ValueError):
    """A dataset that cannot be opened, or a column it does not have; the message names the fix."""


def row_name(index: int) -> str:
    """How a row is named in the cache's manifest (``files``, ``skipped``)."""
    return f"row {index}"


class DatasetImages:
    """The ``image_column`` / ``caption_column`` rows of one split of a dataset (see the module docstring)."""

    def __init__(self, dataset: str, image_column: str = "image", caption_column: str = "text", split: str = "train"):
        self.name, self.split = str(dataset), str(split)
        self.image_column, self.caption_column = str(image_column), str(caption_column)
        try:
            self.reader = self._open()
        except DatasetSourceError:
            raise
        except Exception as err:  # noqa: BLE001 - datasets / pyarrow raise many types for a missing id / bad file
            first = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
            raise DatasetSourceError(
                f"dataset={self.name} (split {self.split}) could not be opened ({type(err).__name__}: {first}); give "
                "a hub id, a save_to_disk folder, or a folder of images + metadata.jsonl, parquet, arrow or "
                "webdataset .tar files"
            ) from None
        columns = self.reader.columns
        missing = [c for c in (self.image_column, self.caption_column) if c not in columns]
        if missing:
            key = "image_column" if missing[0] == self.image_column else "caption_column"
            raise DatasetSourceError(
                f"dataset={self.name} (split {self.split}) has no column {missing[0]!r}: set {key}= to one of "
                f"{', '.join(columns)}"
            )

    def _open(self):
        local = Path(os.path.expanduser(self.name))
        if local.is_file() and local.suffix in DIRECT.values():  # one shard
            kind = next(k for k, suffix in DIRECT.items() if suffix == local.suffix)
            return READERS[kind]([str(local)])
        if local.is_dir() and (local / "dataset_dict.json").exists():  # DatasetDict.save_to_disk: a folder per split
            splits = json.loads((local / "dataset_dict.json").read_text())["splits"]
            if self.split not in splits:
                raise DatasetSourceError(self._no_split(splits))
            return saved_dataset(local / self.split)
        if local.is_dir() and (local / "dataset_info.json").exists():  # Dataset.save_to_disk
            return saved_dataset(local)
        import datasets

        if local.is_dir():  # the data files of each split, as datasets.load_dataset finds them (nothing is read)
            builder = datasets.load_dataset_builder(str(local))
            if builder.name in READERS:
                files = builder.config.data_files or {}
                if self.split not in files:
                    raise DatasetSourceError(self._no_split(list(files)))
                return READERS[builder.name]([str(f) for f in files[self.split]])
        return HubRows(datasets.load_dataset(str(local) if local.is_dir() else self.name, split=self.split))

    def _no_split(self, splits) -> str:
        return f"dataset={self.name} has no split {self.split!r}: set split= to one of {', '.join(splits)}"

    def __len__(self) -> int:
        return self.reader.count()

    def open(self, index: int):
        """The image of row ``index`` as something ``PIL.Image.open`` reads (a file object or a path)."""
        return image_file(self.reader.image(int(index), self.image_column), self.image_column)

    def open_named(self, name: str):
        """:meth:`open` of the row :func:`row_name` named."""
        return self.open(int(name.removeprefix("row ")))

    def rows(self):
        """``(name, image opener, caption or None)`` per row, in dataset order (what precompute plans): a batch of
        rows is read at a time, an opener reads its row from that batch (and keeps the batch while it is kept)."""
        rows = self.reader.rows(self.image_column, self.caption_column)
        for index, (image, caption) in enumerate(rows):
            text = None if caption is None else str(caption)
            yield row_name(index), (lambda get=image: image_file(get(), self.image_column)), text


def image_file(value, column: str):
    """A column's image value (``{bytes, path}``, bytes, a path or a PIL image) as a file object or a path."""
    if isinstance(value, dict):  # an undecoded Image feature: {"bytes", "path"}
        if value.get("bytes"):
            return io.BytesIO(value["bytes"])
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return io.BytesIO(value)
    if isinstance(value, str) and value:
        return value
    if hasattr(value, "save"):  # a decoded PIL image (a column cast by the user)
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        buffer.seek(0)
        return buffer
    raise ValueError(f"no image in column {column!r}")


def saved_dataset(folder: Path):
    """A ``Dataset.save_to_disk`` folder: its arrow files memory-mapped (``datasets.load_from_disk`` for one with
    an indices mapping, which the files alone do not give)."""
    state = json.loads((folder / "state.json").read_text())
    if state.get("_indices_data_files"):  # pragma: no cover - save_to_disk writes flattened data
        import datasets

        return HubRows(datasets.load_from_disk(str(folder)))
    return ArrowRows([str(folder / f["filename"]) for f in state["_data_files"]])


def batch_rows(batches, image_column: str, caption_column: str):
    """``(image getter, caption)`` of each row of record ``batches`` holding both columns."""
    for batch in batches:
        images = batch.column(image_column)
        for offset, caption in enumerate(batch.column(caption_column).to_pylist()):
            yield (lambda a=images, o=offset: a[o].as_py()), caption


def locate(starts: list[int], index: int) -> tuple[int, int]:
    """``(piece, row within it)`` of ``index`` given each piece's first row (``starts``, ascending)."""
    piece = bisect.bisect_right(starts, index) - 1
    return piece, index - starts[piece]


class FileRows:
    """Rows of a list of files read in place; the row index across files is built on first need."""

    def __init__(self, paths: list[str]):
        if not paths:
            raise DatasetSourceError("no data files")
        self.paths = paths
        self._starts: list[int] | None = None
        self._total = 0

    def count(self) -> int:
        self._index()
        return self._total

    def _index(self) -> list[int]:
        if self._starts is None:
            starts, total = [], 0
            for file in range(len(self.paths)):
                starts.append(total)
                total += self._row_count(file)
            self._starts, self._total = starts, total
        return self._starts

    def _file_row(self, index: int) -> tuple[int, int]:
        if not 0 <= index < self.count():
            raise IndexError(f"row {index} of {self._total}")
        return locate(self._index(), index)


class ParquetRows(FileRows):
    """Parquet files read by record batches; a row opened by itself is read through its row group, from a cursor
    kept on the last row group read (a later row of it continues the cursor, an earlier one restarts it)."""

    def __init__(self, paths: list[str]):
        super().__init__(paths)
        import pyarrow.parquet as pq

        self.pq = pq
        self.columns = list(pq.read_schema(paths[0]).names)
        self._groups: dict[int, list[int]] = {}  # file -> first row of each row group
        self._cursor: ParquetCursor | None = None

    def _file(self, path: str):
        return self.pq.ParquetFile(path, buffer_size=1 << 20, pre_buffer=False)  # column chunks read in pieces

    def _row_count(self, file: int) -> int:
        return self.pq.read_metadata(self.paths[file]).num_rows

    def rows(self, image_column: str, caption_column: str):
        columns = list(dict.fromkeys([image_column, caption_column]))
        for path in self.paths:
            with self._file(path) as parquet:
                yield from batch_rows(
                    parquet.iter_batches(BATCH_ROWS, columns=columns, use_threads=False), image_column, caption_column
                )

    def image(self, index: int, column: str):
        file, row = self._file_row(index)
        if file not in self._groups:
            meta = self.pq.read_metadata(self.paths[file])
            sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
            self._groups[file] = [0, *itertools.accumulate(sizes[:-1])]
        group, row = locate(self._groups[file], row)
        cursor = self._cursor
        if cursor is None or (cursor.file, cursor.group, cursor.column) != (file, group, column) or row < cursor.start:
            if cursor is not None:
                cursor.parquet.close()
            cursor = self._cursor = ParquetCursor(self._file(self.paths[file]), file, group, column)
        return cursor.value(row)


class ParquetCursor:
    """One column of one row group of an open parquet file, read forwards a record batch at a time."""

    def __init__(self, parquet, file: int, group: int, column: str):
        self.parquet, self.file, self.group, self.column = parquet, file, group, column
        self.batches = parquet.iter_batches(BATCH_ROWS, row_groups=[group], columns=[column], use_threads=False)
        self.start, self.batch = 0, next(self.batches).column(0)

    def value(self, row: int):
        """Row ``row`` of the row group (not before the current batch)."""
        while row >= self.start + len(self.batch):
            self.start += len(self.batch)
            self.batch = next(self.batches).column(0)
        return self.batch[row - self.start].as_py()


class ArrowRows(FileRows):
    """Arrow IPC files (file or stream format, as ``save_to_disk`` writes) memory-mapped: their buffers are the
    file's pages, read when a row is; the last file's table is kept open."""

    def __init__(self, paths: list[str]):
        super().__init__(paths)
        self.columns = list(self._table(paths[0]).column_names)
        self._last = (-1, None)

    @staticmethod
    def _table(path: str):
        import pyarrow as pa

        source = pa.memory_map(path)
        try:
            return pa.ipc.open_file(source).read_all()
        except pa.ArrowInvalid:
            source.seek(0)
            return pa.ipc.open_stream(source).read_all()

    def _row_count(self, file: int) -> int:
        return self._table(self.paths[file]).num_rows

    def rows(self, image_column: str, caption_column: str):
        columns = list(dict.fromkeys([image_column, caption_column]))
        for path in self.paths:
            batches = self._table(path).select(columns).to_batches(max_chunksize=BATCH_ROWS)
            yield from batch_rows(batches, image_column, caption_column)

    def image(self, index: int, column: str):
        file, row = self._file_row(index)
        if self._last[0] != file:
            self._last = (file, self._table(self.paths[file]))
        return self._last[1].column(column)[row].as_py()


def split_member(path: str) -> tuple[str, str] | None:
    """``(key, field)`` of a tar member as webdataset groups it (``a/b/000.seg.png`` → ``a/b/000``, ``seg.png``);
    None for a name without an extension or a hidden / ``__`` file."""
    folder, _, base = path.rpartition("/")
    stem, dot, field = base.partition(".")
    if not dot or not stem or base.startswith((".", "__")):
        return None
    return f"{folder}/{stem}" if folder else stem, field


class TarRows(FileRows):
    """Webdataset tar shards: a sample is the consecutive members with one key, its fields ``{field: (offset,
    size)}`` from the tar's headers (the data is read only for the row asked for); the last few tars' header
    indexes are kept."""

    KEEP = 4  # header indexes kept (tars)
    INFER = 5  # samples of the first tar whose fields (and .json keys) name the columns

    def __init__(self, paths: list[str]):
        super().__init__(paths)
        self._samples: dict[int, list[dict]] = {}
        self._handle = (-1, None)
        first = self.samples(0)[: self.INFER]
        fields = list(dict.fromkeys(f for sample in first for f in sample))
        keys = [k for f in fields if f.endswith("json") for k in self.json_keys(0, first, f)]
        self.columns = fields + [k for k in dict.fromkeys(keys) if k not in fields]

    def samples(self, file: int) -> list[dict]:
        if file not in self._samples:
            samples, key = [], None
            with tarfile.open(self.paths[file], mode="r:") as tar:
                for member in tar:
                    split = split_member(member.name) if member.isfile() else None
                    if split is None:
                        continue
                    if split[0] != key:
                        key = split[0]
                        samples.append({})
                    samples[-1][split[1]] = (member.offset_data, member.size)
            while len(self._samples) >= self.KEEP:
                self._samples.pop(next(iter(self._samples)))
            self._samples[file] = samples
        return self._samples[file]

    def json_keys(self, file: int, samples: list[dict], field: str) -> list[str]:
        keys = []
        for sample in samples:
            if field in sample:
                value = json.loads(self.read(file, sample[field]))
                keys.extend(value if isinstance(value, dict) else [])
        return keys

    def _row_count(self, file: int) -> int:
        return len(self.samples(file))

    def read(self, file: int, where: tuple[int, int]) -> bytes:
        if self._handle[0] != file:
            if self._handle[1] is not None:
                self._handle[1].close()
            self._handle = (file, open(self.paths[file], "rb"))  # noqa: SIM115 - kept open across reads, closed above
        handle = self._handle[1]
        handle.seek(where[0])
        return handle.read(where[1])

    def value(self, file: int, sample: dict, column: str, text: bool):
        """A sample's ``column``: a field's bytes (decoded to text for a caption: ``.json`` parsed), or a key of
        its ``.json`` field; None where it has neither."""
        if column in sample:
            data = self.read(file, sample[column])
            if not text:
                return data
            return json.loads(data) if column.endswith("json") else data.decode("utf-8")
        for field in sample:
            if field.endswith("json"):
                value = json.loads(self.read(file, sample[field]))
                if isinstance(value, dict) and column in value:
                    return value[column]
        return None

    def rows(self, image_column: str, caption_column: str):
        for file in range(len(self.paths)):
            for sample in self.samples(file):
                caption = self.value(file, sample, caption_column, text=True)
                yield (lambda f=file, s=sample: self.value(f, s, image_column, text=False)), caption

    def image(self, index: int, column: str):
        file, row = self._file_row(index)
        return self.value(file, self.samples(file)[row], column, text=False)


class HubRows:
    """A ``datasets.Dataset`` (a hub id, an imagefolder, ...): images undecoded, captions read in batches."""

    def __init__(self, data):
        import datasets

        self.columns = list(data.column_names)
        for column, feature in data.features.items():
            if isinstance(feature, datasets.Image):
                data = data.cast_column(column, datasets.Image(decode=False))  # headers only, when planning
        self.data = data
        self._images = {}

    def count(self) -> int:
        return len(self.data)

    def rows(self, image_column: str, caption_column: str):
        images = self.data.select_columns([image_column])
        captions = self.data.select_columns([caption_column])
        for start in range(0, len(self.data), BATCH_ROWS):
            batch = captions[start : start + BATCH_ROWS][caption_column]
            for offset, caption in enumerate(batch):
                yield (lambda i=start + offset: images[i][image_column]), caption

    def image(self, index: int, column: str):
        if column not in self._images:
            self._images[column] = self.data.select_columns([column])
        return self._images[column][index][column]


READERS = {"parquet": ParquetRows, "arrow": ArrowRows, "webdataset": TarRows}
