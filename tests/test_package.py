import os
import subprocess
import sys

import pytest


def python(code: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**env, "OMP_NUM_THREADS": "2"})
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


@pytest.mark.parametrize("order", ["sfumato, torch", "torch, sfumato"])
def test_importing_torch_first_warns_that_openmp_threads_will_spin(order):
    output = python(f"import {order}; import os; print('policy', os.environ['OMP_WAIT_POLICY'])")
    assert "policy PASSIVE" in output
    assert ("OMP_WAIT_POLICY=PASSIVE in the environment" in output) == order.startswith("torch")
