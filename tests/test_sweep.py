"""scripts/sweep.py: sweep files are validated, every run trains under its own name, the table lists them."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TINY_CONFIG
from test_bench import SCRIPTS, load_script, run_script


def _sweep_file(tmp_path, text: str):
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, message", [
    ("base: x.yaml\nname: s\nruns: {a: []}\n", "base config 'x.yaml' does not exist"),
    ("base: {cfg}\nname: a/b\nruns: {a: []}\n", "name must be"),
    ("base: {cfg}\nname: s\nruns: {a: --lr=1}\n", "run 'a' must be"),
    ("base: {cfg}\nname: s\nruns: {}\n", "runs must map"),
    ("base: {cfg}\nname: s\nruns: {a: []}\nepochs: 3\n", "may have common; nothing else"),
    ("base: {cfg}\nname: s\ncommon: --x\nruns: {a: []}\n", "common must be"),
    ("base: [\n", "not valid YAML"),
])
def test_bad_sweep_files_end_with_one_clear_error(tmp_path, capsys, text, message):
    sweep = load_script("sweep")
    path = _sweep_file(tmp_path, text.replace("{cfg}", str(TINY_CONFIG)))
    assert sweep.main([str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_unknown_run_names_are_refused_and_dry_run_prints_the_commands(tmp_path, capsys):
    sweep = load_script("sweep")
    path = _sweep_file(tmp_path, f"base: {TINY_CONFIG}\nname: s\ncommon: ['--data.n_train=3']\nruns:\n  a: []\n  b: ['--model.lora_r=8']\n")
    assert sweep.main([str(path), "--only", "c"]) == 2
    assert "no run named c" in capsys.readouterr().err
    assert sweep.main([str(path), "--only", "b", "--dry_run", "--extra=--trainer.max_epochs=2"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [f"=== [1/1] b: -m selfinterp fit --config {TINY_CONFIG} --data.n_train=3 --model.lora_r=8 "
                   "--trainer.max_epochs=2 --trainer.logger.init_args.name=s/b"]
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
def test_sweep_trains_each_run_under_its_name_and_prints_the_table(tmp_path, tiny_model_dir):
    """Two runs at once (--parallel 2): each trains under its own name and writes its own log."""
    path = _sweep_file(tmp_path, f"base: {TINY_CONFIG}\nname: s\nruns:\n  lr-a: []\n  lr-b: ['--model.optimizer.init_args.lr=0.01']\n")
    lines = run_script("sweep", str(path), f"--extra=--model.model={tiny_model_dir} --data.n_train=4", "--parallel", "2", cwd=tmp_path)
    assert sorted(line.split(":")[0] for line in lines if re.fullmatch(r"=== lr-[ab]: exit 0 after \d+ s", line)) == ["=== lr-a", "=== lr-b"]
    rows = [line for line in lines if line.startswith("| lr-")]
    assert [row.split(" | ")[0] for row in rows] == ["| lr-a/version_0", "| lr-b/version_0"]
    assert [row.split(" | ")[6] for row in rows] == ["0.001", "0.01"]  # each run's own learning rate
    assert [row.split(" | ")[4] for row in rows] == ["4", "4"]  # the extra options reach every run
    for run in ("lr-a", "lr-b"):
        assert (tmp_path / "lightning_logs" / "s" / run / "checkpoints" / "last.ckpt").is_file()
        assert re.search(rf"verified epoch_1: r=.*-> results/s/{run}/version_0/epoch_1\n", (tmp_path / "results" / "s" / f"{run}.log").read_text())


def test_a_run_past_the_timeout_is_stopped_and_counts_as_failed(tmp_path, capsys, monkeypatch):
    """--timeout stops the run (here while it still imports), the sweep says so and exits 1."""
    sweep = load_script("sweep")
    monkeypatch.chdir(tmp_path)
    path = _sweep_file(tmp_path, f"base: {TINY_CONFIG}\nname: s\nruns:\n  slow: []\n")
    assert sweep.main([str(path), "--timeout", "0.5"]) == 1
    out, err = capsys.readouterr()
    assert "=== slow: stopped after" in out and "(--timeout)" in out
    assert "failed runs: slow" in err and "no summary.json under results/s" in err
    assert sweep.main([str(path), "--parallel", "0"]) == 2
    assert "--parallel must be at least 1" in capsys.readouterr().err


def test_run_commands_keeps_at_most_parallel_runs_alive_and_reports_failures(tmp_path):
    """Four runs, two at a time: never more than two between their start and end marks, and the one
    that exits non-zero is the one reported failed; each run's output goes to its own log."""
    sweep = load_script("sweep")
    marks = tmp_path / "marks"
    code = ("import sys, time; f = open(sys.argv[1], 'a'); f.write('start\\n'); f.flush(); time.sleep(1.0); "
            "f.write('end\\n'); f.close(); print('ran', sys.argv[2]); sys.exit(int(sys.argv[2]))")
    commands = {f"r{k}": [sys.executable, "-c", code, str(marks), str(3 if k == 2 else 0)] for k in range(4)}
    assert sweep.run_commands(commands, parallel=2, timeout=None, log_dir=tmp_path / "logs") == ["r2"]
    alive, most = 0, 0
    for mark in marks.read_text().split():
        alive += 1 if mark == "start" else -1
        most = max(most, alive)
    assert most == 2 and marks.read_text().count("start") == 4
    assert [(tmp_path / "logs" / f"r{k}.log").read_text() for k in range(4)] == ["ran 0\n", "ran 0\n", "ran 3\n", "ran 0\n"]


