"""``QuantLinear``: a Linear layer whose weight is stored quantized.

It holds the format's packed tensors as buffers (stable names: ``qweight``, ``scales`` and
``qzeros``/``breakpoint_ids``), an optional bias, and, with activation quantization, an
:class:`~piecewise_quant.activation.ActQuantizer` (``act_quantizer``) whose static scale is the
``act_scale`` buffer. ``forward`` runs one ``piecewise_quant::linear`` op (plugin formats without a
kernel dequantize and call ``F.linear``).
"""

from __future__ import annotations

import os
import threading

import torch
from torch import nn

from .activation import ActQuantizer
from .args import ActArgs
from .config import LayerSpec, QuantSpec
from .formats.base import WeightFormat

__all__ = ["QuantLinear", "ensure_runtime"]

_runtime_lock = threading.Lock()
_runtime_ready = False


def ensure_runtime() -> None:
    """Load plugins and register their kernel backends (once per process)."""
    global _runtime_ready
    if _runtime_ready:
        return
    with _runtime_lock:
        if not _runtime_ready:
            from .registry import sync_kernel_backends

            sync_kernel_backends()
            _runtime_ready = True


BALANCE = "balance_scale"


def _online_rotations(layer: LayerSpec, buffers: dict) -> tuple:
    """The layer's online input and output :class:`~piecewise_quant.kernels.hadamard.Rotation`
    (``None`` where it has none); a balanced input rotation reads its scale from ``buffers``."""
    rot = layer.rotation
    if rot is None:
        return None, None
    from .kernels.hadamard import ScaledRotation, get_rotation

    if getattr(rot, "balance", False):
        r_in = ScaledRotation(layer.in_features, rot.seed, "input", _BufferRef(buffers, BALANCE))
    else:
        r_in = get_rotation(layer.in_features, rot.seed, "input") if rot.input else None
    return r_in, get_rotation(layer.out_features, rot.seed, "output") if rot.output else None


class _BufferRef:
    """``ref()`` is the module's current buffer ``name`` (loads and ``.to()`` replace the tensor;
    a deep copy of the module copies the dict and this reference together)."""

    def __init__(self, buffers: dict, name: str) -> None:
        self.buffers, self.name = buffers, name

    def __call__(self) -> torch.Tensor:
        return self.buffers[self.name]


