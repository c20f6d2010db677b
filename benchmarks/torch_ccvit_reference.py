"""PyTorch reference of one CCViT pre-training step, for speed comparisons.

Built on timm's `Beit` (BEiT v2 backbone: shared relative-position bias, no
absolute position embedding, layer scale 0.1, q/v bias) plus the CCViT parts
written here in torch (`Cakeyan/CCViT_Public:modeling_pretrain.py`; see
docs/reference_details.md#beit-v2-patch-aggregation and the CCViT sections there):

- mask-token mixing of the masked patch embeddings, x*(1-w) + mask_token*w,
  before the cls token is prepended;
- the on-the-fly centroid tokenizer: nearest of K centroids (768-d [0,1]
  pixel patches in (c, y, x) order) for every patch of view 2; replaced
  patches of the student image take their centroid's pixels; then ImageNet
  normalisation;
- token branch: final `norm` -> `lm_head` Linear(D, K) at masked ∪ replaced
  positions, cross-entropy against the centroid ids;
- pixel block: 2 extra timm `Block`s (same config, shared rel-pos bias) fed
  with [final-layer cls before norm, layer-`early_layers` patch tokens], own
  LayerNorm + Linear(D, p*p*3) at masked ∪ replaced positions, MSE against
  view 2's patches normalised per patch (unbiased variance, eps 1e-6);
- loss = CE + MSE, AdamW (0.9, 0.98, wd 0.05 on >1-d weights, eps 1e-8),
  clip_grad_norm 3.0.

It is a benchmark reference, not a parity reference: the weights are random
and the centroids are a fixed random draw of image patches.

Usage:
  step, info = make_torch_step('B', batch_size=8)
  metrics = step()   # one full step: tokenize, forward, backward, clip, AdamW
"""

from functools import partial
import math
import os
import sys
import time

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# variant -> (embed_dim, depth, num_heads, early_layers)
VARIANTS = {
  'T': (192, 12, 3, 9),
  'S': (384, 12, 6, 9),
  'B': (768, 12, 12, 9),
  'L': (1024, 24, 16, 21),
}


