"""Files the kit reads at run time, shipped as package data (``pyproject.toml``) and read through
:mod:`llmfirst_kit.data`: the study notebooks, the study queries and the perplexity texts (``README.md``
here describes them)."""
