"""The trainers under `accelerate launch`: one CPU process (configs/accelerate/cpu.yaml),
two CPU processes (gradients averaged, replicas checked, world size recorded), resume on
another process count, and the runtime's cross-process operations themselves."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_trainer as run

ROOT = Path(__file__).resolve().parents[1]
CPU_CONFIG = ROOT / "configs" / "accelerate" / "cpu.yaml"
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch"]
# Two CPU processes: `--cpu` would start only one (accelerate spreads CPU processes through
# MPI only), so torchrun starts them (--multi_gpu) and ACCELERATE_USE_CPU keeps them on the CPU.
TWO_CPU_PROCESSES = ["--config_file", str(CPU_CONFIG), "--multi_gpu", "--num_processes", "2",
                     "--main_process_port", "0"]
TINY_ANCHOR = ["--steps", "2", "--batch", "1", "--crop", "64", "--log-every", "1", "--save-every", "0"]


def state(run_dir: Path) -> dict:
    return json.loads((run_dir / "state.json").read_text())


def log_lines(out: str) -> int:
    return sum(line.startswith("step ") for line in out.splitlines())


def test_cpu_config_runs_the_anchor_trainer(photos, tmp_path):
    run_dir = tmp_path / "run"
    out = run([*LAUNCH, "--config_file", CPU_CONFIG, "-m", "ulbcodec.train.anchor", "--data", photos,
               "--run", run_dir, *TINY_ANCHOR], tmp_path)
    meta = state(run_dir)
    assert meta["step"] == 2
    assert (meta["world_size"], meta["global_batch"], meta["mixed_precision"]) == (1, 1, "bf16")  # from the config
    assert (run_dir / "model.safetensors").is_file() and (run_dir / "optimizer.safetensors").is_file()
    assert log_lines(out) == 2  # one log line per step


def test_two_processes_train_one_model_and_resume_on_one(photos, tmp_path):
    run_dir = tmp_path / "run"
    out = run([*LAUNCH, *TWO_CPU_PROCESSES, "-m", "ulbcodec.train.anchor", "--data", photos, "--run", run_dir,
               *TINY_ANCHOR], tmp_path)
    assert log_lines(out) == 2  # the main process alone prints
    meta = state(run_dir)
    # a checkpoint every step, each after the replica check: both processes held the same weights
    assert (meta["step"], meta["world_size"], meta["global_batch"]) == (2, 2, 2)

    out = run([sys.executable, "-m", "ulbcodec.train.anchor", "--data", photos, "--run", run_dir,
               *TINY_ANCHOR[2:], "--steps", "3", "--export", tmp_path / "pkg"], tmp_path)
    assert f"resumed {run_dir} at step 2" in out
    meta = state(run_dir)
    assert (meta["step"], meta["world_size"], meta["global_batch"]) == (3, 1, 1)
    assert meta["runtime_changes"] == [{"step": 2, "before": {"world_size": 2, "global_batch": 2,
                                                              "mixed_precision": "bf16"}}]
    training = json.loads((tmp_path / "pkg" / "ulbc_model.json").read_text())["extra"]["training"]
    assert (training["world_size"], training["runtime_changes"][0]["before"]["world_size"]) == (1, 2)


RUNTIME_SCRIPT = """
    import sys
    import torch
    from ulbcodec.train.distributed import ReplicaMismatchError, TrainRuntime

    rt = TrainRuntime("no")
    r = rt.process_index
    assert rt.num_processes == 2 and rt.device.type == "cpu"
    assert rt.process_seed(5) == 5 + r * 2**40

    # gradients: mean over processes; missing on one process = zero there; missing everywhere stays None
    a, b, c = (torch.nn.Parameter(torch.zeros(3)) for _ in range(3))
    a.grad = torch.full((3,), float(r + 1))
    b.grad = torch.ones(3) * 4 if r == 0 else None
    rt.average_gradients([a, b, c])
    assert torch.equal(a.grad, torch.full((3,), 1.5)) and torch.equal(b.grad, torch.full((3,), 2.0)), (a.grad, b.grad)
    assert c.grad is None

    # the main process's weights and decisions reach everyone
    w = torch.nn.Parameter(torch.full((2,), float(r)))
    rt.sync_replicas([w])
    assert torch.equal(w.data, torch.zeros(2))
    assert rt.from_main(10.0 + r) == 10.0
    assert rt.gather_rows([r]) == [0, 1]

    rt.check_replicas([w], step=7)  # equal: passes
    with torch.no_grad():
        w[0] += r
    try:
        rt.check_replicas([w], step=7)
    except ReplicaMismatchError as e:
        assert "step 7" in str(e) and "[1]" in str(e), e
    else:
        sys.exit("replica mismatch not detected")
    rt.end()
    open(sys.argv[1] + f".{r}", "w").write("runtime ok")  # a file each: printed lines of two processes interleave
