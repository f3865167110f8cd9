"""piecewise-quant as an optimum ``OptimumQuantizer``.

.. code-block:: python

    from piecewise_quant.integrations.optimum import PiecewiseQuantizer

    quantizer = PiecewiseQuantizer.from_pretrained("assets/tiny-llama-pydoc", bits=4, group_size=128)
    path = quantizer.quantize("out/pw4")      # a Hugging Face checkpoint: reload with from_pretrained

``optimum.quantization_base.OptimumQuantizer`` is a bare ABC (``from_pretrained`` and
``quantize``); nothing in optimum dispatches over it, so this class is the whole integration.
The command-line counterpart is ``optimum-cli piecewise quantize`` (``integrations/optimum_register``).
This module is a plain module, not a package, so it cannot shadow optimum's namespace.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from optimum.quantization_base import OptimumQuantizer

__all__ = ["PiecewiseQuantizer"]


class PiecewiseQuantizer(OptimumQuantizer):
    """Quantize a Hugging Face causal LM with piecewise-quant and save it with ``save_pretrained``.

    Build it with :meth:`from_pretrained`; :meth:`quantize` loads (or copies nothing: quantizes the
    given model in place), quantizes and saves, and returns the save directory.
    """

    def __init__(self, model_or_path, config, tokenizer=None):
        self.model_or_path = model_or_path
        self.config = config
        self.tokenizer = tokenizer
        self.model = None  # the quantized model, after quantize()

    @classmethod
    def from_pretrained(cls, model_or_path: str | Path | Any, file_name: str | None = None, *,
                        config=None, tokenizer=None, **quant_kwargs) -> "PiecewiseQuantizer":
        """``model_or_path``: a Hugging Face model directory, or a float model (``nn.Module``, quantized
        in place by :meth:`quantize`). ``config``: a ``PiecewiseQuantConfig``, or instead its fields as
        keyword arguments (``bits=3, grid="uniform", group_size=64, act_bits=8, calibration="gptq"``...).

        Raises ``FileNotFoundError`` for a missing directory, ``ValueError`` for a directory without
        ``config.json``, an unknown option or a configuration the grid cannot represent.
        """
        import piecewise_quant as pq

        if file_name is not None:
            raise ValueError("file_name is not supported: a piecewise-quant checkpoint is a whole Hugging Face directory")
        if isinstance(model_or_path, (str, Path)):
            path = Path(model_or_path)
            if not path.exists():
                raise FileNotFoundError(f"{path}: no such directory")
            if not path.is_dir() or not (path / "config.json").is_file():
                raise ValueError(f"{path}: not a Hugging Face model directory (no config.json)")
            model_or_path = path
        elif not callable(getattr(model_or_path, "save_pretrained", None)):
            raise TypeError(f"model_or_path must be a directory or a Hugging Face model, got {type(model_or_path).__name__}")
        if config is not None and quant_kwargs:
            raise ValueError(f"pass either config or its fields as keyword arguments, not both: {sorted(quant_kwargs)}")
        if config is None:
            try:
                config = pq.PiecewiseQuantConfig(**quant_kwargs)
            except TypeError as exc:
                raise ValueError(f"unknown PiecewiseQuantConfig option: {exc}") from None
        elif not isinstance(config, pq.PiecewiseQuantConfig):
            raise TypeError(f"config must be a PiecewiseQuantConfig, got {type(config).__name__}")
        pq.get_format(config.grid).validate(config.default_spec)  # bits the grid lacks, before loading
        return cls(model_or_path, config, tokenizer=tokenizer)

    def quantize(self, save_dir: str | Path, file_prefix: str | None = None, *, calibration_data: Any = None,
                 overwrite: bool = False, progress: bool = True, **kwargs) -> Path:
        """Quantize and save model (+ tokenizer, when the source directory has one) to ``save_dir``;
        returns ``save_dir`` as a ``Path``. Data-free unless the config has a ``calibration`` recipe
        or ``calibration_data`` (text, token ids, ...; see ``piecewise_quant.calibrate``) is given.
        The quantized model stays available as ``self.model``."""
        import torch

        import piecewise_quant as pq

        if file_prefix is not None:
            raise ValueError("file_prefix is not supported: the checkpoint keeps Hugging Face file names so it reloads")
        if kwargs:
            raise TypeError(f"unexpected keyword arguments: {sorted(kwargs)}")
        save_dir = Path(save_dir)
        if save_dir.exists() and not save_dir.is_dir():
            raise ValueError(f"{save_dir}: exists and is not a directory")
        if save_dir.is_dir() and any(save_dir.iterdir()) and not overwrite:
            raise ValueError(f"{save_dir}: exists and is not empty (pass overwrite=True to write into it)")
        if self.model is not None:
            raise RuntimeError("this quantizer already quantized its model; build a new one with from_pretrained")

        tokenizer = self.tokenizer
        if isinstance(self.model_or_path, Path):
            if save_dir.resolve() == self.model_or_path.resolve():
                raise ValueError("save_dir must differ from the model directory")
            from transformers import AutoModelForCausalLM, AutoTokenizer

            model = AutoModelForCausalLM.from_pretrained(self.model_or_path, dtype=torch.float32).eval()
            if tokenizer is None:
                try:
                    tokenizer = AutoTokenizer.from_pretrained(self.model_or_path)
                except (OSError, ValueError):
                    tokenizer = None
        else:
            model = self.model_or_path
        if self.config.calibration is not None or calibration_data is not None:
            pq.calibrate(model, self.config, data=calibration_data, tokenizer=tokenizer, progress=progress)
        else:
            pq.quantize(model, self.config, progress=progress)
        save_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(save_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(save_dir)
        self.model = model
        return save_dir
