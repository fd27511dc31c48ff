"""`transeg <verb>`: thin argument parsing over the library. Run `transeg VERB --help` for each verb."""
import argparse
import os
import sys
import textwrap
from collections import namedtuple
from pathlib import Path

from .convert import formats
from .registry import FAMILIES, FORMATS
from .text import printable
from .version import __version__

EXAMPLES = """\
examples:
  transeg models                                      # variants, paper vs measured params / GFLOPs
  transeg predict segformer-b0-ade20k photo.jpg --out preds/   # a released model by name: fetched once, cached
  transeg train                                       # segformer-b0 on the built-in synthetic set
  transeg train --model segformer-b2 --data my_data/ --out runs/b2 --set iters=40000 lr=1e-4
  transeg eval runs/train/model.safetensors           # mIoU on the data it was trained on
  transeg predict runs/train/model.safetensors photo.jpg --out preds/
  transeg convert segformer.b0.512x512.ade.160k.pth b0-ade.safetensors --from segformer
  transeg bench segformer-b0 --size 512x512
  transeg eval ckpt.safetensors --isr-encoder 2,2,1,1 --isr-decoder 2,2,2   # EDAFormer's inference spatial reduction
  transeg bench edaformer-t --size 1024x2048 --isr-sweep --runs 3           # GFLOPs / latency per ISR setting
  transeg export ckpt.safetensors model.onnx --isr-encoder 2,2,1,1 --isr-decoder 2,2,2
  transeg serve runs/train/model.safetensors              # HTTP API + a page at http://127.0.0.1:8000/

Every verb's --help ends with examples. Verbs that compute take --threads N, before or after the verb
(torch's CPU threads; default: OMP_NUM_THREADS when set, else one per core).
"""

# The examples at the end of each verb's --help (tests/test_cli.py parses every one and runs
# the cheap ones on a tiny model at runs/train/model.safetensors).
VERB_EXAMPLES = {
    "models": """\
  transeg models                                      # every variant: paper vs measured params / GFLOPs
  transeg models --family segformer --no-flops        # one family, without counting GFLOPs (faster)
  transeg models --pretrained --family segmenter      # the released checkpoints: dataset, mIoU, source, licence""",
    "pull": """\
  transeg pull segformer-b0-ade20k                    # fetch, check and convert once; later runs read the cache
  transeg pull nvidia/segformer-b5-finetuned-cityscapes-1024-1024   # any Hugging Face SegFormer repo
  transeg pull semask-swin-t-fpn-ade20k --file ~/Downloads/semask_tiny_ade20k.pth   # a Drive file you downloaded""",
    "train": """\
  transeg train                                       # the quick start: segformer-b0 on the synthetic set -> runs/train/
  transeg train --model segformer-b0 --data my_data/ --out runs/mine --iters 8000
  transeg train configs/segformer/segformer-b0_ade20k-512_160k.yaml --data ade20k:/data/ade
  transeg train --out runs/train --resume             # continue an interrupted run
  transeg train --threads 1 --out runs/small --set iters=500   # one core, leaving the others to other work
  transeg train --out runs/watched --report-to tensorboard mlflow   # then: tensorboard --logdir runs/watched/tb""",
    "eval": """\
  transeg eval runs/train/model.safetensors --limit 20           # on the data it was trained on (first 20 images)
  transeg eval runs/train/model.safetensors --limit 20 --out eval/   # + iou.png and predictions.png
  transeg eval runs/train/model.safetensors --data synthetic:size=128,n=50 --flip
  transeg eval ckpt.safetensors --data cityscapes:/data/cityscapes --mode slide --crop 1024x1024 --stride 768x768
  transeg eval model-int8.onnx --data synthetic                  # an ONNX export (fp32 or int8) on onnxruntime""",
    "predict": """\
  transeg predict runs/train/model.safetensors photo.jpg --out preds/            # photo_mask.png, photo_overlay.jpg
  transeg predict runs/train/model.safetensors photo.jpg --out preds/ --grid     # + grid.png: image | prediction
  transeg predict runs/train/model.safetensors data/images/val/ --out preds/ --grid --truth data/masks/val/
  transeg predict runs/train/model.safetensors photo.jpg --out preds/ --no-legend --alpha 0.7
  transeg predict ckpt.safetensors my_images/ --out preds/ --dtype bf16 --isr-encoder 2,2,1,1 --isr-decoder 2,2,2
  transeg predict model-int8.onnx photo.jpg --out preds/         # an ONNX export on onnxruntime (CPU)""",
    "convert": """\
  transeg convert segformer.b0.512x512.ade.160k.pth b0-ade.safetensors --from segformer
  transeg convert segformer-b0-hf/ b0.safetensors --from segformer-hf     # a save_pretrained folder
  transeg convert pytorch_model.bin eomt-v3.safetensors --from eomt --base dinov3-vitl16/  # the authors' DINOv3 delta""",
    "bench": """\
  transeg bench segformer-b0 --size 64x64 --runs 5 --warmup 1        # latency median and spread
  transeg bench segformer-b0 --size 512x512 --dtype bf16 --threads 2
  transeg bench runs/train/model.safetensors --size 128x128
  transeg bench edaformer-t --size 512x512 --isr-sweep --plot isr_sweep.png   # cost / speed per ISR setting""",
    "data": """\
  transeg data check my_data/                         # sizes, label values, class frequencies
  transeg data prepare cityscapes /downloads/cityscapes /data/cityscapes""",
    "push": """\
  transeg push runs/train me/segformer-b0-shapes               # model, recipe, card with its metrics and charts
  transeg push runs/train/best.safetensors me/b0-best --private
  transeg push runs/train me/segformer-b0-shapes --revision experiment-2 --message 'longer schedule'""",
    "export": """\
  transeg export runs/train/model.safetensors model.onnx --static --size 64x64   # one fixed size: the quickest trace
  transeg export runs/train/model.safetensors model.onnx                         # any batch / height / width
  transeg export ckpt.safetensors model.onnx --isr-encoder 2,2,1,1 --isr-decoder 2,2,2
  transeg export runs/train/model.safetensors model-int8.onnx --int8 --calibrate synthetic   # static int8 for CPUs
  transeg export model.onnx model-int8.onnx --int8 --calibrate my_data/ --calibration-images 100""",
}

# The verbs whose work runs on torch's CPU threads, so take --threads (`transeg --threads N VERB` works for any).
THREADED_VERBS = ("models", "pull", "train", "eval", "predict", "convert", "bench", "serve", "export")
THREADS_HELP = ("CPU threads for torch's operators (torch.set_num_threads, and inter-op threads). Default: "
                "OMP_NUM_THREADS when set, else one per core. Two programs that each use every core slow each "
                "other down many times over (OpenMP threads wait for each other): give each fewer threads, e.g. "
                "--threads 1, or OMP_NUM_THREADS=1 for every program")


MAX_SIDE = 65535  # HxW arguments: no image format stores a side longer (PNG's and JPEG's limits are 2^31 / 65535)


def _size(text):
    """'512x1024' or '512' -> (512, 1024) / (512, 512); each side 1..MAX_SIDE."""
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW like 512x1024, got {text!r}") from None
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) <= 0:
        raise argparse.ArgumentTypeError(f"expected HxW like 512x1024, got {text!r}")
    if max(parts) > MAX_SIDE:
        raise argparse.ArgumentTypeError(f"{text!r}: at most {MAX_SIDE} pixels per side")
    return tuple(parts)


