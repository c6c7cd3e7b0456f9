"""jcnn-eval (jcnn/train/eval_cli.py); its other tests run with jcnn-train's in test_cli.py."""

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
