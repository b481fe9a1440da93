"""Pass `decompose_attention`: fused attention becomes `matmul -> softmax -> matmul`, so its matmuls quantize.

Fused attention kernels keep their two matmuls float (no runtime has an integer fused attention that reads
Q/DQ), and `nn.MultiheadAttention` is a leaf module for symbolic tracing, so its projections stayed float
too. This pass rewrites, in fxquant's own copy of the model:

- `F.scaled_dot_product_attention` / `aten.scaled_dot_product_attention` calls (Hugging Face's "sdpa"
  attention, torch.export graphs) without dropout into `softmax(mask(Q @ K^T * scale)) @ V` — the math the
  fused kernel computes (grouped-query attention included);
- `nn.MultiheadAttention` module calls of self-attention (one input for query, key and value, packed
  in-projection, no `bias_k`/`add_zero_attn`, no dropout while training) into the in-projection `F.linear`,
  the same two matmuls, and the out-projection `F.linear`, returning what the module returns.

Afterwards the registry's matmul/linear entries apply: both attention matmuls get activation quantizers
(onnxruntime runs them as integer MatMuls) and the projections get weight quantizers. Other attention calls
are left as they are (float, reported by `fxq.report`). The helper functions below are plain tensor code
that torch.export and the ONNX exporter trace through.
"""

from __future__ import annotations

import inspect
import math
import operator
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from fxquant.annotations import MODULE_META_KEY, module_stack_path
from fxquant.op_registry import facts_of
from fxquant.passes import ANALYZED, ATTENTION_DECOMPOSED, SHAPES, graph_pass


