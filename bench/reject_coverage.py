"""Does `--reject auto` keep its promise? Its target accuracy on the images it accepts, measured on images it
did not choose the threshold on, over many random halvings of a run's held-out images.

    python bench/reject_coverage.py RUN [--targets 0.95,0.99] [--halvings 200]

The run's val and test images (test when it has one) are scored once. Each halving splits them at random
into a choosing half and a measuring half, as `imgcls calibrate` and `imgcls predict --reject auto` would
meet them: a temperature is fitted on the choosing half, its risk-coverage curve built, and the threshold
chosen there by two rules: the binomial bound imgcls uses (the target holds with DEFAULT_CONFIDENCE), and
the plain rule it replaced (the widest threshold whose accuracy seen on the choosing half meets the target).
On the measuring half: how often the accepted images' accuracy met the target, and the median coverage. The
bound's promise is about all halvings: a threshold that then fails, in at most 1 - confidence of them (a
halving where no threshold can be shown keeps no promise it could break).
"""

from __future__ import annotations

import argparse
import statistics

import torch

from imgcls.errors import UserError
from imgcls.evaluation.calibration import fit_scaling
from imgcls.evaluation.rejection import risk_coverage
from imgcls.inference.reject import choose_threshold
from imgcls.inference.run import load_run, run_engine
from imgcls.options import DEFAULT_CONFIDENCE


def held_out_logits(run: str) -> tuple[torch.Tensor, torch.Tensor]:
    trained = load_run(run, "best", torch.device("cpu"))
    engine = run_engine(trained)
    logits, labels = [], []
    for split in ("val", "test"):
        if trained.has_split(split):
            scores, y = engine.score_split(trained.split(split), where=f"the {split} split")
            logits.append(scores.logits.double())
            labels.append(y)
    return torch.cat(logits), torch.cat(labels)


def plain_threshold(curve: dict, target: float) -> float | None:
    """The rule --reject auto had before the bound: the widest point whose accuracy seen meets the target."""
    meets = [i for i, a in enumerate(curve["accuracy"]) if a >= target]
    return curve["threshold"][meets[-1]] if meets else None


def measure(threshold: float | None, probs: torch.Tensor, labels: torch.Tensor, target: float):
    """(held, coverage) on the measuring half; None when the rule chose no threshold."""
    if threshold is None:
        return None
    accepted = probs.max(1).values >= threshold
    if not bool(accepted.any()):
        return True, 0.0
    accuracy = (probs.argmax(1) == labels)[accepted].double().mean().item()
    return accuracy >= target, accepted.double().mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--targets", default="0.95", help="target accuracies, comma-separated (0.95)")
    ap.add_argument("--halvings", type=int, default=200)
    args = ap.parse_args()
    logits, labels = held_out_logits(args.run)
    print(f"{args.run}: {len(labels)} held-out images, accuracy {(logits.argmax(1) == labels).double().mean():.4f}; "
          f"confidence {DEFAULT_CONFIDENCE}, {args.halvings} random halvings")
    for target in map(float, args.targets.split(",")):
        report(logits, labels, target, args.halvings)


def report(logits: torch.Tensor, labels: torch.Tensor, target: float, halvings: int) -> None:
    results = {"bound": [], "plain": []}
    gen = torch.Generator().manual_seed(0)
    for _ in range(halvings):
        order = torch.randperm(len(labels), generator=gen)
        choose, check = order[: len(order) // 2], order[len(order) // 2:]
        probs = fit_scaling(logits[choose], labels[choose]).apply(logits).softmax(1)
        curve = risk_coverage(probs[choose], labels[choose])
        try:
            bound = choose_threshold(curve, target)["threshold"]
        except UserError:
            bound = None
        for rule, threshold in (("bound", bound), ("plain", plain_threshold(curve, target))):
            results[rule].append(measure(threshold, probs[check], labels[check], target))
    for rule, found in results.items():
        chosen = [r for r in found if r is not None]
        if not chosen:
            print(f"target {target} {rule:>5}: no threshold in any halving")
            continue
        held, broken = sum(h for h, _ in chosen), sum(not h for h, _ in chosen)
        print(f"target {target} {rule:>5}: threshold in {len(chosen)}/{len(found)} halvings, the target held in "
              f"{held}/{len(chosen)} of them; a broken promise in {broken / len(found):.1%} of all halvings "
              f"(the bound allows {1 - DEFAULT_CONFIDENCE:.0%}); median coverage "
              f"{statistics.median(c for _, c in chosen):.1%}")

if __name__ == "__main__":
    main()
