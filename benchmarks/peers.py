"""Existing quantization toolkits ("peers") run on the same model and data as the benchmarks.

Importable from the other benchmark scripts (``sys.path.insert(0, "benchmarks")`` then
``from peers import available_peers, run_peer``). Each peer quantizes the model **in place** with
the peer toolkit's own public API, on CPU, and its layers run the peer's own CPU code path at
evaluation time (no re-implementation of the peer's arithmetic here). Layers quantized: every
``torch.nn.Linear`` except the output embedding (``lm_head`` of a causal LM stays float); for
all-MiniLM-L6-v2 loaded without the pooler that is every Linear layer of the encoder.

Peers (keys of :func:`available_peers`):

* ``quanto``: optimum-quanto weight-only ``qint{2,4}`` (asymmetric min/max round-to-nearest,
  float scale and float shift per group of ``group_size`` input weights; ``qint8`` for 8 bits is
  symmetric per output channel). Scales and shifts have the model's dtype (float32 here).
* ``torchao``: torchao ``IntxWeightOnlyConfig(int{bits}, PerGroup(group_size), ASYMMETRIC)``
  (min/max RTN, float scale + int8 zero point per group). torchao's ``Int4WeightOnlyConfig`` does
  not run on CPU in 0.18: ``plain`` and ``preshuffled`` need the ``mslk`` kernels,
  ``tile_packed_to_4d`` needs bfloat16 and CUDA, ``plain_int32`` has no CPU support; the intx
  tensor is torchao's CPU path (codes held unpacked in int8, dequantize + matmul). ``torchao-sym``: the same with
  ``MappingType.SYMMETRIC`` (torchao's default).
* ``quanto-w8a8``: optimum-quanto ``qint8`` weights (symmetric, per output channel) + ``qint8``
  activations (static per-tensor scales of every quantized Linear's input and output, calibrated
  with ``optimum.quanto.Calibration`` on ``calib_ids``).
* ``torchao-w8a8``: torchao ``Int8DynamicActivationInt8WeightConfig`` (int8 per-channel symmetric
  weights, dynamic per-token symmetric int8 activations; no calibration).
* ``auto-round``: Intel auto-round ``AutoRound(scheme="W4A16")`` (symmetric int, group
  ``group_size``, float16 scales), SignRound (200 iterations of signed-gradient tuning of the
  rounding and clipping, block by block, on ``calib_ids``): the data-driven peer, in the role GPTQ
  would have. ``auto-round-rtn``: the same toolkit with ``iters=0`` (its "optimized RTN": scales
  searched with an importance matrix from ``calib_ids``). **Simulated**: after ``quantize()``
  auto-round leaves the quantize-dequantized weights in the float Linear layers (fake
  quantization, float32 compute); its packed export (``auto_round:auto_gptq``: int32-packed
  codes and zero points, float16 scales) reloads on CPU through auto-round's torch backend (in
  float16) with the same perplexity within 0.002 on the tiny Llama. SignRound takes minutes on
  CPU (330 s for the tiny Llama, 710 s for MiniLM with 64 x 256 calibration tokens, one thread).

``bits_per_weight`` is the storage of the peer's tensors (codes at ``bits`` bits each, i.e.
packed, plus every scale / zero-point / shift tensor at its stored dtype), averaged over the
quantized layers weighted by their size; ``memory_bits_per_weight`` is what the tensors occupy
in memory on this CPU path (torchao keeps the int4 codes unpacked in int8 containers). For
auto-round both are the packed export layout (codes and zero points at ``bits`` bits, float16
scales), since its in-memory model is simulated.

llm-compressor (GPTQ ``oneshot``) is not a peer here: every release on the index pins
``transformers<=5.17.0`` (and torch / accelerate bounds), which conflicts with the pinned
transformers 5.19; torchao's GPTQ (``torchao.prototype.gptq``) asserts a CUDA device and needs
``mslk``. :func:`available_peers` lists them with that reason.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata as _md
import importlib.util
import logging
import time
from typing import Any, Callable

import torch

__all__ = ["PEERS", "available_peers", "run_peer", "calibration_ids", "target_linears", "peer_version"]

# peer key -> (distribution name, import name, pip requirement, description template)
PEERS: dict[str, dict[str, str]] = {
    "quanto": {
        "dist": "optimum-quanto",
        "module": "optimum.quanto",
        "pip": "optimum-quanto==0.2.7",
        "label": "optimum-quanto {version} qint{bits} weight-only g{group} (RTN min/max, float scale+shift)",
    },
    "torchao": {
        "dist": "torchao",
        "module": "torchao",
        "pip": "torchao==0.18.0",
        "label": "torchao {version} IntxWeightOnly int{bits} g{group} asym (RTN min/max; int8-held codes on CPU)",
    },
    "torchao-sym": {
        "dist": "torchao",
        "module": "torchao",
        "pip": "torchao==0.18.0",
        "label": "torchao {version} IntxWeightOnly int{bits} g{group} sym (RTN absmax; int8-held codes on CPU)",
    },
    "quanto-w8a8": {
        "dist": "optimum-quanto",
        "module": "optimum.quanto",
        "pip": "optimum-quanto==0.2.7",
        "label": "optimum-quanto {version} W8A8 (qint8 per-channel weights, static per-tensor qint8 activations)",
    },
    "torchao-w8a8": {
        "dist": "torchao",
        "module": "torchao",
        "pip": "torchao==0.18.0",
        "label": "torchao {version} Int8DynamicActivationInt8Weight (W8A8, dynamic per-token activations)",
    },
    "auto-round": {
        "dist": "auto-round",
        "module": "auto_round",
        "pip": "auto-round==0.15.1",
        "label": "auto-round {version} W{bits}A16 g{group} sym (SignRound {iters} iters, calibrated; simulated fake-quant)",
    },
    "auto-round-rtn": {
        "dist": "auto-round",
        "module": "auto_round",
        "pip": "auto-round==0.15.1",
        "label": "auto-round {version} W{bits}A16 g{group} sym (optimized RTN, iters=0, calibrated; simulated fake-quant)",
    },
}
AUTO_ROUND_ITERS = 200  # auto-round's default

# toolkits that were considered and cannot be used here (reason shown by available_peers)
UNUSABLE: dict[str, str] = {
    "llmcompressor-gptq": (
        "unavailable: llm-compressor (GPTQ oneshot) cannot be installed next to the pinned versions: every "
        "release pins transformers<=5.17.0 (0.14.0.1: transformers>=5.15,<=5.17.0; 0.13.0: <=5.14.1, "
        "torch<=2.13.0, accelerate<=1.14.0; older: <=5.10.1 / 4.57.6), pinned here: transformers 5.19.0"
    ),
    "torchao-gptq": (
        "unavailable: torchao.prototype.gptq (GPTQConfig) asserts a CUDA device and needs the mslk CUDA kernels"
    ),
}


def peer_version(key: str) -> str | None:
    """Installed version of the peer's distribution, ``None`` when it is not installed."""
    try:
        return _md.version(PEERS[key]["dist"])
    except _md.PackageNotFoundError:
        return None


