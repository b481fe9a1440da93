"""How fxquant's steps scale with model size: Llama-style causal LMs from ~10M to ~1B parameters, on CPU.

For each size, in a fresh subprocess (so peak memory is that model's alone): the time of `prepare`,
`calibrate` per batch as a ratio to a float forward of the same batch (and, in seconds, its fixed part: the
clip search on every weight and on a bounded sample of every activation), `freeze` and `export_onnx`, and the
peak resident memory of each step as a ratio to the float model's parameter bytes. Two memory figures:
`peak` is the process's resident memory above what it held before the model was built (the user's float
model included, so 1.0 is the least possible), `adds` is what the step adds above the memory at its start;
`float_forward_adds` is what a float forward of one calibration batch adds (its activations and logits), timed
after the other steps so that what it leaves in the heap does not count in their peaks.
Two modes: `copy`, every step as by default (prepare copies the user's model, freeze copies the prepared module;
both are kept), and `inplace`, `prepare(..., inplace=True)` and `freeze(qm, inplace=True)` (nothing is kept: the
path for a model that barely fits).

    python benchmarks/bench_scale.py [--sizes 10m,100m,400m,1b] [--batch 4] [--tokens 128] [--batches 4] [--no-export]
        [--modes copy,inplace] [--uint8-weights auto|on|off] [--warm-up]

Targets (issue 13): growth linear in size; calibrate <= 2x a float forward; peak <= 2x the model (1.3x in
place). Memory is sampled every 2 ms from /proc/self/statm (Linux).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

SIZES: Dict[str, Dict[str, int]] = {
    # hidden, layers, heads, kv heads, intermediate, vocab (vocab 32000 as on model hubs)
    "10m": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=688, vocab_size=32000),
    "100m": dict(hidden_size=768, num_hidden_layers=8, num_attention_heads=12, num_key_value_heads=4, intermediate_size=2048, vocab_size=32000),
    "400m": dict(hidden_size=1280, num_hidden_layers=14, num_attention_heads=16, num_key_value_heads=4, intermediate_size=3456, vocab_size=32000),
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=4, intermediate_size=5504, vocab_size=32000),
}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak resident set size while the block runs, sampled by a thread."""

    def __enter__(self) -> "PeakMemory":
        self.start = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def _timed(fn: Callable[[], object]) -> Tuple[object, float, PeakMemory]:
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - t0
    return out, seconds, mem


WARM_UP = dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, intermediate_size=128,
               vocab_size=1000)
"""The tiny Llama `--warm-up` runs every step on first, so the measured model's figures leave out what the
process pays once whatever the model (lazy imports of torch.export, the ONNX exporter and onnxruntime, their
caches)."""


def _llama(size: Dict[str, int], tokens: int) -> Any:  # noqa: ANN401 - transformers is imported in the child only
    """A random-weight Llama causal LM of `size` (a `SIZES` entry) in eval mode, for sequences of `tokens`."""
    import transformers as T

    cfg = T.LlamaConfig(max_position_embeddings=max(64, tokens), bos_token_id=0, eos_token_id=0, **size)
    return T.LlamaForCausalLM(cfg).eval()


def _warm_up(tokens: int, export: bool) -> None:
    """prepare -> calibrate -> freeze -> export of a tiny Llama, everything dropped afterwards."""
    import gc

    import torch

    import fxquant as fxq

    model = _llama(WARM_UP, tokens)
    cfg = model.config
    example = {"input_ids": torch.randint(0, cfg.vocab_size, (1, tokens))}
    qm = fxq.prepare(model, example)
    fxq.calibrate(qm, [{"input_ids": torch.randint(0, cfg.vocab_size, (2, tokens))}], progress=False)
    frozen = fxq.freeze(qm)
    if export:
        with tempfile.TemporaryDirectory() as tmp:
            fxq.export_onnx(frozen, example, os.path.join(tmp, "warm.onnx"))
    del model, qm, frozen
    gc.collect()


