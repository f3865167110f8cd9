"""Uses the installed ``piecewise-quant-nf4`` plugin the way a user would, in a fresh interpreter
(the plugin is found through its entry point only), and prints one JSON report.

    python nf4_worker.py WORKDIR

Run by ``test_nf4_package.py``; never imported by pytest.
"""

import json
import sys
from pathlib import Path

import torch

import piecewise_quant as pq
from piecewise_quant.evaluate import default_model_path, heldout_text, perplexity
from piecewise_quant.plugins import load_plugins

N_TOKENS = 8 * 256  # held-out tokens scored (8 windows)
PROMPTS = ["The Python language", "Exceptions are raised when"]
MAX_TOKENS = 8


@torch.no_grad()
def _reference(model, prompts: list[list[int]]) -> dict:
    """Prompt log-probabilities and greedy continuations, to compare vLLM against."""
    result = {"prompts": prompts, "prompt_logprobs": [], "tokens": []}
    for p in prompts:
        ids = torch.tensor([p])
        lp = torch.log_softmax(model(ids).logits[0].float(), -1)
        result["prompt_logprobs"].append([float(lp[i - 1, p[i]]) for i in range(1, len(p))])
        gen = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False, min_new_tokens=MAX_TOKENS)
        result["tokens"].append(gen[0, len(p):].tolist())
    return result


def main() -> None:
    work = Path(sys.argv[1])
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = {}
    pm = load_plugins()
    plugin = pm.get_plugin("nf4")
    out["plugin_module"] = getattr(plugin, "__name__", None)
    out["formats"] = pq.available_formats()

    bundled = default_model_path()
    tok = AutoTokenizer.from_pretrained(bundled)
    ids = torch.tensor(tok(heldout_text(), add_special_tokens=False)["input_ids"][:N_TOKENS])

    def load(path, config=None):
        kwargs = {"dtype": torch.float32}
        if config is not None:
            kwargs["quantization_config"] = config
        return AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()

    out["ppl_float"] = perplexity(load(bundled), input_ids=ids)
    for name, config in {
        "nf4": pq.PiecewiseQuantConfig(grid="nf4", bits=4, group_size=64),
        "uniform": pq.PiecewiseQuantConfig(grid="uniform", bits=4, group_size=64),
    }.items():
        model = load(bundled, config)
        out[f"ppl_{name}"] = perplexity(model, input_ids=ids)
        if name == "nf4":
            layers = pq.quantized_layers(model)
            out["nf4_layers"] = sum(1 for m in layers.values() if m.fmt.name == "nf4")
            out["quantized_layers"] = len(layers)
            out["bits_per_weight"] = sorted({m.bits_per_weight() for m in layers.values()})
            save = work / "tiny-llama-nf4"
            model.save_pretrained(save)
            tok.save_pretrained(save)
            with torch.no_grad():
                before = model(ids[None, :64]).logits
                again = load(save)
                after = again(ids[None, :64]).logits
            out["reload_exact"] = bool(torch.equal(before, after))
            out["reload_grids"] = sorted({m.fmt.name for m in pq.quantized_layers(again).values()})
            out["saved_grid"] = json.loads((save / "config.json").read_text())["quantization_config"]["grid"]
            out["reference"] = _reference(again, [tok(t, add_special_tokens=False)["input_ids"] for t in PROMPTS])

    # a calibration recipe on the plugin's grid: GPTQ drives fit / fake_quantize / encode
    model = load(bundled)
    cal = pq.CalibrationConfig(gptq=True, n_samples=16, seq_len=128)
    config = pq.PiecewiseQuantConfig(grid="nf4", bits=4, group_size=64, calibration=cal)
    report = pq.calibrate(model, config, tokenizer=tok, progress=False)
    out["gptq_methods"] = sorted({r.method for r in report.layers.values()})
    out["ppl_nf4_gptq"] = perplexity(model, input_ids=ids)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
