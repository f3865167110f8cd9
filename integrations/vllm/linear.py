"""``PiecewiseLinearMethod``: how a vLLM linear layer holds and runs piecewise-quant weights.

vLLM fuses Hugging Face projections into one layer (``q/k/v_proj`` -> ``qkv_proj``,
``gate/up_proj`` -> ``gate_up_proj``) and loads each checkpoint tensor into the fused layer with a
*shard id*. A piecewise checkpoint may give those projections different schemes (a mixed-precision
plan can make ``k_proj`` 4-bit and ``q_proj`` 3-bit, or keep one of them in float), so the method
keeps one entry per *logical* projection while loading:

* :class:`ShardedTensorParameter` (a ``vllm.model_executor.parameter.BasevLLMParameter``) stands
  for one tensor name (``qweight``, ``scales``, ...) of the fused layer. Its weight loader takes
  the checkpoint tensor of one projection, checks its shape and dtype against the projection's
  layout, and keeps this rank's block of it: rows for column-parallel layers (with grouped-query
  KV-head replication), input columns for row-parallel ones, cut exactly by
  :func:`piecewise_quant.sharding.slice_quantized` (codes are copied, never re-quantized).
* ``process_weights_after_loading`` turns the projections into ``QuantLinear`` parts (joining
  neighbours with the same scheme into one part), unifies the static activation scales of parts
  that read the same input (their maximum), and frees the loading tensors.
* ``apply`` runs each part through the same ``piecewise_quant::linear`` op as transformers'
  ``QuantLinear`` (the Triton kernel on CUDA, the reference on CPU) and concatenates the outputs.

Float checkpoints (online quantization) load into an ordinary ``ModelWeightParameter`` and are
quantized in ``process_weights_after_loading``.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from vllm.model_executor.layers.linear import (
    LinearMethodBase,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
    register_weight_loader_v2_supported_method,
)
from vllm.model_executor.parameter import BasevLLMParameter, ModelWeightParameter

from piecewise_quant import lowrank, outliers
from piecewise_quant.checkpoint import check_checkpoint, check_finite_tensors, expected_tensors
from piecewise_quant.config import LayerSpec, QuantSpec
from piecewise_quant.qlinear import BALANCE, QuantLinear
from piecewise_quant.quantization import layer_spec_for
from piecewise_quant.registry import get_format
from piecewise_quant.sharding import can_concat_rows, concat_rows, slice_quantized

if TYPE_CHECKING:
    from .config import PiecewiseVllmConfig

__all__ = ["PiecewiseLinearMethod", "ShardedTensorParameter"]

logger = logging.getLogger(__name__)

_QKV_IDS = {"q": 0, "k": 1, "v": 2}


@dataclass
class _Shard:
    """One logical projection of a (possibly fused) vLLM layer, on this rank."""

    index: int
    name: str  # the projection's module name, e.g. model.layers.0.self_attn.k_proj
    spec: QuantSpec | None  # None: kept in float
    full_out: int
    rows: tuple[int, int]  # this rank's rows of the projection
    cols: tuple[int, int]  # this rank's input columns
    full_cols: int  # the projection's in_features
    full: LayerSpec | None = None  # the whole projection (quantized shards only)
    local: LayerSpec | None = None  # this rank's block of it
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def local_out(self) -> int:
        return self.rows[1] - self.rows[0]


class _FloatPart(nn.Module):
    """A projection kept in float inside a fused layer whose other projections are quantized."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype))


class ShardedTensorParameter(BasevLLMParameter):
    """One tensor name of a fused piecewise layer; holds per-projection tensors while loading.

    Its own weight loader (``param.weight_loader(param, tensor, shard_id)``) replaces the layer's,
    because the projections of one fused layer can have different shapes and dtypes."""

    def __new__(cls, data: torch.Tensor, **kwargs: Any):
        return super().__new__(cls, data=data)

    def __init__(self, data: torch.Tensor, tensor_name: str, state: "_LayerState") -> None:
        self.tensor_name = tensor_name
        self.state = state
        super().__init__(data=data, weight_loader=_load_sharded)