def attention_scores(
    scores: Tensor, attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor], is_causal: bool, scale: float
) -> Tensor:
    """`scores * scale` with the causal, attention and key-padding masks applied as SDPA and
    `nn.MultiheadAttention` apply them (boolean masks: True keeps for SDPA's `attn_mask`, True drops for
    `key_padding_mask` and MHA's boolean `attn_mask` is passed here already inverted; float masks add)."""
    scores = scores * scale
    if is_causal:
        rows, cols = scores.shape[-2], scores.shape[-1]
        keep = torch.ones(rows, cols, dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    if key_padding_mask is not None:  # (batch, keys) -> (batch, 1, 1, keys)
        padding = key_padding_mask.reshape(key_padding_mask.shape[0], 1, 1, key_padding_mask.shape[-1])
        if padding.dtype == torch.bool:
            scores = scores.masked_fill(padding, float("-inf"))
        else:
            scores = scores + padding
    return scores


def repeat_key_value(kv: Tensor, query: Tensor) -> Tensor:
    """Grouped-query attention: repeat each key/value head for the query heads that share it (dim -3)."""
    repeats = query.shape[-3] // kv.shape[-3]
    return kv.repeat_interleave(repeats, dim=-3) if repeats > 1 else kv


def split_heads(qkv: Tensor, num_heads: int, batch_first: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """The packed in-projection `(B, L, 3E)` (or `(L, B, 3E)`) as query, key, value of shape `(B, H, L, E/H)`."""
    if not batch_first:
        qkv = qkv.transpose(0, 1)
    batch, length, packed = qkv.shape
    head_dim = packed // (3 * num_heads)
    heads = qkv.reshape(batch, length, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
    return heads[0], heads[1], heads[2]


def merge_heads(context: Tensor, batch_first: bool) -> Tensor:
    """`(B, H, L, D)` attention output back to `(B, L, H*D)` (or `(L, B, H*D)`)."""
    batch, heads, length, head_dim = context.shape
    merged = context.transpose(1, 2).reshape(batch, length, heads * head_dim)
    return merged if batch_first else merged.transpose(0, 1)


def attention_result(
    out: Tensor, probabilities: Tensor, need_weights: bool, average_attn_weights: bool
) -> Tuple[Tensor, Optional[Tensor]]:
    """What `nn.MultiheadAttention.forward` returns: the output and the attention weights if asked for."""
    if not need_weights:
        return out, None
    return out, (probabilities.mean(dim=1) if average_attn_weights else probabilities)


def _new(graph: fx.Graph, target: Any, args: Tuple[Any, ...], module: Optional[str]) -> fx.Node:
    node = graph.call_function(target, args)
    if module is not None:
        node.meta[MODULE_META_KEY] = module
    return node


def _attention_core(
    graph: fx.Graph, q: Any, k: Any, v: Any, masks: Tuple[Any, Any, bool], scale: float, gqa: bool, where: str
) -> Tuple[fx.Node, fx.Node]:
    """Insert `softmax(mask(q @ k^T * scale)) @ v`; returns (context, probabilities)."""
    if gqa:
        k = _new(graph, repeat_key_value, (k, q), None)
        v = _new(graph, repeat_key_value, (v, q), None)
    k_t = _new(graph, torch.transpose, (k, -2, -1), None)
    scores = _new(graph, torch.matmul, (q, k_t), f"{where}.scores")
    attn_mask, key_padding_mask, is_causal = masks
    scores = _new(graph, attention_scores, (scores, attn_mask, key_padding_mask, is_causal, scale), None)
    probabilities = _new(graph, torch.softmax, (scores, -1), None)
    context = _new(graph, torch.matmul, (probabilities, v), f"{where}.context")
    return context, probabilities


def _where(node: fx.Node) -> str:
    """The module path an attention call came from (for the matmuls' names), else the node name."""
    return module_stack_path(node) or str(node.meta.get(MODULE_META_KEY) or node.name)


def _decompose_sdpa(gm: fx.GraphModule, node: fx.Node) -> bool:
    facts = facts_of(node)
    assert facts is not None
    values: Dict[str, Any] = {name: facts.argument(node, name) for name in facts.arguments}
    if values["dropout_p"] not in (None, 0, 0.0):
        return False
    q = values["query"]
    tm = q.meta.get("tensor_meta") if isinstance(q, fx.Node) else None
    if tm is None or not hasattr(tm, "shape"):
        return False
    scale = values["scale"] if values["scale"] is not None else 1.0 / math.sqrt(int(tm.shape[-1]))
    if not isinstance(scale, (int, float)) or not isinstance(values["is_causal"] or False, bool):
        return False
    with gm.graph.inserting_before(node):
        context, _ = _attention_core(
            gm.graph, q, values["key"], values["value"], (values["attn_mask"], None, bool(values["is_causal"])),
            float(scale), bool(values["enable_gqa"]), _where(node),
        )
    context.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")})
    node.replace_all_uses_with(context)
    gm.graph.erase_node(node)
    return True


_MHA_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


def _decompose_mha(gm: fx.GraphModule, node: fx.Node, mod: nn.MultiheadAttention) -> bool:
    try:
        bound = _MHA_SIGNATURE.bind(None, *node.args, **node.kwargs)
    except TypeError:
        return False
    bound.apply_defaults()
    a = bound.arguments
    x = a["query"]
    tm = x.meta.get("tensor_meta") if isinstance(x, fx.Node) else None
    if not (isinstance(x, fx.Node) and a["key"] is x and a["value"] is x and tm is not None and hasattr(tm, "shape")):
        return False  # cross-attention (separate key/value) stays a float module call
    if not mod._qkv_same_embed_dim or mod.in_proj_weight is None or mod.bias_k is not None or mod.add_zero_attn:
        return False
    if mod.dropout > 0 and mod.training:
        return False
    if not all(isinstance(a[k], bool) for k in ("need_weights", "average_attn_weights", "is_causal")):
        return False
    if len(tm.shape) != 3 or not _is_mask_of_rank(a["attn_mask"], 2) or not _is_mask_of_rank(a["key_padding_mask"], 2):
        return False  # unbatched inputs and per-head (B*H, L, S) masks stay a float module call
    path = str(node.target)
    graph = gm.graph
    with graph.inserting_before(node):
        w_in = graph.get_attr(f"{path}.in_proj_weight")
        b_in = graph.get_attr(f"{path}.in_proj_bias") if mod.in_proj_bias is not None else None
        qkv = _new(graph, F.linear, (x, w_in, b_in), f"{path}.in_proj")
        heads = _new(graph, split_heads, (qkv, mod.num_heads, bool(mod.batch_first)), None)
        q, k, v = (_new(graph, operator.getitem, (heads, i), None) for i in range(3))
        attn_mask = a["attn_mask"]
        if attn_mask is not None:  # MHA's boolean masks mark what to drop: invert to SDPA's "True keeps"
            attn_mask = _new(graph, _keep_mask, (attn_mask,), None)
        masks = (attn_mask, a["key_padding_mask"], False)  # MHA's is_causal is a hint about attn_mask
        context, probabilities = _attention_core(
            graph, q, k, v, masks, 1.0 / math.sqrt(mod.head_dim), False, path
        )
        merged = _new(graph, merge_heads, (context, bool(mod.batch_first)), None)
        w_out = graph.get_attr(f"{path}.out_proj.weight")
        b_out = graph.get_attr(f"{path}.out_proj.bias") if mod.out_proj.bias is not None else None
        out = _new(graph, F.linear, (merged, w_out, b_out), f"{path}.out_proj")
        result = _new(
            graph, attention_result,
            (out, probabilities, a["need_weights"], a["average_attn_weights"]), None,
        )
    node.replace_all_uses_with(result)
    graph.erase_node(node)
    return True


def _is_mask_of_rank(mask: Any, rank: int) -> bool:
    """No mask, or a graph tensor of the given rank."""
    if mask is None:
        return True
    tm = mask.meta.get("tensor_meta") if isinstance(mask, fx.Node) else None
    return tm is not None and hasattr(tm, "shape") and len(tm.shape) == rank


def _keep_mask(attn_mask: Tensor) -> Tensor:
    """MHA's `attn_mask` in SDPA's convention: a boolean mask inverted (True keeps), a float mask as is."""
    return ~attn_mask if attn_mask.dtype == torch.bool else attn_mask


@graph_pass(ensures=(ATTENTION_DECOMPOSED,), invalidates=(SHAPES, ANALYZED))
def decompose_attention(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite fused attention calls and self-attention `nn.MultiheadAttention` modules as matmuls (see the
    module docstring); other calls stay as they are."""
    changed = False
    for node in list(gm.graph.nodes):
        facts = facts_of(node)
        if node.op == "call_function" and facts is not None and facts.name == "scaled_dot_product_attention":
            changed |= _decompose_sdpa(gm, node)
        elif node.op == "call_module":
            mod = gm.get_submodule(str(node.target))
            if isinstance(mod, nn.MultiheadAttention):
                changed |= _decompose_mha(gm, node, mod)
    if changed:
        gm.graph.eliminate_dead_code()
        gm.delete_all_unused_submodules()
    return gm
