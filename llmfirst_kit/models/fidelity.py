"""Objective quality of a model file: perplexity on a text, and KL divergence against a reference file.

Both come from llama.cpp's next-token logits (``Llama(logits_all=True)``, one ``eval`` of the text): no
sampling, no judge, so two files can be compared exactly.

- perplexity: ``exp(mean(-log p(token[i+1] | tokens[..i])))`` over the first ``n_tokens`` tokens of the text
  (one window, scored from its second token, BOS included where the model adds one);
- KL: ``mean_i KL(P_ref(. | tokens[..i]) || P(. | tokens[..i]))`` in nats, over the same positions and the
  reference model's tokens (a quantized variant shares its source's tokenizer), plus how often both
  files put the same token first (``top1_agreement``).

The reference of a variant is the *shipped* file, itself already quantized: KL measures what the
re-quantization lost on top of it, not the distance to a 16-bit original (none is shipped).

The judge (LLM-judged answers) lives in ``llmfirst_kit.quality``; this module is only about the file.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..engine import default_threads, new_llama
from ..errors import InvalidInput
from .variants import resolve

DEFAULT_TOKENS = 256


@dataclass(frozen=True)
class Logits:
    """Log-probabilities of the next token at each position of a text, from one model file."""

    model: str
    sha256: str
    tokens: list[int]
    logprobs: np.ndarray  # shape (len(tokens), n_vocab), float32: row i is p(. | tokens[..i])


@dataclass(frozen=True)
class FileQuality:
    """Perplexity (and KL against ``reference`` if one was given) of one model file on one text."""

    model: str
    sha256: str
    text: str
    tokens: int
    perplexity: float
    reference: str | None = None
    reference_sha256: str | None = None
    reference_perplexity: float | None = None
    kl_mean: float | None = None
    kl_p99: float | None = None
    kl_max: float | None = None
    top1_agreement: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_text(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise InvalidInput(f"text file {str(path)!r} does not exist; pass a UTF-8 text file (see "
                           f"llmfirst_kit/assets/text/)")
    text = path.read_text(encoding="utf-8").strip()
    if not text:
        raise InvalidInput(f"text file {str(path)!r} is empty")
    return text


def logits(model: str, text: str, *, n_tokens: int = DEFAULT_TOKENS, tokens: list[int] | None = None,
           n_threads: int | None = None) -> Logits:
    """Evaluate the first ``n_tokens`` tokens of ``text`` (or the given ``tokens``) in one pass.

    A fresh ``Llama`` with ``logits_all=True`` is loaded for this and closed after: the backend's shared
    instance keeps only the last position's logits."""
    if not isinstance(n_tokens, int) or n_tokens < 2:
        raise InvalidInput(f"n_tokens must be an integer >= 2, got {n_tokens!r}")
    resolved = resolve(model)
    n_threads = n_threads or default_threads()
    size = len(tokens) if tokens is not None else n_tokens + 8
    llm = new_llama(str(resolved.path), n_ctx=size, n_batch=size, n_ubatch=size, n_threads=n_threads,
                    n_threads_batch=n_threads, logits_all=True)
    try:
        if tokens is None:
            tokens = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)[:n_tokens]
        if len(tokens) < 2:
            raise InvalidInput("the text is shorter than two tokens; use a longer text")
        llm.reset()
        llm.eval(tokens)
        scores = np.array(llm.scores[: len(tokens)], dtype=np.float32)
    finally:
        llm.close()
    return Logits(model=resolved.name, sha256=resolved.sha256, tokens=list(tokens), logprobs=_log_softmax(scores))


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def perplexity(lg: Logits) -> float:
    """exp of the mean negative log-likelihood of each next token (positions 0..n-2 predict 1..n-1)."""
    nll = -lg.logprobs[np.arange(len(lg.tokens) - 1), lg.tokens[1:]]
    return float(np.exp(nll.astype(np.float64).mean()))


def kl_divergence(reference: Logits, candidate: Logits) -> dict[str, float]:
    """Per-position KL(P_ref || P_candidate) in nats over the predicting positions, summarised."""
    if reference.tokens != candidate.tokens:
        raise InvalidInput("KL needs both files evaluated on the same tokens; pass tokens=reference.tokens")
    if reference.logprobs.shape != candidate.logprobs.shape:
        raise InvalidInput(f"{reference.model} and {candidate.model} have different vocabularies "
                           f"({reference.logprobs.shape[1]} vs {candidate.logprobs.shape[1]}); KL needs the same one")
    n = len(reference.tokens) - 1
    kl = np.empty(n, dtype=np.float64)
    for start in range(0, n, 64):  # in blocks: exp() of the whole matrix would double the memory
        stop = min(start + 64, n)
        p, q = reference.logprobs[start:stop], candidate.logprobs[start:stop]
        kl[start:stop] = (np.exp(p) * (p - q)).sum(axis=1)
    kl = np.clip(kl, 0.0, None)  # float rounding can leave -1e-7 where the distributions are equal
    top1 = reference.logprobs[:n].argmax(axis=1) == candidate.logprobs[:n].argmax(axis=1)
    return {"kl_mean": float(kl.mean()), "kl_p99": float(np.quantile(kl, 0.99)), "kl_max": float(kl.max()),
            "top1_agreement": float(top1.mean())}


def measure(model: str, text_path: str | Path, *, reference: str | None = None, n_tokens: int = DEFAULT_TOKENS,
            n_threads: int | None = None) -> FileQuality:
    """Perplexity of ``model`` on the text, and its KL against ``reference`` (e.g. the shipped file) when
    given. The text is tokenized by the reference (or the model) and both files see the same tokens."""
    text = read_text(text_path)
    if reference is None:
        lg = logits(model, text, n_tokens=n_tokens, n_threads=n_threads)
        return FileQuality(model=lg.model, sha256=lg.sha256, text=str(text_path), tokens=len(lg.tokens),
                           perplexity=perplexity(lg))
    ref = logits(reference, text, n_tokens=n_tokens, n_threads=n_threads)
    cand = logits(model, text, tokens=ref.tokens, n_threads=n_threads)
    return FileQuality(model=cand.model, sha256=cand.sha256, text=str(text_path), tokens=len(ref.tokens),
                       perplexity=perplexity(cand), reference=ref.model, reference_sha256=ref.sha256,
                       reference_perplexity=perplexity(ref), **kl_divergence(ref, cand))


__all__ = ["Logits", "FileQuality", "logits", "perplexity", "kl_divergence", "measure", "read_text"]
