"""Benchmark: cnnjax against PyTorch eager, side-by-side members, chunks, compile cache, grain.

  python -m experiments.benchmark --config=experiments/configs/benchmark.py[:smoke|default|paper]

Table (results/benchmark/<preset>/table.md): rows = measurements, columns = 'ms/step',
'images/s', 'ratio' (and 's' for compile times), mean ± std over `repeats` timed repeats
(each repeat times `chunk_steps` training steps after a warm-up). Measured on the machine that
runs it: (1) train-step throughput of cnnjax vs a PyTorch eager model of the same architecture,
batch and optimizer (Adam), on CPU also with XLA's own reductions instead of the YNNPACK
reduction fusions cnnjax turns on (`cnnjax, XLA reductions` rows: `--xla_cpu_experimental_ynn_fusion_type=`
for that program only) and with the convolutions cnnjax did not pick on this CPU (`cnnjax, XLA
convolutions` rows where it picked oneDNN's, on AVX-512 CPUs, else `cnnjax, oneDNN convolutions`:
cnnjax/ops/conv.py); (2) M members in one program (vmap, unroll) or on threads vs M sequential
calls; (3) for the small models (digit CNN, Conv-4), a device-resident chunk of k unrolled steps vs
a Python loop of jitted steps vs a rolled lax.scan; (4) cold vs warm compile with the persistent
compilation cache (fresh subprocesses); (7) on CPU, the digit CNN's and ResNet-20's chunks (and
the digit CNN's Python loop) in fresh subprocesses on glibc's malloc with its defaults and with huge
pages, and on mimalloc (cnnjax's default; cnnjax/host_memory.py), with page faults per call; (5)
grain loader images/s, read in the benchmark's process and in `grain_workers` worker processes, vs
what the digit-CNN step consumes. Each turn of a comparison starts with `settle_calls` untimed calls. `paper` adds
ResNet-50 at 224x224 and, on an accelerator, bf16 images/s and MFU (XLA's
flops per step / (step time x peak_flops)). PyTorch is the `bench` extra (pip install
torch==2.13.0); without it the torch rows are skipped.
"""

import ml_collections

from cnnjax.config import base_config


def get_config(preset=''):
  config = base_config('benchmark', preset)
  config.seeds = 1                      # not used: members are set by `members`
  config.models = ('digit_cnn', 'conv4', 'resnet20_cifar')
  # Batch per model (Conv-4 at the papers' width 64; ResNet-50 at 224x224 only in `paper`: ~10 s per
  # step on 2 CPU cores).
  config.batch_sizes = ml_collections.ConfigDict({'digit_cnn': 128, 'conv4': 64, 'resnet20_cifar': 128, 'resnet50': 32})
  config.learning_rate = 1e-3           # Adam on both sides
  config.chunk_steps = 10               # k: steps per timed repeat, in one program
  config.throughput_chunk_steps = 10    # steps per call in the cnnjax-vs-torch rows (digit CNN, Conv-4)
  config.large_chunk_steps = 2          # ... for the larger models (compile time grows with k)
  config.repeats = 5                    # timed repeats per measurement (after one warm-up call)
  # Untimed calls of a program at the start of each of its turns: the first call after another
  # program's faults in again the memory handed back meanwhile (ResNet-50 on a 2-core Xeon: 1-5 s).
  config.settle_calls = 1
  config.members = (1, 2, 5)
  config.member_modes = ('vmap', 'unroll', 'sequential', 'threads')
  config.member_chunk_steps = 1         # steps per member call (unrolling M x k steps compiles slowly)
  config.split_size = 1024              # synthetic device-resident examples the batches are drawn from
  config.torch = True                   # the PyTorch eager rows (skipped when torch is missing)
  config.compile = True                 # cold vs warm compile in fresh subprocesses
  config.compile_repeats = 3            # cold/warm pairs, each with an empty cache
  config.host_memory = True             # CPU: chunks and loop on glibc's malloc and mimalloc (fresh subprocesses)
  config.host_memory_models = ('digit_cnn', 'resnet20_cifar')
  config.grain_dataset = 'mnist_5k'
  config.grain_batches = 40             # timed grain batches per repeat
  config.grain_workers = (0, 2)         # grain read in this process (0) and in 2 worker processes
  config.bf16 = False                   # bf16 images/s rows (accelerators only)
  config.xla_reductions = True          # CPU: also time each model with XLA's own reductions ('cnnjax, XLA reductions' rows)
  config.other_convolutions = True      # CPU: ... and with the convolutions cnnjax did not pick (XLA's or oneDNN's)
  config.peak_flops = 0.0               # peak FLOP/s of one device for MFU (0 = no MFU rows)
  config.profile_dir = ''               # if set: trace one more call of every timed program there
                                        # (<dir>/<section>/<label>/, jax.profiler) and print its top events
  config.eval_every = 0
  config.checkpoint_every = 0
  config.wandb.mode = 'disabled'

  if config.preset == 'smoke':
    config.models = ('digit_cnn',)
    config.batch_sizes.digit_cnn = 32
    config.chunk_steps = 2
    config.throughput_chunk_steps = 2
    config.repeats = 2
    config.members = (2,)
    config.member_modes = ('sequential', 'threads')  # vmap and unroll: tests/test_train.py
    config.split_size = 128
    config.grain_batches = 5
    config.compile_repeats = 1
    config.host_memory = False          # six more fresh processes: tests/test_benchmark.py checks the section
    config.progress = False
  elif config.preset == 'paper':
    config.models = ('digit_cnn', 'conv4', 'resnet20_cifar', 'resnet50')
    config.repeats = 10
    config.bf16 = True
    config.grain_workers = (0, 8)       # a GPU host's cores
    config.peak_flops = 989e12          # H100 SXM dense bf16; set to the device's peak
  return config
