"""LoRA on a packed piecewise-quant base vs on the float base (PEFT), on the bundled model.

For each base (the float ``assets/tiny-llama-pydoc``, and the same model quantized data-free with
``PiecewiseQuantConfig(bits=4, group_size=128)``, piecewise grid), the script wraps every Linear
layer but ``lm_head`` with LoRA (``target_modules="all-linear"``, r=8, alpha=16), trains a few
AdamW steps on windows of the calibration text, and reports:

* **memory** during training, measured by accounting for every tensor: the base weights of the
  targeted layers (packed ``qweight``/``scales``/``breakpoint_ids`` vs float ``weight``), the whole
  model state, the LoRA parameters + their gradients + AdamW state, the peak of the tensors
  autograd saved for backward (activations; counted through ``torch.autograd.graph.saved_tensors_hooks``,
  storages de-duplicated, model tensors excluded), and how many saved tensors had the shape of a
  float weight of a targeted layer (a float copy of a base weight kept for backward; 0 means the
  base stayed packed);
* **loss**: mean cross-entropy on held-out windows before and after training;
* for the quantized base, the two merges (``piecewise_quant.integrations.peft.merge_and_unload``):
  ``merge_to="float"`` (``nn.Linear`` layers) and ``merge_to="quantized"`` (re-quantized
  ``QuantLinear`` layers), each compared with the unmerged adapter model: max and mean absolute
  logit difference on the held-out windows, and held-out perplexity.

Usage (from the repository root)::

    python benchmarks/peft_lora.py                 # 40 steps, 16 held-out windows (~2-3 min on 2 cores)
    python benchmarks/peft_lora.py --quick         # 6 steps, 4 windows (used by the tests)
    python benchmarks/peft_lora.py --json out.json

Deterministic (fixed seed, one thread); tables (markdown) on stdout. ``docs/peft.md`` quotes the
full run.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import piecewise_quant as pq  # noqa: E402
from piecewise_quant.evaluate import calibration_text, default_model_path, heldout_text  # noqa: E402

WINDOW = 128
BATCH = 8
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear"}
QUANT = {"bits": 4, "group_size": 128, "grid": "piecewise"}


def windows(tokenizer: Any, text: str, n: int) -> torch.Tensor:
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    count = min(n, ids.numel() // WINDOW)
    return ids[: count * WINDOW].reshape(count, WINDOW)


def tensor_bytes(tensors) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        if t is None:
            continue
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


@torch.no_grad()
def eval_logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    return torch.cat([model(ids[i : i + BATCH]).logits.float() for i in range(0, len(ids), BATCH)])


def mean_loss(logits: torch.Tensor, ids: torch.Tensor) -> float:
    return float(
        torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    )


def train(model: Any, train_ids: torch.Tensor, steps: int, lr: float) -> dict[str, Any]:
    """AdamW on the LoRA parameters; returns the memory accounting of the run."""
    from piecewise_quant.qlinear import QuantLinear

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model_storages = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    targeted = [m.get_base_layer() for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "get_base_layer")]
    weight_shapes = {(m.out_features, m.in_features) for m in targeted}
    saved: dict[int, int] = {}
    peak_saved = 0
    float_weight_copies = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal float_weight_copies
        ptr = t.untyped_storage().data_ptr()
        if ptr not in model_storages:
            saved[ptr] = t.untyped_storage().nbytes()
            if t.is_floating_point() and tuple(t.shape) in weight_shapes:
                float_weight_copies += 1
        return t

    model.train()
    for step in range(steps):
        batch = train_ids[(step * BATCH) % len(train_ids) :][:BATCH]
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(batch, labels=batch).loss
        peak_saved = max(peak_saved, sum(saved.values()))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
    model.eval()
    base_tensors = []
    for m in targeted:
        if isinstance(m, QuantLinear):
            base_tensors += list(m.quantized_tensors().values())
        else:
            base_tensors.append(m.weight)
    return {
        "targeted_layers": len(targeted),
        "base_weight_bytes": tensor_bytes(base_tensors),
        "model_state_bytes": tensor_bytes(
            [p for p in model.parameters() if not p.requires_grad] + list(model.buffers())
        ),
        "lora_param_bytes": tensor_bytes(params),
        "lora_grad_bytes": tensor_bytes([p.grad for p in params]),
        "optimizer_state_bytes": tensor_bytes(
            [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
        ),
        "peak_saved_activation_bytes": peak_saved,
        "float_weight_copies_saved": float_weight_copies,
    }


def run(steps: int, n_eval: int, lr: float) -> dict[str, Any]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from piecewise_quant.integrations.peft import merge_and_unload

    torch.manual_seed(0)
    path = default_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    train_ids = windows(tok, calibration_text(), steps * BATCH)
    eval_ids = windows(tok, heldout_text(), n_eval)
    float_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    results: dict[str, Any] = {"steps": steps, "eval_windows": len(eval_ids), "window": WINDOW, "batch": BATCH,
                               "lr": lr, "lora": LORA, "quant": QUANT, "rows": {}}
    adapters: dict[str, Any] = {}
    for name in ("float", "piecewise-w4-g128"):
        model = copy.deepcopy(float_model)
        if name != "float":
            pq.quantize(model, pq.PiecewiseQuantConfig(**QUANT), progress=False)
        torch.manual_seed(1)
        peft_model = get_peft_model(model, LoraConfig(**LORA))
        before = mean_loss(eval_logits(peft_model, eval_ids), eval_ids)
        mem = train(peft_model, train_ids, steps, lr)
        logits = eval_logits(peft_model, eval_ids)
        results["rows"][name] = {**mem, "loss_before": before, "loss_after": mean_loss(logits, eval_ids)}
        adapters[name] = (peft_model, logits)

    peft_model, ref = adapters["piecewise-w4-g128"]
    before = results["rows"]["piecewise-w4-g128"]["loss_before"]
    merges = {"base before training (no adapter effect)": {"max_abs_logit_diff": float("nan"),
                                                          "mean_abs_logit_diff": float("nan"),
                                                          "perplexity": math.exp(before), "layer_type": "QuantLoraLinear"},
              "unmerged adapter": {"max_abs_logit_diff": 0.0, "mean_abs_logit_diff": 0.0,
                                   "perplexity": math.exp(mean_loss(ref, eval_ids))}}
    for merge_to in ("float", "quantized"):
        merged = merge_and_unload(copy.deepcopy(peft_model), merge_to=merge_to)
        logits = eval_logits(merged, eval_ids)
        diff = (logits - ref).abs()
        merges[f"merge_to={merge_to!r}"] = {
            "max_abs_logit_diff": float(diff.max()),
            "mean_abs_logit_diff": float(diff.mean()),
            "perplexity": math.exp(mean_loss(logits, eval_ids)),
            "layer_type": type(merged.get_submodule("model.layers.0.self_attn.q_proj")).__name__,
        }
    results["merge"] = merges
    results["logit_scale"] = float(ref.abs().mean())
    return results


def print_tables(r: dict[str, Any]) -> None:
    mib = 1 / 2**20
    print(f"## LoRA training memory and loss ({r['steps']} steps, batch {r['batch']}x{r['window']} tokens, "
          f"r={r['lora']['r']}, all-linear)\n")
    print("| base | targeted layers | base weights MiB | model state MiB | LoRA params+grads+AdamW MiB "
          "| peak saved activations MiB | float weight copies saved | held-out loss before | after |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, row in r["rows"].items():
        lora = row["lora_param_bytes"] + row["lora_grad_bytes"] + row["optimizer_state_bytes"]
        print(f"| {name} | {row['targeted_layers']} | {row['base_weight_bytes'] * mib:.2f} | "
              f"{row['model_state_bytes'] * mib:.2f} | {lora * mib:.2f} | {row['peak_saved_activation_bytes'] * mib:.2f} | "
              f"{row['float_weight_copies_saved']} | {row['loss_before']:.4f} | {row['loss_after']:.4f} |")
    print(f"\n## Merging the trained adapter into the quantized base ({r['eval_windows']} held-out windows; "
          f"mean |logit| = {r['logit_scale']:.3f})\n")
    print("| model | layers become | max abs logit diff | mean abs logit diff | held-out perplexity |")
    print("|---|---|---|---|---|")
    for name, row in r["merge"].items():
        print(f"| {name} | {row.get('layer_type', 'QuantLoraLinear')} | {row['max_abs_logit_diff']:.3g} | "
              f"{row['mean_abs_logit_diff']:.3g} | {row['perplexity']:.3f} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="6 steps, 4 held-out windows")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--eval-windows", type=int, default=None)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    steps = args.steps or (6 if args.quick else 40)
    n_eval = args.eval_windows or (4 if args.quick else 16)
    results = run(steps, n_eval, args.lr)
    print_tables(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
