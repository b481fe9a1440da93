"""`verify`: parity of an exported ONNX model with the frozen PyTorch module, in onnxruntime.

Checks, in order: `onnx.checker` (full check); onnxruntime runs it on every batch at full optimisation
(`ORT_ENABLE_ALL`, where QDQ groups become integer kernels) and with optimisation off (`ORT_DISABLE_ALL`,
the plain Q/DQ semantics), on the CPU provider and any other installed one; the outputs are compared
with the frozen module's: max abs error in units of the output's quantization step when the output is
quantized (relative error for float outputs), and argmax agreement for classifier outputs `(batch,
classes)`. The optimized graph's op-type histogram says how much became integer kernels.

A difference is judged against the model's own sensitivity: how much the frozen module's output moves when
the input of every activation quantizer is scaled by `1 + PERTURBATION` (1e-6). Two runtimes round the
float sums in another order (~1e-7 relative), which flips the odd rounding tie at an inner quantizer; a deep
network amplifies one flipped step into percents of its output. The perturbation flips ties the same way,
in PyTorch alone, so a runtime difference within `SENSITIVITY_FACTOR` times it is the model's, not the
export's. (Scaling only the model's input rarely reaches a rounding boundary of the first quantizer, and
integer token inputs cannot be scaled at all; the measurements are in docs/decisions.md, "The model's own
sensitivity".) When a level fails, `verify` names the first activation quantizer,
in graph order, where onnxruntime's codes depart from the frozen module's by more than that quantizer's own
tolerance (one batch; the ONNX Q/DQ nodes are matched to FX nodes by their `fxquant.quantizer` metadata,
which export writes; `fxquant.divergence` holds the perturbation and the localisation, `fxquant.ort_runs` the
onnxruntime sessions).
"""

from __future__ import annotations

import collections
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import onnx
import torch
from torch import fx

from fxquant.batches import Batch, call_batch, check_batches, required_inputs, split_batch
from fxquant.divergence import PERTURBATION, SENSITIVITY_FACTOR, Divergence, localize, perturbed_quantizer_inputs
from fxquant.errors import ConfigError, ParityError, PrepareError, StateError
from fxquant.export.onnx_file import save_model
from fxquant.export.onnx_report import read_onnx_file
from fxquant.export.plan import u8s8_kernels_saturate
from fxquant.graph import module_state, quantizer_name
from fxquant.ort_runs import LEVELS, open_session, run_session, session_feed
from fxquant.quantizer import FrozenActivationQuantizer

INTEGER_KERNELS = frozenset({
    "QLinearConv", "QLinearAdd", "QLinearMul", "QLinearMatMul", "MatMulIntegerToFloat", "QGemm", "MatMulNBits",
    "QLinearConcat", "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearSigmoid", "QLinearLeakyRelu",
    "QLinearSoftmax", "QLinearReduceMean", "QLinearWhere", "ConvInteger", "MatMulInteger", "QAttention",
    "DynamicQuantizeMatMul", "NhwcQLinearConv",
})
"""onnxruntime op types that compute on integers (or on integer weights, MatMulNBits)."""
FLOAT_COMPUTE = frozenset({"Conv", "MatMul", "Gemm", "FusedConv", "FusedMatMul", "FusedGemm", "ConvTranspose", "NchwcConv"})
"""Float op types that an integer kernel could have replaced."""

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
    relative_error: float = 0.0
    """Max abs error relative to the largest |output| of the frozen module."""
    error_steps: Optional[float] = None
    """Max abs error in output quantization steps (None when the output is not quantized)."""
    allowed: float = 0.0
    """The error allowed, in the report's `error_unit`: the larger of the tolerance and `SENSITIVITY_FACTOR`
    times the model's own sensitivity."""
    within_sensitivity: bool = False
    """Passed only because the model itself moves this much (the plain tolerance alone would fail it)."""
    divergence: Optional[Divergence] = None
    """Where onnxruntime first departs from the frozen module (only on a failed level, the one localised)."""


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
    sensitivity: float = 0.0
    """The model's own sensitivity: max change of the frozen module's output when every activation
    quantizer's input is scaled by `1 + PERTURBATION`, relative to its max |output| (over all batches)."""
    sensitivity_steps: Optional[float] = None
    """The same change in output quantization steps (None when the output is not quantized)."""
    sensitivity_argmax_agreement: Optional[float] = None
    """Share of samples whose argmax the perturbation leaves unchanged (classifier outputs), else None."""
    sensitivity_factor: float = SENSITIVITY_FACTOR

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
        steps = "" if self.sensitivity_steps is None else f" = {self.sensitivity_steps:.3g} output steps"
        flips = (
            "" if self.sensitivity_argmax_agreement is None
            else f", argmax unchanged on {100 * self.sensitivity_argmax_agreement:.2f}%"
        )
        lines.append(
            f"model's own sensitivity (every activation quantizer's input x (1 + {PERTURBATION:g})): output moves by "
            f"{self.sensitivity:.3g} relative to max |output|{steps}{flips}"
        )
        for r in self.results:
            agree = "" if r.argmax_agreement is None else f", argmax agreement {100 * r.argmax_agreement:.2f}%"
            relative = "" if r.error_steps is None else f" (relative {r.relative_error:.3g})"
            if not r.ok:
                verdict = "FAIL"
            elif r.explained:
                verdict = "differs: " + r.explained
            elif r.within_sensitivity:
                verdict = f"ok: within {self.sensitivity_factor:g} x the model's own sensitivity"
            else:
                verdict = "ok"
            lines.append(
                f"{r.provider} {r.level}: max abs error {r.max_abs_error:.3g} = {r.error:.3g} {self.error_unit}{relative}"
                f"{agree}, allowed {r.allowed:.3g} [{verdict}]"
            )
            if r.divergence is not None:
                lines.append(f"  {r.divergence}")
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
    "saturating int16 here (AVX2/AVX-512 without VNNI), which this file's INT8 8-bit weights can overflow; "
    "export_onnx(..., uint8_weights=True) (the default on such a CPU) stores them as UINT8 for the exact u8u8 "
    "kernels, and weights of at most 7 bits (QuantSpec(max_bits=7)) cannot overflow; CPUs with VNNI run "
    "INT8 8-bit weights exactly"
)


