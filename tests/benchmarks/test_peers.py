"""benchmarks/peers.py: the peer toolkits quantize the bundled Llama to a sane perplexity (slow,
skipped when a peer is not installed); availability reporting and errors (fast)."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
from pq_bench import load_script

torch = pytest.importorskip("torch")

REPO = Path(__file__).resolve().parent.parent.parent


peers = load_script(REPO / "benchmarks" / "peers.py", "benchmark_peers")

# peer key -> exact bits per weight on the float32 tiny Llama at 4 bits, group 128
EXPECTED_BPW = {
    "quanto": 4 + (32 + 32) / 128,  # packed uint4 codes, float32 scale + float32 shift per group
    "torchao": 4 + (32 + 8) / 128,  # int4 codes (held in int8 on CPU), float32 scale + int8 zero point
    "auto-round-rtn": 4 + (16 + 4) / 128,  # auto_round:auto_gptq export: float16 scale + packed 4-bit zero
}


def test_available_peers_lists_every_peer_with_a_label_or_a_reason():
    avail = peers.available_peers()
    assert set(peers.PEERS) <= set(avail)
    assert {"llmcompressor-gptq", "torchao-gptq"} <= set(avail)
    for key, label in avail.items():
        assert isinstance(label, str) and label
        if key in peers.UNUSABLE or peers.peer_version(key) is None:
            assert label.startswith("unavailable: ")
        else:
            assert peers.peer_version(key) in label  # toolkit version in the label


def test_run_peer_errors():
    model = torch.nn.Sequential(torch.nn.Linear(256, 256))
    with pytest.raises(ValueError, match="unknown peer"):
        peers.run_peer("no-such-peer", model, None, None)
    with pytest.raises(RuntimeError, match="transformers"):
        peers.run_peer("llmcompressor-gptq", model, None, None)


def test_not_installed_peer_raises_a_clear_runtime_error(monkeypatch):
    monkeypatch.setattr(peers, "peer_version", lambda key: None)
    assert peers.available_peers()["quanto"].startswith("unavailable: optimum-quanto is not installed")
    with pytest.raises(RuntimeError, match="not installed.*pip install optimum-quanto"):
        peers.run_peer("quanto", torch.nn.Sequential(torch.nn.Linear(256, 256)), None, None)


def test_target_linears_skips_the_output_embedding():
    class LM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Linear(8, 8)
            self.lm_head = torch.nn.Linear(8, 8)

        def get_output_embeddings(self):
            return self.lm_head

    assert peers.target_linears(LM()) == ["body"]


@pytest.fixture(scope="module")
def llama(tiny_llama_path):
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from piecewise_quant.evaluate import heldout_text, perplexity

    tok = AutoTokenizer.from_pretrained(tiny_llama_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_path, dtype=torch.float32).eval()
    ids = torch.tensor(tok(heldout_text(), add_special_tokens=False)["input_ids"])[: 16 * 256]  # 16 windows
    return model, tok, ids, perplexity(model, input_ids=ids)


@pytest.mark.slow  # quanto and torchao: a few seconds each; auto-round-rtn: ~30 s (import + calibration)
@pytest.mark.parametrize("key", list(EXPECTED_BPW))
def test_peer_w4a16_g128_perplexity_on_the_bundled_llama(key, llama):
    if peers.peer_version(key) is None:
        pytest.skip(f"peer {key!r}: {peers.PEERS[key]['dist']} is not installed (pip install {peers.PEERS[key]['pip']})")
    from piecewise_quant.evaluate import perplexity

    float_model, tok, ids, float_ppl = llama
    model = copy.deepcopy(float_model)
    calib = peers.calibration_ids(tok, n_samples=16) if key.startswith("auto-round") else None
    out = peers.run_peer(key, model, tok, calib, bits=4, group_size=128)
    assert peers.peer_version(key) in out["label"]
    assert out["n_layers"] == 42  # 6 layers x 7 projections; lm_head stays float
    assert type(model.lm_head.weight) is torch.nn.Parameter and model.lm_head.weight.dtype == torch.float32
    assert out["bits_per_weight"] == pytest.approx(EXPECTED_BPW[key])
    assert out["quant_s"] >= 0 and isinstance(out["notes"], str)
    ppl = perplexity(model, input_ids=ids)
    assert math.isfinite(ppl)
    assert float_ppl * 0.99 < ppl < 1.2 * float_ppl, (key, ppl, float_ppl)