def _floats(text):
    try:
        return [float(p) for p in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 0.75,1,1.25, got {text!r}") from None


def _positive(text):
    """A finite number > 0 (nan and inf are refused: `nan <= 0` is False)."""
    import math

    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _count(text):
    """A whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def _set_threads(n):
    """torch's intra-op threads to `n`, and its inter-op threads where they can still be set (only
    before any parallel work, once per process: a second `main()` in one process keeps the first)."""
    import torch

    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(n)
    except RuntimeError:
        pass


def _fraction(text):
    """A number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 1:  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}")
    return value


CHECKPOINT_HELP = "a transeg .safetensors, a zoo name (`transeg models --pretrained`) or a Hugging Face repo id"


def _add_checkpoint_arg(p):
    p.add_argument("checkpoint", type=Path, help=CHECKPOINT_HELP)


def _add_device_arg(p):
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda when available)")


def _add_protocol_args(p):
    g = p.add_argument_group("test protocol (default: the one stored in the checkpoint)")
    g.add_argument("--mode", choices=["whole", "slide"], help="whole image, or sliding windows (needs --crop/--stride)")
    g.add_argument("--crop", type=_size, help="slide window size HxW, e.g. 1024x1024")
    g.add_argument("--stride", type=_size, help="slide stride HxW, e.g. 768x768")
    g.add_argument("--scale", type=_size, help="keep-ratio resize target LONGxSHORT before inference, e.g. 2048x512")
    g.add_argument("--scales", type=_floats, help="multi-scale ratios, e.g. 0.75,0.875,1,1.125,1.25")
    g.add_argument("--flip", action="store_true", help="add horizontally flipped inputs (averaged softmax)")
    g.add_argument("--ms", action="store_true", help="the paper's multi-scale + flip test stored with the model "
                   "(default ratios 0.5,0.75,1,1.25,1.5,1.75 + flip)")
    _add_device_arg(p)


def _add_speed_args(p, serving=False):
    g = p.add_argument_group("speed")
    if serving:  # a long-lived process: the device's serving choices (device.Paths) unless told otherwise
        g.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                       help="inference precision: bf16/fp16 cast the weights (native low precision, faster than "
                            "autocast on tensor-core GPUs and AMX CPUs; ~3 significant digits). Default auto: bf16 "
                            "on a CUDA GPU, fp32 elsewhere")
        g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                       help="torch.compile (CUDA graphs on a GPU): images are padded to a few size buckets, each "
                            "compiled once (17-55 s on a GPU, told when it happens), then several times faster at "
                            "batch 1. Default: on for a CUDA GPU, off elsewhere")
        return
    g.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="inference precision: bf16/fp16 cast the weights (native low precision, faster than "
                        "autocast on AMX CPUs and tensor-core GPUs; ~3 significant digits). Default fp32")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile with weight freezing (CUDA graphs on a GPU): images are padded to a few size "
                        "buckets, each compiled once (a one-off wait, told when it happens); worth it for many images")


def _add_isr_args(p):
    g = p.add_argument_group(
        "inference spatial reduction (ISR)",
        "Pool attention keys/values harder than in training, at inference only, with the same weights (EDAFormer,\n"
        "Yu et al. 2024). One integer multiplier per encoder stage / decoder branch; 1 = as trained. Applies to\n"
        "models whose attention pools keys/values: EDAFormer (encoder and decoder) and SegFormer (encoder).")
    g.add_argument("--isr-encoder", metavar="R1,R2,R3,R4", help="e.g. 2,2,1,1 (the paper's setting): stage-1 and stage-2 "
                   "keys/values pooled 2x more (the authors' --backbone_reduction_ratios 2211)")
    g.add_argument("--isr-decoder", metavar="R2,R3,R4", help="e.g. 2,2,2: EDAFormer's decoder branches on c2, c3, c4 "
                   "(the authors' --decoder_reduction_ratios 222)")


def _add_inference_args(p):
    """What a verb that segments with a checkpoint takes: its test protocol (and --device), speed and ISR."""
    _add_protocol_args(p)
    _add_speed_args(p)
    _add_isr_args(p)
    _add_backend_arg(p)


def _add_backend_arg(p):
    p.add_argument("--backend", choices=["auto", "pytorch", "onnxruntime"], default="auto",
                   help="what runs the model: auto (default) = onnxruntime for an .onnx file from `transeg export` "
                        "(fp32 or --int8; its precision and ISR are the export's, CPU only), else PyTorch")


def _say(line):
    """A line of progress from the library (a compiled graph, ...) to stderr, away from the results."""
    print(f"transeg: {printable(line)}", file=sys.stderr, flush=True)


def _load(args, device="auto"):
    """The checkpoint, with the command line's ISR set and --device / --dtype / --compile applied. An .onnx file
    (or --backend onnxruntime) runs on onnxruntime through the same inference code (transeg.deploy.backend)."""
    from .deploy.backend import load_model
    from .isr import parse_setting

    model = load_model(args.checkpoint, getattr(args, "backend", "auto"))
    setting = parse_setting(args.isr_encoder, args.isr_decoder)
    if setting:
        model.set_isr(**setting)
    speed = dict(dtype=args.dtype, compile=args.compile, log=_say) if hasattr(args, "dtype") else {}
    return model.optimize_for_inference(device=getattr(args, "device", device), **speed)


def _protocol(args, model):
    """The checkpoint's test protocol with the command line's changes (--ms first, then each flag)."""
    protocol = model.protocol.multi_scale() if args.ms else model.protocol
    return protocol.replace(mode=args.mode, crop=args.crop, stride=args.stride, scale=args.scale, scales=args.scales,
                            flip=args.flip or None)


def _isr_line(model):
    from .isr import describe, effective_pooling, is_default, pooling_text

    return None if is_default(model.isr) else f"{describe(model.isr)} (K/V pooling {pooling_text(effective_pooling(model))})"


# ----------------------------------------------------------------------------------------------- verbs
# Each verb is its cmd_<verb> (parse nothing, call the library, print) and, right below it, the function that
# declares its arguments, registered with @_verb. `transeg --help` lists the verbs in the order registered here.
Verb = namedtuple("Verb", "name fn help description declare")
VERBS = []


def _verb(name, fn, help_, description=None):
    """Registers the decorated function as the one declaring verb `name`'s arguments on its parser; `fn` runs
    the verb (None: a verb with actions of its own, which set their fn). `help_` is the line in `transeg --help`,
    `description` the text atop `transeg NAME --help` (default: `help_`)."""
    def register(declare):
        VERBS.append(Verb(name, fn, help_, description, declare))
        return declare
    return register


def cmd_models(args):
    from .flops import variant_table

    if args.pretrained:
        return _print_zoo(args.family)

    rows = [[r["model"], f"{r['params_m']:.1f}", f"{r['paper_params_m'] or '-'}", r["gflops_at"],
             "-" if r["gflops"] is None else f"{r['gflops']:.1f}",
             f"{r['paper_gflops'] if r['paper_gflops'] is not None else '-'}",
             " ".join(f"{d} {m}" for d, m in r["miou"].items())]
            for r in variant_table(args.family, count_flops=not args.no_flops, progress=sys.stderr.isatty())]
    header = ["model", "params M", "paper", "GFLOPs at", "GFLOPs", "reported", "paper mIoU (single-scale)"]
    rows = [[printable(c) for c in r] for r in rows]  # names and numbers that families registered
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    for r in [header] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
    print("\nparams: this implementation, with the head of the dataset the paper counted on (150 classes, ADE20K's, "
          "unless the paper counted at another: 19 for a Cityscapes model, as 'GFLOPs at' shows); GFLOPs: multiply-adds "
          "incl. attention in each paper's convention; reported: the paper's or README's table, or the authors' code run "
          "where no table was available. Per family:")
    for family in FAMILIES.values():
        if args.family in (None, family.name):
            print(f"  {family.title}: {family.counting}")


