r"""Weights out of mim_jax: a timm / Hugging Face folder, or every trained tensor.

  python -m mim_jax.export --from=runs/beitv2 --out=exports/beitv2             # timm
  python -m mim_jax.export --from=runs/beitv2 --out=exports/beitv2_full --format=full

--format=timm (default) writes DIR/model.safetensors with timm's names, DIR/config.json
(`architecture`, `model_args`, `pretrained_cfg` with the input normalisation) and a model card
DIR/README.md, so that

  cfg = json.load(open("DIR/config.json"))
  model = timm.create_model(cfg["architecture"], pretrained=False, **cfg["model_args"])
  model.load_state_dict(safetensors.torch.load_file("DIR/model.safetensors"), strict=True)

works for every method's encoder (mim_jax/models/timm_layout.py has the mapping), and the
folder can be pushed to the Hugging Face Hub as it is (`timm.create_model("hf-hub:USER/NAME")`).
--from takes anything `mim_jax.load_encoder` reads (workdir, official checkpoint, .npz).

--format=full writes every trained tensor of a workdir (encoder, heads, aggregation blocks,
CAE v2's regressor, MaPeT's query-stream parts, tokenizer decoders, EMA codebooks) to
DIR/params.safetensors under mim_jax's names, with DIR/manifest.json (method, step, config,
every tensor's shape and dtype). `python -m mim_jax.train --config.init_from=DIR` continues
pre-training from it (docs/export.md).

Each export checks itself before it is moved into place: the tensor names and shapes against
the contract, then (timm) the timm model's `forward_features` against mim_jax's tokens on a
fixed input (relative error <= 1e-5 in fp32) or (full) every tensor read back bit for bit.
A failed check is one line and a non-zero exit, and DIR is left as it was.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import hashlib
import json
import os
import shutil
import sys
import tempfile

import numpy as np

from mim_jax.models import exported

ExportError = exported.ExportError
TOLERANCE = 1e-5  # max |timm - mim_jax| / max |mim_jax| on the check input, fp32


# ----------------------------------------------------------------------------- timm
def _workdir_info(path: str) -> dict:
  """What a model card can say about a pre-training workdir (empty for other sources)."""
  from mim_jax import checkpoint  # pylint: disable=g-import-not-at-top

  if not os.path.isdir(path) or exported.kind(path):
    return {}
  try:
    cfg = checkpoint.saved_config(path)
  except (OSError, KeyError, ValueError):
    return {}
  info = {"config": cfg, "results": {}}
  for res in sorted(glob.glob(os.path.join(path, "**", "results.json"), recursive=True)):
    try:
      with open(res) as f:
        info["results"][os.path.relpath(res, path)] = json.load(f)
    except (OSError, ValueError):
      continue
  metrics = os.path.join(path, "metrics.jsonl")
  if os.path.exists(metrics):
    with open(metrics) as f:
      rows = [json.loads(line) for line in f if line.strip()]
    knn = [r for r in rows if "knn_top1" in r]
    if knn:
      info["results"]["metrics.jsonl (kNN monitor)"] = {
        "step": knn[-1].get("step"),
        "knn_top1": knn[-1]["knn_top1"],
      }
  return info


def _model_card(enc, cfg: dict, info: dict, step) -> str:
  train = info.get("config", {})
  method = train.get("method", {}).get("name", "unknown")
  data = train.get("data", {})
  lines = [
    "---",
    "library_name: timm",
    "tags:",
    "- image-feature-extraction",
    "- mim_jax",
    f"- {method}",
    "license: other",
    "---",
    "",
    f"# {method} ViT encoder (mim_jax export)",
    "",
    f"- Source: `{enc.source}`" + (f", step {step}" if step is not None else ""),
    f"- Method: {method}",
    f"- Architecture: `{cfg['architecture']}` with `model_args` from config.json "
    f"({enc.spec.embed_dim} wide, {enc.spec.depth} blocks, {enc.spec.num_heads} heads, "
    f"patch {enc.spec.patch_size}, {cfg['model_args']['img_size']} px)",
  ]
  if data:
    lines.append(
      f"- Pre-training data: {data.get('name') or data.get('source', '')} "
      f"{data.get('path', '')}".rstrip()
    )
  if train:
    lines.append(
      f"- Pre-training: {train.get('total_steps')} steps of global batch "
      f"{train.get('batch_size')}, {train.get('dtype')}"
    )
  lines += [
    f"- Input: RGB, normalised with mean {list(enc.mean)} and std {list(enc.std)}",
    "- Output of `forward_features`: every token (cls first) after the final LayerNorm",
    "",
    "## Evaluation results found in the workdir",
    "",
  ]
  results = info.get("results") or {}
  if results:
    for where, res in results.items():
      lines.append(f"- `{where}`: `{json.dumps(res, sort_keys=True)[:300]}`")
  else:
    lines.append("- none (run `python -m mim_jax.evaluate` with `--config.init=` this folder)")
  lines += [
    "",
    "## Use",
    "",
    "```python",
    "import json, safetensors.torch, timm",
    'cfg = json.load(open("config.json"))',
    'model = timm.create_model(cfg["architecture"], pretrained=False, **cfg["model_args"])',
    'model.load_state_dict(safetensors.torch.load_file("model.safetensors"), strict=True)',
    "tokens = model.forward_features(images)  # (B, 1 + N, D)",
    "```",
    "",
    "Written by `python -m mim_jax.export`, which checked the timm model's output against "
    "mim_jax's on a fixed input before writing this folder.",
    "",
  ]
  return "\n".join(lines)


def timm_files(enc, image_size: int) -> tuple[dict, dict]:
  """(timm tensors, config.json) of an encoder."""
  from mim_jax.models import timm_layout  # pylint: disable=g-import-not-at-top

  spec = enc.spec
  qkv_bias = "q_bias" in enc.params["blocks_0"]["attn"]
  if not spec.final_norm and timm_layout.uses_beit(spec):
    raise ExportError(f"{enc.source}: timm's Beit always has a final norm; this encoder has none")
  if spec.abs_pos == "sincos" and spec.embed_dim % 4:
    raise ExportError(f"{enc.source}: sin-cos positions need a width divisible by 4")
  cfg = timm_layout.timm_model_config(spec, image_size, qkv_bias=qkv_bias)
  if not spec.final_norm:
    cfg["model_args"]["final_norm"] = False
  tensors = timm_layout.to_timm(enc.params, spec, image_size)
  expected = timm_layout.expected_shapes(spec, image_size, qkv_bias=qkv_bias)
  problem = timm_layout.contract_mismatch(tensors, expected)
  if problem:
    raise ExportError(f"{enc.source}: the timm tensors do not match the contract: {problem}")
  cfg.update(
    num_classes=0,
    num_features=int(spec.embed_dim),
    global_pool="token",
    pretrained_cfg={
      "input_size": [3, int(image_size), int(image_size)],
      "mean": list(enc.mean),
      "std": list(enc.std),
      "interpolation": "bicubic",
      "crop_pct": 0.9,
      "num_classes": 0,
      "fixed_input_size": spec.abs_pos != "none" or spec.rel_pos != "none",
    },
  )
  return tensors, cfg


def check_timm_folder(folder: str, enc, image_size: int) -> float:
  """Builds the timm model from `folder`, loads it strictly and compares `forward_features`
  with `enc.tokens` on a fixed input; returns the relative error (raises above TOLERANCE)."""
  from mim_jax import torch_io  # pylint: disable=g-import-not-at-top

  torch, timm = torch_io.import_timm("the export's check (or pass --no_check)")
  from safetensors import torch as st_torch  # pylint: disable=g-import-not-at-top

  with open(os.path.join(folder, exported.TIMM_CONFIG)) as f:
    cfg = json.load(f)
  model = timm.create_model(cfg["architecture"], pretrained=False, **cfg["model_args"]).eval()
  state = st_torch.load_file(os.path.join(folder, exported.TIMM_WEIGHTS))
  own = model.state_dict()
  missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
  if missing or unexpected:
    raise ExportError(
      f"timm's {cfg['architecture']} does not take the export: missing {missing[:3]}, "
      f"unexpected {unexpected[:3]}"
    )
  model.load_state_dict(state, strict=True)
  images = (
    np.random.default_rng(0).standard_normal((2, image_size, image_size, 3)).astype(np.float32)
  )
  with torch.no_grad():
    ref = model.forward_features(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
  ours = enc.tokens(images)
  if ref.shape != ours.shape:
    raise ExportError(f"timm gives tokens {ref.shape}, mim_jax {ours.shape}")
  rel = float(np.max(np.abs(ref - ours)) / max(float(np.max(np.abs(ours))), 1e-30))
  if not rel <= TOLERANCE:
    raise ExportError(
      f"timm's forward_features differs from mim_jax's tokens by {rel:.3g} (relative, "
      f"allowed {TOLERANCE:g}): the export is wrong, nothing was written"
    )
  return rel


def export_timm(
  source: str, out: str, *, step=None, heads=None, image_size=None, check=True
) -> dict:
  """Writes the timm folder `out` (atomically); returns what was written and checked."""
  from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top

  from mim_jax import encoders  # pylint: disable=g-import-not-at-top

  enc = encoders.load_encoder(source, step=step, heads=heads)
  info = _workdir_info(source)
  size = enc.image_size or image_size or info.get("config", {}).get("data", {}).get("image_size")
  if image_size and enc.image_size and image_size != enc.image_size:
    raise ExportError(f"--image_size={image_size}, but the weights fix {enc.image_size}")
  size = int(size or 224)
  tensors, cfg = timm_files(enc, size)
  cfg["mim_jax"] = {
    "method": info.get("config", {}).get("method", {}).get("name"),
    "source": os.path.abspath(source),
    "step": step,
    "exported": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }

  def write(tmp):
    st_numpy.save_file(tensors, os.path.join(tmp, exported.TIMM_WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(tmp, exported.TIMM_CONFIG), "w") as f:
      json.dump(cfg, f, indent=1)
    with open(os.path.join(tmp, "README.md"), "w") as f:
      f.write(_model_card(enc, cfg, info, step))
    exported.read_timm(tmp)  # the reader's own contract check on what was written
    return check_timm_folder(tmp, enc, size) if check else None

  rel = _write_atomically(out, write)
  return {"out": out, "tensors": len(tensors), "architecture": cfg["architecture"], "rel_err": rel}


# ----------------------------------------------------------------------------- full
def export_full(source: str, out: str, *, step=None) -> dict:
  """Writes every trained tensor of the workdir `source` to the folder `out`."""
  from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top

  from mim_jax import checkpoint  # pylint: disable=g-import-not-at-top

  if not os.path.isdir(source) or exported.kind(source):
    raise ExportError(f"--format=full needs a mim_jax pre-training workdir, got {source}")
  params, extra, step = checkpoint.read_trained_state(source, step)
  with open(os.path.join(source, checkpoint.CONFIG_FILE)) as f:
    saved = json.load(f)
  flat = exported.flatten({"params": params, "extra": extra})
  flat = {k: np.ascontiguousarray(v) for k, v in flat.items()}
  manifest = {
    "format": exported.FULL_FORMAT,
    "method": saved["config"].get("method", {}).get("name"),
    "step": int(step),
    "source": os.path.abspath(source),
    "exported": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "config": saved["config"],
    "fingerprint": saved.get("fingerprint", {}),
    "tensors": {
      k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in sorted(flat.items())
    },
  }

  def write(tmp):
    path = os.path.join(tmp, exported.FULL_WEIGHTS)
    st_numpy.save_file(flat, path, metadata={"format": "mim_jax"})
    with open(path, "rb") as f:
      manifest["sha256"] = hashlib.sha256(f.read()).hexdigest()
    with open(os.path.join(tmp, exported.FULL_MANIFEST), "w") as f:
      json.dump(manifest, f, indent=1)
    back, _ = exported.read_full(tmp)
    back_flat = exported.flatten(back)
    for name, value in flat.items():
      if not np.array_equal(back_flat[name], value):
        raise ExportError(f"{name} reads back different from what was written")

  _write_atomically(out, write)
  return {"out": out, "tensors": len(flat), "step": int(step), "method": manifest["method"]}


def _write_atomically(out: str, write):
  """Runs write(tmp) in a sibling temporary folder and moves it to `out` only if it
  succeeds; an existing non-empty `out` is refused (nothing the user had is replaced)."""
  out = os.path.abspath(out)
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise ExportError(f"--out={out} exists and is not empty; choose a new folder")
  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(out) + ".partial-", dir=parent)
  try:
    result = write(tmp)
    if os.path.isdir(out):
      os.rmdir(out)  # empty (checked above)
    os.replace(tmp, out)
    return result
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="python -m mim_jax.export",
    description="Export a mim_jax encoder to timm / Hugging Face safetensors, or every "
    "trained tensor of a workdir (--format=full).",
    epilog="example: python -m mim_jax.export --from=runs/beitv2 --out=exports/beitv2",
  )
  p.add_argument("--from", dest="source", required=True, help="workdir, official checkpoint, .npz")
  p.add_argument("--out", required=True, help="a new (or empty) folder")
  p.add_argument("--format", choices=("timm", "full"), default="timm")
  p.add_argument("--step", type=int, default=None, help="a workdir's checkpoint (default: newest)")
  p.add_argument("--heads", type=int, default=0, help="only for weights without a head count")
  p.add_argument("--image_size", type=int, default=0, help="for encoders whose weights fix no size")
  p.add_argument("--no_check", action="store_true", help="skip the timm check (needs torch, timm)")
  return p


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  try:
    if args.format == "full":
      r = export_full(args.source, args.out, step=args.step)
      print(f"wrote {r['out']}: {r['tensors']} tensors of {r['method']} step {r['step']}")
    else:
      r = export_timm(
        args.source,
        args.out,
        step=args.step,
        heads=args.heads or None,
        image_size=args.image_size or None,
        check=not args.no_check,
      )
      checked = "unchecked" if r["rel_err"] is None else f"timm matches to {r['rel_err']:.2g}"
      print(f"wrote {r['out']}: {r['tensors']} tensors for timm {r['architecture']} ({checked})")
  except (ExportError, ValueError, FileNotFoundError, ImportError) as e:
    print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
