"""Preemption and the SLURM batch scripts.

The main test runs slurm/cola_tiny_cpu.sh under a real SLURM started here (Debian slurm-wlm + munge: munged,
slurmctld, slurmd on 127.0.0.1, one node `localhost` with 2 CPUs), submitted with sbatch and
preempted twice with SIGUSR2 the two ways SLURM delivers it:
  stage 1: `scancel --signal=USR2 --batch` signals only the batch shell, whose trap forwards
           it to srun (what `--signal=B:USR2@...` or an admin signalling the script does);
  stage 2: `scancel --signal=USR2` signals the job steps, not the shell (what the script's
           `#SBATCH --signal=USR2@120` does before the time limit).
Each time the trainer checkpoints, rank 0 requeues the job, and the requeued job skips the
finished stage and resumes; the per-step losses must equal an uninterrupted torchrun run's.
The packages are installed with apt-get when missing (root); the test skips, saying why,
only where that is impossible. Every daemon it starts is stopped, even on failure.
The others need no SLURM: SIGUSR2 to one of two plain processes, the scripts' syntax and
directives, and the agreement of the 2B stage configs."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SBIN = "/usr/sbin:/sbin:/usr/bin:/bin"
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "squeue", "sinfo")
STEPS = 120  # per stage: long enough (~0.1 s a step here) that a signal lands mid-stage
TINY = ["model.seq_len=32", "model.vae.encoder.dim=32", "model.vae.decoder.dim=32", "model.vae.encoder.n_heads=2",
        "model.vae.decoder.n_heads=2", "model.dit.net.dim=32", "model.dit.net.n_heads=2", "model.dit.net.n_layers=2",
        "train.global_batch_size=8", "train.warmup_steps=2", "train.eval_batches=2", "run.wandb_mode=disabled",
        "sample.num_samples=0", "data.num_workers=1", f"train.max_steps={STEPS}",
        # no periodic checkpoint before the end: a resume mid-stage can only come from the preemption checkpoint
        f"train.ckpt_every={STEPS}"]

def _which(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":" + SBIN)


def ensure_slurm() -> str | None:
    """None when the SLURM and MUNGE binaries are there (installing them with apt-get if not),
    else why they cannot be had."""
    if all(_which(b) for b in BINARIES):
        return None
    missing = [b for b in BINARIES if not _which(b)]
    if not _which("apt-get") or os.geteuid() != 0:
        return (f"SLURM binaries missing ({', '.join(missing)}) and apt-get as root is unavailable: install "
                "them with `apt-get install slurm-wlm munge`")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "slurm-wlm", "munge"]):
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if p.returncode:
            return f"`{' '.join(cmd)}` failed ({p.returncode}): {(p.stderr or p.stdout)[-800:]}"
    missing = [b for b in BINARIES if not _which(b)]
    return f"slurm-wlm and munge installed but {missing} not found" if missing else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalSlurm:
    """munged + slurmctld + slurmd in the foreground as children of this process, with every
    path (socket, key, state, spool, logs, ports) private to `base`."""

    def __init__(self, base: Path):
        self.base = base
        self.procs: list[subprocess.Popen] = []
        self.env = {**os.environ, "SLURM_CONF": str(base / "slurm.conf"), "PATH": os.environ["PATH"] + ":" + SBIN}

    def start(self) -> None:
        b = self.base
        for d in ("state", "spool", "logs", "munge"):
            (b / d).mkdir()
        (b / "munge").chmod(0o755)  # munged wants its socket dir reachable by everyone
        key_dir = b / "key"
        key_dir.mkdir(mode=0o700)
        (key_dir / "munge.key").write_bytes(os.urandom(1024))
        (key_dir / "munge.key").chmod(0o400)
        sock = b / "munge" / "munge.sock"
        self._spawn("munged", ["munged", "-F", f"--socket={sock}", f"--key-file={key_dir / 'munge.key'}",
                               f"--log-file={b / 'logs/munged.log'}", f"--pid-file={b / 'munge/munged.pid'}",
                               f"--seed-file={b / 'munge/seed'}"])
        self._wait_for(sock.exists, "munged socket", 30)
        (b / "slurm.conf").write_text(f"""\
