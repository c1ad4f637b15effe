"""llmfirst_kit: streaming LLM-first pipelines with exact latency metrics, for Jupyter and studies."""

__version__ = "0.1.0"
