"""EoMT's encoder (Kerssies et al., CVPR 2025): the shared ViT (DINOv2 / DINOv3 options) whose last
`query_blocks` blocks also carry `num_queries` learned queries (prepended to the tokens: queries, class,
registers, patches).

Before each of those blocks the mask module (EoMT's head, a `contracts.MaskPredictor` handed to the encoder by
the builder) predicts masks from the normalised tokens; with probability `attn_mask_probs[j]` per query, that
query then attends only to the patches inside its mask (the masked attention). The probabilities are annealed
from 1 to 0 during training by `MaskAnnealing`, driven by the training schedule through the
`contracts.IterationHook` the engine calls before each step; at 0, as the released models end (and a new model
starts), the masked attention and the intermediate predictions are skipped outside training.

Returns `contracts.QueryFeatures` (patch map, queries, intermediate `MaskPrediction`s). Parameter and buffer
names are the plain ViT's plus `queries.weight`, `attn_mask_probs` and `mask_annealing_iter`.
"""
import torch
import torch.nn.functional as F
from torch import nn

from ...backbones.vit import VisionTransformer
from ...contracts import IterationHook, MaskPredictor, QueryFeatures
from ...layers import tokens_to_map


class MaskAnnealing:
    """EoMT's mask annealing: block j's masked-attention probability is 1 before iteration `starts[j]`,
    0 from `ends[j]` on, and (1 - progress) ** power in between (the authors' polynomial decay, power
    0.9 as their LR schedule). The iteration is the number of optimizer steps done."""

    def __init__(self, starts, ends, power=0.9):
        if len(starts) != len(ends) or any(e <= s for s, e in zip(starts, ends)):
            raise ValueError(f"mask annealing: each start must precede its end, got {list(starts)} / {list(ends)}")
        self.starts, self.ends, self.power = tuple(int(v) for v in starts), tuple(int(v) for v in ends), float(power)

    def __call__(self, iteration):
        out = []
        for start, end in zip(self.starts, self.ends):
            if iteration < start:
                out.append(1.0)
            elif iteration >= end:
                out.append(0.0)
            else:
                out.append((1.0 - (iteration - start) / (end - start)) ** self.power)
        return out


class EoMTEncoder(VisionTransformer, IterationHook):
    """The ViT with EoMT's queries and masked attention. mask_predictor: the head whose `predict_masks` gives
    the masks (kept as a reference, not a submodule: its weights stay the head's). mask_annealing:
    ((starts), (ends)[, power]) per query block in training iterations, or None (probabilities as loaded)."""

    new_parameters = ("queries.",)  # what no pre-trained encoder brings: engine/optim.is_encoder

    def __init__(self, mask_predictor: MaskPredictor, num_queries=100, query_blocks=4, mask_annealing=None,
                 **vit):
        super().__init__(**vit)
        depth = len(self.blocks)
        if not 0 < query_blocks <= depth:
            raise ValueError(f"queries must join 1..{depth} blocks, got query_blocks={query_blocks}")
        self.num_queries, self.query_blocks = num_queries, query_blocks
        self._predict_masks = mask_predictor.predict_masks
        self.queries = nn.Embedding(num_queries, self.cls_token.shape[-1])
        nn.init.normal_(self.queries.weight)
        # The per-block probabilities and the iteration the schedule was last applied for are buffers, so
        # checkpoints keep them; forward reads Python copies (`_probs`, `_iter`, refreshed on load), so no host
        # sync, meta-device counting or export traces them. A new model starts at 0, the released models' state
        # (no masked attention at inference); the annealing sets 1 from the first training step.
        self.register_buffer("attn_mask_probs", torch.zeros(query_blocks))
        self.register_buffer("mask_annealing_iter", torch.zeros((), dtype=torch.long))
        self._probs, self._iter = [0.0] * query_blocks, 0
        self.register_load_state_dict_post_hook(EoMTEncoder._read_mask_state)
        self.mask_annealing = MaskAnnealing(*mask_annealing) if mask_annealing else None
        if self.mask_annealing is not None and len(self.mask_annealing.starts) != query_blocks:
            raise ValueError(f"mask_annealing gives {len(self.mask_annealing.starts)} blocks' schedules for "
                             f"query_blocks={query_blocks}; give one start and end per query block (or null)")

    def set_iteration(self, iteration):
        """The training hook: the step after `iteration` finished ones runs with the schedule's probabilities
        at `iteration`; `mask_annealing_iter` records iteration + 1 (the steps the schedule has covered)."""
        if self.mask_annealing is None:
            return
        self.set_attn_mask_probs(self.mask_annealing(iteration))
        self._iter = int(iteration) + 1
        if not self.mask_annealing_iter.is_meta:
            self.mask_annealing_iter.fill_(self._iter)

    def forward(self, x) -> QueryFeatures:
        """The queries join before block depth - query_blocks; masked attention in those blocks wherever it
        is trained (training) or still on (attn_mask_probs > 0)."""
        x, grid = self._embed(x)
        rope = self._rope(grid, x.device)
        first = len(self.blocks) - self.query_blocks
        q, skip = self.num_queries, self.num_queries + self.num_extra  # queries, then class/register tokens
        probs = self._probs
        predictions = []
        for i, block in enumerate(self.blocks):
            attn_mask = None
            if i == first:
                x = torch.cat([self.queries.weight[None].expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
            if i >= first and (self.training or probs[i - first] > 0):
                y = self.norm(x)
                prediction = self._predict_masks(y[:, :q], tokens_to_map(y[:, skip:], grid))
                predictions.append(prediction)
                attn_mask = self._attention_mask(x, prediction.mask_logits, grid, probs[i - first])
            x = block(x, attn_mask=attn_mask, rope=rope)
        x = self.norm(x)
        return QueryFeatures(tokens_to_map(x[:, skip:], grid), x[:, :q], predictions)

    def set_attn_mask_probs(self, probs):
        """Set the masked-attention probability of each query block (1: always masked, 0: never; the
        released models end at 0, so inference runs without masks or intermediate predictions)."""
        probs = [float(p) for p in probs]
        if len(probs) != self.query_blocks:
            raise ValueError(f"{len(probs)} probabilities for {self.query_blocks} query blocks")
        changed, self._probs = probs != self._probs, probs
        if changed and not self.attn_mask_probs.is_meta:
            # a fill per block, not copy_(torch.tensor(probs)): a copy from host memory to a GPU waits for the
            # device, and this runs before every training step (tests/test_hot_path.py counts it)
            for j, p in enumerate(probs):
                self.attn_mask_probs[j].fill_(p)

    @staticmethod
    def _read_mask_state(module, incompatible_keys):
        if not module.attn_mask_probs.is_meta:
            module._probs = module.attn_mask_probs.tolist()
            module._iter = int(module.mask_annealing_iter)

    def _attention_mask(self, x, mask_logits, grid, prob):
        """[N, 1, T, T] bool, True where a token may attend: everything, except that each query sees only
        the patches where its mask logit (bilinearly resized to the patch grid) is positive. Each query
        keeps that restriction with probability `prob` (none at 0, all at 1)."""
        if prob <= 0:
            return None
        n, t, q = x.shape[0], x.shape[1], self.num_queries
        inside = F.interpolate(mask_logits, size=grid, mode="bilinear", align_corners=False).flatten(2) > 0
        if prob < 1:  # queries drawn free of their masks this iteration
            inside = inside | (torch.rand(n, q, device=x.device) > prob)[..., None]
        mask = torch.ones(n, t, t, dtype=torch.bool, device=x.device)
        mask[:, :q, q + self.num_extra:] = inside
        return mask[:, None]
