"""Faults injected into the research scripts end the run promptly, clearly and resumably.

Signals to one rank, a rank whose disk is full, a killed "node", NaN losses and weights, bad
options. Every process is started in its own session with a timeout, and whatever is left of it
(torchrun starts its workers in sessions of their own) is killed at the end, so a regression
fails a test instead of hanging the suite.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import proc_tree
from conftest import RESEARCH, ROOT, copy_digits_subset, ensure_research
from proc_tree import TIMED_OUT, alive, run_bounded

ensure_research()
import one_shot_pruning as osp_script  # noqa: E402
import sparse_training  # noqa: E402
from sparseml import errors as sparseml_errors  # noqa: E402
from sparseml.compressed import load_compressed  # noqa: E402
from utils import faults, training  # noqa: E402
from utils.checkpoint import load_checkpoint  # noqa: E402
from utils.errors import CheckpointError, SetupError  # noqa: E402
from utils.faults import NonFiniteError  # noqa: E402
from utils.summary import read_summary  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
TRAIN = RESEARCH / "sparse_training.py"
ONE_SHOT = RESEARCH / "one_shot_pruning.py"
GM_ONE_SHOT = RESEARCH / "recipes" / "one_shot" / "gm_digits.yaml"
PRUNED = r"re:blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.weight"
GM_RECIPE = f"""
modifiers:
  - !GlobalMagnitudePruningModifier
    params: ['{PRUNED}']
    init_sparsity: 0.5
    final_sparsity: 0.5
    start_epoch: 0
    end_epoch: 0
