"""Diffusion (excise.diffusion) on a tiny class-conditional UNet: the task's loss, reproducible importance, the
importance → selection → edit core unchanged (Scissorhands' trim and repair), guided sampling."""

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

pytest.importorskip("diffusers")

from excise import UnlearningRequest, unlearn  # noqa: E402
from excise.diffusion import DiffusionTask, conditional_unet, sample  # noqa: E402
from excise.edit import project  # noqa: E402
from excise.importance import sensitivity  # noqa: E402
from excise.models import build_model  # noqa: E402


def _data(n=24, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(classes).repeat(n // classes)
    x = torch.randn(n, 1, 8, 8, generator=g) * 0.3 + (y.view(-1, 1, 1, 1).float() - 1) * 0.5
    return x.clamp(-1, 1), y


def _unet(seed=0):
    torch.manual_seed(seed)
    return conditional_unet((1, 8, 8), 3, channels=(8, 16), groups=4, num_train_timesteps=100)


def test_the_loss_is_the_noise_prediction_error_and_the_same_whatever_the_batching():
    model, task = _unet(), DiffusionTask(num_train_timesteps=100, seed=3)
    x, y = _data()
    with torch.no_grad():
        out = task.output(model, (x, y))
        per = task.loss_from_output(out, y, reduction="none")
        assert out.shape == (24, 2, 1, 8, 8) and per.shape == (24,) and torch.isfinite(per).all()
        assert torch.allclose(per, (out[:, 0] - out[:, 1]).pow(2).mean((1, 2, 3)))
        perm = torch.randperm(24, generator=torch.Generator().manual_seed(1))
        again = torch.cat([task.loss_from_output(task.output(model, (x[perm][i:i + 5], y[perm][i:i + 5])), None,
                                                 reduction="none") for i in range(0, 24, 5)])
    torch.testing.assert_close(again, per[perm], rtol=1e-5, atol=1e-6)
    t, eps, _ = task.draws(x)
    t2, eps2, _ = DiffusionTask(num_train_timesteps=100, seed=4).draws(x)
    assert not torch.equal(eps, eps2)  # another seed, other draws
    assert t.min() >= 0 and t.max() < 100


def test_the_null_class_and_cond_drop():
    task = DiffusionTask(num_train_timesteps=100, seed=0, null_class=3, cond_drop=0.5)
    x, _ = _data(n=300)
    _, _, drop = task.draws(x)
    assert 0.35 < drop.float().mean() < 0.65
    model = build_model("ddpm-unet", (1, 8, 8), 3, channels=(8, 16), groups=4, num_train_timesteps=100)
    assert model.null_class == 3 and model.unet.config.num_class_embeds == 4


def test_importance_on_the_diffusion_loss_is_reproducible_under_a_seed():
    model, (x, y) = _unet(), _data()
    task = DiffusionTask(num_train_timesteps=100, seed=0)
    a = sensitivity(model, DataLoader(TensorDataset(x, y), batch_size=24), task, n_batches=None)
    b = sensitivity(model, DataLoader(TensorDataset(x, y), batch_size=24), task, n_batches=None)
    c = sensitivity(model, DataLoader(TensorDataset(x, y), batch_size=24), DiffusionTask(100, seed=1), None)
    for k in a:
        assert torch.equal(a[k], b[k])
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_scissorhands_trims_and_repairs_a_diffusion_model():
    model, (x, y) = _unet(), _data(n=48)
    task = DiffusionTask(num_train_timesteps=100, seed=0)
    forget = DataLoader(TensorDataset(x[y == 2], y[y == 2]), batch_size=8)
    retain = DataLoader(TensorDataset(x[y != 2], y[y != 2]), batch_size=8)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    res = unlearn(model, UnlearningRequest(forget=forget, retain=retain, task=task), "scissorhands", k=0.05,
                  epochs=1, batch_size=8, checks=False)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # the caller's model untouched
    assert 0 < res.mask.count() and res.info["repair_steps"] > 0
    assert 0 < res.mask.fraction(model) <= 0.05 + 1e-3
    # the trim alone (the core's pieces): re-initialises exactly the selected entries
    from excise import Scope, selection
    from excise.edit import reinit

    mask = selection.topk(sensitivity(model, forget, task), 0.05, Scope.parse("no-norm").names(model))
    trimmed = reinit(model, mask, seed=123)  # not the seed the untrained model was drawn with
    for n, p in trimmed.named_parameters():
        m = mask.get(n, torch.zeros_like(p, dtype=torch.bool))
        assert torch.equal(p[~m], before[n][~m]), n
        if m.any() and n.endswith("weight"):
            assert not torch.equal(p[m], before[n][m]), n


def test_the_projection_keeps_a_repair_step_from_undoing_the_forgetting():
    model, (x, y) = _unet(), _data()
    task = DiffusionTask(num_train_timesteps=100, seed=0)
    params = [p for p in model.parameters()]
    g_f = torch.cat([g.reshape(-1) for g in torch.autograd.grad(-task.loss(model, (x[y == 2], y[y == 2])), params)])
    g_r = torch.cat([g.reshape(-1) for g in torch.autograd.grad(task.loss(model, (x[y != 2], y[y != 2])), params)])
    from excise.edit.project import EPS

    for g in (g_r, g_r - 3 * g_f, -g_f):  # a conflicting step is projected so that it no longer opposes the
        # ascent direction: ⟨g', g_f⟩ = ⟨g, g_f⟩·ε / (‖g_f‖² + ε) ≥ 0 up to the projection's ε
        out = project(g, g_f.unsqueeze(0), 0.5)
        dot = float(g @ g_f)
        assert float(out @ g_f) >= min(dot, 0.0) * EPS / float(g_f @ g_f) - 1e-9
        if dot < 0:
            assert float(out @ g_f) > dot


def test_guided_ddim_sampling_is_seeded_and_shaped():
    model = _unet()
    a, la = sample(model, [0, 2], 3, steps=5, guidance=2.0, seed=0)
    b, _ = sample(model, [0, 2], 3, steps=5, guidance=2.0, seed=0)
    c, _ = sample(model, [0, 2], 3, steps=5, guidance=2.0, seed=1)
    assert a.shape == (6, 1, 8, 8) and la.tolist() == [0, 0, 0, 2, 2, 2]
    assert torch.equal(a, b) and not torch.equal(a, c) and a.abs().max() <= 1


# ---- evaluation of generated samples (excise.evaluation.generative) ----

def test_recognised_share_per_conditioned_class():
    from excise.evaluation.generative import recognised_share

    cond = torch.tensor([0, 0, 0, 0, 1, 1])
    pred = torch.tensor([0, 0, 1, 2, 1, 0])
    assert recognised_share(pred, cond) == {0: 50.0, 1: 50.0}
    with pytest.raises(ValueError, match="no sample"):
        recognised_share(pred, cond, classes=[2])


def test_frechet_and_kernel_distances_have_their_closed_form_values():
    import numpy as np

    from excise.evaluation.generative import frechet_distance, kernel_distance

    rng = np.random.default_rng(0)
    a = rng.standard_normal((4000, 3))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shift = np.array([1.0, 2.0, 0.0])
    assert frechet_distance(a, a + shift) == pytest.approx(5.0, abs=1e-6)  # ‖Δμ‖², same covariance
    # independent Gaussians N(0, I) and N(0, 4I): Tr(I + 4I − 2·2I) = d
    b = rng.standard_normal((4000, 3)) * 2
    assert frechet_distance(rng.standard_normal((4000, 3)), b) == pytest.approx(3.0, rel=0.1)
    same = kernel_distance(a[:2000], a[2000:])
    assert abs(same) < 0.05 and kernel_distance(a[:2000], a[2000:] + shift) > 1.0


def test_classifier_outputs_reads_the_heads_input():
    from torch import nn

    from excise.evaluation.generative import classifier_outputs

    torch.manual_seed(0)
    clf = nn.Sequential(nn.Flatten(), nn.Linear(64, 5), nn.ReLU(), nn.Linear(5, 3))
    x = torch.randn(7, 1, 8, 8)
    probs, feats = classifier_outputs(clf, x, batch_size=3)
    assert torch.allclose(probs, torch.softmax(clf(x), -1), atol=1e-6) and feats.shape == (7, 5)
    assert torch.allclose(torch.from_numpy(feats), clf[:3](x), atol=1e-6)


# ---- methods on a diffusion model ----

def _request(n=48):
    x, y = _data(n=n)
    task = DiffusionTask(num_train_timesteps=100, seed=0, null_class=3)
    forget = DataLoader(TensorDataset(x[y == 2], y[y == 2]), batch_size=8)
    retain = DataLoader(TensorDataset(x[y != 2], y[y != 2]), batch_size=8)
    return UnlearningRequest(forget=forget, retain=retain, task=task), x, y


def test_esd_moves_the_forgotten_class_towards_negative_guidance_and_leaves_the_scope_alone():
    model = _unet()
    req, x, y = _request()
    task = req.task
    xf, yf = x[y == 2], y[y == 2]
    t, eps, _ = task.draws(xf, b"probe")
    x_t = task.scheduler.add_noise(xf, eps, t)
    with torch.no_grad():
        e_null, e_cls = model((x_t, t, torch.full_like(yf, 3))), model((x_t, t, yf))
        target = e_null - 2.0 * (e_cls - e_null)
        before = float((model((x_t, t, yf)) - target).pow(2).mean())
    res = unlearn(model, req, "esd", eta=2.0, lr=0.05, epochs=25, scope="pattern:down_blocks", checks=False)
    with torch.no_grad():
        after = float((res.model((x_t, t, yf)) - target).pow(2).mean())
    assert after < 0.8 * before, (before, after)  # the negative-guidance objective clearly lower
    for (n, p), q in zip(model.named_parameters(), res.model.parameters()):
        if "down_blocks" not in n:
            assert torch.equal(p, q), n
    assert res.info["steps"] == 25  # one batch of the 16 forget samples (batch_size 64) per epoch
    with pytest.raises(ValueError, match="applies to diffusion tasks, not to the request.s classification"):
        unlearn(model, UnlearningRequest(forget=req.forget, retain=req.retain), "esd", checks=False)


def test_salun_finetune_and_retrain_run_on_the_diffusion_loss():
    model = _unet()
    req, x, y = _request()
    task = req.task
    sal = unlearn(model, req, "salun", lr=0.01, batch_size=8, checks=False)
    assert 0 < sal.mask.fraction(model) <= 0.5 + 1e-3 and sal.info["steps"] > 0
    # SalUn's diffusion loss: the forgotten class's condition learns to denoise the other classes' images
    gen = torch.Generator().manual_seed(0)
    other = (x[y == 0][:4], y[y == 0][:4])
    loss = task.random_label_loss(model, (x[y == 2], y[y == 2]), gen, other=other)
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="retain set"):
        task.random_label_loss(model, (x[y == 2], y[y == 2]), gen)
    ft = unlearn(model, req, "finetune", lr=0.01, epochs=1, batch_size=8, checks=False)
    rt = unlearn(model, req, "retrain", epochs=1, lr=1e-3, optimizer="adam", batch_size=8, checks=False)
    for res in (ft, rt):
        assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), res.model.parameters()))


