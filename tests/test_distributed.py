"""Two local CPU processes (4 virtual devices each, gloo collectives) train like one process with
the same global batch (device-resident or streamed by grain per process), save and restore one
checkpoint together and go through an experiment grid cell by cell together. Process 0 names the
coordinator; process 1 finds it from SLURM's environment, as under `srun`."""

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

WORKER = Path(__file__).with_name('distributed_worker.py')


# JAX puts the coordinator of SLURM job j on port SLURM_PORTS[j % 4096] of the job's first node.
SLURM_PORTS = range(65535 - 2 ** 12 + 1, 65536)


def free_slurm_port():
  for port in random.sample(SLURM_PORTS, 100):
    with socket.socket() as s:
      try:
        s.bind(('127.0.0.1', port))
      except OSError:
        continue
    return port
  raise RuntimeError('no free port for the coordinator')


def slurm_environment(port, process_id, processes):
  """The variables `srun` sets that JAX reads: one task per node, the job's first node on localhost."""
  return {'SLURM_JOB_ID': str(port - SLURM_PORTS.start), 'SLURM_STEP_NODELIST': 'localhost',
          'SLURM_NTASKS': str(processes), 'SLURM_PROCID': str(process_id), 'SLURM_LOCALID': '0',
          'SLURM_STEP_NUM_NODES': str(processes)}


def result(process):
  out, err = process.communicate(timeout=300)
  assert process.returncode == 0, err[-4000:]
  return json.loads(next(line for line in out.splitlines() if line.startswith('RESULT'))[len('RESULT'):])


def start(process_id, processes, port, devices, checkpoint_dir, slurm=False):
  """One worker; with `slurm` it gets SLURM's variables instead of the coordinator's address."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', **(slurm_environment(port, process_id, processes) if slurm else {}))
  return subprocess.Popen([sys.executable, str(WORKER), str(process_id), str(processes), str(port) if not slurm else '',
                           str(devices), str(checkpoint_dir)], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
  port = free_slurm_port()
  pair = [start(p, 2, port, 4, tmp_path / 'pair', slurm=p == 1) for p in range(2)]
  single = result(start(0, 1, 0, 8, tmp_path / 'single'))
  first, second = map(result, pair)
  assert first['devices'] == second['devices'] == single['devices'] == 8
  np.testing.assert_allclose(first['losses'], single['losses'], rtol=1e-5)
  assert first['losses'] == second['losses']
  np.testing.assert_allclose(first['stream_losses'], single['stream_losses'], rtol=1e-5)
  assert first['stream_losses'] == second['stream_losses']
  assert first['restored'] and second['restored']
  # The runner's grid, its workdir shared: both processes took each cell together (no cell locks).
  assert first['grid'] == second['grid'] == [[i, i] for i in range(3)]
  assert single['grid'] == [[i] for i in range(3)]
