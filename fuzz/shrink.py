"""Shrink a failing spec to a small one that fails the same way, and write it as a pytest reproducer.

Greedy: try dropping a block, the blocks before one (the model then starts at that block's input
shape), a branch, an op, an activation, the sum style, the low-precision dtype, the training flag;
keep any change after which the case still fails with the same status, until nothing more can go.
A candidate whose *original* model does not build or run (shapes no longer chain) is discarded.
"""

from __future__ import annotations

import hashlib
import json
import pprint
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from fuzz.campaign import Case, run_case
from fuzz.generator import Spec, build, clone, example

REGRESSIONS = Path(__file__).resolve().parents[1] / "tests" / "regressions"


def _runs(spec: Spec) -> bool:
    try:
        model = build(spec)
        with torch.no_grad():
            for i, b in enumerate(spec["batches"]):
                model(example(spec, b, spec["seed"] + i))
    except Exception:
        return False
    return True


def candidates(spec: Spec) -> Iterator[Spec]:
    """Smaller variants of ``spec``, biggest cuts first."""
    blocks = spec["blocks"]
    for i in range(len(blocks)):
        if len(blocks) > 1:
            yield {**clone(spec), "blocks": clone(blocks[:i] + blocks[i + 1 :])}
    for i in range(1, len(blocks)):
        yield {**clone(spec), "blocks": clone(blocks[i:]), "channels": blocks[i]["in"][0], "spatial": blocks[i]["in"][1:]}
    for i, b in enumerate(blocks):
        lists = b.get("branches", [])
        for j in range(len(lists)):
            if len(lists) > 1:
                s = clone(spec)
                del s["blocks"][i]["branches"][j]
                s["blocks"][i]["tree"] = _renumbered(s["blocks"][i].get("tree"), j)
                yield s
        for j, ops in enumerate(lists):
            for k in range(len(ops)):
                if len(ops) > 1:
                    s = clone(spec)
                    del s["blocks"][i]["branches"][j][k]
                    yield s
        for k in range(len(b.get("ops", []))):
            s = clone(spec)
            del s["blocks"][i]["ops"][k]
            yield s
        for key, plain in (("act", "none"), ("style", "+"), ("form", "sum")):
            if key in b and b[key] != plain:
                s = clone(spec)
                s["blocks"][i][key] = plain
                yield s
    for key, plain in (("dtype", "float32"), ("train", False)):
        if spec.get(key) != plain:
            yield {**clone(spec), key: plain}


def _renumbered(tree, dropped: int):
    """The summation tree without leaf ``dropped`` (later leaves renumbered)."""
    if tree is None:
        return None
    if isinstance(tree, int):
        return None if tree == dropped else tree - (tree > dropped)
    left, right = (_renumbered(t, dropped) for t in tree)
    if left is None:
        return right
    if right is None:
        return left
    return [left, right]


def shrink(spec: Spec, still_fails: Callable[[Spec], bool], budget: int = 200) -> Spec:
    """The smallest spec reached by greedy cuts that ``still_fails``, within ``budget`` evaluations."""
    tries = 0
    progress = True
    while progress and tries < budget:
        progress = False
        for candidate in candidates(spec):
            if tries >= budget:
                break
            if not _runs(candidate):
                continue
            tries += 1
            if still_fails(candidate):
                spec, progress = candidate, True
                break
    return spec


def same_failure(case: Case, status: str) -> Callable[[Spec], bool]:
    return lambda spec: run_case(spec, case).status == status


def reproducer_path(spec: Spec, case: Case, status: str) -> Path:
    digest = hashlib.sha1(json.dumps([spec, case.__dict__], sort_keys=True).encode()).hexdigest()[:8]
    return REGRESSIONS / f"test_{status.replace('-', '_')}_{digest}.py"


def write_reproducer(spec: Spec, case: Case, status: str, message: str, origin: str, xfail: str | None = None) -> Path:
    """A self-contained pytest file: the spec, the path, and the assertion that the fold now matches."""
    path = reproducer_path(spec, case, status)
    name = path.stem
    first = (message.splitlines() or [""])[0][:200].replace('"""', "'''").replace("\\", "/")
    marker = f"@pytest.mark.xfail(strict=True, reason={xfail!r})\n" if xfail else ""
    body = f'''"""Fuzz regression ({status} via {case.path}, verify={case.verify}): {first}

Found by {origin}; shrunk by ``fuzz.shrink``. The model is rebuilt from ``SPEC`` by ``fuzz.generator.build``
and folded as ``CASE`` says; the test asserts the folded model equals the original at both batch sizes
(and that a block known to fold reaches one op).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `fuzz` is a top-level folder of the repository, not an installed package
    sys.path.insert(0, str(ROOT))

from fuzz.campaign import Case, run_case  # noqa: E402

SPEC = {pprint.pformat(spec, width=100, sort_dicts=False, compact=True)}
CASE = {case!r}


{marker}def {name}():
    outcome = run_case(SPEC, CASE)
    assert outcome.status == "ok", f"{{outcome.status}}: {{outcome.message}}"
'''
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body)
    return path