ClusterName=lflmtest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job waits before it may start again (default 120 s)
AuthInfo=socket={sock},cred_expire=10
StateSaveLocation={b / 'state'}
SlurmdSpoolDir={b / 'spool'}
SlurmctldPidFile={b / 'slurmctld.pid'}
SlurmdPidFile={b / 'slurmd.pid'}
SlurmctldLogFile={b / 'logs/slurmctld.log'}
SlurmdLogFile={b / 'logs/slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobRequeue=1
ReturnToService=2
NodeName=localhost NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
""")
        conf = str(b / "slurm.conf")
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", conf])
        # -N: this slurmd is node `localhost` whatever the machine is called, so the allocation's
        # first host (MASTER_ADDR) always resolves
        self._spawn("slurmd", ["slurmd", "-D", "-N", "localhost", "-f", conf])
        self._wait_for(lambda: self.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip() == "idle",
                       "the node to be idle", 60)

    def _spawn(self, name: str, cmd: list[str]) -> None:
        out = open(self.base / "logs" / f"{name}.out", "w")
        self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT))

    def _wait_for(self, cond, what: str, timeout: float) -> None:
        end = time.monotonic() + timeout
        while not cond():
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            if dead or time.monotonic() > end:
                raise RuntimeError(f"local SLURM: no {what} after {timeout}s (exited: {dead}); logs:\n{self.logs()}")
            time.sleep(0.2)

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        p = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
        if check and p.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr}{p.stdout}")
        return p

    def job(self, job_id: str) -> dict[str, str]:
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def logs(self) -> str:
        return "\n".join(f"--- {f.name}\n{f.read_text(errors='replace')[-3000:]}"
                         for f in sorted((self.base / "logs").iterdir()) if f.is_file())

    def stop(self) -> None:
        """Cancel what is still queued or running (slurmstepd and its tasks outlive slurmd),
        then stop the daemons this object started, newest first."""
        if self.procs and all(p.poll() is None for p in self.procs):
            jobs = self.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
            for j in jobs:
                self.run("scancel", j, check=False)
            end = time.monotonic() + 60
            while jobs and time.monotonic() < end and self.run("squeue", "-h", check=False).stdout.strip():
                time.sleep(0.5)
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


@pytest.fixture(scope="module")
def slurm():
    why = ensure_slurm()
    if why:
        print(f"\nSKIP test_slurm: {why}")
        pytest.skip(why)
    # not under pytest's tmp dir: munged refuses a socket below a directory others cannot enter
    base = Path(tempfile.mkdtemp(prefix="lflm-slurm-", dir="/tmp"))
    base.chmod(0o755)
    cluster = LocalSlurm(base)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)


def _losses(run_dir: Path) -> list[float]:
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return [r["loss"] for r in rows if "loss" in r]


def _logged_steps(run_dir: Path) -> int:
    try:
        return len(_losses(run_dir))
    except (FileNotFoundError, json.JSONDecodeError):  # not yet written, or a line half-written
        return 0


@pytest.mark.slurm
def test_preempted_job_requeues_resumes_and_matches_uninterrupted_run(slurm, tiny_data, tmp_path):
    t0 = time.monotonic()
    runs, ref = tmp_path / "slurm_runs", tmp_path / "ref"
    stage1, stage2 = runs / "cola_tiny_vae", runs / "cola_tiny"
    env = {**slurm.env, "RUN_ROOT": str(runs), "DATA_DIR": str(tiny_data), "PYTHON": sys.executable}
    args = [f"--output={slurm.base}/logs/%x-%j.out", f"--error={slurm.base}/logs/%x-%j.err"]
    p = subprocess.run(["sbatch", "--parsable", *args, "slurm/cola_tiny_cpu.sh", *TINY], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    job = p.stdout.strip().split(";")[0]
    out = slurm.base / "logs" / f"cola_tiny-{job}.out"

    # the uninterrupted reference, meanwhile: the same two stages under torchrun, 2 processes
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "launchers/pretrain.py"]
    common = [f"data.path={tiny_data}", *TINY]
    ref_cmd = " && ".join([
        subprocess.list2cmdline([*torchrun, "--config", "configs/cola_tiny_vae.yaml", *common, f"run.dir={ref}/vae"]),
        subprocess.list2cmdline([*torchrun, "--config", "configs/cola_tiny.yaml", *common,
                                 f"model.cola.ref_checkpoint={ref}/vae", f"run.dir={ref}/joint"])])
    ref_log = open(tmp_path / "ref.log", "w")
    reference = subprocess.Popen(["bash", "-c", ref_cmd], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                 stdout=ref_log, stderr=subprocess.STDOUT)
    try:
        def log() -> str:
            return out.read_text(errors="replace") if out.is_file() else ""

        def wait(cond, what, timeout=240):
            end = time.monotonic() + timeout
            while not cond():
                state = slurm.job(job).get("JobState")
                if state in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY") or time.monotonic() > end:
                    err = slurm.base / "logs" / f"cola_tiny-{job}.err"
                    raise AssertionError(f"waiting for {what}: job {job} is {state}\n--- out\n{log()}\n--- err\n"
                                         f"{err.read_text()[-4000:] if err.is_file() else ''}\n{slurm.logs()}")
                time.sleep(0.2)

        # stage 1, a few steps in: signal only the batch shell; its trap forwards to srun
        wait(lambda: _logged_steps(stage1) >= 3, "stage 1 to train")
        slurm.run("scancel", "--signal=USR2", "--batch", job)
        wait(lambda: "restart 1:" in log(), "the requeued job to start")
        # stage 2 (only begun after the requeued job finished stage 1): signal the job steps
        wait(lambda: _logged_steps(stage2) >= 3, "stage 2 to train")
        slurm.run("scancel", "--signal=USR2", job)
        wait(lambda: slurm.job(job).get("JobState") == "COMPLETED", "the job to complete")
        assert reference.wait(timeout=240) == 0, (tmp_path / "ref.log").read_text()[-4000:]
    finally:
        if reference.poll() is None:
            reference.kill()
            reference.wait()
        ref_log.close()

    text, info = log(), slurm.job(job)
    # it really was preempted and requeued twice, each time by the trainer after checkpointing
    assert info["Restarts"] == "2" and info["ExitCode"] == "0:0", info
    assert "batch shell got SIGUSR2: forwarding it to srun" in text, text
    assert text.count("[preempt] requeued SLURM job") == 2, text
    assert f"{stage1}/DONE exists" in text  # the third run skipped the finished stage 1
    # each stage resumed from its preemption checkpoint, mid-stage (ckpt_every=STEPS: no other)
    for d in (stage1, stage2):
        m = re.findall(rf"\[resume\] from {re.escape(str(d))}/checkpoints/step_\d+ at step (\d+)", text)
        assert len(m) == 1 and 0 < int(m[0]) < STEPS, (d, m, text)
        assert json.loads((d / "DONE").read_text())["step"] == STEPS
    # and the losses are those of the uninterrupted run, step for step
    for d, r in ((stage1, ref / "vae"), (stage2, ref / "joint")):
        got, want = _losses(d), _losses(r)
        assert len(got) == len(want) == STEPS
        assert got == want, next((i, a, b) for i, (a, b) in enumerate(zip(got, want)) if a != b)
    print(f"\ntest_slurm: {time.monotonic() - t0:.0f}s from sbatch to checks")


def test_sigusr2_to_one_rank_stops_every_rank_at_one_step_with_a_checkpoint(tiny_data, tmp_path):
    """Outside SLURM, two processes; only rank 1 is signalled (SLURM may reach only some ranks):
    the all-reduced flag stops both after the same step, a checkpoint of that step is written,
    both exit with the preemption code, and the same command then finishes the run."""
    from lflm_dist.train.preemption import EXIT_CODE
    run = tmp_path / "run"
    cmd = [sys.executable, "launchers/pretrain.py", "--config", "configs/cola_tiny_vae.yaml",
           f"data.path={tiny_data}", *TINY, f"run.dir={run}"]
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}  # even when pytest runs in a job
    base.update(WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), OMP_NUM_THREADS="1")

    def start() -> list[subprocess.Popen]:
        return [subprocess.Popen(cmd, cwd=ROOT, env={**base, "RANK": str(r), "LOCAL_RANK": str(r)},
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]

    procs = start()
    try:
        end = time.monotonic() + 120
        while _logged_steps(run) < 3:
            assert time.monotonic() < end and all(p.poll() is None for p in procs), procs[0].communicate()[0]
            time.sleep(0.1)
        procs[1].send_signal(signal.SIGUSR2)
        outs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [EXIT_CODE, EXIT_CODE], outs
    m = re.search(r"stopped after step (\d+), checkpoint (\S+)", outs[0])
    assert m and 3 <= int(m[1]) < STEPS, outs[0]
    assert "not under SLURM" in outs[0] and "requeue" not in outs[1], outs
    step = int(m[1])
    assert json.loads((Path(m[2]) / "trainer.json").read_text())["step"] == step
    assert _logged_steps(run) == step and not (run / "DONE").exists()
    base["MASTER_PORT"] = str(_free_port())
    procs = start()
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert f"at step {step}" in outs[0] and _logged_steps(run) == STEPS
    assert json.loads((run / "DONE").read_text()) == {"step": STEPS}


@pytest.mark.parametrize("script", sorted((ROOT / "slurm").glob("*.sh")), ids=lambda p: p.name)
def test_batch_scripts_parse_and_carry_the_preemption_directives(script):
    p = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    text = script.read_text()
    if script.name == "stages.sh":  # sourced by the others
        assert "PREEMPT_EXIT=75" in text
        return
    assert "# Usage" in text and "source slurm/stages.sh" in text
    for directive in ("--signal=USR2@120", "--requeue", "--open-mode=append", "--output=%x-%j.out",
                      "--error=%x-%j.err"):
        assert f"#SBATCH {directive}" in text, f"{script.name} lacks #SBATCH {directive}"


def test_cola_2b_stage_configs_agree():
    """slurm/cola_2b.sh trains configs/cola_2b_vae.yaml, then configs/cola_2b.yaml from it."""
    from lflm_dist.config import load_config, to_dict
    s1, s2 = load_config(ROOT / "configs/cola_2b_vae.yaml"), load_config(ROOT / "configs/cola_2b.yaml")
    assert (s1.model.cola.stage, s2.model.cola.stage) == (1, 2)
    # the VAE's shape must agree; its loss weights may differ: beta weighs KL(q || N(0, I)) in stage 1
    # and -H(q) in stage 2, and only stage 1 trains the masked-token loss (docs/cola_ablation.md)
    losses = {"beta": None, "mask_prob": None, "mask_weight": None}
    assert {**to_dict(s1.model.vae), **losses} == {**to_dict(s2.model.vae), **losses}
    assert s2.model.vae.mask_prob == 0.0
    for key in ("seq_len", "vocab_size", "attention"):
        assert getattr(s1.model, key) == getattr(s2.model, key), key
    assert s1.data.path == s2.data.path and s2.model.cola.ref_checkpoint == s1.run.dir
