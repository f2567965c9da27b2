"""Examples/s of the preference input pipeline (read + tokenize + truncate + bucket-pad + batch); one JSON line.

  python benchmarks/data.py                       # hh-rlhf harmless-base test split, GPT-2 BPE
  python benchmarks/data.py --tokenizer ../shared/data/llama2_tokenizer/tokenizer.model

Builds the ArrayRecord dataset once into a temporary directory (build time reported
separately), then times --epochs passes of the Grain pipeline.
"""

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--data", default=str(SHARED / "hh_rlhf" / "harmless-base-test.jsonl.gz"))
  p.add_argument("--input-format", default="hh")
  p.add_argument("--tokenizer", default=str(SHARED / "gpt2_tokenizer"))
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--buckets", default="128,256,512")
  p.add_argument("--max-length", type=int, default=512)
  p.add_argument("--max-prompt-length", type=int, default=256)
  p.add_argument("--epochs", type=int, default=2)
  args = p.parse_args()

  from rlhfx.data import builders, pipeline
  from rlhfx.data.tokenize import Truncation, load_tokenizer

  tokenizer = load_tokenizer(args.tokenizer)
  with tempfile.TemporaryDirectory() as tmp:
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # TFDS prints progress on stdout
      builder = builders.build("preference", [args.data], data_dir=tmp, input_format=args.input_format,
                               on_error="skip")
    build_s = time.perf_counter() - t0
    source = builders.data_source(tmp)
    stats = pipeline.Stats()
    ds = pipeline.make_dataset(source, tokenizer, kind="preference", global_batch_size=args.batch,
                               buckets=[int(b) for b in args.buckets.split(",")],
                               truncation=Truncation(args.max_length, args.max_prompt_length),
                               num_epochs=args.epochs, stats=stats, process_index=0, process_count=1)
    shapes, n_batches = set(), 0
    t0 = time.perf_counter()
    for batch in ds:
      n_batches += 1
      shapes.add(batch["chosen_tokens_BxT"].shape[1])
    seconds = time.perf_counter() - t0
  n = n_batches * args.batch
  print(json.dumps({
      "impl": "rlhfx", "algo": "data_pipeline", "data": Path(args.data).name, "tokenizer": Path(args.tokenizer).name,
      "batch": args.batch, "epochs": args.epochs, "examples": n, "batches": n_batches,
      "examples_per_s": n / seconds,
      "build_s": build_s, "build_counts": dict(builder.stats), "pipeline_counts": stats.snapshot(),
      "distinct_lengths": sorted(shapes)}))


if __name__ == "__main__":
  main()
