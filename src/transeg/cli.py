"""`transeg <verb>`: thin argument parsing over the library. Run `transeg VERB --help` for each verb."""
import argparse
import os
import sys
from pathlib import Path

EXAMPLES = """\
examples:
  transeg models                                      # variants, paper vs measured params / GFLOPs
  transeg train                                       # segformer-b0 on the built-in synthetic set
  transeg train --model segformer-b2 --data my_data/ --out runs/b2 --set iters=40000 lr=1e-4
  transeg eval runs/train/model.safetensors           # mIoU on the data it was trained on
  transeg predict runs/train/model.safetensors photo.jpg --out preds/
  transeg convert segformer.b0.512x512.ade.160k.pth b0-ade.safetensors --from segformer
  transeg bench segformer-b0 --size 512x512
  transeg eval ckpt.safetensors --isr-encoder 2,2,1,1 --isr-decoder 2,2,2   # EDAFormer's inference spatial reduction
  transeg bench edaformer-t --size 1024x2048 --isr-sweep --runs 3           # GFLOPs / latency per ISR setting
  transeg export ckpt.safetensors model.onnx --isr-encoder 2,2,1,1 --isr-decoder 2,2,2
"""


def _size(text):
    """'512x1024' or '512' -> (512, 1024) / (512, 512)."""
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW like 512x1024, got {text!r}") from None
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) <= 0:
        raise argparse.ArgumentTypeError(f"expected HxW like 512x1024, got {text!r}")
    return tuple(parts)


def _floats(text):
    try:
        return [float(p) for p in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 0.75,1,1.25, got {text!r}") from None


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
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda when available)")


