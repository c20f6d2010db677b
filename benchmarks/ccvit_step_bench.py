"""CCViT training step: mim_jax (JAX/Flax) vs a timm-based PyTorch reference.

Measures training images/s of one full CCViT pre-training step (tokenize on
the fly, forward, backward, clip, AdamW) side by side in one process, on the
same uint8 batch. The JAX side goes through the project's trainer
(`mim_jax.train.build_step_for_benchmark`); the torch side is
`benchmarks/torch_ccvit_reference.py` (timm `Beit`, 2 threads, fp32 eager).

Measurements alternate between frameworks: `--rounds` rounds of `--steps`
timed steps each, per framework, after warm-up; the table gives the median
over rounds. JAX's first call (compile + one step) is reported separately.

  .venv/bin/python benchmarks/ccvit_step_bench.py            # B/16 b8, T/16 b32
  .venv/bin/python benchmarks/ccvit_step_bench.py --variants T/16 \
      --batch_sizes 32 --dtype fp32 --rounds 2 --steps 2 --out BENCHMARKS.md

FLOPs are counted analytically (multiply-add = 2 FLOPs, matmuls only):
forward of the backbone + 2 pixel blocks + patch embedding + both heads at the
masked ∪ replaced positions, times 3 for training (forward + backward), plus
the tokenizer's patch-centroid distance matmul once (no gradient).
"""

import argparse
import datetime
import gc
import os
import platform
import shlex
import statistics
import sys
import time

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
for _p in (_ROOT, _HERE):
  if _p not in sys.path:
    sys.path.insert(0, _p)

from torch_ccvit_reference import VARIANTS  # noqa: E402  (benchmarks/ is on sys.path now)

DATA_DIR = os.path.normpath(os.path.join(_ROOT, '..', 'shared', 'data', 'imagenette2_224_sample'))


# ----------------------------------------------------------------------------
# Inputs shared by both frameworks.
# ----------------------------------------------------------------------------


def _list_images(data_dir):
  if not data_dir or not os.path.isdir(data_dir):
    return []
  out = []
  for root, _, files in os.walk(data_dir):
    out.extend(
      os.path.join(root, f) for f in files if f.lower().endswith(('.jpeg', '.jpg', '.png'))
    )
  return sorted(out)


def _load_image(path, size):
  from PIL import Image  # pylint: disable=import-outside-toplevel

  with Image.open(path) as im:
    im = im.convert('RGB')
    if im.size != (size, size):
      im = im.resize((size, size), Image.BICUBIC)
    return np.asarray(im, np.uint8)


def make_inputs(
  batch_size, image_size, seed, patch=16, num_masked=None, num_replaced=None, data_dir=DATA_DIR
):
  """A fixed CCViT batch as numpy arrays, identical for JAX and torch.

  Images are real photos from `data_dir` (Imagenette 224² sample) when it
  exists, else random uint8. Both views are the same crop with the same
  (bicubic) interpolation, as in CCViT at 224², so 'image2' == 'image'. Masks
  come from the project's BEiT v2 block-mask generator (exact count) and the
  replaced positions are uniform among the unmasked ones.

  Args:
    batch_size, image_size, seed: the batch.
    patch: patch size (grid = image_size // patch).
    num_masked, num_replaced: None scales 75 / 20 of 196 to the grid.
    data_dir: image folder (searched recursively).

  Returns:
    {'image', 'image2': uint8 (B, H, W, 3); 'mask', 'replaced': bool (B, N)}.
  """
  from mim_jax import masking  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(seed)
  grid = image_size // patch
  n = grid * grid
  if num_masked is None:
    num_masked = int(round(75 * n / 196))
  if num_replaced is None:
    num_replaced = int(round(20 * n / 196))
  files = _list_images(data_dir)
  if files:
    idx = rng.choice(len(files), batch_size, replace=len(files) < batch_size)
    images = np.stack([_load_image(files[i], image_size) for i in idx])
    flip = rng.random(batch_size) < 0.5
    images[flip] = images[flip, :, ::-1]
  else:
    images = rng.integers(0, 256, (batch_size, image_size, image_size, 3), dtype=np.uint8)
  mask = np.stack([masking.block_mask(rng, (grid, grid), num_masked) for _ in range(batch_size)])
  replaced = np.stack([masking.replaced_positions(rng, m, num_replaced) for m in mask])
  assert not (mask & replaced).any()
  return {
    'image': np.ascontiguousarray(images),
    'image2': np.ascontiguousarray(images.copy()),
    'mask': mask.astype(bool),
    'replaced': replaced.astype(bool),
  }