def _import_torch_timm():
  """Imports torch and timm with the torchvision shim installed."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  if root not in sys.path:
    sys.path.insert(0, root)
  from mim_jax.testing import torch_compat  # pylint: disable=import-outside-toplevel

  torch_compat.install()
  import timm.models.beit as tbeit  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel

  return torch, tbeit


def patchify_cyx(x, patch):
  """(B, 3, H, W) -> (B, N, 3*p*p), each patch flattened in (c, y, x) order."""
  b, c, h, w = x.shape
  gh, gw = h // patch, w // patch
  x = x.reshape(b, c, gh, patch, gw, patch)
  x = x.permute(0, 2, 4, 1, 3, 5)  # b, gh, gw, c, py, px
  return x.reshape(b, gh * gw, c * patch * patch)


def unpatchify_cyx(x, patch, gh, gw, c=3):
  """Inverse of `patchify_cyx`: (B, N, c*p*p) -> (B, c, H, W)."""
  b = x.shape[0]
  x = x.reshape(b, gh, gw, c, patch, patch)
  x = x.permute(0, 3, 1, 4, 2, 5)  # b, c, gh, py, gw, px
  return x.reshape(b, c, gh * patch, gw * patch)


def build_ccvit_model(variant='B', image_size=224, patch=16, k=8192):
  """Returns the torch CCViT pre-training module (random init)."""
  torch, tbeit = _import_torch_timm()
  nn = torch.nn
  dim, depth, heads, early = VARIANTS[variant]
  norm_layer = partial(tbeit.LayerNorm, eps=1e-6)

  class CCViTTorch(nn.Module):
    """timm Beit backbone + CCViT token and pixel heads."""

    def __init__(self):
      super().__init__()
      self.patch = patch
      self.early_layers = early
      self.beit = tbeit.Beit(
        img_size=image_size,
        patch_size=patch,
        num_classes=0,
        global_pool='',
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        qkv_bias=True,
        mlp_ratio=4.0,
        drop_path_rate=0.0,
        norm_layer=norm_layer,
        init_values=0.1,
        use_abs_pos_emb=False,
        use_rel_pos_bias=False,
        use_shared_rel_pos_bias=True,
      )
      self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
      nn.init.trunc_normal_(self.mask_token, std=0.02, a=-0.02, b=0.02)
      self.lm_head = nn.Linear(dim, k)
      nn.init.trunc_normal_(self.lm_head.weight, std=0.02, a=-0.02, b=0.02)
      nn.init.zeros_(self.lm_head.bias)
      # Pixel block: PyTorch-default init for its Linear layers
      # (docs/reference_details.md#beit-v2-patch-aggregation), then
      # the depth rescale with the block indices early, early + 1.
      self.cls_pt_layers = nn.ModuleList(
        [
          tbeit.Block(
            dim=dim,
            num_heads=heads,
            qkv_bias=True,
            mlp_ratio=4.0,
            drop_path=0.0,
            init_values=0.1,
            norm_layer=norm_layer,
          )
          for _ in range(2)
        ]
      )
      with torch.no_grad():
        for i, blk in enumerate(self.cls_pt_layers):
          scale = math.sqrt(2.0 * (early + i + 1))
          blk.attn.proj.weight.div_(scale)
          blk.mlp.fc2.weight.div_(scale)
      self.cls_pt_norm = norm_layer(dim)
      self.cls_pt_lm_head = nn.Linear(dim, patch * patch * 3)
      nn.init.trunc_normal_(self.cls_pt_lm_head.weight, std=0.02, a=-0.02, b=0.02)
      nn.init.zeros_(self.cls_pt_lm_head.bias)

    def forward(self, img, mask, pred_pos):
      """img: normalised (B,3,H,W); mask, pred_pos: bool (B, N).

      Returns (token logits, pixel predictions), both at `pred_pos`
      (row-major order, flattened over the batch).
      """
      beit = self.beit
      x = beit.patch_embed(img)
      b, n, _ = x.shape
      w = mask.unsqueeze(-1).to(x.dtype)
      x = x * (1.0 - w) + self.mask_token.expand(b, n, -1) * w
      x = torch.cat((beit.cls_token.expand(b, -1, -1), x), dim=1)
      rel_pos_bias = beit.rel_pos_bias()
      early_x = None
      for i, blk in enumerate(beit.blocks):
        x = blk(x, shared_rel_pos_bias=rel_pos_bias)
        if i + 1 == self.early_layers:
          early_x = x
      logits = self.lm_head(beit.norm(x)[:, 1:][pred_pos])
      y = torch.cat((x[:, :1], early_x[:, 1:]), dim=1)
      for blk in self.cls_pt_layers:
        y = blk(y, shared_rel_pos_bias=rel_pos_bias)
      pix = self.cls_pt_lm_head(self.cls_pt_norm(y)[:, 1:][pred_pos])
      return logits, pix

  return CCViTTorch()


def _param_groups(model, weight_decay):
  """BEiT rule: no decay for <=1-d params and `.bias` (mask_token decayed)."""
  decay, no_decay = [], []
  skip = {'beit.cls_token', 'beit.pos_embed'}
  for name, p in model.named_parameters():
    if not p.requires_grad:
      continue
    if p.ndim <= 1 or name.endswith('.bias') or name in skip:
      no_decay.append(p)
    else:
      decay.append(p)
  return [
    {'params': decay, 'weight_decay': weight_decay},
    {'params': no_decay, 'weight_decay': 0.0},
  ]


def random_centroids(images_uint8, k, patch, seed=0):
  """K centroids = patches drawn from `images_uint8` plus a little noise.

  Stands in for the faiss k-means centroids; (K, 3*p*p) float32 in [0,1],
  (c, y, x) order.
  """
  b, h, w, c = images_uint8.shape
  x = images_uint8.astype(np.float32) / 255.0
  x = x.reshape(b, h // patch, patch, w // patch, patch, c)
  x = x.transpose(0, 1, 3, 5, 2, 4).reshape(-1, c * patch * patch)
  rng = np.random.default_rng(seed)
  idx = rng.integers(0, x.shape[0], size=k)
  cent = x[idx] + rng.normal(0.0, 0.02, size=(k, x.shape[1]))
  return np.clip(cent, 0.0, 1.0).astype(np.float32)


def make_torch_step(
  variant='B',
  batch_size=8,
  image_size=224,
  patch=16,
  k=8192,
  num_masked=75,
  num_replaced=20,
  inputs=None,
  seed=0,
  lr=1.5e-3,
  compile_model=False,
  threads=2,
  device='cpu',
  amp='',
):
  """Builds the torch CCViT model, optimizer and a fixed batch.

  Args:
    variant: 'T' | 'S' | 'B' | 'L' (patch size is `patch`).
    batch_size, image_size, patch, k, num_masked, num_replaced: the set-up.
    inputs: dict from `ccvit_step_bench.make_inputs` ('image', 'image2' uint8
      (B,H,W,3); 'mask', 'replaced' bool (B,N)); built here when None.
    seed: torch / input seed.
    lr: constant learning rate (the schedule does not matter for speed).
    compile_model: wrap the model in `torch.compile` (inductor, CPU).
    threads: torch intra-op threads.
    device: 'cpu' or 'cuda' (model, batch and optimizer state live there).
    amp: '' (fp32) or 'bf16': the model's forward and the losses under
      `torch.autocast(dtype=torch.bfloat16)`, fp32 parameters and optimizer, as
      the official code's mixed precision (BEiT: torch.cuda.amp) with bf16.

  Returns:
    (step, info): `step()` runs one full training step and returns a dict of
    python floats; `info` holds the module, optimizer and tensors.
  """
  torch, _ = _import_torch_timm()
  torch.set_num_threads(threads)
  torch.manual_seed(seed)
  if inputs is None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from ccvit_step_bench import make_inputs  # pylint: disable=import-outside-toplevel

    inputs = make_inputs(
      batch_size, image_size, seed, patch=patch, num_masked=num_masked, num_replaced=num_replaced
    )
  assert inputs['image'].shape[0] == batch_size, inputs['image'].shape

  model = build_ccvit_model(variant, image_size, patch, k).to(device)
  model.train()
  opt = torch.optim.AdamW(_param_groups(model, 0.05), lr=lr, betas=(0.9, 0.98), eps=1e-8)
  fwd = torch.compile(model) if compile_model else model

  def on_device(a):
    return torch.from_numpy(a).to(device)

  image = on_device(np.ascontiguousarray(inputs['image']))
  image2 = on_device(np.ascontiguousarray(inputs['image2']))
  mask = on_device(np.asarray(inputs['mask'], bool))
  replaced = on_device(np.asarray(inputs['replaced'], bool))
  centroids = on_device(random_centroids(inputs['image2'], k, patch, seed))
  cent_sqnorm = (centroids * centroids).sum(-1)
  mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
  std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
  if amp not in ('', 'bf16'):
    raise ValueError(f'amp={amp!r}: give "" (fp32) or "bf16"')
  device_type = torch.device(device).type
  gh = gw = image_size // patch

  def tokenize_and_prepare():
    """uint8 views -> (normalised student image, token ids, pixel targets)."""
    with torch.no_grad():
      x1 = image.permute(0, 3, 1, 2).float().div_(255.0)
      x2 = image2.permute(0, 3, 1, 2).float().div_(255.0)
      p2 = patchify_cyx(x2, patch)  # (B, N, 768) in [0,1]
      # argmin_k |p - c_k|^2 = argmin_k (|c_k|^2 - 2 p.c_k)
      dist = cent_sqnorm - 2.0 * torch.matmul(p2, centroids.t())
      tokens = dist.argmin(-1)  # (B, N)
      p1 = patchify_cyx(x1, patch)
      rep = replaced.unsqueeze(-1)
      p1 = torch.where(rep, centroids[tokens], p1)
      x1 = unpatchify_cyx(p1, patch, gh, gw)
      x1 = (x1 - mean) / std
      pmean = p2.mean(-1, keepdim=True)
      pvar = p2.var(-1, unbiased=True, keepdim=True)
      target = (p2 - pmean) / torch.sqrt(pvar + 1e-6)
    return x1, tokens, target

  pred_pos = mask | replaced

  def step():
    x1, tokens, target = tokenize_and_prepare()
    with torch.autocast(device_type, torch.bfloat16, enabled=amp == 'bf16'):
      logits, pix = fwd(x1, mask, pred_pos)
    # The losses in fp32, as autocast itself would run them.
    ce = torch.nn.functional.cross_entropy(logits.float(), tokens[pred_pos])
    mse = torch.nn.functional.mse_loss(pix.float(), target[pred_pos])
    loss = ce + mse
    opt.zero_grad(set_to_none=True)
    loss.backward()
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
    opt.step()
    return {'loss': loss.item(), 'ce': ce.item(), 'mse': mse.item(), 'grad_norm': gnorm.item()}

  n_params = sum(p.numel() for p in model.parameters())
  info = {
    'model': model,
    'optimizer': opt,
    'inputs': inputs,
    'num_params': n_params,
    'torch': torch,
  }
  return step, info


def main():
  import argparse  # pylint: disable=import-outside-toplevel

  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--variant', default='T')
  ap.add_argument('--batch_size', type=int, default=8)
  ap.add_argument('--steps', type=int, default=3)
  ap.add_argument('--compile', action='store_true')
  args = ap.parse_args()
  t0 = time.perf_counter()
  step, info = make_torch_step(args.variant, args.batch_size, compile_model=args.compile)
  print(f'built in {time.perf_counter() - t0:.1f}s, {info["num_params"] / 1e6:.1f}M params')
  for i in range(args.steps):
    t0 = time.perf_counter()
    m = step()
    dt = time.perf_counter() - t0
    print(
      f'step {i}: {dt * 1e3:.0f} ms ({args.batch_size / dt:.2f} img/s) '
      + ' '.join(f'{k}={v:.4f}' for k, v in m.items())
    )


if __name__ == '__main__':
  main()
