"""PeCo tokenizer training: VQ-VAE + perceptual loss (+ optional PatchGAN), paper Eq. 5/8.

The PeCo code is not public (microsoft/PeCo holds a README and checkpoint links only); this
follows the paper (Dong et al., "PeCo: Perceptual Codebook for BERT Pre-training of Vision
Transformers", §3):
  L = L_pixel + lambda * L_percep + commitment      (Eq. 5, lambda = 1, beta = 0.25)
  * L_pixel: mean absolute error over H x W x 3 (Eq. 3 writes 1/(HW3) ||x - x_hat|| with an
    unsquared norm, i.e. L1; 'l2' is available), on the VQ-VAE's [-1, 1] scale (VQGAN's);
  * L_percep: `teachers.perceptual` Eq. 4 between the frozen teacher's normalised block
    features of the input and of the reconstruction (both as [0, 1] images; the
    reconstruction is not clipped so it keeps its gradient);
  * the codebook term of Eq. 3 is replaced by the EMA update (VQ-VAE appendix, the paper's
    "exponential moving averages"); the commitment term is the quantizer's beta-MSE.
Optional adversarial loss (Eq. 8, weight 0.4; the paper found it does not help, Table 7):
VQGAN's PatchGAN discriminator, trained by the same optimizer inside the same scalar loss:
  total += gate * (w * L_G(D_sg(x_hat)) + L_D(D(x), D(sg(x_hat))))
where D_sg uses stop_gradient'ed discriminator params and sg(x_hat) a stop_gradient'ed
reconstruction, so the discriminator's gradient comes only from L_D and the VQ-VAE's only
from L_G. L_D is Eq. 8's log-loss, 0.5 (softplus(-D(x)) + softplus(D(x_hat))) as VQGAN's
'vanilla' (or VQGAN's hinge); L_G is the non-saturating -log sigmoid(D(x_hat)) (or -D(x_hat)
with hinge). The weight is a constant 0.4 (the paper mentions no adaptive weight) and
`gate` = step >= gan.start (the paper does not say when it starts; the default waits
for the 5,000 warm-up iterations, VQGAN-style). The step count lives in the 'counters'
collection of the train state, so it survives checkpoints.
The VQ-VAE is convolutional: model.scan_layers / model.remat are refused (`check`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mim_jax import visual
from mim_jax.methods import common
from mim_jax.teachers import perceptual
from mim_jax.tokenizers import peco

GAN_LOSSES = ("vanilla", "hinge")
PIXEL_LOSSES = ("l1", "l2")

MISSING_TEACHER = (
  "config.perceptual.path is empty: PeCo's perceptual loss needs a frozen self-supervised "
  "ViT-B/16 (the paper: MoCo v3). Download MoCo v3's vit-b-300ep.pth.tar "
  "(github.com/facebookresearch/moco-v3, CONFIG.md) or DINO's dino_vitbase16_pretrain.pth "
  "(github.com/facebookresearch/dino), optionally convert it once with `python -m "
  "mim_jax.teachers.perceptual --checkpoint=<file> --out=<file>.npz`, and pass "
  "--config.perceptual.path=<file>; 'random:B/16' gives an untrained stand-in for smoke runs"
)


def generator_loss(logits_fake: jax.Array, kind: str) -> jax.Array:
  if kind == "hinge":
    return -jnp.mean(logits_fake)  # VQGAN
  return jnp.mean(jax.nn.softplus(-logits_fake))  # -log D(x_hat), non-saturating Eq. 8


def discriminator_loss(logits_real: jax.Array, logits_fake: jax.Array, kind: str) -> jax.Array:
  if kind == "hinge":
    return 0.5 * (
      jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake))
    )
  # -(log D(x) + log(1 - D(x_hat))) / 2, Eq. 8 as VQGAN's vanilla_d_loss.
  return 0.5 * (jnp.mean(jax.nn.softplus(-logits_real)) + jnp.mean(jax.nn.softplus(logits_fake)))


def psnr(a01: jax.Array, b01: jax.Array) -> jax.Array:
  """Mean over images of 10 log10(1 / MSE), images in [0, 1]."""
  mse = jnp.mean(jnp.square(a01 - b01), axis=(1, 2, 3))
  return jnp.mean(10.0 * jnp.log10(1.0 / jnp.maximum(mse, 1e-10)))


class PeCoVQVAE:
  """The PeCo VQ-VAE training plug-in (interface: mim_jax/methods/__init__.py)."""

  @staticmethod
  def check(config) -> None:
    """Before any data is read: the layer options of config.model have nothing to act on."""
    for field in ("scan_layers", "remat"):
      if config.model.get(field, False):
        raise ValueError(
          f"config.model.{field}=True: the PeCo VQ-VAE is convolutional and "
          "has no stack of transformer blocks to scan or rematerialise; set it "
          "to False"
        )

  def __init__(self, config, *, workdir: str | None = None, source=None):
    del workdir, source
    self.check(config)
    self.config = config
    m, g = config.method, config.gan
    if m.pixel_loss not in PIXEL_LOSSES:
      raise ValueError(
        f"config.method.pixel_loss must be one of {PIXEL_LOSSES}, got {m.pixel_loss!r}"
      )
    if g.enabled and g.loss not in GAN_LOSSES:
      raise ValueError(f"config.gan.loss must be one of {GAN_LOSSES}, got {g.loss!r}")
    self.vqvae = peco.vqvae_from_config(config.vqvae)
    self.image_size = int(config.data.image_size)
    factor = 2 ** (len(config.vqvae.ch_mult) - 1)
    if self.image_size % factor:
      raise ValueError(
        f"config.data.image_size={self.image_size} is not a multiple of the "
        f"VQ-VAE's {factor}x down-sampling (config.vqvae.ch_mult)"
      )
    p = config.perceptual
    if not p.path:
      raise ValueError(MISSING_TEACHER)
    self.teacher = perceptual.PerceptualTeacher(
      p.path,
      image_size=self.image_size,
      layers=tuple(p.layers),
      channel_reduction=p.channel_reduction,
      num_heads=int(p.num_heads) or None,
    )
    if self.image_size % self.teacher.arch["patch_size"]:
      raise ValueError(
        f"config.data.image_size={self.image_size} is not a multiple of the "
        f"perceptual teacher's patch size {self.teacher.arch['patch_size']}"
      )
    self.teacher_features = self.teacher.features_fn()
    self.disc = peco.PatchDiscriminator(ndf=g.ndf, n_layers=g.n_layers) if g.enabled else None

  # ---------------------------------------------------------------- plug-in interface
  def consts(self) -> dict:
    return {"perceptual": self.teacher.params}

  def frozen_fingerprint(self) -> dict[str, str]:
    """The perceptual teacher: its checkpoint file, or the spec, architecture and feature
    layers of a random stand-in."""
    p = self.config.perceptual
    if p.path.startswith("random:"):
      _, seed = perceptual.parse_random_spec(p.path, self.image_size)
      return {
        "perceptual.path": common.random_teacher_fingerprint(
          p.path, self.teacher.arch, seed, layers=list(self.teacher.layers)
        )
      }
    return {"perceptual.path": common.file_fingerprint(p.path)}

  def fingerprint(self) -> dict:
    c = self.config
    fp = {
      "method": "peco_vqvae",
      "data.image_size": c.data.image_size,
      "gan.enabled": bool(c.gan.enabled),
      "perceptual.path": c.perceptual.path,
    }
    fp.update({f"vqvae.{k}": (list(v) if isinstance(v, tuple) else v) for k, v in c.vqvae.items()})
    if c.gan.enabled:
      fp.update({"gan.ndf": c.gan.ndf, "gan.n_layers": c.gan.n_layers})
    return fp

  def prepare(self, example: dict, rng: np.random.Generator) -> dict:
    del rng
    example.pop("image2", None)  # one view: the VQ-VAE reconstructs what it sees
    return example

  def init(self, rng, batch) -> Any:
    del batch  # parameter shapes do not depend on the batch size
    r_vae, r_disc = jax.random.split(rng)
    variables = peco.init_variables(self.vqvae, r_vae, self.image_size)
    params = {"vqvae": variables["params"]}
    if self.disc is not None:
      x = jnp.zeros((1, self.image_size, self.image_size, 3), jnp.float32)
      params["discriminator"] = self.disc.init(r_disc, x)["params"]
    return {
      "params": params,
      "codebook": variables["codebook"],
      "counters": {"step": jnp.zeros((), jnp.int32)},
    }

  def reconstruct(self, params, extra, images_uint8, *, train: bool, rng=None):
    """(x in [-1, 1], reconstruction in [-1, 1], QuantizerOutput, new 'codebook')."""
    x = peco.to_model_range(images_uint8)
    variables = {"params": params["vqvae"], "codebook": extra["codebook"]}
    if train:
      (rec, q), updated = self.vqvae.apply(
        variables,
        x,
        train=True,
        mutable=["codebook"],
        rngs={"codebook": rng} if rng is not None else {},
      )
      return x, rec, q, updated["codebook"]
    rec, q = self.vqvae.apply(variables, x, train=False)
    return x, rec, q, extra["codebook"]

  def loss(self, params, extra, consts, batch, rng, train: bool = True):
    m, g = self.config.method, self.config.gan
    x, rec, q, codebook = self.reconstruct(params, extra, batch["image"], train=train, rng=rng)
    rec = rec.astype(jnp.float32)
    diff = x - rec
    loss_pixel = jnp.mean(jnp.abs(diff)) if m.pixel_loss == "l1" else jnp.mean(jnp.square(diff))
    x01, rec01 = peco.to_unit_range(x), peco.to_unit_range(rec)
    teacher = consts["perceptual"]
    feats_x = jax.lax.stop_gradient(self.teacher_features(teacher, x01))
    loss_percep = perceptual.perceptual_loss(
      feats_x,
      self.teacher_features(teacher, rec01),
      channel_reduction=self.teacher.channel_reduction,
    )
    loss = m.pixel_weight * loss_pixel + m.perceptual_weight * loss_percep + q.loss
    metrics = {
      "loss_pixel": loss_pixel,
      "loss_perceptual": loss_percep,
      "loss_commit": q.loss,
      "psnr": psnr(jnp.clip(rec01, 0.0, 1.0), x01),
      **q.metrics,
    }
    step = extra["counters"]["step"]

    if self.disc is not None:
      active = step >= g.start
      disc_params = params["discriminator"]
      # Generator term: the discriminator is a frozen function here.
      logits_gen = self.disc.apply({"params": jax.lax.stop_gradient(disc_params)}, rec)
      loss_g = generator_loss(logits_gen, g.loss)
      # Discriminator term: the reconstruction is a constant input here.
      logits_real = self.disc.apply({"params": disc_params}, x)
      logits_fake = self.disc.apply({"params": disc_params}, jax.lax.stop_gradient(rec))
      loss_d = discriminator_loss(logits_real, logits_fake, g.loss)
      loss = loss + jnp.where(active, g.weight * loss_g + loss_d, 0.0)
      metrics.update(
        loss_g=loss_g,
        loss_d=loss_d,
        logits_real=jnp.mean(logits_real),
        logits_fake=jnp.mean(logits_fake),
        gan_active=active.astype(jnp.float32),
      )

    metrics["loss"] = loss
    new_extra = {"codebook": codebook, "counters": {"step": step + 1}} if train else {}
    return loss, metrics, new_extra

  @staticmethod
  def encoder_params(params):
    return params["vqvae"]

  def visualize(self, params, extra, consts, batch, max_images: int = 8) -> np.ndarray:
    """Rows: input | reconstruction (eval mode: the codebook is not updated); columns: the
    images with their PSNR."""
    del consts
    images = jnp.asarray(batch["image"][:max_images])
    _, rec, _, _ = jax.jit(lambda p, e, im: self.reconstruct(p, e, im, train=False))(
      params, extra, images
    )
    original = np.asarray(images, np.float32) / 255.0
    rec = np.clip(np.asarray(peco.to_unit_range(rec), np.float32), 0.0, 1.0)
    mse = np.maximum(((rec - original) ** 2).mean(axis=(1, 2, 3)), 1e-10)
    cols = [f"#{i + 1}: {10 * np.log10(1 / m):.1f} dB" for i, m in enumerate(mse)]
    return visual.labelled_grid([("input", original), ("reconstruction", rec)], cols)
