import json

import pytest
import torch

from excise.cli import main
from excise.models import build_model
from excise.training import save_state


def test_demo_on_digits_writes_tables(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--data", "digits", "--arch", "mlp", "--epochs", "8", "--forget", "class:3", "--quiet",
               "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "retrain (oracle)" in printed and "assd" in printed
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["original", "retrain (oracle)", "ssd", "lfssd", "assd"]
    assert all(r["seconds"] > 0 and r["speedup"] > 0 for r in rows[1:])
    assert "| method |" in (out / "results.md").read_text()
    assert (out / "splits.json").exists()
    # a second run comes from the caches: reference importance hit
    main(["demo", "--data", "digits", "--arch", "mlp", "--epochs", "8", "--forget", "class:3", "--quiet",
          "--out", str(out)])
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert rows[2]["ref_importance_cache"] == "hit"


def test_unlearn_command_on_a_user_checkpoint(tmp_path, capsys):
    model = build_model("mlp", (1, 8, 8), 10)
    torch.save(model.state_dict(), tmp_path / "user.pt")
    before = (tmp_path / "user.pt").read_bytes()
    rc = main(["unlearn", "--model", str(tmp_path / "user.pt"), "--arch", "mlp", "--data", "digits",
               "--forget", "random:0.1", "--method", "ssd", "--hp", "alpha=2", "--quiet", "--out", str(tmp_path / "o")])
    assert rc == 0
    assert (tmp_path / "user.pt").read_bytes() == before  # never modified in place
    for f in ("model.safetensors", "mask.safetensors", "splits.json", "results.json", "results.md"):
        assert (tmp_path / "o" / f).exists()
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert res["meta"]["result"]["hparams"]["alpha"] == 2


def test_unlearn_command_calibrates_with_the_validation_split_as_holdout(tmp_path, capsys):
    from pathlib import Path

    ckpt = Path(__file__).parent / "fixtures" / "checkpoints" / "digits-mlp-e40-s0-original.safetensors"
    args = ["unlearn", "--model", str(ckpt), "--arch", "mlp", "--data", "digits", "--epochs", "40",
            "--forget", "class:3", "--quiet"]
    assert main(args + ["--method", "auto", "--trials", "4", "--out", str(tmp_path / "a")]) == 0
    printed = capsys.readouterr().out
    assert "calibrated ssd (class-like request" in printed
    res = json.loads((tmp_path / "a" / "results.json").read_text())["meta"]["result"]
    assert res["method"] == "ssd" and res["info"]["calibration"]["trials_run"] <= 4
    assert res["info"]["auto"]["chosen"] == "ssd"
    assert main(args + ["--method", "auto", "--hp", "alpha=3", "--out", str(tmp_path / "b")]) == 2
    assert "drop --hp" in capsys.readouterr().err
    assert main(args + ["--method", "retrain", "--calibrate", "--out", str(tmp_path / "c")]) == 2
    assert "declares no strength" in capsys.readouterr().err


def test_unlearn_command_errors(tmp_path, capsys):
    model = build_model("smallcnn", (1, 8, 8), 10)
    save_state(model, tmp_path / "m.safetensors")
    assert main(["unlearn", "--model", str(tmp_path / "m.safetensors"), "--arch", "mlp", "--data", "digits",
                 "--quiet", "--out", str(tmp_path / "o")]) == 2
    assert "does not fit" in capsys.readouterr().err
    assert main(["unlearn", "--model", str(tmp_path / "m.safetensors"), "--arch", "smallcnn", "--data", "digits",
                 "--forget", "class:42", "--quiet", "--out", str(tmp_path / "o")]) == 2
    assert "unknown class id" in capsys.readouterr().err


def test_methods_lists_presets(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "ssd" in out and "assd" in out and "paper" in out
    assert "tuned over: alpha [1, 3000] log, lam [0.1, 10] log" in out  # the search space excise tune uses
    assert "calibrate=True moves alpha [1, 3000] log (smaller forgets more)" in out


def test_unlearn_command_runs_saps_on_a_relabel_request(tmp_path, capsys):
    from excise.data import ForgetSpec, load_digits, make_splits, with_wrong_labels
    from excise.training import TrainRecipe, seeded_loader, train

    clean, test = load_digits("train"), load_digits("test")
    splits = make_splits(ForgetSpec.parse("relabel:150"), clean, test)  # the CLI makes the same split
    torch.manual_seed(0)
    model = build_model("mlp", (1, 8, 8), 10)
    train(model, seeded_loader(with_wrong_labels(clean, splits), splits.train, 32, shuffle=True),
          TrainRecipe(epochs=40), progress=False)
    torch.save(model.state_dict(), tmp_path / "noisy.pt")
    rc = main(["unlearn", "--model", str(tmp_path / "noisy.pt"), "--arch", "mlp", "--data", "digits",
               "--forget", "relabel:150", "--method", "saps", "--hp", "update=steps", "--hp", "k=0.05",
               "--hp", "lr=0.05", "--hp", "epochs=5", "--hp", "max_steps=200", "--quiet", "--out", str(tmp_path / "o")])
    assert rc == 0
    assert "acc. on Z with true labels" in capsys.readouterr().out
    before, after = json.loads((tmp_path / "o" / "results.json").read_text())["rows"]
    assert before["corrected_acc"] < 40 and after["corrected_acc"] > before["corrected_acc"] + 25
