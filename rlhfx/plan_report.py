"""The planner's report as tables: per program, per chip, what the compiler and the trees say (`rlhfx.plan`)."""

from __future__ import annotations

from typing import Any

from rlhfx.topology import GiB


def _gib(n: float) -> str:
  return f"{n / GiB:8.3f}"


def render(report: dict[str, Any]) -> str:
  """The human-readable tables."""
  hbm = report["hbm_bytes_per_chip"]
  mesh = " ".join(f"{k}={v}" for k, v in report["mesh"].items())
  model = report["model"]
  lines = [f"{report['topology']} ({report['compiler_topology']}): {report['chips']} x {report['device_kind']}, "
           f"{hbm / GiB:.2f} GiB HBM per chip; mesh {mesh}",
           f"model: {model['params'] / 1e9:.2f}B parameters ({model['param_dtype']}), compute {model['dtype']}, "
           f"remat {model['remat']}, scan_layers {model['scan_layers']}, attention {model['attention']}; "
           f"grad_accum_steps "
           f"{report['grad_accum_steps']}"]
  for p in report["programs"]:
    lines += ["", f"program {p['name']}" + (f" (compiled in {p['compile_s']:.1f} s)" if p["bytes_per_chip"] else ""),
              f"  {'per chip':40s}{'GiB':>8s}"]
    for name, n in p["parts_per_chip"].items():
      lines.append(f"  {name:40s}{_gib(n)}")
    b = p["bytes_per_chip"]
    if not b:
      lines.append(f"  does not compile: {p['error']}")
      continue
    ours = sum(v for k, v in p["parts_per_chip"].items() if not k.startswith("KV cache"))
    if ours and abs(ours - b["arguments"]) > 0.1 * b["arguments"]:
      lines.append(f"  {'arguments, our sum of the trees':40s}{_gib(ours)}   (the compiler's differs by >10%)")
    lines += [f"  {'arguments (compiler)':40s}{_gib(b['arguments'])}",
              f"  {'outputs not aliased (compiler)':40s}{_gib(b['outputs'])}",
              f"  {'temporaries (compiler)':40s}{_gib(b['temporaries'])}",
              f"  {'program code (compiler)':40s}{_gib(b['code'])}",
              *([f"  {'resident beside it (training state)':40s}{_gib(b['resident'])}"] if b.get("resident") else []),
              f"  {'total':40s}{_gib(b['total'])}   of {hbm / GiB:.2f}: "
              + (f"fits, headroom {1 - b['total'] / hbm:.0%}" if p["fits"] else
                 f"DOES NOT FIT ({b['total'] / hbm:.0%} of HBM)")]
    flops = f"  FLOPs per chip per call: {p['flops']:.3e} (model)"
    if p["compiler_flops"]:
      flops += f"; compiler's cost analysis {p['compiler_flops']:.3e} (a loop body counted once)"
    lines.append(flops)
    coll = ", ".join(f"{k} {v['count']:,.0f} ({v['bytes'] / GiB:,.2f} GiB)" for k, v in p["collectives"].items())
    lines.append(f"  collectives per chip per call, every loop's trips counted: {coll or 'none'}")
    lines.append(f"  HBM traffic per chip per call: {p['hbm_bytes'] / GiB:,.2f} GiB; "
                 f"interconnect: {p['collective_bytes'] / GiB:,.2f} GiB")
    if p["kernel_calls"]:
      lines.append(f"  Mosaic kernel calls in the program text (splash attention; a loop body once): "
                   f"{p['kernel_calls']}")
    lines.append(f"  estimate: {seconds(p['estimate_s'])} per call, {p['bound']}-bound"
                 + (" (the engine's loops counted as a batch of uniform-length rows runs them: the full-width "
                    "stage to the length limit)" if p["unknown_loops"] else ""))
    if p.get("per_token_s"):
      lines.append(f"  decode: {p['per_token_s'] * 1e3:.2f} ms per generated token "
                   f"({p['per_token_s'] / p['decode_hbm_bound_s']:.1f}x the {p['decode_hbm_bound_s'] * 1e3:.2f} ms "
                   f"that reading the weights and KV cache once takes), {p['tokens_per_s_per_chip']:,.0f} tokens/s "
                   f"per chip; collectives inside the decode loop {p['decode_collective_bytes_per_token'] / GiB:.3f} "
                   f"GiB per chip per token")
  verdict = "FITS" if report["fits"] else "DOES NOT FIT"
  if report["estimate_s"] and any(p.get("per_token_s") for p in report["programs"]):
    each = ", ".join(f"{p['name']} {seconds(p['estimate_s'])}" for p in report["programs"])
    lines += ["", f"one iteration: {seconds(report['estimate_s'])} (estimate: {each})"]
  fix = report.get("rollout_mesh_that_fits")
  if fix is not None:
    lines += ["", f"the rollout does not fit in its sampling layout (config.rollout.mesh={report['rollout_mesh']!r}): "
                  + (f"--config.rollout.mesh={fix['rollout.mesh']} does "
                     f"({fix['bytes_per_chip'] / GiB:.2f} GiB per chip)"
                     if fix else "no tensor degree that divides the chips and key/value heads does")]
  fit = report.get("members_fit")
  if fit is not None:
    tried = ", ".join(f"{n}: {b / GiB:.2f}" for n, b in fit["tried"].items())
    lines += ["", f"largest member count that fits: {fit['largest']} (counts in steps of {fit['unit']}, the member "
                  f"axis's mesh size" + (f"; {fit['per_member_bytes'] / GiB:.3f} GiB per chip per member"
                                         if "per_member_bytes" in fit else "") + f"; GiB per chip of those compiled: "
                  f"{tried})"]
  members = f" with {report['members']} members" if report.get("members") else ""
  lines += ["", f"{verdict}{members} on {report['topology']}"]
  return "\n".join(lines)


def seconds(s: float) -> str:
  return f"{s:.2f} s" if s >= 1 else f"{s * 1e3:.1f} ms"


def render_search(found: list[dict[str, Any]], topology_name: str) -> str:
  """`--search`'s settings that fit, fastest first."""
  if not found:
    return f"nothing tried fits on {topology_name}"
  lines = [f"\nfitting settings on {topology_name}, fastest first (an estimate):"]
  for f in found:
    mesh = " ".join(f"{k}={v}" for k, v in f["mesh"].items())
    lines.append(f"  mesh {mesh:28s} remat {f['remat']:6s} grad_accum_steps {f['grad_accum_steps']:3d}  "
                 f"{f['bytes_per_chip'] / GiB:6.2f} GiB/chip (headroom {f['headroom']:.0%})  "
                 f"estimate {seconds(f['estimate_s'])}")
  return "\n".join(lines)


def render_rollout_search(found: list[dict[str, Any]], topology_name: str) -> str:
  """`--search_rollout`'s sampling layouts, fitting and fastest first."""
  lines = [f"\nsampling layouts on {topology_name}, fitting and fastest first (an estimate; the training "
           f"layout is the one a run uses with --config.rollout.mesh=training):"]
  for r in found:
    lines.append(f"  --config.rollout.mesh={r['rollout.mesh']:12s} " + ("fits  " if r["fits"] else "no fit")
                 + (f"  {r['error']}" if r["error"] else "")
                 + (f"  {r['per_token_s'] * 1e3:9.3f} ms per token, rollout {seconds(r['estimate_s'])}, "
                    f"collectives {r['decode_collective_bytes_per_token'] / GiB:.3f} GiB per token"
                    if r["per_token_s"] else ""))
  return "\n".join(lines)
