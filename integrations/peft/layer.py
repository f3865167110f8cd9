"""``QuantLoraLinear``: a PEFT LoRA layer on top of a frozen, packed :class:`~piecewise_quant.QuantLinear`.

``forward`` = the base ``QuantLinear`` (one ``piecewise_quant::linear`` op on the packed weights; no
float copy of the weight is kept, and the op's backward dequantizes only transiently to pass the
gradient to the input) + ``lora_B(lora_A(dropout(x))) * scaling`` for every active adapter.

Merging is where a quantized base differs from ``nn.Linear``: the merged weight
``dequantize(base) + B @ A * scaling`` is not on the base's grid. :attr:`QuantLoraLinear.merge_to`
chooses what the merged base becomes:

* ``"quantized"`` (default, like PEFT's HQQ and torchao layers): the merged weight is quantized again
  with the base layer's own spec into a new ``QuantLinear``; memory stays packed, at the price of one
  more rounding error;
* ``"float"``: a new ``nn.Linear`` holding the merged weight exactly (in the base's compute dtype).

The packed base is kept while adapters are merged, so ``unmerge()`` restores it bit for bit (PEFT's
HQQ layer re-quantizes on unmerge, which adds error each round trip). Several merged adapters are
merged from the original base in one go, so re-quantization happens once, not once per adapter.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal, Optional

import torch
from peft.tuners.lora.layer import VARIANT_KWARG_KEYS, LoraLayer
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from piecewise_quant.qlinear import QuantLinear

__all__ = ["QuantLoraLinear", "MergeTarget", "MERGE_TARGETS", "merged_base_layer"]

MergeTarget = Literal["quantized", "float"]
MERGE_TARGETS: tuple[str, ...] = ("quantized", "float")

# LoRA initialisations that only need the layer's shape (the others read or rewrite the base weight)
_SUPPORTED_INITS = (True, False, "gaussian", "eva")


def _check_merge_target(merge_to: str) -> str:
    if merge_to not in MERGE_TARGETS:
        raise ValueError(f"merge_to must be one of {', '.join(repr(m) for m in MERGE_TARGETS)}; got {merge_to!r}")
    return merge_to


def merged_base_layer(
    base: QuantLinear, delta: torch.Tensor, bias_delta: torch.Tensor | None, merge_to: str
) -> nn.Module:
    """A new layer computing ``x @ (dequantize(base) + delta).T + bias (+ bias_delta)``.

    ``merge_to="float"`` returns an ``nn.Linear`` (exact merge); ``"quantized"`` re-quantizes the
    merged weight with ``base``'s own layer spec and format into a new ``QuantLinear`` (static
    activation scales are carried over). Raises ``ValueError`` if the merged weight is not finite or
    the format cannot quantize a float weight."""
    _check_merge_target(merge_to)
    name = base.layer_spec.name
    dtype = base.compute_dtype
    weight = base.dequantize(torch.float32) + delta.to(device=base.qweight.device, dtype=torch.float32)
    bias = None
    if base.layer_spec.rotation is not None and merge_to != "float":
        raise ValueError(
            f"layer {name!r} rotates its input/output online (PiecewiseQuantConfig.rotation); merging an adapter "
            "into it re-quantized is not supported: merge with merge_to='float', or keep the adapter unmerged"
        )
    if base.bias is not None:
        bias = base.effective_bias().detach().to(torch.float32)
        if bias_delta is not None:
            bias = bias + bias_delta.detach().to(device=bias.device, dtype=torch.float32)
    elif bias_delta is not None:
        raise RuntimeError(
            f"layer {name!r}: cannot merge a LoRA adapter with lora_bias=True because the base layer has no bias"
        )
    if not bool(torch.isfinite(weight).all()) or (bias is not None and not bool(torch.isfinite(bias).all())):
        raise ValueError(f"layer {name!r}: the merged weight contains NaN or Inf; the adapter seems to be broken")
    device = base.qweight.device
    if merge_to == "float":
        out = nn.Linear(base.in_features, base.out_features, bias=bias is not None, device=device, dtype=dtype)
        out.weight.data.copy_(weight)
        if bias is not None:
            out.bias.data.copy_(bias)
        out.requires_grad_(False)
        return out
    try:
        tensors = base.fmt.quantize(weight, base.layer_spec)
    except NotImplementedError as exc:
        raise ValueError(
            f"layer {name!r}: grid {base.spec.grid!r} cannot re-quantize a merged weight ({exc}); merge with "
            "merge_to='float' to get an nn.Linear instead"
        ) from None
    q = QuantLinear(base.layer_spec, base.fmt, bias is not None, device=device, dtype=dtype)
    q.load_quantized(tensors)
    if bias is not None:
        q.bias.data.copy_(bias)
    if base.act_scale is not None:
        q.act_scale.copy_(base.act_scale)
    q.take_balance_from(base)
    q.train(base.training)
    return q


class QuantLoraLinear(nn.Module, LoraLayer):
    """LoRA on a :class:`~piecewise_quant.QuantLinear`. PEFT builds it (``get_peft_model``,
    ``PeftModel.from_pretrained``) once piecewise-quant is registered with PEFT; see
    :func:`piecewise_quant.integrations.peft.register_with_peft`.

    Supports plain LoRA: any rank/alpha (``rank_pattern``/``alpha_pattern``), ``use_rslora``,
    ``lora_dropout``, ``lora_bias``, several adapters (including mixed-adapter batches), and
    ``init_lora_weights`` in ``True``, ``False``, ``"gaussian"``, ``"eva"``. Variants that read or
    rewrite the float base weight (DoRA, PiSSA, OLoRA, LoftQ, CorDA, ...) raise ``ValueError``.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: Any,
        r: int = 0,
        lora_alpha: int = 1,
        **kwargs: Any,
    ) -> None:
        base = base_layer.get_base_layer() if hasattr(base_layer, "get_base_layer") else base_layer
        if not isinstance(base, QuantLinear):
            raise TypeError(f"QuantLoraLinear wraps a piecewise_quant QuantLinear, got {type(base).__name__}")
        _check_config(config, base)
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        self.fan_in_fan_out = False
        #: what ``merge()`` turns the base into: ``"quantized"`` (re-quantized QuantLinear) or ``"float"``
        self.merge_to: str = "quantized"
        self._packed_base: Optional[QuantLinear] = None  # the original base while adapters are merged
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **_update_kwargs(kwargs))

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        return base.in_features, base.out_features

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: Any, **kwargs: Any) -> None:
        _check_config(config, self._original_base())
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def resolve_lora_variant(self, *, config: Any, **kwargs: Any) -> None:
        return None  # plain LoRA only; update_layer has already refused the variants

    # ---- merging --------------------------------------------------------------------------------

    def _original_base(self) -> QuantLinear:
        if self._packed_base is not None:
            return self._packed_base
        return self.get_base_layer()

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Merge adapters into the base (``self.merge_to`` decides: re-quantized or float).

        The merged base is rebuilt from the original packed weights plus the deltas of every merged
        adapter, so merging several adapters rounds once. The merged weight is always checked for
        NaN/Inf (``safe_merge`` is accepted for PEFT's API; the check is done either way)."""
        _check_merge_target(self.merge_to)
        adapter_names = check_adapters_to_merge(self, adapter_names)
        new = [a for a in adapter_names if a in self.lora_A]
        if not new:
            return
        original = self._original_base()
        merged = list(self.merged_adapters) + new
        delta = sum(self.get_delta_weight(a).float() for a in merged)
        bias_delta = None
        for a in merged:
            if self.lora_bias.get(a, False):
                b = self.lora_B[a].bias.detach().float() * self.scaling[a]
                bias_delta = b if bias_delta is None else bias_delta + b
        new_base = merged_base_layer(original, delta, bias_delta, self.merge_to)
        self._packed_base = original
        self.base_layer = new_base
        self.merged_adapters.extend(new)

    def unmerge(self) -> None:
        """Restore the original packed base exactly (no arithmetic, no re-quantization)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        merged_base = self.base_layer
        device = merged_base.qweight.device if isinstance(merged_base, QuantLinear) else merged_base.weight.device
        self.base_layer = self._packed_base.to(device)
        self._packed_base = None
        self.merged_adapters.clear()

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``lora_B @ lora_A * scaling`` for ``adapter``, shape ``(out_features, in_features)``."""
        weight_a = self.lora_A[adapter].weight
        weight_b = self.lora_B[adapter].weight
        return (weight_b.float() @ weight_a.float()) * self.scaling[adapter]

    # ---- forward --------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        for key in VARIANT_KWARG_KEYS:  # only LoRA variants use these; never pass them to the base layer
            kwargs.pop(key, None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        result_dtype = result.dtype
        for active_adapter in self.active_adapters:
            if active_adapter not in self.lora_A:
                continue
            lora_a = self.lora_A[active_adapter]
            lora_b = self.lora_B[active_adapter]
            dropout = self.lora_dropout[active_adapter]
            scaling = self.scaling[active_adapter]
            xa = self._cast_input_dtype(x, lora_a.weight.dtype)
            result = result + lora_b(lora_a(dropout(xa))) * scaling
        return result.to(result_dtype)

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def _update_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments PEFT's dispatch passes that ``update_layer`` understands."""
    keep = ("target_name", "tied_adapter")
    return {k: v for k, v in kwargs.items() if k in keep and v is not None}


def _check_config(config: Any, base: QuantLinear) -> None:
    """Raise ``ValueError`` for LoRA options this layer cannot honour on a packed base."""
    name = base.layer_spec.name if isinstance(base, QuantLinear) else "?"
    unsupported = []
    if getattr(config, "use_dora", False):
        unsupported.append("use_dora=True (DoRA needs the float weight's column norms in every forward)")
    for field in ("velora_config", "monteclora_config", "kasa_config", "arrow_config", "alora_invocation_tokens"):
        if getattr(config, field, None):
            unsupported.append(f"{field} (a LoRA variant)")
    if getattr(config, "use_bdlora", False):
        unsupported.append("use_bdlora=True (a LoRA variant)")
    init = getattr(config, "init_lora_weights", True)
    if not any(init is s or (isinstance(init, str) and isinstance(s, str) and init.lower() == s) for s in _SUPPORTED_INITS):
        unsupported.append(
            f"init_lora_weights={init!r} (it reads or rewrites the float base weight; use True, False, 'gaussian' or 'eva')"
        )
    if unsupported:
        raise ValueError(
            f"LoRA on the piecewise-quant QuantLinear {name!r} does not support " + "; ".join(unsupported)
            + ". Plain LoRA (rank, alpha, rslora, dropout, lora_bias) works on quantized layers; for the others, "
            "dequantize the model first (model.dequantize() for a transformers model)"
        )
