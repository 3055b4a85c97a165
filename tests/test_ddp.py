"""Data-parallel training on CPU (2 processes, gloo, launched with torchrun): the loss curve equals the
1-process curve at the same global batch, and checkpoints move between 1 and 2 processes.
(The multi-GPU run of the same code path needs a machine with several GPUs; see BENCHMARKS.md.)"""

import os
import resource
import subprocess
import sys

from conftest import REPO_ROOT
from test_train import model_json, sample_data  # noqa: F401  (session fixtures)

from llamathink.train import checkpoint as ckpt


def _run(nproc, model_json, data, out, micro_batch, **overrides):
    proc = _launch(nproc, model_json, data, out, micro_batch, **overrides)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    last = ckpt.list_checkpoints(out)[-1]
    return ckpt.load_checkpoint(last)


def _launch(
    nproc, model_json, data, out, micro_batch, file_size_limit=None, timeout=600, **overrides
) -> subprocess.CompletedProcess:
    """The run, as a subprocess; `file_size_limit` (bytes): no file it writes may grow past it (RLIMIT_FSIZE:
    a write past it fails with EFBIG, as on a full disk)."""
    settings = dict(
        model_config=model_json,
        data_dir=data,
        out_dir=out,
        seq_len=64,
        micro_batch_size=micro_batch,
        grad_accum=2,
        max_steps=8,
        warmup_steps=1,
        mixed_precision="no",
        eval_every=100,
        save_every=4,
        peak_tflops="null",
        wandb_mode="disabled",
        progress_bar="false",
        seed=5,
    )
    settings.update(overrides)
    args = [f"--{k}={v}" for k, v in settings.items()]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    if nproc == 1:
        cmd = [sys.executable, str(REPO_ROOT / "train_hf.py"), *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            str(REPO_ROOT / "train_hf.py"),
            *args,
        ]

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    preexec = limit if file_size_limit is not None else None
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, preexec_fn=preexec)


def test_two_process_ddp_matches_one_process_and_checkpoints_move_between_them(sample_data, model_json, tmp_path):
    one = _run(1, model_json, sample_data, tmp_path / "one", micro_batch=8)
    two = _run(2, model_json, sample_data, tmp_path / "two", micro_batch=4)  # same global batch: 2 x 4 = 8
    l1, l2 = one["history"]["losses"], two["history"]["losses"]
    for out, processes in (("one", "x 2 micro-batches on 1 process"), ("two", "per process, on 2 processes")):
        assert processes in (tmp_path / out / "final" / "README.md").read_text(encoding="utf-8")  # the model card
    assert sorted(l1) == sorted(l2) == list(range(1, 9))
    for step in l1:  # same windows per global step, gradients averaged by DDP: equal up to reduction order
        assert abs(l1[step] - l2[step]) < 1e-4 * abs(l1[step]), (step, l1[step], l2[step])
    for name, value in one["model"].items():
        # Muon's bf16 Newton-Schulz turns reduction-order differences (1e-7) into bf16 rounding flips (~0.4%)
        rel = ((two["model"][name] - value).norm() / value.norm().clamp_min(1e-12)).item()
        assert rel < 2e-2, (name, rel)

    # saved on 2 processes, resumed on 1 (and the reverse), each from the other run's checkpoint of step 4 (as a run
    # stopped there leaves it): the continuation follows the uninterrupted curve
    def step_4(out):
        return next(c for c in ckpt.list_checkpoints(out) if c.name == "step_00000004")

    resumed = _run(1, model_json, sample_data, tmp_path / "2to1", micro_batch=8, resume=step_4(tmp_path / "two"))
    resumed2 = _run(2, model_json, sample_data, tmp_path / "1to2", micro_batch=4, resume=step_4(tmp_path / "one"))
    for history in (resumed["history"]["losses"], resumed2["history"]["losses"]):
        assert sorted(history) == list(range(1, 9))
        for step in range(5, 9):
            assert abs(history[step] - l1[step]) < 1e-4 * abs(l1[step]), (step, history[step], l1[step])

    # a check of the main process alone (here: out_dir holds another run's checkpoints) stops every process with
    # its one line: the other process went on into DDP's setup and died there with gloo's traceback (NCCL: waited)
    before = sorted(p.name for p in ckpt.list_checkpoints(tmp_path / "two"))
    refused = _launch(2, model_json, sample_data, tmp_path / "two", micro_batch=4, resume="none")
    workers = refused.stderr.split("failed (exitcode")[0]  # (torchrun's own report of a failed run follows)
    assert refused.returncode != 0 and workers.count("holds checkpoints of another run") == 2, workers[-3000:]
    assert "Traceback" not in workers and "terminate called" not in workers, workers[-3000:]
    assert sorted(p.name for p in ckpt.list_checkpoints(tmp_path / "two")) == before


def test_a_checkpoint_the_main_process_cannot_write_stops_every_process(sample_data, model_json, tmp_path):
    """The main process alone writes checkpoints and the finished model. When it cannot (here a file-size limit,
    as on a full disk), every process stops with the one-line message that names the file; the other process
    waited at the next barrier until gloo's timeout (30 minutes; NCCL's: 10) and the launcher's."""
    refused = _launch(
        2,
        model_json,
        sample_data,
        tmp_path / "out",
        micro_batch=4,
        max_steps=4,
        save_every=2,
        file_size_limit=64 * 1024,  # the weights' file is larger (the 1024 x 64 fp32 embedding alone: 256 KiB)
        timeout=240,
    )
    workers = refused.stderr.split("failed (exitcode")[0]  # (torchrun's own report of a failed run follows)
    said = "a write was cut short while writing checkpoint step 2"
    assert refused.returncode != 0 and workers.count(said) == 2, workers[-3000:]
    assert "file-size limit (ulimit -f) of 65,536 bytes" in workers and "Traceback" not in workers, workers[-3000:]
    assert not ckpt.list_checkpoints(tmp_path / "out")  # (no partial checkpoint left behind)