"""
BOUND_S = 60  # a failure must end the whole job within this


@pytest.fixture(scope="module")
def small_digits(tmp_path_factory, digits_dir) -> Path:
    """30 train and 10 val images per class."""
    return copy_digits_subset(digits_dir, tmp_path_factory.mktemp("fault_digits"), 30, 10)


def train_args(data: Path, out: Path, name: str, *extra: str) -> list[str]:
    return [
        str(data), "--dataset", "", "--model", "vit_digits", "--model-kwargs", "depth=1",
        "-b", "50", "-vb", "100", "--workers", "0", "--opt", "adamw", "--lr", "0.002",
        "--sched", "step", "--decay-epochs", "100", "--warmup-epochs", "0", "--smoothing", "0",
        "--hflip", "0", "--color-jitter", "0", "--output", str(out), "--experiment", name,
        "--log-interval", "100", *extra,
    ]  # fmt: skip


# ----- processes ------------------------------------------------------------------------------
def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", HF_HUB_OFFLINE="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    return env


def descendants(pid: int) -> list[int]:
    """``pid`` and every live process below it."""
    return alive([pid, *proc_tree.descendants(pid)])


def rank_pid(launcher: subprocess.Popen, rank: int) -> int:
    for pid in descendants(launcher.pid)[1:]:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in env and any(e.startswith(b"TORCHELASTIC") for e in env):
            return pid
    raise AssertionError(f"no worker of rank {rank} under {launcher.pid}")


def _default_sigint() -> None:
    # A test run started in the background of a non-interactive shell (``cmd &``) inherits
    # SIGINT ignored, and Python then never raises KeyboardInterrupt; a job must see Ctrl-C as
    # a foreground run does.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Job:
    """A process (tree) started in its own session; output to a file; always cleaned up."""

    def __init__(self, cmd: list[str], cwd: Path, log: Path, env: dict[str, str]) -> None:
        self.log = log
        self.proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=_default_sigint,
        )  # fmt: skip
        self.started = time.monotonic()

    def wait_for(self, path: Path, timeout: float = 120) -> None:
        end = time.monotonic() + timeout
        while not path.exists():
            assert self.proc.poll() is None, f"exited early:\n{self.output()[-3000:]}"
            assert time.monotonic() < end, f"{path} never appeared:\n{self.output()[-3000:]}"
            time.sleep(0.05)

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill_tree(self) -> None:
        for pid in descendants(self.proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def jobs():
    started: list[Job] = []
    yield started
    for job in started:
        job.kill_tree()


def torchrun(*extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *extra]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def assert_all_gone(job: Job, pids: list[int]) -> None:
    time.sleep(0.2)
    left = [p for p in alive(pids) if p != job.proc.pid]
    assert not left, f"processes left behind: {left}"


# ----- no hang --------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.dist
def test_sigint_to_one_rank_ends_the_torchrun_job(jobs, small_digits, tmp_path):
    victim = 1  # rank 0 then sees only a lost peer, and must still end and say how to resume
    args = train_args(small_digits, tmp_path, "ddp", "-b", "25", "--epochs", "200", "--save-last")
    job = Job(torchrun("--standalone", "--nproc_per_node=2", str(TRAIN), *args), tmp_path,
              tmp_path / "log.txt", _env())  # fmt: skip
    jobs.append(job)
    job.wait_for(tmp_path / "ddp" / "vit_digits_last.pth")
    pids = descendants(job.proc.pid)
    os.kill(rank_pid(job.proc, victim), signal.SIGINT)
    start = time.monotonic()
    code = job.wait(BOUND_S)
    out = job.output()
    assert code is not None, f"job still running {BOUND_S} s after SIGINT:\n{out[-3000:]}"
    assert code != 0 and time.monotonic() - start < BOUND_S
    assert_all_gone(job, pids)
    assert f"[rank {victim}] stopped by SIGINT" in out
    assert "To resume from" in out and "--resume" in out
    # No traceback from our code (torchrun prints its own).
    assert f'File "{RESEARCH}' not in out, out[-5000:]
    assert load_checkpoint(tmp_path / "ddp" / "vit_digits_last.pth")["epoch"] >= 0
    assert not (tmp_path / "ddp" / sparse_training.COMPLETE).exists()


@pytest.mark.slow
@pytest.mark.dist
def test_rank0_disk_full_in_one_shot_ends_the_torchrun_job(jobs, small_digits, tmp_path):
    """Rank 0 cannot write its first result row while rank 1 goes on into a collective."""
    out = tmp_path / "out"
    args = ["--dataset", "digits", "--data-dir", str(small_digits), "--sparseml_recipe",
            str(GM_ONE_SHOT), "--sparsities", "0.5", "0.7", "--output_dir", str(out),
            "--workers", "0", "-vb", "16", "--device", "cpu"]  # fmt: skip
    cmd = torchrun("--standalone", "--nproc_per_node=2", str(ROOT / "tests" / "fault_inject.py"))
    job = Job([*cmd, str(ONE_SHOT), *args], tmp_path, tmp_path / "log.txt", _env(FAULT="enospc"))
    jobs.append(job)
    code = job.wait(BOUND_S)
    log = job.output()
    assert code is not None, f"job still running after {BOUND_S} s:\n{log[-3000:]}"
    assert code != 0
    # Rank 0 names the failed write in one line (no traceback); rank 1 is stopped, not hung.
    line = next(ln for ln in log.splitlines() if ln.startswith("[rank 0] error:"))
    assert "no space left on device" in line.lower()
    assert not any(r["method"] != "dense" for r in osp_script.res.read_rows(out))


@pytest.mark.slow
@pytest.mark.dist
def test_two_nodes_on_localhost_run_and_end_when_one_is_killed(jobs, small_digits, tmp_path):
    port = _free_port()
    args = train_args(small_digits, tmp_path, "nodes", "-b", "25", "--epochs", "200", "--save-last")
    nodes = []
    for node in (0, 1):
        launch = torchrun("--nnodes=2", "--nproc_per_node=1", f"--node_rank={node}",
                          "--master_addr=127.0.0.1", f"--master_port={port}")  # fmt: skip
        nodes.append(Job([*launch, str(TRAIN), *args], tmp_path, tmp_path / f"n{node}.txt", _env()))
        jobs.append(nodes[-1])
    nodes[0].wait_for(tmp_path / "nodes" / "vit_digits_last.pth")
    assert "Epoch 0: zero patterns identical on 2 ranks" in nodes[0].output()
    survivor_pids = descendants(nodes[0].proc.pid)
    nodes[1].kill_tree()  # the whole "node": launcher and worker
    start = time.monotonic()
    code = nodes[0].wait(BOUND_S)
    log = nodes[0].output()
    assert code is not None, f"node 0 still running {BOUND_S} s after node 1 died:\n{log[-3000:]}"
    assert code != 0 and time.monotonic() - start < BOUND_S
    assert_all_gone(nodes[0], survivor_pids)
    assert "[rank 0] error: lost contact with another rank" in log
    assert "To resume from" in log


def test_watchdog_ends_a_process_blocked_in_cpp(tmp_path):
    """SIGTERM while the main thread waits in C++ (a store wait): no Python handler can run."""
    code = f"""
        import datetime, sys
        sys.path.insert(0, {str(RESEARCH)!r})
        import torch.distributed as dist
        from utils import faults
        faults.install_signal_handlers(grace=1.0)
        store = dist.TCPStore("127.0.0.1", 0, 1, True, timeout=datetime.timedelta(seconds=300))
        print("waiting", flush=True)
        faults.run_main(lambda: store.wait(["never-set"]))
    """
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE,
                            text=True, env=_env())  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "waiting"
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        start = time.monotonic()
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
        assert time.monotonic() - start < 10
    finally:
        proc.kill()
        proc.wait()


def test_stacks_signal_prints_every_thread_and_the_run_goes_on(tmp_path):
    """SIGUSR2 while the main thread waits in C++: every thread's stack on stderr, no exit."""
    code = f"""
        import datetime, sys, threading
        sys.path.insert(0, {str(RESEARCH)!r})
        import torch.distributed as dist
        from utils import faults
        faults.install_signal_handlers(grace=1.0)
        store = dist.TCPStore("127.0.0.1", 0, 1, True, timeout=datetime.timedelta(seconds=300))
        def helper_thread_waiting():
            threading.Event().wait()
        threading.Thread(target=helper_thread_waiting, daemon=True).start()
        print("waiting", flush=True)
        faults.run_main(lambda: store.wait(["never-set"]))
    """
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env())  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "waiting"
        time.sleep(0.3)
        proc.send_signal(faults.STACKS_SIGNAL)
        time.sleep(1.5)
        assert proc.poll() is None, "the stacks signal ended the process"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
        err = proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()
    assert err.count("most recent call first") >= 3, err  # main, helper, watchdog threads
    assert "helper_thread_waiting" in err and "run_main" in err and "_watchdog" in err, err


