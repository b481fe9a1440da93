"""`verify`: parity of an exported ONNX model with the frozen PyTorch module, in onnxruntime.

Checks, in order: `onnx.checker` (full check); onnxruntime runs it on every batch at full optimisation
(`ORT_ENABLE_ALL`, where QDQ groups become integer kernels) and with optimisation off (`ORT_DISABLE_ALL`,
the plain Q/DQ semantics), on the CPU provider and any other installed one; the outputs are compared
with the frozen module's: max abs error in units of the output's quantization step when the output is
quantized (relative error for float outputs), and argmax agreement for classifier outputs `(batch,
classes)`. The optimized graph's op-type histogram says how much became integer kernels.
"""

from __future__ import annotations

import collections
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import onnx
import torch
from torch import fx

from fxquant.batches import Batch, call_batch, check_batches, describe_shapes, required_inputs, split_batch
from fxquant.errors import ParityError, PrepareError, StateError
from fxquant.export.onnx_report import read_onnx_file
from fxquant.passes.insert import QUANTIZERS_ATTR
from fxquant.quantizer import FrozenActivationQuantizer, FrozenWeight

INTEGER_KERNELS = frozenset({
    "QLinearConv", "QLinearAdd", "QLinearMul", "QLinearMatMul", "MatMulIntegerToFloat", "QGemm", "MatMulNBits",
    "QLinearConcat", "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearSigmoid", "QLinearLeakyRelu",
    "QLinearSoftmax", "QLinearReduceMean", "QLinearWhere", "ConvInteger", "MatMulInteger", "QAttention",
    "DynamicQuantizeMatMul", "NhwcQLinearConv",
})
"""onnxruntime op types that compute on integers (or on integer weights, MatMulNBits)."""
FLOAT_COMPUTE = frozenset({"Conv", "MatMul", "Gemm", "FusedConv", "FusedMatMul", "FusedGemm", "ConvTranspose", "NchwcConv"})
"""Float op types that an integer kernel could have replaced."""

LEVELS = {"all": "ORT_ENABLE_ALL", "disabled": "ORT_DISABLE_ALL"}


@dataclass
class LevelResult:
    """Parity at one onnxruntime provider and optimisation level."""

    provider: str
    level: str
    max_abs_error: float
    error: float  # in output steps (quantized output) or relative to max |reference| (float output)
    argmax_agreement: Optional[float]
    ok: bool
    explained: Optional[str] = None
    """Why the difference is a property of this machine's kernels, not of the export (then `ok` is True)."""


