"""DiTFastAttn on SD3 / Flux joint attention: every method of :class:`JointFastAttnProcessor` against a
float64 reference computed with the stock diffusers processors (a boolean mask for the window), the
all-full plan bit-identical to the original processors, the search, exact disable, save -> reload,
the FLOPs accounting and unsupported processors. Tiny random transformers built from configs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

diffusers = pytest.importorskip("diffusers")

from diffusers.models.attention_processor import JointAttnProcessor2_0  # noqa: E402

from piecewise_quant.integrations.diffusers import FastAttentionPlan, enable_fast_attention  # noqa: E402
from piecewise_quant.integrations.diffusers.fast_attention import (  # noqa: E402
    FastAttnProcessor,
    JointFastAttnProcessor,
    attention_layer_kind,
    planned_flops_saved,
    self_attention_layers,
)
from piecewise_quant.integrations.diffusers.window_attention import WindowSpec, window_indices  # noqa: E402

STEPS = 5
SMALL_WINDOW = dict(window=1, window_block=2)
# every method once, on every layer: step 0 full (caching the residual), 1 WA-RS, 2 WA-RS+ASC, 3 AST, 4 full+ASC
ROWS = ["full", "wars", "wars+asc", "ast", "full+asc"]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _pair_rel(a, b) -> float:
    a, b = (a if isinstance(a, tuple) else (a,)), (b if isinstance(b, tuple) else (b,))
    assert len(a) == len(b)
    return max(_rel(x, y) for x, y in zip(a, b))


def _add(a, b):
    return tuple(x + y for x, y in zip(a, b)) if isinstance(a, tuple) else a + b


def _sub(a, b):
    return tuple(x - y for x, y in zip(a, b)) if isinstance(a, tuple) else a - b


def _rows(a, sel):
    return tuple(x[sel] for x in a) if isinstance(a, tuple) else a[sel]


def _dup(a):
    return tuple(torch.cat([x, x]) for x in a) if isinstance(a, tuple) else torch.cat([a, a])


def _sd3_reference(attn, hidden_states, encoder_hidden_states, mask=None):
    """diffusers' JointAttnProcessor2_0, written out, with ``mask`` passed to the attention."""
    b = hidden_states.shape[0]
    q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    d = k.shape[-1] // attn.heads
    q, k, v = (t.view(b, -1, attn.heads, d).transpose(1, 2) for t in (q, k, v))
    q, k = attn.norm_q(q), attn.norm_k(k)
    ctx = encoder_hidden_states
    if ctx is not None:
        cq, ck, cv = (p(ctx).view(b, -1, attn.heads, d).transpose(1, 2)
                      for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        cq, ck = attn.norm_added_q(cq), attn.norm_added_k(ck)
        q, k, v = torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(b, -1, attn.heads * d)
    n = hidden_states.shape[1]
    if ctx is None:  # SD3.5's second (image-only) attention
        return attn.to_out[1](attn.to_out[0](o))
    img, txt = o[:, :n], o[:, n:]
    if not attn.context_pre_only:
        txt = attn.to_add_out(txt)
    return attn.to_out[1](attn.to_out[0](img)), txt


def _window_mask(n_img: int, n_txt: int, image_first: bool, spec: WindowSpec, grid) -> torch.Tensor:
    """(1, 1, N, N) boolean mask: each image query sees its block's window of image keys and every text
    key; text queries see everything."""
    n = n_img + n_txt
    i0 = 0 if image_first else n_txt
    mask = torch.ones(n, n, dtype=torch.bool)
    qi, ki = window_indices(n_img, spec, grid)
    text = torch.arange(n_img, n) if image_first else torch.arange(n_txt)
    for blk in range(qi.shape[0]):  # later blocks win for queries two blocks share, as in window_attention
        for t in qi[blk].tolist():
            mask[i0 + t] = False
            mask[i0 + t, i0 + ki[blk]] = True
            mask[i0 + t, text] = True
    return mask[None, None]


def _sd35(dfh):
    """The tiny SD3 with SD3.5's QK RMS-norms and, in block 0, its second (image-only) attention."""
    torch.manual_seed(0)
    return diffusers.SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=dfh.TEXT_DIM, caption_projection_dim=32, pooled_projection_dim=dfh.POOLED_DIM, out_channels=4,
        pos_embed_max_size=16, qk_norm="rms_norm", dual_attention_layers=(0,),
    ).eval()


