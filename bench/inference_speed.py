"""Inference throughput: imgcls's evaluation path against a plain inference_mode loop, per model family.

    python bench/inference_speed.py [--models resnet18_cifar vit_cifar convnext_cifar fastnet_cifar]
                                    [--images 1024] [--rounds 3] [--data-dir DIR/cifar10]

Plain: the uint8 test images in memory, normalised per batch, fp32, NCHW, `model(x)` under
torch.inference_mode(), at each batch size of imgcls.kernels.measure.EVAL_BATCHES; the plain loop is
credited with its best one. imgcls: the inference engine's `score_split` as `imgcls eval` runs it
(--precision auto, and the kernels imgcls.kernels chooses for inference on this machine: precision, attention
kernel, depthwise precision, memory format, batch size; the choice is made, or read from the cache,
once before timing, and the engine's model is configured with it). The variants are
interleaved in each round, after a warm-up batch of each; the figures are the medians over the rounds.
Images per second.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from classic import bench_data

from imgcls.data import Preprocessing, normalize
from imgcls.inference.engine import Engine, TorchBackend
from imgcls.inference.graph import InferenceModel
from imgcls.kernels.apply import configure
from imgcls.kernels.measure import EVAL_BATCHES, choose_kernels
from imgcls.models import create_model

DEVICE = torch.device("cpu")


def plain_loop(model, split, mean, std, batch: int):
    images = split.images

    @torch.inference_mode()
    def run():
        model.eval()
        for i in range(0, len(images), batch):
            model(normalize(images[i : i + batch], mean, std))

    return run


def measure(name: str, data, split, rounds: int):
    """(plain img/s per batch size, imgcls img/s, the kernel choice, seconds the choice took)."""
    torch.manual_seed(0)
    model = create_model(name, data.num_classes).eval()
    start = time.perf_counter()
    choice = choose_kernels(model, (128, 3, split.img_size, split.img_size), DEVICE, "auto", train=False,
                            data_size=len(split), name=name)
    precision = choice.precision_eval
    choose_seconds = time.perf_counter() - start
    ours_model = create_model(name, data.num_classes).eval()
    ours_model.load_state_dict(model.state_dict())
    configure(ours_model, choice.attention_eval, choice.depthwise_eval, choice.memory_format)
    prep = Preprocessing(split.img_size, data.mean, data.std, data.crop_pct)
    engine = Engine(TorchBackend(InferenceModel(ours_model, prep, memory_format=choice.layout), DEVICE, precision),
                    data.classes, prep, choice.eval_batch_size, precision=precision, kernels=choice, device=DEVICE)
    variants = {f"plain {b}": plain_loop(model, split, data.mean, data.std, b)
                for b in sorted({min(b, len(split)) for b in EVAL_BATCHES})}
    variants["imgcls"] = lambda: engine.score_split(split)
    times = {k: [] for k in variants}
    for b in sorted({min(b, len(split)) for b in EVAL_BATCHES}):  # warm-up: first-call allocations, oneDNN
        plain_loop(model, split.subset(torch.arange(b)), data.mean, data.std, b)()  # kernels for each shape
    engine.score_split(split.subset(torch.arange(min(choice.eval_batch_size, len(split)))))
    for _ in range(rounds):
        for key, fn in variants.items():
            t = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t)
    ips = {k: len(split) / statistics.median(v) for k, v in times.items()}
    return {k: v for k, v in ips.items() if k != "imgcls"}, ips["imgcls"], choice, choose_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18_cifar", "vit_cifar", "convnext_cifar",
                                                        "fastnet_cifar"])
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--data-dir", help="folder holding cifar-10-batches-py/ (default: bundled cifar10-mini)")
    args = parser.parse_args()

    data = bench_data(args.data_dir)
    split = data.test.subset(torch.arange(min(args.images, len(data.test))))
    print(f"{torch.get_num_threads()} threads, {len(split)} test images, {args.rounds} interleaved rounds (medians); "
          "plain: fp32 NCHW inference_mode at its best batch; imgcls: precision and kernels chosen by measurement")
    print(f"{'model':<16} {'plain img/s':>11} {'(batch)':>7} {'imgcls img/s':>12} {'speed-up':>8}  imgcls kernels")
    for name in args.models:
        plain, ours, choice, seconds = measure(name, data, split, args.rounds)
        best = max(plain, key=plain.get)
        kernels = (f"{choice.precision_eval}, batch {choice.eval_batch_size}, {choice.memory_format}, "
                   f"attention {choice.attention_eval}, depthwise {choice.depthwise_eval} "
                   f"({'/'.join(sorted(set(choice.source.values()) - {'none'}))}, {seconds:.1f} s)")
        print(f"{name:<16} {plain[best]:>11.0f} {best.split()[1]:>7} {ours:>12.0f} {ours / plain[best]:>7.2f}x  "
              f"{kernels}", flush=True)


if __name__ == "__main__":
    main()
