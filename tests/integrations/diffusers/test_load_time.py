"""Load-time API: ``Model.from_pretrained(..., quantization_config=PiecewiseQuantConfig(...))`` for
DiT, PixArt, SD3 and Flux transformers, ``PipelineQuantizationConfig(quant_backend="piecewise")``,
save -> plain reload bit-identical, and checkpoints that do not match their config."""

from __future__ import annotations

import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import piecewise_quant as pq  # noqa: E402
from piecewise_quant.integrations.diffusers import (  # noqa: E402
    CheckpointMismatchError,
    DiffusionQuantLinear,
    PiecewiseDiffusersConfig,
    diffusion_recipe,
)

MODELS = ["tiny_dit", "tiny_pixart", "tiny_sd3", "tiny_flux"]


@pytest.fixture(scope="module")
def saved_float(tmp_path_factory, dfh):
    """Each tiny transformer saved in float, with its float output on fixed inputs."""
    out = {}
    for name in MODELS:
        model = getattr(dfh, name)()
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        x = dfh.denoiser_inputs(model)
        out[name] = (type(model), path, x, dfh.denoise(model, x))
    return out


# (config, bound on the relative error of the denoiser output vs float)
CONFIGS = {
    "w8-uniform": (pq.PiecewiseQuantConfig(bits=8, grid="uniform", group_size="channel", modules_to_not_convert=[]), 0.01),
    "w4-piecewise-g16": (pq.PiecewiseQuantConfig(bits=4, group_size=16, modules_to_not_convert=[]), 0.10),
    "w8a8-dynamic": (
        pq.PiecewiseQuantConfig(bits=8, grid="uniform", group_size="channel", act_bits=8, modules_to_not_convert=[]), 0.03
    ),
    "recipe-w4a8-group16": (
        PiecewiseDiffusersConfig(core=diffusion_recipe(bits=4, group_size=16, act_bits=8), diffusion={"act_group_size": 16}),
        0.10,
    ),
}


@pytest.mark.parametrize("cfg_name", list(CONFIGS))
@pytest.mark.parametrize("model_name", MODELS)
def test_quantize_on_load_then_save_and_reload(saved_float, dfh, tmp_path, model_name, cfg_name):
    cls, path, x, ref = saved_float[model_name]
    config, bound = CONFIGS[cfg_name]
    model = cls.from_pretrained(path, quantization_config=config)
    layers = [m for m in model.modules() if isinstance(m, DiffusionQuantLinear)]
    assert layers and not any(type(m) is torch.nn.Linear for m in model.modules())
    out = dfh.denoise(model, x)
    assert dfh.rel_err(out, ref) < bound
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "piecewise"
    reloaded = cls.from_pretrained(tmp_path)  # plain: the config comes from config.json
    assert torch.equal(dfh.denoise(reloaded, x), out)
    for (n1, t1), (n2, t2) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert n1 == n2 and t1.dtype == t2.dtype and torch.equal(t1, t2)


def test_recipe_puts_conditioning_layers_on_uniform_8_bit(saved_float):
    cls, path, _, _ = saved_float["tiny_dit"]
    model = cls.from_pretrained(path, quantization_config=diffusion_recipe(bits=4, group_size=16))
    blk = model.transformer_blocks[0]
    for m in (blk.norm1.linear, blk.norm1.emb.timestep_embedder.linear_1, model.proj_out_1):
        assert (m.spec.grid, m.spec.bits, m.spec.act_bits) == ("uniform", 8, None)
    for m in (blk.attn1.to_q, blk.attn1.to_out[0], blk.ff.net[0].proj, blk.ff.net[2]):
        assert (m.spec.grid, m.spec.bits) == ("piecewise", 4)
    assert (model.proj_out_2.spec.grid, model.proj_out_2.spec.bits, model.proj_out_2.spec.act_bits) == ("uniform", 8, None)