def _load_sharded(param: ShardedTensorParameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
    param.state.load(param.tensor_name, loaded, shard_id, param.device)


class _LayerState:
    """Loading state of one vLLM linear layer."""

    def __init__(self, prefix: str, shards: list[_Shard], dtype: torch.dtype) -> None:
        self.prefix = prefix
        self.shards = shards
        self.dtype = dtype

    def shard_for(self, shard_id: Any) -> _Shard:
        if shard_id is None:
            if len(self.shards) == 1:
                return self.shards[0]
            raise NotImplementedError(
                f"piecewise-quant: {self.prefix} received one tensor for all of its projections "
                f"({', '.join(s.name for s in self.shards)}): checkpoints with pre-fused projections are not supported "
                "by the piecewise vLLM method; save the model with separate projections"
            )
        index = _QKV_IDS.get(shard_id, shard_id) if isinstance(shard_id, str) else shard_id
        if isinstance(index, tuple) or not isinstance(index, int) or not 0 <= index < len(self.shards):
            raise NotImplementedError(f"piecewise-quant: {self.prefix} got an unsupported shard id {shard_id!r}")
        return self.shards[index]

    def expected(self, shard: _Shard) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
        """``{tensor name: (full shape, dtype)}`` the checkpoint must hold for ``shard``."""
        if shard.spec is None:
            return {"weight": ((shard.full_out, shard.full_cols), None)}
        tensors = expected_tensors(shard.name, shard.full, get_format(shard.spec.grid), False)
        return {k.rsplit(".", 1)[1]: v for k, v in tensors.items()}

    def load(self, tensor_name: str, loaded: torch.Tensor, shard_id: Any, device: torch.device) -> None:
        shard = self.shard_for(shard_id)
        expected = self.expected(shard)
        key = f"{shard.name}.{tensor_name}"
        if tensor_name not in expected:
            kind = "kept in float" if shard.spec is None else f"quantized with grid={shard.spec.grid!r}"
            raise ValueError(
                f"piecewise-quant: checkpoint tensor {key!r} does not belong to this layer: its quantization_config says "
                f"{shard.name!r} is {kind}, which stores {sorted(expected)}"
            )
        shape, dtype = expected[tensor_name]
        if tuple(loaded.shape) != tuple(shape) or (dtype is not None and loaded.dtype != dtype):
            want = f"{list(shape)} {dtype if dtype is not None else '(float)'}"
            raise ValueError(
                f"piecewise-quant: checkpoint tensor {key!r} has shape {list(loaded.shape)} and dtype {loaded.dtype}; "
                f"its quantization_config expects {want}"
            )
        if dtype is None:
            loaded = loaded.to(self.dtype)
        shard.tensors[tensor_name] = loaded.to(device)
        if set(shard.tensors) == set(expected):
            self._cut(shard)

    def _cut(self, shard: _Shard) -> None:
        """Keep only this rank's block of a complete projection."""
        rows, cols = shard.rows, shard.cols
        whole_rows = rows == (0, shard.full_out)
        whole_cols = cols == (0, shard.full_cols)
        if shard.spec is None:
            shard.tensors["weight"] = shard.tensors["weight"][rows[0] : rows[1], cols[0] : cols[1]].contiguous()
        elif whole_rows and whole_cols:
            shard.local = shard.full
        else:
            # per-layer input tensors: a rank's rows read the whole input (a split input is refused with
            # an online rotation, which 'balance' has)
            whole = {k: shard.tensors.pop(k) for k in _INPUT_TENSORS if k in shard.tensors}
            shard.local, cut = _slice(
                get_format(shard.spec.grid), shard.full, shard.tensors,
                rows=None if whole_rows else rows, cols=None if whole_cols else cols,
            )
            shard.tensors = {**cut, **whole}

    def missing(self) -> list[str]:
        out = []
        for shard in self.shards:
            for name in self.expected(shard):
                if name not in shard.tensors:
                    out.append(f"{shard.name}.{name}")
        return out


@register_weight_loader_v2_supported_method
class PiecewiseLinearMethod(LinearMethodBase):
    """Linear method for piecewise-quant layers (pre-quantized or quantized on load)."""

    def __init__(self, config: "PiecewiseVllmConfig", prefix: str, names: list[str], specs: list[QuantSpec | None]) -> None:
        self.config = config
        self.prefix = prefix
        self.names = names
        self.specs = specs

    # ---- layout -------------------------------------------------------------------------------

    def _shards(self, layer: nn.Module, input_size_per_partition: int, output_partition_sizes: list[int],
                input_size: int) -> list[_Shard]:
        tp_rank = int(getattr(layer, "tp_rank", 0))
        tp_size = 1 if isinstance(layer, ReplicatedLinear) else int(getattr(layer, "tp_size", 1))
        if tp_size == 1:
            tp_rank = 0
        row_parallel = isinstance(layer, RowParallelLinear)
        if len(self.names) != len(output_partition_sizes):
            raise NotImplementedError(
                f"piecewise-quant: vLLM layer {self.prefix} has {len(output_partition_sizes)} output partitions but "
                f"the model's packed_modules_mapping names {len(self.names)} projections ({self.names})"
            )
        cols = (tp_rank * input_size_per_partition, (tp_rank + 1) * input_size_per_partition) if row_parallel else (0, input_size)
        shards = []
        for i, (name, spec, local) in enumerate(zip(self.names, self.specs, output_partition_sizes)):
            if row_parallel or tp_size == 1:
                rank, replicas = 0, 1
            elif isinstance(layer, QKVParallelLinear) and i > 0:
                replicas = int(getattr(layer, "num_kv_head_replicas", 1))
                rank = tp_rank // replicas
            else:
                rank, replicas = tp_rank, 1
            column_parallel = not row_parallel and tp_size > 1
            full_out = local * tp_size // replicas if column_parallel else local
            rows = (rank * local, (rank + 1) * local) if column_parallel else (0, local)
            shard = _Shard(index=i, name=name, spec=spec, full_out=full_out, rows=rows, cols=cols, full_cols=input_size)
            if spec is not None and self.config.prequantized:
                rotation = self.config.core.online_rotation_for(name, spec)
                _check_rotation_tp(name, rotation, row_parallel, tp_size)
                shard.full = layer_spec_for(name, spec, input_size, full_out, rotation)
            shards.append(shard)
        return shards

    # ---- vLLM hooks ---------------------------------------------------------------------------

    def create_weights(
        self,
        layer: nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs: Any,
    ) -> None:
        shards = self._shards(layer, input_size_per_partition, output_partition_sizes, input_size)
        if not self.config.prequantized:
            weight = ModelWeightParameter(
                data=torch.empty(sum(output_partition_sizes), input_size_per_partition, dtype=params_dtype),
                input_dim=1, output_dim=0, weight_loader=extra_weight_attrs["weight_loader"],
            )
            layer.register_parameter("weight", weight)
            layer.pq_state = _LayerState(self.prefix, shards, params_dtype)
            return
        state = _LayerState(self.prefix, shards, params_dtype)
        self._check_headers(state)
        dtypes: dict[str, torch.dtype] = {}
        for shard in shards:
            for t, (_, dtype) in state.expected(shard).items():
                dtypes.setdefault(t, dtype or params_dtype)
        for t, dtype in dtypes.items():
            # empty until process_weights_after_loading; the dtype only keeps vLLM's loader quiet
            layer.register_parameter(t, ShardedTensorParameter(torch.empty(0, dtype=dtype), tensor_name=t, state=state))
        layer.pq_state = state

    def _check_headers(self, state: _LayerState) -> None:
        """Refuse a checkpoint whose tensors do not fit the config before anything is loaded."""
        headers = self.config.vllm_headers()
        if not headers:
            return
        expected = {}
        for shard in state.shards:
            if shard.spec is None:
                continue
            expected[shard.name] = (expected_tensors(shard.name, shard.full, get_format(shard.spec.grid), False), shard.full)
        if expected:
            check_checkpoint(expected, headers)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        state: _LayerState = layer.pq_state
        if not self.config.prequantized:
            self._quantize_online(layer, state)
        else:
            missing = state.missing()
            if missing:
                raise ValueError(
                    f"piecewise-quant: the checkpoint has no tensor(s) {missing} for vLLM layer {self.prefix}; "
                    "the checkpoint is incomplete or does not match its quantization_config"
                )
            for t in list(layer._parameters):
                if isinstance(layer._parameters[t], ShardedTensorParameter):
                    del layer._parameters[t]
        layer.pq_parts = nn.ModuleList(self._parts(state))
        del layer.pq_state

    def _quantize_online(self, layer: nn.Module, state: _LayerState) -> None:
        # vLLM loads under torch.set_default_dtype(model dtype); the searches work in float32
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32)
        try:
            self._quantize_shards(layer, state)
        finally:
            torch.set_default_dtype(previous)

    def _quantize_shards(self, layer: nn.Module, state: _LayerState) -> None:
        weight = layer.weight.data
        start = 0
        for shard in state.shards:
            rows = weight[start : start + shard.local_out]
            start += shard.local_out
            if shard.spec is None:
                shard.tensors = {"weight": rows.clone()}
                continue
            local = layer_spec_for(shard.name, shard.spec, rows.shape[1], rows.shape[0])
            shard.full = shard.local = local
            shard.tensors = dict(get_format(shard.spec.grid).quantize(rows, local))
        del layer._parameters["weight"]

    def _parts(self, state: _LayerState) -> list[nn.Module]:
        quantized: list[tuple[_Shard, LayerSpec, dict[str, torch.Tensor]]] = []
        for shard in state.shards:
            if shard.spec is None:
                continue
            assert shard.local is not None
            quantized.append((shard, shard.local, shard.tensors))
        _unify_act_scales(self.prefix, [t for _, _, t in quantized])
        parts: list[nn.Module] = []
        run: list[tuple[LayerSpec, dict[str, torch.Tensor]]] = []

        def flush() -> None:
            if not run:
                return
            fmt = get_format(run[0][0].spec.grid)
            if len(run) == 1:
                spec, tensors = run[0]
            else:
                spec, tensors = _concat(fmt, [(s, _weight_tensors(t)) for s, t in run],
                                            f"{self.prefix}[{','.join(s.name.rsplit('.', 1)[-1] for s, _ in run)}]")
                if "act_scale" in run[0][1]:
                    tensors["act_scale"] = run[0][1]["act_scale"]
            parts.append(_quant_linear(spec, tensors, state.dtype))
            run.clear()

        by_shard = {id(s): (spec, t) for s, spec, t in quantized}
        for shard in state.shards:
            if shard.spec is None:
                flush()
                parts.append(_FloatPart(shard.tensors["weight"]))
                continue
            spec, tensors = by_shard[id(shard)]
            if run and not (
                can_concat_rows([run[0][0], spec])
                and not (lowrank.has_low_rank(run[0][0]) or lowrank.has_low_rank(spec))  # own factors: one part each
                and not getattr(spec.rotation, "balance", False)  # each layer divides the input by its own scale
                and get_format(spec.spec.grid).kernel_format(spec.spec) is not None
                and _same_act(run[0][1], tensors)
            ):
                flush()
            run.append((spec, tensors))
        flush()
        for shard in state.shards:
            shard.tensors = {}
        return parts

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        parts = layer.pq_parts
        if len(parts) == 1:
            out = parts[0](x)
        else:
            out = torch.cat([p(x) for p in parts], dim=-1)
        if bias is not None:
            out = out + bias.to(out.dtype)
        return out


