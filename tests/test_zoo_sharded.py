"""Representative models run sharded over 8 virtual devices (batch split over the `data` axis,
parameters replicated) and give the output of the unsharded run."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
MODELS = ['digit_cnn', 'resnet20_cifar', 'mobilenet_v2']  # a plain CNN, batch norm + residuals, depthwise

SHARDED = textwrap.dedent('''
    import json, sys
    import jax, numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P
    from cnnjax import models
    from cnnjax.train import sharding
    mesh = sharding.make_mesh()
    out = {}
    for name in sys.argv[1:]:
      if name not in models.MODELS:
        continue
      spec = models.SPECS[name]
      model = models.build(name, seed=0, **{**spec.kwargs, **spec.small_kwargs})
      model.eval()
      graphdef, state = nnx.split(model)
      rng = np.random.default_rng(0)
      inputs = [rng.uniform(size=a.shape).astype(a.dtype) for a in spec.example(8)]
      forward = jax.jit(lambda state, *x: nnx.merge(graphdef, state)(*x))
      one = forward(state, *inputs)
      split = [jax.device_put(x, NamedSharding(mesh, P('data'))) for x in inputs]
      eight = forward(sharding.replicate(state, mesh), *split)
      out[name] = {'devices': len(split[0].sharding.device_set),
                   'max_diff': max(float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))
                                   for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(eight))),
                   'scale': max(float(np.max(np.abs(np.asarray(a, np.float32)))) for a in jax.tree.leaves(one))}
    print('RESULT ' + json.dumps(out))
''')


@pytest.mark.slow
def test_representative_models_sharded_over_eight_devices_equal_one():
  flags = os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=flags.strip())
  done = subprocess.run([sys.executable, '-c', SHARDED, *MODELS], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-4000:]
  results = json.loads(next(l for l in done.stdout.splitlines() if l.startswith('RESULT '))[len('RESULT '):])
  assert {'digit_cnn', 'resnet20_cifar'} <= set(results)
  for name, result in results.items():
    assert result['devices'] == 8, name
    assert result['max_diff'] <= 1e-4 * max(1.0, result['scale']), (name, result)