class _Model:
    """A tiny float64 SD3(.5) or Flux transformer with 64 image tokens (8x8 patch grid) and CFG inputs."""

    def __init__(self, dfh, kind: str):
        self.kind = kind
        self.model = (_sd35(dfh) if kind == "sd3" else dfh.tiny_flux()).double()
        self.n_txt = dfh.N_TEXT_TOKENS
        self.dfh = dfh

    def inputs(self, seed: int) -> dict:
        g = torch.Generator().manual_seed(seed)
        d = self.dfh
        cond = torch.randn(1, self.n_txt, d.TEXT_DIM, generator=g, dtype=torch.float64)
        pooled = torch.randn(1, d.POOLED_DIM, generator=g, dtype=torch.float64)
        emb, pool = torch.cat([torch.zeros_like(cond), cond]), torch.cat([torch.zeros_like(pooled), pooled])
        if self.kind == "sd3":  # 16x16 latents, 2x2 patches
            x = torch.randn(1, 4, 16, 16, generator=g, dtype=torch.float64).repeat(2, 1, 1, 1)
            return dict(hidden_states=x, timestep=torch.full((2,), 500.0, dtype=torch.float64),
                        encoder_hidden_states=emb, pooled_projections=pool)
        x = torch.randn(1, 64, 16, generator=g, dtype=torch.float64).repeat(2, 1, 1)
        rows, cols = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
        img_ids = torch.stack([torch.zeros(64), rows.reshape(-1).double(), cols.reshape(-1).double()], -1)
        return dict(hidden_states=x, timestep=torch.full((2,), 0.5, dtype=torch.float64), encoder_hidden_states=emb,
                    pooled_projections=pool, txt_ids=torch.zeros(self.n_txt, 3, dtype=torch.float64), img_ids=img_ids)


def _pipe_for(dfh, m: _Model):
    return dfh.text_pipeline(m.model)


