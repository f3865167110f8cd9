"""Runs vLLM on a list of jobs in one process and writes what it produced (used by the vLLM tests).

    python vllm_runner.py jobs.json results.json

Each job: ``{"model": dir, "quantization": "piecewise" | null, "dtype": "float32", "prompts":
[[token ids], ...], "max_tokens": n, "hf_overrides": {...} | null, "tensor_parallel_size": 1,
"kv_cache_dtype": "fp8" | null}``.
Each result: ``{"tokens": [[ids], ...], "prompt_logprobs": [[float, ...], ...]}`` or
``{"error": "<type>: <message>"}`` when building the engine or generating failed.
"""

import gc
import json
import os
import sys
import traceback

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def run(job):
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kwargs = dict(
        model=job["model"], enforce_eager=True, max_model_len=job.get("max_model_len", 128), dtype=job.get("dtype", "float32"),
        quantization=job.get("quantization"), tensor_parallel_size=job.get("tensor_parallel_size", 1), seed=0,
    )
    if job.get("hf_overrides") is not None:
        kwargs["hf_overrides"] = job["hf_overrides"]
    if job.get("kv_cache_dtype") is not None:
        kwargs["kv_cache_dtype"] = job["kv_cache_dtype"]
    llm = LLM(**kwargs)
    try:
        params = SamplingParams(max_tokens=job.get("max_tokens", 12), temperature=0.0, prompt_logprobs=0, ignore_eos=True)
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in job["prompts"]], params, use_tqdm=False)
        result = {"tokens": [], "prompt_logprobs": []}
        for prompt, out in zip(job["prompts"], outs):
            result["tokens"].append(list(out.outputs[0].token_ids))
            lps = [out.prompt_logprobs[i][prompt[i]].logprob for i in range(1, len(prompt))]
            result["prompt_logprobs"].append(lps)
        return result
    finally:
        del llm
        gc.collect()


def main():
    jobs = json.load(open(sys.argv[1]))
    results = []
    for job in jobs:
        try:
            results.append(run(job))
        except Exception as exc:  # the tests assert on the message
            chain, e = [], exc
            while e is not None:
                chain.append(f"{type(e).__name__}: {e}")
                e = e.__cause__ or e.__context__
            results.append({"error": "\n".join(chain), "traceback": traceback.format_exc()})
        json.dump(results, open(sys.argv[2], "w"))


if __name__ == "__main__":
    main()
