"""Tracking: metrics.jsonl is the source of truth, resumes cleanly, W&B mirrors it without network."""

import json
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cnnjax import tracking
from cnnjax.tracking import Tracker, flatten, read_metrics

WANDB_HEADER, WANDB_BLOCK = 7, 32768


@pytest.fixture(autouse=True)
def no_wandb_env(monkeypatch, tmp_path):
  """No credentials, no global W&B settings: every test is offline and writes under tmp_path."""
  for name in ('WANDB_API_KEY', 'WANDB_MODE', 'WANDB_BASE_URL'):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv('NETRC', str(tmp_path / 'no-netrc'))
  monkeypatch.setenv('WANDB_CONFIG_DIR', str(tmp_path / 'wandb-config'))
  monkeypatch.setenv('WANDB_CACHE_DIR', str(tmp_path / 'wandb-cache'))
  monkeypatch.setenv('WANDB_SILENT', 'true')


def wandb_records(path):
  """Records of a W&B transaction log (.wandb): a leveldb-style log of 32 KiB blocks whose
  chunks (crc32c:4, length:2 little-endian, type:1 = full/first/middle/last) hold protobuf
  `Record`s. wandb 0.31 ships no Python reader, so the test reads it with the shipped protos."""
  from wandb.proto import wandb_internal_pb2
  data = path.read_bytes()
  assert data[:4] == b':W&B'
  pos, pending = WANDB_HEADER, b''
  while pos + 7 <= len(data):
    if WANDB_BLOCK - pos % WANDB_BLOCK < 7:
      pos += WANDB_BLOCK - pos % WANDB_BLOCK
      continue
    length, kind = int.from_bytes(data[pos + 4:pos + 6], 'little'), data[pos + 6]
    pending += data[pos + 7:pos + 7 + length]
    pos += 7 + length
    if kind in (1, 4):
      record = wandb_internal_pb2.Record()
      record.ParseFromString(pending)
      pending = b''
      yield record


def finished_records(path, timeout=30.0):
  """The records of a run's .wandb file once its exit record is there: wandb's service writes
  the file in the background and may still be writing after `finish()` returns."""
  deadline = time.monotonic() + timeout
  while True:
    records = list(wandb_records(path)) if path.exists() else []
    if any(r.WhichOneof('record_type') == 'exit' for r in records) or time.monotonic() > deadline:
      return records
    time.sleep(0.1)


def items(updates):
  return {item.key or '/'.join(item.nested_key): json.loads(item.value_json) for item in updates}


def wandb_history(run_file):
  return [{'_step': r.history.step.num, **items(r.history.item)}
          for r in finished_records(run_file) if r.WhichOneof('record_type') == 'history']


def offline_options(**overrides):
  return {'project': 'cnnjax-test', 'mode': 'offline', 'group': 'exp', 'job_type': 'erm',
          'name': 'erm-0', 'config': {'model': {'name': 'lenet', 'width': 8}, 'seed': 0}, **overrides}


def test_jsonl_written_and_read_back(tmp_path):
  with Tracker(tmp_path) as tracker:
    tracker.log(0, {'loss': jnp.float32(2.5), 'acc': np.float64(0.25), 'n': np.int32(3)})
    tracker.log(1, {'loss': jnp.array(1.5), 'per_class': np.array([0.5, 1.0])})
    tracker.summary({'test_acc': jnp.float32(0.75)})
  assert read_metrics(tmp_path) == [
      {'step': 0, 'loss': 2.5, 'acc': 0.25, 'n': 3},
      {'step': 1, 'loss': 1.5, 'per_class': [0.5, 1.0]}]
  assert json.loads((tmp_path / 'summary.json').read_text()) == {'test_acc': 0.75}
  assert not (tmp_path / 'wandb').exists()


def test_log_flushes_each_line(tmp_path):
  tracker = Tracker(tmp_path)
  tracker.log(3, {'loss': 1.0})
  assert read_metrics(tmp_path) == [{'step': 3, 'loss': 1.0}]
  tracker.close()


