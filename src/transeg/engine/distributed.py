"""Training on several processes (torchrun): the process group, each process's share of the batch, and
the model as the step loop drives it (DistributedDataParallel, SyncBatchNorm, torch.compile)."""
import dataclasses
import functools
import os
import sys

import torch
import torch.distributed as dist

from ..errors import TransegError


def init_distributed():
    """Initialise the process group when launched by torchrun and not done already; True if it did."""
    env = os.environ
    if int(env.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    agent_store = env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    if agent_store and env.get("GROUP_WORLD_SIZE") == "1":
        # torchrun keeps one key-value store across --max-restarts, so a restarted group would read
        # the dead group's addresses (gloo: connection refused or a hang; nccl: a stale unique id).
        # One agent means one restart count for every worker: keys per attempt.
        store, rank, world = next(dist.rendezvous("env://"))
        attempt = env.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(backend, store=dist.PrefixStore(f"transeg/attempt_{attempt}", store),
                                rank=rank, world_size=world)
        return True
    dist.init_process_group(backend)
    if agent_store and int(env.get("TORCHELASTIC_MAX_RESTARTS", "0")) and dist.get_rank() == 0:
        # several agents keep their own restart counts, so the fix above cannot apply
        print("transeg: torchrun --max-restarts over several nodes reuses its store across restarts; "
              "launch with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 so that a restarted group can connect",
              file=sys.stderr, flush=True)
    return True


def rank_and_world():
    """(this process's rank, the number of processes): (0, 1) without a process group."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def per_process_batch(cfg, world):
    """cfg with batch_size = global_batch / (world x accum_steps): a recipe states the paper's total
    batch and runs unchanged on 1 process or under torchrun on 8."""
    share, rest = divmod(cfg.global_batch, world * cfg.accum_steps)
    if rest or not share:
        raise TransegError(f"global_batch {cfg.global_batch} does not split over {world} process(es) x "
                           f"{cfg.accum_steps} accumulation step(s); change accum_steps or the process count")
    return dataclasses.replace(cfg, batch_size=share)


def wrap(model, cfg, device, world, form="fused", ignore_index=255):
    """(model, net, forward_loss): `net` is what the step loop runs, the model under DistributedDataParallel on
    several processes (with BatchNorm synchronised across them under cfg.sync_bn, which replaces `model`'s layers);
    `forward_loss(image, label)` is the training loss of a micro-batch, `model.loss(net(image), label)["loss"]` with
    cfg's loss settings.

    cfg.compile compiles the net in place (the state dict keeps its names, checkpoints are unchanged), and in the
    published training form (device.Paths.training_form, `form`: CUDA's) the loss too: upsample-then-CE compiles
    into a few fused kernels, forward and backward. Two graphs, the net's and the loss's, not one: traced together,
    torch 2.13's inductor (CPU) ordered the upsampling's backward after the kernel that reads it, and every gradient
    came out 0 (the loss itself right); apart they equal eager (tests/test_hot_path.py). The fused form's row-blocked
    loss stays eager (an autograd.Function looping over blocks of rows), and so do mask-classification losses (the
    matching is solved on the host)."""
    net = model
    if world > 1:
        if cfg.sync_bn:
            if device.type != "cuda":
                raise TransegError("sync_bn needs CUDA devices (PyTorch's SyncBatchNorm has no CPU implementation)")
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    loss = functools.partial(_loss, model, dict(ignore_index=ignore_index, reduction=cfg.loss_reduction, ohem=cfg.ohem,
                                                terms=cfg.loss))
    if cfg.compile:
        net.compile()  # in place
        if form == "published" and not model.decode_head.mask_classification:
            loss = torch.compile(loss, dynamic=False)  # the crops are of one size

    def forward_loss(image, label):
        return loss(net(image), label)
    return model, net, forward_loss


def _loss(model, options, out, label):
    return model.loss(out, label, **options)["loss"]
