"""The ``.pth`` import hook (``piecewise_quant._autoload``) and explicit registration."""

from __future__ import annotations

import importlib
import inspect
import sys
import textwrap
import uuid
import warnings

import pytest

from piecewise_quant import _autoload

transformers = pytest.importorskip("transformers")


# ---- the hook mechanics, on a throw-away package ----------------------------------------------


@pytest.fixture
def probe(tmp_path, monkeypatch):
    """A package ``<pkg>`` with a module ``<pkg>.auto`` (defines ``VALUE``), and a target module whose
    ``register()`` records what it saw; ``_autoload.HOOKS`` maps the first to the second."""
    pkg = f"pq_probe_{uuid.uuid4().hex[:8]}"
    target = f"{pkg}_target"
    (tmp_path / pkg).mkdir()
    (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / pkg / "auto.py").write_text("VALUE = 42\n\n\ndef f():\n    return VALUE\n")
    (tmp_path / f"{target}.py").write_text(
        textwrap.dedent(
            """
            import sys
            calls = []
            fail = False

            def register():
                if fail:
                    raise RuntimeError("boom")
                calls.append(sys.modules[__name__.replace("_target", "") + ".auto"].VALUE)
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(_autoload.HOOKS, f"{pkg}.auto", (target, "register"))
    yield pkg, target
    for name in [m for m in sys.modules if m.startswith(pkg)]:
        del sys.modules[name]


def test_hook_is_installed_at_interpreter_start():
    assert _autoload.is_installed(), (
        "piecewise_quant_autoload.pth is not in site-packages (or PIECEWISE_QUANT_NO_AUTOLOAD is set)"
    )
    assert "transformers.quantizers.auto" in _autoload.HOOKS


def test_hook_runs_after_the_module_executed(probe):
    pkg, target = probe
    module = importlib.import_module(f"{pkg}.auto")
    calls = sys.modules[target].calls
    assert calls == [42]  # registration saw the fully executed module
    assert "return VALUE" in inspect.getsource(module.f)  # the wrapped loader still serves sources
    importlib.reload(module)  # a re-import registers again (registration is idempotent)
    assert calls == [42, 42]


def test_a_failing_registration_warns_and_never_breaks_the_import(probe):
    pkg, target = probe
    importlib.import_module(target).fail = True
    with pytest.warns(RuntimeWarning, match="could not register"):
        module = importlib.import_module(f"{pkg}.auto")
    assert module.VALUE == 42


def test_env_var_disables_the_hook(probe, monkeypatch):
    pkg, target = probe
    monkeypatch.setenv(_autoload.ENV_NO_AUTOLOAD, "1")
    importlib.import_module(f"{pkg}.auto")
    assert importlib.import_module(target).calls == []
    assert _autoload.install() is False


# ---- registration with transformers ---------------------------------------------------------------


def test_register_with_transformers_is_idempotent():
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    from piecewise_quant.integrations.transformers import (
        PiecewiseHfConfig,
        PiecewiseHfQuantizer,
        is_registered,
        register_with_transformers,
    )

    assert is_registered()  # done by the hook when transformers was imported
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        register_with_transformers()
        register_with_transformers()
    assert AUTO_QUANTIZER_MAPPING["piecewise"] is PiecewiseHfQuantizer
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["piecewise"] is PiecewiseHfConfig


def test_builtin_plugin_registers_through_the_integration_hook():
    from piecewise_quant.integrations.transformers import is_registered, unregister_from_transformers
    from piecewise_quant.registry import integrations

    unregister_from_transformers()
    assert not is_registered()
    integrations()["transformers"]()
    assert is_registered()


def test_a_foreign_piecewise_registration_is_replaced_with_a_warning(monkeypatch):
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
    from transformers.quantizers.base import HfQuantizer

    from piecewise_quant.integrations.transformers import is_registered, register_with_transformers

    class Foreign(HfQuantizer):
        pass

    monkeypatch.setitem(AUTO_QUANTIZER_MAPPING, "piecewise", Foreign)
    assert not is_registered()
    with pytest.warns(RuntimeWarning, match="replaces it"):
        register_with_transformers()
    assert is_registered()


# ---- fresh interpreters ---------------------------------------------------------------------------


def test_importing_the_integration_first_still_registers(tfh):
    """Importing ``...transformers.quantizer`` imports transformers, which fires the hook while the
    integration is half-imported: registration is deferred to the end of that import."""
    code = textwrap.dedent(
        """
        import warnings
        warnings.simplefilter("error", RuntimeWarning)
        import sys
        assert "transformers" not in sys.modules
        from piecewise_quant.integrations.transformers.quantizer import PiecewiseHfQuantizer
        from piecewise_quant.integrations.transformers import is_registered
        from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
        assert is_registered() and AUTO_QUANTIZER_MAPPING["piecewise"] is PiecewiseHfQuantizer
        print("DEFERRED-OK")
        """
    )
    proc = tfh.run_python(code)
    assert proc.returncode == 0 and "DEFERRED-OK" in proc.stdout, proc.stdout + proc.stderr


def test_no_autoload_env_var(piecewise_saved, tfh):
    """With PIECEWISE_QUANT_NO_AUTOLOAD=1 nothing is registered, and transformers would load the
    checkpoint as a FLOAT model (packed tensors unexpected, float weights randomly initialised).
    The load guard, which stays installed, refuses that load; explicit registration then makes the
    same load work."""
    code = textwrap.dedent(
        f"""
        import sys, torch
        from piecewise_quant import _autoload
        assert _autoload.is_disabled()
        from transformers import AutoModelForCausalLM
        from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, AUTO_QUANTIZATION_CONFIG_MAPPING
        assert "piecewise" not in AUTO_QUANTIZER_MAPPING and "piecewise" not in AUTO_QUANTIZATION_CONFIG_MAPPING
        from piecewise_quant.checkpoint import CheckpointMismatchError
        try:
            AutoModelForCausalLM.from_pretrained({str(piecewise_saved)!r})
        except CheckpointMismatchError as exc:
            assert "PIECEWISE_QUANT_NO_AUTOLOAD" in str(exc), exc
            print("FLOAT-LOAD-REFUSED", flush=True)

        from piecewise_quant.integrations.transformers import register_with_transformers
        register_with_transformers()
        model = AutoModelForCausalLM.from_pretrained({str(piecewise_saved)!r})
        assert type(model.model.layers[0].self_attn.q_proj).__name__ == "QuantLinear"
        data = torch.load({str(piecewise_saved / "logits.pt")!r})
        with torch.no_grad():
            assert torch.equal(model(data["ids"]).logits, data["logits"])
        print("EXPLICIT-OK")
        """
    )
    proc = tfh.run_python(code, env_extra={"PIECEWISE_QUANT_NO_AUTOLOAD": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FLOAT-LOAD-REFUSED" in proc.stdout and "EXPLICIT-OK" in proc.stdout
