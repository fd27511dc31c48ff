"""Feed-forward blocks."""
from torch import nn

from .shape import map_to_tokens, tokens_to_map


class DepthwiseConv(nn.Module):
    """3x3 depth-wise conv applied to a token sequence viewed as its (H, W) map.

    Kept as its own module so the parameter is named `dwconv.dwconv.*`, as in the authors' checkpoints.
    """

    def __init__(self, dim):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x, hw):
        return map_to_tokens(self.dwconv(tokens_to_map(x, hw)))


class MixFFN(nn.Module):
    """SegFormer's Mix-FFN: fc1 -> 3x3 depth-wise conv -> GELU -> fc2.

    The depth-wise conv leaks positional information into the tokens, which is why MiT needs no
    position embeddings and works at any resolution. `relu_first=True` is the PVTv2 "linear" form
    EDAFormer's encoder uses: fc1 -> ReLU -> depth-wise conv -> GELU -> fc2 (two activations in a row).
    """

    def __init__(self, dim, hidden_dim, drop=0.0, relu_first=False):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.relu = nn.ReLU(inplace=True) if relu_first else None
        self.dwconv = DepthwiseConv(hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x, hw):
        x = self.fc1(x)
        if self.relu is not None:
            x = self.relu(x)
        x = self.act(self.dwconv(x, hw))
        return self.drop(self.fc2(self.drop(x)))


class Mlp(nn.Module):
    """The transformer FFN: fc1 -> GELU -> dropout -> fc2 -> dropout (timm / Segmenter names)."""

    def __init__(self, dim, hidden_dim, drop=0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))