@pytest.mark.parametrize("model_name", ["tiny_pixart", "tiny_sd3", "tiny_flux"])
def test_recipe_keeps_the_output_projection_on_8_bit_float_acts(saved_float, model_name):
    cls, path, _, _ = saved_float[model_name]
    recipe = diffusion_recipe(bits=4, group_size=16, act_bits=4)
    model = cls.from_pretrained(path, quantization_config=recipe)
    assert (model.proj_out.spec.grid, model.proj_out.spec.bits, model.proj_out.spec.act_bits) == ("uniform", 8, None)
    low = [m for n, m in model.named_modules() if isinstance(m, DiffusionQuantLinear) and ".to_q" in n]
    assert low and all((m.spec.bits, m.spec.act_bits) == (4, 4) for m in low)
    # output_layer=False: the final projection is quantized like the attention/MLP projections
    model = cls.from_pretrained(path, quantization_config=diffusion_recipe(bits=4, group_size=16, act_bits=4,
                                                                            output_layer=False))
    assert (model.proj_out.spec.grid, model.proj_out.spec.bits, model.proj_out.spec.act_bits) == ("piecewise", 4, 4)


def test_recipe_output_patterns_match_only_the_top_level_projection():
    recipe = diffusion_recipe(bits=4, group_size=16, act_bits=4)
    for name in ("proj_out", "proj_out_2"):
        assert (recipe.spec_for(name).bits, recipe.spec_for(name).act_bits) == (8, None)
    # a UNet's inner transformer projections and the blocks' own layers keep the low-bit scheme
    for name in ("down_blocks.0.attentions.0.proj_out", "transformer_blocks.0.ff.net.2", "mid_block.attentions.0.proj_out"):
        assert (recipe.spec_for(name).bits, recipe.spec_for(name).act_bits) == (4, 4)
    # the user's own overrides take precedence over the recipe's
    mine = diffusion_recipe(bits=4, group_size=16, act_bits=4, overrides={"proj_out": {"bits": 4, "act_bits": 4}})
    assert (mine.spec_for("proj_out").bits, mine.spec_for("proj_out").act_bits) == (4, 4)


def test_pipeline_quantization_config_backend(dfh, tmp_path):
    pipe = dfh.dit_pipeline()
    pipe.save_pretrained(tmp_path)
    ref = dfh.dit_images(pipe)
    pqc = diffusers.quantizers.PipelineQuantizationConfig(
        quant_backend="piecewise",
        quant_kwargs={"bits": 8, "grid": "uniform", "group_size": "channel", "modules_to_not_convert": []},
        components_to_quantize=["transformer"],
    )
    loaded = diffusers.DiffusionPipeline.from_pretrained(tmp_path, quantization_config=pqc)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.transformer.transformer_blocks[0].attn1.to_q, DiffusionQuantLinear)
    assert not any(isinstance(m, pq.QuantLinear) for m in loaded.vae.modules())
    assert float((dfh.dit_images(loaded) - ref).abs().max()) < 0.02
    # a quant_mapping with the diffusers config class works too
    mapping = diffusers.quantizers.PipelineQuantizationConfig(
        quant_mapping={"transformer": PiecewiseDiffusersConfig(bits=8, group_size="channel", modules_to_not_convert=[])}
    )
    loaded2 = diffusers.DiffusionPipeline.from_pretrained(tmp_path, quantization_config=mapping)
    assert isinstance(loaded2.transformer.proj_out_2, DiffusionQuantLinear)