@pytest.mark.dist
def test_a_hung_torchrun_job_times_out_with_its_stacks_and_no_survivors(tmp_path):
    """The tests' own bound (`proc_tree.run_bounded`): a job whose ranks never finish ends at
    the timeout with every rank's stack in its output, and no process of it left running."""
    script = tmp_path / "hang.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys, threading
        sys.path.insert(0, {str(RESEARCH)!r})
        from utils import faults
        def rank_waits_forever():
            open(os.path.join({str(tmp_path)!r}, "pid" + os.environ["RANK"]), "w").write(
                str(os.getpid()))
            threading.Event().wait()
        faults.run_main(rank_waits_forever)
    """))  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(script)]  # fmt: skip
    start = time.monotonic()
    done = run_bounded(cmd, cwd=tmp_path, env=_env(), timeout=25)
    assert done.returncode == TIMED_OUT
    assert time.monotonic() - start < 25 + 40
    pids = [int((tmp_path / f"pid{r}").read_text()) for r in (0, 1)]
    assert done.stderr.count("rank_waits_forever") >= 2, done.stderr[-4000:]
    assert "timed out after 25 s" in done.stderr
    assert not alive(pids), "a rank survived the timeout"


# ----- honest interrupts ----------------------------------------------------------------------
@pytest.mark.slow
def test_ctrl_c_exits_130_and_the_printed_command_resumes(jobs, small_digits, tmp_path):
    args = train_args(small_digits, tmp_path, "run", "-b", "25", "--epochs", "5", "--save-last")
    job = Job([sys.executable, str(TRAIN), *args], tmp_path, tmp_path / "log.txt", _env())
    jobs.append(job)
    job.wait_for(tmp_path / "run" / "vit_digits_last.pth")
    job.proc.send_signal(signal.SIGINT)
    assert job.wait(BOUND_S) == 130
    log = job.output()
    assert "stopped by SIGINT" in log and "Traceback" not in log
    assert not (tmp_path / "run" / sparse_training.COMPLETE).exists()
    stopped_at = load_checkpoint(tmp_path / "run" / "vit_digits_last.pth")["epoch"]
    assert stopped_at < 4
    command = log.split("To resume from")[1].splitlines()[1].strip()
    assert command.endswith(f"--resume {tmp_path / 'run' / 'vit_digits_last.pth'}")
    resumed = subprocess.run(shlex.split(command), cwd=tmp_path, env=_env(), timeout=120,
                             capture_output=True, text=True)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert load_checkpoint(tmp_path / "run" / "vit_digits_last.pth")["epoch"] == 4
    assert [r["epoch"] for r in read_summary(tmp_path / "run" / "summary.csv")] == [
        str(e) for e in range(5)
    ]  # every epoch once: nothing lost, nothing repeated
    assert (tmp_path / "run" / sparse_training.COMPLETE).is_file()


def test_resume_command_under_torchrun_keeps_the_folder():
    argv = ["research/sparse_training.py", "data", "--resume=old.pth", "--local-rank=1", "-b", "8"]
    env = {"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "GROUP_WORLD_SIZE": "1"}
    command = faults.resume_command(argv, Path("out/x/m_last.pth"), Path("out/x"), env)
    assert command == (
        f"{sys.executable} -m torch.distributed.run --standalone --nproc_per_node=2 "
        "research/sparse_training.py data -b 8 --output out --experiment x "
        "--resume out/x/m_last.pth"
    )


@pytest.mark.parametrize(
    ("err", "code", "text"),
    [
        (KeyboardInterrupt(), 130, "stopped by SIGINT"),
        (faults.Interrupted(signal.SIGTERM), 143, "stopped by SIGTERM"),
        (SetupError("-b 0 ..."), 2, "error: -b 0 ..."),
        (CheckpointError("--resume x is unreadable"), 2, "error: --resume x is unreadable"),
        (sparseml_errors.CheckpointError("checkpoint x does not exist"), 2, "does not exist"),
        (OSError(errno.ENOSPC, "No space left on device", "/x/r.csv"), 1, "cannot write /x/r.csv"),
        (RuntimeError("[pair.cc:1] Connection closed by peer [1.2.3.4]:5"), 1, "lost contact"),
        (NonFiniteError("training loss is nan"), 1, "error: training loss is nan"),
        (ValueError("a bug"), 1, None),
    ],
)
def test_exit_codes(err, code, text):
    got_code, message = faults.describe(err)
    assert got_code == code
    assert message == text if text is None else text in message


def test_one_checkpoint_error_concept():
    """The research scripts' CheckpointError is sparseml's, so one ``except`` catches both."""
    from sparseml import checkpoints

    assert checkpoints.CheckpointError is sparseml_errors.CheckpointError
    assert issubclass(CheckpointError, sparseml_errors.CheckpointError)
    assert issubclass(CheckpointError, SetupError)
    with pytest.raises(sparseml_errors.CheckpointError, match="no state dict"):
        raise CheckpointError("--initial-checkpoint x holds no state dict of tensors")


# ----- shell launcher -------------------------------------------------------------------------
FAKE_PYTHON = """#!/usr/bin/env bash
# Stands in for python: sparse_training.py leaves checkpoints and ends as $FAKE_TRAIN says.
echo "$*" >> "$CALLS"
[[ "$1" == research/sparse_training.py ]] || exit 0
while [[ $# -gt 0 ]]; do
  case "$1" in --output) out=$2 ;; --experiment) exp=$2 ;; esac
  shift
