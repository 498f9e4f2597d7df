"""Documents from a TensorFlow Datasets (TFDS) dataset already prepared on disk.

Needs ``pip install "jaxtune[tfds]"`` (tensorflow-datasets, which brings array_record on
Linux; TensorFlow itself is not needed for array_record datasets). Nothing is ever downloaded
or generated here: the dataset must already be prepared under ``data_dir`` (``tfds build NAME
--data_dir DIR --file_format array_record``, or a directory copied from elsewhere). Neither its
builder code nor the TFDS catalog is needed to read it: the prepared files describe themselves.

A dataset stored in a random-access format (array_record, parquet) is read at any index
through `tfds.data_source`'s machinery, without TensorFlow. One stored only as tfrecord (TFDS's
default format) or riegeli is read forward in its stored order, which needs TensorFlow
(``pip install tensorflow-cpu``); resuming from index N skips N examples.
"""

from __future__ import annotations

import importlib.util
import re
from typing import Any, Iterator

import numpy as np

from jaxtune.data.source_base import BadRow, DocumentSource, SourceConfig, text_of

INSTALL_HINT = 'pip install "jaxtune[tfds]"'


def import_tfds():
    """`tensorflow_datasets`, or an ImportError that says how to install it."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as err:
        raise ImportError(f"TFDS data sources need tensorflow-datasets, which cannot be imported ({err}); "
                          f"install it with: {INSTALL_HINT}") from err
    return tfds


def _is_text_feature(tfds, feature: Any) -> bool:
    """A scalar string feature (`tfds.features.Text`, or a string `Tensor` of shape ())."""
    if not isinstance(feature, tfds.features.Tensor) or tuple(feature.shape) != ():
        return False
    try:
        return np.dtype(feature.np_dtype).kind in "OSU"
    except TypeError:
        return False


class TfdsSource(DocumentSource):
    """One split (``cfg.split``, TFDS slicing such as ``train[:90%]`` allowed) of a prepared TFDS
    dataset; each example's ``cfg.field`` feature is one document. Rows are located as
    ``tfds:NAME[split] row N``."""

    def __init__(self, cfg: SourceConfig):
        tfds = import_tfds()
        self.field, self.split = cfg.field, cfg.split
        self.name = f"tfds:{cfg.tfds}[{cfg.split}]"
        label = f"data source tfds:{cfg.tfds}"
        from tensorflow_datasets.core import naming

        dataset_name, _ = naming.parse_builder_name_kwargs(cfg.tfds)
        if dataset_name.namespace:  # huggingface:..., kaggle:..., community datasets: fetched over the network
            raise ValueError(f"{label}: namespaced TFDS datasets ({dataset_name.namespace}:...) are fetched over the "
                             "network; prepare the dataset under data_dir and give its plain name")
        where = cfg.data_dir or "the default TFDS data dir (TFDS_DATA_DIR or ~/tensorflow_datasets)"
        prepare = (f"prepare it first, e.g. `tfds build {cfg.tfds} --data_dir DIR --file_format array_record`, "
                   "and set data_dir to DIR (jaxtune never downloads TFDS data)")
        try:
            builder = tfds.builder(cfg.tfds, data_dir=cfg.data_dir, try_gcs=False)
        except tfds.core.registered.DatasetNotFoundError:
            raise FileNotFoundError(f"{label}: no prepared dataset {cfg.tfds!r} in {where}; {prepare}") from None
        if not builder.is_prepared():
            raise FileNotFoundError(f"{label}: not prepared in {builder.data_dir}; {prepare}")
        info = builder.info
        try:
            split_info = info.splits[cfg.split]
        except (KeyError, ValueError) as err:
            raise ValueError(f"{label}: bad split {cfg.split!r} (splits: {', '.join(info.splits)}): {err}") from None
        features = info.features
        names = list(features.keys())
        if cfg.field not in names:
            raise ValueError(f"{label}: no feature {cfg.field!r} (features: {', '.join(map(str, names)) or 'none'}); "
                             "set field to the one that holds the text")
        if not _is_text_feature(tfds, features[cfg.field]):
            raise ValueError(f"{label}: feature {cfg.field!r} is {features[cfg.field]!r}, not text "
                             f"(features: {', '.join(map(str, names))})")

        formats = {info.file_format} if info.file_format else set()
        formats.update(getattr(info, "alternative_file_formats", ()) or ())
        random_formats = tfds.core.file_adapters.FileFormat.with_random_access()
        self.file_format = info.file_format.value if info.file_format else None
        if formats & random_formats:
            self.random_access = True
            self.ds = builder.as_data_source(split=cfg.split)
            self.size = len(self.ds)
        else:
            if importlib.util.find_spec("tensorflow") is None:
                stored = ", ".join(sorted(f.value for f in formats)) or "an unknown format"
                raise ImportError(
                    f"{label}: stored as {stored}, which only TensorFlow reads (pip install tensorflow-cpu); "
                    f"or re-prepare it as array_record (`tfds build {cfg.tfds} --data_dir DIR --file_format "
                    "array_record`, or `tfds convert_format --dataset_dir DIR/NAME --out_file_format array_record`), "
                    "which is read at random without TensorFlow")
            self.random_access = False
            self.builder = builder
            self.size = int(split_info.num_examples)

    def __len__(self) -> int:
        return self.size  # known from the dataset's metadata, also when read forward

    def read(self, index: int) -> str:
        if not self.random_access:
            return super().read(index)
        index = int(index)
        if not 0 <= index < self.size:
            raise IndexError(f"{self.name}: row {index} out of range (0..{self.size - 1})")
        return text_of(self.ds[index], self.field, f"{self.name} row {index}")

    def stream(self, start: int = 0) -> Iterator[str | BadRow]:
        if self.random_access:
            yield from super().stream(start)
            return
        if start >= self.size:
            return
        tfds = import_tfds()
        # One file at a time, files in order: the stored order, the same on every run.
        read_config = tfds.ReadConfig(interleave_cycle_length=1, try_autocache=False)
        plain = re.fullmatch(r"[\w.-]+", self.split) is not None
        split = f"{self.split}[{start}:]" if start and plain else self.split  # shards before start go unread
        ds = self.builder.as_dataset(split=split, shuffle_files=False, read_config=read_config)
        if start and not plain:
            ds = ds.skip(start)
        for index, record in enumerate(tfds.as_numpy(ds), start=start):
            try:
                yield text_of(record, self.field, f"{self.name} row {index}")
            except BadRow as bad:
                yield bad
