"""A synthetic associative-recall task and the small Llama trained on it (``assets/tiny-llama-recall``).

The bundled ``tiny-llama-pydoc`` cannot retrieve anything from a long context, so KV-cache
quantization can only be judged on it by perplexity. This task needs the whole context: a prompt
is a list of key-value pairs, then a query key; the answer is that key's value.

Sequence layout (token ids, vocabulary of ``VOCAB`` = 580)::

    <s> k1 v1 k2 v2 ... kP vP ? q        -> answer: the v of the pair whose key is q

* keys: ``N_KEYS`` = 512 tokens, distinct within a prompt (sampled without replacement);
* values: ``N_VALUES`` = 64 tokens, independent and uniform (so the value of a pair cannot be
  guessed from anything but that pair);
* ``?`` (id 3) marks the query; ``<s>`` = 0, ``</s>`` = 1, ``<pad>`` = 2 are kept from the
  bundled model's conventions.

A context of ``L`` tokens holds ``P = (L - 4) // 2`` pairs, so prompt + answer is exactly ``L``
tokens (``L = 1024``: 510 pairs). The queried pair of evaluation prompt ``j`` of ``n`` sits at
pair index ``floor((j + u) * P / n)`` (``u`` uniform): the queries are spread evenly over the
whole context, the first pair included, so the task needs the early context, not just a recent
window.

Training sequences have several queries after the ``?`` (``? q1 a1 q2 a2 ...``, drawn with replacement),
with the loss on the answers only; evaluation prompts have one. Everything is generated from a
``torch.Generator`` seed: training uses ``TRAIN_SEED``, evaluation ``EVAL_SEED`` (disjoint
streams; with 512^P orderings a held-out prompt repeating a training one is negligible).

The model: a 2-layer Llama needs an induction circuit for this task (a previous-token head, then a
head that matches the query key against what the previous-token head wrote at each value
position). Trained from random weights on CPU it stayed on the loss plateau before that circuit
forms (~ln 8, "copy some value of the context") for 7,000+ steps, also with a previous-token head
given (``--init prev-token``). So the shipped model starts from the circuit written into the
weights (:func:`induction_init`, then :func:`rotate_basis` so that no activation is axis-aligned)
and is then trained, all weights, on the task (``--init induction``, the default).

Usage (repository root)::

    python benchmarks/recall_task.py train       # writes assets/tiny-llama-recall (the shipped checkpoint, a few CPU minutes)
    python benchmarks/recall_task.py evaluate    # float accuracy at 256/512/1024 tokens
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
ASSET = REPO / "assets" / "tiny-llama-recall"

BOS, EOS, PAD, QUERY = 0, 1, 2, 3
KEY0, N_KEYS = 4, 512
VAL0, N_VALUES = KEY0 + N_KEYS, 64
VOCAB = VAL0 + N_VALUES
TRAIN_SEED, EVAL_SEED = 0, 1_000_003
MODEL_CONFIG = dict(
    vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=2, head_dim=64, max_position_embeddings=1024, rope_theta=1e6, rms_norm_eps=1e-5,
    initializer_range=0.08, tie_word_embeddings=False, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
)


# ---- the task ----------------------------------------------------------------------------------


def pairs_for(context: int) -> int:
    """Key-value pairs in a prompt of ``context`` tokens (prompt + answer = ``context``)."""
    if context < 6 or (context - 4) // 2 > N_KEYS:
        raise ValueError(f"context={context} must be between 6 and {2 * N_KEYS + 5} tokens")
    return (context - 4) // 2


def make_batch(gen: torch.Generator, batch: int, n_pairs: int, n_queries: int,
               query_pairs: torch.Tensor | None = None, n_keys: int = N_KEYS) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` sequences ``<s> k v ... ? q a q a ...`` and their labels: the answers at their own
    positions, -100 elsewhere (transformers' convention: the model shifts labels by one).

    ``query_pairs`` (``(batch, n_queries)`` pair indices) fixes which pairs are queried; by
    default they are drawn at random with replacement (a repeated query can also be answered from
    its earlier occurrence after the ``?``: the same recall, from closer). ``n_keys`` < ``N_KEYS``
    draws the keys from the first ``n_keys`` only (a training curriculum).
    """
    if n_queries < 1 or not 1 <= n_pairs <= n_keys <= N_KEYS:
        raise ValueError(f"need n_queries={n_queries} >= 1 and 1 <= n_pairs={n_pairs} <= n_keys={n_keys} <= {N_KEYS}")
    keys = torch.rand(batch, n_keys, generator=gen).argsort(dim=1)[:, :n_pairs] + KEY0
    values = torch.randint(0, N_VALUES, (batch, n_pairs), generator=gen) + VAL0
    if query_pairs is None:  # with replacement: distinct queries would let the last answers be guessed by elimination
        query_pairs = torch.randint(0, n_pairs, (batch, n_queries), generator=gen)
    q_keys, q_values = keys.gather(1, query_pairs), values.gather(1, query_pairs)
    ctx = torch.stack([keys, values], dim=2).reshape(batch, -1)
    qs = torch.stack([q_keys, q_values], dim=2).reshape(batch, -1)
    ids = torch.cat([torch.full((batch, 1), BOS), ctx, torch.full((batch, 1), QUERY), qs], dim=1)
    labels = torch.full_like(ids, -100)
    start = 3 + 2 * n_pairs  # position of the first answer
    labels[:, start : start + 2 * n_queries : 2] = q_values
    return ids, labels