@pytest.mark.parametrize("kind,shape", [("sd3", "1d"), ("sd3", "2d"), ("flux", "1d"), ("flux", "2d")])
def test_every_method_matches_a_float64_reference(dfh, kind, shape):
    m = _Model(dfh, kind)
    pipe = _pipe_for(dfh, m)
    layers = [n for n, _ in self_attention_layers(m.model)]
    kinds = {n: attention_layer_kind(m.model.get_submodule(n)) for n in layers}
    assert set(kinds.values()) == ({"sd3_joint", "self"} if kind == "sd3" else {"flux_joint", "flux_single"})
    spec = WindowSpec(1, shape, 2)
    plan = FastAttentionPlan([[r] * len(layers) for r in ROWS], layers, spec)
    enable_fast_attention(pipe, plan=plan)
    state = m.model._piecewise_fast_attention.state
    seen: dict[str, dict[int, tuple]] = {n: {} for n in layers}
    for n in layers:
        def hook(mod, args, kwargs, out, n=n):
            seen[n][state.step] = ({k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()},
                                   tuple(o.clone() for o in out) if isinstance(out, tuple) else out.clone())
        m.model.get_submodule(n).register_forward_hook(hook, with_kwargs=True)
    sched = pipe.scheduler
    sched.set_timesteps(STEPS)
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            inp = m.inputs(10 + i)
            out = m.model(**inp, return_dict=False)[0]
            sched.step(out, t, inp["hidden_states"])
    assert state.step is None and all(c.output is None and c.residual is None for c in state.caches)  # freed
    assert state.grid == (8, 8) and state.text_tokens == m.n_txt
    flops = state.last_call_flops
    expected = planned_flops_saved(plan, 64, m.model.get_submodule(layers[0]).to_q.out_features, True,
                                   text_tokens=m.n_txt, kinds=list(kinds.values()), grid=(8, 8))
    assert 1 - flops.done / flops.dense == pytest.approx(expected, rel=1e-12)
    assert 0.3 < expected < 1
    cond = slice(1, 2)  # the tiny pipeline's zero embeddings make the first half unconditional
    for n in layers:
        attn = m.model.get_submodule(n)
        proc = attn.processor
        assert isinstance(proc, JointFastAttnProcessor if kinds[n] != "self" else FastAttnProcessor)
        orig, lk = proc.original, kinds[n]
        n_txt = 0 if lk == "self" else m.n_txt
        n_img = 64 if lk != "flux_single" else seen[n][0][0]["hidden_states"].shape[1] - n_txt
        mask = _window_mask(n_img, n_txt, lk in ("sd3_joint", "self"), spec, (8, 8))
        assert mask[0, 0].sum(1).min() < mask.shape[-1] - n_txt  # the window drops image keys

        def full(kw, sel=slice(None), attn=attn, orig=orig, lk=lk):
            kw = {k: (v[sel] if k in ("hidden_states", "encoder_hidden_states") else v) for k, v in kw.items()}
            if lk in ("sd3_joint", "self"):
                return orig(attn, kw["hidden_states"], kw.get("encoder_hidden_states"))
            return orig(attn, kw["hidden_states"], kw.get("encoder_hidden_states"), None, kw["image_rotary_emb"])

        def window(kw, sel=slice(None), attn=attn, orig=orig, lk=lk, mask=mask):
            kw = {k: (v[sel] if k in ("hidden_states", "encoder_hidden_states") else v) for k, v in kw.items()}
            if lk in ("sd3_joint", "self"):
                return _sd3_reference(attn, kw["hidden_states"], kw.get("encoder_hidden_states"), mask)
            return orig(attn, kw["hidden_states"], kw.get("encoder_hidden_states"), mask, kw["image_rotary_emb"])

        with torch.no_grad():
            if lk in ("sd3_joint", "self"):  # the written-out reference is the stock processor
                kw0 = seen[n][0][0]
                assert _pair_rel(_sd3_reference(attn, kw0["hidden_states"], kw0.get("encoder_hidden_states")), full(kw0)) < 1e-14
            (in0, out0), (in1, out1), (in2, out2), (_, out3), (in4, out4) = (seen[n][i] for i in range(STEPS))
            assert _pair_rel(out0, full(in0)) < 1e-12  # full, computed here (the residual is cached)
            residual = _sub(full(in0), window(in0))
            assert _pair_rel(window(in1), full(in1)) > 1e-3  # the window is not full attention
            assert _pair_rel(out1, _add(window(in1), residual)) < 1e-12  # WA-RS
            half = _add(window(in2, cond), _rows(residual, cond))
            assert _pair_rel(out2, _dup(half)) < 1e-12  # WA-RS + ASC: the cond branch's result in both halves
            assert all(torch.equal(a, b) for a, b in zip(out3, out2)) if isinstance(out3, tuple) else torch.equal(out3, out2)
            assert _pair_rel(out4, _dup(full(in4, cond))) < 1e-12  # full + ASC


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_all_full_plan_is_bit_identical_and_disable_restores(dfh, kind):
    model = dfh.tiny_sd3() if kind == "sd3" else dfh.tiny_flux()
    pipe = dfh.text_pipeline(model)
    run = lambda: pipe(["a cat"], num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0))[0]  # noqa: E731
    ref = run()
    inputs = dfh.denoiser_inputs(model)
    positional = (inputs.pop("hidden_states"), inputs.pop("encoder_hidden_states"))
    direct = model(*positional, **inputs, return_dict=False)[0]
    procs = {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}
    layers = [n for n, _ in self_attention_layers(model)]
    report = enable_fast_attention(pipe, plan=FastAttentionPlan([["wars" if i % 2 else "full"] * len(layers)
                                                                 for i in range(STEPS)], layers, WindowSpec(1, block=2)))
    # outside a pipeline call: the stock processors' full attention, whatever the plan says
    assert torch.equal(model(*positional, **inputs, return_dict=False)[0], direct)
    pipe.disable_fast_attention()
    report = enable_fast_attention(pipe, plan=FastAttentionPlan([["full"] * len(layers)] * STEPS, layers, WindowSpec(1, block=2)))
    assert report.method_counts["full"] == STEPS * len(layers)
    assert all(isinstance(model.get_submodule(n).processor, JointFastAttnProcessor) for n in layers)
    assert torch.equal(run(), ref)
    pipe.disable_fast_attention()
    assert all(m.processor is procs[n] for n, m in model.named_modules() if hasattr(m, "processor"))
    assert torch.equal(run(), ref)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_search_proposes_window_for_joint_layers_and_save_reload(dfh, kind, tmp_path):
    model = dfh.tiny_sd3() if kind == "sd3" else dfh.tiny_flux()
    pipe = dfh.text_pipeline(model)
    run = lambda p: p(["a cat"], num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0))[0]  # noqa: E731
    ref = run(pipe)
    report = pipe.enable_fast_attention(threshold=0.3, calibration_prompts=["a cat", "a dog"], num_inference_steps=STEPS,
                                        candidates=["wars+asc", "wars"], **SMALL_WINDOW)
    methods = [x for row in report.plan.methods for x in row]
    assert report.plan.methods[0] == ["full"] * len(report.plan.layers)
    assert any(x.startswith("wars") for x in methods)
    assert any("uncond_first" in k for k in report.cfg_detected)
    assert 0 < report.attention_flops_saved < 1
    out = run(pipe)
    assert torch.isfinite(out).all() and 0 < dfh.rel_err(out, ref) < 0.5
    pipe.save_pretrained(tmp_path)
    again = type(pipe).from_pretrained(tmp_path)
    again.set_progress_bar_config(disable=True)
    assert isinstance(again.transformer.get_submodule(report.plan.layers[0]).processor, JointFastAttnProcessor)
    assert torch.equal(run(again), out)
    again.disable_fast_attention()
    assert torch.equal(run(again), ref)
    pipe.disable_fast_attention()
    assert torch.equal(run(pipe), ref)