done
mkdir -p "$out/$exp"
echo weights > "$out/$exp/vit_digits_last.pth"
echo weights > "$out/$exp/vit_digits_best.pth"
case "$FAKE_TRAIN" in
  interrupted) exit 130 ;;
  complete) echo '{}' > "$out/$exp/training_complete.json" ;;
esac
exit 0
"""


def test_one_shot_launcher_never_caches_an_unfinished_dense_model(tmp_path):
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    out = tmp_path / "out"
    cached = out / "dense_vit_digits.pth"
    calls = tmp_path / "calls.txt"

    def launch(mode: str) -> subprocess.CompletedProcess:
        env = _env(PYTHON=str(fake), OUTPUT_DIR=str(out), FAKE_TRAIN=mode, CALLS=str(calls),
                   METHODS="gm", SPARSITIES="0.5")  # fmt: skip
        calls.write_text("")
        script = RESEARCH / "run_one_shot_pruning.sh"
        return subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True,
                              timeout=60)  # fmt: skip

    interrupted = launch("interrupted")
    assert interrupted.returncode == 130 and not cached.exists()
    unfinished = launch("exit0")  # resumes, exits 0, but never wrote the completion marker
    assert unfinished.returncode == 1 and not cached.exists()
    assert "--resume" in calls.read_text() and "not caching" in unfinished.stderr
    done = launch("complete")
    assert done.returncode == 0, done.stderr
    assert cached.read_text() == "weights\n"
    assert "one_shot_pruning.py" in calls.read_text()
    (out / "dense_training" / "training_complete.json").unlink()  # a cache from an older run
    again = launch("interrupted")
    assert again.returncode == 130 and not cached.exists()


# ----- bad numbers ----------------------------------------------------------------------------
class NaNAtCall(torch.nn.Module):
    """Cross-entropy that returns NaN on its ``n``-th call (1-based)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n, self.calls = n, 0

    def forward(self, output, target):
        self.calls += 1
        loss = torch.nn.functional.cross_entropy(output, target)
        return loss * float("nan") if self.calls == self.n else loss


