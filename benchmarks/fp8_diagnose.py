"""Where do the fp8 quantizers differ between the GPU kernel, torch on the CPU and exact rounding?

    python benchmarks/fp8_diagnose.py

Prints, per check, the number of differing codes and the first few elements (input, scale, quotient,
kernel code, torch code, exactly rounded code). Exact rounding is computed in float64 with numpy-free
torch arithmetic: the e4m3 grid step of |q| is 2**(floor(log2|q|) - 3), at least 2**-9.
"""

from __future__ import annotations

import torch

from qconvert import kernels
from qconvert import quantizers as Q


def exact_codes(q: torch.Tensor) -> torch.Tensor:
    """float32 quotients (already clamped) → e4m3fn bit patterns, rounded exactly (float64 on the CPU)."""
    d = q.double().cpu()
    a = d.abs()
    e = torch.floor(torch.log2(torch.where(a > 0, a, torch.ones_like(a)))).clamp(min=-6)
    step = torch.pow(2.0, e - 3)
    r = torch.round(a / step) * step  # torch.round is half-to-even
    r = torch.where(torch.signbit(d), -r, r)
    return r.to(torch.float8_e4m3fn).view(torch.uint8)  # exact grid values convert exactly


def show(name: str, got: torch.Tensor, ref: torch.Tensor, exact: torch.Tensor, extra: dict) -> None:
    got, ref, exact = got.view(torch.uint8).cpu().flatten(), ref.view(torch.uint8).cpu().flatten(), exact.flatten()
    bad = (got != ref).nonzero().flatten()
    print(f"{name}: {bad.numel()} of {got.numel()} differ (kernel vs torch-cpu); kernel vs exact "
          f"{(got != exact).sum().item()}, torch-cpu vs exact {(ref != exact).sum().item()}")
    for i in bad[:8].tolist():
        cols = ", ".join(f"{k}={v.flatten()[i].item()!r}" for k, v in extra.items())
        print(f"   [{i}] kernel=0x{got[i].item():02x} torch=0x{ref[i].item():02x} exact=0x{exact[i].item():02x} {cols}")


def main() -> None:
    print(torch.__version__, torch.cuda.get_device_name(), torch.backends.cpu.get_cpu_capability())
    g = torch.Generator().manual_seed(0)
    # 1. torch's own float32 -> e4m3fn casts against exact rounding (CPU and CUDA).
    q = (torch.randn(1 << 22, generator=g) * torch.exp(torch.randn(1 << 22, generator=g) * 3)).clamp(-448, 448)
    exact = exact_codes(q)
    show("torch cpu cast", q.to(torch.float8_e4m3fn), q.to(torch.float8_e4m3fn), exact, {"q": q})
    show("torch cuda cast vs cpu", q.cuda().to(torch.float8_e4m3fn), q.to(torch.float8_e4m3fn), exact, {"q": q})
    # 2. Activation quantization, per token per 128 and per token, bf16 in.
    for shape, group in (((128, 4096), 128), ((128, 4096), 10**9), ((4097, 4096), 128)):
        x = (torch.randn(shape, generator=g) * 3).to(torch.bfloat16)
        values, scales = kernels.quantize_activations(x.cuda(), group, "float")
        ref_values, ref_scales = Q.quantize_activation_groups(x, group, "float")
        gsz = min(group, shape[1])
        quot = (x.float().reshape(shape[0], -1, gsz) / ref_scales.unsqueeze(2)).reshape(shape).clamp(-448, 448)
        print(f"  scales equal: {torch.equal(scales.cpu(), ref_scales)}")
        show(f"activations {shape} group {group}", values, ref_values, exact_codes(quot),
             {"x": x.float(), "quotient": quot, "scale": ref_scales.repeat_interleave(gsz, 1)[:, : shape[1]]})
    # 3. Static per-tensor scale.
    x = (torch.randn(16, 4096, generator=g) * 3).to(torch.bfloat16)
    s = (x.float().abs().amax() / 448).reshape(1)
    values, _ = kernels.quantize_activations(x.cuda(), kind="float", static_scale=s.cuda())
    quot = (x.float() / s).clamp(-448, 448)
    show("static activations", values, quot.to(torch.float8_e4m3fn), exact_codes(quot), {"x": x.float(), "q": quot})
    # 4. Weight blocks, the failing unit-test case (fp32 256x384) and a bf16 4096x4096.
    for shape, dtype in (((256, 384), torch.float32), ((4096, 4096), torch.bfloat16)):
        w = (torch.randn(shape, generator=torch.Generator().manual_seed(shape[1])) * 0.02).to(dtype)
        values, scales = kernels.quantize_weight_blocks(w.cuda(), (128, 128), "float")
        ref_values, ref_scales = Q.quantize_tiled(w, (128, 128), "float")
        print(f"  scales equal: {torch.equal(scales.cpu(), ref_scales)}")
        expanded = ref_scales.repeat_interleave(128, 0)[: shape[0]].repeat_interleave(128, 1)[:, : shape[1]]
        quot = (w / expanded).float().clamp(-448, 448)
        show(f"weight blocks {shape} {dtype}", values, ref_values, exact_codes(quot),
             {"w": w.float(), "quotient": quot, "scale": expanded.float()})


if __name__ == "__main__":
    main()
