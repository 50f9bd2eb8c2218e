"""Images + captions from the ``datasets`` library, for ``python -m fewstep.precompute dataset=...``.

``dataset=`` is a hub id (``owner/name``), a folder written by ``Dataset.save_to_disk`` (arrow), or a folder
``datasets.load_dataset`` reads by itself: an imagefolder (images + ``metadata.jsonl``), parquet or arrow
files. ``image_column`` holds the images (an ``Image`` feature, or raw bytes / paths), ``caption_column`` the
captions; ``split`` picks the split. Rows are planned in dataset order from the image headers alone (the
column is read undecoded), so a rerun plans the same shards and precompute resumes as for a folder.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from fewstep.errors import FewstepError


class DatasetSourceError(FewstepError, ValueError):
    """A dataset that cannot be opened, or a column it does not have; the message names the fix."""


def row_name(index: int) -> str:
    """How a row is named in the cache's manifest (``files``, ``skipped``)."""
    return f"row {index}"


class DatasetImages:
    """The ``image_column`` / ``caption_column`` rows of one split of a ``datasets`` dataset."""

    def __init__(self, dataset: str, image_column: str = "image", caption_column: str = "text", split: str = "train"):
        try:
            import datasets
        except ImportError:  # pragma: no cover - a dependency of fewstep
            raise DatasetSourceError("dataset= needs the datasets library: pip install datasets") from None
        self.name, self.split = str(dataset), str(split)
        self.image_column, self.caption_column = str(image_column), str(caption_column)
        data = self._open(datasets)
        missing = [c for c in (self.image_column, self.caption_column) if c not in data.column_names]
        if missing:
            key = "image_column" if missing[0] == self.image_column else "caption_column"
            raise DatasetSourceError(
                f"dataset={self.name} (split {self.split}) has no column {missing[0]!r}: set {key}= to one of "
                f"{', '.join(data.column_names)}"
            )
        if isinstance(data.features[self.image_column], datasets.Image):
            data = data.cast_column(self.image_column, datasets.Image(decode=False))  # headers only, when planning
        self.data = data

    def _open(self, datasets):
        local = Path(os.path.expanduser(self.name))
        try:
            if local.is_dir() and ((local / "dataset_info.json").exists() or (local / "dataset_dict.json").exists()):
                data = datasets.load_from_disk(str(local))  # Dataset.save_to_disk / DatasetDict.save_to_disk
                if isinstance(data, datasets.DatasetDict):
                    if self.split not in data:
                        raise DatasetSourceError(
                            f"dataset={self.name} has no split {self.split!r}: set split= to one of {', '.join(data)}"
                        )
                    data = data[self.split]
                return data
            return datasets.load_dataset(str(local) if local.is_dir() else self.name, split=self.split)
        except DatasetSourceError:
            raise
        except Exception as err:  # noqa: BLE001 - datasets raises many types for a missing id / bad split / format
            first = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
            raise DatasetSourceError(
                f"dataset={self.name} (split {self.split}) could not be opened ({type(err).__name__}: {first}); give "
                "a hub id, a save_to_disk folder, or a folder of images + metadata.jsonl, parquet or arrow files"
            ) from None

    def __len__(self) -> int:
        return len(self.data)

    def open(self, index: int):
        """The image of row ``index`` as something ``PIL.Image.open`` reads (a file object or a path)."""
        value = self.data[int(index)][self.image_column]
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
        raise ValueError(f"no image in column {self.image_column!r}")

    def open_named(self, name: str):
        """:meth:`open` of the row :func:`row_name` named."""
        return self.open(int(name.removeprefix("row ")))

    def rows(self):
        """``(name, image opener, caption or None)`` per row, in dataset order (what precompute plans)."""
        captions = self.data[self.caption_column]
        for index, caption in enumerate(captions):
            text = None if caption is None else str(caption)
            yield row_name(index), (lambda i=index: self.open(i)), text
