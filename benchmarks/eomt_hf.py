"""transeg EoMT against Hugging Face transformers' EoMT: same weights, same process, same threads.

The authors give EoMT's speed as frames per second of one network forward (batch 1, random inputs of the
crop size, torch.compile on an H100): 92 FPS for EoMT-L DINOv2 at 512x512 (ADE20K), 25 at 1024x1024
(Cityscapes), 137 (default compile) / 200 (max-autotune) for EoMT-L DINOv3 at 512x512 (tue-mps/eomt
model_zoo/dinov2.md, dinov3.md). This script times the same forward (the ViT with its queries and the mask
module: mask and class logits, no post-processing) for:

- HF `EomtForUniversalSegmentation` / `EomtDinov3ForUniversalSegmentation` in fp32, under bf16 autocast, and
  (--compile) torch.compile'd under bf16 autocast;
- transeg in fp32, with native bf16 weights (`optimize_for_inference(torch.bfloat16)`), and (--compile)
  native bf16 compiled with weight freezing (`optimize_for_inference(torch.bfloat16, compile=True)`).

Within every round each contender runs once in turn (transeg.bench.time_interleaved). Before timing, transeg's
fp32 mask logits are compared with HF's (max |diff|) and each low-precision contender's mask argmax with fp32's,
so a fast wrong model cannot pass. HF's model is built at the variant's shapes with random weights, saved and
converted with `transeg convert --from eomt` (the converter under test is what makes the two equal), with
masked attention off as in the released checkpoints (HF builds it on; it thresholds masks, so float rounding
could flip a few and the check would measure that instead).

    python benchmarks/eomt_hf.py --device cuda --compile                 # EoMT-L DINOv2 and DINOv3 at 512x512
    python benchmarks/eomt_hf.py --models eomt-dinov2-l16-cityscapes --device cuda --compile
    python benchmarks/eomt_hf.py --tiny --runs 3                         # a CPU smoke run on a 4-block model
"""
import argparse
import copy
import statistics
import tempfile

import torch

from transeg.bench import environment, time_interleaved

AUTHORS_FPS = {"eomt-dinov2-l16": "92 (H100, torch.compile)", "eomt-dinov2-l16-cityscapes": "25 (H100, torch.compile)",
               "eomt-dinov3-l16": "137 / 200 (H100, torch.compile default / max-autotune)"}
TINY = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256, num_queries=10,
            num_blocks=2)


def peer(name, num_classes, tiny, folder):
    """(transeg model, HF model) with the same random weights, both eval, via `transeg.convert`."""
    import transformers

    from transeg.convert import convert
    from transeg.registry import get_variant

    args = get_variant(name).arguments()
    dinov3 = args.get("rope_theta") is not None
    shapes = TINY if tiny else dict(hidden_size=args["embed_dim"], num_hidden_layers=args["depth"],
                                    num_attention_heads=args["num_heads"], intermediate_size=4 * args["embed_dim"],
                                    num_queries=args["num_queries"], num_blocks=args["query_blocks"])
    common = dict(shapes, image_size=args["crop"], patch_size=args["patch_size"], num_labels=num_classes,
                  num_register_tokens=args["num_register_tokens"], layer_norm_eps=args["norm_eps"])
    torch.manual_seed(0)
    if dinov3:
        hf = transformers.EomtDinov3ForUniversalSegmentation(transformers.EomtDinov3Config(**common))
    else:
        hf = transformers.EomtForUniversalSegmentation(transformers.EomtConfig(**common))
    hf.attn_mask_probs.zero_()  # the released state: masked attention annealed away (HF builds it at 1, on)
    hf.save_pretrained(folder)
    return convert(folder, "eomt", model=name).eval(), hf.eval()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="eomt-dinov2-l16,eomt-dinov3-l16", help="comma-separated EoMT variants")
    ap.add_argument("--num-classes", type=int, default=150)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtypes", default="fp32,bf16", help="fp32 and/or bf16 (bf16 is emulated, slow, on CPUs "
                    "without AVX512-BF16 / AMX)")
    ap.add_argument("--compile", action="store_true", help="also time the compiled contenders (minutes to compile)")
    ap.add_argument("--tiny", action="store_true", help="a 4-block width-64 model at the variant's crop (smoke run)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    env = environment(device)
    print(f"# transeg EoMT vs Hugging Face transformers {__import__('transformers').__version__} — {env['device']}, "
          f"{env['threads']} threads, torch {env['torch']}, batch {args.batch}, {args.num_classes} classes, median of "
          f"{args.runs} interleaved runs after {args.warmup} warm-up" + (" (tiny model)" if args.tiny else "") + "\n")
    for name in args.models.split(","):
        with tempfile.TemporaryDirectory() as folder:
            ours, hf = peer(name, args.num_classes, args.tiny, folder)
        ours, hf = ours.to(device), hf.to(device)
        crop = ours.protocol.crop[0] if ours.protocol and ours.protocol.crop else 512
        x = torch.randn(args.batch, 3, crop, crop, device=device)
        xb = x.to(torch.bfloat16)  # native bf16 weights take bf16 inputs (Segmentor.logits casts them on entry)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16)
        ours_bf16 = copy.deepcopy(ours).optimize_for_inference(torch.bfloat16) if "bf16" in args.dtypes else None

        def hf_bf16(model=hf):
            with autocast:
                return model(pixel_values=x).masks_queries_logits

        fns = {"HF fp32": lambda: hf(pixel_values=x).masks_queries_logits,
               "transeg fp32": lambda: ours.decode_head.decode(ours.backbone(x))["pred_masks"]}
        if "bf16" in args.dtypes.split(","):
            fns["HF bf16 (autocast)"] = hf_bf16
            fns["transeg bf16 (native)"] = lambda: ours_bf16.decode_head.decode(ours_bf16.backbone(xb))["pred_masks"]
        if args.compile:
            hf_compiled = torch.compile(hf)
            ours_compiled = copy.deepcopy(ours).optimize_for_inference(torch.bfloat16, compile=True)
            fns["HF bf16 compiled"] = lambda: hf_bf16(hf_compiled)
            fns["transeg bf16 compiled"] = lambda: ours_compiled.decode_head.decode(
                ours_compiled.backbone(xb))["pred_masks"]
        print(f"## {name} at {crop}x{crop} — the authors' FPS: {AUTHORS_FPS.get(name, '-')}\n")
        print("| contender | latency ms | FPS | speed-up vs HF fp32 | check |")
        print("|---|---|---|---|---|")
        with torch.inference_mode():
            ref = hf(pixel_values=x).masks_queries_logits.float()
            checks = {}
            for label, fn in fns.items():
                out = fn().float()
                checks[label] = (f"mask logits: max abs diff vs HF {(out - ref).abs().max().item():.1e} "
                                 f"(of max {ref.abs().max().item():.1e})" if "fp32" in label
                                 else f"mask > 0 = fp32's on {100 * ((out > 0) == (ref > 0)).float().mean().item():.1f}%")
            times = time_interleaved(fns, device, args.warmup, args.runs)
        base = statistics.median(times["HF fp32"])
        for label, t in times.items():
            ms = statistics.median(t) * 1e3
            print(f"| {label} | {ms:.1f} | {1000 * args.batch / ms:.1f} | {base * 1e3 / ms:.2f}x | {checks[label]} |",
                  flush=True)
        print()


if __name__ == "__main__":
    main()
