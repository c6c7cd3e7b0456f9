"""jcnn-eval (jcnn/train/eval_cli.py); its other tests run with jcnn-train's in test_cli.py."""

import re
import subprocess
import sys

from jcnn.train import cli, run_folder
from jcnn.train.eval_cli import main as eval_main

SMALL = ["--model", "lenet5_1998", "--dataset", "synthetic", "--limit-train", "128"]
HOLD = """
import fcntl, os, sys, time
handle = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(handle, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(60)
"""


def test_jcnn_eval_takes_the_run_folders_lock_before_writing_into_it(tmp_path, capsys):
    # jcnn-eval wrote evaluation.json and confusion_matrix.png into the folder while a
    # jcnn-train held it (a run with --overwrite deletes them, a resume rewrites the checkpoints
    # jcnn-eval reads): it now takes the same lock, and refuses with jcnn-train's exit status
    out = tmp_path / "run"
    args = [*SMALL, "--batch-size", "64", "--no-progress", "--epochs", "1", "--max-steps", "1"]
    assert cli.main([*args, "--out", str(out)]) == 0
    capsys.readouterr()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out / run_folder.LOCK_FILE)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "held\n"
        before = sorted(p.name for p in out.iterdir())
        assert eval_main([str(out)]) == 3
        err = capsys.readouterr().err
        assert err.startswith("jcnn-eval: run folder ") and "in use by another process" in err
        assert "--json and --confusion" in err and "\n" not in err.strip()
        assert eval_main([str(out), "--json", str(tmp_path / "e.json")]) == 3  # the PNG: inside
        assert sorted(p.name for p in out.iterdir()) == before
        outside = ["--json", str(tmp_path / "e.json"), "--confusion", str(tmp_path / "c.png")]
        assert eval_main([str(out), *outside]) == 0  # only reads the folder
        assert (tmp_path / "e.json").exists() and (tmp_path / "c.png").exists()
    finally:
        holder.kill()
        holder.wait()
    capsys.readouterr()
    assert eval_main([str(out)]) == 0
    assert (out / "evaluation.json").exists() and not (out / run_folder.LOCK_FILE).exists()


def test_jcnn_eval_never_writes_its_results_over_the_runs_own_files(tmp_path, capsys):
    # --json run/config.json replaced the run's configuration with the evaluation (exit 0): the
    # folder then failed load_run and every resume
    out = tmp_path / "run"
    args = [*SMALL, "--batch-size", "64", "--no-progress", "--epochs", "1", "--max-steps", "1"]
    assert cli.main([*args, "--out", str(out)]) == 0
    capsys.readouterr()
    files = sorted(p for p in out.rglob("*") if p.is_file())
    before = {p: p.read_bytes() for p in files}
    for flags, says in (
        (
            ["--json", str(out / "config.json")],
            "--json .*config.json: would overwrite the run's own config.json",
        ),
        (
            ["--confusion", str(out / "run.json")],
            "--confusion .*: would overwrite the run's own run.json",
        ),
        (
            ["--json", str(out / "checkpoints" / "x.json")],
            "would overwrite the run's own checkpoints",
        ),
        (["--json", str(out / "confusion_matrix.png")], "the run's own confusion_matrix.png"),
        (["--json", str(tmp_path / "a"), "--confusion", str(tmp_path / "a")], "must differ"),
    ):
        assert eval_main([str(out), *flags]) == 2
        err = capsys.readouterr().err
        assert re.search(says, err) and "\n" not in err.strip(), err
        assert sorted(p for p in out.rglob("*") if p.is_file()) == files
        assert all(p.read_bytes() == data for p, data in before.items())
    mine = ["--json", str(out / "mine.json"), "--confusion", str(out / "mine.png")]
    assert eval_main([str(out), *mine]) == 0  # a file of one's own in the folder is fine
    assert (out / "mine.json").exists() and (out / "mine.png").exists()
