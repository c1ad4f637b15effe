"""The ``llmfirst`` command, run in-process (so the model stays loaded) on the real embedded model."""

from __future__ import annotations

import asyncio
import json

import pytest

from llmfirst_kit.cli import EXIT_BAD_INPUT, EXIT_OK, main
from llmfirst_kit.cli.ask import metrics_line, summary
from llmfirst_kit.metrics import SLO, call_metrics, run_metrics
from llmfirst_kit.pipeline import Pipeline
from llmfirst_kit.compliance import Transcript, sink_compliance
from llmfirst_kit.records import CallRecord, RunRecord
from llmfirst_kit.sinks.jsonl import read_log

from conftest import TEST_MODEL

ASK = ["ask", "Name a primary color.", "--model", TEST_MODEL, "--max-tokens", "16"]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_ask_streams_text_then_one_metrics_line(capsys, tmp_path):
    log = tmp_path / "runs.jsonl"
    code, out, err = run_cli(capsys, *ASK, "--log", str(log))
    assert code == EXIT_OK
    assert out.strip()  # the model's text, on stdout only
    [line] = [ln for ln in err.splitlines() if ln.startswith("status=")]
    assert "ttft=" in line and "tpot=" in line and "echo=" in line and "decisions=n/a" in line
    call, rec = read_log(log)  # the model call as it ended, then the run
    assert isinstance(rec, RunRecord) and rec.stages[0].call.text.strip() == out.strip()
    # the printed figure is the one of stdout as captured here, against the run's record
    captured = Transcript("stdout")
    captured.content("answer", out)
    assert f"compliance={sink_compliance(rec, captured).compliance:.3f}" in line
    assert isinstance(call, CallRecord) and call.run_id == rec.run_id and call.text == rec.stages[0].call.text


def test_ask_staged_keeps_each_stage_apart_on_stdout(capsys, tmp_path):
    log = tmp_path / "runs.jsonl"
    code, out, err = run_cli(capsys, "ask", "What is rain?", "--model", TEST_MODEL, "--max-tokens", "24",
                             "--preset", "staged", "--log", str(log))
    assert code == EXIT_OK
    rec = read_log(log)[-1]
    visible = [s for s in rec.stages if s.visible]
    assert [s.name for s in visible] == rec.decisions["strategy"].plan["runs"]  # the model's plan
    assert out == "\n\n".join(s.call.text for s in visible) + "\n"  # blank lines between, nothing else
    labels = [err.index(f"[{s.name}]") for s in visible]
    assert labels == sorted(labels) and "[decision strategy" in err
    # the decision as the model made it: calibrated, with the raw probabilities and the prior it was divided by
    decided = rec.decisions["strategy"].value["strategy"]
    assert f'[decision strategy: {{"strategy": "{decided}"}} (calibrated: the model\'s next-token probabilities' in err
    assert "divided by its prior on 12 other queries" in err


def test_ask_json_has_the_documented_fields(capsys):
    code, out, _ = run_cli(capsys, *ASK, "--json")
    assert code == EXIT_OK
    data = json.loads(out)
    for key in ("status", "text", "model", "backend", "ttft_s", "e2e_s", "tpot_s", "output_tokens",
                "prompt_tokens", "tokens_per_s", "token_count_source", "slo", "preset", "user_ttft_s",
                "compliance", "decisions", "quality", "stages"):
        assert key in data, key
    assert data["status"] == "ok" and data["model"] == TEST_MODEL and data["backend"] == "embedded"
    assert set(data["slo"]) == {"ttft", "tpot", "e2e"} and all(isinstance(v, bool) for v in data["slo"].values())
    assert 0 < data["output_tokens"] <= 16 and data["prompt_tokens"] > 0
    assert data["ttft_s"] <= data["e2e_s"] and data["quality"] is None
    # the JSON object is the sink: its figure is that of its own text against the run (recomputed here)
    assert data["sink"]["sink"] == "json" and data["sink"]["content_chars"] == len("".join(data["text"].split()))
    assert data["compliance"] == data["sink"]["model_chars"] / data["sink"]["content_chars"]
    assert data["token_count_source"].startswith("llama.cpp tokenizer")
    [stage] = data["stages"]
    assert stage["name"] == "answer" and stage["visible"] and stage["text"] == data["text"]