def test_a_training_step_draws_afresh_and_a_seeded_run_repeats():
    model = _unet()
    req, _, _ = _request()
    a = unlearn(model, req, "finetune", lr=0.01, epochs=1, batch_size=8, checks=False)
    b = unlearn(model, req, "finetune", lr=0.01, epochs=1, batch_size=8, checks=False)
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))
    x, y = _data()
    t0, e0, _ = req.task.draws(x[:4], b"w0")
    t1, e1, _ = req.task.draws(x[:4], b"w1")
    assert not torch.equal(e0, e1)  # other weights, other draws for the same samples


def test_generation_metrics_come_from_the_registry(tmp_path):
    from torch import nn

    from excise.diffusion.evaluate import generation_metrics, generation_predictions, sample_grid

    torch.manual_seed(0)
    clf = nn.Sequential(nn.Flatten(), nn.Linear(64, 6), nn.ReLU(), nn.Linear(6, 3))
    model = _unet()
    x, y = _data(n=30)
    p, images, labels = generation_predictions(model, clf, [2], [0, 1, 2], x[y != 2], n_per_class=4, steps=3)
    assert set(p.preds) == {"generated_forget", "generated_retain"} and len(p.preds["generated_forget"][1]) == 4
    m = generation_metrics(model, clf, [2], [0, 1, 2], x[y != 2], n_per_class=4, steps=3)
    assert set(m) == {"forget_recognised", "retain_recognised", "fid_retain", "kid_retain"}
    pred = p.preds["generated_forget"][0].argmax(-1)
    assert m["forget_recognised"] == pytest.approx(100.0 * float((pred == 2).float().mean()))
    assert sample_grid(images, 3, tmp_path / "g.png").exists()


