"""Prepare datasets once, before any run reads them: `python -m cnnjax.data.prepare NAME... [--data_dir=DIR]`.

Embedded datasets (cnnjax.data.DATASETS) are built from their pip package, offline. TFDS catalog
datasets are downloaded and written as array_record, which needs TensorFlow (`pip install
'.[prepare]'`) and a network; reading them later needs neither.
"""

import argparse
import importlib.util

from cnnjax.data import sources
from cnnjax.errors import ConfigError, DataError


def prepare(name, data_dir=None):
  """Build `name` as array_record under `data_dir` (default: sources.default_data_dir())."""
  b = sources.builder(name, data_dir)
  if name in sources.DATASETS:
    return b
  if importlib.util.find_spec('tensorflow') is None:
    raise DataError(f"preparing the TFDS catalog dataset {name!r} needs TensorFlow and a network: "
                    "pip install '.[prepare]', then run this command again")
  b.download_and_prepare(file_format='array_record')
  return b


def main(argv=None):
  parser = argparse.ArgumentParser(prog='python -m cnnjax.data.prepare', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('names', nargs='+', metavar='NAME', help='dataset names')
  parser.add_argument('--data_dir', default=None, help='default: $CNNJAX_DATA_DIR or the TFDS default')
  args = parser.parse_args(argv)
  for name in args.names:
    try:
      print(f'{name}: prepared in {prepare(name, args.data_dir).data_dir}')
    except (ConfigError, DataError) as e:
      parser.exit(1, f'{name}: {e}\n')


if __name__ == '__main__':
  main()
