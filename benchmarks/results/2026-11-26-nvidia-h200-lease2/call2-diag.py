"""bf16 dweight2_pw diagnostic (GPU)."""
import sys, importlib, traceback, torch, ftkernels
from ftkernels import reference
sys.path.insert(0, 'tests')
from test_squared_relu_ffn import make
from helpers import grads
mcl = importlib.import_module("ftkernels.multichannel_linear")
torch.manual_seed(0)
dev = 'cuda'
e = lambda a, r: (a.double() - r.double()).abs().max().item()

def ffn_case(dtype, C1, B=2, C=4, F=256, W=256, H=512):
    x, p = make(B, C, F, W, H=H, C1=C1, dtype=dtype, device=dev)
    out = ftkernels.squared_relu_ffn(x, **p, backend="triton")
    low = reference.squared_relu_ffn(x, **p)
    x64 = x.detach().double().requires_grad_()
    p64 = {k: (v.detach().double().requires_grad_() if v is not None else None) for k, v in p.items()}
    ref64 = reference.squared_relu_ffn(x64, **p64)
    g = torch.randn_like(ref64)
    names = ["x"] + [k for k, v in p.items() if v is not None]
    ins = [x] + [v for v in p.values() if v is not None]
    ins64 = [x64] + [v for v in p64.values() if v is not None]
    print(f"== ffn {dtype} C1={C1}: fwd kern {e(out, ref64):.3e} torch {e(low, ref64):.3e}")
    for n, a, l, r in zip(names, grads(out, ins, g.to(dtype)), grads(low, ins, g.to(dtype)), grads(ref64, ins64, g)):
        d = (a.double() - r).abs()
        extra = ""
        if n == "weight2_pw":
            bad = d > 8 * (l.double() - r).abs().max()
            idx = bad.nonzero()
            extra = f" bad {int(bad.sum())}/{bad.numel()}"
            if len(idx):
                extra += f" c {sorted(set(idx[:, 0].tolist()))[:20]} m-range {idx[:,1].min().item()}-{idx[:,1].max().item()} n-range {idx[:,2].min().item()}-{idx[:,2].max().item()} ratio {(a.double()[bad] / r[bad])[:6].tolist()}"
        print(f"  {n:12s} kern {e(a, r):.3e} torch {e(l, r):.3e} max|ref| {r.abs().max().item():.3e}{extra}")

def wg_direct(dtype, content, G=16, M=256, N=512, B=2, W=256):
    a = torch.randn(B, G, M, W, device=dev).to(dtype)
    b = torch.randn(B, G, N, W, device=dev)
    if content == "square": b = b * b
    b = b.to(dtype)
    ref = torch.einsum('bcmw,bcnw->cmn', a.double(), b.double())
    for cfg in [None] + mcl.CONFIGS[("wg", "16" if dtype != torch.float32 else "32", "gemm")]:
        try:
            if cfg is None:
                out, rows = mcl.weight_grad(a, b, G, M, N, B, W, mcl._bcfw_strides(a), mcl._bcfw_strides(b), True, dtype)
            else:
                with mcl.forced_config("wg", cfg):
                    out, rows = mcl.weight_grad(a, b, G, M, N, B, W, mcl._bcfw_strides(a), mcl._bcfw_strides(b), True, dtype)
            rel = ((out.double() - ref).abs().max() / ref.abs().max()).item()
            print(f"  wg {dtype} {content} cfg {cfg}: rel err {rel:.2e} rows rel {((rows.double()-a.double().sum((0,3)).T.T).abs().max()/a.double().sum((0,3)).abs().max()).item():.2e}")
        except Exception:
            traceback.print_exc()

for args in [(torch.bfloat16, 16), (torch.bfloat16, 4), (torch.float16, 16)]:
    try: ffn_case(*args)
    except Exception: traceback.print_exc()
for dt in (torch.bfloat16, torch.float16):
    for content in ("randn", "square"):
        wg_direct(dt, content)
print("picks", {k: str(v) for k, v in getattr(mcl._AUTOTUNERS, 'picks', lambda: {})().items()} if hasattr(mcl._AUTOTUNERS, 'picks') else '')