def test_static_activations_and_calibration_are_refused_on_load(saved_float):
    cls, path, _, _ = saved_float["tiny_dit"]
    static = pq.PiecewiseQuantConfig(bits=8, group_size="channel", act_bits=8, act_mode="static_per_tensor",
                                     modules_to_not_convert=[])
    with pytest.raises(ValueError, match="need calibration through the pipeline.*enable_quant"):
        cls.from_pretrained(path, quantization_config=static)
    with pytest.raises(ValueError, match="calibration recipe.*enable_quant"):
        cls.from_pretrained(path, quantization_config=pq.PiecewiseQuantConfig(bits=8, group_size="channel", calibration="gptq"))
    with pytest.raises(ValueError, match="would quantize nothing"):
        cls.from_pretrained(path, quantization_config=pq.PiecewiseQuantConfig(modules_to_not_convert=["*"]))
    with pytest.raises(ValueError, match="unknown diffusion options"):
        PiecewiseDiffusersConfig(bits=8, diffusion={"act_group": 16})
    with pytest.raises(ValueError, match="rotation.*changes each float weight.*enable_quant"):
        cls.from_pretrained(path, quantization_config=pq.PiecewiseQuantConfig(bits=8, rotation="quip"))


def test_checkpoint_that_does_not_match_its_config_is_refused(saved_float, tmp_path):
    from safetensors.torch import load_file, save_file

    cls, path, _, _ = saved_float["tiny_dit"]
    cfg = pq.PiecewiseQuantConfig(bits=4, group_size=16, modules_to_not_convert=[])
    cls.from_pretrained(path, quantization_config=cfg).save_pretrained(tmp_path)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    key = "transformer_blocks.0.attn1.to_q.scales"
    # wrong dtype: would silently change every scale if it were cast
    state[key] = state[key].to(torch.float32)
    save_file(state, weights)
    with pytest.raises(CheckpointMismatchError, match=r"to_q\.scales.*torch\.float32.*torch\.float16"):
        cls.from_pretrained(tmp_path)
    # missing tensor
    del state[key]
    save_file(state, weights)
    with pytest.raises(CheckpointMismatchError, match=r"to_q\.scales' was not found"):
        cls.from_pretrained(tmp_path)
    # a config that plans other layers than the checkpoint holds (8-bit where 4-bit was saved)
    cfg_path = tmp_path / "config.json"
    conf = json.loads(cfg_path.read_text())
    conf["quantization_config"]["bits"] = 8
    cfg_path.write_text(json.dumps(conf))
    with pytest.raises(CheckpointMismatchError, match="shape"):
        cls.from_pretrained(tmp_path)


def test_layers_compute_in_the_dtype_the_model_is_loaded_in(saved_float, dfh, tmp_path):
    """A float16 file loaded as float32 (diffusers' default) gives float32 layers, so
    ``dequantize()`` puts float32 ``nn.Linear`` layers back and the model still runs."""
    cls, path, x, _ = saved_float["tiny_dit"]
    half = tmp_path / "fp16"
    cls.from_pretrained(path).to(torch.float16).save_pretrained(half)
    model = cls.from_pretrained(half,
                                quantization_config=pq.PiecewiseQuantConfig(bits=4, group_size=16, modules_to_not_convert=[]))
    layers = [m for m in model.modules() if isinstance(m, DiffusionQuantLinear)]
    assert layers and {m.compute_dtype for m in layers} == {torch.float32}
    assert {m.bias.dtype for m in layers if m.bias is not None} == {torch.float32}
    quantized = dfh.denoise(model, x)
    model.dequantize()
    assert not any(isinstance(m, pq.QuantLinear) for m in model.modules())
    assert {m.weight.dtype for m in model.modules() if type(m) is torch.nn.Linear} == {torch.float32}
    assert torch.allclose(dfh.denoise(model, x), quantized, rtol=1e-4, atol=1e-4)


def test_the_core_checkpoint_error_catches_diffusers_mismatches(saved_float, tmp_path):
    """One ``CheckpointMismatchError`` for every loader: the diffusers name is the core class, so
    ``except piecewise_quant.CheckpointMismatchError`` catches a diffusers checkpoint mismatch."""
    from safetensors.torch import load_file, save_file

    from piecewise_quant import checkpoint, errors
    from piecewise_quant.integrations.diffusers import quantizer

    assert CheckpointMismatchError is pq.CheckpointMismatchError is quantizer.CheckpointMismatchError
    assert errors.CheckpointMismatchError is checkpoint.CheckpointMismatchError is pq.CheckpointMismatchError
    cls, path, _, _ = saved_float["tiny_dit"]
    cls.from_pretrained(path, quantization_config=pq.PiecewiseQuantConfig(bits=4, group_size=16)).save_pretrained(tmp_path)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    del state["transformer_blocks.0.attn1.to_q.scales"]
    save_file(state, weights)
    try:
        cls.from_pretrained(tmp_path)
    except pq.CheckpointMismatchError as exc:
        assert "to_q.scales' was not found" in str(exc)
    else:
        pytest.fail("a checkpoint with a missing tensor loaded")