def eval_prompts(n: int, context: int, seed: int = EVAL_SEED) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` held-out prompts of ``context - 1`` tokens (the answer is the last token of the
    context), their answers, and the queried pair's index (spread evenly over the context)."""
    n_pairs = pairs_for(context)
    gen = torch.Generator().manual_seed(seed * 7919 + context)
    u = torch.rand(n, generator=gen)
    where = ((torch.arange(n) + u) * n_pairs / n).long().clamp(max=n_pairs - 1)
    ids, labels = make_batch(gen, n, n_pairs, 1, where[:, None])
    return ids[:, :-1], ids[:, -1], where


@torch.no_grad()
def predict(model: Any, prompts: torch.Tensor, batch_size: int = 16, past_key_values: Any = None,
            generate: bool = False, cache_factory: Any = None) -> torch.Tensor:
    """Greedy answer token for each prompt: the argmax of the last position's logits, or with
    ``generate=True`` one token from ``model.generate`` (with a fresh cache from
    ``cache_factory()`` per batch, when given)."""
    out = []
    for i in range(0, prompts.shape[0], batch_size):
        batch = prompts[i : i + batch_size]
        if generate:
            extra = {} if cache_factory is None else {"past_key_values": cache_factory()}
            gen = model.generate(batch, attention_mask=torch.ones_like(batch), max_new_tokens=1, min_new_tokens=1,
                                 do_sample=False, pad_token_id=PAD, **extra)
            out.append(gen[:, -1])
        else:
            out.append(model(batch).logits[:, -1].argmax(dim=-1))
    return torch.cat(out)


def evaluate(model: Any, n: int = 64, context: int = 512, seed: int = EVAL_SEED, **kwargs: Any) -> float:
    """Exact-match accuracy of greedy answers on ``n`` held-out prompts of ``context`` tokens
    (seed ``EVAL_SEED``, never used in training). ``kwargs`` go to :func:`predict`."""
    prompts, answers, _ = eval_prompts(n, context, seed)
    return float((predict(model, prompts, **kwargs) == answers).float().mean())


def load_model(path: Path | str = ASSET) -> Any:
    """The shipped recall model, float32, eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


# ---- training ----------------------------------------------------------------------------------

# (tokens of the training sequences, batch, keys drawn from): short contexts first; training moves
# to the next stage once the running loss on the answers is below ``advance_loss``
CURRICULUM = [(34, 64, N_KEYS), (66, 32, N_KEYS), (130, 16, N_KEYS), (258, 8, N_KEYS), (514, 4, N_KEYS), (1026, 2, N_KEYS)]
# the shipped model: from the constructed circuit, training on full-length sequences only
FINE_TUNE = [(1026, 4, N_KEYS)]


def parse_curriculum(text: str) -> list[tuple[int, int, int]]:
    """``"34:64:64,258:8"`` -> ``[(34, 64, 64), (258, 8, N_KEYS)]`` (TOKENS:BATCH[:KEYS] stages)."""
    try:
        parts = [part.split(":") for part in text.split(",")]
        stages = [(int(p[0]), int(p[1]), int(p[2]) if len(p) > 2 else N_KEYS) for p in parts]
    except (ValueError, IndexError):
        raise ValueError(f"--curriculum {text!r}: write TOKENS:BATCH[:KEYS] stages separated by commas") from None
    return stages


def build_model(seed: int, **overrides: Any) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**MODEL_CONFIG, **overrides}, attn_implementation="sdpa"))


@torch.no_grad()
def prev_token_init(model: Any, scale: float = 8.0) -> None:
    """Initialise head 0 of layer 0 as a previous-token head (the first half of an induction circuit,
    which a 2-layer model otherwise needs thousands of steps to find): every token embedding gets a
    constant first coordinate, which that head's query and key projections map to RoPE phases
    whose product peaks at a distance of one position. Everything stays trainable.

    On its own this did not get training off the plateau (see the card): the normalised constant
    coordinate varies from token to token, so the head puts only ~0.7 of its weight on the
    previous token on average, and layer 1 still has to find the matching from random weights."""
    attn, norm = model.model.layers[0].self_attn, model.model.layers[0].input_layernorm
    emb = model.model.embed_tokens.weight
    emb[:, 0] = 1.0
    c = float(norm(emb)[:, 0].mean())
    hd = attn.head_dim
    freq = model.model.rotary_emb.inv_freq.float()
    q = torch.cat([torch.full_like(freq, scale), torch.zeros_like(freq)])
    k = torch.cat([scale * torch.cos(freq), scale * torch.sin(freq)])
    for proj, vec in ((attn.q_proj, q), (attn.k_proj, k)):
        proj.weight[:hd] = 0.0
        proj.weight[:hd, 0] = vec / c


def _gf2_rank(m: torch.Tensor) -> int:
    m, rank = m.clone() % 2, 0
    for col in range(m.shape[1]):
        pivots = [i for i in range(rank, m.shape[0]) if m[i, col]]
        if not pivots:
            continue
        m[[rank, pivots[0]]] = m[[pivots[0], rank]]
        for i in range(m.shape[0]):
            if i != rank and m[i, col]:
                m[i] = (m[i] + m[rank]) % 2
        rank += 1
    return rank


def key_code(seed: int = 0) -> torch.Tensor:
    """``N_KEYS`` = 512 unit vectors in R^32 whose pairwise inner products are 0, +-1/4 or -1: the 8
    cosets of the Reed-Muller code RM(1,5) (64 words: the +-1 signs of the affine functions of 5
    bits) by quadratic forms whose pairwise sums all have rank 4 (so two words from different
    cosets agree on 16 +- 4 of 32 signs). Random unit vectors would have inner products up to ~0.6
    among 510 keys; this code keeps every wrong key at <= 1/4 of the right one."""
    gen = torch.Generator().manual_seed(seed)
    bits = torch.tensor([[(p >> i) & 1 for i in range(5)] for p in range(32)])
    upper = torch.triu_indices(5, 5, 1)
    while True:
        basis = torch.zeros(3, 5, 5, dtype=torch.long)
        basis[:, upper[0], upper[1]] = torch.randint(0, 2, (3, upper.shape[1]), generator=gen)
        forms = [sum(basis[i] * ((k >> i) & 1) for i in range(3)) % 2 for k in range(8)]
        if all(_gf2_rank(f + f.T) == 4 for f in forms[1:]):
            break
    quad = torch.stack([((bits @ f) * bits).sum(1) % 2 for f in forms])  # (8 forms, 32 points)
    lin = bits @ bits.T % 2  # (32 linear functions, 32 points)
    words = (quad[:, None, None] + lin[None, :, None] + torch.arange(2)[None, None, :, None]) % 2
    return (1.0 - 2.0 * words.reshape(8 * 32 * 2, 32).float()) / 32**0.5


# residual-stream layout of the constructed circuit (hidden 128): a constant, the key's code (A),
# the previous token's key code (B, written by layer 0), the value's code (V), a flag for <s> ? etc.
CONST, A_DIMS, B_DIMS, V_DIMS, SPECIAL = 0, slice(1, 33), slice(33, 65), slice(65, 97), 127


@torch.no_grad()
def induction_init(model: Any, pos_scale: float = 11.0, match_scale: float = 2.0, out_gain: float = 1.5,
                   unembed: float = 1.0, low_pairs: int = 16, rotate: bool = True) -> None:
    """Write a working induction circuit into a 2-layer, hidden-128, head-64 Llama (then train it).

    * embeddings: every token has the constant 8 at ``CONST``; a key has 8 x its :func:`key_code`
      word in ``A_DIMS``, a value 8 x +-e_i in ``V_DIMS`` (64 values = +-32 axes); all have norm
      sqrt(128), so the first RMSNorm is the identity;
    * layer 0 head 0: a previous-token head from the constant coordinate (query phase 0, key phase
      theta_j per RoPE pair, so the score sum_j cos((m - n - 1) theta_j) peaks at n = m - 1), whose
      OV copies the attended token's ``A_DIMS`` into ``B_DIMS``: a value position then holds the
      code of the key just before it;
    * layer 1 head 0: query = the current token's ``A_DIMS``, key = ``B_DIMS``, both on the
      ``low_pairs`` RoPE pairs that rotate least (with rope_theta 1e6 they turn by at most ~1 rad
      over 1,024 positions), so a query key matches the value position that follows its pair at
      any distance; its OV copies that value's ``V_DIMS``, which ``lm_head`` reads;
    * everything else (head 1 of each layer, the MLPs) is random with a zero output projection,
      so it starts silent and trains like the rest;
    * ``rotate``: then :func:`rotate_basis` (the same function in random bases).

    The scales give a sharp previous-token head and key match but a soft readout (cross-entropy
    ~0.3 on training sequences), which training then sharpens.
    """
    hd, inv = model.config.head_dim, model.model.rotary_emb.inv_freq.float()
    if (model.config.hidden_size, hd, len(model.model.layers)) != (128, 64, 2):
        raise ValueError("induction_init needs hidden_size=128, head_dim=64 and 2 layers (MODEL_CONFIG)")
    emb = model.model.embed_tokens.weight
    emb.zero_()
    emb[:, CONST] = 8.0
    emb[KEY0:VAL0, A_DIMS] = 8.0 * key_code()
    vcode = torch.zeros(N_VALUES, 32)
    vcode[torch.arange(N_VALUES), torch.arange(N_VALUES) % 32] = torch.where(torch.arange(N_VALUES) < 32, 1.0, -1.0)
    emb[VAL0:, V_DIMS] = 8.0 * vcode
    emb[:KEY0, SPECIAL] = 8.0
    for layer in model.model.layers:
        layer.mlp.down_proj.weight.zero_()
        layer.self_attn.o_proj.weight.zero_()
        for p in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            p.weight[:hd] = 0.0
        layer.input_layernorm.weight.fill_(1.0)
        layer.post_attention_layernorm.weight.fill_(1.0)
    model.model.norm.weight.fill_(1.0)
    a0, a1 = model.model.layers[0].self_attn, model.model.layers[1].self_attn
    a0.q_proj.weight[:hd, CONST] = torch.cat([torch.full_like(inv, pos_scale), torch.zeros_like(inv)]) / 8.0
    a0.k_proj.weight[:hd, CONST] = pos_scale * torch.cat([torch.cos(inv), torch.sin(inv)]) / 8.0
    a0.v_proj.weight[:32, A_DIMS] = torch.eye(32)
    a0.o_proj.weight[B_DIMS, :32] = torch.eye(32)
    half = hd // 2
    dims = torch.cat([torch.arange(half - low_pairs, half), torch.arange(hd - low_pairs, hd)])
    a1.q_proj.weight[dims, A_DIMS] = match_scale * torch.eye(32)[: 2 * low_pairs]
    a1.k_proj.weight[dims, B_DIMS] = match_scale * torch.eye(32)[: 2 * low_pairs]
    a1.v_proj.weight[:32, V_DIMS] = torch.eye(32)
    a1.o_proj.weight[V_DIMS, :32] = out_gain * torch.eye(32)
    model.lm_head.weight.zero_()
    model.lm_head.weight[VAL0:, V_DIMS] = unembed * vcode
    if rotate:
        rotate_basis(model, low_pairs)


def _orthogonal(n: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen))
    return q * torch.sign(torch.diagonal(r))


@torch.no_grad()
def rotate_basis(model: Any, low_pairs: int = 16, seed: int = 0) -> None:
    """Turn :func:`induction_init`'s axis-aligned circuit into an equivalent one in random bases, so
    that no activation is sparse or sits on a quantization grid: the residual stream by a random
    orthogonal R (embeddings and every projection that writes the stream times R, every
    projection that reads it times R^T; RMSNorm commutes because its weights are all 1 here), each
    head's value space by its own orthogonal matrix (v_proj and o_proj), and layer 1 head 0's
    query/key space on the ``low_pairs`` least-rotating RoPE pairs by one orthogonal mix (exact
    without RoPE; those pairs turn by at most ~1 rad over 1,024 positions, so the match survives).
    Without this, +-1 codes on single axes are exactly representable by any symmetric integer grid
    and KV quantization would look lossless on this model for a reason no trained model shares."""
    gen = torch.Generator().manual_seed(seed)
    hidden, hd = model.config.hidden_size, model.config.head_dim
    r = _orthogonal(hidden, gen)
    model.model.embed_tokens.weight.copy_(model.model.embed_tokens.weight @ r)
    model.lm_head.weight.copy_(model.lm_head.weight @ r)
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
            proj.weight.copy_(proj.weight @ r)
        for proj in (attn.o_proj, mlp.down_proj):
            proj.weight.copy_(r.T @ proj.weight)
        for h in range(model.config.num_attention_heads):
            rows = slice(h * hd, (h + 1) * hd)
            rv = _orthogonal(hd, gen)
            attn.v_proj.weight[rows] = rv.T @ attn.v_proj.weight[rows]
            attn.o_proj.weight[:, rows] = attn.o_proj.weight[:, rows] @ rv
    half = hd // 2
    dims = torch.cat([torch.arange(half - low_pairs, half), torch.arange(hd - low_pairs, hd)])
    mix = _orthogonal(2 * low_pairs, gen)
    a1 = model.model.layers[1].self_attn
    for proj in (a1.q_proj, a1.k_proj):
        proj.weight[dims] = mix @ proj.weight[dims]


INITS = {"random": lambda model: None, "prev-token": prev_token_init, "induction": induction_init}


def _defaults(fn: Any) -> dict[str, Any]:
    """Keyword defaults of an init function (what the shipped run used), for the training record."""
    import inspect

    return {k: v.default for k, v in inspect.signature(fn).parameters.items() if v.default is not inspect.Parameter.empty}


def train(out: Path, max_steps: int, max_minutes: float, lr: float, seed: int, threads: int,
          curriculum: list[tuple[int, int, int]] = CURRICULUM, advance_loss: float = 0.3, log_every: int = 50,
          init: str = "induction", **overrides: Any) -> dict[str, Any]:
    """Train the recall model on CPU and save it (float16 safetensors) with its training record, at
    every stage change and at the end (``max_steps`` or ``max_minutes``, whichever comes first).
    ``init``: ``"induction"`` (:func:`induction_init`), ``"prev-token"`` (:func:`prev_token_init`) or
    ``"random"``. ``overrides``: ``LlamaConfig`` fields that replace ``MODEL_CONFIG``'s."""
    if init not in INITS:
        raise ValueError(f"init={init!r}: use one of {sorted(INITS)}")
    torch.set_num_threads(threads)
    model = build_model(seed, **overrides).train()
    INITS[init](model)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50))
    gen = torch.Generator().manual_seed(TRAIN_SEED + seed)
    t0, log, stage, running = time.perf_counter(), [], 0, None
    record = dict(lr=lr, seed=seed, threads=threads, curriculum=curriculum, advance_loss=advance_loss,
                  init=init, init_args=_defaults(INITS[init]), log=log,
                  model=dict(MODEL_CONFIG, **overrides))
    for step in range(max_steps):
        length, batch, n_keys = curriculum[stage]
        n_pairs = (length - 2) // 4  # as many queries as pairs: length = 2 + 4 * n_pairs
        ids, labels = make_batch(gen, batch, n_pairs, n_pairs, n_keys=n_keys)
        loss = model(ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        elapsed = time.perf_counter() - t0
        if step % log_every == 0:
            log.append(dict(step=step, length=length, loss=round(running, 4), seconds=round(elapsed, 1)))
            print(f"[recall] step {step} len {length} loss {running:.4f} {elapsed:.0f} s", file=sys.stderr)
        if running < advance_loss and stage + 1 < len(curriculum):
            stage, running = stage + 1, None
            log.append(dict(step=step, advance_to=curriculum[stage][0], seconds=round(elapsed, 1)))
            print(f"[recall] step {step}: stage {curriculum[stage]}", file=sys.stderr)
            save(model, out, dict(record, steps=step + 1, train_seconds=round(elapsed, 1)))
        if elapsed > 60 * max_minutes:
            break
    record.update(steps=step + 1, train_seconds=round(time.perf_counter() - t0, 1), final_stage=curriculum[stage])
    save(model, out, record)
    return record


def save(model: Any, out: Path, record: dict[str, Any]) -> None:
    was_training = model.training
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.config.attn_implementation = None
    half = model.to(torch.float16)
    half.config.dtype = torch.float16
    half.save_pretrained(out)
    model.to(torch.float32)
    model.config.attn_implementation = "sdpa"
    model.train(was_training)
    (out / "training.json").write_text(json.dumps(record, indent=1) + "\n")


def accuracy_table(model: Any, contexts: list[int], n: int) -> dict[int, float]:
    return {c: evaluate(model, n=n, context=c) for c in contexts}


@torch.no_grad()
def change_from_init(model: Any) -> dict[str, float]:
    """How far training moved ``model`` from its constructed start (seed 0, :func:`induction_init`):
    ||W - W0|| / ||W0|| over all weights, and the largest such ratio of one tensor (whose W0 is
    not zero)."""
    start = build_model(0).eval()
    induction_init(start)
    trained, ref = dict(model.named_parameters()), dict(start.named_parameters())
    diff = {k: float((trained[k].float() - ref[k]).norm()) for k in ref}
    norm = {k: float(ref[k].norm()) for k in ref}
    worst = max((diff[k] / norm[k], k) for k in ref if norm[k] > 0)
    return dict(all=round(sum(d * d for d in diff.values()) ** 0.5 / sum(n * n for n in norm.values()) ** 0.5, 4),
                largest=round(worst[0], 4), largest_tensor=worst[1])


@torch.no_grad()
def previous_token_weight(model: Any, context: int = 256, n: int = 8) -> float:
    """Mean attention weight that layer 0 head 0 puts on the previous token over held-out prompts
    (1.0 for a perfect previous-token head): how well an init's first half of the circuit works."""
    prompts = eval_prompts(n, context)[0]
    impl = model.config._attn_implementation
    model.config._attn_implementation = "eager"  # sdpa returns no attention weights
    try:
        attn = model(prompts, output_attentions=True).attentions[0][:, 0]
    finally:
        model.config._attn_implementation = impl
    return float(attn.diagonal(offset=-1, dim1=1, dim2=2).mean())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train the recall model and save it")
    t.add_argument("--out", type=Path, default=ASSET)
    t.add_argument("--steps", type=int, default=1000, help="at most this many steps")
    t.add_argument("--minutes", type=float, default=60.0, help="at most this many minutes")
    t.add_argument("--advance-loss", type=float, default=0.4, help="next curriculum stage below this running loss")
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--layers", type=int, default=MODEL_CONFIG["num_hidden_layers"])
    t.add_argument("--hidden", type=int, default=MODEL_CONFIG["hidden_size"])
    t.add_argument("--heads", type=int, default=MODEL_CONFIG["num_attention_heads"])
    t.add_argument("--init-range", type=float, default=MODEL_CONFIG["initializer_range"], help="initializer_range")
    t.add_argument("--init", choices=sorted(INITS), default="induction",
                   help="induction: start from the constructed circuit (induction_init); prev-token: only layer 0 "
                        "head 0 as a previous-token head; random: the plain Llama initialisation")
    t.add_argument("--curriculum", type=parse_curriculum, default=FINE_TUNE,
                   help="TOKENS:BATCH[:KEYS] stages, short contexts first (default 1026:4; from random weights "
                        "the runs in the card used 34:64,66:32,130:16,258:8,514:4,1026:2)")
    e = sub.add_parser("evaluate", help="float accuracy of a recall model at several contexts")
    e.add_argument("--model", type=Path, default=ASSET)
    e.add_argument("--n", type=int, default=256, help="held-out prompts per context")
    e.add_argument("--contexts", type=int, nargs="+", default=[256, 512, 1024])
    e.add_argument("--threads", type=int, default=2)
    e.add_argument("--init", choices=sorted(set(INITS) - {"random"}), default=None,
                   help="evaluate a fresh seed-0 model with this init and no training, instead of --model")
    e.add_argument("--change-from-init", action="store_true",
                   help="also report how far the model's weights are from the constructed start (induction_init)")
    e.add_argument("--rope-theta", type=float, default=MODEL_CONFIG["rope_theta"], help="with --init")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.cmd == "train":
        record = train(args.out, args.steps, args.minutes, args.lr, args.seed, args.threads, args.curriculum, args.advance_loss,
                       num_hidden_layers=args.layers, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                       num_attention_heads=args.heads, num_key_value_heads=args.heads, initializer_range=args.init_range,
                       init=args.init)
        acc = accuracy_table(load_model(args.out), [256, 512, 1024], 128)
        record["float_accuracy_128_prompts"] = acc
        (args.out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
        print(json.dumps(dict(train_seconds=record["train_seconds"], accuracy=acc)))
    else:
        if args.init:
            model = build_model(0, rope_theta=args.rope_theta).eval()
            INITS[args.init](model)
        else:
            model = load_model(args.model)
        report = dict(n=args.n, accuracy=accuracy_table(model, args.contexts, args.n),
                      layer0_head0_previous_token_weight=round(previous_token_weight(model), 3))
        if args.change_from_init:
            report["change_from_init"] = change_from_init(model)
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