def test_ask_staged_with_review_json(capsys):
    code, out, _ = run_cli(capsys, "ask", "What is rain?", "--model", TEST_MODEL, "--max-tokens", "24",
                           "--preset", "staged", "--review", "--json")
    assert code == EXIT_OK
    data = json.loads(out)
    plan = data["decisions"]["strategy"]["plan"]["runs"]
    assert data["preset"] == "staged" and data["sink"]["stages"].keys() == {n for n in plan if n != "review"}
    assert data["decision_compliance"] == (data["decisions"]["strategy"]["status"] == "decided"
                                           ) * 0.5 + (data["decisions"]["quality"]["status"] == "decided") * 0.5
    assert [s["name"] for s in data["stages"] if not s["name"].endswith(".retry")] == ["strategy", *plan]
    assert plan[-2:] == ["answer", "review"] and data["decisions"]["strategy"]["method"] == "next-token choice"
    assert data["decisions"]["strategy"]["status"] in ("decided", "undecided")
    assert data["quality"] is None or 0 <= data["quality"] <= 100
    for s in data["stages"]:
        assert {"name", "model", "text", "visible", "ttft_s", "tpot_s", "e2e_s", "output_tokens"} <= set(s)


def test_ask_slo_verdict_is_the_users_wait_not_the_answer_calls(backend):
    # A staged run's answer call starts after the invisible decision: an SLO between the answer call's TTFT and
    # the user-visible TTFT is met by the call and missed by the run, and the verdict shown is the run's.
    pipe = Pipeline.from_preset("staged", backend=backend, model=TEST_MODEL, max_tokens=16)
    rec = asyncio.run(pipe.run("What is rain?"))
    answer = [s for s in rec.stages if s.visible][-1].call
    call_ttft, user = call_metrics(answer).ttft_s, run_metrics(rec).user_ttft_s
    assert call_ttft < user
    pipe.slo = SLO(ttft_s=(call_ttft + user) / 2, tpot_s=10.0, e2e_s=600.0)
    assert call_metrics(answer, pipe.slo).slo.ttft is True
    data = summary(rec, pipe)
    assert data["slo"] == {"ttft": False, "tpot": True, "e2e": True} and "ttft:MISS" in metrics_line(data)
    pipe.slo = SLO(ttft_s=user + 1.0, tpot_s=10.0, e2e_s=600.0)
    assert summary(rec, pipe)["slo"]["ttft"] is True


@pytest.mark.parametrize("argv,needle", [
    (["ask", "   "], "empty"),
    (["ask", "hi", "--model", "nope"], "known: gemma3-270m, qwen2.5-coder-0.5b, qwen2.5-coder-1.5b, smollm2-135m"),
    (["ask", "hi", "--backend", "carrier-pigeon"], "known: embedded, ollama"),
    (["ask", "hi", "--preset", "turbo"], "known: bare, direct, staged, staged:analysis-first, cascade"),
    (["ask", "x " * 5000, "--model", TEST_MODEL], "the context of smollm2-135m is 4096"),
])
def test_bad_input_exits_2_with_the_fix(capsys, argv, needle):
    code, out, err = run_cli(capsys, *argv)
    assert code == EXIT_BAD_INPUT
    assert needle in err and out.strip() == ""


@pytest.mark.parametrize("value", ["0", "-3", "many"])
def test_bad_max_tokens_is_rejected_by_the_parser(capsys, value):
    with pytest.raises(SystemExit) as exc:
        main(["ask", "hi", "--max-tokens", value])
    assert exc.value.code == 2
    assert "positive integer" in capsys.readouterr().err


def test_models_json_lists_the_registry(capsys):
    code, out, _ = run_cli(capsys, "models", "--json")
    assert code == EXIT_OK
    rows = {r["name"]: r for r in json.loads(out)}
    assert set(rows) == {"qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", "smollm2-135m", "gemma3-270m"}
    assert rows["smollm2-135m"]["installed"] and rows["smollm2-135m"]["verified"]
    assert rows["gemma3-270m"]["instruct"] is False and rows["gemma3-270m"]["chat_format"] == "gemma"


def test_bench_overhead_json_smoke(capsys):
    code, out, _ = run_cli(capsys, "bench", "overhead", "--model", TEST_MODEL, "--runs", "2", "--max-tokens", "24",
                           "--json")
    assert code == EXIT_OK
    data = json.loads(out)
    assert data["runs"] == 2 and data["throughput_ratio"] > 0 and "ttft_added_ms" in data
    assert data["same_text"] is True  # greedy on both sides: the same tokens
    assert data["kit_output_tokens"] == [24, 24]
