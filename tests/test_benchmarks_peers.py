"""The benchmarks' peers (benchmarks.peers) and the tables of benchmarks.run: numerics of each
peer against PyTorch eager on tiny tenants, notes instead of crashes, and the markdown. No
timing is asserted; only the AOTInductor / torch.compile test compiles (marked slow)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from benchmarks.peers import (
    Peer,
    PeerMismatch,
    aoti_peer,
    build,
    check,
    compiled_peer,
    eager_peer,
    flat,
    openvino_peer,
)
from benchmarks.run import best_peer, contenders_of, onnx_protos, rows_of, to_markdown
from mtcompile import Tenant
from mtcompile.models import mlp


def tiny_tenant():
    """A 16-32-8 MLP on (2, 16): its module, inputs as tensors and as arrays."""
    model, (x,) = mlp(seed=0, batch=2, d_in=16, hidden=32, d_out=8)
    return model, {"tiny": (x,)}, {"tiny": (x.numpy(),)}


def reference_of(model, torch_inputs):
    return {k: flat(fn()) for k, fn in eager_peer({"tiny": model}, torch_inputs).runners.items()}


def test_flat_flattens_tensors_arrays_and_nested_outputs():
    got = flat((torch.ones(2), [np.zeros(3), (torch.zeros(1, 2),)]))
    assert [a.shape for a in got] == [(2,), (3,), (1, 2)]
    assert all(isinstance(a, np.ndarray) for a in got)


def test_build_notes_a_failing_tenant_and_keeps_the_others():
    def make(name):
        if name == "b":
            raise RuntimeError("boom\nsecond line")
        return lambda: name

    peer = build(["a", "b", "c"], make)
    assert list(peer.runners) == ["a", "c"] and peer.notes == {"b": "RuntimeError: boom"}


def test_peer_note_groups_tenants_by_reason():
    peer = Peer(notes={"a": "no compiler", "b": "no compiler", "c": "export failed"})
    assert peer.note() == "no compiler (a, b); export failed (c)"


def test_check_records_diffs_and_names_peer_and_tenant_when_off():
    reference = {"t0": [np.ones(4, np.float32)], "t1": [np.full(4, 10, np.float32)]}
    close = Peer(
        runners={
            "t0": lambda: [np.ones(4, np.float32) + np.float32(2**-20)],
            "t1": lambda: torch.full((4,), 10.0),
        }
    )
    diffs = check("openvino", close, reference)
    assert diffs == {"t0": 2**-20, "t1": 0.0}
    off = Peer(
        runners={
            "t0": lambda: [np.ones(4, np.float32)],
            "t1": lambda: [np.full(4, 10.01, np.float32)],
        }
    )
    with pytest.raises(PeerMismatch, match=r"openvino on tenant 't1'.*1\.0e-03"):
        check("openvino", off, reference)
    wrong_shape = Peer(runners={"t0": lambda: [np.ones(5, np.float32)]})
    with pytest.raises(PeerMismatch, match="aotinductor on tenant 't0': output shapes"):
        check("aotinductor", wrong_shape, reference)


def test_openvino_peer_matches_eager_on_a_tiny_tenant():
    pytest.importorskip("openvino")
    model, torch_inputs, inputs = tiny_tenant()
    tenant = Tenant("tiny", model, example_inputs=torch_inputs["tiny"])
    peer = openvino_peer(onnx_protos([tenant], {"tiny": model}), inputs)
    assert not peer.notes and list(peer.runners) == ["tiny"]
    diffs = check("openvino", peer, reference_of(model, torch_inputs))
    assert diffs["tiny"] < 1e-5  # fp32 (a bf16 default would be off by ~1e-2 here)


def test_openvino_missing_is_a_note_per_tenant(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "openvino", None)  # import fails
    peer = openvino_peer({"a": None, "b": None}, {})
    assert not peer.runners and set(peer.notes) == {"a", "b"}
    assert peer.note().startswith("openvino not installed") and "(a, b)" in peer.note()


class DataDependent(nn.Module):
    """A branch on a tensor's value: torch.export refuses it (before any compile)."""

    def forward(self, x):
        return x + 1 if x.sum() > 0 else x - 1


def test_aoti_failing_to_export_a_tenant_is_a_note():
    peer = aoti_peer({"dd": DataDependent()}, {"dd": (torch.ones(3),)})
    assert not peer.runners and list(peer.notes) == ["dd"]