def _torch_dtype(name):
    """--dtype's value as a torch dtype (torch imported here, not at CLI start-up: fast --help)."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _add_speed_args(p, default_dtype="fp32"):
    g = p.add_argument_group("speed")
    g.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=default_dtype,
                   help="inference precision: bf16/fp16 cast the weights (native low precision, faster than "
                        "autocast on AMX CPUs and tensor-core GPUs; ~3 significant digits). Default fp32")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile with weight freezing: the first image of each size compiles (~30 s on CPU), "
                        "later ones run faster; worth it for many images of one size")


def _optimize(args, model):
    """Apply --dtype / --compile (Segmentor.optimize_for_inference)."""
    import torch

    dtype = _torch_dtype(args.dtype)
    if dtype == torch.float32 or getattr(args, "autocast", False):
        dtype = None  # fp32, or bench --autocast: fp32 weights, low precision by autocast
    return model.optimize_for_inference(dtype, compile=args.compile)


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


def _apply_isr(args, *models):
    """Set the ISR given on the command line on `models`; returns the setting (None when not given)."""
    from .isr import parse_ratios

    if args.isr_encoder is None and args.isr_decoder is None:
        return None
    setting = {"encoder": parse_ratios(args.isr_encoder, "--isr-encoder") if args.isr_encoder else None,
               "decoder": parse_ratios(args.isr_decoder, "--isr-decoder") if args.isr_decoder else None}
    for model in models:
        model.set_isr(**setting)
    return setting


def _pooling_text(pooling):
    """{"encoder": (16, 8, 2, 1), "decoder": (8, 4, 2)} -> "encoder 16,8,2,1; decoder 8,4,2"."""
    return "; ".join(f"{part} {','.join(map(str, r))}" for part, r in pooling.items() if r)


def _protocol(args, model):
    from .engine.evaluate import default_protocol

    protocol = default_protocol(model)
    if getattr(args, "ms", False):
        ms = protocol.get("ms") or dict(scales=[0.5, 0.75, 1.0, 1.25, 1.5, 1.75], flip=True)
        protocol.update(scales=list(ms["scales"]), flip=ms["flip"])
    for key in ("mode", "crop", "stride", "scales"):
        if getattr(args, key) is not None:
            protocol[key] = list(getattr(args, key)) if key != "mode" else args.mode
    if args.scale is not None:
        protocol["scale"] = list(args.scale)
    if args.flip:
        protocol["flip"] = True
    if protocol["mode"] == "slide" and not (protocol.get("crop") and protocol.get("stride")):
        raise SystemExit("transeg: error: --mode slide needs --crop and --stride")
    return protocol


def _device(name):
    from .engine.trainer import resolve_device

    return resolve_device(name)


# ----------------------------------------------------------------------------------------------- verbs
def cmd_models(args):
    from tqdm import tqdm

    from .flops import count_gmacs, count_params, meta_model
    from .registry import VARIANTS

    names = [n for n, v in VARIANTS.items() if args.family in (None, v.family)]
    rows = []
    for name in tqdm(names, desc="measuring on the meta device", leave=False, disable=not sys.stderr.isatty()):
        v = VARIANTS[name]
        model = meta_model(name, 150)
        size_key, paper_gflops = next(iter((v.paper.get("gflops") or {"512x512@150": None}).items()))
        measured = "-"
        if not args.no_flops:
            hw, k = size_key.split("@")
            measured = f"{count_gmacs(meta_model(name, int(k)) if int(k) != 150 else model, _size(hw), convention=v.paper.get('gflops_convention', 'mmcv'))['total']:.1f}"
        miou = v.paper.get("miou", {})
        rows.append([name, f"{count_params(model) / 1e6:.1f}", f"{v.paper.get('params_m') or '-'}", size_key, measured,
                     f"{paper_gflops if paper_gflops is not None else '-'}", " ".join(f"{d} {m}" for d, m in miou.items())])
    header = ["model", "params M", "paper", "GFLOPs at", "GFLOPs", "reported", "paper mIoU (single-scale)"]
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    for r in [header] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
    print("\nparams: this implementation, 150 classes (SegFormer, EDAFormer: without the authors' unused conv_seg layer; "
          "Segmenter: with the ImageNet head its checkpoints carry, as its README counts; SegViT, SeMask: the authors' modules); "
          "GFLOPs: multiply-adds incl. attention in each paper's convention (mmcv's counter; SegViT: fvcore's); reported: "
          "the paper's or README's table, or the authors' get_flops.py on their code where no table was available "
          "(EDAFormer)")


def cmd_train(args):
    from .engine import load_config, train

    given = dict(model=args.model, data=args.data, out=args.out, iters=args.iters, batch_size=args.batch_size,
                 amp=args.amp, device=args.device, workers=args.workers)
    quick = args.config is None and args.data is None and not any(s.startswith("data=") for s in args.set)
    # The quick start: settings that train the synthetic set well in minutes on a laptop CPU
    # (from scratch, so a higher lr and a short warm-up instead of the paper's ImageNet fine-tuning).
    cfg = load_config(args.config, args.set, **{**(QUICKSTART if quick else {}),
                                                **{k: v for k, v in given.items() if v is not None}})
    if args.batch_size is not None and not any(s.startswith("global_batch=") for s in args.set):
        cfg.global_batch = None  # an explicit per-process batch wins over the recipe's total
    result = train(cfg, resume="auto" if args.auto_resume else args.resume)
    out = Path(cfg.out)
    if result is not None and os.environ.get("RANK", "0") == "0":  # under torchrun, one line, not one per process
        print(f"mIoU {100 * result['mIoU']:.2f} ({result['protocol']}); model: {out / 'model.safetensors'}, "
              f"best: {out / 'best.safetensors'}, curves: {out / 'curves.png'}")


def cmd_eval(args):
    from . import load
    from .data import build_dataset
    from .engine import evaluate
    from .engine.metrics import format_table
    from .viz import iou_chart

    model = load(args.checkpoint)
    _apply_isr(args, model)
    device = _device(args.device)
    _optimize(args, model.to(device))
    spec = args.data if args.data is not None else model.meta.get("dataset")
    dataset = build_dataset(spec, args.split)
    if len(dataset.classes) != model.num_classes:
        from .errors import TransegError
        raise TransegError(f"{args.checkpoint}: a {model.num_classes}-class model cannot be evaluated on "
                           f"{spec} with {len(dataset.classes)} classes")
    protocol = _protocol(args, model)
    result = evaluate(model, dataset, protocol, device, max_samples=args.limit)
    print(f"{args.checkpoint} on {spec or 'synthetic'} ({args.split}, {len(dataset) if args.limit is None else min(args.limit, len(dataset))} images)")
    print(f"protocol: {result['protocol']}")
    print(format_table(result, list(dataset.classes)))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        iou_chart(result, list(dataset.classes), model.meta.get("palette") or dataset.palette,
                  title=f"{model.meta['variant']} — {result['protocol']}").save(out / "iou.png")
        print(f"per-class chart: {out / 'iou.png'}")


def _inputs(paths):
    from .data.folder import IMAGE_EXTENSIONS
    from .errors import TransegError

    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)
        elif p.is_file():
            files.append(p)
        else:
            raise TransegError(f"{p}: no such file or directory")
    if not files:
        raise TransegError(f"no images found in {', '.join(paths)}")
    return files


def cmd_predict(args):
    import numpy as np
    import torch
    from PIL import Image
    from tqdm import tqdm

    from . import load
    from .data.folder import conversion_note, load_image
    from .engine.evaluate import protocol_scores, test_transform
    from .data.palettes import default_palette
    from .isr import describe, effective_pooling
    from .viz import overlay

    model = load(args.checkpoint)
    if _apply_isr(args, model):
        print(f"{describe(model.isr)} (K/V pooling {_pooling_text(effective_pooling(model))})")
    device = _device(args.device)
    _optimize(args, model.to(device))
    protocol = _protocol(args, model)
    transform = test_transform(model, protocol)
    palette = [tuple(c) for c in (model.meta.get("palette") or default_palette(model.num_classes))]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = _inputs(args.inputs)
    used = set()
    for path in tqdm(files, desc="predict", disable=len(files) < 2):
        rgb = load_image(path)  # HxWx3 uint8, EXIF orientation applied
        image = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))
        x = transform(image).unsqueeze(0).to(device)
        with torch.no_grad():
            scores = protocol_scores(model, x, image.shape[-2:], protocol)
        label = scores.argmax(1)[0].to(torch.uint8).cpu().numpy()
        stem = path.stem  # outputs are named from the stem only, so they always land inside --out
        while stem in used:
            stem += "_"
        used.add(stem)
        mask = Image.fromarray(label, mode="P")
        mask.putpalette([v for c in palette for v in c] + [0] * (768 - 3 * len(palette)))
        mask.save(out / f"{stem}_mask.png")
        overlay(rgb, label, palette, alpha=args.alpha).save(out / f"{stem}_overlay.jpg", quality=92)
        counts = np.bincount(label.ravel(), minlength=model.num_classes)
        top = ", ".join(f"{model.classes[c]} {100 * counts[c] / label.size:.0f}%" for c in counts.argsort()[::-1][:3] if counts[c])
        note = conversion_note(path)
        tqdm.write(f"{path.name}{f' ({note})' if note else ''}: {top} -> {out / (stem + '_mask.png')}, "
                   f"{out / (stem + '_overlay.jpg')}")


def cmd_convert(args):
    from . import save
    from .convert import convert
    from .flops import count_params

    model = convert(args.src, args.from_format, model=args.model, num_classes=args.num_classes)
    if args.dst.suffix != ".safetensors":
        from .errors import TransegError
        raise TransegError(f"{args.dst}: the output must be a .safetensors file")
    save(model, args.dst)
    print(f"{args.src} -> {args.dst}: {model.meta['variant']}, {model.num_classes} classes, "
          f"{count_params(model):,} params" + (", class names from the source" if model.meta.get("classes") else ""))


def cmd_bench(args):
    import torch

    from . import load
    from .bench import environment, summarize, time_forward
    from .errors import TransegError
    from .flops import count_gmacs, count_params, meta_model
    from .isr import describe, effective_pooling, sweep_settings
    from .registry import create_model, get_variant

    dtype = _torch_dtype(args.dtype)
    autocast_dtype = dtype if args.autocast else torch.float32
    if args.compare and args.isr_sweep:
        raise TransegError("--compare and --isr-sweep are separate measurements; run them one at a time")
    is_checkpoint = Path(args.model).suffix == ".safetensors"
    if is_checkpoint:
        model = load(args.model)
        name = model.meta["variant"]
        shape_model = meta_model(name, **model.meta["model_args"])
    else:
        name = args.model
        model = create_model(name, num_classes=args.num_classes)
        shape_model = meta_model(name, args.num_classes)
    if args.data is not None and not (args.isr_sweep and is_checkpoint):
        raise TransegError("--data (accuracy per setting) needs --isr-sweep and a trained .safetensors checkpoint")
    if args.isr_sweep and (args.isr_encoder or args.isr_decoder):
        raise TransegError("--isr-sweep measures its own list of settings; leave out --isr-encoder/--isr-decoder")
    settings = sweep_settings(model) if args.isr_sweep else [_apply_isr(args, model) and model.isr]
    dataset = _sweep_dataset(args, model) if args.data is not None else None
    flops_convention = args.flops or get_variant(name).paper.get("gflops_convention", "mmcv")
    device = _device(args.device)
    env = environment(device)
    h, w = args.size
    precision = args.dtype + ("" if args.dtype == "fp32" else " (autocast)" if args.autocast else " (native weights)")
    precision += ", compiled" if args.compile else ""
    print(f"{name}: {count_params(model) / 1e6:.2f}M params, input {h}x{w}, batch {args.batch}")
    print(f"device {env['device']}, {env['threads']} threads, torch {env['torch']}, {precision}, "
          f"{args.warmup} warm-up + {args.runs} timed runs (median)")
    if args.compare:
        return _compare_hf(args, name, model.num_classes, device, autocast_dtype)
    _optimize(args, model.to(device))
    rows = []
    for setting in settings:
        if setting:
            model.set_isr(**setting)
            shape_model.set_isr(**setting)
        row = {"setting": describe(model.isr), "pooling": effective_pooling(model),
               "label": " / ".join(",".join(map(str, r)) for r in model.isr.values() if r),
               "GFLOPs": count_gmacs(shape_model, args.size, convention=flops_convention)["total"]}
        t = summarize(time_forward(model, args.size, args.batch, device, autocast_dtype, args.warmup, args.runs))
        row["latency ms"] = t["median_ms"]
        if dataset is not None:
            from .engine import evaluate
            row["mIoU"] = 100 * evaluate(model, dataset, device=device, progress=False, max_samples=args.limit)["mIoU"]
        rows.append(row)
        if args.isr_sweep:
            _print_bench_row(row, rows[0], args.batch)
        else:
            isr = "" if row["setting"] == "no ISR" else f", {row['setting']} (K/V pooling {_pooling_text(row['pooling'])})"
            print(f"{row['GFLOPs']:.2f} GFLOPs (multiply-adds, {flops_convention} convention){isr}")
            print(f"latency median {t['median_ms']:.1f} ms (min {t['min_ms']:.1f}), "
                  f"throughput {1000 * args.batch / t['median_ms']:.1f} images/s")
    if args.isr_sweep:
        from .viz import tradeoff_chart

        plot = Path(args.plot)
        plot.parent.mkdir(parents=True, exist_ok=True)
        title = f"{name}: ISR encoder / decoder ratios, {h}x{w} {args.dtype}" + (f", mIoU on {args.data}" if dataset else "")
        tradeoff_chart(rows, title=title).save(plot)
        print(f"trade-off chart: {plot}")


def _compare_hf(args, name, num_classes, device, autocast_dtype):
    """`bench --compare hf`: transeg and HF SegFormer on the same random weights, timed in turn within
    each round; logits checked equal first."""
    import statistics

    import torch

    from .bench import hf_segformer_peer, time_interleaved

    ours, hf = hf_segformer_peer(name, num_classes)
    ours, hf = ours.to(device), hf.to(device)
    x = torch.randn(args.batch, 3, *args.size, device=device)
    with torch.inference_mode():
        diff = (ours(x) - hf(pixel_values=x).logits).abs().max().item()
    _optimize(args, ours)
    low = _torch_dtype(args.dtype)

    def run(model, autocast_to, hf_call=False):
        def call():
            with torch.inference_mode(), torch.autocast(device.type, dtype=autocast_to, enabled=autocast_to != torch.float32):
                return model(pixel_values=x) if hf_call else model(x)
        return call

    fns = {"HF fp32": run(hf, torch.float32, True)}
    if args.dtype != "fp32":
        fns[f"HF {args.dtype} (autocast)"] = run(hf, low, True)
    fns[f"transeg {args.dtype}"] = run(ours, autocast_dtype)
    times = {k: statistics.median(v) * 1e3 for k, v in time_interleaved(fns, device, args.warmup, args.runs).items()}
    print(f"fp32 logits: max |transeg - HF| = {diff:.1e} (same weights)")
    for k, ms in times.items():
        print(f"{k:24s} {ms:8.1f} ms  {1000 * args.batch / ms:6.1f} images/s  {times['HF fp32'] / ms:5.2f}x HF fp32")


def _sweep_dataset(args, model):
    from .data import build_dataset
    from .errors import TransegError

    dataset = build_dataset(args.data, args.split)
    if len(dataset.classes) != model.num_classes:
        raise TransegError(f"{args.model}: a {model.num_classes}-class model cannot be evaluated on {args.data} "
                           f"with {len(dataset.classes)} classes")
    return dataset


def _print_bench_row(row, base, batch):
    """One sweep line: the setting, its K/V reductions, cost and speed relative to the trained setting."""
    def rel(key):
        return f" ({100 * (row[key] / base[key] - 1):+5.1f}%)"

    pooling = _pooling_text(row["pooling"])
    line = f"{row['setting']:<35}" + (f" pooling {pooling:<34}" if pooling else "")
    line += f" {row['GFLOPs']:8.2f} GFLOPs{rel('GFLOPs')}  {row['latency ms']:8.1f} ms{rel('latency ms')}"
    line += f"  {1000 * batch / row['latency ms']:7.1f} img/s"
    if "mIoU" in row:
        line += f"  mIoU {row['mIoU']:.2f} ({row['mIoU'] - base['mIoU']:+.2f})"
    print(line)


def cmd_export(args):
    from . import load
    from .backbones.swin import SwinTransformer
    from .errors import TransegError
    from .export import export_onnx

    if args.out.suffix != ".onnx":
        raise TransegError(f"{args.out}: the output must be an .onnx file")
    model = load(args.checkpoint)
    _apply_isr(args, model)
    shape = "one image of exactly that size" if args.static else "dynamic batch/height/width"
    if not args.static and isinstance(model.backbone, SwinTransformer):  # every stage's window padding is symbolic
        shape += " (a Swin trace takes a minute or two; --static takes seconds)"
    print(f"exporting {model.meta['variant']} ({args.checkpoint}) to {args.out}, traced at {args.size[0]}x{args.size[1]}, "
          f"{shape} ...", flush=True)
    r = export_onnx(model, args.out, sample_size=args.size, opset=args.opset, check=not args.no_check,
                    static=args.static)
    where = "two fresh inputs" if args.static else "two other input shapes"
    check = (f"; onnxruntime vs PyTorch on {where}: max |diff| {r['max_abs_diff']:.1e}" if "max_abs_diff" in r else "")
    print(f"{r['path']}: opset {r['opset']}, {r['bytes'] / 1e6:.1f} MB, {r['isr']}{check}")


def cmd_data_prepare(args):
    from .data.prepare import prepare

    report = prepare(args.name, args.raw, args.out, progress=True)
    print(f"{args.name}: {report['masks']} label maps written under {args.out}; "
          f"train with --data {args.out} (the layout is recognised)")


def cmd_data_check(args):
    import numpy as np

    from .data import build_dataset

    dataset = build_dataset(args.dir, args.split)
    s = dataset.check(progress=True, decode_images=not args.fast)
    total = max(s["total_pixels"], 1)
    print(f"{dataset!r}")
    print(f"{s['num_images']} image/mask pairs, sizes {s['min_size'][1]}x{s['min_size'][0]} .. "
          f"{s['max_size'][1]}x{s['max_size'][0]} (WxH); raw label values: {_ranges(s['label_values'])}")
    print(f"ignored: {100 * s['ignore_pixels'] / total:.1f}% of pixels")
    order = np.argsort(s["class_pixels"])[::-1]
    print(f"{'class':24s} {'pixels %':>9s} {'images':>7s}")
    for i in order:
        if s["class_pixels"][i]:
            print(f"{s['classes'][i][:24]:24s} {100 * s['class_pixels'][i] / total:9.3f} {s['class_images'][i]:7d}")
    if s["absent_classes"]:
        print(f"classes with no pixel in this split: {', '.join(s['absent_classes'])}")
    print("all masks match their images and hold only allowed values")


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


# ----------------------------------------------------------------------------------------------- parser
QUICKSTART = dict(model="segformer-b0", iters=2500, batch_size=8, lr=1e-3, warmup_iters=100, ratio_range=[0.75, 1.5],
                  amp="auto", workers=0, eval_interval=500, ckpt_interval=500, log_interval=25, out="runs/train")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="transeg", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
        description="Transformer semantic segmentation: SegFormer, EDAFormer, Segmenter, SegViT and SeMask-FPN. "
                    "Every verb runs without downloads: with no --data, the built-in synthetic dataset is used.")
    parser.add_argument("--version", action="version", version=f"transeg {__import__('transeg').__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")

    def verb(name, fn, help_, description=None):
        p = sub.add_parser(name, help=help_, description=description or help_,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(fn=fn)
        return p

    p = verb("models", cmd_models, "list model variants with the papers' and the measured params / GFLOPs")
    p.add_argument("--family", help="only this family, e.g. segformer")
    p.add_argument("--no-flops", action="store_true", help="skip counting GFLOPs (faster)")

    p = verb("train", cmd_train, "train a model (default: segformer-b0 on the built-in synthetic set)",
             "Train a model. With no CONFIG and no --data this runs the quick start: segformer-b0 from scratch on the\n"
             "built-in synthetic set, 2500 iterations of 8 images (bf16 where the CPU/GPU has it), ~9 minutes on 2 CPU cores.\n"
             "Writes to --out: model.safetensors (latest), best.safetensors, train_state.pt (for --resume),\n"
             "log.jsonl, config.yaml (the resolved settings), curves.png and val_iou.png.")
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
    p.add_argument("--workers", type=int, help="data-loading processes")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its train_state.pt")
    p.add_argument("--auto-resume", action="store_true",
                   help="continue the run in --out if there is one, else start it (for torchrun --max-restarts)")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set lr=1e-4 crop_size=[256,256] warmup_iters=0")

    p = verb("eval", cmd_eval, "measure mIoU / mAcc / aAcc of a checkpoint on a dataset")
    p.add_argument("checkpoint", type=Path, help="a transeg .safetensors")
    p.add_argument("--data", help="dataset folder (default: the data the model was trained on)")
    p.add_argument("--split", default="val", help="split folder to use (default val)")
    p.add_argument("--limit", type=int, help="only the first N images")
    p.add_argument("--out", help="also write the per-class IoU chart iou.png here")
    _add_protocol_args(p)
    _add_speed_args(p)
    _add_isr_args(p)

    p = verb("predict", cmd_predict, "segment images: writes index-PNG masks and colour overlays")
    p.add_argument("checkpoint", type=Path, help="a transeg .safetensors")
    p.add_argument("inputs", nargs="+", help="image files or folders of images")
    p.add_argument("--out", required=True, help="output folder (nothing is written outside it)")
    p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity (default 0.5)")
    _add_protocol_args(p)
    _add_speed_args(p)
    _add_isr_args(p)

    from .convert import FORMATS
    p = verb("convert", cmd_convert, "convert a foreign checkpoint into a transeg .safetensors",
             "Convert a foreign checkpoint. Files are read without running pickled code.\nformats:\n"
             + "\n".join(f"  {k:14s}{v}" for k, v in FORMATS.items()))
    p.add_argument("src", type=Path, help="the foreign checkpoint file or directory")
    p.add_argument("dst", type=Path, help="output .safetensors")
    p.add_argument("--from", dest="from_format", required=True, choices=sorted(FORMATS), help="source format")
    p.add_argument("--model", help="variant name (default: recognised from the weights)")
    p.add_argument("--num-classes", type=int, help="expected class count (checked)")

    p = verb("bench", cmd_bench, "params, GFLOPs and latency of a model or checkpoint")
    p.add_argument("model", help="variant name or a .safetensors checkpoint")
    p.add_argument("--size", type=_size, default=(512, 512), help="input HxW (default 512x512)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--num-classes", type=int, default=150)
    p.add_argument("--runs", type=int, default=10, help="timed runs (median reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cpu")
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

    from .data import prepare as prepare_module
    p = verb("data", None, "prepare a benchmark dataset, or check a dataset folder",
             "Datasets: ADE20K, Cityscapes, COCO-Stuff 164k / 10k and Pascal Context are read in their official\n"
             "layouts (give the folder to --data, or NAME:PATH, e.g. --data cityscapes:/data/cityscapes); any other\n"
             "folder with images/, masks/ and classes.txt is a dataset of your own.")
    dsub = p.add_subparsers(dest="data_verb", metavar="ACTION", required=True)
    d = dsub.add_parser("prepare", help="one-off conversion of a downloaded benchmark",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description=prepare_module.__doc__)
    d.set_defaults(fn=cmd_data_prepare)
    d.add_argument("name", choices=sorted(prepare_module.PREPARE), help="which dataset")
    d.add_argument("raw", type=Path, help="the downloaded (extracted) dataset folder")
    d.add_argument("out", type=Path, help="output folder (may be the same as RAW)")
    d = dsub.add_parser("check", help="scan a dataset: sizes, label values, class frequencies, bad pairs")
    d.set_defaults(fn=cmd_data_check)
    d.add_argument("dir", help="dataset folder (or NAME:PATH)")
    d.add_argument("--split", default="train", help="split to scan (default train)")
    d.add_argument("--fast", action="store_true", help="read image headers only (skip full decoding)")

    p = verb("export", cmd_export, "export a checkpoint to ONNX (dynamic batch, height, width), checked by onnxruntime",
             "Export to ONNX: input `image` [N,3,H,W] normalised with the mean/std in the file's metadata, output\n"
             "`logits` [N,K,H/s,W/s] at the head's stride. Class names, palette, mean/std and the ISR setting are stored\n"
             "in metadata_props['transeg']. Needs the onnx extra: pip install 'transeg[onnx]'.")
    p.add_argument("checkpoint", type=Path, help="a transeg .safetensors")
    p.add_argument("out", type=Path, help="output .onnx (written only after the check passes)")
    p.add_argument("--size", type=_size, default=(256, 256), help="input HxW to trace with (default 256x256)")
    p.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime comparison")
    p.add_argument("--static", action="store_true", help="a graph for one image of exactly --size: traces in "
                   "seconds where a dynamic SeMask (Swin) trace takes minutes, and some runtimes want fixed shapes")
    _add_isr_args(p)
    return parser


def main(argv=None):
    from .errors import TransegError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "fn", None):
        parser.print_help()
        return 0
    if args.verb in ("train", "eval", "predict", "bench"):
        from .bench import keep_freed_memory

        keep_freed_memory()  # large activations reuse memory instead of page-faulting fresh pages
    try:
        args.fn(args)
    except TransegError as e:
        print(f"transeg: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("transeg: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
