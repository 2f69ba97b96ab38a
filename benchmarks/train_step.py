"""Images/s of the jitted train step (jaxprune.training) vs an eager PyTorch step.

  python benchmarks/train_step.py                       # defaults, < 3 min on 2 cores
  python benchmarks/train_step.py --models resnet20 --steps 10 --torch-layouts nchw,channels_last
  python benchmarks/train_step.py --dtype bfloat16      # bf16 compute, f32 params/stats
  python benchmarks/train_step.py --xla-flags=--xla_cpu_use_onednn=true
  python benchmarks/train_step.py --small-conv xla,im2col   # both conv paths for all models

Both sides run the same model, batch, loss (softmax CE) and optimizer (SGD,
Nesterov momentum 0.9, weight decay 5e-4, lr 0.1), on the same threads, on
one fixed batch already in memory (no input pipeline). The median of
``--steps`` timed steps after ``--warmup`` untimed ones, in blocks that
alternate between JAX and torch for ``--rounds`` rounds; the best round's
median counts (this machine is shared; see :func:`time_blocks`). JAX's first
step compiles: ``compile_s``. torch models are written out
here by hand (torchvision is not available): ResNet-20 with option-A
shortcuts, VGG-16-BN (CIFAR, GAP + one Linear) and ResNet-50 (torchvision's
layout), matching jaxprune.models. ``ratio`` is JAX img/s / best torch img/s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

DEFAULT_BATCH = {'resnet20': 128, 'resnet56': 128, 'vgg16': 64, 'vgg11': 64, 'resnet50': 8, 'resnet18': 16}
IMAGE = {'resnet50': 224, 'resnet18': 224}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--models', default='resnet20,vgg16,resnet50')
  p.add_argument('--batch', default='', help='per-model batch, e.g. resnet20=256,vgg16=32')
  p.add_argument('--steps', type=int, default=3, help='timed steps per model')
  p.add_argument('--warmup', type=int, default=1, help='untimed steps before each block')
  p.add_argument('--rounds', type=int, default=2, help='rounds of blocks; the best counts')
  p.add_argument('--dtype', default='float32', help="comma list of 'float32', 'bfloat16' (bf16 compute, f32 state)")
  p.add_argument(
    '--small-conv',
    default='auto',
    help="comma list of 'xla', 'im2col': JAX conv path for inputs smaller "
    "than the kernel (one JAX variant each); 'auto': xla, plus im2col for "
    "VGG (the only default model with such convs)",
  )
  p.add_argument(
    '--torch-layouts', default='nchw,channels_last', help="comma list of 'nchw', 'channels_last'; '' skips torch"
  )
  p.add_argument('--threads', type=int, default=os.cpu_count())
  p.add_argument('--xla-flags', default=None, help='appended to XLA_FLAGS (before jax starts)')
  p.add_argument('--json', default=None, help='also write the rows to this file')
  return p.parse_args(argv)


# ------------------------------------------------------------------------ JAX


def im2col_small_conv(
  lhs,
  rhs,
  window_strides,
  padding,
  lhs_dilation=None,
  rhs_dilation=None,
  dimension_numbers=None,
  feature_group_count=1,
  precision=None,
  **conv_kwargs,
):
  """``lax.conv_general_dilated`` for NHWC/HWIO, but as im2col + matmul when
  the input is spatially smaller than the kernel (stride 1, no dilation, no
  groups); other cases go to XLA's convolution unchanged."""
  import jax
  import jax.numpy as jnp

  dn = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  nhwc = dn.lhs_spec == (0, 3, 1, 2) and dn.rhs_spec == (3, 2, 0, 1) and dn.out_spec == (0, 3, 1, 2)
  kh, kw = rhs.shape[:2]
  small = lhs.shape[1] < kh or lhs.shape[2] < kw
  plain = (
    tuple(window_strides) == (1, 1)
    and feature_group_count == 1
    and all(d in (None, 1) for d in tuple(lhs_dilation or ()) + tuple(rhs_dilation or ()))
    and not isinstance(padding, str)
  )
  if not (nhwc and small and plain):
    return jax.lax.conv_general_dilated(
      lhs,
      rhs,
      window_strides,
      padding,
      lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count,
      precision=precision,
      **conv_kwargs,
    )
  (p0, p1), (q0, q1) = padding
  x = jnp.pad(lhs, ((0, 0), (p0, p1), (q0, q1), (0, 0)))
  oh, ow = x.shape[1] - kh + 1, x.shape[2] - kw + 1
  cols = jnp.concatenate([x[:, i : i + oh, j : j + ow, :] for i in range(kh) for j in range(kw)], axis=-1)
  return jnp.einsum('bhwk,ko->bhwo', cols, rhs.reshape(-1, rhs.shape[-1]), precision=precision)


