"""``piecewise-quant bench``: CPU speed of a quantized model against its float counterpart, as
forward passes (tokens/s of a batch) or, with ``--generate``, greedy decoding."""

from __future__ import annotations

import argparse
import copy
import time

from .common import (
    MODEL_HELP,
    UserError,
    add_command,
    add_scheme_options,
    decode_tokens_per_second,
    kernel_label,
    load,
    model_dir,
    parse_group_size,
    positive_int,
    positive_int_list,
)

EPILOG = """examples:
  piecewise-quant bench --model out/pw4
  piecewise-quant bench --model assets/tiny-llama-pydoc --grid uniform --bits 4 --seq-len 256
  piecewise-quant bench --model out/pw4 --generate 64 --batch-sizes 1,8

A quantized checkpoint is timed against a float copy holding its dequantized weights; a float
model is quantized in memory (data-free, --grid/--bits/--group-size) and timed against itself.
Timings are for this machine's CPU threads (set OMP_NUM_THREADS to change them)."""


def add_parser(sub) -> None:
    b = add_command(sub, "bench", "time a forward pass of the quantized vs the float model (CPU tokens/s)",
                    "Time a forward pass of the quantized and the float model.", EPILOG)
    b.add_argument("--model", help=MODEL_HELP)
    add_scheme_options(b)
    b.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    b.add_argument("--batch-size", type=int, default=1, help="sequences per forward pass (default 1)")
    b.add_argument("--repeats", type=int, default=5, help="timed passes; the best is reported (default 5)")
    b.add_argument("--generate", type=positive_int, default=None, metavar="N",
                   help="time greedy decoding of N tokens instead (tokens/s per --batch-sizes, weights in memory, peak RSS)")
    b.add_argument("--batch-sizes", type=positive_int_list, default=[1, 8], metavar="B[,B...]",
                   help="prompts decoded together with --generate (default 1,8)")
    b.add_argument("--prepack-int8", action="store_true",
                   help="give W8A8 layers a oneDNN-packed weight copy (faster from 8 rows, twice their weight "
                        "memory; docs/kernels.md#w8a8-prepacked-for-onednn)")
    b.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """``piecewise-quant bench``."""
    import torch

    import piecewise_quant as pq

    model_path = model_dir(args.model)
    for opt in ("seq_len", "batch_size", "repeats"):
        if getattr(args, opt) < 1:
            raise UserError(f"--{opt.replace('_', '-')} must be a positive integer; got {getattr(args, opt)}")
    model = load(model_path)
    if pq.quantized_layers(model):
        quantized, float_model, float_name = model, _dequantized_copy(model), "float32 (dequantized copy)"
    else:
        try:
            config = pq.PiecewiseQuantConfig(grid=args.grid, bits=args.bits, group_size=parse_group_size(args.group_size))
            quantized = pq.quantize(copy.deepcopy(model), config, progress=False)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        float_model, float_name = model, "float32"
    args.packed_bytes = 0
    if args.prepack_int8:
        from piecewise_quant.kernels import cpu_backend

        try:
            args.packed_bytes = cpu_backend.prepack_int8(quantized)
        except RuntimeError as exc:
            raise UserError(f"--prepack-int8: {exc}") from None
        if not args.packed_bytes:
            raise UserError("--prepack-int8: the model has no W8A8 layer (symmetric 8-bit weights per channel with "
                            "symmetric int8/int4 activations) to prepack")
    vocab = int(getattr(model.config, "vocab_size", 1000))
    gen = torch.Generator().manual_seed(0)
    spec = next(iter(pq.quantized_layers(quantized).values())).spec
    qname = f"{spec.grid} {spec.bits}-bit"
    models = ((float_name, float_model), (qname, quantized))
    if args.generate:
        return _bench_generate(args, model_path, models, vocab, gen, quantized)
    return _bench_forward(args, model_path, models, vocab, gen, quantized)


def _bench_forward(args, model_path, models, vocab: int, gen, quantized) -> int:
    """Best-of-``--repeats`` time of one forward pass over ``--batch-size`` x ``--seq-len`` random tokens."""
    import torch

    import piecewise_quant as pq

    ids = torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=gen)
    rows = []
    with torch.inference_mode():
        for name, m in models:
            m(ids)  # warm-up
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                m(ids)
                times.append(time.perf_counter() - t0)
            best = min(times)
            bpw = pq.model_size_report(m).bits_per_weight if m is quantized else 32.0
            rows.append((name, bpw, best * 1e3, ids.numel() / best))
    print(f"piecewise-quant bench: {model_path}; forward pass of {args.batch_size} x {args.seq_len} tokens, "
          f"best of {args.repeats}, {torch.get_num_threads()} CPU thread(s)")
    print(f"kernels: {kernel_summary(quantized, args.batch_size * args.seq_len)}")
    print()
    print("| model | bits/weight | ms / forward | tokens/s | vs float |")
    print("|---|---:|---:|---:|---:|")
    base = rows[0][3]
    for name, bpw, ms, tps in rows:
        print(f"| {name} | {bpw:.3f} | {ms:.1f} | {tps:,.0f} | {tps / base:.2f}x |")
    return 0


def _bench_generate(args, model_path, models, vocab: int, gen, quantized) -> int:
    """Greedy decode tokens/s at each ``--batch-sizes`` entry, the models' resident weights and the
    process's peak RSS."""
    import resource

    import torch

    import piecewise_quant as pq

    batches = args.batch_sizes
    rows = []
    for name, m in models:
        speeds = []
        for b in batches:
            prompt = torch.randint(3, vocab, (b, 16), generator=gen)
            speeds.append(decode_tokens_per_second(m, prompt, tokens=args.generate, repeats=args.repeats))
        bpw = pq.model_size_report(m).bits_per_weight if m is quantized else 32.0
        rows.append((name, bpw, resident_bytes(m) + (args.packed_bytes if m is quantized else 0), speeds))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"piecewise-quant bench --generate: {model_path}; greedy decode of {args.generate} tokens after a 16-token "
          f"prompt, best of {args.repeats}, {torch.get_num_threads()} CPU thread(s); process peak RSS {peak:,.0f} MB")
    print(f"kernels: {kernel_summary(quantized)}")
    print()
    cells = " | ".join(f"batch {b} tokens/s | vs float" for b in batches)
    print(f"| model | bits/weight | weights in memory (MB) | {cells} |")
    print("|---|---:|---:|" + "---:|---:|" * len(batches))
    base = rows[0][3]
    for name, bpw, nbytes, speeds in rows:
        cells = " | ".join(f"{v:,.1f} | {v / base[i]:.2f}x" for i, v in enumerate(speeds))
        print(f"| {name} | {bpw:.3f} | {nbytes / 1e6:.1f} | {cells} |")
    return 0


def kernel_summary(model, rows: int = 1) -> str:
    """How many quantized layers of ``model`` run each CPU kernel for ``rows`` activation rows."""
    import collections

    import piecewise_quant as pq

    counts = collections.Counter(kernel_label(q, rows) for q in pq.quantized_layers(model).values())
    return "; ".join(f"{label}: {n} layer{'s' if n != 1 else ''}" for label, n in counts.most_common())


def resident_bytes(model) -> int:
    """Bytes of every parameter and buffer (quantized layers at their stored size)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def _dequantized_copy(model):
    """A float copy of a quantized model: every QuantLinear replaced by an nn.Linear holding its
    dequantized weight (the same numbers, computed in float)."""
    import torch

    from piecewise_quant.quantization import dequantize_layers

    return dequantize_layers(copy.deepcopy(model), torch.float32)
