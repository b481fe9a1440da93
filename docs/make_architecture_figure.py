"""Draw docs/images/architecture.png: fxquant's pipeline and what each step reads and writes.

Run from the repository root: `.venv/bin/python docs/make_architecture_figure.py`. The picture is described
in docs/architecture.md; change both together.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

OUT = Path(__file__).resolve().parent / "images" / "architecture.png"

# (step, module(s), what it writes) from top to bottom; the row index is the vertical position.
STEPS = [
    ("user model", "any nn.Module", "never modified (unless prepare(inplace=True)):\nprepare works on a deep copy"),
    ("1  capture", "tracing.capture_model\ntracing.propagate_shapes",
     "torch.fx.GraphModule of the copy; node.meta['tensor_meta'];\nfxquant_float_modules, fxquant_dynamic_shapes"),
    ("lower", "passes.functionalize_modules\npasses.attention.decompose_attention\npasses.fold_bn.fold_batchnorm",
     "module calls -> F.conv2d / F.linear with get_attr weights;\nSDPA / MHA -> matmul-softmax-matmul; BN folded into weights"),
    ("2  analyze", "analyze.analyze",
     "only node.meta['fxquant'] = NodeAnnotation(QuantOp, TensorInfo\nwith ActPoints); no node, edge or module changes"),
    ("3  insert", "passes.insert",
     "call_module nodes fxq_quantizers.<name>: LearnableQuantizer\n(weights, activations), BiasQuantizer (int32 bias)"),
    ("4  calibrate", "calibration.calibrate",
     "clamp values lo / hi and `initialized` (bits only with bits=...);\nvalues only: the graph is not touched"),
    ("5  finetune", "finetune.finetune\nlosses",
     "values of weights, clamps, bits_param\n(never the graph); FinetuneResult with the history"),
    ("6  freeze", "preparation.freeze\npasses.freeze.freeze_quantizers",
     "a new module: FrozenWeight, FrozenActivationQuantizer,\nFrozenBias in fxq_quantizers; float weights dropped"),
    ("7  export", "export.qdq.export_onnx\nexport.ops",
     "onnx.ModelProto: QuantizeLinear / DequantizeLinear,\ninteger initializers, metadata fxquant.*"),
    ("8  verify / report", "verify.verify\nreport.report",
     "VerifyReport (onnxruntime vs frozen),\nQuantReport (one row per quantizer)"),
]

ROW = 1.32  # vertical distance between rows
BOX_H = 1.0
STEP_X, STEP_W = 4.0, 5.65  # step boxes
NAME_W = 1.95  # the step name, left in its box; the modules follow
TEXT_X = STEP_X + STEP_W + 0.35  # what each step writes
SIDE_X, SIDE_W = 0.2, 3.0  # op registry and QParams


def y_of(row: int) -> float:
    return (len(STEPS) - 1 - row) * ROW + 0.5


def box(ax, x, y, w, h, face, edge, lw=1.4, dashed=False):  # noqa: ANN001, ANN201
    patch = FancyBboxPatch(
        (x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.12", facecolor=face, edgecolor=edge, linewidth=lw,
        linestyle="--" if dashed else "-",
    )
    ax.add_patch(patch)
    return patch


def arrow(ax, start, end, color="#333333", dashed=False, rad=0.0, lw=1.4):  # noqa: ANN001, ANN201
    ax.add_patch(FancyArrowPatch(
        start, end, arrowstyle="-|>", mutation_scale=13, color=color, linewidth=lw,
        linestyle=(0, (4, 3)) if dashed else "-", connectionstyle=f"arc3,rad={rad}", shrinkA=2, shrinkB=2,
    ))


def main() -> None:
    height = len(STEPS) * ROW + 1.3
    fig, ax = plt.subplots(figsize=(16.5, height * 0.78))
    ax.set_xlim(0, 17.75)
    ax.set_ylim(0.2, height)
    ax.axis("off")

    colors = {
        "user model": ("#eeeeee", "#777777"),
        "prepare": ("#dbe9f6", "#2b6cb0"),
        "train": ("#e3f4e1", "#2f855a"),
        "deploy": ("#fdebd3", "#c05621"),
    }
    group_of = ["user model", "prepare", "prepare", "prepare", "prepare", "train", "train", "deploy", "deploy", "deploy"]
    for row, (name, modules, writes) in enumerate(STEPS):
        face, edge = colors[group_of[row]]
        y = y_of(row)
        box(ax, STEP_X, y, STEP_W, BOX_H, face, edge)
        ax.text(STEP_X + 0.15, y + BOX_H / 2, name.replace(" / ", " /\n"), fontsize=11.5, fontweight="bold",
                va="center", ha="left")
        ax.text(STEP_X + NAME_W, y + BOX_H / 2, modules, fontsize=8.6, va="center", ha="left", family="monospace",
                color="#222222")
        ax.text(TEXT_X, y + BOX_H / 2, writes, fontsize=9.2, va="center", ha="left", color="#222222")
        if row > 0:
            arrow(ax, (STEP_X + 0.9, y_of(row - 1)), (STEP_X + 0.9, y + BOX_H))

    # Brackets naming the public verbs.
    def bracket(first: int, last: int, label: str, color: str) -> None:
        x = 17.2
        top, bottom = y_of(first) + BOX_H, y_of(last)
        ax.plot([x - 0.12, x, x, x - 0.12], [top, top, bottom, bottom], color=color, linewidth=1.6)
        ax.text(x + 0.1, (top + bottom) / 2, label, rotation=90, va="center", ha="left", fontsize=9, color=color,
                family="monospace")

    bracket(1, 4, "prepare(model, example_inputs, config)", colors["prepare"][1])
    bracket(5, 6, "calibrate, finetune", colors["train"][1])
    bracket(7, 9, "freeze, export_onnx, verify", colors["deploy"][1])

    # The op registry, read by lowering, analysis, bias insertion and export.
    reg_top, reg_bottom = y_of(2) + BOX_H, y_of(4)
    box(ax, SIDE_X, reg_bottom, SIDE_W, reg_top - reg_bottom, "#f3e8fd", "#6b46c1", dashed=True)
    ax.text(SIDE_X + SIDE_W / 2, reg_top - 0.15, "op_registry.REGISTRY", fontsize=10.5, fontweight="bold",
            ha="center", va="top", family="monospace", color="#44337a")
    ax.text(SIDE_X + 0.15, reg_top - 0.6,
            "one OpFacts per op layout:\n"
            "spellings (torch, F.*, aten,\n  Tensor methods, modules),\n"
            "arguments, kind, sign,\nlayout_only, fused_activation,\njoin, int32_bias,\n"
            "output_quantized,\nabsorbs_batchnorm, float_reason\n\nread through facts_of(node)",
            fontsize=8.6, ha="left", va="top", color="#44337a")
    for row in (2, 3, 4):
        arrow(ax, (SIDE_X + SIDE_W, y_of(row) + BOX_H / 2), (STEP_X, y_of(row) + BOX_H / 2), color="#6b46c1",
              dashed=True)
    arrow(ax, (SIDE_X + SIDE_W - 0.5, reg_bottom), (STEP_X, y_of(8) + BOX_H * 0.75), color="#6b46c1", dashed=True,
          rad=0.25)
    ax.text(SIDE_X + 2.05, y_of(6) + 0.2, "export: linear\n-> MatMul", fontsize=8, color="#6b46c1", ha="center")

    # QParams: what freeze decides and export, verify and report read.
    qp_top, qp_bottom = y_of(7) + BOX_H * 0.3, y_of(9) + BOX_H * 0.2
    box(ax, SIDE_X, qp_bottom, SIDE_W, qp_top - qp_bottom, "#fff5d6", "#b7791f", dashed=True)
    ax.text(SIDE_X + SIDE_W / 2, qp_top - 0.15, "qparams.QParams", fontsize=10.5, fontweight="bold", ha="center",
            va="top", family="monospace", color="#744210")
    ax.text(SIDE_X + 0.15, qp_top - 0.6,
            "frozen quantizer .qparams():\nbits, scale, zero_point,\nqmin, qmax, layout, axis,\n"
            "block_size, container\n\nexport lowers it; verify and\nreport read steps and bits", fontsize=8.6, ha="left", va="top", color="#744210")
    arrow(ax, (STEP_X, y_of(7) + BOX_H / 2), (SIDE_X + SIDE_W, qp_top - 0.3), color="#b7791f", dashed=True)
    for row in (8, 9):
        arrow(ax, (SIDE_X + SIDE_W, y_of(row) + BOX_H / 2 - 0.1), (STEP_X, y_of(row) + BOX_H / 2 - 0.1),
              color="#b7791f", dashed=True)

    ax.text(0.2, height - 0.35, "fxquant: the pipeline and its data", fontsize=14, fontweight="bold", va="top")
    ax.text(0.2, height - 0.8, "solid: each step takes the previous step's output;  dashed: shared tables and "
            "typed parameters", fontsize=9.5, va="top", color="#444444")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT, dpi=110, bbox_inches="tight")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
