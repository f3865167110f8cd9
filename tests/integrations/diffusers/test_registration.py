"""Registration with diffusers: idempotent, the autoload hook on ``diffusers.quantizers.auto``
(run in a fresh interpreter, where the hook fires while diffusers is still importing), and
``DiffusionPipeline.enable_quant`` appearing once registered."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import pytest

diffusers = pytest.importorskip("diffusers")

from piecewise_quant.integrations import diffusers as pqd  # noqa: E402


def test_register_is_idempotent_and_reversible():
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline
    from diffusers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    pqd.register_with_diffusers()
    pqd.register_with_diffusers()
    assert pqd.is_registered()
    assert AUTO_QUANTIZER_MAPPING["piecewise"] is pqd.PiecewiseDiffusersQuantizer
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["piecewise"] is pqd.PiecewiseDiffusersConfig
    assert DiffusionPipeline.enable_quant._piecewise_quant
    assert "enable_quant(pipe, config" in DiffusionPipeline.enable_quant.__doc__
    try:
        pqd.unregister_from_diffusers()
        assert not pqd.is_registered() and not hasattr(DiffusionPipeline, "enable_quant")
    finally:
        pqd.register_with_diffusers()
    assert pqd.is_registered() and hasattr(DiffusionPipeline, "enable_quant")


def test_config_signature_matches_transformers_for_pipeline_backend():
    import inspect

    transformers = pytest.importorskip("transformers")  # noqa: F841
    from piecewise_quant.integrations.transformers import PiecewiseHfConfig

    names = lambda cls: [p for p in inspect.signature(cls.__init__).parameters if p != "self"]  # noqa: E731
    assert names(pqd.PiecewiseDiffusersConfig) == names(PiecewiseHfConfig)


@pytest.mark.slow
def test_autoload_hook_registers_in_a_fresh_interpreter():
    """PYTHONPATH unchanged; the hook is installed the way the wheel's .pth does it."""
    code = (
        "import piecewise_quant._autoload\n"
        "from diffusers import DiTPipeline, DiffusionPipeline\n"
        "from diffusers.quantizers.auto import AUTO_QUANTIZER_MAPPING\n"

        "assert type(AUTO_QUANTIZER_MAPPING['piecewise']).__name__ in ('ABCMeta', 'type'), AUTO_QUANTIZER_MAPPING\n"
        "assert AUTO_QUANTIZER_MAPPING['piecewise'].__name__ == 'PiecewiseDiffusersQuantizer'\n"
        "assert callable(DiffusionPipeline.enable_quant) and callable(DiTPipeline.disable_quant)\n"
        "from diffusers.quantizers import PipelineQuantizationConfig\n"
        "PipelineQuantizationConfig(quant_backend='piecewise', quant_kwargs={'bits': 4})\n"
        "print('ok')\n"
    )
    env = dict(os.environ)
    env.pop("PIECEWISE_QUANT_NO_AUTOLOAD", None)
    env.update({"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    with tempfile.TemporaryDirectory(prefix="pq_df_cwd_") as cwd:  # not the repo root: kernels/ would shadow `kernels`
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok")
