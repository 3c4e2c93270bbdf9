"""Two local CPU processes (4 virtual devices each, gloo collectives) train like one process with
the same global batch (device-resident or streamed by grain per process), and save and restore
one checkpoint together."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

WORKER = Path(__file__).with_name('distributed_worker.py')


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def result(process):
  out, err = process.communicate(timeout=300)
  assert process.returncode == 0, err[-4000:]
  return json.loads(next(line for line in out.splitlines() if line.startswith('RESULT'))[len('RESULT'):])


def start(process_id, processes, port, devices, checkpoint_dir):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.Popen([sys.executable, str(WORKER), str(process_id), str(processes), str(port),
                           str(devices), str(checkpoint_dir)], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def test_two_processes_equal_one(tmp_path):
  port = free_port()
  pair = [start(p, 2, port, 4, tmp_path / 'pair') for p in range(2)]
  single = result(start(0, 1, 0, 8, tmp_path / 'single'))
  first, second = map(result, pair)
  assert first['devices'] == second['devices'] == single['devices'] == 8
  np.testing.assert_allclose(first['losses'], single['losses'], rtol=1e-5)
  assert first['losses'] == second['losses']
  np.testing.assert_allclose(first['stream_losses'], single['stream_losses'], rtol=1e-5)
  assert first['stream_losses'] == second['stream_losses']
  assert first['restored'] and second['restored']