@pytest.mark.slow
def test_aoti_and_torch_compile_peers_match_eager_on_a_tiny_tenant():
    model, torch_inputs, _ = tiny_tenant()
    reference = reference_of(model, torch_inputs)
    for label, peer in (
        ("aotinductor", aoti_peer({"tiny": model}, torch_inputs)),
        ("torch.compile", compiled_peer({"tiny": model}, torch_inputs)),
    ):
        assert not peer.notes, peer.note()
        assert check(label, peer, reference)["tiny"] < 1e-5


class FakeBundle:
    def __init__(self):
        self.calls = []

    def run_all(self, inputs):
        self.calls.append("run_all")

    def run(self, name, *args):
        self.calls.append(name)


def test_contenders_of_gives_incomplete_peers_a_note_and_no_time():
    bundle, alone = FakeBundle(), FakeBundle()
    peers = {
        "onnxruntime": Peer(runners={"a": lambda: None}),
        "aotinductor": Peer(runners={"a": lambda: None}, notes={"b": "no gcc"}),
    }
    contenders, notes = contenders_of(peers, {"bundle": bundle}, {"a": alone}, {"a": (1,)})
    assert list(contenders) == ["onnxruntime", "tvm separate", "bundle"]
    assert notes == {"aotinductor": "no gcc (b)"}
    contenders["tvm separate"]()
    contenders["bundle"]()
    assert alone.calls == ["a"] and bundle.calls == ["run_all"]


def sample_result():
    blocked = {
        "pytorch eager": [0.008] * 3,
        "onnxruntime": [0.003] * 3,
        "openvino": [0.001, 0.001, 0.005],
        "bundle": [0.002] * 3,
    }
    interleaved = {k: [2 * t for t in v] for k, v in blocked.items()}
    rows = rows_of(blocked, interleaved, flops=10**7)
    return {
        "set": "mixed",
        "n": 2,
        "batch": 1,
        "repeat": 3,
        "tenants": ["text", "cnn"],
        "rows": rows,
        "notes": {"aotinductor": "no gcc (cnn)"},
        "max_abs_diff": {
            "onnxruntime": {"text": 2e-6, "cnn": 1e-6},
            "openvino": {"text": 3e-7, "cnn": 1e-7},
            "aotinductor": {"text": 0.0},
        },
        "compile_s": {"bundle": 9.0, "openvino": 0.5},
        "kernels": {"bundle": 40},
        "flops": 10**7,
        "ceiling_gflops": 100.0,
        "numerics_ok": True,
        "best_peer": best_peer(rows, ["pytorch eager", "onnxruntime", "openvino"]),
        "per_tenant": {
            "text": {"bundle": 1.0, "onnxruntime": 1.5, "openvino": 0.5},
            "cnn": {"bundle": 2.0, "onnxruntime": 1.0},
        },
        "profile": {"tenants": {}},
    }


def test_rows_report_both_columns_against_the_bundle():
    rows = sample_result()["rows"]
    assert rows["onnxruntime"]["ratio_to_bundle"] == pytest.approx(1.5)
    assert rows["onnxruntime"]["interleaved_ms"] == pytest.approx(6.0)
    assert rows["openvino"]["median_ms"] == pytest.approx(1.0)
    assert rows["bundle"]["gflops"] == pytest.approx(5.0)


def test_best_peer_is_the_fastest_timed_peer_in_blocks():
    res = sample_result()
    assert res["best_peer"] == ("openvino", pytest.approx(0.5))
    assert best_peer(res["rows"], ["aotinductor"]) is None  # not timed: no best


def test_run_markdown_has_both_columns_notes_best_peer_and_tenants():
    text = to_markdown(sample_result(), "python -m benchmarks.run --set mixed")
    assert "| onnxruntime | 3.000 | 3.000-3.000 | 1.50 | 6.000 | 1.50 | 3.3 | 3.3 |" in text
    assert "| pytorch eager |" in text and "| reference |" in text
    assert "| aotinductor |" in text and "not timed: no gcc (cnn) |" in text
    assert (
        "**Best peer (blocks): openvino, 1.000 ms against the bundle's 2.000 ms: "
        "peer / bundle = 0.50** (above 1: the bundle is faster); interleaved, the same "
        "peer / bundle = 0.50." in text
    )
    assert "| text | 1.000 | 1.500 | 1.50 | 0.500 | 0.50 |" in text
    assert "| cnn | 2.000 | 1.000 | 0.50 | - | - |" in text
    assert "Matmul ceiling measured in the same run: 100 GFLOP/s" in text