@contextlib.contextmanager
def _quiet_torchao_import():
    # torchao's __init__ logs a warning for each CUDA-only extension (.so) it cannot load on CPU,
    # and torch's pytree one for each Enum torchao registers as a constant (deprecated in torch 2.13)
    logs = [logging.getLogger("torchao"), logging.getLogger("torch.utils._pytree")]
    old = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for log, level in zip(logs, old):
            log.setLevel(level)


def _import(key: str) -> Any:
    spec = PEERS[key]
    if peer_version(key) is None:
        raise RuntimeError(f"peer {key!r} is not available: {spec['dist']} is not installed (pip install {spec['pip']})")
    try:
        with _quiet_torchao_import():
            return importlib.import_module(spec["module"])
    except Exception as exc:  # noqa: BLE001 - installed but broken: say so
        raise RuntimeError(f"peer {key!r} is not available: importing {spec['module']} failed: {exc}") from exc


def _label(key: str, bits: int = 4, group_size: int = 128, iters: int = AUTO_ROUND_ITERS) -> str:
    if key == "quanto" and bits == 8:
        return f"optimum-quanto {peer_version(key)} qint8 weight-only per-channel (symmetric absmax)"
    return PEERS[key]["label"].format(version=peer_version(key), bits=bits, group=group_size, iters=iters)


