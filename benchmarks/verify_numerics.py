"""Numerics verification: the fused kernels against the fp64 reference, on the default device.

On a CUDA machine the compiled Triton kernels run; elsewhere the same kernels run on CPU
tensors through the Triton interpreter (set up here, before lorakernels is imported).
For every dtype and dropout rate it reports the relative error of y, dx, dA and dB next
to plain PyTorch's at the same precision, checks them with the test suite's error rule,
and reports the activation bytes saved for backward against the PEFT-style path.
Writes numerics.json and numerics.md to --output-dir: by default benchmarks/results/local/<gpu|cpu>,
which git ignores, so that a run leaves the committed tables alone (those are regenerated with an
explicit --output-dir benchmarks/results). Exits 1 if any check fails.

    python -m benchmarks.verify_numerics [--output-dir DIR] [--device cpu|cuda]
"""

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path


def _parse(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.verify_numerics", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default=None, help="where numerics.{json,md} go; default: "
                        "benchmarks/results/local/<gpu|cpu> (ignored by git; the committed tables are regenerated "
                        "with --output-dir benchmarks/results)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    return parser.parse_args(argv)


def default_output_dir(device):
    """Where a run on `device` ("cpu" or "cuda") writes without --output-dir: the directory git ignores
    that `python -m benchmarks` writes to as well (benchmarks/results/.gitignore)."""
    return Path(__file__).resolve().parent / "results" / "local" / ("gpu" if device == "cuda" else "cpu")


def _dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def _nf4(weight, device):
    """(W quantized to NF4 by bitsandbytes, blocksize 64, double quantization, as an
    `operands.FourBitWeight` on `device`; W dequantized in W's dtype: the weight the kernels use)."""
    import bitsandbytes.functional as bnbf

    from lorakernels.operands import FourBitWeight

    codes, state = bnbf.quantize_4bit(weight.cpu(), blocksize=64, quant_type="nf4", compress_statistics=True)
    base = FourBitWeight.from_bitsandbytes(codes, state).to(device)
    return base, base.dequantize(weight.dtype)


def _error_rows(torch, testing, lora_linear, shape, dtype, adapter_dtype, p, device, four_bit=False):
    """The relative errors of y, dx, dA, dB for one case, each checked with the error rule.
    four_bit: W in NF4 (`_nf4`), the reference on its dequantized values."""
    M, K, N, r = shape
    x, weight, bias, lora_A, lora_B = testing.make_inputs(M, K, N, r, dtype, adapter_dtype, device=device)
    base = weight
    if four_bit:
        base, weight = _nf4(weight, device)
    leaves = [t.clone().requires_grad_() for t in (x, lora_A, lora_B)]
    rng_state = torch.get_rng_state()
    y = lora_linear(leaves[0], base, bias, leaves[1], leaves[2], 0.5, p, backend="triton")
    keep = testing.replay_keep_mask(rng_state, M, K, p, "triton", device)
    dy = torch.randn_like(y)
    y.backward(dy)
    ref = testing.reference_grads(x, weight, bias, lora_A, lora_B, 0.5, keep, p, dy.double(), True)
    low = testing.reference_grads(x, weight, bias, lora_A, lora_B, 0.5, keep, p, dy, False)
    checks = zip(("y", "dx", "dA", "dB"), [y.detach()] + [t.grad for t in leaves], [ref[0]] + ref[1],
                 [low[0]] + low[1])
    return _checked_rows(testing, checks, dtype, dict(base="nf4" if four_bit else "dense", dtype=_dtype_name(dtype),
                                                      adapter_dtype=_dtype_name(adapter_dtype), dropout=p))


def _checked_rows(testing, checks, dtype, tags):
    """One row per (tensor name, result, fp64 reference, PyTorch at x's precision) in `checks`: the
    relative errors of the result and of PyTorch, and the error rule's verdict; `tags` on every row."""
    rows = []
    for name, actual, exp64, lowp in checks:
        scale = exp64.abs().max().item()
        err = testing.max_error(actual, exp64)
        rows.append(dict(tags, tensor=name, rel_err=err / scale, torch_rel_err=testing.max_error(lowp, exp64) / scale,
                         ok=err <= testing.error_bound(exp64, lowp, dtype)))
    return rows


def _saved_bytes(torch, testing, lorakernels, shape, dtype, adapter_dtype, p, device):
    """Activation bytes autograd keeps for LoRALinear and for the PEFT-style reference."""
    M, K, N, r = shape
    layer = lorakernels.LoRALinear(K, N, r=r, lora_dropout=p, dtype=dtype, adapter_dtype=adapter_dtype, device=device)
    x = torch.randn(M, K, dtype=dtype, device=device, requires_grad=True)
    params = list(layer.parameters())
    fused, _ = testing.saved_activation_bytes(lambda: layer(x), params)
    keep = testing.ops.torch_keep_mask(0, M, K, p, device) if p else None
    unfused, _ = testing.saved_activation_bytes(
        lambda: lorakernels.lora_linear_ref(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling,
                                            keep, p), params)
    return dict(dtype=_dtype_name(dtype), adapter_dtype=_dtype_name(adapter_dtype), dropout=p, fused_bytes=fused,
                peft_style_bytes=unfused, x_bytes=x.numel() * x.element_size())


def _segmented_error_rows(torch, testing, lorakernels, shape, dtype, p, device):
    """Several adapters in one batch (ranks 4, 8, 16, scalings 0.5, 2, 1; rows unsorted, some on the
    base alone): relative errors of y, dx and each adapter's dA, dB against the fp64 reference."""
    M, K, N, _ = shape
    x, weight, bias, _, _ = testing.make_inputs(M, K, N, 4, dtype, torch.float32, device=device)
    adapters = [((torch.randn(r, K, device=device) / K**0.5).requires_grad_(),
                 (torch.randn(N, r, device=device) * 0.5).requires_grad_(), s)
                for r, s in ((4, 0.5), (8, 2.0), (16, 1.0))]
    index = torch.randint(-1, 3, (M,), device=device)
    leaf = x.clone().requires_grad_()
    rng_state = torch.get_rng_state()
    y = lorakernels.lora_linear_segmented(leaf, weight, bias, adapters, index, p, backend="triton")
    keep = testing.replay_keep_mask(rng_state, M, K, p, "triton", device)
    dy = torch.randn_like(y)
    y.backward(dy)
    refs = {}
    for upcast in (True, False):
        xr = (x.double() if upcast else x.clone()).requires_grad_()
        ad = [((A.detach().double() if upcast else A.detach().to(dtype)).requires_grad_(),
               (B.detach().double() if upcast else B.detach().to(dtype)).requires_grad_(), s) for A, B, s in adapters]
        out = lorakernels.lora_linear_segmented_ref(xr, weight, bias, ad, index, keep, p, upcast=upcast)
        out.backward(dy.to(out.dtype))
        refs[upcast] = [("y", out.detach()), ("dx", xr.grad)] + [
            (f"{part}[{a}]", t.grad) for a, (A, B, _) in enumerate(ad) for part, t in (("dA", A), ("dB", B))]
    got = [y.detach(), leaf.grad] + [t.grad for A, B, _ in adapters for t in (A, B)]
    checks = [(name, actual, exp64, lowp) for actual, (name, exp64), (_, lowp) in zip(got, refs[True], refs[False])]
    return _checked_rows(testing, checks, dtype, dict(base="segmented", dtype=_dtype_name(dtype),
                                                      adapter_dtype="float32", dropout=p))


def _error_table(rows):
    lines = ["| x dtype | adapters | p | tensor | lorakernels rel. err | "
             "PyTorch rel. err, x's dtype (autocast-style) | ok |",
             "|---|---|---|---|---|---|---|"]
    return lines + [f"| {r['dtype']} | {r['adapter_dtype']} | {r['dropout']} | {r['tensor']} | {r['rel_err']:.2e} | "
                    f"{r['torch_rel_err']:.2e} | {'yes' if r['ok'] else 'NO'} |" for r in rows]


def _markdown(env, shape, rows, saved):
    lines = [f"Numerics on {env['device']}, torch {env['torch']}, triton {env['triton']}, "
             f"(M, K, N, r) = {shape}, scaling 0.5. Relative error = max|err| / max|fp64 reference|.", ""]
    lines += _error_table([r for r in rows if r["base"] == "dense"])
    four_bit = [r for r in rows if r["base"] == "nf4"]
    lines += ["", "QLoRA: W quantized to NF4 by bitsandbytes (blocksize 64, double quantization; K = "
              f"{shape[1]}, so blocks straddle rows), the kernels dequantizing its tiles in registers; the "
              "reference uses the same dequantized W (in x's dtype, as the kernels), so the errors are the "
              "kernels' alone, not the quantization's.", ""]
    lines += _error_table(four_bit) if four_bit else ["(bitsandbytes is not installed: not measured)"]
    lines += ["", "Several adapters in one batch (`lora_linear_segmented`): ranks 4, 8 and 16 with scalings 0.5, 2 "
              "and 1, fp32 adapters, each row's adapter drawn at random from the three or none; dA[i] and dB[i] are "
              "adapter i's gradients.", ""]
    lines += _error_table([r for r in rows if r["base"] == "segmented"])
    lines += ["", "Activation bytes saved for backward (parameters excluded), M x K x-bytes = "
              f"{saved[0]['x_bytes']}:", "", "| x dtype | adapters | p | lorakernels | PEFT-style | ratio |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {s['dtype']} | {s['adapter_dtype']} | {s['dropout']} | {s['fused_bytes']} | {s['peft_style_bytes']} |"
              f" {s['peft_style_bytes'] / s['fused_bytes']:.2f}x |" for s in saved]
    return "\n".join(lines)


def main(argv=None):
    args = _parse(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are decorated
    import triton

    import lorakernels
    from benchmarks.harness import installed
    from lorakernels import testing

    # Small shapes on the interpreter (it is slow); GPU shapes span several tiles.
    shape = (512, 1024, 768, 16) if device == "cuda" else (96, 80, 72, 16)
    torch.manual_seed(0)
    rows = [row for dtype in (torch.float32, torch.float16, torch.bfloat16)
            for adapter_dtype in sorted({dtype, torch.float32}, key=str) for p in (0.0, 0.1)
            for row in _error_rows(torch, testing, lorakernels.lora_linear, shape, dtype, adapter_dtype, p, device)]
    if installed("bitsandbytes"):  # QLoRA: fp32 adapters (PEFT's default) over each compute dtype
        rows += [row for dtype in (torch.float32, torch.float16, torch.bfloat16) for p in (0.0, 0.1)
                 for row in _error_rows(torch, testing, lorakernels.lora_linear, shape, dtype, torch.float32, p,
                                        device, four_bit=True)]
    rows += [row for dtype in (torch.float32, torch.bfloat16) for p in (0.0, 0.1)
             for row in _segmented_error_rows(torch, testing, lorakernels, shape, dtype, p, device)]
    saved = [_saved_bytes(torch, testing, lorakernels, shape, dtype, adapter_dtype, p, device)
             for dtype, adapter_dtype, p in ((torch.bfloat16, torch.float32, 0.0), (torch.bfloat16, torch.float32, 0.1),
                                             (torch.bfloat16, torch.bfloat16, 0.1))]
    env = dict(device=torch.cuda.get_device_name() if device == "cuda" else f"cpu ({platform.processor() or 'cpu'}), "
               "Triton interpreter", torch=torch.__version__, triton=triton.__version__, shape_MKNr=shape,
               timestamp=time.strftime("%Y-%m-%dT%H:%M:%S"))
    out_dir = Path(args.output_dir) if args.output_dir else default_output_dir(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "numerics.json").write_text(json.dumps(dict(env=env, errors=rows, saved_bytes=saved), indent=1))
    text = _markdown(env, shape, rows, saved)
    (out_dir / "numerics.md").write_text(text + "\n")
    print(text)
    failures = sum(not row["ok"] for row in rows)
    print(f"\n{len(rows) - failures} passed, {failures} failed; wrote {out_dir}/numerics.json, numerics.md")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
