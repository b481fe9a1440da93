"""Print the coverage table: every model of `tests/models_zoo.py` through the whole pipeline, against float
and against onnxruntime's own quantizers.

For each model, at the default W8A8 config, post-training (calibration only, no fine-tuning), tiny configs
with random weights, CPU:

- the capture front end `fxq.prepare(capture="auto")` chose (from a batch-1 example), weight + activation
  quantizers, ops that stayed float;
- `freeze -> export_onnx` (batch-1 example, dynamic batch) `-> verify` on the zoo's batches of 4: the worst
  error relative to the frozen module's max |output| at ORT_DISABLE_ALL and at ORT_ENABLE_ALL (`VNNI` marks a
  difference `fxq.verify` explains by this CPU's saturating u8s8 kernels, `!` one over its tolerance), the
  model's own sensitivity (`VerifyReport.sensitivity`), and the share of conv/matmul nodes that run as integer
  kernels in onnxruntime's optimized graph (`VerifyReport.integer_fraction`); on CPUs whose u8s8 kernels
  saturate (x86 without VNNI) the default export stores 8-bit weights as UINT8 (`export_onnx(uint8_weights=)`),
  which onnxruntime's u8u8 kernels compute exactly (the caption says which CPU ran the table);
- latency at batch 1, one intra-op thread, ORT_ENABLE_ALL, median of `--iters` runs interleaved in one
  process, of the fxquant export, of the float model's ONNX export (`torch.onnx.export(dynamo=True)`), and of
  onnxruntime's quantization of that float export: `quantize_static` (QDQ, uint8 activations, int8
  per-channel weights, calibrated on the zoo's batches) for CNNs, `quantize_dynamic` (int8 weights) for
  attention and recurrent models.

    python benchmarks/coverage_table.py                 # all models, a markdown table on stdout
    python benchmarks/coverage_table.py bert resnet     # some
    python benchmarks/coverage_table.py --markdown      # and rewrite README.md's coverage table block
    python benchmarks/coverage_table.py --ops 6         # add the 6 most frequent ORT ops of each fxquant export
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import platform
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from models_zoo import CNN_MODELS, ZOO, first_sample  # noqa: E402

import fxquant as fxq  # noqa: E402
from fxquant.tracing import normalize_inputs  # noqa: E402
from fxquant.verify import u8s8_kernels_saturate  # noqa: E402

README = Path(__file__).resolve().parent.parent / "README.md"
BEGIN, END = "<!-- coverage-table:begin -->", "<!-- coverage-table:end -->"
COLUMNS = [
    ("model", "model"), ("capture", "capture"), ("quantizers", "quantizers (w+a)"), ("kept_float", "kept float"),
    ("disabled", "parity ORT_DISABLE_ALL"), ("all", "parity ORT_ENABLE_ALL"),
    ("sensitivity", "own sensitivity"),
    ("int_kernels", "integer conv/matmul"), ("fxq_ms", "fxquant ms"), ("float_ms", "float ms"),
    ("ort_ms", "ORT quantizer ms"), ("vs_float", "vs float"), ("vs_ort", "vs ORT quantizer"), ("ort_ops", "ORT ops"),
    ("note", "note"),
]


THREADS = 1
"""onnxruntime intra-op threads of the timed sessions (bench_ort_latency.py sets its own)."""


def _session(path: str, opt_path: Optional[str] = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if opt_path is not None:
        so.optimized_model_filepath = opt_path
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def _feed(sess: ort.InferenceSession, inputs: Any) -> Dict[str, np.ndarray]:
    """onnxruntime's feed for zoo inputs: a tensor to the first input, a dict by name (unused keys dropped)."""
    names = [i.name for i in sess.get_inputs()]
    if isinstance(inputs, dict):
        return {k: v.numpy() for k, v in inputs.items() if k in names}
    return {names[0]: inputs.numpy()}


