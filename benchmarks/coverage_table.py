"""Print a coverage table: every model of `tests/models_zoo.py` through the whole pipeline.

For each model: the capture front end that `fxq.prepare(capture="auto")` chose, the number of weight and
activation quantizers, average weight / activation bits, how many ops stayed float, and, after
`freeze -> export_onnx -> verify`, the worst onnxruntime parity error (in the verify report's unit) and
the op histogram of onnxruntime's optimized graph. Post-training quantization (no fine-tuning) at the
default W8A8 config; tiny configs with random weights, CPU.

    python benchmarks/coverage_table.py                 # all models
    python benchmarks/coverage_table.py bert resnet     # some
    python benchmarks/coverage_table.py --ops 6         # show the 6 most frequent ORT ops per model
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from models_zoo import ZOO  # noqa: E402

import fxquant as fxq  # noqa: E402


def _row(name: str, tmp: Path, top_ops: int) -> Dict[str, str]:
    model, example, batches = ZOO[name]()
    start = time.perf_counter()
    row = {"model": name}
    try:
        qm = fxq.prepare(model, example)
    except fxq.FxQuantError as e:
        row.update(capture="FAILED", note=str(e).splitlines()[0])
        return row
    fxq.calibrate(qm, batches)
    rep = fxq.report(qm)
    quantizers = list(qm.fxq_quantizers.values())
    n_weights = sum(1 for q in quantizers if q.kind == "weight")
    row.update(
        capture=qm.fxquant_capture,
        quantizers=f"{n_weights}w+{len(quantizers) - n_weights}a",
        avg_bits=f"W{rep.avg_weight_bits:.1f}/A{rep.avg_activation_bits:.1f}",
        kept_float=str(len(rep.extra.get("kept_float", []))),
    )
    frozen = fxq.freeze(qm)
    if not hasattr(fxq, "export_onnx"):
        row.update(parity="(no export)", ort_ops="")
        return row
    path = tmp / f"{name}.onnx"
    try:
        fxq.export_onnx(frozen, example, path)
        result = fxq.verify(frozen, path, batches, raise_on_failure=False)
    except fxq.FxQuantError as e:
        row.update(parity="export failed", ort_ops="", note=str(e).splitlines()[0][:80])
        return row
    levels = ", ".join(f"{r.level} {r.error:.2g}{'' if r.ok else '!'}" for r in result.results)
    hist = sorted(result.op_histogram.items(), key=lambda kv: -kv[1])[:top_ops]
    row.update(
        parity=f"{levels} ({result.error_unit.replace('relative to max |output|', 'rel')})",
        int_kernels=f"{100 * result.integer_fraction:.0f}%",
        ort_ops=" ".join(f"{k}:{v}" for k, v in hist),
        seconds=f"{time.perf_counter() - start:.1f}",
    )
    return row


def _print(rows: List[Dict[str, str]]) -> None:
    cols = ["model", "capture", "quantizers", "avg_bits", "kept_float", "parity", "int_kernels", "seconds", "ort_ops", "note"]
    cols = [c for c in cols if any(c in r for r in rows)]
    widths = {c: max(len(c), *(len(r.get(c, "")) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols).rstrip())
    print("  ".join("-" * widths[c] for c in cols))
    for r in rows:
        print("  ".join(r.get(c, "").ljust(widths[c]) for c in cols).rstrip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", default=sorted(ZOO), help=f"models (default: all of {sorted(ZOO)})")
    parser.add_argument("--ops", type=int, default=5, help="most frequent ORT ops to show per model")
    args = parser.parse_args()
    unknown = [m for m in args.models if m not in ZOO]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {sorted(ZOO)}")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    warnings.filterwarnings("ignore")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            rows.append(_row(name, Path(tmp), args.ops))
            print(f"done {name}", file=sys.stderr)
    print(f"fxquant coverage, torch {torch.__version__}, default W8A8 PTQ (no fine-tuning), random weights")
    print("parity: worst error per ORT level (steps of the output quantizer, or relative to max |output|); '!' = over tolerance")
    _print(rows)


if __name__ == "__main__":
    main()
