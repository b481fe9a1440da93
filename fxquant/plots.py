"""Pictures of a quantized model: bits per quantizer, and the fine-tune history.

- `plot_bits(rows, path, targets)`: one bar per quantizer (weights and activations in two colours, with a
  legend), a dashed line per bit target, axis labels; `rows` are `fxq.report(...)` rows of a module or of an
  `.onnx` file (anything with `name`, `kind` and `bits`), or the `bits_per_quantizer` dicts of a summary.
- `plot_history(result, path)`: the `FinetuneResult` of `fxq.finetune`, per step: the loss (distillation and
  penalty) and the average weight and activation bits against their targets, with the restored step marked.

- `draw_pictures(out_dir, rows, result, ...)`: both into `out_dir` (`bits.png`, `finetune.png`), a failure to
  draw being one warning: the numbers are saved before (`fxquant demo`, `fxquant quantize`).

matplotlib is imported here only (headless `Agg` backend), so the library works without it until a picture
is asked for; `fxquant demo`, `fxquant quantize` and `fxquant inspect --plot` call these.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

WEIGHT_COLOR = "tab:blue"
ACTIVATION_COLOR = "tab:orange"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _field(row: Any, name: str) -> Any:
    if isinstance(row, Mapping):
        return row[name]
    if name == "name" and not hasattr(row, "name"):
        return row.quantizer  # rows of an .onnx report
    return getattr(row, name)


def plot_bits(rows: Sequence[Any], path: str, targets: Optional[Dict[str, float]] = None, title: str = "") -> None:
    """A bar chart of the bits of every quantizer (see the module docstring).

    Args:
        rows: report rows or dicts with `name`, `kind` ("weight"/"activation"/"bias") and `bits`.
        path: the image file to write (PNG by its suffix).
        targets: average-bit targets to draw, by kind (`{"weight": 4.0}`); None draws none.
        title: a title above the plot (short; the legend says what the colours are).
    """
    plt = _pyplot()
    shown = [r for r in rows if _field(r, "kind") in ("weight", "activation")]
    names = [str(_field(r, "name")) for r in shown]
    bits = [float(_field(r, "bits")) for r in shown]
    colors = [WEIGHT_COLOR if _field(r, "kind") == "weight" else ACTIVATION_COLOR for r in shown]
    fig, ax = plt.subplots(figsize=(min(max(6.0, 0.42 * len(shown) + 2.0), 24.0), 4.2))
    ax.bar(range(len(shown)), bits, color=colors)
    ax.set_xticks(range(len(shown)))
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("integer bits")
    ax.set_xlabel("quantizer (in graph order)")
    ax.set_ylim(0, max(bits + [8.0]) + 3.5)  # room above the bars for the legend
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles: List[Any] = [Patch(color=WEIGHT_COLOR, label="weights"), Patch(color=ACTIVATION_COLOR, label="activations")]
    for kind, value in (targets or {}).items():
        color = WEIGHT_COLOR if kind == "weight" else ACTIVATION_COLOR
        ax.axhline(value, color=color, linestyle="--", linewidth=1)
        handles.append(Line2D([0], [0], color=color, linestyle="--", label=f"{kind} target {value:g} bits"))
    ax.legend(handles=handles, loc="upper left", ncol=2, fontsize=8, framealpha=0.9)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _target_values(result: Any) -> Tuple[Optional[float], Optional[float]]:
    target = getattr(result, "target", None)
    if target is None:
        return None, None
    return getattr(target, "weight", None), getattr(target, "activation", None)


def targets_of(result: Any) -> Dict[str, float]:
    """The bit targets of a `FinetuneResult` by kind, for `plot_bits` (empty without a target)."""
    weight, activation = _target_values(result)
    return {k: v for k, v in (("weight", weight), ("activation", activation)) if v is not None}


def plot_history(result: Any, path: str, title: str = "") -> None:
    """The fine-tune history of a `FinetuneResult`: loss and average bits per step (see the module docstring)."""
    plt = _pyplot()
    history = list(result.history)
    steps = [r.step for r in history]
    fig, (loss_ax, bits_ax) = plt.subplots(1, 2, figsize=(10.0, 3.8))
    base = [r.base for r in history]
    total = [r.loss for r in history]
    if any(r.penalty > 0 for r in history):
        loss_ax.plot(steps, total, label="loss with bit penalty", color="tab:red", linewidth=1, alpha=0.7)
    loss_ax.plot(steps, base, label="distillation loss", color="tab:green", linewidth=1)
    positive = [v for v in base + total if isinstance(v, float) and math.isfinite(v) and v > 0]
    if positive and max(positive) / min(positive) > 20:
        loss_ax.set_yscale("log")
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("loss")
    bits_ax.plot(steps, [r.avg_learnable_weight_bits for r in history], color=WEIGHT_COLOR,
                 label="weights that learn bits (average)")
    bits_ax.plot(steps, [r.avg_weight_bits for r in history], color=WEIGHT_COLOR, alpha=0.4, linewidth=1,
                 label="all weights (size-weighted)")
    bits_ax.plot(steps, [r.avg_activation_bits for r in history], color=ACTIVATION_COLOR,
                 label="activations (average, fixed ones included)")
    weight_target, activation_target = _target_values(result)
    if weight_target is not None:
        bits_ax.axhline(weight_target, color=WEIGHT_COLOR, linestyle="--", linewidth=1, label="weight target")
    if activation_target is not None:
        bits_ax.axhline(activation_target, color=ACTIVATION_COLOR, linestyle="--", linewidth=1,
                        label="activation target")
    bits_ax.set_xlabel("step")
    bits_ax.set_ylabel("integer bits")
    best = getattr(result, "best_step", None)
    for ax, where in ((loss_ax, "best"), (bits_ax, "center right")):
        if best is not None:
            ax.axvline(best, color="gray", linestyle=":", linewidth=1, label=f"restored step {best}")
        ax.legend(fontsize=8, framealpha=0.9, loc=where)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def draw_pictures(
    out_dir: str, rows: Sequence[Any], result: Optional[Any], summary_path: str, who: str, bits_title: str,
    history_title: str,
) -> List[str]:
    """`out_dir/bits.png`, and `out_dir/finetune.png` when `result` (a `FinetuneResult`) has a history.

    A failure to draw is one warning (`"<who>: could not draw <path> (...); the results are in <summary>"`),
    not an error: the numbers are already in `summary_path`. Returns the paths written.
    """
    written: List[str] = []
    path = os.path.join(out_dir, "bits.png")
    try:
        plot_bits(rows, path, targets=targets_of(result) if result is not None else None, title=bits_title)
        written.append(path)
        if result is not None and result.history:
            path = os.path.join(out_dir, "finetune.png")
            plot_history(result, path, title=history_title)
            written.append(path)
    except Exception as e:  # noqa: BLE001 - the pictures are optional; the numbers are already saved
        warnings.warn(f"{who}: could not draw {path} ({type(e).__name__}: {e}); the results are in {summary_path}",
                      stacklevel=3)
    return written
