"""The text-conditioned digits benchmark runs end to end in quick mode (a 20-step joint training run of
the tokenizer/encoder/PixArt model, a handwritten-digit judge, a few images per configuration), so the
script cannot rot; its table and JSON agree, and the BOS-aware rows find the layers that read the text."""

from __future__ import annotations

import json
import math

import pytest
from pq_bench import quick_table_rows

pytest.importorskip("diffusers")
pytest.importorskip("sklearn")
pytest.importorskip("tokenizers")


@pytest.mark.slow
def test_quick_run_prints_the_table_and_writes_json_png_and_the_model(repo_root, tmp_path):
    rows, stdout = quick_table_rows(repo_root, "benchmarks/text_digits.py", tmp_path)
    assert list(rows) == ["float", "W8A8 static, shared scales", "W8A8 static, shared scales + BOS-aware"]
    data = json.loads((tmp_path / "text_digits.json").read_text())
    assert (tmp_path / "text_digits.png").stat().st_size > 1000
    for part in ("transformer/config.json", "text_encoder/config.json", "tokenizer/tokenizer.json", "training.json"):
        assert (tmp_path / "model" / part).is_file(), part
    by_name = {r["name"]: r for r in data["rows"]}
    for name, r in by_name.items():
        assert f"{r['accuracy']:.3f}" == rows[name][3] and f"{r['fd']:.2f}" == rows[name][4]
        assert 0.0 <= r["accuracy"] <= 1.0 and r["fd"] >= 0
    assert math.isinf(by_name["float"]["psnr_vs_float"])
    assert by_name["W8A8 static, shared scales"]["psnr_vs_float"] > 30
    # the causal encoder's token 0 is one vector for every prompt, and the BOS-aware row found the
    # caption projection and the cross-attention K/V of every block
    assert data["text_embeddings"]["token0_max_spread_across_prompts"] < 1e-5
    bos = by_name["W8A8 static, shared scales + BOS-aware"]
    assert sorted(bos["bos_layers"]) == ["caption_projection.linear_1", "caption_projection.linear_2"] + [
        f"transformer_blocks.{i}.attn2.to_{kv}" for i in range(2) for kv in "kv"]
    assert bos["psnr_vs_float"] > 30
    assert "Text embeddings: token 0 max|x|" in stdout
    assert data["settings"]["eval_templates"] and data["settings"]["calibration_prompts"]
