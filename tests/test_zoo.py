"""The real-model zoo (transformers architectures, seeded weights): every model compiles
alone with the default pipeline and matches PyTorch relative to its output's scale; groups
of four or five share one bundle and ``run_all`` matches too. All of it is in the slow tier
but the list of architectures."""

from __future__ import annotations

import pytest
import torch

import mtcompile
from mtcompile.models.hf import REAL_ZOO, real_model, real_zoo_tenants

FAMILIES = {"encoder", "decoder", "vision", "audio"}
NAMED = {
    "bert",
    "distilbert",
    "gpt2",
    "llama",
    "t5_encoder",
    "whisper_encoder",
    "wav2vec2",
    "vit",
    "deit",
    "convnext",
    "mobilevit",
    "resnet",
}  # the must-have list


def test_the_zoo_covers_the_architectures_users_bring():
    assert len(REAL_ZOO) >= 25
    assert NAMED <= set(REAL_ZOO)
    assert {e.family for e in REAL_ZOO.values()} == FAMILIES


@pytest.mark.parametrize("name", sorted(REAL_ZOO))
@pytest.mark.slow  # runs 33 models in PyTorch
def test_every_zoo_model_runs_in_pytorch_with_outputs_of_scale(name):
    """Seeded, deterministic, no near-zero outputs (a comparison must compare something)."""
    model, (x,) = real_model(name)
    again, (x2,) = real_model(name)
    with torch.no_grad():
        y, y2 = model(x), again(x2)
    torch.testing.assert_close(y, y2, rtol=0, atol=0)
    assert not model.training and float(y.abs().max()) > 1e-3


def _check(bundle, tenants):
    result = bundle.verify()
    bad = {n: e for n, e in result["tenants"].items() if not e["ok"]}
    assert result["ok"], bad
    for t in tenants:
        for o in result["tenants"][t.name]["outputs"]:
            assert o["max_rel"] <= 1e-4 and "warning" not in o, (t.name, o)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REAL_ZOO))
def test_every_zoo_model_compiles_alone_and_matches(name):
    tenants = real_zoo_tenants([name])
    bundle = mtcompile.compile(tenants)
    _check(bundle, tenants)
    memory = bundle.report()["memory"]
    assert memory["planned"] and memory["arena_bytes"] > 0  # plan-memory on, planned


def _groups(names: list[str], most: int = 5) -> list[list[str]]:
    """`names` in consecutive groups of near-equal size, at most `most` each (33 -> 5 x 5 +
    2 x 4): every bundle holds 4-6 tenants."""
    k = -(-len(names) // most)
    sizes = [len(names) // k + (i < len(names) % k) for i in range(k)]
    return [names[sum(sizes[:i]) : sum(sizes[: i + 1])] for i in range(k)]


GROUPS = _groups(sorted(REAL_ZOO))


@pytest.mark.slow
@pytest.mark.parametrize("names", GROUPS, ids=["+".join(g) for g in GROUPS])
def test_zoo_models_share_a_bundle_and_run_all_matches(names):
    tenants = real_zoo_tenants(names, seed=11)
    bundle = mtcompile.compile(tenants)
    _check(bundle, tenants)  # verify compares run and run_all with PyTorch
    assert bundle.report()["memory"]["arena_bytes"] > 0
