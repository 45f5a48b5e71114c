"""The CUDA code path: builds here (nvcc, no GPU needed); runs and checks numerics where a GPU is."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from conftest import linear_relu, tiny_conv

import mtcompile
from mtcompile import Tenant
from mtcompile.errors import ArtifactError, MTCompileError

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc to build"),
]


def _has_gpu() -> bool:
    import tvm

    return bool(tvm.cuda(0).exist)


@pytest.fixture(scope="module")
def cuda_bundle():
    m1, x1 = linear_relu(0)
    m2, x2 = tiny_conv(0)
    return mtcompile.compile(
        [Tenant("lin", m1, example_inputs=x1), Tenant("conv", m2, example_inputs=x2)], target="cuda"
    )


def test_cuda_build_uses_tvm_kernels_and_saves(cuda_bundle, tmp_path):
    assert cuda_bundle.manifest.target == "cuda"
    assert cuda_bundle.manifest.kernels == {"matmul": "tvm", "conv2d": "tvm"}
    out = cuda_bundle.save(tmp_path)
    assert (out / "bundle.so").stat().st_size > 0


def test_library_provider_is_cpu_only(tmp_path):
    m, x = linear_relu(0)
    with pytest.raises(MTCompileError, match="the torch provider exists for target llvm only"):
        mtcompile.compile([Tenant("lin", m, example_inputs=x)], target="cuda", kernels="torch")


@pytest.mark.skipif(_has_gpu(), reason="checks the error on a machine without a GPU")
def test_cuda_bundle_without_gpu_is_a_clear_error(cuda_bundle, tmp_path):
    with pytest.raises(MTCompileError, match="built for cuda and this machine has no such device"):
        cuda_bundle.run("lin", np.zeros((2, 8), np.float32))
    cuda_bundle.save(tmp_path)
    with pytest.raises(ArtifactError, match="loads only where TVM finds a CUDA GPU"):
        mtcompile.load(tmp_path)


@pytest.mark.skipif(not _has_gpu(), reason="needs a CUDA GPU")
def test_cuda_numerics_match_torch(cuda_bundle, tmp_path):
    assert cuda_bundle.verify()["ok"]
    cuda_bundle.save(tmp_path)
    assert mtcompile.load(tmp_path, sources=cuda_bundle.sources).verify()["ok"]
