"""GPU check of the CUDA export and of Inductor on the lowered graph. Run from the repo root:

    python scripts/gpu_export_check.py [--no-inductor]

1. Exports the tiny reference DiT (4 blocks, full/token/group/full, a token grid that needs
   padding) for target "cuda" into a temporary directory, captured on the CPU in float32 and in
   bfloat16; loads each module on the GPU and compares its output with convert()'s float32 output
   on the same GPU (TF32 off).
2. Compiles a 2-block model with the osp backend and Inductor (Triton) on the GPU, compares it with
   the same reference, and counts the Triton kernels and the opaque attention calls in the code.
Prints a short table last; exits 1 if a row fails. Takes well under 2 minutes on one GPU.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from osp_compile import OSPConfig, convert  # noqa: E402
from osp_compile.backend import OSPBackend  # noqa: E402
from osp_compile.export import export_model  # noqa: E402
from osp_compile.oracle import rel_err  # noqa: E402
from osp_compile.report import format_table  # noqa: E402
from reference_model import PRESETS, build_model, make_inputs  # noqa: E402

LATENT = (3, 12, 20)  # token grid (3, 6, 10): H and W pad to 8 and 12 for P = 2
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def tiny(layers: int, dtype: torch.dtype, device: str):
    model = build_model("tiny", num_layers=layers, seed=0, dtype=dtype, device=device)
    args, kwargs = make_inputs(PRESETS["tiny"], latent_shape=LATENT, seed=1, dtype=dtype, device=device)
    return model.eval(), args, kwargs


def reference(layers: int, config: OSPConfig) -> torch.Tensor:
    """convert()'s float32 output on the GPU (target auto -> cuda)."""
    model, args, kwargs = tiny(layers, torch.float32, "cuda")
    with torch.no_grad():
        return convert(model, args, kwargs, config)(*args, **kwargs).float()


def load_module(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def attention_kernels(rows: list[dict]) -> str:
    kinds = {r["kernel"] for r in rows if "attention" in r["op"]}
    return ", ".join(sorted(kinds))


def export_rows(directory: str) -> list[dict]:
    config = OSPConfig(layout=["full", "token", "group", "full"])
    ref = reference(4, config)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        start = time.perf_counter()
        model, args, kwargs = tiny(4, dtype, "cpu")
        out_dir = os.path.join(directory, str(dtype).removeprefix("torch."))
        result = export_model(model, args, kwargs, config, "cuda", out_dir)
        net = load_module(result.module_path, f"osp_export_{dtype}".replace(".", "_")).load(out_dir, "cuda")
        cuda_args, cuda_kwargs = (tuple(a.cuda() for a in args), {k: v.cuda() for k, v in kwargs.items()})
        with torch.no_grad():
            out = net(*cuda_args, **cuda_kwargs).float()
        torch.cuda.synchronize()
        err = rel_err(out, ref)
        rows.append({"case": "export cuda", "dtype": str(dtype).removeprefix("torch."),
                     "attention kernels": attention_kernels(result.kernels), "rel err": f"{err:.2e}",
                     "tol": f"{TOLERANCE[dtype]:.0e}", "ok": "OK" if err <= TOLERANCE[dtype] else "FAIL",
                     "s": f"{time.perf_counter() - start:.1f}"})
    return rows


def inductor_row() -> dict:
    from torch._inductor.utils import run_and_get_code

    start = time.perf_counter()
    config = OSPConfig(layout=["token", "group"])
    ref = reference(2, config)
    model, args, kwargs = tiny(2, torch.bfloat16, "cuda")
    backend = OSPBackend(config, inner="inductor")
    with torch.no_grad():
        out, code = run_and_get_code(torch.compile(model, backend=backend), *args, **kwargs)
    code = "\n".join(code)
    err = rel_err(out.float(), ref)
    rows = next(p.rows for p in backend.report.graphs[0].passes if p.name == "lowering")
    kernels = f"{attention_kernels(rows)}; {code.count('@triton.jit')} Triton kernels"
    return {"case": "osp backend + Inductor", "dtype": "bfloat16", "attention kernels": kernels,
            "rel err": f"{err:.2e}", "tol": "3e-02", "ok": "OK" if err <= 3e-2 else "FAIL",
            "s": f"{time.perf_counter() - start:.1f}"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-inductor", action="store_true", help="skip the Inductor row")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: this check needs a GPU")
        return 1
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as directory:
        rows = export_rows(directory)
    if not args.no_inductor:
        rows.append(inductor_row())
    print()
    print(format_table(rows))
    return 0 if all(r["ok"] == "OK" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
