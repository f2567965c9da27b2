"""Fused attention over whole sequences: the Pallas splash kernel (TPU) and cuDNN's (GPU).

  out_BxTxNxH = kernels.attention("splash", q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segments_BxT, scale)

Both compute causal attention inside each segment: `segments_BxT` is 0 on padding and
1, 2, ... for the examples packed into a row (1 everywhere real without packing). A query
attends to keys at or before it with the same segment id, so real tokens never see
padding or another example; padding positions attend among themselves and their outputs
are never read (the losses mask them), where the XLA path (`layers.attention`) gives them
the mean of the values instead. Neither kernel materialises the [T, S] scores of a head.

`model.attention` picks the path (`rlhfx.models.load.resolve_attention`): "auto" is splash
on TPU, cuDNN on GPU and XLA on CPU. The KV-cache path (sampling), a reward model's
selected last-layer queries and sliding-window models always use XLA.

splash: `jax.experimental.pallas.ops.tpu.splash_attention`, an MQA kernel per key/value
head (grouped query heads are its heads), vmapped over rows and key/value heads; for
another platform than TPU (`sharding.platform()`) it runs in Pallas interpret mode (the
tests). Under a mesh it runs per shard
(`jax.shard_map`): rows over the batch axes, key/value heads over `tensor` when they
divide. cuDNN: `jax.nn.dot_product_attention(implementation="cudnn")` with the segment
mask (which cuDNN takes as a [B, 1, T, S] bias); 16-bit inputs only (`fits`). Not yet run on a
GPU: the device check (benchmarks/gpu.sh) waits for a lent machine.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from rlhfx.sharding import BATCH_AXES, platform

Array = jax.Array


def attention(kind: str, q_BxTxNxH: Array, k_BxTxKxH: Array, v_BxTxKxH: Array, segments_BxT: Array,
              scale: float) -> Array:
  """Causal attention within segments by the fused kernel `kind` ("splash" or "cudnn")."""
  if kind == "splash":
    return _per_shard(functools.partial(_splash_rows, scale=scale), q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segments_BxT)
  if kind == "cudnn":
    return segment_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segments_BxT, scale, implementation="cudnn")
  raise ValueError(f"attention kernel {kind!r}; expected splash or cudnn")


def segment_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segments_BxT, scale: float, implementation: str):
  """jax.nn.dot_product_attention, causal, with the same-segment mask ("cudnn": the fused GPU kernel; "xla"
  computes the same off GPU)."""
  mask_Bx1xTxS = (segments_BxT[:, :, None] == segments_BxT[:, None, :])[:, None]
  return jax.nn.dot_product_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, mask=mask_Bx1xTxS, scale=scale,
                                      is_causal=True, implementation=implementation)


def fits(kind: str, length: int, dtype, head_dim: int) -> bool:
  """Whether `kind` runs this attention, else the XLA path takes it: splash tiles the sequence by multiples of
  128 (TPU lanes), so shorter or odd lengths (a model's init, a small bucket) do not; cuDNN's fused kernel
  takes 16-bit inputs and head dims that are multiples of 8 up to 256 (a float32 model uses XLA)."""
  if kind == "splash":
    return length % 128 == 0
  if kind == "cudnn":
    return jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0 and head_dim <= 256
  return False


def block_size(length: int) -> int:
  """The splash kernel's tile: the largest of 512, 256, 128 dividing `length`."""
  return next(b for b in (512, 256, 128) if length % b == 0)


def _splash_kernel(length: int, group: int):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

  b = block_size(length)
  sizes = splash.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                            block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
  mask = masks.MultiHeadMask([masks.CausalMask((length, length)) for _ in range(group)])
  return splash.make_splash_mqa(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                interpret=platform() != "tpu"), splash.SegmentIds


def _splash_rows(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segments_BxT, *, scale: float):
  """This shard's rows: per row and key/value head, one MQA kernel call over the G query heads of that head."""
  _, t, n, h = q_BxTxNxH.shape
  kv = k_BxTxKxH.shape[2]
  g = n // kv
  kernel, segment_ids = _splash_kernel(t, g)

  def row(q_TxNxH, k_TxKxH, v_TxKxH, segments_T):
    q_KxGxTxH = (q_TxNxH * jnp.asarray(scale, q_TxNxH.dtype)).reshape(t, kv, g, h).transpose(1, 2, 0, 3)
    ids = segment_ids(q=segments_T, kv=segments_T)
    out_KxGxTxH = jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=ids))(
        q_KxGxTxH, k_TxKxH.swapaxes(0, 1), v_TxKxH.swapaxes(0, 1))
    return out_KxGxTxH.transpose(2, 0, 1, 3).reshape(t, n, h)

  return jax.vmap(row)(q_BxTxNxH, k_BxTxKxH.astype(q_BxTxNxH.dtype), v_BxTxKxH.astype(q_BxTxNxH.dtype),
                       segments_BxT.astype(jnp.int32))


def _per_shard(fn, q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segments_BxT):
  """`fn` on each device's rows and heads under the active mesh (a custom kernel is not partitioned by XLA);
  directly without one."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return fn(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segments_BxT)
  # the rows' mesh axes are the active rules' (a sweep program's members take `data`: rlhfx.members)
  wanted = dict(nn.get_logical_axis_rules() or ()).get("activation_batch", BATCH_AXES)
  wanted = (wanted,) if isinstance(wanted, str) else tuple(wanted or ())
  batch = tuple(a for a in wanted if a in mesh.axis_names)
  if q_BxTxNxH.shape[0] % math.prod(mesh.shape[a] for a in batch):
    batch = ()
  tensor = mesh.shape.get("tensor", 1)
  heads = "tensor" if tensor > 1 and k_BxTxKxH.shape[2] % tensor == 0 else None
  qkv = P(batch or None, None, heads, None)
  return jax.shard_map(fn, in_specs=(qkv, qkv, qkv, P(batch or None, None)), out_specs=qkv,
                       check_vma=False)(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segments_BxT)