def test_recipe_output_layer_through_enable_quant(dfh):
    pipe = dfh.dit_pipeline()
    pipe.enable_quant(diffusion_recipe(bits=4, group_size=16, act_bits=4))
    out = pipe.transformer.proj_out_2
    assert isinstance(out, DiffusionQuantLinear)
    assert (out.spec.grid, out.spec.bits, out.spec.act_bits) == ("uniform", 8, None)
    ff = pipe.transformer.transformer_blocks[0].ff.net[2]
    assert (ff.spec.grid, ff.spec.bits, ff.spec.act_bits) == ("piecewise", 4, 4)


def test_recipe_low_rank_goes_to_the_low_bit_layers_only(saved_float):
    cls, path, _, _ = saved_float["tiny_dit"]
    model = cls.from_pretrained(path, quantization_config=diffusion_recipe(bits=4, group_size=16, act_bits=4, low_rank=1.0))
    blk = model.transformer_blocks[0]
    for m in (blk.norm1.linear, model.proj_out_1, model.proj_out_2):
        assert m.spec.low_rank is None and m.spec.bits == 8
    for m in (blk.attn1.to_q, blk.ff.net[2]):
        assert m.spec.low_rank == 1.0 and m.spec.bits == 4
    # a 1-output projection (a 1-channel model with 1x1 patches, as assets/dit-digits16) has no room
    # for a rank-1 branch: the recipe plans it without one instead of refusing the model
    def one_channel() -> torch.nn.Module:
        torch.manual_seed(0)
        return diffusers.DiTTransformer2DModel(
            num_attention_heads=2, attention_head_dim=16, in_channels=1, out_channels=1, num_layers=1, sample_size=4,
            patch_size=1, num_embeds_ada_norm=1000, norm_type="ada_norm_zero").eval()

    one = one_channel()
    assert one.proj_out_2.weight.shape == (1, 32)
    pq.quantize(one, diffusion_recipe(bits=4, group_size=16, act_bits=4, low_rank=1.0))
    assert one.proj_out_2.spec.low_rank is None and one.transformer_blocks[0].ff.net[2].spec.low_rank == 1.0
    with pytest.raises(ValueError, match="proj_out_2.*low_rank"):
        pq.quantize(one_channel(), pq.PiecewiseQuantConfig(bits=4, group_size=16, low_rank=1.0, modules_to_not_convert=[]))
    # with 4-bit conditioning weights the branch stays on those layers too
    four = diffusion_recipe(bits=4, group_size=16, act_bits=4, low_rank=1.0, conditioning_bits=4, conditioning_grid="piecewise")
    assert four.spec_for("transformer_blocks.0.norm1.linear").low_rank == 1.0


def test_conditioning_scheme_is_the_recipes_override():
    from piecewise_quant.integrations.diffusers.recipes import conditioning_scheme

    assert conditioning_scheme() == {"grid": "uniform", "bits": 8, "act_bits": None, "low_rank": None, "group_size": "channel"}
    assert conditioning_scheme(4, "piecewise") == {"grid": "piecewise", "bits": 4, "act_bits": None}
    cfg = pq.PiecewiseQuantConfig(bits=4, group_size=16, act_bits=4, low_rank=1.0,
                                  overrides={"proj_out_2": conditioning_scheme()})
    assert cfg.spec_for("proj_out_2") == diffusion_recipe(bits=4, group_size=16, act_bits=4, low_rank=1.0).spec_for("proj_out_2")
