"""The embedded engine's configuration: chosen by a probe in a child process, cached per machine, recorded.

The probe's child really runs llama.cpp. The one fault injected is the crash itself
(``LLMFIRST_ENGINE_PROBE_FAKE_CRASH``: the child kills itself with SIGSEGV after loading with extra buffers
on, as the AMX path does on the Intel machines it crashes on), because this machine may not be one of them.
"""

from __future__ import annotations

import json

import pytest

from llmfirst_kit import engine
from llmfirst_kit.errors import InvalidInput
from llmfirst_kit.models import resolve
from llmfirst_kit.pipeline import Pipeline

from conftest import TEST_MODEL, TEST_THREADS


@pytest.fixture
def fresh_engine(tmp_path, monkeypatch):
    """A machine that has never probed (empty cache); the process's own choice is restored afterwards."""
    monkeypatch.setenv("LLMFIRST_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LLMFIRST_ENGINE", raising=False)
    monkeypatch.setattr(engine, "_CHOICE", None)
    return tmp_path / "cache" / "engine"


def test_a_machine_where_the_fast_path_works_keeps_it(fresh_engine):
    outcome = engine.run_probe(use_extra_bufts=True)
    chosen = engine.choice()
    # whichever way this machine goes, the choice follows what the probe saw
    assert chosen.use_extra_bufts == (outcome["status"] == "ok")
    if outcome["status"] == "ok":
        assert chosen.config in ("amx", "cpu-repack") and outcome["tokens"] == engine.PROBE_TOKENS
        assert "probe decoded" in chosen.reason
    assert json.loads((fresh_engine / f"{chosen.key}.json").read_text())["config"] == chosen.config


def test_a_probe_child_dying_by_a_signal_means_extra_buffers_off(fresh_engine, monkeypatch):
    monkeypatch.setenv(engine.FAKE_CRASH_ENV, "1")  # the injected fault: the child's SIGSEGV
    chosen = engine.choice()
    assert chosen.config == "none" and chosen.use_extra_bufts is False
    assert chosen.probe["status"] == "crashed" and chosen.probe["signal"] == "SIGSEGV"
    assert "SIGSEGV" in chosen.reason
    # the verdict is the machine's: cached, so the next process does not probe again
    monkeypatch.setattr(engine, "_CHOICE", None)
    monkeypatch.setattr(engine, "run_probe", lambda **kw: pytest.fail("probed twice on one machine"))
    again = engine.choice()
    assert again.cached and again.config == "none"
    # and a model built now really loads without extra buffers, and decodes
    llm = engine.new_llama(str(resolve(TEST_MODEL).path), n_ctx=128, n_threads=TEST_THREADS)
    try:
        assert llm.model_params.use_extra_bufts is False
        assert len(list(zip(range(3), llm.generate(llm.tokenize(b"Hello"), temp=0.0)))) == 3
    finally:
        llm.close()


def test_operator_overrides_and_a_bad_value(fresh_engine, monkeypatch):
    monkeypatch.setattr(engine, "run_probe", lambda **kw: pytest.fail("an override must not probe"))
    monkeypatch.setenv("LLMFIRST_ENGINE", "safe")
    assert engine.choice(refresh=True).use_extra_bufts is False
    monkeypatch.setenv("LLMFIRST_ENGINE", "fast")
    assert engine.choice(refresh=True).use_extra_bufts is True
    monkeypatch.setenv("LLMFIRST_ENGINE", "turbo")
    with pytest.raises(InvalidInput, match="LLMFIRST_ENGINE=.turbo. is not one of: auto, safe, fast"):
        engine.choice(refresh=True)


async def test_every_run_record_says_which_engine_ran_it(backend):
    rec = await Pipeline.from_preset("direct", backend=backend, model=TEST_MODEL, max_tokens=4).run("Hi")
    chosen = engine.choice()
    assert rec.environment["engine"]["config"] == chosen.config
    assert rec.environment["cpu_model"] == chosen.cpu_model
    assert rec.stages[0].call.model_info["engine"] == chosen.config