def _nan_loss_at(monkeypatch, n: int) -> None:
    original = training.build_losses
    monkeypatch.setattr(training, "build_losses", lambda a, m: (NaNAtCall(n), original(a, m)[1]))


def test_nan_loss_stops_with_epoch_and_batch_and_saves_nothing_new(
    monkeypatch, small_digits, tmp_path
):
    _nan_loss_at(monkeypatch, 8)  # 6 batches per epoch: epoch 1, batch 2
    args = train_args(small_digits, tmp_path, "nan", "--epochs", "3", "--save-last",
                      "--checkpoint-freq", "1")  # fmt: skip
    with pytest.raises(NonFiniteError, match=r"loss is nan in epoch 1 at batch 2/6"):
        sparse_training.main(args)
    run = tmp_path / "nan"
    assert sorted(p.name for p in run.glob("*.pth")) == [
        "vit_digits_best.pth", "vit_digits_best_sparsity=0.00_epoch=0.pth",
        "vit_digits_epoch=0.pth", "vit_digits_last.pth",
    ]  # fmt: skip
    for path in run.glob("*.pth"):
        assert load_checkpoint(path)["epoch"] == 0
    assert len(read_summary(run / "summary.csv")) == 1
    assert not (run / sparse_training.COMPLETE).exists()


def test_skip_nonfinite_steps_skips_the_update(monkeypatch, small_digits, tmp_path, caplog):
    _nan_loss_at(monkeypatch, 3)
    args = train_args(small_digits, tmp_path, "skip", "--epochs", "1", "--skip-nonfinite-steps")
    result = sparse_training.main([*args, "--save-last"])
    assert "NaN/Inf gradients; update skipped (1 so far)" in caplog.text
    state = load_checkpoint(result["out_dir"] / "vit_digits_last.pth")
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values())