@dataclass
class VerifyReport:
    """What `fxq.verify` measured (`str()` prints a summary)."""

    output_step: Optional[float]
    error_unit: str
    tolerance: float
    results: List[LevelResult]
    op_histogram: Dict[str, int]
    integer_kernels: int
    float_compute: int
    samples: int
    checker_passed: bool = True
    notes: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether every provider and level is within tolerance."""
        return all(r.ok for r in self.results)

    @property
    def max_error(self) -> float:
        """Worst error over providers and levels, in `error_unit` (differences `explained` by the machine's
        kernels left out: they are listed per level)."""
        return max((r.error for r in self.results if r.explained is None), default=0.0)

    @property
    def argmax_agreement(self) -> Optional[float]:
        """Worst argmax agreement (classifier outputs), else None."""
        vals = [r.argmax_agreement for r in self.results if r.argmax_agreement is not None and r.explained is None]
        return min(vals) if vals else None

    @property
    def integer_fraction(self) -> float:
        """Share of compute ops (conv/matmul/gemm-like) that run as integer kernels after optimisation."""
        total = self.integer_kernels + self.float_compute
        return self.integer_kernels / total if total else 0.0

    def __str__(self) -> str:
        lines = [f"onnx.checker: {'passed' if self.checker_passed else 'FAILED'}; {self.samples} samples"]
        for r in self.results:
            agree = "" if r.argmax_agreement is None else f", argmax agreement {100 * r.argmax_agreement:.2f}%"
            verdict = "FAIL" if not r.ok else ("differs: " + r.explained if r.explained else "ok")
            lines.append(
                f"{r.provider} {r.level}: max abs error {r.max_abs_error:.3g} = {r.error:.3g} {self.error_unit}{agree}"
                f" [{verdict}]"
            )
        hist = ", ".join(f"{k} {v}" for k, v in sorted(self.op_histogram.items(), key=lambda kv: -kv[1]))
        lines.append(f"optimized graph: {hist}")
        lines.append(
            f"integer kernels: {self.integer_kernels} of {self.integer_kernels + self.float_compute} compute ops "
            f"({100 * self.integer_fraction:.0f}%)"
        )
        lines += self.notes
        return "\n".join(lines)


SATURATION_NOTE = (
    "this CPU has no VNNI, and onnxruntime's u8s8 integer kernels sum pairs of uint8 x int8 products in "
    "saturating int16 here (AVX2/AVX-512 without VNNI), which 8-bit weights can overflow; weights of at most 7 "
    "bits (QuantSpec(max_bits=7)) run exactly on such CPUs, and CPUs with VNNI run 8-bit weights exactly"
)


def u8s8_kernels_saturate(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether onnxruntime's uint8 x int8 integer kernels can saturate on this CPU: x86-64 with AVX2 but
    without VNNI (`avx512_vnni` / `avx_vnni` absent from the flags in `cpuinfo`). False where that cannot be
    read."""
    try:
        with open(cpuinfo) as fh:
            flags = next((line.split(":", 1)[1].split() for line in fh if line.startswith("flags")), None)
    except OSError:
        return False
    if flags is None or "avx2" not in flags:
        return False
    return not ({"avx512_vnni", "avx_vnni"} & set(flags))


def _max_weight_bits(frozen: fx.GraphModule) -> int:
    quantizers = getattr(frozen, QUANTIZERS_ATTR, None)
    bits = [int(q.bits.max()) for q in quantizers.values() if isinstance(q, FrozenWeight)] if quantizers else []
    return max(bits, default=0)


def _output_step(frozen: fx.GraphModule) -> Optional[float]:
    """The quantization step of the module's output when its last node is an activation quantizer."""
    out = next(n for n in frozen.graph.nodes if n.op == "output")
    node = out.args[0]
    if isinstance(node, (tuple, list)) and len(node) == 1:
        node = node[0]
    if isinstance(node, fx.Node) and node.op == "call_module" and str(node.target).startswith(QUANTIZERS_ATTR + "."):
        q = frozen.get_submodule(str(node.target))
        if isinstance(q, FrozenActivationQuantizer):
            return float(q.scale.max())
    return None


def _flat_outputs(out: Any) -> List[np.ndarray]:
    if isinstance(out, torch.Tensor):
        return [out.detach().cpu().numpy()]
    if isinstance(out, (tuple, list)):
        return [a for o in out for a in _flat_outputs(o)]
    if isinstance(out, dict):
        return [a for o in out.values() for a in _flat_outputs(o)]
    return []


def _sessions(model_path: str, providers: Sequence[str], level: str, opt_path: Optional[str]) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, LEVELS[level])
    so.log_severity_level = 3
    # MatMulNBits' default accuracy level quantizes its input: ask for the exact float path.
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    if opt_path is not None:
        so.optimized_model_filepath = opt_path
    return ort.InferenceSession(model_path, so, providers=list(providers))