@_verb("models", cmd_models, "list model variants with the papers' and the measured params / GFLOPs")
def _models_args(p):
    p.add_argument("--family", help="only this family, e.g. segformer")
    p.add_argument("--no-flops", action="store_true", help="skip counting GFLOPs (faster)")
    p.add_argument("--pretrained", action="store_true", help="list the zoo: the checkpoints the authors released, "
                   "by name (what every verb that takes a checkpoint accepts), with dataset, paper mIoU, source, "
                   "how the download is checked, size and licence")


# `transeg models --pretrained` on a narrow terminal: the columns left out first (the name holds the model and
# the dataset), then the cells wrapped
ZOO_DROP = ("model", "checksum", "crop", "size", "dataset", "licence")
ZOO_WRAP = ("from", "licence", "mIoU")


def _print_zoo(family):
    from . import zoo
    from .text import fit_table, terminal_width

    width = terminal_width()
    rows = [[printable(c) for c in r] for r in zoo.table(family)]
    lines, dropped = fit_table(list(zoo.COLUMNS), rows, width, drop=ZOO_DROP, wrap=ZOO_WRAP)
    notes = [("mIoU: the authors' single-scale / multi-scale + flip; from: where it is fetched (\"by hand\": download "
              "it there, then `transeg pull NAME --file PATH`); checksum: how the bytes are checked; cache: "
              f"{zoo.hub.cache_dir()}")]
    if dropped:
        notes.append(f"Left out to fit {width} columns: {', '.join(dropped)} (a wider terminal, or COLUMNS=250, "
                     "shows them).")
    print("\n".join(lines) + "\n")
    for note in notes:
        print(textwrap.fill(note, width, break_long_words=False, break_on_hyphens=False) if width else note)


def cmd_pull(args):
    from . import zoo
    from .flops import count_params

    if args.file is not None and args.name not in zoo.RELEASES:
        zoo.get(args.name)  # --file is for zoo releases: an unknown name is one line with the nearest ones
    if args.name in zoo.RELEASES:
        path = zoo.fetch(args.name, file=args.file)
    elif "/" in args.name and zoo.is_name(args.name):
        path = zoo.fetch_repo(args.name)
    else:
        zoo.get(args.name)  # one line, with the nearest zoo names
    if args.name in zoo.RELEASES and zoo.RELEASES[args.name].backbone:
        print(f"{args.name} -> {path} (ImageNet weights: `transeg train --set backbone_weights={args.name}` starts "
              "from them)")
        return
    model = zoo.load(path)
    print(printable(f"{args.name} -> {path}: {model.meta['variant']}, {model.num_classes} classes, "
                    f"{count_params(model):,} params; test: {model.protocol.describe()}"))


@_verb("pull", cmd_pull, "fetch a released checkpoint ahead of time (a zoo name or a Hugging Face repo id)",
       "Fetch a released checkpoint once: download (resumable, checked), convert to a transeg .safetensors and\n"
       "keep it in the cache ($TRANSEG_HOME, default ~/.cache/transeg); every later use reads the cache, offline\n"
       "too. Releases hosted where a program cannot download from (Google Drive) take the file you downloaded:\n"
       "--file PATH. Hugging Face repos honour HF_ENDPOINT, HF_HOME, HF_TOKEN and HF_HUB_OFFLINE.")
def _pull_args(p):
    p.add_argument("name", help="a zoo name (`transeg models --pretrained`) or a Hugging Face repo id")
    p.add_argument("--file", type=Path, help="the release's file, downloaded by hand (checked and converted)")


def _workers(value):
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto or a whole number, got {value!r}") from None


def cmd_train(args):
    from .engine import load_config, train
    from .engine.config import QUICKSTART

    given = dict(model=args.model, data=args.data, out=args.out, iters=args.iters, batch_size=args.batch_size,
                 amp=args.amp, device=args.device, workers=args.workers, pretrained=args.pretrained,
                 report_to=args.report_to)
    quick = args.config is None and args.data is None and not any(s.startswith("data=") for s in args.set)
    cfg = load_config(args.config, args.set, **{**(QUICKSTART if quick else {}),
                                                **{k: v for k, v in given.items() if v is not None}})
    if args.batch_size is not None and not any(s.startswith("global_batch=") for s in args.set):
        cfg.global_batch = None  # an explicit per-process batch wins over the recipe's total
    result = train(cfg, resume="auto" if args.auto_resume else args.resume)
    out = Path(cfg.out)
    if result is not None and os.environ.get("RANK", "0") == "0":  # under torchrun, one line, not one per process
        print(f"mIoU {100 * result['mIoU']:.2f} ({result['protocol']}); model: {out / 'model.safetensors'}, "
              f"best: {out / 'best.safetensors'}, curves: {out / 'curves.png'}")


@_verb("train", cmd_train, "train a model (default: segformer-b0 on the built-in synthetic set)",
       "Train a model. With no CONFIG and no --data this runs the quick start: segformer-b0 from scratch on the\n"
       "built-in synthetic set, 2500 iterations of 8 images (bf16 where the CPU/GPU has it; BENCHMARKS.md gives its time).\n"
       "Writes to --out: model.safetensors (latest), best.safetensors, train_state.pt (for --resume),\n"
       "log.jsonl, config.yaml (the resolved settings), curves.png and val_iou.png.")
def _train_args(p):
    p.add_argument("config", nargs="?", type=Path, help="YAML recipe (keys of transeg.engine.TrainConfig)")
    p.add_argument("--model", help="variant name, see `transeg models`")
    p.add_argument("--data", help="folder with images/, masks/, classes.txt (default: synthetic)")
    p.add_argument("--out", help="output directory (default runs/train)")
    p.add_argument("--iters", type=int, help="optimizer steps")
    p.add_argument("--batch-size", type=int, help="images per step and process (recipes state the paper's total as "
                   "global_batch, split over the processes)")
    p.add_argument("--amp", choices=["no", "auto", "bf16", "fp16"],
                   help="mixed precision; auto = bf16 where the hardware computes it natively (fp16 needs CUDA)")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--workers", type=_workers, metavar="N|auto",
                   help="data-loading processes; auto (the default): sized from the cores and the augmentation's "
                        "measured speed, said at start")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its train_state.pt. Only --iters (longer, or shorter down to "
                        "where the run is: from there on the poly lr schedule runs over the new length), the "
                        "eval/ckpt/log intervals, --workers, --device, --amp and the test settings may change")
    p.add_argument("--pretrained", metavar="CKPT",
                   help="fine-tune: a new run (its own --out) whose weights start from a transeg .safetensors, e.g. "
                        "runs/a/model.safetensors of a finished run; optimizer and schedule start afresh; for data "
                        "with another class count the classifier starts afresh (said in one line). Same as --set "
                        "pretrained=CKPT")
    p.add_argument("--auto-resume", action="store_true",
                   help="continue the run in --out if there is one, else start it (for torchrun --max-restarts)")
    p.add_argument("--report-to", nargs="+", choices=["tensorboard", "wandb", "mlflow"], metavar="TRACKER",
                   help="watch the run in tensorboard, wandb and/or mlflow (each needs its extra, e.g. pip install "
                        "'transeg[wandb]'): losses, lr and speed at every log_interval, every metric, per-class IoU "
                        "and the prediction grid at each evaluation; --resume continues the same tracker runs. W&B "
                        "offline: WANDB_MODE=offline; MLflow: a SQLite store beside --out unless MLFLOW_TRACKING_URI "
                        "says otherwise. Same as --set report_to=[...]. Push the run while it trains with --set "
                        "push_to=OWNER/NAME push_every=N")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set lr=1e-4 crop_size=[256,256] warmup_iters=0 (may be "
                        "repeated: all apply; a key given twice takes the last value, with a note)")