def test_resume_drops_later_steps_and_equals_uninterrupted_run(tmp_path):
  def train(run_dir, steps, resume_step=None):
    with Tracker(run_dir, resume_step=resume_step) as tracker:
      for step in steps:
        tracker.log(step, {'loss': 1.0 / (step + 1)})
  train(tmp_path / 'straight', range(6))
  train(tmp_path / 'killed', range(5))  # checkpoint at step 2, killed after logging step 4
  with open(tmp_path / 'killed' / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 5, "lo')  # torn line from the kill
  train(tmp_path / 'killed', range(3, 6), resume_step=2)
  assert read_metrics(tmp_path / 'killed') == read_metrics(tmp_path / 'straight')
  assert not list((tmp_path / 'killed').glob('.*tmp'))


def test_resume_minus_one_restarts_history(tmp_path):
  with Tracker(tmp_path) as tracker:
    tracker.log(0, {'loss': 9.0})
  with Tracker(tmp_path, resume_step=-1) as tracker:
    tracker.log(0, {'loss': 1.0})
  assert read_metrics(tmp_path) == [{'step': 0, 'loss': 1.0}]


def test_other_processes_write_nothing(tmp_path, monkeypatch):
  monkeypatch.setattr(jax, 'process_index', lambda: 1)
  monkeypatch.setattr(tracking, '_init_wandb', lambda *a: pytest.fail('W&B started on process 1'))
  with Tracker(tmp_path / 'run', wandb=offline_options()) as tracker:
    tracker.log(0, {'loss': 1.0})
    tracker.summary({'acc': 1.0})
  assert not (tmp_path / 'run').exists()
  assert read_metrics(tmp_path / 'run') == []


def test_flatten_dotted_keys_from_dict_and_configdict():
  nested = {'model': {'name': 'resnet', 'block': {'width': 16}}, 'lr': 0.1, 'empty': {}}
  expected = {'model.name': 'resnet', 'model.block.width': 16, 'lr': 0.1, 'empty': {}}
  assert flatten(nested) == expected
  assert flatten(ml_collections.ConfigDict(nested)) == expected


def test_auto_mode_follows_credentials(tmp_path, monkeypatch):
  assert tracking.resolve_mode('auto') == 'offline'
  (tmp_path / 'netrc').write_text('machine api.wandb.ai login user password secret\n')
  monkeypatch.setenv('NETRC', str(tmp_path / 'netrc'))
  assert tracking.resolve_mode('auto') == 'online'
  monkeypatch.setenv('WANDB_MODE', 'disabled')
  assert tracking.resolve_mode('auto') == 'disabled'
  assert tracking.resolve_mode('offline') == 'offline'
  with pytest.raises(ValueError, match='allowed'):
    tracking.resolve_mode('cloud')


def test_wandb_offline_run_holds_history_and_resumes_same_id(tmp_path):
  run_dir = tmp_path / 'run'
  with Tracker(run_dir, wandb=offline_options()) as tracker:
    for step in range(3):
      tracker.log(step, {'loss': 1.0 / (step + 1), 'acc': jnp.float32(step / 4)})
  with Tracker(run_dir, wandb=offline_options(), resume_step=1) as tracker:
    tracker.log(2, {'loss': 0.25, 'acc': 0.5})
    tracker.summary({'test_acc': 0.5})
  first, resumed = sorted((run_dir / 'wandb').glob('offline-run-*'))
  run_id = tracking.wandb_run_id(run_dir)
  assert run_id in first.name and run_id in resumed.name  # a '-1' suffix when both start in one second
  history = wandb_history(first / f'run-{run_id}.wandb')
  assert [(h['_step'], h['loss'], h['acc']) for h in history] == [
      (0, 1.0, 0.0), (1, 0.5, 0.25), (2, pytest.approx(1 / 3), 0.5)]
  records = finished_records(resumed / f'run-{run_id}.wandb')
  run = next(r.run for r in records if r.WhichOneof('record_type') == 'run')
  assert (run.run_group, run.job_type, run.display_name) == ('exp', 'erm', 'erm-0')
  assert items(run.config.update)['model.width'] == 8
  assert [(h['_step'], h['loss']) for h in wandb_history(resumed / f'run-{run_id}.wandb')] == [(2, 0.25)]
  summaries = [items(r.summary.update) for r in records if r.WhichOneof('record_type') == 'summary']
  assert any(s.get('test_acc') == 0.5 for s in summaries)
  assert read_metrics(run_dir) == [{'step': 0, 'loss': 1.0, 'acc': 0.0},
                                   {'step': 1, 'loss': 0.5, 'acc': 0.25},
                                   {'step': 2, 'loss': 0.25, 'acc': 0.5}]


def test_wandb_disabled_writes_no_wandb_dir(tmp_path):
  with Tracker(tmp_path, wandb=offline_options(mode='disabled')) as tracker:
    tracker.log(0, {'loss': 1.0})
  assert not (tmp_path / 'wandb').exists()
  assert read_metrics(tmp_path) == [{'step': 0, 'loss': 1.0}]


def test_wandb_init_failure_warns_and_keeps_jsonl(tmp_path, monkeypatch):
  import wandb

  def broken_init(**kwargs):
    raise RuntimeError('no network')
  monkeypatch.setattr(wandb, 'init', broken_init)
  with pytest.warns(RuntimeWarning, match='W&B disabled.*no network'):
    tracker = Tracker(tmp_path, wandb=offline_options(mode='online'))
  with tracker:
    tracker.log(0, {'loss': 1.0})
    tracker.summary({'acc': 0.5})
  assert read_metrics(tmp_path) == [{'step': 0, 'loss': 1.0}]
