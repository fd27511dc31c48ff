"""Conv -> BatchNorm -> ReLU, the unit most decode heads are built from."""
from torch import nn


class ConvBNReLU(nn.Module):
    """Named `conv`, `bn` like mmcv's ConvModule so the authors' checkpoints load unchanged.

    The conv has no bias because the BatchNorm that follows would cancel it.
    """

    def __init__(self, in_channels, out_channels, kernel_size=1, padding=0, bn_eps=1e-5):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=bn_eps)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))