def test_nan_weights_are_refused_before_one_shot_pruning(small_digits, tmp_path):
    model = osp_script.create_model("vit_digits")
    state = model.state_dict()
    state["blocks.2.mlp.fc1.weight"][0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pth")
    args = ["--dataset", "digits", "--data-dir", str(small_digits), "--sparseml_recipe",
            str(GM_ONE_SHOT), "--output_dir", str(tmp_path / "out"), "--device", "cpu",
            "--checkpoint_path", str(tmp_path / "nan.pth")]  # fmt: skip
    with pytest.raises(CheckpointError, match=r"1 tensors hold NaN/Inf values \(blocks.2.mlp"):
        osp_script.main(args)
    assert not (tmp_path / "out" / "results.jsonl").exists()


def test_result_rows_hold_null_instead_of_nan():
    args = osp_script.parse_args(["--sparseml_recipe", str(GM_ONE_SHOT)])
    args.device, args.world_size = "cpu", 1
    metrics = {"accuracy": 10.0, "top5": float("nan"), "loss": float("inf"), "samples": 4}
    row = osp_script.osp.make_row(args, "gm", "GM", 0.9, metrics)
    assert (row["top5"], row["loss"], row["accuracy"]) == (None, None, 10.0)
    json.loads(json.dumps(row, allow_nan=False))


# ----- clear errors ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--epochs", "0"], "--epochs 0 is not allowed: the number of epochs must be >= 1"),
        (["--epochs", "-3"], "--epochs -3 is not allowed"),
        (["-b", "0"], "-b/--batch-size 0 is not allowed: the batch size must be >= 1"),
        (["-vb", "-1"], "-vb/--validation-batch-size -1 is not allowed"),
        (["--gs-loader", "-gb", "0"], "-gb/--gs-batch-size 0 is not allowed"),
        (["--initial-checkpoint", "nope.pth"], "--initial-checkpoint nope.pth does not exist"),
        (["--output", "/sys/cap_out"], "--output /sys/cap_out is not writable"),
    ],
)
def test_bad_options_name_option_value_and_rule(extra, message):
    with pytest.raises(SetupError) as info:
        sparse_training.parse_args(["data", *extra])
    assert message in str(info.value) and "\n" not in str(info.value)


def test_bad_option_exits_2_with_one_line(run_script, tmp_path):
    result = run_script("sparse_training.py", [str(tmp_path), "--epochs", "0"])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --epochs 0 is not allowed: the number of epochs must be >= 1"
    ]


def test_num_classes_mismatch_names_keys_shapes_and_option(small_digits, tmp_path):
    state = osp_script.create_model("vit_digits", depth=1).state_dict()
    torch.save(state, tmp_path / "w.pth")
    torch.save({"model": state, "epoch": 0}, tmp_path / "ckpt.pth")
    args = train_args(small_digits, tmp_path, "x", "--epochs", "1", "--num-classes", "5")
    expected = (
        r"does not match the model: shapes differ for head\.weight \(checkpoint \(10, 96\), "
        r"model \(5, 96\)\), head\.bias .*set --num-classes 10"
    )
    # (the resume file holds no optimizer state: --no-resume-opt, else that is the error)
    for option, path, extra in (
        ("--initial-checkpoint", "w.pth", []),
        ("--resume", "ckpt.pth", ["--no-resume-opt"]),
    ):
        with pytest.raises(CheckpointError, match=f"{option} .*{expected}"):
            sparse_training.main([*args, *extra, option, str(tmp_path / path)])


def test_batch_larger_than_the_training_set_is_an_error_not_a_hang(small_digits, tmp_path):
    recipe = tmp_path / "gm.yaml"
    recipe.write_text(GM_RECIPE)
    args = train_args(small_digits, tmp_path, "gb", "--epochs", "1")
    with pytest.raises(SetupError, match=r"-gb/--gs-batch-size 301 exceeds the 300 training"):
        sparse_training.main([*args, "--sparseml-recipe", str(recipe), "--gs-loader", "-gb", "301"])
    with pytest.raises(SetupError, match=r"-b/--batch-size 400 exceeds the 300 training"):
        sparse_training.main([*args, "-b", "400"])


def test_empty_image_folder_and_read_only_data_dir(tmp_path):
    for split in ("train", "validation"):
        (tmp_path / "empty" / split / "cls").mkdir(parents=True)
    args = train_args(tmp_path / "empty", tmp_path, "e", "--epochs", "1")
    with pytest.raises(SetupError, match=r"split 'train' of .*empty"):
        sparse_training.main(args)
    digits = ["--dataset", "digits", "--data-dir", "/sys/cap_digits"]
    with pytest.raises(SetupError, match=r"--data-dir /sys/cap_digits: cannot create"):
        sparse_training.main([*train_args(tmp_path, tmp_path, "d", "--epochs", "1"), *digits])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        # CAP's spellings: messages name the timm option (the folder: the spelling given).
        (["-vb", "0"], "-vb/--validation-batch-size 0 is not allowed: the batch size must be >= 1"),
        (["-gb", "-4"], "-gb/--gs-batch-size -4 is not allowed"),
        (["--output_dir", "/sys/cap_out"], "--output_dir /sys/cap_out is not writable"),
        (["--checkpoint_path", "nope.pth"], "--initial-checkpoint nope.pth does not exist"),
    ],
)
def test_one_shot_bad_options(extra, message):
    with pytest.raises(SetupError) as info:
        osp_script.parse_args(["--sparseml_recipe", str(GM_ONE_SHOT), *extra])
    assert message in str(info.value) and "\n" not in str(info.value)


