"""Deterministic weights and inputs shared by the parity tests and their fixtures.

The parity fixtures under tests/fixtures/ were produced by running the authors' model (outside this
repository) with weights made by `seeded_state_dict` from the fixture's own key list, on an input made
by `seeded_input`. A test rebuilds the same weights here, converts them, and compares logits, so the
fixture only needs keys, shapes, seeds and sampled outputs.

Weights are scaled so activations stay O(1) through deep random networks (fan-in scaling), norms and
biases are perturbed away from their defaults (so a wrong eps or a dropped bias shows), and BatchNorm
statistics are non-trivial (so eval-mode BN is really exercised).
"""
import math

import torch


def seeded_state_dict(shapes, seed):
    """shapes: ordered list of (key, shape). Returns {key: tensor} filled from one generator, in order."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in shapes:
        shape = tuple(shape)
        leaf = key.rsplit(".", 1)[-1]
        if leaf == "num_batches_tracked":
            out[key] = torch.tensor(0, dtype=torch.long)
            continue
        if leaf == "running_var":
            t = torch.rand(shape, generator=g) * 0.5 + 0.75
        elif leaf == "running_mean":
            t = torch.randn(shape, generator=g) * 0.1
        elif len(shape) == 1 and leaf == "weight":  # norm scales
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif len(shape) <= 1:  # biases, norm shifts, scalars
            t = 0.1 * torch.randn(shape, generator=g)
        else:
            fan_in = math.prod(shape[1:])
            t = torch.randn(shape, generator=g) / math.sqrt(fan_in)
        out[key] = t.float()
    return out


def seeded_input(shape, seed):
    """A normalised-image-like input: standard normal values."""
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed))


def sample_positions(shape, count, seed):
    """`count` deterministic flat indices into a tensor of `shape` (for sampled-logit fixtures)."""
    n = math.prod(shape)
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:count].sort().values