def _latencies_ms(paths: Dict[str, str], inputs: Any, iters: int, rounds: int = 5) -> Dict[str, float]:
    """Median ms per run of each model at batch 1, the models' runs interleaved in `rounds` so that a load
    change on the machine hits them alike."""
    sessions = {k: _session(p) for k, p in paths.items()}
    feeds = {k: _feed(s, inputs) for k, s in sessions.items()}
    for k, s in sessions.items():
        for _ in range(10):
            s.run(None, feeds[k])
    times: Dict[str, List[float]] = {k: [] for k in sessions}
    for _ in range(rounds):
        for k, s in sessions.items():
            for _ in range(max(1, iters // rounds)):
                t = time.perf_counter()
                s.run(None, feeds[k])
                times[k].append(time.perf_counter() - t)
    return {k: 1000 * float(np.median(v)) for k, v in times.items()}


def _reason(e: BaseException, limit: int = 120) -> str:
    """One line on why `e` happened: torch.onnx's "Exception summary" line when there is one, else the first
    line; terminal colour codes removed."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if "## Exception summary" in lines:
        lines = lines[lines.index("## Exception summary") + 1 :]
    line = lines[0] if lines else type(e).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


class _Positional(torch.nn.Module):
    """The model called with its keyword inputs as positional arguments, returning its first output tensor (what
    the TorchScript exporter takes)."""

    def __init__(self, model: torch.nn.Module, names: List[str]) -> None:
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        out = self.model(**dict(zip(self.names, args)))
        return out if isinstance(out, torch.Tensor) else (out["logits"] if "logits" in out else out[0])


def _float_export(model: torch.nn.Module, example: Any, path: str) -> str:
    """The float model through torch.onnx's dynamo exporter, from the batch-4 example with a dynamic batch (so
    that onnxruntime's calibration can feed the zoo's batches), static if that fails, and through the
    TorchScript exporter (`dynamo=False`) if the dynamo exporter fails on the model. Returns a note ("" when
    the dynamo export worked)."""
    args, kwargs = normalize_inputs(example)
    auto = torch.export.Dim.AUTO
    dyn: Any = (
        {k: {0: auto} for k in kwargs} if kwargs else tuple({0: auto} if isinstance(a, torch.Tensor) else None for a in args)
    )
    try:
        torch.onnx.export(model, args, path, kwargs=kwargs, dynamo=True, external_data=False, dynamic_shapes=dyn,
                          verbose=False)
        return ""
    except Exception:  # noqa: BLE001 - a static float export still times batch 1
        pass
    try:
        torch.onnx.export(model, args, path, kwargs=kwargs, dynamo=True, external_data=False, verbose=False)
        return ""
    except Exception as e:  # noqa: BLE001 - the TorchScript exporter is the last resort for the float baseline
        dynamo_error = _reason(e)
    names = list(kwargs) or [f"input_{i}" for i in range(len(args))]
    values = tuple(kwargs.values()) or args
    torch.onnx.export(_Positional(model, list(kwargs)) if kwargs else model, values, path, input_names=names,
                      dynamic_axes={n: {0: "batch"} for n in names}, dynamo=False)
    return f"float ONNX by the TorchScript exporter (dynamo=True failed: {dynamo_error})"


class _Reader:
    """onnxruntime.quantization CalibrationDataReader over the zoo's batches."""

    def __init__(self, sess: ort.InferenceSession, batches: List[Any]) -> None:
        self.it = iter([_feed(sess, b) for b in batches])

    def get_next(self) -> Optional[Dict[str, np.ndarray]]:
        return next(self.it, None)


def _ort_quantized(name: str, float_path: str, batches: List[Any], tmp: Path, static: bool) -> Tuple[str, str]:
    """onnxruntime's quantization of the float export, `quantize_static` (QDQ, calibrated on `batches`) or
    `quantize_dynamic`: (path, method)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = str(tmp / f"{name}_pre.onnx")
    out = str(tmp / f"{name}_ort.onnx")
    # onnxruntime's quantization tools write scratch external-data files into the working directory
    with contextlib.chdir(tmp):
        try:
            quant_pre_process(float_path, pre)
        except Exception:  # noqa: BLE001 - pre-processing is optional
            pre = float_path
        if static:
            quantize_static(pre, out, _Reader(_session(float_path), batches), quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)
            return out, "static"
        quantize_dynamic(pre, out, weight_type=QuantType.QInt8)
        return out, "dynamic"


def _parity(r: Any) -> str:
    text = f"{r.relative_error:.2g}"
    if r.argmax_agreement is not None and r.argmax_agreement < 1.0:
        text += f", argmax {100 * r.argmax_agreement:.0f}%"
    if r.explained:
        text += " VNNI"
    elif not r.ok:
        text += " !"
    return text


def _row(name: str, tmp: Path, iters: int, top_ops: int) -> Dict[str, str]:
    model, example, batches = ZOO[name]()
    single = first_sample(example)
    row = {"model": name}
    try:
        qm = fxq.prepare(model, single)
    except fxq.FxQuantError as e:
        row.update(capture="FAILED", note=_reason(e))
        return row
    fxq.calibrate(qm, batches)
    quantizers = list(qm.fxq_quantizers.values())
    n_weights = sum(1 for q in quantizers if q.kind == "weight")
    row.update(
        capture=qm.fxquant_capture,
        quantizers=f"{n_weights}+{len(quantizers) - n_weights}",
        kept_float=str(len(fxq.report(qm).kept_float)),
    )
    frozen = fxq.freeze(qm)
    path = str(tmp / f"{name}_fxq.onnx")
    try:
        fxq.export_onnx(frozen, single, path)
        result = fxq.verify(frozen, path, batches, raise_on_failure=False)
    except fxq.FxQuantError as e:
        row.update(disabled="export failed", note=_reason(e))
        return row
    for r in result.results:
        row["disabled" if r.level == "ORT_DISABLE_ALL" else "all"] = _parity(r)
    hist = sorted(result.op_histogram.items(), key=lambda kv: -kv[1])[:top_ops]
    row.update(
        sensitivity=f"{result.sensitivity:.2g}",
        int_kernels=f"{100 * result.integer_fraction:.0f}% ({result.integer_kernels}/{result.integer_kernels + result.float_compute})",
        ort_ops=" ".join(f"{k}:{v}" for k, v in hist),
    )
    float_path = str(tmp / f"{name}_float.onnx")
    try:
        note = _float_export(model, example, float_path)
    except Exception as e:  # noqa: BLE001 - the table says why there is no float baseline
        row["note"] = f"float export failed: {_reason(e)}"
        return row
    if note:
        row["note"] = note
    paths = {"fxq": path, "float": float_path}
    method = ""
    try:
        paths["ort"], method = _ort_quantized(name, float_path, batches, tmp, static=name in CNN_MODELS)
    except Exception as e:  # noqa: BLE001
        row["note"] = f"onnxruntime quantization failed: {_reason(e)}"
    ms = _latencies_ms(paths, single, iters)
    row.update(fxq_ms=f"{ms['fxq']:.3f}", float_ms=f"{ms['float']:.3f}", vs_float=f"{ms['float'] / ms['fxq']:.2f}x")
    if "ort" in ms:
        row.update(ort_ms=f"{ms['ort']:.3f} ({method})", vs_ort=f"{ms['ort'] / ms['fxq']:.2f}x")
    return row


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            name = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), "")
    except OSError:
        name = ""
    vnni = ("no VNNI: onnxruntime's u8s8 kernels saturate with 8-bit weights, which fxquant exports as UINT8 here"
            if u8s8_kernels_saturate() else "VNNI or not x86")
    return f"{name or platform.processor() or platform.machine()} ({vnni})"


def _markdown(rows: List[Dict[str, str]], top_ops: int) -> str:
    cols = [(k, title) for k, title in COLUMNS if (k != "ort_ops" or top_ops) and any(k in r for r in rows)]
    lines = ["| " + " | ".join(title for _, title in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(r.get(k, "-").replace("|", "/") for k, _ in cols) + " |" for r in rows]
    return "\n".join(lines)


def _caption(iters: int) -> str:
    return (
        f"torch {torch.__version__}, onnxruntime {ort.__version__}, {_cpu()}; W8A8 PTQ (calibration only), random "
        f"weights, tiny configs; parity: max |onnxruntime - frozen| / max |frozen output| on 3 batches of 4 "
        f"(exported from batch 1); latency: batch 1, 1 thread, ORT_ENABLE_ALL, median of {iters} runs; 'vs' = how many "
        "times faster fxquant's export runs."
    )


def _write_readme(block: str) -> None:
    text = README.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"README.md has no {BEGIN} ... {END} block to rewrite")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    README.write_text(f"{head}{BEGIN}\n{block}\n{END}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", default=sorted(ZOO), help=f"models (default: all of {sorted(ZOO)})")
    parser.add_argument("--iters", type=int, default=200, help="timed runs per model and export")
    parser.add_argument("--ops", type=int, default=0, help="most frequent ORT ops of the fxquant export to show")
    parser.add_argument("--markdown", action="store_true", help="rewrite README.md's coverage table block")
    args = parser.parse_args()
    unknown = [m for m in args.models if m not in ZOO]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {sorted(ZOO)}")
    warnings.filterwarnings("ignore")
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed" per export
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            start = time.perf_counter()
            rows.append(_row(name, Path(tmp), args.iters, args.ops))
            print(f"done {name} in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    block = _caption(args.iters) + "\n\n" + _markdown(rows, args.ops)
    print(block)
    if args.markdown:
        _write_readme(block)
        print(f"rewrote the coverage table in {README}", file=sys.stderr)


if __name__ == "__main__":
    main()
