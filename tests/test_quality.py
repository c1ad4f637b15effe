"""Quantized variants and their objective quality, on the real SmolLM2-135M file.

The variant is built by llama.cpp's own quantizer into a temporary cache (``LLMFIRST_CACHE``), then used
by name like any model: resolved, loaded by the embedded backend, scored by perplexity and KL against the
shipped file. 64 tokens of text and one decode thread keep it fast.
"""

from __future__ import annotations

import json
import os

import pytest

from llmfirst_kit import cli
from llmfirst_kit.models import fidelity as quality
from llmfirst_kit.backends import CallRequest, get_backend
from llmfirst_kit.errors import UnknownModel
from llmfirst_kit.models import REGISTRY, resolve
from llmfirst_kit.models.quantize import quantize
from llmfirst_kit.models.variants import QUANT_TYPES, find_variant, split_name, variant_name
from llmfirst_kit.data import QUERIES, TEXTS

TEXT = TEXTS["en"]
THREADS = int(os.environ.get("LLMFIRST_TEST_THREADS", "1"))
BASE = "smollm2-135m"


@pytest.fixture(scope="module")
def variant(tmp_path_factory):
    """smollm2-135m@Q4_0 built in a fresh cache (the cache variable stays set for the module's tests)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMFIRST_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield quantize(BASE, "q4_0", n_threads=THREADS)


def test_quantize_builds_a_checked_variant(variant):
    assert variant.name == "smollm2-135m@Q4_0" and variant.built_s is not None
    assert variant.path.is_file() and variant.path.parent.name == "variants"
    assert variant.size == variant.path.stat().st_size and 0 < variant.size < REGISTRY[BASE].size
    assert variant.source_sha256 == REGISTRY[BASE].sha256
    side = json.loads(variant.path.with_suffix(".json").read_text())
    assert side["sha256"] == variant.sha256 and "not from 16-bit" in side["note"]
    again = quantize(BASE, "Q4_0")  # already built: not rebuilt
    assert again.built_s is None and again.sha256 == variant.sha256
    assert find_variant(BASE, "Q4_0") is not None


async def test_a_variant_is_a_model_name(variant):
    resolved = resolve("smollm2-135m@q4_0")
    assert resolved.name == "smollm2-135m@Q4_0" and resolved.path == variant.path
    assert resolved.sha256 == variant.sha256 and resolved.spec.quantization == "Q4_0" and resolved.spec.instruct
    assert resolve(f"{BASE}@shipped").name == BASE and variant_name(BASE, "Q4_1") == BASE  # the shipped type
    with pytest.raises(UnknownModel, match=r"not built; run: llmfirst models quantize smollm2-135m --to Q2_K"):
        resolve(f"{BASE}@Q2_K")
    with pytest.raises(UnknownModel, match="accepted: " + ", ".join(QUANT_TYPES[:3])):
        split_name(f"{BASE}@Q9_9")
    backend = get_backend("embedded", model=variant.name, n_threads=THREADS)  # the backend takes the name as is
    call = backend.call(CallRequest(messages=[{"role": "user", "content": "Say hello."}], max_tokens=8))
    record = await call.collect()
    assert record.status == "ok" and record.model == "smollm2-135m@Q4_0" and record.output_tokens
    assert record.model_info["quantization"] == "Q4_0" and record.model_info["sha256"] == variant.sha256


def test_perplexity_and_kl_against_the_shipped_file(variant):
    same = quality.measure(BASE, TEXT, reference=BASE, n_tokens=64, n_threads=THREADS)
    assert same.kl_mean == pytest.approx(0.0, abs=1e-6) and same.top1_agreement == 1.0
    assert same.perplexity == pytest.approx(same.reference_perplexity) and 1 < same.perplexity < 1000
    lower = quality.measure(variant.name, TEXT, reference=BASE, n_tokens=64, n_threads=THREADS)
    assert lower.tokens == 64 and lower.reference == BASE and lower.sha256 == variant.sha256
    assert lower.kl_mean > 1e-3 and lower.kl_max >= lower.kl_mean and 0 < lower.top1_agreement <= 1
    assert lower.perplexity != same.perplexity and lower.reference_perplexity == pytest.approx(same.perplexity)


def test_a_study_cell_measures_every_file_against_the_shipped_one(variant, tmp_path):
    from llmfirst_kit import study

    params = study.validate_parameters({
        **study.notebook_defaults(), "models": [BASE], "quantizations": ["shipped", "Q4_0"],
        "queries_file": str(QUERIES), "perplexity_text": str(TEXT),
        "perplexity_tokens": 24, "n_threads": THREADS, "output_dir": str(tmp_path)})
    rows = study.measure_cell_quality(params)
    assert [(r["model"], r["quantization"], r["shipped"]) for r in rows] == [(BASE, "Q4_1", True),
                                                                             (BASE, "Q4_0", False)]
    assert rows[0]["kl_mean"] == pytest.approx(0, abs=1e-6) and rows[1]["kl_mean"] > 0
    assert rows[1]["file"] == variant.name and rows[1]["reference"] == BASE
    assert json.loads((tmp_path / study.QUALITY).read_text()) == rows


def test_cli_models_quantize(variant, capsys):
    assert cli.main(["models", "quantize", BASE, "--to", "Q4_0", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["name"] == variant.name and rows[0]["sha256"] == variant.sha256
    assert cli.main(["models", "quantize", BASE, "--to", "Q9"]) == 2
    assert "accepted: F16, Q8_0" in capsys.readouterr().err
