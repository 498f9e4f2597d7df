"""TFDS document source: a tiny dataset built offline in tmp_path by a builder defined here
(not registered with TFDS, so it is read back from its files alone, as a dataset prepared
elsewhere would be). Skipped where the ``jaxtune[tfds]`` extra is not installed."""

import json
import shutil
import sys

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from jaxtune.data.sources import BadRow, SourceConfig, build_source  # noqa: E402
from jaxtune.data.tfds_source import INSTALL_HINT, TfdsSource, import_tfds  # noqa: E402

NAME = "jaxtune_tiny_docs"
DOCS = ["The first document.", "A second one, a little longer.", "", "Naïve café — ☃ 日本語", "The last."]
EMPTY = 2


class JaxtuneTinyDocs(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Five train documents (one empty, one non-ASCII) and one test document; no downloads."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = tfds.features.FeaturesDict(
            {"text": tfds.features.Text(), "title": tfds.features.Text(), "id": np.int64})
        return tfds.core.DatasetInfo(builder=self, features=features, disable_shuffling=True)  # keep the order

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(DOCS), "test": self._generate_examples(["Held out."])}

    def _generate_examples(self, docs):
        for i, doc in enumerate(docs):
            yield i, {"text": doc, "title": f"doc {i}", "id": i}


def prepare(data_dir, file_format="array_record"):
    builder = JaxtuneTinyDocs(data_dir=str(data_dir), file_format=file_format)
    builder.download_and_prepare(
        file_format=file_format, download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return builder


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds")
    prepare(root)
    return root


def cfg(data_dir, **kw):
    return SourceConfig(tfds=NAME, data_dir=str(data_dir), **kw)


def test_random_access_reads_every_document_in_order(data_dir):
    source = TfdsSource(cfg(data_dir))
    assert source.random_access and source.file_format == "array_record"
    assert len(source) == len(DOCS)
    assert source.name == f"tfds:{NAME}[train]"
    assert [source.read(i) for i in range(len(DOCS)) if i != EMPTY] == [d for d in DOCS if d]
    assert source.read(3) == "Naïve café — ☃ 日本語"
    with pytest.raises(IndexError):
        source.read(len(DOCS))


def test_empty_document_is_a_bad_row_with_its_location(data_dir):
    source = TfdsSource(cfg(data_dir))
    with pytest.raises(BadRow) as err:
        source.read(EMPTY)
    assert err.value.kind == "empty"
    assert err.value.where == f"tfds:{NAME}[train] row {EMPTY}"
    assert f"tfds:{NAME}[train] row {EMPTY}:" in str(err.value)


def test_stream_from_an_index(data_dir):
    source = TfdsSource(cfg(data_dir))
    items = list(source.stream())
    assert [x for x in items if isinstance(x, str)] == [d for d in DOCS if d]
    assert isinstance(items[EMPTY], BadRow) and items[EMPTY].where == f"tfds:{NAME}[train] row {EMPTY}"
    assert list(source.stream(3)) == DOCS[3:]


def test_splits_and_slices(data_dir):
    test = TfdsSource(cfg(data_dir, split="test"))
    assert len(test) == 1 and test.read(0) == "Held out." and test.name == f"tfds:{NAME}[test]"
    part = TfdsSource(cfg(data_dir, split="train[3:]"))
    assert [part.read(i) for i in range(len(part))] == DOCS[3:]
    with pytest.raises(ValueError, match=r"bad split 'validation' \(splits: train, test\)"):
        TfdsSource(cfg(data_dir, split="validation"))


def test_missing_field_names_the_features(data_dir):
    with pytest.raises(ValueError, match=r"no feature 'body' \(features: ") as err:
        TfdsSource(cfg(data_dir, field="body"))
    listed = str(err.value).split("(features: ")[1].split(")")[0]
    assert sorted(listed.split(", ")) == ["id", "text", "title"]
    with pytest.raises(ValueError, match="feature 'id' is .*not text"):
        TfdsSource(cfg(data_dir, field="id"))
    assert TfdsSource(cfg(data_dir, field="title")).read(EMPTY) == f"doc {EMPTY}"


def test_build_source(data_dir):
    source = build_source(SourceConfig(tfds=NAME, data_dir=str(data_dir)))
    assert isinstance(source, TfdsSource) and len(source) == len(DOCS)
    assert source.read(0) == DOCS[0]


def test_unprepared_dataset_is_not_downloaded(tmp_path):
    with pytest.raises(FileNotFoundError, match="no prepared dataset .*tfds build"):
        TfdsSource(cfg(tmp_path))
    with pytest.raises(ValueError, match="namespaced"):
        TfdsSource(SourceConfig(tfds="huggingface:some_dataset", data_dir=str(tmp_path)))


def test_missing_package_says_how_to_install(monkeypatch, data_dir):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # makes the import fail
    with pytest.raises(ImportError, match=r'pip install "jaxtune\[tfds\]"'):
        import_tfds()
    with pytest.raises(ImportError, match=r'pip install "jaxtune\[tfds\]"'):
        build_source(cfg(data_dir))
    assert INSTALL_HINT == 'pip install "jaxtune[tfds]"'


def test_tfrecord_without_tensorflow_says_what_to_do(monkeypatch, data_dir, tmp_path):
    # A copy whose metadata says tfrecord (writing real tfrecord files needs TensorFlow).
    shutil.copytree(data_dir / NAME, tmp_path / NAME)
    info_path = tmp_path / NAME / "1.0.0" / "dataset_info.json"
    info = json.loads(info_path.read_text())
    info["fileFormat"] = "tfrecord"
    info_path.write_text(json.dumps(info))
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorflow" else real(name, *a))
    with pytest.raises(ImportError, match="stored as tfrecord.*tensorflow-cpu.*array_record"):
        TfdsSource(cfg(tmp_path))


def test_tfrecord_is_read_forward_with_tensorflow(tmp_path):
    pytest.importorskip("tensorflow")
    prepare(tmp_path, "tfrecord")
    source = TfdsSource(cfg(tmp_path))
    assert not source.random_access and source.file_format == "tfrecord" and len(source) == len(DOCS)
    items = list(source.stream())
    assert [x for x in items if isinstance(x, str)] == [d for d in DOCS if d]
    assert items[EMPTY].kind == "empty" and items[EMPTY].where == f"tfds:{NAME}[train] row {EMPTY}"
    assert list(source.stream(3)) == DOCS[3:]
    assert list(source.stream(len(DOCS))) == []
    sliced = TfdsSource(cfg(tmp_path, split="train[1:]"))
    assert list(sliced.stream(2)) == DOCS[3:]
