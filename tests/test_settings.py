"""Every ``LLMFIRST_*`` environment variable is a field of one settings model (``llmfirst_kit.settings.Settings``,
which the server's ``ServerConfig`` extends): read when asked, an argument winning over the environment, a bad
value refused naming the variable and what it takes. No module reads an ``LLMFIRST_`` variable by hand."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import llmfirst_kit
from llmfirst_kit._fs import cache_dir
from llmfirst_kit.backends.embedded import EmbeddedBackend
from llmfirst_kit.errors import InvalidInput
from llmfirst_kit.serve import ServerConfig
from llmfirst_kit.settings import Settings, settings

PACKAGE = Path(llmfirst_kit.__file__).parent


def test_the_environment_is_read_when_asked_and_an_argument_wins(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMFIRST_PARALLEL", "3")
    monkeypatch.setenv("LLMFIRST_MAX_QUEUE", "")  # empty: unset
    monkeypatch.setenv("LLMFIRST_CACHE", str(tmp_path / "kit"))
    assert (settings().parallel, settings().max_queue) == (3, 64)
    assert cache_dir() == tmp_path / "kit" and cache_dir().is_dir()
    backend = EmbeddedBackend(max_queue=2)
    assert (backend.parallel, backend.max_queue) == (3, 2)
    assert EmbeddedBackend(parallel=5).parallel == 5
    server = ServerConfig(max_queue=7, parallel=None)  # the server's settings extend the kit's; None: not given
    assert (server.parallel, server.max_queue) == (3, 7)


@pytest.mark.parametrize("env, value, says", [
    ("LLMFIRST_PARALLEL", "0", "is not a whole number of at least 1"),
    ("LLMFIRST_MAX_QUEUE", "many", "is not a whole number"),
    ("LLMFIRST_READ_TIMEOUT", "-1", "is not a number of seconds"),
    ("LLMFIRST_ENGINE", "turbo", "is not one of: auto, safe, fast"),
    ("LLMFIRST_IDLE_TIMEOUT_S", "soon", "is not accepted"),
])
def test_a_bad_value_is_refused_naming_the_variable_and_the_fix(monkeypatch, env, value, says):
    monkeypatch.setenv(env, value)
    model = ServerConfig if env == "LLMFIRST_IDLE_TIMEOUT_S" else Settings
    with pytest.raises(InvalidInput, match=re.escape(f"{env}={value!r} {says}")) as info:
        model()
    assert "change it, or unset it" in str(info.value)
    monkeypatch.delenv(env)
    model()  # unset: the default again


def test_no_module_reads_an_llmfirst_variable_by_hand():
    readers = []
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        if path.name != "settings.py" and re.search(r"environ(\.get)?[\[(]\s*[\"']LLMFIRST_|getenv\([\"']LLMFIRST_",
                                                     text):
            readers.append(str(path.relative_to(PACKAGE)))
    assert readers == []
    fields = set(ServerConfig.model_fields)
    assert {"cache", "engine", "parallel", "max_queue", "read_timeout", "connect_timeout", "token"} <= fields
