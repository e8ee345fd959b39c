"""The README is a front door: at most 150 lines, every relative link resolves, and its Python
example runs as written (on SmolLM2, so that test is marked real and slow)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def python_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert len(blocks) == 1, f"the README should hold one Python example, found {len(blocks)}"
    return blocks[0]


def test_readme_is_short_and_its_links_resolve():
    assert len(README.splitlines()) <= 150
    assert 'python -m pytest -m "not slow and not real"' in README and "bash scripts/test.sh" in README
    links = re.findall(r"\]\(([^)#]+)\)", README)
    assert links
    for link in links:
        if not link.startswith("http"):
            assert (ROOT / link).exists(), link


@pytest.mark.real
@pytest.mark.slow
def test_readme_python_example_runs(smollm2_dir, model_cache_dir, monkeypatch, capsys):
    monkeypatch.setenv("JAXINFER_CACHE", str(model_cache_dir))  # where the fixture converted the built-in model
    ns: dict = {}
    exec(compile(python_example(), "README.md", "exec"), ns)
    outs, scores, llm = ns["outs"], ns["scores"], ns["llm"]
    assert outs[0].finish_reason in ("stop", "length") and "." not in outs[0].text  # the stop string ends it
    assert "Paris" in outs[0].text
    assert scores[0].logprob < 0
    assert capsys.readouterr().out.splitlines()[-1] == str(llm.tokenizer.encode("Hello"))