def _one(
    size: str, batch_size: int, tokens: int, num_batches: int, export: bool, inplace: bool, uint8_weights: Optional[bool],
    warm_up: bool = False,
) -> Dict[str, float]:
    """Measure one model in this process (after `_warm_up` when `warm_up`); returns the figures as a dict."""
    import gc

    import torch

    import fxquant as fxq

    torch.set_num_threads(int(os.environ.get("FXQ_THREADS", "2")))
    if warm_up:
        _warm_up(tokens, export)
    baseline = _rss()
    torch.manual_seed(0)
    model = _llama(SIZES[size], tokens)
    cfg = model.config
    params = sum(p.numel() for p in model.parameters())
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    gen = torch.Generator().manual_seed(1)

    def batch(b: int, n: int) -> Dict[str, torch.Tensor]:
        return {"input_ids": torch.randint(0, cfg.vocab_size, (b, n), generator=gen)}

    example = batch(1, tokens)
    calib = [batch(batch_size, tokens) for _ in range(num_batches)]

    def float_forward(float_model: Any) -> Tuple[float, float]:  # noqa: ANN401
        """(seconds, what it adds / model bytes) of the float forward of one calibration batch (after one warm-up)."""
        with torch.no_grad():
            float_model(**calib[0], use_cache=False)
            with PeakMemory() as forward_mem:
                t0 = time.perf_counter()
                float_model(**calib[0], use_cache=False)
                seconds = time.perf_counter() - t0
        return seconds, (forward_mem.peak - forward_mem.start) / model_bytes

    out: Dict[str, float] = {"params_M": params / 1e6, "model_GB": model_bytes / 1e9}

    def record(step: str, seconds: float, mem: PeakMemory) -> None:
        out[f"{step}_s"] = seconds
        out[f"{step}_peak_x"] = (mem.peak - baseline) / model_bytes
        out[f"{step}_adds_x"] = (mem.peak - mem.start) / model_bytes

    cfg_q = fxq.QuantConfig()
    qm, seconds, mem = _timed(lambda: fxq.prepare(model, example, cfg_q, inplace=inplace))
    record("prepare", seconds, mem)
    if inplace:
        del model  # the user's name for it; qm holds the weights now
    gc.collect()
    # calibrate = observing the batches + a fixed part, the clip search (`fit_clamps_mse`) on every weight and
    # on at most SAMPLE_MAX observed values per activation: timed apart by wrapping the search
    from fxquant.quantizer import LearnableQuantizer

    search = {"s": 0.0}
    fit = LearnableQuantizer.fit_clamps_mse

    def timed_fit(self: LearnableQuantizer, *a: object, **k: object) -> None:
        t0 = time.perf_counter()
        fit(self, *a, **k)
        search["s"] += time.perf_counter() - t0

    LearnableQuantizer.fit_clamps_mse = timed_fit  # type: ignore[method-assign]
    # [1:]: calibrate returns `qm`; a name bound to it would keep the float weights alive through export
    seconds, mem = _timed(lambda: fxq.calibrate(qm, calib, num_batches=len(calib), progress=False))[1:]
    LearnableQuantizer.fit_clamps_mse = fit  # type: ignore[method-assign]
    record("calibrate", seconds, mem)
    calibrate_per_batch = (seconds - search["s"]) / len(calib)
    out["calibrate_search_s"] = search["s"]
    frozen, seconds, mem = _timed(lambda: fxq.freeze(qm, inplace=inplace))
    record("freeze", seconds, mem)
    if export:
        del qm
        gc.collect()
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "m.onnx")
            _, seconds, mem = _timed(lambda: fxq.export_onnx(frozen, example, path, uint8_weights=uint8_weights))
            record("export", seconds, mem)
            out["onnx_MB"] = sum(os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp)) / 1e6
    out["overall_peak_x"] = max(v for k, v in out.items() if k.endswith("_peak_x"))
    # The float forward is timed last: its activations and logits (0.85x the 19M model's bytes) stay in the process's
    # heap once freed and would count in every later step's peak, though no fxquant step needs them (calibrate does
    # not compute the logits). In place the user's model is gone: the same seed builds it again.
    if inplace:
        torch.manual_seed(0)
        model = _llama(SIZES[size], tokens)
    out["float_forward_s"], out["float_forward_adds_x"] = float_forward(model)
    out["calibrate_per_batch_x_float"] = calibrate_per_batch / out["float_forward_s"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10m,100m,400m,1b", help=f"comma-separated, from {sorted(SIZES)}")
    parser.add_argument("--tokens", type=int, default=128, help="sequence length of the example and batches")
    parser.add_argument("--batch", type=int, default=4, help="batch size of the calibration batches")
    parser.add_argument("--batches", type=int, default=4, help="calibration batches")
    parser.add_argument("--no-export", action="store_true", help="skip export_onnx (the slowest step)")
    parser.add_argument("--modes", default="copy,inplace", help="modes: copy (defaults), inplace (prepare and freeze in place) or both")
    parser.add_argument("--uint8-weights", choices=("auto", "on", "off"), default="auto",
                        help="export_onnx's uint8_weights: auto (None: on where this CPU's u8s8 kernels saturate), on, off")
    parser.add_argument("--warm-up", action="store_true",
                        help="run every step on a tiny Llama first in each process (see WARM_UP), so the figures leave "
                             "out the one-time costs (imports, caches) any model pays")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        size, mode = args._child.split(":")
        uint8 = {"auto": None, "on": True, "off": False}[args.uint8_weights]
        row = _one(size, args.batch, args.tokens, args.batches, not args.no_export, mode == "inplace", uint8, args.warm_up)
        print("ROW " + json.dumps(row))
        return
    rows: List[Dict[str, object]] = []
    for size in args.sizes.split(","):
        if size not in SIZES:
            parser.error(f"unknown size {size!r}; choose from {sorted(SIZES)}")
        for mode in args.modes.split(","):
            cmd = [sys.executable, __file__, "--_child", f"{size}:{mode}", "--tokens", str(args.tokens), "--batch", str(args.batch), "--batches", str(args.batches),
                   "--uint8-weights", args.uint8_weights]
            if args.no_export:
                cmd.append("--no-export")
            if args.warm_up:
                cmd.append("--warm-up")
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("ROW ")]
            if proc.returncode != 0 or not lines:
                print(f"{size} {mode}: failed (exit {proc.returncode})\n{proc.stderr[-3000:]}", flush=True)
                continue
            row = {"size": size, "prepare": mode, "uint8_weights": args.uint8_weights, "warm_up": args.warm_up,
                   **json.loads(lines[-1][4:])}
            rows.append(row)
            _print_row(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


_HEADER_SHOWN = False


def _print_row(row: Dict[str, object]) -> None:
    global _HEADER_SHOWN
    cols = ["size", "prepare", "uint8_weights", "warm_up", "params_M", "float_forward_s", "prepare_s", "calibrate_per_batch_x_float", "calibrate_search_s", "freeze_s",
            "export_s", "float_forward_adds_x", "prepare_peak_x", "calibrate_peak_x", "freeze_peak_x", "export_peak_x", "prepare_adds_x",
            "calibrate_adds_x", "freeze_adds_x", "export_adds_x", "overall_peak_x"]
    if not _HEADER_SHOWN:
        print(" | ".join(cols), flush=True)
        _HEADER_SHOWN = True
    cells = []
    for c in cols:
        v = row.get(c, "-")
        cells.append(f"{v:.2f}" if isinstance(v, float) else str(v))
    print(" | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
