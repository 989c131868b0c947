"""imgcls lr-find: the range test's sweep, its suggestions, and the command on real data."""

import hashlib
import math

import pytest
import torch
import torch.nn.functional as F

from imgcls.cli import main
from imgcls.errors import UserError
from imgcls.models import create_model
from imgcls.training import lr_find
from imgcls.training.lr_find import BETA, DIVERGE, lr_range_test, suggestions


@pytest.fixture
def one_thread():
    """Tiny models and batches: a second thread only slows them down on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _separable(scale: float, n=256, d=8, k=3):
    """Linearly separable features (labels from a random linear map), multiplied by `scale`."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    y = (x @ torch.randn(d, k, generator=g)).argmax(1)
    return x * scale, y


def _linear(x, y) -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(x.shape[1], int(y.max()) + 1)


def _gd_step(x, y, model, optimizer):
    """One full-batch SGD step (no momentum); returns the loss before it, as a training step does."""

    def step() -> float:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def _good_range(x, y, steps: int) -> tuple[float, float]:
    """The rates at which constant-rate training of the same linear model works, found by brute force:
    within `steps` steps the loss halves and never rises above where it started. All rates train at
    once, as a batch of independent copies of the model."""
    lrs = torch.logspace(-5, 5, 41)
    init = _linear(x, y)
    weight = init.weight.detach().repeat(len(lrs), 1, 1).requires_grad_()
    bias = init.bias.detach().repeat(len(lrs), 1).requires_grad_()
    history = []
    for _ in range(steps):
        logits = torch.einsum("nd,lkd->lnk", x, weight) + bias[:, None]
        losses = F.cross_entropy(logits.flatten(0, 1), y.repeat(len(lrs)), reduction="none").view(len(lrs), -1)
        losses = losses.mean(1)
        history.append(losses.detach())
        weight.grad = bias.grad = None
        losses.sum().backward()  # each copy's gradient is its own loss's
        with torch.no_grad():
            weight -= lrs[:, None, None] * weight.grad
            bias -= lrs[:, None] * bias.grad
    curves = torch.stack(history, 1)
    works = curves.isfinite().all(1) & (curves.amax(1) <= curves[:, 0]) & (curves[:, -1] < 0.5 * curves[:, 0])
    good = lrs[works].tolist()
    assert good, "the brute-force search found no working rate"
    return min(good), max(good)


@pytest.mark.parametrize("scale", [1.0, 10.0])
def test_suggestions_land_in_the_range_where_training_works(scale, one_thread):
    """Scaling the features by 10 moves the working range down 100-fold; the suggestions follow it."""
    x, y = _separable(scale)
    steps = 100
    low, high = _good_range(x, y, steps)
    model = _linear(x, y)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    result = lr_range_test(optimizer, _gd_step(x, y, model, optimizer), 1e-5, 1e3, steps)
    assert result.stop in ("diverged", "non-finite")  # 1e3 is far too high at either scale
    assert low <= result.steepest <= high, (low, result.steepest, high)
    assert low <= result.valley <= high, (low, result.valley, high)


def test_steepest_and_valley_on_a_known_curve():
    lrs = torch.logspace(-6, 0, 61).tolist()
    # a smooth drop centred on 1e-3 (steepest there), flat before, a rise after 1e-1
    curve = [2 - math.tanh(2 * (math.log10(lr) + 3)) + max(0.0, math.log10(lr) + 1) ** 2 for lr in lrs]
    steepest, valley = suggestions(lrs, curve)
    assert steepest == pytest.approx(1e-3, rel=0.3)
    # the longest descent runs from the start to the minimum (about 1e-1); halfway along it in log-space
    assert 1e-4 < valley < 1e-2


def _previous_valley(lrs, losses):
    """REFERENCE ORACLE, not imgcls code: the previous implementation of lr_find._valley, kept verbatim
    to check that the O(n log n) rewrite suggests the same rate. It followed fastai's O(n^2) loop."""
    n = len(losses)
    length = [1] * n
    end = 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and length[i] < length[j] + 1:
                length[i] = length[j] + 1
        if length[i] > length[end]:
            end = i
    if length[end] < 3:  # the loss never really fell
        return None
    start = end - length[end] + 1
    span = (end - start) / 3
    return lrs[start + int(span) + int(span / 2)]