def test_interrupt_during_bookkeeping_is_raised_after_it():
    done, before = [], signal.getsignal(signal.SIGTERM)
    with pytest.raises(faults.Interrupted), faults.deferred_interrupts():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        done.append(True)  # the block is never cut short
    assert done == [True]
    assert signal.getsignal(signal.SIGTERM) is before


# ----- a kill -9 between the files of one epoch -----------------------------------------------
def _kill_between_files(
    tmp_path: Path, small_digits: Path, count: int, *extra: str, match: str = "_last.pth"
) -> Path:
    """Train 3 epochs, SIGKILLed right after the ``count``-th checkpoint named ``*match``;
    that file lists only best-history files that exist. Returns the run folder."""
    args = train_args(small_digits, tmp_path, "run", "--epochs", "3", "--checkpoint-hist", "2",
                      *extra)  # fmt: skip
    env = _env(FAULT="kill_after_save", FAULT_MATCH=match, FAULT_COUNT=str(count))
    cmd = [sys.executable, str(ROOT / "tests" / "fault_inject.py"), str(TRAIN), *args]
    done = run_bounded(cmd, cwd=tmp_path, env=env, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    run = tmp_path / "run"
    (killed,) = run.glob(f"*{match}")
    state = load_checkpoint(killed)
    listed = [e["file"] for e in state["checkpoint_hist"]]
    assert listed and all((run / f).is_file() for f in listed), (listed, sorted(os.listdir(run)))
    return run


def _resume(run: Path, tmp_path: Path, small_digits: Path, *extra: str, name="last") -> str:
    args = train_args(small_digits, tmp_path, "run", "--epochs", "3", "--checkpoint-hist", "2",
                      *extra, "--resume", str(run / f"vit_digits_{name}.pth"))  # fmt: skip
    done = run_bounded([sys.executable, str(TRAIN), *args], cwd=tmp_path, env=_env(), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


def _best_is_the_top_of_the_history(run: Path, name: str = "last") -> None:
    hist = load_checkpoint(run / f"vit_digits_{name}.pth")["checkpoint_hist"]
    top = run / hist[0]["file"]
    assert (run / "vit_digits_best.pth").read_bytes() == top.read_bytes()
    kept = {p.name for p in run.glob("vit_digits_best_sparsity=*.pth")}
    assert kept == {e["file"] for e in hist}


@pytest.mark.slow
def test_a_kill_between_an_epochs_files_loses_no_best_checkpoint(small_digits, tmp_path):
    """The best-history files an epoch's _last.pth lists are written before it: a kill -9 (or
    a full disk) between them leaves the previous _last.pth, never one naming a missing file."""
    run = _kill_between_files(tmp_path, small_digits, 1, "--save-last")
    _resume(run, tmp_path, small_digits, "--save-last")
    assert load_checkpoint(run / "vit_digits_last.pth")["epoch"] == 2
    assert (run / sparse_training.COMPLETE).is_file()
    _best_is_the_top_of_the_history(run)


@pytest.mark.slow
def test_a_kill_after_the_last_epochs_checkpoint_is_settled_on_resume(small_digits, tmp_path):
    """Killed after the final _last.pth, before the run's end: resuming finds nothing to
    train, and settles what the kill cut off (the _best.pth copy, the compressed mirrors, the
    completion marker launchers wait for) instead of leaving the folder unfinished for good."""
    run = _kill_between_files(tmp_path, small_digits, 3, "--save-last", "--save-compressed")
    assert not (run / sparse_training.COMPLETE).exists()
    said = _resume(run, tmp_path, small_digits, "--save-last", "--save-compressed")
    assert "already finished its 3 epochs" in said and "unchanged" not in said
    marker = json.loads((run / sparse_training.COMPLETE).read_text())
    assert marker["epochs"] == 3 and "top1" in marker["eval"]
    _best_is_the_top_of_the_history(run)
    for kind in ("last", "best"):
        mirror = load_compressed(run / f"vit_digits_{kind}.sparse.safetensors")
        weights = load_checkpoint(run / f"vit_digits_{kind}.pth")["state_dict"]
        assert all(torch.equal(mirror[k], v) for k, v in weights.items())
    again = _resume(run, tmp_path, small_digits, "--save-last", "--save-compressed")
    assert "unchanged" in again  # now nothing to settle


@pytest.mark.slow
def test_a_kill_after_an_epoch_file_loses_no_best_checkpoint(small_digits, tmp_path):
    """--checkpoint-freq without --save-last: the epoch file is the one a resume finds, and it
    lists the epoch's best file, which is written before it."""
    keep_all = ("--checkpoint-freq", "1", "--checkpoint-hist", "5")  # every epoch is kept
    run = _kill_between_files(tmp_path, small_digits, 1, *keep_all, match="digits_epoch=2.pth")
    _resume(run, tmp_path, small_digits, *keep_all, name="epoch=2")
    assert (run / sparse_training.COMPLETE).is_file()
    _best_is_the_top_of_the_history(run, "epoch=2")


@pytest.mark.slow
def test_a_resume_that_skips_epochs_or_leaves_the_folder_settles_nothing(small_digits, tmp_path):
    """Only the run of the checkpoint's folder, resumed at its final epoch, is settled: not one
    whose --start-epoch jumps past the end, nor one whose --experiment names another folder."""
    run = _kill_between_files(tmp_path, small_digits, 1, "--save-last")
    said = _resume(run, tmp_path, small_digits, "--save-last", "--start-epoch", "9")
    assert "unchanged" in said and not (run / sparse_training.COMPLETE).exists()
    args = train_args(small_digits, tmp_path, "elsewhere", "--epochs", "1", "--save-last",
                      "--resume", str(run / "vit_digits_last.pth"))  # fmt: skip
    done = run_bounded([sys.executable, str(TRAIN), *args], cwd=tmp_path, env=_env(), timeout=300)
    assert done.returncode == 0 and "unchanged" in done.stderr, done.stderr[-3000:]
    assert not (run / sparse_training.COMPLETE).exists()


@pytest.mark.slow
def test_a_resume_settles_the_files_before_its_first_epoch(small_digits, tmp_path):
    """Killed between _last.pth and its compressed mirror; a resume that stops before an
    epoch ends (--stop-epoch) still leaves the mirror equal to _last.pth."""
    run = _kill_between_files(tmp_path, small_digits, 1, "--save-last", "--save-compressed")
    mirror = run / "vit_digits_last.sparse.safetensors"
    assert not mirror.exists()
    _resume(run, tmp_path, small_digits, "--save-last", "--save-compressed", "--stop-epoch", "1")
    weights = load_checkpoint(run / "vit_digits_last.pth")["state_dict"]
    assert all(torch.equal(load_compressed(mirror)[k], v) for k, v in weights.items())


def test_settling_a_finished_run_waits_for_no_lock_it_cannot_take(small_digits, tmp_path):
    """A run holding the folder's lock (still training there) makes the settling resume a
    one-line refusal naming it, instead of a completion marker written beside it."""
    from utils import run_end
    from utils.resume import ResumePoint
    from utils.run_dir import lock_folder

    folder = tmp_path / "run"
    held = lock_folder(folder, "--experiment")
    try:
        args = sparse_training.parse_args(train_args(small_digits, tmp_path, "run"))
        point = ResumePoint(folder / "vit_digits_last.pth", {"epoch": 2}, 3)
        with pytest.raises(SetupError, match="--resume"):
            run_end.finish_files(args, folder, point, 3)
    finally:
        held.release()
    assert not (folder / sparse_training.COMPLETE).exists()