DIFFUSION_PROTOCOL = """
name = "digits-ddpm-tiny"
task = "diffusion"
dataset = "digits"
arch = "ddpm-unet"
forget = "class:3"
seeds = [0]
importance_batch = 64

[arch_kwargs]
channels = [8, 16]
groups = 4

[recipe]
epochs = 1
lr = 1e-3
optimizer = "adam"
weight_decay = 0.0
batch_size = 64

[diffusion]
pixels = [0.0, 1.0]
pad = 4
judge = "JUDGE"
samples = 4
steps = 3

[methods.finetune]
epochs = 1
batch_size = 64
max_steps = 3
[methods.scissorhands]
k = 0.05
epochs = 1
batch_size = 64
max_steps = 3
"""


def test_excise_bench_runs_a_diffusion_protocol(tmp_path, capsys):
    from excise.bench import load_protocol, run_bench
    from excise.cli import main

    judge = tmp_path / "judge.toml"
    judge.write_text('dataset = "digits"\narch = "mlp"\nforget = "class:3"\nseeds = [0]\n[recipe]\nepochs = 3\n')
    proto = tmp_path / "ddpm.toml"
    proto.write_text(DIFFUSION_PROTOCOL.replace("JUDGE", str(judge)))
    assert load_protocol(proto)["task"] == "diffusion"
    report = run_bench(str(proto), progress=False, out=tmp_path / "out")
    rows = {r["method"]: r for r in report.rows}
    assert list(rows) == ["original", "retrain", "finetune", "scissorhands"]
    for r in rows.values():  # scored by the generation metrics, each against the oracle
        assert {"forget_recognised", "retain_recognised", "fid_retain", "kid_retain"} <= set(r)
        assert 0 <= r["forget_recognised"] <= 100 and r["fid_retain"] >= 0
        assert r["gap_forget_recognised"] == abs(r["forget_recognised"] - rows["retrain"]["forget_recognised"])
    assert rows["scissorhands"]["selected_fraction"] > 0 and rows["retrain"]["seconds"] > 0
    md = (tmp_path / "out" / "report.md").read_text()
    assert "forgotten class recognised %" in md and "UA" not in md.split("\n\n")[2]
    grids = sorted(p.name for p in (tmp_path / "out" / "samples").iterdir())
    assert grids == ["finetune-seed0.png", "original-seed0.png", "retrain-seed0.png", "scissorhands-seed0.png"]
    again = run_bench(str(proto), progress=False)  # every row from the cache the first run filled
    assert all(r["from_cache"] for r in again.rows)
    assert main(["bench", str(proto), "--quiet", "--out", str(tmp_path / "cli")]) == 0
    assert "forgotten class recognised %" in capsys.readouterr().out


