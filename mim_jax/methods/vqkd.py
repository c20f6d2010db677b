"""VQ-KD tokenizer training (BEiT v2; microsoft/unilm:beit2/modeling_vqkd.py,
beit2/norm_ema_quantizer.py, beit2/engine_for_vqkd.py).

  x01 = images / 255 (the loader's ToTensor)
  z   = l2norm(encode_task_layer(encoder(2 x01 - 1)))       (B, h, w, 32), fp32
  idx, z_q = NormEMA quantizer (k-means init on the first global batch, EMA 0.99)
  rec = decode_task_layer(decoder(z_q))                      (B, N, 512)
  t   = CLIP ViT-B/16 tokens of x01 (CLIP mean/std), ln_post + proj, patches [1:]
  loss = beta * mean((sg(z_q) - z)^2) + mean_tokens(1 - cos(rec, t))   (equal weights)

The teacher is frozen (its params are a const of the step, its outputs stop_gradient'ed).
The quantizer's 'codebook' collection (codes, EMA usage counts, `initted`) is carried in
`extra`: the k-means init happens inside the first training step (a lax.cond on `initted`,
so the same compiled step serves every step), and EMA updates in every training step.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mim_jax.methods import common
from mim_jax.teachers import clip
from mim_jax.tokenizers import vqkd as vqkd_lib


def check_grids(teacher: clip.CLIPTeacher, model: vqkd_lib.VQKD, image_size: int) -> None:
  """The decoder reconstructs one teacher token per tokenizer patch: the grids must match."""
  arch = teacher.arch
  if image_size % model.patch_size:
    raise ValueError(
      f"config.data.image_size={image_size} is not a multiple of the tokenizer's "
      f"patch size {model.patch_size} (config.model.variant)"
    )
  grid = image_size // model.patch_size
  teacher_grid = arch["image_size"] // arch["patch_size"]
  if arch["image_size"] != image_size or teacher_grid != grid:
    raise ValueError(
      f"teacher/tokenizer grid mismatch: the tokenizer sees {image_size}px images with patch "
      f"{model.patch_size} -> {grid}x{grid} tokens (config.data.image_size, "
      f"config.model.variant), but the CLIP teacher ({teacher.spec}) takes "
      f"{arch['image_size']}px with patch {arch['patch_size']} -> "
      f"{teacher_grid}x{teacher_grid} tokens (config.teacher.path / "
      f"config.teacher.random_init image_size=, patch_size=)"
    )
  if arch["output_dim"] != model.target_dim:
    raise ValueError(
      f"config.vqkd.target_dim={model.target_dim} must equal the CLIP teacher's "
      f"output width {arch['output_dim']} ({teacher.spec})"
    )


class VQKD:
  """The VQ-KD training plug-in (interface: mim_jax/methods/__init__.py)."""

  def __init__(self, config, *, workdir: str | None = None, source=None):
    del workdir, source
    self.config = config
    self.image_size = int(config.data.image_size)
    self.model = vqkd_lib.model_from_config(config)
    if self.model.decoder_depth < 1:
      raise ValueError(
        f"config.vqkd.decoder_depth={self.model.decoder_depth}: training needs "
        "a decoder (1 or 3 layers in the paper)"
      )
    self.teacher = common.build_clip_teacher(config)
    check_grids(self.teacher, self.model, self.image_size)
    self.grid = (self.image_size // self.model.patch_size,) * 2

  # ---------------------------------------------------------------- plug-in interface
  def consts(self) -> dict:
    return {"teacher": self.teacher.params}

  def frozen_fingerprint(self) -> dict[str, str]:
    return common.clip_teacher_fingerprint(self.config, self.teacher)

  def fingerprint(self) -> dict:
    c = self.config
    fp = {
      "method": "vqkd",
      "data.image_size": c.data.image_size,
      "model.variant": c.model.variant,
      "model.width": c.model.width,
      "model.depth": c.model.depth,
      "model.heads": c.model.heads,
      "model.scan_layers": c.model.scan_layers,
      "teacher": clip.arch_name(self.teacher.arch),
    }
    fp.update({f"vqkd.{k}": v for k, v in c.vqkd.items()})
    return fp

  def prepare(self, example: dict, rng: np.random.Generator) -> dict:
    del rng
    example.pop("image2", None)  # one view: tokenizer and teacher see the same pixels
    return example

  def init(self, rng, batch) -> Any:
    del batch  # parameter shapes do not depend on the batch size
    return vqkd_lib.init_variables(self.model, rng, self.image_size)

  def forward(self, params, extra, images_uint8, *, train: bool, rng=None):
    """(reconstruction (B, N, D_t), QuantizerOutput, new 'codebook' collection)."""
    x = vqkd_lib.to_model_range(images_uint8)
    variables = {"params": params, "codebook": extra["codebook"]}
    if train:
      (rec, q), updated = self.model.apply(
        variables,
        x,
        train=True,
        mutable=["codebook"],
        rngs={"codebook": rng} if rng is not None else {},
      )
      return rec, q, updated["codebook"]
    rec, q = self.model.apply(variables, x, train=False)
    return rec, q, extra["codebook"]

  def targets(self, consts, images_uint8) -> jax.Array:
    """CLIP patch tokens (B, N, 512): ln_post + proj of every token, cls dropped
    (`get_regress_target` in microsoft/unilm:beit2/modeling_vqkd.py)."""
    x01 = images_uint8.astype(jnp.float32) / 255.0
    return self.teacher.apply_tokens(consts["teacher"], x01)[:, 1:]

  def loss(self, params, extra, consts, batch, rng, train: bool = True):
    rec, q, codebook = self.forward(params, extra, batch["image"], train=train, rng=rng)
    rec_loss = common.cosine_rec_loss(rec, self.targets(consts, batch["image"]))
    loss = q.loss + rec_loss  # modeling_vqkd.py:212-213, equal weights
    metrics = {"loss": loss, "rec_loss": rec_loss, "quant_loss": q.loss, **q.metrics}
    return loss, metrics, ({"codebook": codebook} if train else {})

  @staticmethod
  def encoder_params(params):
    return params["encoder"]

  def visualize(self, params, extra, consts, batch, max_images: int = 64) -> np.ndarray:
    """Patches of this batch grouped by their code (one row per frequent code), as the
    paper's Figure 4; eval mode, the codebook is not changed."""
    del consts
    from mim_jax import tokenizer_report  # pylint: disable=g-import-not-at-top

    images = np.asarray(batch["image"][:max_images])
    ids = jax.jit(
      lambda p, e, im: self.model.apply(
        {"params": p, "codebook": e["codebook"]},
        vqkd_lib.to_model_range(im),
        method=vqkd_lib.VQKD.tokenize,
      )
    )(params, extra, jnp.asarray(images))
    return tokenizer_report.code_grid(images, np.asarray(ids), self.grid)
