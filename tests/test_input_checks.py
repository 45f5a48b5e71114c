"""One input check for both front-ends: the runtime core's (mtcompile/core/src/inputs.h). The
same bad inputs sent to ``Bundle.run`` and to ``mtcompile-run`` are refused with the same first
line: InputError in Python, exit 3 from the driver."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
import torch
from torch import nn
from torch.export import Dim

import mtcompile
from mtcompile.driver import command

pytestmark = pytest.mark.slow  # compiles a bundle, runs the driver

ROWS = 10  # the embedding's table: ids in [0, 10)


class EmbAdd(nn.Module):
    """x [batch, 4] + the sum of ids' [batch, 3] embeddings: two inputs of one dynamic dim."""

    def __init__(self):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(3)
            self.emb = nn.Embedding(ROWS, 4)

    def forward(self, x, ids):
        return x + self.emb(ids).sum(1)


X = np.arange(8, dtype=np.float32).reshape(2, 4)
IDS = np.array([[1, 2, 3], [4, 5, 9]], dtype=np.int64)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    batch = Dim("batch", min=1, max=4)
    tenant = mtcompile.Tenant(
        "emb",
        EmbAdd(),
        example_inputs=(torch.from_numpy(X), torch.from_numpy(IDS)),
        dynamic_shapes={"x": {0: batch}, "ids": {0: batch}},
    )
    bundle = mtcompile.compile([tenant])
    return bundle.save(tmp_path_factory.mktemp("emb"))


def _ids(**at) -> np.ndarray:
    ids = IDS.copy()
    for flat, v in at.items():
        ids.flat[int(flat[1:])] = v
    return ids


# case -> the inputs given, by name (the driver's files <tenant>.<name>.npy; Python: in order)
CASES = {
    "wrong shape": {"x": X[:, :3], "ids": IDS},
    "wrong dtype": {"x": X.astype(np.float64), "ids": IDS},
    "dim outside its bounds": {
        "x": np.zeros((5, 4), np.float32),
        "ids": np.zeros((5, 3), np.int64),
    },
    "one dim, two sizes": {"x": X, "ids": IDS[:1]},
    "index out of range": {"x": X, "ids": _ids(i4=ROWS)},
    "negative index": {"x": X, "ids": _ids(i0=-1)},
    "missing input": {"x": X},
    "extra input": {"x": X, "ids": IDS, "extra": X},
}
FIRST_WORDS = {
    "wrong shape": "tenant 'emb', input 'x': expected float32[batch, 4], got float32[2, 3]",
    "wrong dtype": "tenant 'emb', input 'x': expected float32[batch, 4], got float64[2, 4]",
    "dim outside its bounds": "tenant 'emb', input 'x': dim 0 ('batch') is 5, outside its bounds",
    "one dim, two sizes": "tenant 'emb': dim 'batch' is 2 in input 'x' (axis 0) but 1 in input",
    "index out of range": "tenant 'emb', input 'ids': values index a table of 10 rows and must be "
    "in [0, 10); got values in [1, 10]",
    "negative index": "tenant 'emb', input 'ids': values index a table of 10 rows and must be "
    "in [0, 10); got values in [-1, 9]",
    "missing input": "tenant 'emb' takes 2 input(s) (x: float32[batch, 4] (batch in [1, 4]), "
    "ids: int64[batch, 3] (batch in [1, 4])), got 1",
    "extra input": "tenant 'emb' takes 2 input(s)",
}


def _python(saved, given: dict) -> str:
    b = mtcompile.load(saved)
    with pytest.raises(mtcompile.InputError) as e:
        b.run("emb", *given.values())
    return str(e.value).splitlines()[0]


def _driver(saved, given: dict, d) -> subprocess.CompletedProcess:
    (d / "in").mkdir()
    (d / "out").mkdir()
    for name, a in given.items():
        np.save(d / "in" / f"emb.{name}.npy", a)
    cmd = command(saved, "emb", d / "in", d / "out")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("case", list(CASES))
def test_python_and_the_driver_refuse_a_bad_input_alike(saved, case, tmp_path):
    line = _python(saved, CASES[case])
    assert line.startswith(FIRST_WORDS[case]), line
    res = _driver(saved, CASES[case], tmp_path)
    assert res.returncode == 3, res.stderr
    assert res.stderr.strip().splitlines()[-1] == f"mtcompile-run: {line}"
    assert not any((tmp_path / "out").iterdir())  # refused before the call


def test_good_inputs_pass_both_with_one_output(saved, tmp_path):
    want = mtcompile.load(saved).run("emb", X, IDS)[0]
    res = _driver(saved, {"x": X, "ids": IDS}, tmp_path)
    assert res.returncode == 0, res.stderr
    (out,) = (tmp_path / "out").iterdir()
    np.testing.assert_array_equal(np.load(out), want)