def cmd_eval(args):
    from .charts import confusion_chart, iou_chart
    from .engine import evaluate
    from .engine.evaluate import evaluation_dataset
    from .engine.metrics import format_table

    from .files import output_folder
    from .inference import dataset_samples
    from .viz import prediction_grid, save_image

    out = output_folder(args.out) if args.out else None  # before the evaluation, not after it
    model = _load(args)
    dataset = evaluation_dataset(model, args.data, args.split, source=args.checkpoint)
    result = evaluate(model, dataset, _protocol(args, model), max_samples=args.limit)
    spec = args.data if args.data is not None else model.meta.get("dataset")
    count = len(dataset) if args.limit is None else min(args.limit, len(dataset))
    print(printable(f"{args.checkpoint} on {spec or 'synthetic'} ({args.split}, {count} images)"))
    print(f"protocol: {result['protocol']}")
    print(format_table(result, [printable(c) for c in dataset.classes]))
    if out:
        palette = model.meta.get("palette") or dataset.palette
        save_image(iou_chart(result, list(dataset.classes), palette,
                             title=f"{model.meta['variant']} — {result['protocol']}"), out / "iou.png")
        samples = dataset_samples(model, dataset, _protocol(args, model), count=4)
        save_image(prediction_grid(samples, list(dataset.classes), palette), out / "predictions.png")
        save_image(confusion_chart(result, list(dataset.classes), title=f"{model.meta['variant']}: confusion, "
                                   "row-normalised"), out / "confusion.png")
        print(f"per-class chart: {out / 'iou.png'}; image | prediction | truth of the first {len(samples)} images: "
              f"{out / 'predictions.png'}; confusion matrix: {out / 'confusion.png'}")


@_verb("eval", cmd_eval, "measure mIoU / mAcc / aAcc of a checkpoint on a dataset")
def _eval_args(p):
    _add_checkpoint_arg(p)
    p.add_argument("--data", help="dataset folder (default: the data the model was trained on)")
    p.add_argument("--split", default="val", help="split folder to use (default val)")
    p.add_argument("--limit", type=int, help="only the first N images")
    p.add_argument("--out", help="also write here the per-class IoU chart iou.png and predictions.png (image | "
                   "prediction | ground truth of the first 4 images, with a legend)")
    _add_inference_args(p)


# `transeg predict --grid`: how many images the grid shows (the first ones given)
GRID_IMAGES = 8


def cmd_predict(args):
    from tqdm import tqdm

    from .files import output_folder
    from .images import image_files
    from .inference import read_truth, segment
    from .device import return_freed_memory
    from .tiled import needs_tiles
    from .viz import prediction_grid, save_image

    skipped = []
    files = image_files(args.inputs, skipped)  # listed once, before anything is written
    for path, what in skipped:
        print(printable(f"transeg: skipped {path}: {what}, not an image file"), file=sys.stderr)
    # refused when it holds an input (nothing of the user's is replaced); checked before the model loads,
    # created after it did, so a bad checkpoint leaves no empty folder behind
    output_folder(args.out, inputs=files, create=False)
    grid = args.grid or args.truth is not None
    truths = _truth_files(args.truth, files[:GRID_IMAGES]) if args.truth is not None else {}  # all there, first
    max_pixels = int(args.max_megapixels * 1e6)
    large = [f for f in files if args.tile or needs_tiles(f, max_pixels)]
    if large:  # a tiled job's memory must not creep with its length (device.return_freed_memory)
        return_freed_memory()
    model = _load(args)
    out = output_folder(args.out, inputs=files)
    isr = _isr_line(model)
    if isr:
        print(isr)
    used, samples = set(), []
    small = [f for f in files if f not in large]
    for seg in tqdm(segment(model, small, _protocol(args, model), max_pixels=max_pixels),
                    total=len(small), desc="predict", disable=len(small) < 2):
        stem = Path(seg.source).stem  # outputs are named from the stem only, so they always land inside --out
        while stem in used:
            stem += "_"
        used.add(stem)
        mask, overlay = out / f"{stem}_mask.png", out / f"{stem}_overlay.jpg"
        save_image(seg.mask(), mask)  # atomic: a full disk leaves no half-written file
        save_image(seg.overlay(alpha=args.alpha, legend=not args.no_legend), overlay, quality=92)
        top = ", ".join(f"{printable(name)} {100 * share:.0f}%" for name, share in list(seg.shares().items())[:3])
        tqdm.write(printable(f"{Path(seg.source).name}{f' ({seg.note})' if seg.note else ''}: ") + top
                   + printable(f" -> {mask}, {overlay}"))
        if grid and len(samples) < GRID_IMAGES:
            truth = read_truth(truths[seg.source], model.num_classes) if truths else None
            samples.append({"image": seg.image, "prediction": seg.labels, "truth": truth, "title": Path(seg.source).name})
    for path in large:
        _predict_tiled(model, path, out, used, args)
    if samples:
        save_image(prediction_grid(samples, model.classes, model.palette, alpha=args.alpha), out / "grid.png")
        shown = f"first {len(samples)} of {len(files)} images" if len(files) > len(samples) else f"{len(samples)} images"
        print(f"grid ({shown}): {out / 'grid.png'}")


def _predict_tiled(model, path, out, used, args):
    """One large image through `predict_file`: NAME.tif and NAME_preview.png in `out`, and a line saying so."""
    stem = Path(path).stem
    while stem in used:
        stem += "_"
    used.add(stem)
    tiles = dict(overlap=args.overlap, blend=args.blend, scale=args.tile_scale, gsd=args.gsd, level=args.level,
                 batch_size=args.tile_batch, resume=args.resume, max_pixels=int(args.max_megapixels * 1e6))
    if args.tile:
        tiles["window"] = args.tile
    if tiles["overlap"] is None:
        del tiles["overlap"]
    done = model.predict_file(path, out / f"{stem}.tif", out / f"{stem}_preview.png", **tiles)
    top = ", ".join(f"{printable(name)} {100 * share:.0f}%" for name, share in list(done.shares.items())[:3])
    ran = f"{done.run_size[1]}x{done.run_size[0]}, " if done.run_size != done.size else ""
    resumed = f", {done.tiles - done.tiles_run} done before" if done.tiles_run < done.tiles else ""
    print(printable(f"{Path(path).name} ({done.size[1]}x{done.size[0]}, {ran}{done.tiles} tiles{resumed}): ") + top
          + printable(f" -> {done.labels}, {done.preview}"))


@_verb("predict", cmd_predict, "segment images: writes index-PNG masks and colour overlays")
def _predict_args(p):
    _add_checkpoint_arg(p)
    p.add_argument("inputs", nargs="+", help="image files or folders of images")
    p.add_argument("--out", required=True, help="output folder (nothing is written outside it; a folder holding "
                   "one of the inputs is refused, so that no file of yours is replaced)")
    p.add_argument("--alpha", type=_fraction, default=0.5, help="overlay opacity, 0..1 (default 0.5)")
    p.add_argument("--no-legend", action="store_true",
                   help="overlays without their legend (by default a corner box lists the classes present, their "
                        "colours and shares; images under ~150 px have no room for it)")
    p.add_argument("--grid", action="store_true",
                   help=f"also write grid.png: image | prediction (| ground truth with --truth) for the first "
                        f"{GRID_IMAGES} images, with a legend (the README's picture)")
    p.add_argument("--truth", metavar="DIR", help="ground-truth masks for the grid, DIR/<image name>.png (index PNGs "
                   "of class ids, as a dataset's masks/ folder); implies --grid")
    p.add_argument("--max-megapixels", type=_positive, default=100.0,
                   help="larger PNG / JPEG images are refused from their header, before decoding (default 100); "
                        "TIFFs of any size are segmented in tiles")
    _add_inference_args(p)
    _add_tile_args(p)