def test_a_diffusion_protocol_refuses_bad_settings(tmp_path):
    from excise.bench import load_protocol, run_bench

    bad = tmp_path / "bad.toml"
    bad.write_text('dataset = "digits"\narch = "mlp"\nforget = "class:3"\n[diffusion]\npad = 2\n')
    with pytest.raises(ValueError, match="needs task"):
        load_protocol(bad)
    bad.write_text('task = "painting"\ndataset = "digits"\narch = "mlp"\nforget = "class:3"\n')
    with pytest.raises(ValueError, match="unknown task"):
        load_protocol(bad)
    bad.write_text('task = "diffusion"\ndataset = "digits"\narch = "ddpm-unet"\nforget = "class:3"\n'
                   '[diffusion]\ncolour = 1\n')
    with pytest.raises(ValueError, match="unknown \\[diffusion\\] keys"):
        run_bench(str(bad), progress=False)
    bad.write_text('task = "diffusion"\ndataset = "digits"\narch = "ddpm-unet"\nforget = "random:0.1"\n'
                   '[diffusion]\npixels = [0.0, 1.0]\njudge = "fmnist-smallcnn-class"\n')
    with pytest.raises(ValueError, match="erases classes"):
        run_bench(str(bad), progress=False)
    from excise.bench import evaluate

    with pytest.raises(ValueError, match="works on classification protocols"):  # nothing to score a generator with
        evaluate(None, "fmnist-ddpm-class")