"""


def test_runtime_operations_across_two_processes(tmp_path):
    script = tmp_path / "runtime_check.py"
    script.write_text(textwrap.dedent(RUNTIME_SCRIPT))
    run([*LAUNCH, *TWO_CPU_PROCESSES, script, tmp_path / "done"], tmp_path)
    assert [(tmp_path / f"done.{r}").read_text() for r in (0, 1)] == ["runtime ok", "runtime ok"]


def test_generative_stages_under_two_processes(photos, tmp_path):
    # --crop 192: MS-SSIM (the VAE and stage II losses) needs more than 160 pixels a side
    run_dir, pkg = tmp_path / "run", tmp_path / "pkg"
    run([*LAUNCH, *TWO_CPU_PROCESSES, "-m", "ulbcodec.train.generative", "--data", photos, "--run", run_dir,
         "--anchor-model", "default", "--vae-steps", "2", "--stage1-steps", "2", "--stage2-steps", "2",
         "--batch", "1", "--crop", "192", "--log-every", "1", "--save-every", "0", "--export", pkg], tmp_path)
    for stage in ("vae", "stage1", "stage2"):
        meta = state(run_dir / stage)
        assert (meta["step"], meta["done"], meta["world_size"], meta["global_batch"]) == (2, True, 2, 2)
    assert "d" in state(run_dir / "stage2")["log"][-1]  # the discriminator trained (twice-run module)
    training = json.loads((pkg / "ulbc_model.json").read_text())["extra"]["training"]
    assert training["stage2"]["world_size"] == 2


@pytest.mark.slow  # ~18 s on 2 cores: with it, this file would pass a minute
def test_predictor_under_two_processes(tmp_path):
    from ulbcodec.train.video_data import write_lossless

    data, run_dir = tmp_path / "data", tmp_path / "run"
    rng = np.random.default_rng(1)
    base = rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)
    for i in range(2):  # pans over a random texture: 8 frames of 64x64
        frames = (np.ascontiguousarray(base[k : k + 64, 2 * k : 2 * k + 64]) for k in range(i, i + 8))
        write_lossless(data / "videos" / "train" / f"pan{i}.mkv", frames, (64, 64), 8.0)
    run([*LAUNCH, *TWO_CPU_PROCESSES, "-m", "ulbcodec.train.predictor", "--data", data, "--run", run_dir,
         "--image-model", "generative", "--steps", "2", "--batch", "1", "--crop", "8", "--max-frames", "8",
         "--log-every", "1", "--save-every", "0"], tmp_path)
    meta = state(run_dir)
    assert (meta["step"], meta["world_size"], meta["global_batch"]) == (2, 2, 2)
    assert (run_dir / "latents.safetensors").is_file()  # written once, by the main process


# ---------------------------------------------------------------------- in-process, one process


@pytest.fixture(scope="module")
def single():
    from ulbcodec.train.distributed import TrainRuntime

    return TrainRuntime("no")


def test_one_process_leaves_gradients_alone(single):
    assert (single.num_processes, single.process_index, single.is_main) == (1, 0, True)
    a, b = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(2))
    a.grad = torch.randn(4, 3)
    before = a.grad.clone()
    grad_object = a.grad
    single.average_gradients([a, b])
    assert a.grad is grad_object and torch.equal(a.grad, before)
    assert b.grad is None
    assert single.process_seed(123) == 123  # process 0: a single-process run's exact seeds
    state = torch.get_rng_state()
    single.decorrelate_global_rng(0)
    assert torch.equal(torch.get_rng_state(), state)


def test_mixed_precision_resolution(monkeypatch):
    from ulbcodec.train.distributed import resolve_mixed_precision

    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert resolve_mixed_precision(None) == "bf16"  # the trainers' CPU default
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # what `accelerate launch` sets
    assert resolve_mixed_precision(None) == "no"
    assert resolve_mixed_precision("bf16") == "bf16"  # the option wins
    with pytest.raises(SystemExit, match="fp16.*loss scaling"):
        resolve_mixed_precision("fp16")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    with pytest.raises(SystemExit, match="ACCELERATE_MIXED_PRECISION=fp16"):
        resolve_mixed_precision(None)


def test_record_keeps_earlier_runtimes(single):
    meta = {"step": 0}
    single.record(meta, batch=4)
    assert (meta["world_size"], meta["global_batch"], meta["mixed_precision"]) == (1, 4, "no")
    assert "runtime_changes" not in meta
    meta.update(step=10, world_size=8, global_batch=32)  # as a checkpoint of an 8-process run
    single.record(meta, batch=4)
    assert meta["runtime_changes"] == [{"step": 10, "before": {"world_size": 8, "global_batch": 32,
                                                               "mixed_precision": "no"}}]
    assert meta["world_size"] == 1
