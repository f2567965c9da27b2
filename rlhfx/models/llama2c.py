"""llama2.c legacy checkpoints (e.g. stories260K.bin) -> rlhfx params, through the Hugging Face tensor table.

  config, params = from_llama2c("stories260K.bin")
"""

from __future__ import annotations

import math
import os
import struct

import numpy as np

from rlhfx import hub
from rlhfx.models.config import ModelConfig
from rlhfx.models.convert import CheckpointError, params_from_hf_tensors, tensor_table


def _permute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Interleaved-pair RoPE rows (llama2.c / Meta) -> rotate-half order (as HF's conversion script)."""
  out_dim, in_dim = w.shape
  return w.reshape(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(0, 2, 1, 3).reshape(out_dim, in_dim)


def from_llama2c(path: str | os.PathLike, **config_overrides):
  """(ModelConfig, params) from a llama2.c legacy checkpoint (e.g. stories260K.bin; an hf:// file is read from the
  Hugging Face cache, `rlhfx.hub`).

  Layout: 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len;
  a negative vocab_size means an unshared classifier), then float32 arrays.
  """
  path = hub.local_file(path)
  if not path.is_file():
    raise CheckpointError(f"{path}: no such llama2.c checkpoint file")
  data = path.read_bytes()
  if len(data) < 28:
    raise CheckpointError(f"{path}: {len(data)} bytes is too short for a llama2.c header (28 bytes)")
  dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack("7i", data[:28])
  shared = vocab > 0
  vocab = abs(vocab)
  if min(dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len) <= 0 or dim % n_heads:
    raise CheckpointError(f"{path}: header {(dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len)} is not valid")
  head = dim // n_heads
  layout = [("tok_embeddings", (vocab, dim)), ("rms_att", (n_layers, dim)),
            ("wq", (n_layers, n_heads * head, dim)), ("wk", (n_layers, n_kv * head, dim)),
            ("wv", (n_layers, n_kv * head, dim)), ("wo", (n_layers, dim, n_heads * head)),
            ("rms_ffn", (n_layers, dim)), ("w1", (n_layers, hidden, dim)), ("w2", (n_layers, dim, hidden)),
            ("w3", (n_layers, hidden, dim)), ("rms_final", (dim,)),
            ("freq_cis_real", (seq_len, head // 2)), ("freq_cis_imag", (seq_len, head // 2))]
  if not shared:
    layout.append(("classifier", (vocab, dim)))
  arrays, offset = {}, 28
  for name, shape in layout:
    nbytes = 4 * math.prod(shape)
    if offset + nbytes > len(data):
      raise CheckpointError(f"{path}: truncated at tensor {name!r} (needs bytes {offset}..{offset + nbytes}, "
                            f"file has {len(data)})")
    arrays[name] = np.frombuffer(data, np.float32, math.prod(shape), offset).reshape(shape)
    offset += nbytes
  if offset != len(data):
    raise CheckpointError(f"{path}: {len(data) - offset} unexpected trailing bytes after the last tensor")

  config = ModelConfig(vocab_size=vocab, d_model=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv,
                       d_ff=hidden, max_seq_len=seq_len, tie_embeddings=shared, bos_token_id=1, eos_token_id=2,
                       arch="llama")
  config = config.replace(**config_overrides)
  hf = {"model.embed_tokens.weight": arrays["tok_embeddings"], "model.norm.weight": arrays["rms_final"]}
  if not shared:
    hf["lm_head.weight"] = arrays["classifier"]
  for i in range(n_layers):
    h = f"model.layers.{i}."
    hf.update({h + "input_layernorm.weight": arrays["rms_att"][i],
               h + "post_attention_layernorm.weight": arrays["rms_ffn"][i],
               h + "self_attn.q_proj.weight": _permute_rope_rows(arrays["wq"][i], n_heads),
               h + "self_attn.k_proj.weight": _permute_rope_rows(arrays["wk"][i], n_kv),
               h + "self_attn.v_proj.weight": arrays["wv"][i], h + "self_attn.o_proj.weight": arrays["wo"][i],
               h + "mlp.gate_proj.weight": arrays["w1"][i], h + "mlp.down_proj.weight": arrays["w2"][i],
               h + "mlp.up_proj.weight": arrays["w3"][i]})
  return config, params_from_hf_tensors(config, hf, tensor_table(config))
