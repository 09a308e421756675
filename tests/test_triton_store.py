"""Compiled Triton kernels carried in artifacts (``backend/triton_store.py``), on the CPU: a
fake Triton cache laid out as Triton 3 writes it (a folder per kernel hash with a group index
of absolute paths) is saved into an artifact and restored into another machine's cache."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import keras
import pytest

import kerasrt
from kerasrt.backend import triton_store
from kerasrt_testing import randomize

HASH = "FUYS56ZGN52CKTYJLJETGPPELSRVEOJBAUYPYDIAAL42QSNJGKKQ"  # a cache key as Triton 3.6 names folders
FILES = {
    "_pointwise.json": b'{"name": "_pointwise"}',
    "_pointwise.cubin": b"\x7fELF-binary",
    "_pointwise.ptx": b"ptx",
}


def fake_cache(root: Path, digest: str = HASH) -> Path:
    """A cached kernel as Triton writes it, plus a lock and a leftover temporary file."""
    folder = root / digest
    folder.mkdir(parents=True)
    for name, data in FILES.items():
        (folder / name).write_bytes(data)
    index = {"child_paths": {name: str(folder / name) for name in FILES}}
    (folder / "__grp___pointwise.json").write_text(json.dumps(index))
    (folder / "lock").write_text("")
    (folder / "_pointwise.cubin.tmp.pid_1_x").write_text("half")
    return folder


@pytest.fixture
def caches(tmp_path, monkeypatch):
    """(this machine's Triton cache, another machine's): TRITON_CACHE_DIR points at the first."""
    here, there = tmp_path / "here", tmp_path / "there"
    monkeypatch.setenv("TRITON_CACHE_DIR", str(here))
    monkeypatch.setattr(triton_store, "_USED", {})
    return here, there


def launched(folder: Path) -> SimpleNamespace:
    """What Triton's ``JITFunction.run`` returns for the kernel cached in ``folder``."""
    return SimpleNamespace(hash="0f" * 32, metadata_group={name: str(folder / name) for name in FILES})


def test_op_calls_record_the_kernels_they_launched(caches) -> None:
    here, _ = caches
    folder = fake_cache(here)
    triton_store.note(launched(folder))
    triton_store.note(SimpleNamespace(metadata_group={"a": "/x/../a"}))  # not a cache folder's name
    triton_store.note(
        SimpleNamespace(metadata_group={"a": str(folder / "a"), "b": "/other/b"})
    )  # two folders
    triton_store.note(None)  # a launch that returned nothing
    assert triton_store.used() == [HASH] and triton_store._USED[HASH] == folder


def test_kernels_travel_from_one_cache_to_another(caches, tmp_path, monkeypatch) -> None:
    here, there = caches
    triton_store.note(launched(fake_cache(here)))
    gone = fake_cache(here, "CD" * 26)
    triton_store.note(launched(gone))
    for path in gone.iterdir():  # a kernel whose files left the cache is skipped, not an error
        path.unlink()
    # Inductor points TRITON_CACHE_DIR elsewhere while it compiles: the kernels' own paths count
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "inductor"))
    saved = triton_store.save(tmp_path / "art" / "triton")
    assert saved == [HASH]
    carried = tmp_path / "art" / "triton" / HASH
    assert sorted(p.name for p in carried.iterdir()) == sorted([*FILES, "__grp___pointwise.json"])

    monkeypatch.setenv("TRITON_CACHE_DIR", str(there))
    assert triton_store.restore(tmp_path / "art" / "triton") == 1
    index = json.loads((there / HASH / "__grp___pointwise.json").read_text())["child_paths"]
    assert index == {name: str(there / HASH / name) for name in FILES}  # the new machine's paths
    assert all((there / HASH / name).read_bytes() == data for name, data in FILES.items())
    # restoring again keeps what the cache has; a foreign folder name is never followed
    (tmp_path / "art" / "triton" / "not-a-hash").mkdir()
    assert triton_store.restore(tmp_path / "art" / "triton") == 0
    assert sorted(p.name for p in there.iterdir()) == [HASH]


def test_a_damaged_kernel_is_compiled_later_not_half_restored(caches, tmp_path, monkeypatch, caplog) -> None:
    here, there = caches
    triton_store.note(launched(fake_cache(here)))
    triton_store.save(tmp_path / "triton")
    (tmp_path / "triton" / HASH / "_pointwise.cubin").unlink()
    monkeypatch.setenv("TRITON_CACHE_DIR", str(there))
    assert triton_store.restore(tmp_path / "triton") == 0
    assert "cannot restore the compiled Triton kernel" in caplog.text
    assert not there.exists() or list(there.iterdir()) == []


def test_artifacts_carry_the_kernels_and_loads_restore_them(caches, tmp_path, monkeypatch) -> None:
    here, there = caches
    triton_store.note(launched(fake_cache(here)))
    inp = keras.Input((6, 6, 3))
    x = keras.layers.Conv2D(4, 3, activation="relu")(inp)
    model = randomize(keras.Model(inp, keras.layers.GlobalAveragePooling2D()(x)))
    conv = kerasrt.Converter(model, batch_size=2, compiler="inductor")
    conv.convert()
    path = conv.save(tmp_path / "art")
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["triton_kernels"]["kernels"] == [HASH]
    assert (path / "triton" / HASH / "_pointwise.cubin").is_file()

    monkeypatch.setenv("TRITON_CACHE_DIR", str(there))
    kerasrt.load(path)
    assert (there / HASH / "_pointwise.cubin").read_bytes() == FILES["_pointwise.cubin"]
    # without compiled engines there is nothing to restore for
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "third"))
    kerasrt.load(path, compiled_engines=False)
    assert not (tmp_path / "third").exists()