def available_peers() -> dict[str, str]:
    """Peer key -> human label (toolkit name + version), or ``"unavailable: <reason>"``."""
    out: dict[str, str] = {}
    for key, spec in PEERS.items():
        if peer_version(key) is None:
            out[key] = f"unavailable: {spec['dist']} is not installed (pip install {spec['pip']})"
            continue
        if key.startswith("auto-round"):
            # importing auto_round (datasets, pandas, ...) takes ~10 s: only check that it is there
            if importlib.util.find_spec(spec["module"]) is None:
                out[key] = f"unavailable: {spec['dist']} is installed but {spec['module']} cannot be found"
                continue
        else:
            try:
                _import(key)
            except RuntimeError as exc:
                out[key] = f"unavailable: {exc}"
                continue
        out[key] = _label(key)
    out.update(UNUSABLE)
    return out


# ---------------------------------------------------------------------------------------------
# shared helpers


def target_linears(model: torch.nn.Module) -> list[str]:
    """Names of the Linear layers a peer quantizes: all but the output embedding (``lm_head``)."""
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = []
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear) or mod is out_emb or name.split(".")[-1] == "lm_head":
            continue
        names.append(name)
    if not names:
        raise RuntimeError("the model has no Linear layers to quantize")
    return names


def calibration_ids(tokenizer: Any, n_samples: int = 64, seq_len: int = 256, seed: int = 0) -> torch.Tensor:
    """``(n_samples, seq_len)`` token ids: the calibration split of the bundled corpus
    (``piecewise_quant.evaluate.calibration_text``), tokenised without special tokens, cut into
    non-overlapping windows, ``n_samples`` of them drawn with ``seed`` (kept in corpus order)."""
    from piecewise_quant.evaluate import calibration_text

    ids = torch.tensor(tokenizer(calibration_text(), add_special_tokens=False)["input_ids"], dtype=torch.long)
    n = ids.numel() // seq_len
    windows = ids[: n * seq_len].reshape(n, seq_len)
    g = torch.Generator().manual_seed(seed)
    return windows[torch.randperm(n, generator=g)[: min(n_samples, n)].sort().values]


def _calib_batches(calib_ids: torch.Tensor | None, batch_size: int = 8) -> list[torch.Tensor]:
    if calib_ids is None:
        raise ValueError("this peer calibrates activation ranges: pass calib_ids (see calibration_ids())")
    ids = calib_ids.to(torch.long)
    if ids.dim() == 1:
        ids = ids.reshape(1, -1)
    return list(ids.split(batch_size))


