"""Train a plain model as a multi-branch one, consolidate it during training, and fold it for deployment.

    python examples/expand_merge_fold.py            # a small CNN with BatchNorm, RepVGG-style branches
    python examples/expand_merge_fold.py --model vit --steps 60

expand (4 branches) -> train -> merge to 2 branches -> train -> fold, on synthetic data; every step is
checked to compute what the step before it computed, and the time per training step of the plain,
expanded and merged models and the deploy speed of the folded one are printed (interleaved medians:
``branchfold.timing``).  Timings on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F
from torch import nn

import branchfold
from branchfold.timing import interleaved
from branchfold.zoo import seed_vit


def small_cnn() -> nn.Module:
    def conv_bn(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(*conv_bn(3, 16, 2), *conv_bn(16, 16), *conv_bn(16, 32, 2), *conv_bn(32, 32),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))  # fmt: skip


def small_vit() -> nn.Module:
    return seed_vit(depth=2, branches=1, dim=64, heads=2, image_size=32, patch=4)


class Synthetic:
    """Random images labelled by a fixed random teacher: a task the model can learn, made on the fly."""

    def __init__(self, batch: int, seed: int = 0) -> None:
        self.teacher = torch.randn(3 * 2 * 2, 10, generator=torch.Generator().manual_seed(0))
        self.g = torch.Generator().manual_seed(seed)  # the stream of batches
        self.batch = batch

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(self.batch, 3, 32, 32, generator=self.g)
        y = (F.adaptive_avg_pool2d(x, 2).flatten(1) @ self.teacher).argmax(1)
        return x, y


def trainer(model: nn.Module, opt: torch.optim.Optimizer, data: Synthetic):
    """One training step per call; returns the loss."""

    def step() -> float:
        x, y = data()
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss.item()

    return step


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / a.abs().max()).item()


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def train(name: str, step, steps: int) -> None:
    losses = [step() for _ in range(steps)]
    print(f"  {name}: loss {losses[0]:.3f} -> {sum(losses[-5:]) / len(losses[-5:]):.3f} over {steps} steps")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["cnn", "vit"], default="cnn")
    parser.add_argument("--steps", type=int, default=60, help="training steps per phase")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = small_cnn() if args.model == "cnn" else small_vit()
    probe = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))

    # 1. expand: 4 parallel linears per linear, KxK + 1x1 + identity per conv; same function
    expanded = branchfold.expand(model, branches=4, conv_style="repvgg")
    print(f"expand: {sum(p.numel() for p in model.parameters())} -> "
          f"{sum(p.numel() for p in expanded.parameters())} parameters, "
          f"error {rel_err(outputs(model.eval(), probe), outputs(expanded.eval(), probe)):.1e}")  # fmt: skip
    plain_opt = torch.optim.AdamW(model.train().parameters(), lr=2e-3)
    train("plain, for comparison", trainer(model, plain_opt, Synthetic(32, seed=1)), 2 * args.steps)
    opt, data = torch.optim.AdamW(expanded.train().parameters(), lr=2e-3), Synthetic(32, seed=1)
    train("expanded", trainer(expanded, opt, data), args.steps)

    # 2. merge to 2 branches mid-training (in place), and tell the optimizer
    four = copy.deepcopy((expanded, opt))  # kept only to time a 4-branch step beside the others
    expanded.eval()
    before = outputs(expanded, probe)
    report = branchfold.merge(expanded, branches=2)
    report.update_optimizer(opt)
    print(f"merge to 2: {len(report)} modules, {len(report.old_parameters)} -> {len(report.new_parameters)} "
          f"parameters replaced, error {rel_err(before, outputs(expanded, probe)):.1e}")  # fmt: skip
    train("merged", trainer(expanded.train(), opt, data), args.steps)

    # 3. fold for deployment: one op per linear/conv, the plain model's op and parameter counts
    expanded.eval()
    result = branchfold.fold_with_report(expanded, (probe,))
    plain_result = branchfold.fold_with_report(model.eval(), (probe,))
    plain = plain_result.report
    print(f"fold: {result.report.before.ops} -> {result.report.after.ops} ops (plain model folded: "
          f"{plain.after.ops}), {result.report.after.params} parameters (plain: {plain.after.params}), "
          f"error {rel_err(outputs(expanded, probe), outputs(result.model, probe)):.1e}")  # fmt: skip

    print("time per training step (batch 32, interleaved medians):")
    sides = {
        "plain": trainer(model.train(), plain_opt, Synthetic(32)),
        "expanded, 4 branches": trainer(four[0].train(), four[1], Synthetic(32)),
        "merged, 2 branches": trainer(expanded.train(), opt, Synthetic(32)),
    }
    for name, t in interleaved(sides, rounds=5, warmup=1, min_round_s=0.1).items():
        print(f"  {name:22s} {t.ms:7.2f} ms")
    print("deploy, inference on a batch of 8 (interleaved medians):")
    model.eval()
    expanded.eval()
    with torch.no_grad():
        times = interleaved({"plain": lambda: model(probe), "plain, folded": lambda: plain_result.model(probe),
                             "merged, 2 branches": lambda: expanded(probe), "folded": lambda: result.model(probe)},
                            rounds=5, min_round_s=0.1)  # fmt: skip
    for name, t in times.items():
        print(f"  {name:22s} {t.ms:7.2f} ms")


if __name__ == "__main__":
    main()