# ----------------------------------------------------------------------------
# Analytic FLOPs.
# ----------------------------------------------------------------------------


def flops_per_image(variant, image_size=224, k=8192, num_pred=95):
  """Model FLOPs per image for one training step (see the module doc)."""
  size, patch = variant.split('/')
  patch = int(patch)
  dim, depth, _, _ = VARIANTS[size]
  n = (image_size // patch) ** 2
  t = n + 1
  pdim = 3 * patch * patch
  block = (
    2 * t * dim * 3 * dim + 2 * 2 * t * t * dim + 2 * t * dim * dim + 2 * 2 * t * dim * 4 * dim
  )
  fwd = (
    (depth + 2) * block + 2 * n * pdim * dim + 2 * num_pred * dim * k + 2 * num_pred * dim * pdim
  )
  tok = 2 * n * pdim * k
  return {'forward': fwd, 'tokenizer': tok, 'train': 3 * fwd + tok}


# ----------------------------------------------------------------------------
# Machine / load bookkeeping.
# ----------------------------------------------------------------------------


def _cpu_model():
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or '?'


def _loadavg():
  try:
    with open('/proc/loadavg') as f:
      return ' '.join(f.read().split()[:3])
  except OSError:
    return '?'


class LoadMeter:
  """CPU time used by *other* processes while we time (from /proc/stat)."""

  def __init__(self):
    self.hz = os.sysconf('SC_CLK_TCK')
    self.other_s = 0.0
    self.wall_s = 0.0
    self._helper_s = 0.0

  @staticmethod
  def _busy():
    with open('/proc/stat') as f:
      v = [int(x) for x in f.readline().split()[1:]]
    return sum(v) - v[3] - v[4]  # minus idle, iowait

  def __enter__(self):
    self._t = (time.perf_counter(), self._busy(), sum(os.times()[:2]))
    return self

  def __exit__(self, *exc):
    w0, b0, o0 = self._t
    wall = time.perf_counter() - w0
    busy = (self._busy() - b0) / self.hz
    own = sum(os.times()[:2]) - o0
    self.other_s += max(busy - own - self._helper_s, 0.0)
    self.wall_s += wall
    self._helper_s = 0.0

  def add_own(self, cpu_s):
    """CPU seconds of a worker process of ours (an isolated contender) in this interval."""
    self._helper_s += cpu_s

  def other_cores(self):
    return self.other_s / self.wall_s if self.wall_s else 0.0


def _versions():
  out = [f'python {platform.python_version()}', f'numpy {np.__version__}']
  for mod in ('jax', 'jaxlib', 'flax', 'optax', 'torch', 'timm'):
    try:
      out.append(f'{mod} {__import__(mod).__version__}')
    except Exception:  # pylint: disable=broad-except
      out.append(f'{mod} n/a')
  return ', '.join(out)


# ----------------------------------------------------------------------------
# The two step builders. Each returns (run_steps(n) -> seconds, info).
# ----------------------------------------------------------------------------


def _set(cfg, dotted, value):
  node = cfg
  parts = dotted.split('.')
  for p in parts[:-1]:
    node = node[p]
  node[parts[-1]] = value


def _parse_value(s):
  for conv in (int, float):
    try:
      return conv(s)
    except ValueError:
      pass
  return {'true': True, 'false': False}.get(s.lower(), s)


def _malloc_state():
  from mim_jax import host_memory  # pylint: disable=import-outside-toplevel

  return host_memory.state()


def build_jax(
  variant, batch_size, image_size, dtype, k, num_masked, num_replaced, inputs, overrides=()
):
  """The project's jitted trainer step on `inputs`."""
  import jax  # pylint: disable=import-outside-toplevel

  from configs import ccvit_vitb  # pylint: disable=import-outside-toplevel
  from mim_jax import train  # pylint: disable=import-outside-toplevel

  config = ccvit_vitb.get_config('')
  fields = {
    'model.variant': variant,
    'batch_size': batch_size,
    'data.image_size': image_size,
    'dtype': {'fp32': 'float32', 'bf16': 'bfloat16'}[dtype],
    'method.num_masked': num_masked,
    'method.num_replaced': num_replaced,
    'tokenizer.k': k,
  }
  if 'second_image_size' in config.data:
    fields['data.second_image_size'] = image_size
  for kv in overrides:
    key, val = kv.split('=', 1)
    fields[key] = _parse_value(val)
  with config.unlocked():
    for key, val in fields.items():
      _set(config, key, val)
  t0 = time.perf_counter()
  step_fn, state, frozen, batch = train.build_step_for_benchmark(config, batch_inputs=inputs)
  build_s = time.perf_counter() - t0
  box = {'state': state, 'metrics': None}

  def run(n):
    t0 = time.perf_counter()
    for _ in range(n):
      box['state'], box['metrics'] = step_fn(box['state'], frozen, batch)
    jax.block_until_ready((box['state'], box['metrics']))
    return time.perf_counter() - t0

  first_s = run(1)
  info = {
    'build_s': build_s,
    'first_s': first_s,
    'malloc': _malloc_state(),
    'box': box,
    'metrics': lambda: {k_: float(v) for k_, v in box['metrics'].items() if np.ndim(v) == 0},
  }
  return run, info


def build_torch(
  variant,
  batch_size,
  image_size,
  k,
  num_masked,
  num_replaced,
  inputs,
  compile_model=False,
  threads=2,
  device='cpu',
  amp='',
):
  """The timm-based reference step on `inputs`."""
  from torch_ccvit_reference import make_torch_step  # pylint: disable=import-outside-toplevel

  size, patch = variant.split('/')
  t0 = time.perf_counter()
  step, tinfo = make_torch_step(
    size,
    batch_size,
    image_size,
    int(patch),
    k,
    num_masked,
    num_replaced,
    inputs=inputs,
    compile_model=compile_model,
    threads=threads,
    device=device,
    amp=amp,
  )
  build_s = time.perf_counter() - t0
  box = {'metrics': None}

  def run(n):
    t0 = time.perf_counter()
    for _ in range(n):
      box['metrics'] = step()
    return time.perf_counter() - t0

  first_s = run(1)
  info = {
    'build_s': build_s,
    'first_s': first_s,
    'malloc': _malloc_state(),
    'box': box,
    'metrics': lambda: box['metrics'],
    'tinfo': tinfo,
  }
  return run, info


# ----------------------------------------------------------------------------
# One process per contender.
# ----------------------------------------------------------------------------
# Each framework runs in its own process by default: in one process, a PyTorch step slowed
# every JAX step after it (ViT-T/16 batch 32: 3.56 s per step before the first torch step,
# 4.27 s after, 4.39 s after a further 1 s pause; BENCHMARKS.md §11), which no user's
# training job sees. The machine's own noise remains. --same_process restores the old way.
#
# The JAX process starts the way `python -m mim_jax.train` starts: with the huge-page malloc
# tunable of mim_jax/host_memory.py (--jax_malloc=default: without it). The PyTorch process
# starts on glibc's defaults, as a PyTorch user's does (--torch_malloc=huge_pages: with the
# same tunable). glibc reads it only at a process's start, so it is in the environment the
# process is spawned with.


def _worker(conn, builder, kwargs):
  sys.path[:0] = [p for p in (_ROOT, _HERE) if p not in sys.path]
  run, info = globals()[builder](**kwargs)
  conn.send({'build_s': info['build_s'], 'first_s': info['first_s'], 'malloc': info['malloc']})
  while True:
    cmd, arg = conn.recv()
    if cmd == 'run':
      c0 = time.process_time()
      dt = run(arg)
      conn.send((dt, time.process_time() - c0))
    elif cmd == 'metrics':
      conn.send(info['metrics']())
    else:
      conn.close()
      return


def build_isolated(builder, meter, env, **kwargs):
  """`builder(**kwargs)` (build_jax / build_torch) in a fresh process started with environment
  `env`; the same (run, info)."""
  import multiprocessing  # pylint: disable=import-outside-toplevel

  ctx = multiprocessing.get_context('spawn')
  parent, child = ctx.Pipe()
  proc = ctx.Process(target=_worker, args=(child, builder, kwargs), daemon=True)
  saved = dict(os.environ)
  os.environ.clear()
  os.environ.update(env)
  try:
    proc.start()  # the spawned interpreter inherits os.environ as it is now
  finally:
    os.environ.clear()
    os.environ.update(saved)
  child.close()
  info = dict(parent.recv())

  def run(n):
    parent.send(('run', n))
    dt, cpu_s = parent.recv()
    meter.add_own(cpu_s)
    return dt

  def metrics():
    parent.send(('metrics', None))
    return parent.recv()

  class _Box(dict):
    def clear(self):
      if proc.is_alive():
        parent.send(('stop', None))
        proc.join(60)

  info.update(box=_Box(), metrics=metrics)
  return run, info


# ----------------------------------------------------------------------------
# Main.
# ----------------------------------------------------------------------------


def _fmt_row(cells):
  return '| ' + ' | '.join(str(c) for c in cells) + ' |'


def bench_variant(args, variant, batch_size, meter, log):
  """Builds all contenders for one variant, times them alternately."""
  size, patch = variant.split('/')
  n = (args.image_size // int(patch)) ** 2
  num_masked = args.num_masked if args.num_masked >= 0 else int(round(75 * n / 196))
  num_replaced = args.num_replaced if args.num_replaced >= 0 else int(round(20 * n / 196))
  inputs = make_inputs(batch_size, args.image_size, args.seed, int(patch), num_masked, num_replaced)
  source = 'imagenette2_224_sample' if _list_images(DATA_DIR) else 'random'
  log(
    f'# {variant} batch {batch_size}: {source} images, '
    f'{num_masked} masked + {num_replaced} replaced of {n}'
  )
  contenders = []  # (framework, dtype, run, info)

  # What every contender is built from; each builder adds its own settings.
  same = dict(
    variant=variant,
    batch_size=batch_size,
    image_size=args.image_size,
    k=args.k,
    num_masked=num_masked,
    num_replaced=num_replaced,
    inputs=inputs,
  )

  def build(builder, **kwargs):
    if args.same_process:
      return globals()[builder](**kwargs)
    from mim_jax import host_memory  # pylint: disable=import-outside-toplevel

    malloc = args.jax_malloc if builder == 'build_jax' else args.torch_malloc
    plain = {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'}
    env = dict(plain, **{host_memory.ENV: '0'})
    if malloc == 'huge_pages':
      env = host_memory.huge_pages_env(dict(plain))[0] or env
    return build_isolated(builder, meter, env, **kwargs)

  if not args.no_jax:
    for dtype in args.dtype:
      run, info = build('build_jax', dtype=dtype, overrides=args.set, **same)
      log(
        f'  jax {dtype}: build {info["build_s"]:.1f}s, first call '
        f'(compile + 1 step) {info["first_s"]:.1f}s; {info["malloc"]}'
      )
      contenders.append(('JAX (mim_jax)', dtype, run, info))
  if not args.no_torch:
    on = dict(threads=args.torch_threads, device=args.torch_device, amp=args.torch_amp, **same)
    torch_dtype = 'bf16 autocast' if args.torch_amp else 'fp32'
    run, info = build('build_torch', compile_model=False, **on)
    log(
      f'  torch eager: build {info["build_s"]:.1f}s, first step {info["first_s"]:.1f}s; '
      f'{info["malloc"]}'
    )
    contenders.append(('PyTorch eager (timm)', torch_dtype, run, info))
    if args.torch_compile:
      t0 = time.perf_counter()
      run, info = build('build_torch', compile_model=True, **on)
      log(
        f'  torch.compile: first step (compile) {info["first_s"]:.1f}s '
        f'(total {time.perf_counter() - t0:.1f}s)'
      )
      contenders.append(('PyTorch compile (timm)', torch_dtype, run, info))
  for _, _, run, _ in contenders:  # warm-up, not timed
    if args.warmup:
      run(args.warmup)
  times = {i: [] for i in range(len(contenders))}
  for r in range(args.rounds):
    order = list(range(len(contenders)))
    if r % 2:
      order.reverse()
    for i in order:
      with meter:
        dt = contenders[i][2](args.steps)
      times[i].append(dt / args.steps)
    log(
      f'  round {r}: '
      + ', '.join(
        f'{contenders[i][0]} {contenders[i][1]} {times[i][-1] * 1e3:.0f} ms'
        for i in range(len(contenders))
      )
      + f' (loadavg {_loadavg()})'
    )
  fl = flops_per_image(variant, args.image_size, args.k, num_masked + num_replaced)
  rows = []
  for i, (fw, dtype, _, info) in enumerate(contenders):
    step_s = statistics.median(times[i])
    ips = batch_size / step_s
    m = info['metrics']() or {}
    loss = m.get('loss', float('nan'))
    first = info['first_s']
    compile_s = (
      f'{max(first - step_s, 0.0):.1f}' if fw.startswith('JAX') or 'compile' in fw else '–'
    )
    rows.append(
      [
        variant,
        fw,
        dtype,
        batch_size,
        f'{ips:.2f}',
        f'{step_s * 1e3:.0f}',
        f'{fl["train"] / 1e9:.1f}',
        f'{fl["train"] * ips / 1e9:.0f}',
        compile_s,
        f'{loss:.3f}',
      ]
    )
    info['box'].clear()
  del contenders
  gc.collect()
  return rows


def _dtypes(arg: str) -> list[str]:
  """'both' -> ['fp32', 'bf16']; 'fp32,bf16' -> the same; anything else is a usage error."""
  names = ['fp32', 'bf16'] if arg == 'both' else [d.strip() for d in arg.split(',') if d.strip()]
  bad = [d for d in names if d not in ('fp32', 'bf16')]
  if bad or not names:
    raise argparse.ArgumentTypeError(f'{arg!r}: give fp32, bf16, both or fp32,bf16')
  return names


def main(argv=None):
  ap = argparse.ArgumentParser(description='CCViT step: mim_jax vs timm/PyTorch, images/s.')
  ap.add_argument('--variants', default='B/16,T/16')
  ap.add_argument('--batch_sizes', default='8,32', help='one per variant (comma-separated)')
  ap.add_argument(
    '--dtype',
    default='fp32,bf16',
    type=_dtypes,
    help='JAX compute dtype(s): fp32, bf16, both, or a comma-separated list',
  )
  ap.add_argument('--image_size', type=int, default=224)
  ap.add_argument('--k', type=int, default=8192)
  ap.add_argument('--num_masked', type=int, default=-1, help='-1: 75/196')
  ap.add_argument('--num_replaced', type=int, default=-1, help='-1: 20/196')
  ap.add_argument('--warmup', type=int, default=1, help='untimed steps after the first call')
  ap.add_argument('--rounds', type=int, default=3)
  ap.add_argument('--steps', type=int, default=3, help='timed steps/round')
  ap.add_argument('--seed', type=int, default=0)
  ap.add_argument('--torch_threads', type=int, default=2)
  ap.add_argument('--torch_device', default='cpu', help="cpu, or cuda on a GPU machine")
  ap.add_argument(
    '--torch_amp',
    default='',
    choices=('', 'bf16'),
    help='bf16: the PyTorch forward and losses under bf16 autocast (compare with --dtype bf16)',
  )
  ap.add_argument(
    '--torch_compile', action='store_true', help='also time torch.compile (inductor) of the model'
  )
  ap.add_argument('--no_jax', action='store_true')
  ap.add_argument(
    '--same_process',
    action='store_true',
    help='both frameworks in this process (torch then slows the JAX step by 20-40 %%)',
  )
  ap.add_argument('--no_torch', action='store_true')
  ap.add_argument(
    '--jax_malloc',
    choices=('huge_pages', 'default'),
    default='huge_pages',
    help='huge_pages: as `python -m mim_jax.train` runs (mim_jax/host_memory.py)',
  )
  ap.add_argument(
    '--torch_malloc',
    choices=('default', 'huge_pages'),
    default='default',
    help="huge_pages: give the PyTorch process mim_jax's malloc tunable too",
  )
  ap.add_argument(
    '--set', action='append', default=[], help='extra JAX config override key=value (repeatable)'
  )
  ap.add_argument('--out', default='', help='append the table to this file')
  args = ap.parse_args(argv)

  variants = args.variants.split(',')
  batches = [int(b) for b in args.batch_sizes.split(',')]
  if len(batches) == 1:
    batches *= len(variants)
  assert len(batches) == len(variants), 'one batch size per variant'

  def log(msg):
    print(msg, file=sys.stderr, flush=True)

  load0 = _loadavg()
  meter = LoadMeter()
  t_start = time.perf_counter()
  rows = []
  for variant, bs in zip(variants, batches):
    rows += bench_variant(args, variant, bs, meter, log)
  try:
    import jax  # pylint: disable=import-outside-toplevel

    jax_dev = f'{jax.default_backend()} x{jax.device_count()} ({jax.devices()[0].device_kind})'
  except ImportError:
    jax_dev = 'n/a'
  with open('/proc/meminfo') as f:
    mem = f.readline().split()[1]
  lines = [
    '### CCViT pre-training step: mim_jax vs PyTorch (timm Beit)',
    '',
    f'- command: `{shlex.join(["python"] + sys.argv)}`'
    if argv is None
    else f'- command: `main({argv})`',
    f'- date: {datetime.datetime.now().isoformat(timespec="seconds")}',
    f'- machine: {os.cpu_count()} CPU cores ({_cpu_model()}), '
    f'{int(mem) / 2**20:.0f} GiB RAM; JAX backend {jax_dev}; '
    f'torch threads {args.torch_threads}',
    f'- versions: {_versions()}',
    f'- load: loadavg {load0} before, {_loadavg()} after; other processes '
    f'used {meter.other_cores():.2f} cores on average while timing',
    f'- timing: {args.rounds} alternating rounds x {args.steps} steps after '
    f'{args.warmup} warm-up; median over rounds; total '
    f'{time.perf_counter() - t_start:.0f}s',
    '- GFLOP/img: analytic, 3x forward (backbone + 2 pixel blocks + heads '
    'at masked∪replaced) + tokenizer distance matmul; compile s = first '
    'call − median step; loss = last step\'s, a sanity check only (JAX '
    'follows the config\'s warm-up from lr 0, torch a constant 1.5e-3)',
    '',
    _fmt_row(
      [
        'variant',
        'framework',
        'dtype',
        'batch',
        'img/s',
        'step ms',
        'GFLOP/img',
        'GFLOP/s',
        'compile s',
        'loss',
      ]
    ),
    _fmt_row(['---'] * 10),
  ] + [_fmt_row(r) for r in rows]
  text = '\n'.join(lines) + '\n'
  print(text)
  if args.out:
    with open(args.out, 'a') as f:
      f.write('\n' + text)
  return rows


if __name__ == '__main__':
  main()