def _sweep_curve(gen: torch.Generator, n: int) -> list[float]:
    """A range test's smoothed loss: flat, a fall, a blow-up, with noise, EMA-smoothed as lr_range_test
    smooths it (bias-corrected)."""
    x = torch.linspace(-1, 1, n)
    centre, width = (torch.rand(2, generator=gen) * torch.tensor([1.0, 0.3]) + torch.tensor([-0.5, 0.05])).tolist()
    blow_up = 0.2 + 0.6 * torch.rand(1, generator=gen).item()
    raw = 2 - torch.tanh((x - centre) / width) + 20 * (x - blow_up).clamp(min=0) ** 2
    raw = raw + 0.3 * torch.rand(1, generator=gen).item() * torch.randn(n, generator=gen)
    smoothed, avg = [], 0.0
    for i, loss in enumerate(raw.tolist()):
        avg = BETA * avg + (1 - BETA) * loss
        smoothed.append(avg / (1 - BETA ** (i + 1)))
    return smoothed


def _valley_cases():
    gen = torch.Generator().manual_seed(0)
    for _ in range(150):  # realistic sweeps of the lengths lr-find runs
        n = int(torch.randint(10, 300, (1,), generator=gen))
        yield _sweep_curve(gen, n)
    for _ in range(150):  # unstructured: uniform noise, random walks, and values with many exact ties
        n = int(torch.randint(1, 120, (1,), generator=gen))
        yield torch.rand(n, generator=gen).tolist()
        yield torch.randn(n, generator=gen).cumsum(0).tolist()
        yield torch.randint(0, 6, (n,), generator=gen).float().tolist()
    yield [3.0, 2.0, 2.0, 2.0, 1.0, 1.0, 0.5]  # ties inside the run
    yield [1.0, 2.0, 1.0, 2.0, 1.0, 0.0, 2.0, 1.0, 0.0]  # two runs of the greatest length: the first ends first
    yield [5.0, float("nan"), 4.0, 3.0, float("nan"), 2.0]  # NaN extends nothing and is extended by nothing
    yield [float("inf"), 2.0, 1.0, float("-inf")]


def test_valley_suggests_what_the_previous_quadratic_implementation_did():
    """On some 600 curves, the patience-sorting valley picks the same point as the O(n^2) loop it
    replaced, ties included: both take the earliest-ending run of the greatest length."""
    checked = 0
    for losses in _valley_cases():
        lrs = [1e-6 * 1.1**i for i in range(len(losses))]
        assert lr_find._valley(lrs, losses) == _previous_valley(lrs, losses), losses
        checked += 1
    assert checked > 600
    assert lr_find._valley([], []) is None and lr_find._valley([1e-3, 1e-2], [2.0, 1.0]) is None  # too short


def test_sweep_keeps_group_ratios_and_stops_on_divergence_and_nan(one_thread):
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(3)]
    optimizer = torch.optim.AdamW([{"params": [params[0]], "lr": 1e-5}, {"params": [params[1]], "lr": 1e-4},
                                   {"params": [params[2]], "lr": 1e-3}])
    seen = []

    def rising() -> float:
        seen.append([g["lr"] for g in optimizer.param_groups])
        return 1.0 if len(seen) < 20 else 1.0 + (len(seen) - 19) ** 2

    result = lr_range_test(optimizer, rising, 1e-6, 1.0, 50)
    assert result.stop == "diverged" and len(result.lrs) < 50
    assert result.smoothed[-1] > DIVERGE * min(result.smoothed)
    for rates, head in zip(seen, result.lrs, strict=True):
        assert rates[2] == pytest.approx(head)
        assert rates == pytest.approx([head / 100, head / 10, head])  # the groups keep their ratios
    assert result.lrs[0] == pytest.approx(1e-6)

    values = iter([2.0, 1.9, 1.8, float("nan")])
    result = lr_range_test(optimizer, lambda: next(values), 1e-6, 1.0, 50)
    assert result.stop == "non-finite" and result.losses == [2.0, 1.9, 1.8]


# --- the command, on cifar10-mini ------------------------------------------------------------------