def _run_session(sess: Any, feed: Dict[str, np.ndarray], batch: Batch, key: Tuple[str, str]) -> List[np.ndarray]:
    """`sess.run` on one batch; a refused input becomes a PrepareError naming the batch and ONNX shapes."""
    try:
        return sess.run(None, feed)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own (pybind) exception types
        wanted = ", ".join(f"{x.name}: {tuple(x.shape)}" for x in sess.get_inputs())
        raise PrepareError(
            f"onnxruntime ({key[0]}, {LEVELS[key[1]]}) could not run a batch of shape {describe_shapes(batch)}: the "
            f"ONNX model's inputs are {wanted} (named dimensions may vary). Give batches shaped like the example "
            f"inputs given to fxq.export_onnx, or export again with inputs of this shape. The error was "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from e


def verify(
    frozen: fx.GraphModule,
    onnx_path_or_model: Union[str, os.PathLike, onnx.ModelProto],
    batches: Iterable[Batch],
    *,
    num_batches: int = 8,
    tolerance_steps: float = 1.0,
    rtol: float = 1e-2,
    min_argmax_agreement: float = 1.0,
    providers: Optional[Sequence[str]] = None,
    levels: Sequence[str] = ("all", "disabled"),
    raise_on_failure: bool = True,
) -> VerifyReport:
    """Compare onnxruntime's outputs of an exported model with the frozen PyTorch module.

    Args:
        frozen: the module that was exported (`fxq.freeze`).
        onnx_path_or_model: the `.onnx` path or the `ModelProto` returned by `fxq.export_onnx`.
        batches: model inputs as for `fxq.calibrate` (a tensor, a tuple, a dict, or `(inputs, target)`);
            the first `num_batches` are used.
        tolerance_steps: max abs error allowed, in output quantization steps (quantized outputs).
        rtol: max abs error relative to the largest reference magnitude (float outputs). In deep models
            float accumulation order flips the odd rounding at an inner Q node (one step there), which
            reaches a float output as ~0.2-0.7% (ResNet-style CNN, 2-block transformer), at both levels.
        min_argmax_agreement: smallest share of equal argmax allowed for `(batch, classes)` outputs.
        providers: onnxruntime providers to test (default: CPU and every other installed one).
        levels: optimisation levels, `"all"` (ORT_ENABLE_ALL) and/or `"disabled"` (ORT_DISABLE_ALL).
        raise_on_failure: raise `ParityError` when a check fails (else only report it).

    Returns:
        A `VerifyReport` (errors per provider and level, argmax agreement, optimized op histogram).

    Raises:
        StateError: `frozen` is not a frozen module, no batch was given, or the path is not a readable ONNX
            file (missing, empty, not ONNX).
        PrepareError: a single tensor or dict given as `batches` (pass `[X]`), or a batch that does not fit
            the frozen module or the ONNX model's inputs (the message gives the shapes).
        onnx.checker.ValidationError: the model is not valid ONNX.
        ParityError: an error or argmax agreement is beyond tolerance (names the provider and level).
    """
    import onnxruntime as ort

    from fxquant.preparation import module_state

    if module_state(frozen) != "frozen":
        raise StateError(
            f"verify compares onnxruntime with the frozen module (state {module_state(frozen)!r}); pass the module "
            "returned by fxq.freeze that was exported."
        )
    unknown = [lv for lv in levels if lv not in LEVELS]
    if unknown:
        raise StateError(f"verify levels {unknown} are unknown; use 'all' and/or 'disabled'.")
    check_batches(batches, "verify's batches")
    if not isinstance(onnx_path_or_model, onnx.ModelProto):
        read_onnx_file(onnx_path_or_model, load_external_data=False)  # a clear error for what is not ONNX
    with tempfile.TemporaryDirectory(prefix="fxq_verify_") as tmp:
        if isinstance(onnx_path_or_model, onnx.ModelProto):
            model_path = os.path.join(tmp, "model.onnx")
            onnx.save_model(onnx_path_or_model, model_path)
        else:
            model_path = os.fspath(onnx_path_or_model)
        onnx.checker.check_model(model_path, full_check=True)
        if providers is None:
            available = ort.get_available_providers()
            providers = ["CPUExecutionProvider"] + [
                p for p in available if p in ("CUDAExecutionProvider", "DmlExecutionProvider", "CoreMLExecutionProvider")
            ]
        opt_path = os.path.join(tmp, "optimized.onnx")
        sessions: Dict[Tuple[str, str], Any] = {}
        for provider in providers:
            for level in levels:
                want_opt = provider == "CPUExecutionProvider" and level == "all"
                sessions[(provider, level)] = _sessions(model_path, [provider], level, opt_path if want_opt else None)
        histogram: Dict[str, int] = {}
        if os.path.exists(opt_path):
            opt = onnx.load(opt_path, load_external_data=False)
            histogram = dict(collections.Counter(n.op_type for n in opt.graph.node))
        refs: List[List[np.ndarray]] = []
        outs: Dict[Tuple[str, str], List[List[np.ndarray]]] = {k: [] for k in sessions}
        n_req = required_inputs(frozen)
        seen = 0
        for i, batch in enumerate(batches):
            if i >= num_batches:
                break
            args, kwargs, _ = split_batch(batch, n_req)
            with torch.no_grad():
                ref = _flat_outputs(call_batch(frozen, batch, n_req, who="frozen module")[0])
            refs.append(ref)
            for key, sess in sessions.items():
                names = [x.name for x in sess.get_inputs()]
                feed = {}
                for name, a in zip(names, args):
                    feed[name] = a.detach().cpu().numpy()
                for k, v in kwargs.items():
                    if k in names:
                        feed[k] = v.detach().cpu().numpy()
                outs[key].append(_run_session(sess, feed, batch, key))
            seen += 1
    if seen == 0:
        raise StateError("verify got no batches; give at least one batch of model inputs.")
    step = _output_step(frozen)
    unit = "output steps" if step is not None else "relative to max |output|"
    tol = tolerance_steps if step is not None else rtol
    results: List[LevelResult] = []
    for (provider, level), got in outs.items():
        max_abs, scale_ref, agree, total = 0.0, 0.0, 0, 0
        for ref, out in zip(refs, got):
            for r, o in zip(ref, out):
                max_abs = max(max_abs, float(np.abs(r.astype(np.float64) - o).max(initial=0.0)))
                scale_ref = max(scale_ref, float(np.abs(r).max(initial=0.0)))
            r0, o0 = ref[0], out[0]
            if r0.ndim == 2 and r0.shape[1] > 1:
                agree += int((r0.argmax(1) == o0.argmax(1)).sum())
                total += r0.shape[0]
        error = max_abs / step if step is not None else max_abs / max(scale_ref, 1e-12)
        agreement = agree / total if total else None
        ok = error <= tol and (agreement is None or agreement >= min_argmax_agreement)
        results.append(LevelResult(provider, LEVELS[level], max_abs, error, agreement, ok))
    # A difference only the fused kernels show, with 8-bit weights on a CPU whose u8s8 kernels saturate, is
    # this machine's arithmetic (ORT_DISABLE_ALL still checks the export itself): explained, not failed.
    unfused = [r for r in results if r.level == LEVELS["disabled"]]
    exact_unfused = bool(unfused) and all(r.ok for r in unfused)
    if exact_unfused and _max_weight_bits(frozen) >= 8 and u8s8_kernels_saturate():
        for r in results:
            if not r.ok and r.level == LEVELS["all"] and r.provider == "CPUExecutionProvider":
                r.ok, r.explained = True, SATURATION_NOTE
                warnings.warn(f"verify: {r.level} differs by {r.error:.3g} {unit}: {SATURATION_NOTE}.", stacklevel=2)
    report = VerifyReport(
        output_step=step, error_unit=unit, tolerance=tol, results=results, op_histogram=histogram,
        integer_kernels=sum(v for k, v in histogram.items() if k in INTEGER_KERNELS),
        float_compute=sum(v for k, v in histogram.items() if k in FLOAT_COMPUTE),
        samples=sum(r[0].shape[0] if r and r[0].ndim else 1 for r in refs),
    )
    failed = [r for r in results if not r.ok]
    if failed and raise_on_failure:
        r = failed[0]
        agree = "" if r.argmax_agreement is None else f", argmax agreement {100 * r.argmax_agreement:.2f}% (min {100 * min_argmax_agreement:.2f}%)"
        raise ParityError(
            f"onnxruntime ({r.provider}, {r.level}) differs from the frozen module: max abs error {r.max_abs_error:.3g} = "
            f"{r.error:.3g} {unit} (tolerance {tol:g}){agree}. If only {LEVELS['all']} fails, an optimized kernel "
            "changes the numbers (compare levels in the report); otherwise the export is wrong for this model. "
            "Pass raise_on_failure=False to get the full report.\n" + str(report)
        )
    return report