def _check_rotation_tp(name: str, rotation: Any, row_parallel: bool, tp_size: int) -> None:
    """An online rotation mixes every channel of the side it rotates, so that side cannot be split
    across tensor-parallel ranks (vLLM's compressed-tensors transforms have the same limit)."""
    if rotation is None or tp_size == 1:
        return
    cut = "input" if row_parallel else "output"
    if getattr(rotation, cut):
        raise NotImplementedError(
            f"piecewise-quant: {name!r} rotates its {cut} online (quantization_config.rotation), and with tensor "
            f"parallelism ({tp_size} ranks) each rank holds only part of that {cut}; serve this checkpoint with "
            "--tensor-parallel-size 1, or quantize it without online rotations (rotation with only R1/R2)"
        )


def _slice(fmt: Any, full: LayerSpec, tensors: dict[str, torch.Tensor], rows: tuple[int, int] | None,
           cols: tuple[int, int] | None) -> tuple[LayerSpec, dict[str, torch.Tensor]]:
    """:func:`slice_quantized`, also for dense-and-sparse layers: their outlier tensors
    (``(out, n_groups * K)``, positions inside each group) are cut by rows and by whole groups."""
    if lowrank.has_low_rank(full):
        return _slice_low_rank(fmt, full, tensors, rows, cols)
    if not outliers.has_outliers(full):
        return slice_quantized(fmt, full, tensors, rows=rows, cols=cols)
    if cols is not None and full.group_size == full.in_features:
        raise NotImplementedError(
            f"piecewise-quant: layer {full.name!r} keeps outliers per channel, which a row-parallel split "
            "cannot cut; quantize it with a group_size that divides the partition, or serve it on one GPU"
        )
    dense = outliers.split_tensors(tensors)
    sub, cut = slice_quantized(fmt, outliers.dense_layer(full), dense, rows=rows, cols=cols)
    k = outliers.per_group(full)
    r0, r1 = rows if rows is not None else (0, full.out_features)
    c0, c1 = cols if cols is not None else (0, full.in_features)
    g = full.group_size
    for name in outliers.TENSORS:
        cut[name] = tensors[name][r0:r1, c0 // g * k : c1 // g * k].contiguous()
    return dataclasses.replace(sub, spec=full.spec), cut


def _slice_low_rank(fmt: Any, full: LayerSpec, tensors: dict[str, torch.Tensor], rows: tuple[int, int] | None,
                    cols: tuple[int, int] | None) -> tuple[LayerSpec, dict[str, torch.Tensor]]:
    """:func:`slice_quantized` of a low-rank layer: the residual's tensors as any layer's, ``A``
    by rows, ``B`` by input columns (a row-parallel rank's ``(x_j B_j^T) A^T`` are partial sums,
    which vLLM's all-reduce adds up like the dense part). The slice keeps the whole layer's rank."""
    sub, cut = slice_quantized(fmt, lowrank.dense_layer(full), lowrank.split_tensors(tensors), rows=rows, cols=cols)
    r0, r1 = rows if rows is not None else (0, full.out_features)
    c0, c1 = cols if cols is not None else (0, full.in_features)
    a, b = lowrank.TENSORS
    cut[a] = tensors[a][r0:r1].contiguous()
    cut[b] = tensors[b][:, c0:c1].contiguous()
    return dataclasses.replace(sub, spec=dataclasses.replace(full.spec, low_rank=lowrank.rank(full))), cut


def _concat(fmt: Any, parts: list[tuple[LayerSpec, dict[str, torch.Tensor]]],
            name: str) -> tuple[LayerSpec, dict[str, torch.Tensor]]:
    """:func:`concat_rows`, also for dense-and-sparse layers (outlier tensors are row-major)."""
    if not outliers.has_outliers(parts[0][0]):
        return concat_rows(fmt, parts, name)
    dense = [(outliers.dense_layer(s), outliers.split_tensors(t)) for s, t in parts]
    joined, out = concat_rows(fmt, dense, name)
    for t in outliers.TENSORS:
        out[t] = torch.cat([p[1][t] for p in parts], dim=0)
    return dataclasses.replace(joined, spec=parts[0][0].spec), out


# tensors of a layer that describe its input, not its weight rows: the static activation scale and
# the smoothing scale of the 'balance' rotation
_INPUT_TENSORS = ("act_scale", BALANCE)


def _weight_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in tensors.items() if k not in _INPUT_TENSORS}