def _add_tile_args(p):
    from .tiled import BLENDS, OVERLAP_FRACTION, WINDOW

    g = p.add_argument_group(
        "large images (tiled)",
        "GeoTIFFs, pyramidal TIFF / OME / SVS slides and TIFFs over --max-megapixels are segmented in windows read\n"
        "from disk, blended without seams and written as they finish: NAME.tif (labels at full resolution, tiled\n"
        "and compressed, with the input's CRS and transform, a colour map and the class names) and\n"
        "NAME_preview.png (a downsampled overlay). Memory is bounded by the window, not the image (README, Limits).\n"
        "A stopped job (Ctrl-C, a kill) is finished by the same command with --resume.")
    g.add_argument("--tile", type=_count, metavar="N", help=f"window side in pixels at the resolution the model runs "
                   f"at (default {WINDOW} for tiled inputs); given, every input is segmented in tiles")
    g.add_argument("--overlap", type=int, default=None, metavar="N",
                   help=f"pixels shared by neighbouring windows, at most half the window (default: 1/{OVERLAP_FRACTION} of "
                        f"it, {WINDOW // OVERLAP_FRACTION} for {WINDOW})")
    g.add_argument("--blend", choices=BLENDS, default="hann", help="how overlapping windows are merged: hann (a "
                   "cross-fade over the overlap, default), gaussian (centre-weighted) or mean (mmseg's slide mode)")
    res = g.add_mutually_exclusive_group()
    res.add_argument("--tile-scale", type=_positive, metavar="F", help="run the model on the image resized by F "
                     "(e.g. 0.5 for imagery twice as fine as the training data); labels stay at full resolution")
    res.add_argument("--gsd", type=_positive, metavar="METRES", help="run at this ground sample distance "
                     "(georeferenced inputs, in their CRS units), e.g. 0.3 for a model trained on 30 cm imagery")
    res.add_argument("--level", type=int, metavar="N", help="run at the resolution of pyramid level N of a slide or "
                     "a TIFF with overviews (0 = full resolution); windows are read from the best level")
    g.add_argument("--tile-batch", type=_count, metavar="N", help="windows per forward pass (default: 1 on a CPU, "
                   "where batching buys little; on a GPU as many as keep their class scores within 1 GiB, at most 8)")
    g.add_argument("--resume", action="store_true", help="finish a stopped job: only the windows not done run, and "
                   "the result equals an uninterrupted run's")


def _truth_files(folder, files):
    """{image path: its truth mask folder/<stem>.png} for `predict --truth`, all checked to exist."""
    from .errors import TransegError

    folder = Path(folder)
    if not folder.is_dir():
        raise TransegError(f"--truth {folder}: no such folder (give the folder of masks named like the images, "
                           "e.g. data/masks/val/)")
    found = {str(f): folder / f"{Path(f).stem}.png" for f in files}
    missing = [Path(f).name for f, m in found.items() if not m.is_file()]
    if missing:
        raise TransegError(f"--truth {folder}: no mask for {len(missing)} image(s) ({', '.join(missing[:3])}"
                           f"{' ...' if len(missing) > 3 else ''}); each image NAME.ext needs {folder}/NAME.png")
    return found


def cmd_convert(args):
    from . import save
    from .convert import convert
    from .files import output_file
    from .errors import TransegError, UnknownVariant
    from .flops import count_params

    output_file(args.dst, example="model.safetensors", inputs=[args.src] + ([args.base] if args.base else []))
    if args.dst.suffix != ".safetensors":
        raise TransegError(f"{args.dst}: the output must be a .safetensors file")
    try:
        model = convert(args.src, args.from_format, model=args.model, num_classes=args.num_classes, base=args.base)
    except UnknownVariant as e:
        raise TransegError(e.naming("pass --model NAME")) from None
    save(model, args.dst)
    print(printable(f"{args.src} -> {args.dst}: {model.meta['variant']}, {model.num_classes} classes, ")
          + f"{count_params(model):,} params" + (", class names from the source" if model.meta.get("classes") else ""))


@_verb("convert", cmd_convert, "convert a foreign checkpoint into a transeg .safetensors")
def _convert_args(p):
    # the formats the families declare: listed when the parser is built, not when this module is imported
    p.description = ("Convert a foreign checkpoint. Files are read without running pickled code.\nformats:\n"
                     + "\n".join(f"  {k:14s}{v}" for k, v in formats().items()))
    p.add_argument("src", type=Path, help="the foreign checkpoint file or directory")
    p.add_argument("dst", type=Path, help="output .safetensors")
    p.add_argument("--from", dest="from_format", required=True, choices=sorted(formats()), help="source format")
    p.add_argument("--model", help="variant name (default: recognised from the weights)")
    p.add_argument("--num-classes", type=int, help="expected class count (checked)")
    p.add_argument("--base", type=Path, metavar="DIR", help="; ".join(f"--from {f.name}: {f.base}" for f in FORMATS.values()
                                                                    if f.base))


def cmd_bench(args):
    import torch

    from . import bench, load, zoo
    from .device import parse_dtype, resolve_device
    from .engine.evaluate import evaluation_dataset
    from .errors import TransegError
    from .flops import count_params, variant_classes
    from .isr import parse_setting, pooling_text, sweep_settings
    from .registry import VARIANTS, create_model

    if args.compare and args.isr_sweep:
        raise TransegError("--compare and --isr-sweep are separate measurements; run them one at a time")
    if args.isr_sweep:  # the chart's place is checked before the sweep, not after it
        from .files import output_file
        from .viz import image_format

        image_format(output_file(args.plot, example="isr_sweep.png"))
    is_checkpoint = Path(args.model).suffix == ".safetensors" or (args.model not in VARIANTS and zoo.is_name(args.model))
    classes = args.num_classes if args.num_classes is not None or is_checkpoint else variant_classes(args.model)
    model = load(args.model) if is_checkpoint else create_model(args.model, num_classes=classes)
    name = model.meta["variant"]
    if args.data is not None and not (args.isr_sweep and is_checkpoint):
        raise TransegError("--data (accuracy per setting) needs --isr-sweep and a trained .safetensors checkpoint")
    setting = parse_setting(args.isr_encoder, args.isr_decoder)
    if args.isr_sweep and setting:
        raise TransegError("--isr-sweep measures its own list of settings; leave out --isr-encoder/--isr-decoder")
    settings = sweep_settings(model) if args.isr_sweep else [setting]
    dataset = evaluation_dataset(model, args.data, args.split, source=args.model) if args.data is not None else None
    device, dtype = resolve_device(args.device), parse_dtype(args.dtype)
    env = bench.environment(device)
    h, w = args.size
    precision = args.dtype + ("" if args.dtype == "fp32" else " (autocast)" if args.autocast else " (native weights)")
    precision += ", compiled" if args.compile else ""
    print(f"{name}: {count_params(model) / 1e6:.2f}M params, input {h}x{w}, batch {args.batch}")
    print(f"device {env['device']}, {env['threads']} threads, torch {env['torch']}, {precision}, "
          f"{args.warmup} warm-up + {args.runs} timed runs (median; IQR: the middle half of the runs)")
    if args.compare:
        r = bench.compare_hf(name, model.num_classes, args.size, args.batch, device, dtype, args.autocast, args.compile,
                             args.warmup, args.runs, progress=sys.stderr.isatty())
        print(f"fp32 logits: max |transeg - HF| = {r['max_abs_diff']:.1e} (same weights)")
        for k, ms in r["ms"].items():
            print(f"{k:24s} {ms:8.1f} ms  {1000 * args.batch / ms:6.1f} images/s  {r['ms']['HF fp32'] / ms:5.2f}x HF fp32")
        return
    model.optimize_for_inference(None if args.autocast else dtype, compile=args.compile, device=device, log=_say)
    rows = bench.measure(model, settings, args.size, args.batch, device, dtype if args.autocast else torch.float32,
                         args.warmup, args.runs, args.flops, dataset, args.limit, progress=sys.stderr.isatty())
    for row in rows:
        if args.isr_sweep:
            _print_sweep_row(row, rows[0], args.batch)
            continue
        isr = "" if row["setting"] == "no ISR" else f", {row['setting']} (K/V pooling {pooling_text(row['pooling'])})"
        print(f"{row['GFLOPs']:.2f} GFLOPs (multiply-adds, {row['convention']} convention){isr}")
        print(f"latency median {row['latency ms']:.1f} ms ({bench.spread_text(row)}), "
              f"throughput {1000 * args.batch / row['latency ms']:.1f} images/s")
    warning = bench.noise_warning(rows)
    if warning:
        print(f"transeg: warning: {warning}", file=sys.stderr)
    if args.isr_sweep:
        from .charts import tradeoff_chart

        from .viz import save_image

        plot = Path(args.plot)
        title = f"{name}: ISR encoder / decoder ratios, {h}x{w} {args.dtype}" + (f", mIoU on {args.data}" if dataset else "")
        paper = [i for i, r in enumerate(rows) if r["paper"]]
        save_image(tradeoff_chart(rows, title=title, names=("trained setting (no ISR)", "ISR setting"), marked=paper,
                                  marked_name=f"the paper's setting ({rows[paper[0]]['label']})" if paper else "",
                                  whiskers={"latency ms": ("p25 ms", "p75 ms")}), plot)
        print(f"trade-off chart: {plot}")