class QuantLinear(nn.Module):
    """A quantized ``nn.Linear``. Build one with :meth:`from_linear` (quantizes a float layer) or
    :meth:`empty` (allocates buffers to be filled from a checkpoint)."""

    def __init__(
        self,
        layer: LayerSpec,
        fmt: WeightFormat,
        bias: bool,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        act_args: ActArgs | None | str = "spec",
    ) -> None:
        """``act_args``: the activation scheme; ``"spec"`` (default) derives it from the layer's
        spec (``None``: weight-only), a subclass passes its own (e.g. a ``group`` strategy)."""
        super().__init__()
        self.layer_spec = layer
        self.fmt = fmt
        self.in_features = layer.in_features
        self.out_features = layer.out_features
        self.compute_dtype = dtype
        self._tensor_names = tuple(fmt.layout(layer))
        for name, lay in fmt.layout(layer).items():
            self.register_buffer(name, torch.empty(lay.shape, dtype=lay.dtype, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(layer.out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        act = ActArgs.from_spec(layer.spec) if act_args == "spec" else act_args
        if act is not None and not act.dynamic:
            self.register_buffer("act_scale", torch.zeros((), dtype=torch.float32, device=device))
        else:
            self.act_scale = None
        self.act_quantizer = ActQuantizer(act, layer.name, self._buffers) if act is not None else None
        if self.has_balance:
            self.register_buffer(BALANCE, torch.ones(layer.in_features, dtype=torch.float16, device=device))
        self._rot_in, self._rot_out = _online_rotations(layer, self._buffers)
        self._prepared = None  # the CPU kernels' prepared call (see _fast_cpu), False: none applies
        self._prepared_key = None

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def empty(cls, layer: LayerSpec, fmt: WeightFormat, bias: bool, device=None, dtype=torch.float32) -> "QuantLinear":
        return cls(layer, fmt, bias, device=device, dtype=dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, layer: LayerSpec, fmt: WeightFormat) -> "QuantLinear":
        """Quantize ``linear``'s weight with ``fmt``; keeps its bias and dtype."""
        weight = linear.weight.detach()
        q = cls(layer, fmt, linear.bias is not None, device=weight.device, dtype=weight.dtype)
        tensors = fmt.quantize(weight, layer)
        q.load_quantized(tensors)
        if linear.bias is not None:
            q.bias.data.copy_(linear.bias.detach())
        q.take_balance_from(linear)
        return q

    @property
    def has_balance(self) -> bool:
        """Whether the input rotation is preceded by a stored per-channel scale (``balance_scale``)."""
        return getattr(self.layer_spec.rotation, "balance", False)

    @torch.no_grad()
    def take_balance_from(self, source: nn.Module) -> None:
        """Copy the balance scale from ``source``: the float layer that :func:`~piecewise_quant.
        rotation.rotate_model` balanced (attribute ``_pq_balance_scale``) or another
        ``QuantLinear`` (its ``balance_scale``). A balanced layer without one is an error: its
        weight would be applied without the scale it was multiplied by."""
        if not self.has_balance:
            return
        scale = getattr(source, "_pq_balance_scale", None)
        if scale is None and isinstance(source, QuantLinear) and source.has_balance:
            scale = source._buffers[BALANCE]
        if scale is None:
            raise ValueError(
                f"layer {self.layer_spec.name!r} uses the 'balance' rotation but its source layer carries no balance "
                "scale; balanced layers are built by calibrate() (or a pipeline's enable_quant), which measures it"
            )
        self._buffers[BALANCE].copy_(scale.detach().to(torch.float16))

    def load_quantized(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy a format's tensors in, checking names, shapes and dtypes against the layout."""
        expected = self.fmt.layout(self.layer_spec)
        missing = sorted(set(expected) - set(tensors))
        extra = sorted(set(tensors) - set(expected))
        if missing or extra:
            raise ValueError(f"layer {self.layer_spec.name!r}: tensors missing {missing}, unexpected {extra}")
        for name, lay in expected.items():
            t = tensors[name]
            if tuple(t.shape) != lay.shape or t.dtype != lay.dtype:
                raise ValueError(
                    f"layer {self.layer_spec.name!r}: tensor {name!r} has shape {tuple(t.shape)} and dtype "
                    f"{t.dtype}, expected {lay.shape} and {lay.dtype}"
                )
            buf = getattr(self, name)
            if buf.is_meta:
                setattr(self, name, t)
            else:
                if buf.device.type == "cpu":
                    from .kernels import cpu_backend

                    cpu_backend.forget(buf)  # an inference tensor has no version counter to show the change
                    self._prepared = None
                buf.copy_(t)

    def _apply(self, fn, recurse: bool = True):
        """``.to()``, ``.half()``, ``.cuda()``... move the stored tensors but never change their
        dtypes (an fp16 scale cast to bf16, or an FP8 weight cast to bf16, would corrupt them);
        the layer's compute dtype follows the cast."""
        stored = {name: self._buffers[name] for name in self._tensor_names + (BALANCE,)
                  if self._buffers.get(name) is not None}
        for name in stored:
            self._buffers[name] = None
        try:
            super()._apply(fn, recurse)
        finally:
            for name, t in stored.items():
                moved = fn(t)
                self._buffers[name] = moved if moved.dtype == t.dtype else t.to(device=moved.device)
        self.compute_dtype = fn(torch.empty(0, dtype=self.compute_dtype)).dtype
        return self

    # ---- the quantized layer ------------------------------------------------------------------

    @property
    def spec(self) -> QuantSpec:
        return self.layer_spec.spec

    def quantized_tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self._tensor_names}

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float ``(out_features, in_features)`` weight this layer applies: the format's
        dequantized buffers, with the layer's online rotations (if any) folded back in, so it
        stands in for the original float weight."""
        dtype = dtype or self.compute_dtype
        w = self.fmt.dequantize(self.quantized_tensors(), self.layer_spec, dtype)
        if self._rot_in is None and self._rot_out is None:
            return w
        w = w.float()
        if self._rot_in is not None:
            w = self._rot_in(w, inverse=True)
        if self._rot_out is not None:
            w = self._rot_out(w.T.contiguous(), inverse=True).T
        return w.to(dtype).contiguous()

    def effective_bias(self) -> torch.Tensor | None:
        """The bias this layer adds, in its output's basis (the stored one is rotated with an
        online output rotation)."""
        if self.bias is None or self._rot_out is None:
            return self.bias
        return self._rot_out(self.bias.detach().float().unsqueeze(0), inverse=True).squeeze(0).to(self.bias.dtype)

    @torch.no_grad()
    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A float ``nn.Linear`` with the dequantized weight (and the bias), on this layer's device,
        in ``dtype`` (default: the compute dtype); what "dequantize the model" puts in its place."""
        dtype = dtype or self.compute_dtype
        device = next(iter(self.quantized_tensors().values())).device
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=device, dtype=dtype)
        linear.weight.copy_(self.dequantize(dtype))
        if self.bias is not None:
            linear.bias.copy_(self.effective_bias().to(dtype))
        return linear

    def bits_per_weight(self) -> float:
        """Stored bits per weight: the format's, plus a balanced layer's float16 scale per input channel."""
        extra = 16.0 / self.out_features if self.has_balance else 0.0
        return self.fmt.bits_per_weight(self.layer_spec) + extra

    def _fast_cpu(self, x: torch.Tensor, rotation=None) -> torch.Tensor | None:
        """Inference on CPU through a prepared call into the CPU kernels, skipping the op dispatch
        (the decode loop of a small model spends more time there than in the kernel); ``rotation``
        and the activation quantization (where ``ActQuantizer.fused`` allows it) run inside the
        call. ``None``: use the op (gradients needed, torch.compile tracing, activations the call
        cannot quantize or an observing layer, another backend selected, a shape the prepared call
        does not take)."""
        if (torch.is_grad_enabled() and (x.requires_grad or (self.bias is not None and self.bias.requires_grad))) \
                or torch.compiler.is_compiling():
            return None
        aq = self.act_quantizer
        act = None if aq is None else aq.fused
        if aq is not None and act is None:
            return None
        from .kernels import backends

        version = backends.version()
        forced = os.environ.get(backends.ENV_FORCE, "")
        prepared = self._prepared
        if prepared is False and self._prepared_key == (version, forced):
            return None
        # the hot path reads the buffers directly: building the full operand costs as much as a small kernel
        buffers, aux = self._buffers, self.fmt.aux_tensor
        tensors = (buffers.get("qweight"), buffers.get("scales"), buffers.get(aux) if aux is not None else None)
        if prepared is None or prepared is False or not prepared.matches(tensors, version, forced):
            prepared = False
            w = self.fmt.weight_operand(self.quantized_tensors(), self.layer_spec)
            if w is None:  # a plugin format without a kernel: it runs its own linear
                self._prepared, self._prepared_key = False, (version, forced)
                return None
            tensors = (w.qweight, w.scales, w.aux)
            act_format = "none" if aq is None else aq.args.kernel_format
            chosen = backends.select_backend("cpu", w.format, w.bits, w.group_size, x.dtype, act_format)
            if chosen is not None and chosen.name == "cpu":
                from .kernels import cpu_backend

                prepared = cpu_backend.prepare(*tensors, w.format, w.bits, w.group_size, w.in_features,
                                               version, forced) or False
            self._prepared, self._prepared_key = prepared, (version, forced)
            if prepared is False:
                return None
        return prepared(x, self.bias, rotation, act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._rot_in is None and self._rot_out is None:
            return self._forward(x)
        y = None
        if self._rot_in is not None:
            if x.device.type == "cpu" and "outlier_vals" not in self._buffers \
                    and "lowrank_a" not in self._buffers:  # those need the rotated input themselves
                ensure_runtime()
                y = self._fast_cpu(x, self._rot_in)  # the kernel rotates (and quantizes) the rows itself
            if y is None:
                x = self._rot_in(x)
        if y is None:
            y = self._forward(x)
        return self._rot_out(y, inverse=True) if self._rot_out is not None else y

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        from .kernels.ops import NO_ACT, quantized_linear

        aq = self.act_quantizer
        x_in = x  # the low-rank branch reads the input before activation quantization
        x, act = aq.prepare(x) if aq is not None else (x, NO_ACT)
        ensure_runtime()
        if x.device.type == "cpu":
            y = self._fast_cpu(x)
            if y is not None:
                return self._add_low_rank(x_in, self._add_outliers(x, y))
        tensors = self.quantized_tensors()
        w = self.fmt.weight_operand(tensors, self.layer_spec)
        if w is None:  # its linear() dequantizes, outliers included (the low-rank branch is added below)
            tensors, layer = self._without_low_rank(tensors)
            return self._add_low_rank(x_in, self.fmt.linear(x, tensors, layer, self.bias, act))
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return self._add_low_rank(x_in, self._add_outliers(x, quantized_linear(x, w, bias, act)))

    def _without_low_rank(self, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], LayerSpec]:
        """The stored tensors and layer spec of the quantized part alone (the residual of a
        low-rank layer; everything for another layer)."""
        if "lowrank_a" not in self._buffers:
            return tensors, self.layer_spec
        from . import lowrank

        return lowrank.split_tensors(tensors), lowrank.dense_layer(self.layer_spec)

    def _add_low_rank(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The quantized result plus the 16-bit low-rank branch ``(x B^T) A^T`` (SVDQuant layers),
        ``x`` being the layer's unquantized (online-rotated) input."""
        if "lowrank_a" not in self._buffers:
            return y
        from .lowrank import branch, factors_as

        if torch.compiler.is_compiling():  # no cache while tracing
            return y + branch(x, self._buffers["lowrank_a"], self._buffers["lowrank_b"]).to(y.dtype)
        if x.device.type == "cpu":  # decode rows: the C kernel reads the stored float16 factors
            from .kernels.lowrank_add import add

            done = add(y, x, self._buffers["lowrank_a"], self._buffers["lowrank_b"])
            if done is not None:
                return done
        self._lowrank = factors_as(self._buffers, x.dtype, getattr(self, "_lowrank", None))
        return y + branch(x, *self._lowrank[1:]).to(y.dtype)

    def _add_outliers(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The dense result plus the kept outliers' share ``x S^T`` (dense-and-sparse layers)."""
        if "outlier_vals" not in self._buffers:
            return y
        from .outliers import outlier_matrix

        self._sparse = outlier_matrix(self._buffers, self.layer_spec, getattr(self, "_sparse", None))
        return self._sparse.add_to(y, x)

    # ---- static activation calibration (delegated to the ActQuantizer) --------------------------

    def start_observing(self) -> None:
        """Record this layer's inputs (which pass in float) until :meth:`finish_observing`."""
        if self.act_quantizer is not None:
            self.act_quantizer.start()

    def stop_observing(self) -> None:
        """Abandon an observation (e.g. after a failed calibration run) without setting a scale."""
        if self.act_quantizer is not None:
            self.act_quantizer.stop()

    def finish_observing(self) -> None:
        """Set the static ``act_scale`` from what was observed: the (k+1)-th largest magnitude seen
        (k = ``act_topk``), times ``act_clip_ratio``, over the representable maximum."""
        if self.act_quantizer is not None:
            self.act_quantizer.finish()

    def extra_repr(self) -> str:
        spec = self.spec
        gs = {-1: "tensor"}.get(self.layer_spec.group_size, self.layer_spec.group_size)
        if self.layer_spec.group_size == self.in_features and spec.grid != "fp8":
            gs = f"channel ({gs})"
        parts = [
            f"in_features={self.in_features}",
            f"out_features={self.out_features}",
            f"bias={self.bias is not None}",
            f"format={spec.grid}",
            f"bits={spec.bits}",
            f"group_size={gs}",
        ]
        if spec.grid == "uniform":
            parts.append(f"symmetric={spec.symmetric}")
        if self.act_quantizer is not None:
            parts.append(f"act={spec.act_format}{'' if 'fp4' in spec.act_format else spec.act_bits}/{spec.act_mode}")
        if spec.outliers is not None:
            parts.append(f"outliers={spec.outliers} ({spec.outlier_method})")
        if getattr(spec, "low_rank", None) is not None:
            parts.append(f"low_rank={self._buffers['lowrank_a'].shape[1]}")
        if self.layer_spec.rotation is not None:
            parts.append(f"rotation={self.layer_spec.rotation.describe()}")
        parts.append(f"bpw={self.bits_per_weight():.4f}")
        return ", ".join(parts)
