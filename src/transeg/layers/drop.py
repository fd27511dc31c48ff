"""Stochastic depth (Huang et al. 2016), per sample, as used by every transformer family here."""
from torch import nn


class DropPath(nn.Module):
    """Zero a sample's residual branch with probability `p` and rescale survivors by 1/(1-p)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = float(p)

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self):
        return f"p={self.p}"


def drop_path_rates(depths, max_rate):
    """Linearly increasing rates over all blocks of all stages (0 for the first block).

    Plain Python (not torch.linspace(...).item()) so models can be built on the meta device.
    """
    total = sum(depths)
    rates = [max_rate * i / (total - 1) if total > 1 else 0.0 for i in range(total)]
    out, start = [], 0
    for d in depths:
        out.append(rates[start:start + d])
        start += d
    return out