def _inner_tensors(t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """The plain tensors that store a tensor subclass (recursively through nested subclasses)."""
    if type(t) in (torch.Tensor, torch.nn.Parameter) or not hasattr(t, "__tensor_flatten__"):
        return [("", t)]
    names, _ = t.__tensor_flatten__()
    out = []
    for n in names:
        inner = getattr(t, n)
        if inner is None:
            continue
        out.extend((f"{n}.{sub}" if sub else n, x) for sub, x in _inner_tensors(inner))
    return out


def _storage_bits(weight: torch.Tensor, code_bits: int, code_names: tuple[str, ...]) -> tuple[float, float]:
    """(packed bits, in-memory bits) of one quantized weight: the tensors named in ``code_names``
    are the codes (``code_bits`` per weight when packed), every other stored tensor counts at its
    dtype's size in both."""
    packed = memory = 0.0
    for name, x in _inner_tensors(weight):
        mem = x.numel() * x.element_size() * 8
        memory += mem
        packed += weight.numel() * code_bits if name.split(".")[0] in code_names else mem
    return packed, memory


def _timed(fn: Callable[[], Any], no_grad: bool = True) -> float:
    t0 = time.perf_counter()
    with torch.no_grad() if no_grad else contextlib.nullcontext():
        fn()
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# optimum-quanto


def _run_quanto(model, names, calib_ids, bits: int, group_size: int, w8a8: bool) -> dict:
    q = _import("quanto-w8a8" if w8a8 else "quanto")
    qtypes = {2: q.qint2, 4: q.qint4, 8: q.qint8}
    if w8a8 and bits != 8:
        raise ValueError("quanto-w8a8 is 8-bit (qint8 weights and activations); pass bits=8")
    if bits not in qtypes:
        raise ValueError(f"optimum-quanto has integer weights of 2, 4 or 8 bits, not {bits}")
    notes = []
    group_deviations: dict[str, int | None] = {}
    if bits < 8:
        build_s = _quanto_cpp_extension(q)
        if build_s > 1.0:
            notes.append(f"compiled optimum-quanto's quanto_cpp C++ extension first "
                         f"({build_s:.0f} s, once per install; not in quant_s)")

    def quantize():
        q.quantize(model, weights=qtypes[bits], activations=q.qint8 if w8a8 else None, include=names)
        if bits < 8:
            # quanto picks the group size itself: 128, lowered by 32 until it divides in_features,
            # per output channel when in_features <= 128. Set the requested one where it divides.
            for name in names:
                mod = model.get_submodule(name)
                if mod.in_features % group_size == 0:
                    # one group spanning the row is quanto's per-channel layout
                    mod.weight_group_size = group_size if mod.in_features > group_size else None
                else:
                    group_deviations[name] = mod.weight_group_size
        if w8a8:
            with q.Calibration(momentum=0.9):
                for batch in _calib_batches(calib_ids):
                    model(input_ids=batch)
        q.freeze(model)

    quant_s = _timed(quantize)
    packed = memory = 0.0
    n = 0
    for name in names:
        mod = model.get_submodule(name)
        if not isinstance(mod, q.QModuleMixin) or not isinstance(mod.weight, q.QTensor):
            raise RuntimeError(f"optimum-quanto left {name} unquantized")
        p, m = _storage_bits(mod.weight, bits, ("_data",))
        packed += p
        memory += m
        n += mod.weight.numel()
    if bits < 8:
        notes.append(f"asymmetric min/max RTN per group of {group_size} (quanto MaxOptimizer), scale and shift in "
                     f"{model.get_submodule(names[0]).weight._scale.dtype} (4.25 bpw in a 16-bit model)")
        if group_deviations:
            notes.append(f"{len(group_deviations)} layers with another group size (quanto rule: per-channel when "
                         f"in_features <= 128, else a divisor): {sorted(group_deviations)[:4]}")
    else:
        notes.append("qint8 weights: symmetric absmax per output channel (group_size does not apply)")
    if w8a8:
        notes.append(f"static per-tensor qint8 scales of each quantized Linear's input and output, calibrated on "
                     f"{int(calib_ids.reshape(-1, calib_ids.shape[-1]).shape[0])} sequences (Calibration momentum 0.9); "
                     "quant_s includes the calibration")
    else:
        notes.append("data-free (calib_ids not used)")
    notes.append("CPU path of optimum-quanto (packed codes dequantized in its own ops at each forward)")
    return {"bits_per_weight": packed / n, "memory_bits_per_weight": memory / n, "quant_s": quant_s,
            "notes": "; ".join(notes), "n_layers": len(names), "n_weights": n}


def _quanto_cpp_extension(q: Any) -> float:
    """Load (compiling on first use) optimum-quanto's C++ extension; returns the seconds it took.

    On CPU quanto unpacks int2/int4 codes with ``quanto_cpp``, a ``torch.utils.cpp_extension``
    JIT build (ninja + the system C++ compiler) written into the installed package's
    ``library/extensions/cpp/build`` on first use (about a minute), reused afterwards."""
    from optimum.quanto.library.extensions import get_extension  # noqa: PLC0415

    t0 = time.perf_counter()
    try:
        get_extension("quanto_cpp").lib  # noqa: B018 (accessing .lib loads the extension, building it on first use)
    except Exception as exc:  # noqa: BLE001
        raise RuntimeError(
            f"optimum-quanto {peer_version('quanto')} cannot build its C++ extension quanto_cpp, which it needs to "
            "unpack int2/int4 weights on CPU (needs a C++ compiler, ninja and a writable "
            f"{q.__path__[0]}/library/extensions/cpp/build): {exc}"
        ) from exc
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# torchao


def _run_torchao(model, names, calib_ids, bits: int, group_size: int, key: str) -> dict:
    _import(key)
    from torchao.quantization import quantize_  # noqa: PLC0415
    from torchao.quantization.granularity import PerGroup  # noqa: PLC0415
    from torchao.quantization.quant_api import (  # noqa: PLC0415
        Int8DynamicActivationInt8WeightConfig,
        IntxWeightOnlyConfig,
    )
    from torchao.quantization.quant_primitives import MappingType  # noqa: PLC0415

    wanted = set(names)
    notes = []
    if key == "torchao-w8a8":
        if bits != 8:
            raise ValueError("torchao-w8a8 is 8-bit; pass bits=8")
        config = Int8DynamicActivationInt8WeightConfig(set_inductor_config=False)  # no global inductor settings
        code_names: tuple[str, ...] = ("qdata",)
        notes.append("int8 symmetric per-channel weights, dynamic symmetric per-token int8 activations; "
                     "group_size does not apply; data-free")
    else:
        if not 1 <= bits <= 8:
            raise ValueError(f"torchao intx weights have 1..8 bits, not {bits}")
        mapping = MappingType.SYMMETRIC if key == "torchao-sym" else MappingType.ASYMMETRIC
        config = IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{bits}"), granularity=PerGroup(group_size),
                                      mapping_type=mapping)
        code_names = ("qdata",)
        skipped = [nm for nm in names if model.get_submodule(nm).in_features % group_size]
        if skipped:
            raise ValueError(f"group_size {group_size} does not divide in_features of {skipped[:4]}")
        notes.append(f"{'symmetric absmax' if key == 'torchao-sym' else 'asymmetric min/max'} RTN per group of {group_size}, "
                     "scale in the model dtype + int8 zero point per group; data-free (calib_ids not used)")
        notes.append("CPU path: IntxUnpackedToInt8Tensor, codes held in int8 and dequantized at each forward "
                     "(Int4WeightOnlyConfig needs CUDA kernels); bits_per_weight counts the codes packed at "
                     f"{bits} bits")

    quant_s = _timed(lambda: quantize_(model, config, filter_fn=lambda mod, fqn: fqn in wanted))
    packed = memory = 0.0
    n = 0
    for name in names:
        w = model.get_submodule(name).weight
        if type(w) in (torch.Tensor, torch.nn.Parameter):
            raise RuntimeError(f"torchao left {name} unquantized")
        p, m = _storage_bits(w, bits, code_names)
        packed += p
        memory += m
        n += w.numel()
    return {"bits_per_weight": packed / n, "memory_bits_per_weight": memory / n, "quant_s": quant_s,
            "notes": "; ".join(notes), "n_layers": len(names), "n_weights": n}