def jax_runner(name, batch, *, dtype, small_conv='xla'):
  """``(run_one_step, compile_s)`` for the jitted jaxprune train step."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from jaxprune import models
  from jaxprune import training as T

  hw = IMAGE.get(name, 32)
  classes = 1000 if hw == 224 else 10
  model = models.create(name, num_classes=classes, rngs=nnx.Rngs(0))
  if small_conv == 'im2col':
    for _, m in nnx.iter_graph(model):
      if isinstance(m, nnx.Conv):
        m.conv_general_dilated = im2col_small_conv
  tx = T.make_optimizer('sgd', 0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
  graphdef, state = T.create_train_state(model, tx, rng=0)
  apply_fn = T.nnx_apply(graphdef)
  if dtype == 'bfloat16':
    base = apply_fn

    def apply_fn(v, images, *, train, rng=None, hparams=None):
      # Mixed precision through the custom-apply hook: bf16 compute, f32
      # master params and f32 batch stats in the state.
      cast = lambda t: jax.tree.map(lambda x: x.astype(jnp.bfloat16), t)
      fwd = base(v._replace(params=cast(v.params)), images.astype(jnp.bfloat16), train=train)
      stats = jax.tree.map(lambda x: x.astype(jnp.float32), fwd.batch_stats)
      return T.Forward(fwd.logits.astype(jnp.float32), stats)

  step = T.make_train_step(apply_fn, tx)
  r = np.random.RandomState(0)
  batch = {
    'image': jnp.asarray(r.randn(batch, hw, hw, 3).astype(np.float32)),
    'label': jnp.asarray(r.randint(0, classes, batch).astype(np.int32)),
  }
  t = time.perf_counter()
  holder = {'state': step(state, batch)[0]}
  jax.block_until_ready(holder['state'])
  compile_s = time.perf_counter() - t

  def run_one():
    holder['state'], m = step(holder['state'], batch)
    jax.block_until_ready(m)

  return run_one, compile_s


# ---------------------------------------------------------------------- torch


def torch_models():
  import torch.nn.functional as F
  from torch import nn

  class BlockA(nn.Module):
    def __init__(self, cin, cout, stride):
      super().__init__()
      self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(cout)
      self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(cout)
      self.stride, self.pad = stride, cout - cin

    def forward(self, x):
      out = F.relu(self.bn1(self.conv1(x)))
      out = self.bn2(self.conv2(out))
      sc = x
      if self.stride != 1 or self.pad:
        sc = x[:, :, :: self.stride, :: self.stride]
        lo = self.pad // 2
        sc = F.pad(sc, (0, 0, 0, 0, lo, self.pad - lo))
      return F.relu(out + sc)

  class CifarResNet(nn.Module):
    def __init__(self, depth, num_classes=10):
      super().__init__()
      n = (depth - 2) // 6
      self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(16)
      layers, cin = [], 16
      for s, w in enumerate((16, 32, 64)):
        for i in range(n):
          layers.append(BlockA(cin, w, 2 if s and not i else 1))
          cin = w
      self.layers = nn.Sequential(*layers)
      self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
      x = self.layers(F.relu(self.bn1(self.conv1(x))))
      return self.fc(x.mean((2, 3)))

  VGG_CFG = {
    11: (64, 'M', 128, 'M', 256, 256, 'M', 512, 512, 'M', 512, 512),
    16: (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512),
  }

  class VGG(nn.Module):
    def __init__(self, depth, num_classes=10):
      super().__init__()
      layers, c = [], 3
      for v in VGG_CFG[depth]:
        if v == 'M':
          layers.append(nn.MaxPool2d(2))
        else:
          layers += [nn.Conv2d(c, v, 3, 1, 1, bias=False), nn.BatchNorm2d(v), nn.ReLU()]
          c = v
      self.features = nn.Sequential(*layers)
      self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
      return self.fc(self.features(x).mean((2, 3)))

  class Bottleneck(nn.Module):
    def __init__(self, cin, width, stride):
      super().__init__()
      cout = 4 * width
      self.c1, self.b1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
      self.c2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
      self.b2 = nn.BatchNorm2d(width)
      self.c3, self.b3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
      self.down = None
      if stride != 1 or cin != cout:
        self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
      out = F.relu(self.b1(self.c1(x)))
      out = F.relu(self.b2(self.c2(out)))
      out = self.b3(self.c3(out))
      return F.relu(out + (x if self.down is None else self.down(x)))

  class ResNet50(nn.Module):
    def __init__(self, num_classes=1000):
      super().__init__()
      self.stem = nn.Sequential(
        nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
      )
      blocks, cin = [], 64
      for s, (w, n) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3))):
        for i in range(n):
          blocks.append(Bottleneck(cin, w, 2 if s and not i else 1))
          cin = 4 * w
      self.blocks = nn.Sequential(*blocks)
      self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
      return self.fc(self.blocks(self.stem(x)).mean((2, 3)))

  return {
    'resnet20': lambda: CifarResNet(20),
    'resnet56': lambda: CifarResNet(56),
    'vgg11': lambda: VGG(11),
    'vgg16': lambda: VGG(16),
    'resnet50': ResNet50,
  }


def torch_runner(name, batch, *, layout, threads):
  """``run_one_step`` for an eager torch train step, or None for unknown models."""
  import torch

  torch.set_num_threads(threads)
  torch.manual_seed(0)
  builders = torch_models()
  if name not in builders:
    return None
  hw = IMAGE.get(name, 32)
  classes = 1000 if hw == 224 else 10
  model = builders[name]()
  x = torch.randn(batch, 3, hw, hw)
  y = torch.randint(0, classes, (batch,))
  if layout == 'channels_last':
    model = model.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
  opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
  model.train()

  def run_one():
    opt.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss.item()

  return run_one


def time_blocks(runners, *, steps, warmup, rounds):
  """Median step time of each runner over ``steps`` consecutive steps, in
  ``rounds`` rounds of blocks (all runners in turn, each block after
  ``warmup`` untimed steps); the best round's median counts. Blocks, not
  single steps in turn: XLA's and torch's thread pools spin for a while after
  work and slow each other down when interleaved step by step. Several
  rounds: load from other processes comes and goes."""
  medians = {k: [] for k in runners}
  for _ in range(rounds):
    for k, run in runners.items():
      for _ in range(warmup):
        run()
      times = []
      for _ in range(steps):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
      medians[k].append(statistics.median(times))
  return {k: (min(v), v) for k, v in medians.items()}


def main(argv=None):
  args = parse_args(argv)
  if args.xla_flags:
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + args.xla_flags).strip()
  import jax

  batches = dict(DEFAULT_BATCH)
  for item in filter(None, args.batch.split(',')):
    k, v = item.split('=')
    batches[k] = int(v)
  layouts = [l for l in args.torch_layouts.split(',') if l]
  try:
    import torch  # noqa: F401
  except ImportError:
    layouts = []
    print('torch not importable: JAX only', file=sys.stderr)
  print(
    f'# jax {jax.__version__} on {jax.devices()[0].platform} x{jax.device_count()}, '
    f'threads {args.threads}, XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}'
  )
  rows = []
  for name in args.models.split(','):
    b = batches.get(name, 32)
    row = {'model': name, 'batch': b}
    runners, compile_s = {}, {}
    for dtype in args.dtype.split(','):
      conv_variants = [v for v in args.small_conv.split(',') if v]
      if conv_variants == ['auto']:
        conv_variants = ['xla', 'im2col'] if name.startswith('vgg') else ['xla']
      for v in conv_variants:
        key = '_'.join(['jax'] + (['bf16'] if dtype == 'bfloat16' else []) + ([v] if v != 'xla' else []))
        runners[key], compile_s[key] = jax_runner(name, b, dtype=dtype, small_conv=v)
    for layout in layouts:
      run = torch_runner(name, b, layout=layout, threads=args.threads)
      if run is not None:
        runners[f'torch_{layout}'] = run
    for k, (med, per_round) in time_blocks(runners, steps=args.steps, warmup=args.warmup, rounds=args.rounds).items():
      row[k] = {'img_s': b / med, 'step_ms': 1e3 * med, 'step_ms_per_round': [1e3 * t for t in per_round]}
      if k in compile_s:
        row[k]['compile_s'] = compile_s[k]
    jax_keys = [k for k in row if k.startswith('jax')]
    torch_keys = [k for k in row if k.startswith('torch')]
    best_torch = max((row[k]['img_s'] for k in torch_keys), default=None)
    for k in jax_keys:
      row[k]['ratio'] = row[k]['img_s'] / best_torch if best_torch else None
    rows.append(row)
    cells = []
    for k in jax_keys + torch_keys:
      r = row[k]
      c = f'{k} {r["img_s"]:6.1f} img/s'
      if 'compile_s' in r:
        c += f' (compile {r["compile_s"]:.1f} s'
        c += f', ratio {r["ratio"]:.2f})' if r.get('ratio') else ')'
      cells.append(c)
    print(f'{name:9s} batch {b:4d} | ' + ' | '.join(cells), flush=True)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'args': vars(args), 'rows': rows}, f, indent=2)
  return rows


if __name__ == '__main__':
  main()