def test_unsupported_processors_and_mismatched_plans_are_named(dfh):
    class MyJointProcessor(JointAttnProcessor2_0):
        pass

    sd3 = dfh.tiny_sd3()
    sd3.set_attn_processor(MyJointProcessor())
    pipe = dfh.text_pipeline(sd3)
    assert self_attention_layers(sd3) == []
    with pytest.raises(ValueError, match="transformer_blocks.0.attn: MyJointProcessor, and 1 more.*set_attn_processor"):
        pipe.enable_fast_attention(threshold=0.1)
    flux = dfh.text_pipeline(dfh.tiny_flux())
    layers = [n for n, _ in self_attention_layers(dfh.tiny_sd3())]
    with pytest.raises(ValueError, match="plan is for 2 self-attention layers but 'transformer' .* has 3"):
        flux.enable_fast_attention(plan=FastAttentionPlan([["full"] * 2], layers, WindowSpec(1)))
    assert not hasattr(flux.transformer, "_piecewise_fast_attention")


def test_flux_fused_projections_run_the_same_plan(dfh):
    outs = []
    for fused in (False, True):
        model = dfh.tiny_flux()
        if fused:
            model.fuse_qkv_projections()
            assert model.transformer_blocks[0].attn.fused_projections
        pipe = dfh.text_pipeline(model)
        layers = [n for n, _ in self_attention_layers(model)]
        enable_fast_attention(pipe, plan=FastAttentionPlan([[r] * len(layers) for r in ROWS], layers, WindowSpec(1, block=2)))
        outs.append(pipe(["a cat"], num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0))[0])
    assert _rel(outs[1], outs[0]) < 1e-5


def test_processor_errors_name_the_problem(dfh):
    from piecewise_quant.integrations.diffusers.fast_attention import FastAttnState

    model = dfh.tiny_flux()
    names = [n for n, _ in self_attention_layers(model)]
    spec = WindowSpec(1, block=2)
    state = FastAttnState(names, spec)
    state.plan = FastAttentionPlan([["full"] * 3, ["ast"] * 3], names, spec)
    state.step = 1
    dual, single = model.transformer_blocks[0].attn, model.single_transformer_blocks[0].attn
    x, ctx = torch.randn(1, 16, 32), torch.randn(1, 6, 32)
    proc = JointFastAttnProcessor(dual.processor, 0, state, "flux_joint")
    with pytest.raises(ValueError, match="without an attention mask"):
        proc(dual, x, ctx, attention_mask=torch.ones(1, 1, 22, 22, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="'ast' at step 1 but no output of the previous step is cached"):
        proc(dual, x, ctx)
    with pytest.raises(RuntimeError, match="text length of this call is None.*encoder_hidden_states"):
        JointFastAttnProcessor(single.processor, 1, state, "flux_single")(single, torch.randn(1, 22, 32))
    with pytest.raises(ValueError, match="unknown joint attention kind 'sd4'"):
        JointFastAttnProcessor(single.processor, 1, state, "sd4")


def test_composes_with_enable_quant_on_sd3(dfh):
    import piecewise_quant as pq

    w8a8 = pq.PiecewiseQuantConfig(bits=8, grid="uniform", group_size="channel", act_bits=8,
                                   act_mode="static_per_tensor", modules_to_not_convert=[])
    pipe = dfh.text_pipeline(dfh.tiny_sd3())
    run = lambda: pipe(["a cat"], num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0))[0]  # noqa: E731
    ref = run()
    kw = dict(calibration_prompts=["a cat", "a dog"], num_inference_steps=STEPS)
    pipe.enable_fast_attention(threshold=0.3, candidates=["wars+asc", "wars"], **kw, **SMALL_WINDOW)
    fa_only = run()
    pipe.enable_quant(w8a8, progress=False, **kw)  # activation scales calibrated through the plan's steps
    assert any(type(m.to_q).__name__ == "DiffusionQuantLinear" for _, m in self_attention_layers(pipe.transformer))
    both = run()
    assert torch.isfinite(both).all() and 0 < dfh.rel_err(both, fa_only) < 0.5
    pipe.disable_quant()
    assert torch.equal(run(), fa_only)
    pipe.disable_fast_attention()
    assert torch.equal(run(), ref)
