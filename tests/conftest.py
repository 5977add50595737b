import pytest
import torch

import lowbit


@pytest.fixture(params=lowbit.build_info()["cpu_isas_available"])
def isa(request):
    """Run the test once per CPU kernel set this machine supports (scalar, avx2, avx512_vnni)."""
    previous = lowbit.cpu_isa()
    lowbit.set_cpu_isa(request.param)
    yield request.param
    lowbit.set_cpu_isa(previous)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