def test_a_stop_arriving_while_a_run_is_launched_still_stops_that_run(tmp_path, monkeypatch):
    """SIGTERM delivered inside Popen (after the fork, before the run is tracked) still stops the run:
    it is held until the run is registered, then ends the sweep through its handler."""
    sweep = load_script("sweep")
    launched, popen = [], subprocess.Popen

    def popen_then_sigterm(*args, **kwargs):
        process = popen(*args, **kwargs)
        launched.append(process)
        os.kill(os.getpid(), signal.SIGTERM)  # Python runs the handler before this function returns
        return process

    monkeypatch.setattr(sweep.subprocess, "Popen", popen_then_sigterm)
    sigint = signal.getsignal(signal.SIGINT)  # default, or ignored under nohup
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the handler sweep.py's main installs
    try:
        with pytest.raises(SystemExit) as stop:
            sweep.run_commands({"r": [sys.executable, "-c", "import time; time.sleep(60)"]}, parallel=1,
                               timeout=None, log_dir=tmp_path / "logs")
    finally:
        signal.signal(signal.SIGTERM, previous)
        for process in launched:  # a run the sweep left behind is killed here (returncode -9 fails below)
            if process.poll() is None:
                process.kill()
                process.wait()
    assert stop.value.code == 143
    assert launched[0].returncode == -signal.SIGTERM  # stopped and reaped by the sweep, not left running
    assert signal.getsignal(signal.SIGINT) is sigint  # the held handlers are back

def _children(pid: int) -> list[int]:
    """Live processes whose parent is ``pid`` (Linux /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # it ended while we looked
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_a_terminated_sweep_stops_the_runs_it_started(tmp_path):
    """SIGTERM to the sweep (a job scheduler's stop) takes its running fits down with it: none is left behind."""
    path = _sweep_file(tmp_path, f"base: {TINY_CONFIG}\nname: s\nruns:\n  one: []\n  two: []\n")
    proc = subprocess.Popen([sys.executable, str(SCRIPTS / "sweep.py"), str(path), "--parallel", "2"], cwd=tmp_path,
                            stdout=subprocess.PIPE, text=True)
    try:
        started = 0
        while started < 2:  # both runs launched
            line = proc.stdout.readline()
            assert line, "the sweep ended before starting its runs"
            started += ": started, output in" in line
        deadline = time.monotonic() + 30
        while len(runs := _children(proc.pid)) < 2 and time.monotonic() < deadline:  # "started" comes just before the launch
            time.sleep(0.05)
        assert len(runs) == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 143
        assert "=== one: exit" not in proc.stdout.read()  # stopped, not finished
        for pid in runs:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        if proc.poll() is None:
            proc.kill()