# ---------------------------------------------------------------------------------------------
# auto-round


def _run_auto_round(model, tokenizer, names, calib_ids, bits: int, group_size: int, iters: int) -> dict:
    _import("auto-round")
    from auto_round import AutoRound, QuantizationScheme  # noqa: PLC0415

    if calib_ids is None:
        raise ValueError("auto-round calibrates on data: pass calib_ids (see calibration_ids())")
    ids = calib_ids.to(torch.long)
    if ids.dim() == 1:
        ids = ids.reshape(1, -1)
    n_samples, seq_len = ids.shape
    wanted = set(names)
    # every other Linear layer (the output embedding) explicitly stays in float
    layer_config = {
        name: {"bits": 16}
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear) and name not in wanted
    }
    dtype = next(model.parameters()).dtype
    was_training = model.training

    def quantize():
        ar = AutoRound(
            model, tokenizer,
            # auto-round's W4A16 preset with the requested bits and group size
            scheme=QuantizationScheme(bits=bits, group_size=group_size, sym=True, data_type="int", act_bits=16),
            layer_config=layer_config or None, dataset=list(ids.split(8)), iters=iters,
            nsamples=n_samples, seqlen=seq_len, batch_size=8, device_map="cpu",
            enable_torch_compile=False, seed=0,
        )
        ar.quantize()

    with _quiet_auto_round():
        quant_s = _timed(quantize, no_grad=False)  # SignRound tunes with autograd
    model.train(was_training)
    packed = 0.0
    n = 0
    for name in names:
        mod = model.get_submodule(name)
        if getattr(mod, "bits", None) != bits or getattr(mod, "scale", None) is None:
            raise RuntimeError(f"auto-round left {name} unquantized")
        if mod.weight.dtype != dtype:
            raise RuntimeError(f"auto-round changed the dtype of {name} to {mod.weight.dtype}")
        out_f, in_f = mod.weight.shape
        groups = out_f * -(-in_f // group_size)
        scale_bits = torch.finfo(getattr(mod, "scale_dtype", torch.float16)).bits
        # auto_round:auto_gptq export: qweight int32 holding 32/bits codes each, qzeros packed the same
        # way (one zero point per group, also for sym), scales in scale_dtype (float16)
        packed += mod.weight.numel() * bits + groups * (scale_bits + bits)
        n += mod.weight.numel()
    notes = [
        ("SignRound, " + f"{iters} iterations" if iters else "optimized RTN (iters=0)")
        + f"; symmetric int{bits} per group of {group_size}, float16 scales; calibrated on {n_samples} x {seq_len} tokens",
        "simulated: quantize-dequantized weights in the float Linear layers (fake quant, float32 compute); "
        "bits_per_weight is the packed export layout (auto_round:auto_gptq)",
    ]
    return {"bits_per_weight": packed / n, "memory_bits_per_weight": packed / n, "quant_s": quant_s,
            "notes": "; ".join(notes), "n_layers": len(names), "n_weights": n}


@contextlib.contextmanager
def _quiet_auto_round():
    # auto-round logs progress at INFO and draws tqdm bars; keep warnings
    log = logging.getLogger("autoround")
    old = log.level
    log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(old)


# ---------------------------------------------------------------------------------------------


def run_peer(
    key: str,
    model: torch.nn.Module,
    tokenizer: Any,
    calib_ids: torch.Tensor | None,
    *,
    bits: int = 4,
    group_size: int = 128,
    iters: int | None = None,
) -> dict:
    """Quantize ``model`` in place with peer ``key``; returns ``{"label", "bits_per_weight",
    "memory_bits_per_weight", "quant_s", "notes", "n_layers", "n_weights", "peer", "version"}``.

    ``calib_ids`` (``(n, seq_len)`` token ids, see :func:`calibration_ids`) is used by the peers
    that calibrate (``quanto-w8a8``, ``auto-round*``) and ignored by the data-free ones;
    ``tokenizer`` is only used by auto-round (pad-token masking). The W8A8 peers need ``bits=8``.
    ``iters``: SignRound iterations for ``auto-round`` (default ``AUTO_ROUND_ITERS`` = 200).
    Raises ``RuntimeError`` when the peer is not installed or not usable here."""
    if key in UNUSABLE:
        raise RuntimeError(f"peer {key!r} is {UNUSABLE[key]}")
    if key not in PEERS:
        raise ValueError(f"unknown peer {key!r}; known: {sorted(PEERS)}")
    names = target_linears(model)
    n_iters = 0 if key == "auto-round-rtn" else (AUTO_ROUND_ITERS if iters is None else iters)
    if key in ("quanto", "quanto-w8a8"):
        out = _run_quanto(model, names, calib_ids, bits, group_size, w8a8=key == "quanto-w8a8")
    elif key.startswith("auto-round"):
        out = _run_auto_round(model, tokenizer, names, calib_ids, bits, group_size, n_iters)
    else:
        out = _run_torchao(model, names, calib_ids, bits, group_size, key)
    out["label"] = _label(key, bits, group_size, n_iters)
    out["peer"] = key
    out["version"] = peer_version(key)
    return out