@pytest.fixture
def weights_file(tmp_path):
    torch.manual_seed(1)
    path = tmp_path / "weights" / "fastnet.pth"
    path.parent.mkdir()
    torch.save(create_model("fastnet_cifar_small", 10).state_dict(), path)
    return path


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _capture_context(monkeypatch):
    """Keep the context lr-find builds, to look at its model and optimizer afterwards."""
    built = []

    def build(*args, **kwargs):
        built.append(real(*args, **kwargs))
        return built[-1]

    real = lr_find.build_context
    monkeypatch.setattr(lr_find, "build_context", build)
    return built


FAST = ["--model", "fastnet_cifar_small", "--batch-size", "8", "--precision", "fp32"]


def test_cli_leaves_weights_and_cwd_alone(tmp_path, monkeypatch, capsys, weights_file, one_thread):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    before = _digest(weights_file)
    assert main(["lr-find", *FAST, "--steps", "30", "--pretrained", str(weights_file)]) == 0
    out = capsys.readouterr().out
    assert "suggested --lr" in out and "wrote lr_find.png" in out
    assert sorted(p.name for p in work.iterdir()) == ["lr_find.png"]  # no runs/ folder, nothing else
    assert (work / "lr_find.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in weights_file.parent.iterdir()) == ["fastnet.pth"]
    assert _digest(weights_file) == before


def test_feature_extract_sweeps_the_head_alone(tmp_path, monkeypatch, weights_file, one_thread):
    built = _capture_context(monkeypatch)
    plot = tmp_path / "plots" / "fe.png"
    assert main(["lr-find", *FAST, "--steps", "10", "--pretrained", str(weights_file), "--strategy", "feature-extract",
                 "--out", str(plot)]) == 0
    assert plot.exists()
    model = built[0].model
    saved = torch.load(weights_file, weights_only=True)
    head = {f"{name}.{k}" for name, m in model.named_modules() if m is model.get_classifier()
            for k in m.state_dict()}
    for key, value in model.state_dict().items():
        if key in head:
            assert not torch.equal(value.cpu(), saved[key]), f"the head ({key}) did not train"
        else:  # weights and BatchNorm statistics of the frozen backbone
            assert torch.equal(value.cpu(), saved[key]), f"{key} changed under feature-extract"


def test_layer_decay_rates_keep_their_ratios(tmp_path, monkeypatch, weights_file, one_thread):
    built = _capture_context(monkeypatch)
    assert main(["lr-find", *FAST, "--steps", "10", "--pretrained", str(weights_file), "--layer-decay", "0.5",
                 "--lr", "0.01",
                 "--out", str(tmp_path / "ld.png")]) == 0
    ctx = built[0]
    assert len(ctx.groups) > 2
    planned = {g.name: g.lr for g in ctx.groups}
    head = ctx.optimizer.param_groups[-1]["lr"]
    assert head != pytest.approx(0.01)  # the sweep moved the rates ...
    for group in ctx.optimizer.param_groups:  # ... all by one factor
        assert group["lr"] / head == pytest.approx(planned[group["group"]] / planned[ctx.groups[-1].name])


@pytest.mark.parametrize("argv, message", [
    (["--steps", "5"], "--steps 5 is too few"),
    (["--steps", "100000"], "is more than one epoch"),
    (["--start-lr", "1", "--end-lr", "0.1"], "start < end"),
    (["--out", "plot.txt"], "must name a .png, .svg, .pdf file"),
])
def test_bad_sweep_options_are_one_line(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    # kernels given, not measured: a measurement taking over 2 s on a loaded machine would print its progress
    assert main(["lr-find", "--model", "fastnet_cifar_small", "--batch-size", "16", "--precision", "fp32",
                 "--memory-format", "channels_last", "--eval-batch-size", "64", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("imgcls: error: ") and message in err[0], err
    assert list(tmp_path.iterdir()) == []


def test_sweep_options_fail_before_loading_anything(monkeypatch):
    def no_context(*args, **kwargs):
        raise AssertionError("built a context for a bad request")

    monkeypatch.setattr(lr_find, "build_context", no_context)
    with pytest.raises(UserError, match="--end-lr"):
        lr_find.run_lr_find(None, "cpu", 1e-3, float("inf"), 30, "x.png")
