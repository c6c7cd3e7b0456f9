"""docs/examples/research_script.py runs as documented and its numbers fit together."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).parents[2] / "docs" / "examples" / "research_script.py"


def test_research_script_trains_reloads_and_evaluates(tmp_path, capsys, monkeypatch):
    from jcnn import data

    try:
        data.load("fashion_mnist", "test")
    except FileNotFoundError:
        pytest.skip("Fashion-MNIST files not found (set JCNN_DATA_DIR)")
    spec = importlib.util.spec_from_file_location("research_script", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, script)  # as `python script.py` has it
    spec.loader.exec_module(script)
    out = tmp_path / "run"
    result = script.main(["--out", str(out)])

    evaluations = result["evaluations"]
    assert [e["step"] for e in evaluations] == [2, 4, 6]  # 384 training images, batch 64
    assert evaluations == result["fit"]["evaluations"]
    best = max(evaluations, key=lambda e: (e["val_top3"], -e["step"]))
    run = result["run"]
    assert run.step == best["step"]
    # the reloaded best checkpoint reproduces its validation top-3 on the same 128 images
    images, labels = data.load("fashion_mnist", "train")
    from jcnn.train import split_validation

    (_, _), (val_images, val_labels) = split_validation(images[:512], labels[:512], 128, seed=0)
    logits = run.predict(val_images)
    top3 = np.mean([val_labels[i] in np.argsort(logits[i])[-3:] for i in range(128)])
    assert top3 == pytest.approx(best["val_top3"], abs=1e-6)
    summary = json.loads((out / "summary.json").read_text())
    assert "test_accuracy" in summary and summary["final_val_loss"] == evaluations[-1]["val_loss"]
    report = result["report"]
    assert report["count"] == 256 and len(report["per_class_accuracy"]) == 10
    assert "test accuracy" in capsys.readouterr().out
