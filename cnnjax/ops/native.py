"""Compile a C++ XLA FFI library on first use, cache it, and load it.

The shared library is built with the system's C++ compiler (`$CXX`, else `c++`) against JAX's FFI
headers and the oneDNN wheels' headers and library (installed into the environment's `include/` and
`lib/`), into `$CNNJAX_CACHE_DIR` (default `~/.cache/cnnjax`) under a name that hashes everything
that went into it, so a changed source, compiler or jaxlib builds anew and concurrent builders
(pytest workers, several processes) each write their own file and rename it into place.
"""

import ctypes
import hashlib
import os
import shutil
import site
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jaxlib

FLAGS = ('-O2', '-std=c++17', '-shared', '-fPIC', '-fopenmp', '-w')


class BuildError(RuntimeError):
  """The library could not be built or loaded; the message says why and what to install."""


def cache_dir():
  default = Path(os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache') / 'cnnjax'
  return Path(os.environ.get('CNNJAX_CACHE_DIR') or default)


def prefix_with(relative):
  """The first environment prefix (this Python's, then the user site's) holding `relative`."""
  for prefix in (sys.prefix, site.getuserbase()):
    if (Path(prefix) / relative).exists():
      return Path(prefix)
  return None


def load(source, library, header, install_hint):
  """ctypes handle of `source` (a .cc file) compiled and linked with `-l<library>`, whose header
  `include/<header>` and `lib/lib<library>.so` come from the pip package(s) named in `install_hint`."""
  prefix = prefix_with(Path('include') / header)
  if prefix is None or not list((prefix / 'lib').glob(f'lib{library}.so*')):
    raise BuildError(f'{header} or lib{library}.so not found under {sys.prefix}/include and lib/; '
                     f'install them with: pip install {install_hint}')
  compiler = os.environ.get('CXX', 'c++')
  if shutil.which(compiler) is None:
    raise BuildError(f'no C++ compiler ({compiler!r}, set by $CXX) on PATH: install g++ or clang')
  lib_dir = prefix / 'lib'
  command = [compiler, *FLAGS, f'-I{jax.ffi.include_dir()}', f'-I{prefix / "include"}', str(source),
             f'-L{lib_dir}', f'-l{library}', f'-Wl,-rpath,{lib_dir}']
  key = hashlib.sha256('\0'.join([Path(source).read_text(), *command, jaxlib.__version__,
                                  compiler_version(compiler)]).encode()).hexdigest()[:16]
  target = cache_dir() / f'{Path(source).stem}-{key}.so'
  if not target.exists():
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
      built = Path(tmp) / target.name
      result = subprocess.run([*command, '-o', str(built)], capture_output=True, text=True)
      if result.returncode:
        raise BuildError(f'compiling {source} failed ({" ".join(command)}):\n{result.stderr[-2000:]}')
      os.replace(built, target)
  try:
    return ctypes.CDLL(str(target))
  except OSError as error:
    raise BuildError(f'loading {target} failed: {error}; delete it to rebuild') from error


def compiler_version(compiler):
  result = subprocess.run([compiler, '--version'], capture_output=True, text=True)
  return result.stdout.splitlines()[0] if result.stdout else ''