def _has_signed_8bit_weights(model: onnx.ModelProto, base_dir: str = "") -> bool:
    """Whether the ONNX file has INT8 tensors that u8s8 kernels can overflow with: INT8 weight codes beyond 7-bit
    ones (|code| > 64: 2 x 255 x 64 = 32640 still fits int16, 2 x 255 x 65 does not) read by a DequantizeLinear, or an INT8 QuantizeLinear (a weight quantized in
    the graph). fxquant's default export on a CPU whose kernels saturate has none (`uint8_weights`).
    `base_dir`: the folder of the file, where codes stored as external data are read one tensor at a time."""
    inits = {i.name: i for i in model.graph.initializer}
    int8 = onnx.TensorProto.INT8
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits and inits[node.input[0]].data_type == int8:
            codes = onnx.numpy_helper.to_array(inits[node.input[0]], base_dir=base_dir)
            if codes.size and int(np.abs(codes.astype(np.int16)).max()) > 64:
                return True
        if node.op_type == "QuantizeLinear" and len(node.input) > 2 and node.input[2] in inits:
            if inits[node.input[2]].data_type == int8:
                return True
    return False


def _output_step(frozen: fx.GraphModule) -> Optional[float]:
    """The quantization step of the module's output when its last node is an activation quantizer."""
    out = next(n for n in frozen.graph.nodes if n.op == "output")
    node = out.args[0]
    if isinstance(node, (tuple, list)) and len(node) == 1:
        node = node[0]
    if quantizer_name(node) is not None:
        assert isinstance(node, fx.Node)
        q = frozen.get_submodule(str(node.target))
        if isinstance(q, FrozenActivationQuantizer):
            return q.qparams().step
    return None


def _flat_outputs(out: Any) -> List[np.ndarray]:
    if isinstance(out, torch.Tensor):
        return [out.detach().cpu().numpy()]
    if isinstance(out, (tuple, list)):
        return [a for o in out for a in _flat_outputs(o)]
    if isinstance(out, dict):
        return [a for o in out.values() for a in _flat_outputs(o)]
    return []


