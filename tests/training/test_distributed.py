"""torchrun --nproc_per_node 2 on CPU (gloo): DDP, FSDP2 and DeepSpeed ZeRO-2/3 give the single-process loss
curve on the same data (the step's records are split between the ranks; the loss is the token mean of
the whole step). Each case runs ``dist_worker.py`` in a subprocess and reads rank 0's result file.

Measured on the 2-core machine: about 10-15 s per 2-process run; a DeepSpeed run also JIT-compiles
``deepspeed_shm_comm`` once per torch-extensions cache (20 s idle, over 2 minutes under load).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

WORKER = Path(__file__).resolve().parent / "dist_worker.py"
STEPS = dict(max_steps=4, learning_rate=3e-3, progress="none", shuffle=False)
TOL = dict(rtol=1e-4, atol=1e-5)  # fp32; reductions in another order (measured differences <= 1e-6)

pytestmark = pytest.mark.slow


def _run(tmp_path: Path, config: dict, nproc: int) -> dict:
    result = tmp_path / "result.json"
    cmd = [sys.executable, str(WORKER), json.dumps(config), str(result)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *cmd[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0 and result.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(result.read_text())


@pytest.fixture(scope="module")
def single(tiny_dir, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("single")
    return _run(out, {**STEPS, "batch_size": 2, "output_dir": str(out / "run")}, nproc=1)


CASES = [
    pytest.param({"distributed": "ddp"}, id="ddp"),
    pytest.param({"distributed": "fsdp2"}, id="fsdp2"),
    pytest.param({"distributed": "deepspeed", "zero_stage": 2}, id="zero2"),
    pytest.param({"distributed": "deepspeed", "zero_stage": 3}, id="zero3"),
]


@pytest.mark.parametrize("mode", CASES)
def test_two_processes_follow_the_single_process_loss_curve(tmp_path, tiny_dir, single, mode):
    if mode["distributed"] == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (DS_BUILD_OPS=0 pip install 'kimivl[deepspeed]')")
    got = _run(tmp_path, {**STEPS, **mode, "batch_size": 1, "output_dir": str(tmp_path / "run")}, nproc=2)
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(single["losses"]), **TOL)
    assert single["losses"][-1] < single["losses"][0]
    # the export gathers the full weights under every engine: same model as the single process
    a = load_file(str(Path(got["export_dir"]) / "model.safetensors"))
    b = load_file(str(Path(single["export_dir"]) / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in b:
        # Adam divides by sqrt(v): where an element's gradient is ~0, reduction-order noise in it becomes a step
        # of up to lr (seen once in 2,048 elements of an expert on an AVX-512 host: 3e-4). So: at most 0.1 % of
        # a tensor's elements outside the tight tolerance, and none by more than one step of lr.
        diff = (a[k].double() - b[k].double()).abs()
        loose = diff > 1e-4 + 1e-3 * b[k].double().abs()
        assert loose.float().mean() <= 1e-3 and diff.max() <= STEPS["learning_rate"], (
            k, int(loose.sum()), a[k].numel(), float(diff.max()))
