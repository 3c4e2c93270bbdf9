"""The zoo at a glance: `python -m cnnjax.models [--out results/models.md] [--models NAME ...]`.

For every registered model: parameters (from abstract shapes) and forward FLOPs per example at
its standard input (XLA's cost analysis of the lowered inference program, with XLA's convolutions:
it counts none in custom calls such as cnnjax.ops' oneDNN ones; nothing is allocated or compiled).
One multiply-add counts as 2 FLOPs.
"""

import argparse
from pathlib import Path

import jax
from flax import nnx

from cnnjax import ops, tables, tracking
from cnnjax.models import MODELS, SPECS, build


def forward_flops(name):
  spec = SPECS[name]
  with ops.xla_convolutions():
    graphdef, state = nnx.split(nnx.eval_shape(lambda: build(name, **spec.kwargs)))

  def forward(state, *inputs):
    model = nnx.merge(graphdef, state)
    model.eval()
    return model(*inputs)

  return jax.jit(forward).lower(state, *spec.example(1, small=False)).cost_analysis()['flops']


def row(name):
  spec = SPECS[name]
  model = nnx.eval_shape(lambda: build(name, **spec.kwargs))
  params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  inputs = ' + '.join('x'.join(map(str, shape)) for shape in spec.inputs)
  settings = ', '.join(f'{k}={v}' for k, v in spec.kwargs.items())
  return f'| {name} | {inputs} | {settings} | {params:,} | {forward_flops(name) / 1e9:.3f} |'


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', default='results/models.md')
  parser.add_argument('--models', nargs='*', default=None, help='names (default: every registered model)')
  args = parser.parse_args(argv)
  lines = ['# Model zoo', '', 'Parameters and forward GFLOPs per example at each standard input '
           '(`python -m cnnjax.models`; XLA cost analysis, 1 multiply-add = 2 FLOPs).', '',
           '| model | input | settings | parameters | GFLOPs |', '|---|---|---|---|---|']
  for name in args.models or MODELS.names():
    MODELS.get(name, key='models')
    lines.append(row(name))
    print(lines[-1], flush=True)
  record = tables.provenance('python -m cnnjax.models', None)
  tracking.write_atomic(Path(args.out), '\n'.join(lines) + '\n\n' + tables.provenance_markdown(record))
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