def _difference(refs: List[List[np.ndarray]], others: List[List[np.ndarray]]) -> Tuple[float, Optional[float]]:
    """Max abs difference over every output of every batch, and the share of equal argmax of the first output
    where it is a classifier's `(batch, classes)` (else None)."""
    max_abs, agree, total = 0.0, 0, 0
    for ref, other in zip(refs, others):
        for r, o in zip(ref, other):
            max_abs = max(max_abs, float(np.abs(r.astype(np.float64) - o).max(initial=0.0)))
        if ref[0].ndim == 2 and ref[0].shape[1] > 1:
            agree += int((ref[0].argmax(1) == other[0].argmax(1)).sum())
            total += ref[0].shape[0]
    return max_abs, (agree / total if total else None)


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

    Costs one more forward of the frozen module per batch (the sensitivity) and, when a level fails, one
    onnxruntime run and two frozen forwards of the first batch (the divergence).

    Args:
        frozen: the module that was exported (`fxq.freeze`).
        onnx_path_or_model: the `.onnx` path or the `ModelProto` returned by `fxq.export_onnx`.
        batches: model inputs as for `fxq.calibrate` (a tensor, a tuple, a dict, or `(inputs, target)`);
            the first `num_batches` are used.
        tolerance_steps: max abs error allowed, in output quantization steps (quantized outputs).
        rtol: max abs error relative to the largest reference magnitude (float outputs). In deep models
            float accumulation order flips the odd rounding at an inner Q node (one step there), which
            reaches a float output as a fraction of a percent, at both levels.
            Either tolerance is raised to `SENSITIVITY_FACTOR` times the model's own sensitivity where that
            is larger (see the module docstring): a chaotic network moves that much by itself.
        min_argmax_agreement: smallest share of equal argmax allowed for `(batch, classes)` outputs (lowered
            to 1 - `SENSITIVITY_FACTOR` x the share of argmaxes the perturbation itself flips, where that is
            lower).
        providers: onnxruntime providers to test (default: CPU and every other installed one).
        levels: optimisation levels, `"all"` (ORT_ENABLE_ALL) and/or `"disabled"` (ORT_DISABLE_ALL).
        raise_on_failure: raise `ParityError` when a check fails (else only report it).

    Returns:
        A `VerifyReport`: errors per provider and level (in the output's unit, relative, in output steps), the
        error each was allowed, the model's own sensitivity, argmax agreement, the optimized op histogram,
        and on a failed level the first activation quantizer where onnxruntime diverges (`divergence`).

    Raises:
        StateError: `frozen` is not a frozen module.
        ConfigError: an unknown level.
        InputError: the path is not a readable ONNX file (missing, empty, not ONNX).
        PrepareError: no batch, a single tensor or dict given as `batches` (pass `[X]`), or a batch that does
            not fit the frozen module or the ONNX model's inputs (the message gives the shapes).
        onnx.checker.ValidationError: the model is not valid ONNX.
        ParityError: an error or argmax agreement is beyond tolerance (names the provider and level).
    """
    import onnxruntime as ort

    if module_state(frozen) != "frozen":
        raise StateError(
            f"verify compares onnxruntime with the frozen module (state {module_state(frozen)!r}); pass the module "
            "returned by fxq.freeze that was exported."
        )
    unknown = [lv for lv in levels if lv not in LEVELS]
    if unknown:
        raise ConfigError(f"verify levels {unknown} are unknown; use 'all' and/or 'disabled'.")
    check_batches(batches, "verify's batches")
    # a clear error for what is not ONNX
    header = onnx_path_or_model if isinstance(onnx_path_or_model, onnx.ModelProto) else read_onnx_file(
        onnx_path_or_model, load_external_data=False
    )
    base_dir = "" if isinstance(onnx_path_or_model, onnx.ModelProto) else os.path.dirname(os.fspath(onnx_path_or_model))
    signed_8bit_weights = _has_signed_8bit_weights(header, base_dir)
    del header
    with tempfile.TemporaryDirectory(prefix="fxq_verify_") as tmp:
        if isinstance(onnx_path_or_model, onnx.ModelProto):
            model_path = os.path.join(tmp, "model.onnx")
            save_model(onnx_path_or_model, Path(model_path))
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
                sessions[(provider, level)] = open_session(model_path, [provider], level, opt_path if want_opt else None)
        histogram: Dict[str, int] = {}
        if os.path.exists(opt_path):
            opt = onnx.load(opt_path, load_external_data=False)
            histogram = dict(collections.Counter(n.op_type for n in opt.graph.node))
        refs: List[List[np.ndarray]] = []
        moved: List[List[np.ndarray]] = []
        outs: Dict[Tuple[str, str], List[List[np.ndarray]]] = {k: [] for k in sessions}
        n_req = required_inputs(frozen)
        first_batch: Optional[Batch] = None
        for i, batch in enumerate(batches):
            if i >= num_batches:
                break
            args, kwargs, _ = split_batch(batch, n_req)
            with torch.no_grad():
                ref = _flat_outputs(call_batch(frozen, batch, n_req, who="frozen module")[0])
                with perturbed_quantizer_inputs(frozen):
                    moved.append(_flat_outputs(call_batch(frozen, batch, n_req, who="frozen module")[0]))
            refs.append(ref)
            for key, sess in sessions.items():
                outs[key].append(run_session(sess, session_feed(sess, args, kwargs), batch, key))
            if first_batch is None:
                first_batch = batch
        if first_batch is None:
            raise PrepareError("verify got no batches; give at least one batch of model inputs.")
        step = _output_step(frozen)
        unit = "output steps" if step is not None else "relative to max |output|"
        tol = tolerance_steps if step is not None else rtol
        scale_ref = max((float(np.abs(r).max(initial=0.0)) for ref in refs for r in ref), default=0.0)
        norm = max(scale_ref, 1e-12)
        sens_abs, sens_agreement = _difference(refs, moved)
        # The plain tolerance, or the model's own sensitivity where that is larger (absolute units).
        tol_abs = tolerance_steps * step if step is not None else rtol * scale_ref
        allowed_abs = max(tol_abs, SENSITIVITY_FACTOR * sens_abs)
        needed_agreement = min_argmax_agreement
        if sens_agreement is not None:
            needed_agreement = min(min_argmax_agreement, 1.0 - SENSITIVITY_FACTOR * (1.0 - sens_agreement))
        results: List[LevelResult] = []
        for (provider, level), got in outs.items():
            max_abs, agreement = _difference(refs, got)
            error = max_abs / step if step is not None else max_abs / norm
            plain = max_abs <= tol_abs and (agreement is None or agreement >= min_argmax_agreement)
            ok = max_abs <= allowed_abs and (agreement is None or agreement >= needed_agreement)
            results.append(LevelResult(
                provider, LEVELS[level], max_abs, error, agreement, ok, relative_error=max_abs / norm,
                error_steps=max_abs / step if step is not None else None,
                allowed=allowed_abs / step if step is not None else allowed_abs / norm, within_sensitivity=ok and not plain,
            ))
        # A difference only the fused kernels show, with 8-bit weights on a CPU whose u8s8 kernels saturate, is
        # this machine's arithmetic (ORT_DISABLE_ALL still checks the export itself): explained, not failed.
        unfused = [r for r in results if r.level == LEVELS["disabled"]]
        exact_unfused = bool(unfused) and all(r.ok for r in unfused)
        if exact_unfused and signed_8bit_weights and u8s8_kernels_saturate():
            for r in results:
                if not r.ok and r.level == LEVELS["all"] and r.provider == "CPUExecutionProvider":
                    r.ok, r.explained = True, SATURATION_NOTE
                    warnings.warn(f"verify: {r.level} differs by {r.error:.3g} {unit}: {SATURATION_NOTE}.", stacklevel=2)
        failed = [r for r in results if not r.ok]
        if failed:
            # Localise one failed level: ORT_DISABLE_ALL first, the export's own Q/DQ arithmetic.
            target = next((r for r in failed if r.level == LEVELS["disabled"]), failed[0])
            level_key = next(k for k, v in LEVELS.items() if v == target.level)
            try:
                target.divergence = localize(
                    frozen, model_path, target.provider, level_key, first_batch, n_req, tolerance_steps, rtol, tmp,
                )
            except Exception as e:  # noqa: BLE001 - a diagnosis that fails must not hide the parity result
                target.divergence = Divergence(
                    None, None, None, 0.0, 0.0, 0,
                    note=f"not localised: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                )
    report = VerifyReport(
        output_step=step, error_unit=unit, tolerance=tol, results=results, op_histogram=histogram,
        integer_kernels=sum(v for k, v in histogram.items() if k in INTEGER_KERNELS),
        float_compute=sum(v for k, v in histogram.items() if k in FLOAT_COMPUTE),
        samples=sum(r[0].shape[0] if r and r[0].ndim else 1 for r in refs),
        sensitivity=sens_abs / norm, sensitivity_steps=sens_abs / step if step is not None else None,
        sensitivity_argmax_agreement=sens_agreement,
    )
    if failed and raise_on_failure:
        r = failed[0]
        agree = "" if r.argmax_agreement is None else (
            f", argmax agreement {100 * r.argmax_agreement:.2f}% (min {100 * needed_agreement:.2f}%)"
        )
        where = next((f" At {x.level} it {x.divergence}." for x in failed if x.divergence is not None and x.divergence.quantizer), "")
        raise ParityError(
            f"onnxruntime ({r.provider}, {r.level}) differs from the frozen module: max abs error {r.max_abs_error:.3g} = "
            f"{r.error:.3g} {unit}, allowed {r.allowed:.3g} = the larger of the tolerance {tol:g} and "
            f"{SENSITIVITY_FACTOR:g} x the model's own sensitivity {sens_abs / (step if step is not None else norm):.3g} "
            f"(same unit){agree}.{where} If only {LEVELS['all']} fails, an optimized kernel changes the numbers (compare levels "
            "in the report); otherwise the export is wrong for this model. Pass raise_on_failure=False to get the "
            "full report.\n" + str(report)
        )
    return report
