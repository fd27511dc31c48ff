"""SeMask's Swin encoder (Jain et al., "SeMask: Semantically Masked Transformers for Semantic Segmentation").

After the Swin blocks of every stage, a semantic layer normalises the tokens (`norm1`, no residual
around it), projects them to K class logits (the stage's semantic prior, `mlp_cls_q`), and adds
gamma · proj(softmax(prior · mlp_cls_k(x)^T) · mlp_v(x)) to the normalised tokens (single head, no
scaling, gamma initialised to zero). The result is both the stage output (through `norm{i}`) and the
input of the next stage's patch merging. The attention runs inside non-overlapping, never-shifted
windows, or over the whole stage for the "global" stages: T, S and L with more than 19 classes use
global attention in stages 3-4, B and every Cityscapes model (19 classes) windows everywhere. The
weights do not tell the two apart, so the rule is applied here from the variant and class count.
SeMask-Mask2Former (detectron2 code) has its own rule: only stage 4 global with 150 classes, windows
everywhere otherwise (`global_stages_mask2former`).

The backbone returns `contracts.SemanticFeatures`: the four normalised maps and the four [N, K, h, w] prior maps.
"""
import torch
import torch.nn.functional as F
from torch import nn

from ...contracts import SemanticFeatures
from ...layers.init import init_linear_norm
from ...backbones.swin import SwinTransformer, pad_to_windows, window_partition, window_reverse


class SemanticAttention(nn.Module):
    """Names as the authors' `class_injection.0` (`mlp_cls_q`, `mlp_cls_k`, `mlp_v`, `mlp_res`, `gamma`)."""

    def __init__(self, dim, num_classes, proj_drop=0.1):
        super().__init__()
        self.mlp_cls_q = nn.Linear(dim, num_classes)
        self.mlp_cls_k = nn.Linear(dim, num_classes)
        self.mlp_v = nn.Linear(dim, dim)
        self.mlp_res = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        """x: [..., N, C] -> prior logits [..., N, K] and gamma · attention + x."""
        prior = self.mlp_cls_q(x)
        out = F.scaled_dot_product_attention(prior, self.mlp_cls_k(x), self.mlp_v(x), scale=1.0)  # no 1/sqrt(K)
        return prior, self.gamma * self.proj_drop(self.mlp_res(out)) + x


class SemanticLayer(nn.Module):
    def __init__(self, dim, num_classes, window_size, windowed):
        super().__init__()
        self.window_size, self.windowed = window_size, windowed
        self.norm1 = nn.LayerNorm(dim)
        self.class_injection = nn.ModuleList([SemanticAttention(dim, num_classes)])

    def forward(self, x, hw):
        b, n, c = x.shape
        x = self.norm1(x)
        if not self.windowed:
            for block in self.class_injection:
                prior, x = block(x)
            return prior, x
        h, wd = hw
        w = self.window_size
        padded = pad_to_windows(x.view(b, h, wd, c), w)
        hp, wp = padded.shape[1:3]
        windows = window_partition(padded, w)
        for block in self.class_injection:
            prior, windows = block(windows)
        x = window_reverse(windows, w, hp, wp)[:, :h, :wd].reshape(b, n, c)
        prior = window_reverse(prior, w, hp, wp)[:, :h, :wd].reshape(b, n, -1)
        return prior, x


def global_stages(embed_dim, num_classes):
    """The authors' rule: stages 3-4 global for the 96/192-wide variants (T, S, L) above 19 classes."""
    return (2, 3) if embed_dim in (96, 192) and num_classes > 19 else ()


def global_stages_mask2former(num_classes):
    """SeMask-Mask2Former's rule (its BasicLayer): stage 4 global for exactly 150 classes, else none."""
    return (3,) if num_classes == 150 else ()


class SeMaskSwinTransformer(SwinTransformer):
    """sem_window_size: the semantic layers' window (default: the Swin window; SeMask-Mask2Former's
    Cityscapes config leaves it at 7 beside a Swin window of 12)."""

    def __init__(self, num_classes, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7,
                 drop_path_rate=0.3, global_stage_ids=None, sem_window_size=None, **kwargs):
        super().__init__(embed_dim, depths, num_heads, window_size, drop_path_rate=drop_path_rate, **kwargs)
        glob = global_stages(embed_dim, num_classes) if global_stage_ids is None else tuple(global_stage_ids)
        self.global_stage_ids = glob
        sem_window = sem_window_size or window_size
        for i, stage in enumerate(self.layers):
            stage.semantic_layer = SemanticLayer(self.out_channels[i], num_classes, sem_window, i not in glob)
            stage.semantic_layer.apply(init_linear_norm)

    def stage_tokens(self, stage, x, hw):
        prior, x = self.layers[stage].semantic_layer(self.layers[stage].run_blocks(x, hw), hw)
        return x, prior.transpose(1, 2).reshape(x.shape[0], -1, *hw)

    def forward(self, x) -> SemanticFeatures:
        return SemanticFeatures(*self.stages(x))
