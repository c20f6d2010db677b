"""Accelerator efficiency of a step: XLA's FLOP count of the compiled step, the peak of the
device kind, and from them model TFLOP/s per device and MFU (model FLOPs utilisation).

MFU here = (XLA's FLOPs of one compiled step per device) / (step time x the device's dense
bf16 peak). Two caveats, both reported rather than hidden:
* with `model.scan_layers` XLA's cost analysis counts a loop body once, so the count is
  too low (about depth-fold for the encoder); neither TFLOP/s nor MFU is logged then;
* where the peak of a device kind is not in PEAK_BF16_TFLOPS (CPUs, unknown chips) only
  TFLOP/s is logged.
With `model.remat` the count includes the recomputed forward passes, so the number is then a
hardware-FLOPs utilisation, higher than the model-FLOPs one; frozen teachers' and
tokenizers' forward passes inside the step are counted too.
"""

from __future__ import annotations

from absl import logging
import jax

# Dense bf16 peak TFLOP/s per chip (per device as JAX sees it), from the vendors' data
# sheets: Cloud TPU system architecture pages (v4, v5e, v5p, v6e) and NVIDIA's A100, H100
# SXM and H200 SXM sheets (without sparsity). Keys are prefixes of jax's device_kind.
PEAK_BF16_TFLOPS = {
  "TPU v4": 275.0,
  "TPU v5 lite": 197.0,  # v5e
  "TPU v5e": 197.0,
  "TPU v5p": 459.0,
  "TPU v5": 459.0,  # v5p reports "TPU v5"
  "TPU v6 lite": 918.0,  # v6e (Trillium)
  "TPU v6e": 918.0,
  "NVIDIA A100": 312.0,
  "NVIDIA H100": 989.0,  # SXM ("NVIDIA H100 80GB HBM3")
  "NVIDIA H100 PCIe": 756.0,
  "NVIDIA H200": 989.0,
}


def peak_tflops(device_kind: str) -> float | None:
  """Dense bf16 peak of a device kind, or None when unknown (CPU, other chips)."""
  best = None
  for prefix, peak in PEAK_BF16_TFLOPS.items():
    if device_kind.startswith(prefix) and (best is None or len(prefix) > len(best[0])):
      best = (prefix, peak)
  return best[1] if best else None


def cost(compiled) -> dict:
  """{'flops': FLOPs of one call per device} from XLA's cost analysis ({} if unavailable)."""
  try:
    analysis = compiled.cost_analysis()
  except Exception as e:  # pylint: disable=broad-except  # some backends have none
    logging.info("no cost analysis for the compiled step: %s", e)
    return {}
  if isinstance(analysis, (list, tuple)):  # older jax: one dict per executable
    analysis = analysis[0] if analysis else {}
  flops = (analysis or {}).get("flops")
  return {"flops": float(flops)} if flops and flops > 0 else {}


def efficiency(
  flops_per_device: float | None, step_time_s: float, device_kind: str | None = None
) -> dict:
  """Row fields: model TFLOP/s per device, and MFU where the device's peak is known."""
  if not flops_per_device or step_time_s <= 0:
    return {}
  tflops = flops_per_device / step_time_s / 1e12
  row = {"tflops_per_device": tflops}
  peak = peak_tflops(device_kind or jax.devices()[0].device_kind)
  if peak:
    row["mfu"] = tflops / peak
  return row