@_verb("bench", cmd_bench, "params, GFLOPs and latency of a model or checkpoint")
def _bench_args(p):
    p.add_argument("model", help="variant name (fresh weights), a .safetensors checkpoint, a zoo name or a Hugging Face "
                   "repo id")
    p.add_argument("--size", type=_size, default=(512, 512), help="input HxW (default 512x512)")
    p.add_argument("--batch", type=int, default=1, help="images per forward pass (default 1); throughput is "
                   "batch / latency")
    p.add_argument("--num-classes", type=int, help="classes of the head a variant name is built with (default: its "
                   "dataset's, as `transeg models` counts it: 150, ADE20K's, or e.g. 19 for "
                   "eomt-dinov2-l16-cityscapes); a checkpoint keeps its own")
    p.add_argument("--runs", type=int, default=10, help="timed runs (default 10): the median is reported with the "
                   "quartiles, min and max, and a warning when the IQR exceeds 10%% of the median (bench.NOISY_SPREAD)")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs first (default 3): allocations, kernel "
                   "choices and --compile settle before timing")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... (default cpu)")
    _add_speed_args(p)
    p.add_argument("--autocast", action="store_true",
                   help="with --dtype bf16/fp16: keep fp32 weights and run under torch.autocast instead")
    p.add_argument("--compare", choices=["hf"],
                   help="also time Hugging Face transformers' SegFormer with the same weights in the same run "
                        "(SegFormer variants; needs pip install transformers)")
    p.add_argument("--flops", choices=["mmcv", "fvcore"],
                   help="GFLOPs convention (default: the paper's: mmcv's counter for SegFormer/EDAFormer, fvcore's "
                        "for SegViT -- it adds LayerNorm/upsampling terms and no conv bias)")
    _add_isr_args(p)
    g = p.add_argument_group("ISR sweep")
    g.add_argument("--isr-sweep", action="store_true",
                   help="GFLOPs and latency for each setting of EDAFormer's ISR table (trained, 2,1,1,1 ... 8,4,2,1 / 2,2,2), "
                        "printed and plotted")
    g.add_argument("--data", help="with a checkpoint: also mIoU per setting on this dataset (e.g. synthetic, a folder)")
    g.add_argument("--split", default="val", help="split for --data (default val)")
    g.add_argument("--limit", type=int, help="only the first N images of --data")
    g.add_argument("--plot", default="isr_sweep.png", help="where the sweep's chart goes (default ./isr_sweep.png)")


def _print_sweep_row(row, base, batch):
    """One sweep line: the setting, its K/V reductions, cost and speed relative to the trained setting."""
    from .isr import pooling_text

    def rel(key):
        return f" ({100 * (row[key] / base[key] - 1):+5.1f}%)"

    pooling = pooling_text(row["pooling"])
    line = f"{row['setting']:<35}" + (f" pooling {pooling:<34}" if pooling else "")
    line += f" {row['GFLOPs']:8.2f} GFLOPs{rel('GFLOPs')}  {row['latency ms']:8.1f} ms{rel('latency ms')}"
    line += f" (IQR {row['p25 ms']:.1f}-{row['p75 ms']:.1f})"
    line += f"  {1000 * batch / row['latency ms']:7.1f} img/s"
    if "mIoU" in row:
        line += f"  mIoU {row['mIoU']:.2f} ({row['mIoU'] - base['mIoU']:+.2f})"
    print(line)


def cmd_serve(args):
    from .serve import serve

    serve(args.model, host=args.host, port=args.port, device=args.device, dtype=args.dtype,
          compile="auto" if args.compile is None else args.compile, log=_say,
          backend=args.backend,
          max_batch=args.max_batch, window_ms=args.window_ms, max_pending=args.max_pending,
          max_upload_mb=args.max_upload_mb, max_megapixels=args.max_megapixels,
          max_inflight_megapixels=args.max_inflight_megapixels, max_inflight_upload_mb=args.max_inflight_upload_mb,
          header_timeout=args.header_timeout, body_timeout=args.body_timeout, max_connections=args.max_connections,
          allowed_hosts=args.allowed_hosts, allowed_origins=args.allowed_origins)


@_verb("serve", cmd_serve, "serve a model over HTTP, with a page to look through (pip install 'transeg[serve]')",
       "Serve a model over HTTP: POST /v1/segment (an image in, an index PNG or JSON out), GET /v1/model,\n"
       "GET /healthz, API docs at /docs, and a page at / to drop an image on, see the overlay and try ISR.\n"
       "Concurrent requests are batched on the device; overload is answered 503 with Retry-After.\n\n"
       "examples:\n"
       "  transeg serve runs/train/model.safetensors                 # then open http://127.0.0.1:8000/\n"
       "  transeg serve model-int8.onnx                              # an ONNX export on onnxruntime (CPU)\n"
       "  curl -F image=@photo.jpg 'http://127.0.0.1:8000/v1/segment?format=json'\n"
       "  curl --data-binary @photo.jpg http://127.0.0.1:8000/v1/segment -o mask.png")
