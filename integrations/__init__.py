"""piecewise_quant.integrations: adapters into transformers (and, later, diffusers, vLLM, PEFT,
optimum). Each imports its host framework lazily and registers idempotently."""

if __name__ != "piecewise_quant.integrations":
    raise ImportError(
        f"the folder 'integrations/' must be imported as 'piecewise_quant.integrations', not {__name__!r}; "
        "install the package (pip install -e .) and run pytest with --import-mode=importlib"
    )