def _same_act(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    sa, sb = a.get("act_scale"), b.get("act_scale")
    if sa is None or sb is None:
        return sa is None and sb is None
    return bool(torch.equal(sa, sb))


def _unify_act_scales(prefix: str, tensor_sets: list[dict[str, torch.Tensor]]) -> None:
    """Projections of one fused layer read the same input, so they must quantize it with one
    scale: use the largest (no projection clips more than it was calibrated to)."""
    scales = [t["act_scale"] for t in tensor_sets if "act_scale" in t]
    if len(scales) < 2:
        return
    stacked = torch.stack([s.reshape(()).to(torch.float32) for s in scales])
    top = stacked.max()
    if float(stacked.min()) < float(top) * 0.99:
        logger.info("piecewise-quant: %s: static activation scales %s unified to their maximum %.6g",
                    prefix, [round(float(s), 6) for s in stacked], float(top))
    for t in tensor_sets:
        if "act_scale" in t:
            t["act_scale"] = top.reshape(()).to(t["act_scale"].dtype).to(t["act_scale"].device)


def _quant_linear(layer: LayerSpec, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> QuantLinear:
    check_finite_tensors(layer.name, tensors)  # NaN/Inf scales: refused, never served
    fmt = get_format(layer.spec.grid)
    device = next(iter(tensors.values())).device
    q = QuantLinear.empty(layer, fmt, bias=False, device=device, dtype=dtype)
    q.load_quantized(_weight_tensors(tensors))
    if q.act_scale is not None:
        act = tensors.get("act_scale")
        if act is None:
            raise ValueError(f"piecewise-quant: layer {layer.name!r} uses static activation quantization but has no act_scale")
        q.act_scale.copy_(act.reshape(()).to(torch.float32))
    if q.has_balance:
        scale = tensors.get(BALANCE)
        if scale is None:
            raise ValueError(f"piecewise-quant: layer {layer.name!r} uses the 'balance' rotation but has no {BALANCE}")
        q._buffers[BALANCE].copy_(scale)
    return q