def _serve_args(p):
    p.add_argument("model", help=CHECKPOINT_HELP + ", or an .onnx file (`transeg export`)")  # a str, as serve() takes
    _add_backend_arg(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only; "
                   "0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000, help="default 8000")
    _add_device_arg(p)
    _add_speed_args(p, serving=True)
    g = p.add_argument_group("batching and limits")
    g.add_argument("--max-batch", type=int, help="images of one size run together, at most this many (default: 8 "
                   "on a GPU, 1 on a CPU, where batching gains nothing; see BENCHMARKS.md)")
    g.add_argument("--window-ms", type=float, default=5.0, help="how long the first request of a batch waits for "
                   "others (5 ms)")
    g.add_argument("--max-pending", type=int, default=64, help="requests admitted at once; more get 503 (64)")
    g.add_argument("--max-upload-mb", type=float, default=20.0, help="largest upload in MB; larger get 413 (20)")
    g.add_argument("--max-megapixels", type=float, default=40.0, help="largest image in megapixels, read from its "
                   "header before decoding; larger get 413 (40)")
    g.add_argument("--max-inflight-megapixels", type=float, help="megapixels of all requests being decoded and run "
                   "at once; more get 503 with Retry-After (default: 2x --max-megapixels)")
    g.add_argument("--max-inflight-upload-mb", type=float, help="MB of request bodies held at once; more get 503 "
                   "(default: 8x --max-upload-mb)")
    g.add_argument("--header-timeout", type=float, default=10.0, help="seconds a connection may take to send a "
                   "request head; then 408 and closed (10)")
    g.add_argument("--body-timeout", type=float, default=60.0, help="seconds the whole body may take after its "
                   "head; then 408 and closed (60)")
    g.add_argument("--max-connections", type=int, help="open connections at once; beyond it the one waiting longest "
                   "for its client is closed, else 503 (default: 512, or the open-file limit less 64 if lower)")
    g.add_argument("--allowed-hosts", type=lambda s: [h for h in s.split(",") if h.strip()], help="comma-separated "
                   "Host names answered, '*' for any; others get 400 (default: localhost, 127.0.0.1, ::1 and --host)")
    g.add_argument("--allowed-origins", type=lambda s: [o for o in s.split(",") if o.strip()], default=[],
                   help="comma-separated origins of pages that may POST, e.g. https://app.example.com, '*' for "
                   "any; others get 403 (default: none, same origin only)")


def cmd_data_prepare(args):
    from .files import output_folder
    from .data.prepare import prepare

    output_folder(args.out, create=False)  # a read-only or unwritable place: one line before any work
    report = prepare(args.name, args.raw, args.out, progress=True)
    print(f"{args.name}: {report['masks']} label maps written under {args.out}; "
          f"train with `transeg train --data {args.out}` (the layout is recognised)")


def _data_prepare_parser(actions):
    from .data import prepare as prepare_module

    d = actions.add_parser("prepare", help="one-off conversion of a downloaded benchmark",
                           formatter_class=argparse.RawDescriptionHelpFormatter, description=prepare_module.__doc__)
    d.set_defaults(fn=cmd_data_prepare)
    d.add_argument("name", choices=sorted(prepare_module.PREPARE), help="which dataset")
    d.add_argument("raw", type=Path, help="the downloaded (extracted) dataset folder")
    d.add_argument("out", type=Path, help="output folder (may be the same as RAW)")


def cmd_data_check(args):
    import numpy as np

    from .data import build_dataset, build_splits, class_weights

    # every split the dataset holds (images/train, images/val, ...), or the one --split names
    splits = ([(args.split, build_dataset(args.dir, args.split, option=""))] if args.split
              else build_splits(args.dir, option=""))  # (DIR is an argument here, not --data)
    for index, (split, dataset) in enumerate(splits):
        s = dataset.check(progress=True, decode_images=not args.fast)
        total = max(s["total_pixels"], 1)
        print(("\n" if index else "") + printable(repr(dataset)))
        print(f"{s['num_images']} image/mask pairs, sizes {s['min_size'][1]}x{s['min_size'][0]} .. "
              f"{s['max_size'][1]}x{s['max_size'][0]} (WxH); raw label values: {_ranges(s['label_values'])}")
        print(f"ignored: {100 * s['ignore_pixels'] / total:.1f}% of pixels")
        order = np.argsort(s["class_pixels"])[::-1]
        print(f"{'class':24s} {'pixels %':>9s} {'images':>7s}")
        for i in order:
            if s["class_pixels"][i]:
                print(f"{printable(s['classes'][i])[:24]:24s} {100 * s['class_pixels'][i] / total:9.3f} {s['class_images'][i]:7d}")
        if s["absent_classes"]:
            print(f"classes with no pixel in this split: {', '.join(map(printable, s['absent_classes']))}")
        # the weights come from the training pixels: shown for train (or a flat folder, or the split asked for)
        if any(s["class_pixels"]) and (split in ("train", None) or args.split):
            print("class weights of `loss: [{type: ce, class_weight: auto}]` (ENet's 1/ln(1.02 + share), mean 1 over "
                  "the pixels): " + ", ".join(f"{printable(n)} {w:.3g}" for n, w in zip(s["classes"], class_weights(s["class_pixels"]))))
    checked = ", ".join(str(split) for split, _ in splits) if splits[0][0] is not None else "none (a flat folder)"
    print(f"all masks match their images and hold only allowed values (split{'s' if len(splits) > 1 else ''} "
          f"checked: {checked})")


def _data_check_parser(actions):
    d = actions.add_parser("check", help="scan a dataset: sizes, label values, class frequencies, bad pairs")
    d.set_defaults(fn=cmd_data_check)
    d.add_argument("dir", help="dataset folder (or NAME:PATH)")
    d.add_argument("--split", help="split to scan (default: every split found, e.g. images/train and images/val)")
    d.add_argument("--fast", action="store_true", help="read image headers only (skip full decoding)")


def _ranges(values):
    """[0, 1, 2, 5, 255] -> '0-2, 5, 255'."""
    out, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            out.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ", ".join(out)


@_verb("data", None, "prepare a benchmark dataset, or check a dataset folder",
       "Datasets: ADE20K, Cityscapes, COCO-Stuff 164k / 10k, Pascal Context and Pascal VOC 2012 (+ SBD: voc-aug)\n"
       "are read in their official layouts (give the folder to --data, or NAME:PATH, e.g. --data\n"
       "cityscapes:/data/cityscapes); any other folder with images/, masks/ and classes.txt is a dataset of your\n"
       "own (classes.txt: `ignore` as first line = 0 is unlabelled; `name R G B` lines read colour masks).")
def _data_args(p):
    actions = p.add_subparsers(dest="data_verb", metavar="ACTION", required=True)
    _data_prepare_parser(actions)
    _data_check_parser(actions)


def cmd_push(args):
    from .share import push_to_hub

    push_to_hub(args.source, args.repo_id, private=args.private, revision=args.revision, message=args.message,
                force=args.force, license=args.license)


@_verb("push", cmd_push, "share a run or checkpoint on the Hugging Face Hub, with a generated model card",
       "Push to the Hugging Face Hub: model.safetensors (loads back with `transeg.load(REPO_ID)`, nothing\n"
       "converted), config.yaml (the run's recipe) and README.md, a model card the Hub reads (library transeg,\n"
       "task image-segmentation, license, datasets, the metrics the run measured, per-class IoU, training\n"
       "curves and a prediction grid). A run never evaluated gets a card that says so. Uses HF_TOKEN (or the\n"
       "token `hf auth login` saved) and HF_ENDPOINT; `transeg.save_pretrained` writes the same files to a folder.")
def _push_args(p):
    p.add_argument("source", metavar="RUN_OR_CHECKPOINT", type=Path,
                   help="a training run folder (--out of `transeg train`) or a transeg .safetensors file")
    p.add_argument("repo_id", metavar="REPO_ID", help="OWNER/NAME on the Hub; created if missing")
    p.add_argument("--private", action="store_true", help="create the repo private (an existing repo keeps its "
                   "visibility)")
    p.add_argument("--revision", metavar="BRANCH", help="commit to this branch (created from main if missing)")
    p.add_argument("--message", metavar="TEXT", help="the commit message (default: transeg: VARIANT (RUN))")
    p.add_argument("--license", metavar="ID", help="the card's license, a Hub license id such as apache-2.0 or mit "
                   "(default: unknown; yours to choose for weights you trained)")
    p.add_argument("--force", action="store_true", help="commit even into a repo that holds another library's "
                   "files (refused without it: the files would mix)")


def cmd_export(args):
    from .files import output_file
    from .errors import TransegError
    from .export import check_trace_size, export_onnx, slow_to_trace

    check_trace_size(args.size)
    output_file(args.out, example="model.onnx")  # said before the trace (export_onnx checks it too)
    if args.out.suffix != ".onnx":
        raise TransegError(f"{args.out}: the output must be an .onnx file")
    if args.int8 or args.calibrate is not None:
        return _export_int8(args)
    model = _load(args, device="cpu")
    shape = "one image of exactly that size" if args.static else "dynamic batch/height/width"
    if not args.static and slow_to_trace(model):
        shape += " (a Swin trace takes a minute or two; --static takes seconds)"
    print(f"exporting {model.meta['variant']} ({args.checkpoint}) to {args.out}, traced at {args.size[0]}x{args.size[1]}, "
          f"{shape} ...", flush=True)
    r = export_onnx(model, args.out, sample_size=args.size, opset=args.opset, check=not args.no_check,
                    static=args.static)
    where = "two fresh inputs" if args.static else "two other input shapes"
    check = (f"; onnxruntime vs PyTorch on {where}: max |diff| {r['max_abs_diff']:.1e}" if "max_abs_diff" in r else "")
    print(f"{r['path']}: opset {r['opset']}, {r['bytes'] / 1e6:.1f} MB, {r['isr']}{check}")


def _export_int8(args):
    """`export --int8`: static int8 calibrated on --calibrate DATA, else dynamic int8; from a checkpoint (exported
    to fp32 ONNX first, in a temporary folder) or from an fp32 .onnx file."""
    from .deploy.quantize import dataset_images, export_int8, quantize_int8
    from .errors import TransegError

    if args.calibrate is not None and not args.int8:
        raise TransegError("--calibrate is for int8: add --int8 "
                           "(`transeg export MODEL out.onnx --int8 --calibrate DATA`)")
    images = None if args.calibrate is None else dataset_images(args.calibrate, args.calibration_split,
                                                                args.calibration_images)
    how = (f"static int8, calibrated on {args.calibration_images} images of {args.calibrate or 'synthetic'} "
           f"({args.calibration_split})" if images is not None else
           "dynamic int8 (no --calibrate DATA: weights int8, activations quantized per call; static int8 with "
           "calibration images is faster)")
    if str(args.checkpoint).lower().endswith(".onnx"):
        print(printable(f"quantizing {args.checkpoint} to {args.out}: {how} ..."), flush=True)
        r = quantize_int8(args.checkpoint, args.out, images, args.calibration_images)
    else:
        model = _load(args, device="cpu")
        print(printable(f"exporting {model.meta['variant']} ({args.checkpoint}) to {args.out}: {how}, traced at "
                        f"{args.size[0]}x{args.size[1]} ..."), flush=True)
        exported, r = export_int8(model, args.out, images, args.calibration_images, sample_size=args.size,
                                  opset=args.opset, check=not args.no_check)
        if "max_abs_diff" in exported:
            print(f"fp32 graph: onnxruntime vs PyTorch max |diff| {exported['max_abs_diff']:.1e}")
    seen = f", {r['images']} calibration images" if "images" in r else ""
    kept = f", {r['fp32_matmuls']} attention MatMuls" if r.get("fp32_matmuls") else ""
    print(printable(f"{r['path']}: int8 {r['method']}{seen}, {r['bytes'] / 1e6:.1f} MB; int8: {', '.join(r['ops'])} "
                    f"(fp32: the other operators{kept}); measure it with `transeg eval {r['path']}`"))


@_verb("export", cmd_export, "export a checkpoint to ONNX (dynamic batch, height, width), checked by onnxruntime",
       "Export to ONNX: input `image` [N,3,H,W] normalised with the mean/std in the file's metadata, output\n"
       "`logits` [N,K,H/s,W/s] at the head's stride. Class names, palette, mean/std, the ISR setting and the test\n"
       "protocol (how to size the input: keep-ratio resize, size divisor, whole image or sliding windows) are\n"
       "stored in metadata_props['transeg'] (JSON; the protocol also as one line in metadata_props['test_protocol']).\n"
       "Needs the onnx extra: pip install 'transeg[onnx]'.")
def _export_args(p):
    _add_checkpoint_arg(p)
    p.add_argument("out", type=Path, help="output .onnx (written only after the check passes)")
    p.add_argument("--size", type=_size, default=(256, 256), help="input HxW to trace with (default 256x256; at most "
                   "4096x4096: export.MAX_TRACE_SIDE)")
    p.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime comparison")
    p.add_argument("--static", action="store_true", help="a graph for one image of exactly --size: much quicker to "
                   "trace than a dynamic Swin graph, and some runtimes want fixed shapes")
    g = p.add_argument_group(
        "int8 for CPUs (onnxruntime)",
        "Convolutions, weight matrix products and additions in int8 (per-channel weights, QDQ); LayerNorm,\n"
        "softmax, attention's activation products and the resizes stay fp32, where int8 loses accuracy or speed.\n"
        "CHECKPOINT may also be an fp32 .onnx from an earlier export. Check the result with `transeg eval out.onnx`\n"
        "(BENCHMARKS.md: int8 on a CPU).")
    g.add_argument("--int8", action="store_true", help="write an int8 graph: static with --calibrate, else dynamic "
                   "(weights only int8 ahead of time: smaller, less faster)")
    g.add_argument("--calibrate", metavar="DATA", help="images to calibrate static int8 on, through the model's test "
                   "protocol: any --data value (a dataset folder, ade20k:PATH, synthetic, ...)")
    g.add_argument("--calibration-images", type=_count, default=64, metavar="N",
                   help="how many images of --calibrate, spread over the split (default 64)")
    g.add_argument("--calibration-split", default="train", metavar="SPLIT",
                   help="the split of --calibrate to read (default train: the val images stay for measuring)")
    _add_isr_args(p)


# ----------------------------------------------------------------------------------------------- parser
def build_parser():
    parser = argparse.ArgumentParser(
        prog="transeg", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
        description=f"Transformer semantic segmentation: {', '.join(f.title for f in FAMILIES.values())}. "
                    "Every verb runs without downloads: with no --data, the built-in synthetic dataset is used.")
    parser.add_argument("--version", action="version", version=f"transeg {__version__}")
    # before the verb too (`transeg --threads 1 models`); after it, the verb's own --threads wins
    parser.add_argument("--threads", dest="threads_first", type=_count, metavar="N", help=THREADS_HELP)
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb in VERBS:
        examples = VERB_EXAMPLES.get(verb.name)
        p = sub.add_parser(verb.name, help=verb.help, description=verb.description or verb.help,
                           epilog=f"examples:\n{examples}" if examples else None,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(fn=verb.fn)
        if verb.name in THREADED_VERBS:
            p.add_argument("--threads", type=_count, metavar="N", help=THREADS_HELP)
        verb.declare(p)
    return parser


def main(argv=None):
    from .errors import TransegError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "fn", None):
        parser.print_help()
        return 0
    if args.verb in ("train", "eval", "predict", "bench", "serve"):
        from .device import keep_freed_memory

        keep_freed_memory()  # large activations reuse memory instead of page-faulting fresh pages
    threads = getattr(args, "threads", None) or args.threads_first
    if threads:
        _set_threads(threads)  # before any work, so the model and the data loaders see it
    try:
        args.fn(args)
    except TransegError as e:
        print(f"transeg: error: {printable(e)}", file=sys.stderr)  # file names and text from files, escaped
        return 2
    except KeyboardInterrupt as e:  # a tiled job says how far it got and how to finish it
        print(f"transeg: interrupted{printable(': ' + str(e)) if str(e) else ''}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
