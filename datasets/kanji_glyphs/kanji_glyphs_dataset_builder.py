"""kanji_glyphs: an Omniglot-style few-shot set drawn from KanjiVG's hand-drawn stroke paths.

Source: the `kanji` folder of the kanjivg package (KanjiVG, Ulrich Apel, https://kanjivg.tagaini.net,
CC BY-SA 3.0): one SVG per character, each stroke a hand-drawn path (M/C/S commands) in a 109x109 box.
Every character is drawn DRAWINGS_PER_CHARACTER times at 28x28x1 uint8 (white strokes on black),
each drawing with its own random affine transform (rotation, anisotropic scale, shear, shift), stroke
jitter (each stroke shifted, each Bezier control point moved) and stroke width, rendered at 4x and
box-filtered down, like Omniglot's 20 drawings per character (Lake et al. 2015) but by one hand.

Characters (classes): hiragana, katakana, and kanji of at most MAX_STROKES strokes grouped by their
KanjiVG radical; a radical group with at least MIN_GROUP such kanji becomes an "alphabet" (its first
MAX_GROUP characters by code point). Alphabets are split, never characters: `train` / `validation` /
`test` hold the characters of disjoint alphabets (meta-train / meta-val / meta-test), drawn with a fixed
seed so every machine builds the same split. Features: image, label (the character, e.g. 'U+6C34 水'),
alphabet ('hiragana', 'katakana' or 'radical 水'). Reads files of an installed package: no network.
"""

import dataclasses
import importlib.util
import re
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageDraw

SIZE = 28
SUPERSAMPLE = 4
BOX = 109.0                      # KanjiVG's viewBox
SPLITS = ('train', 'validation', 'test')


@dataclasses.dataclass
class GlyphConfig(tfds.core.BuilderConfig):
  """Which characters, how many drawings, which share of the classes goes to each split."""
  max_strokes: int = 10
  min_group: int = 20
  max_group: int = 40
  drawings: int = 20
  kana: bool = True
  split_fractions: tuple = (0.6, 0.1, 0.3)
  seed: int = 0


def kanji_dir():
  """The SVG folder of the installed kanjivg package, found without importing it."""
  spec = importlib.util.find_spec('kanji')
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError('kanji_glyphs needs the kanjivg package: pip install kanjivg')
  return Path(spec.submodule_search_locations[0])


# SVG path data ----------------------------------------------------------------------------------
_TOKEN = re.compile(r'[MmCcSsLlHhVvZz]|[-+]?(?:\d*\.\d+|\d+\.?)(?:[eE][-+]?\d+)?')
_ARITY = {'M': 2, 'L': 2, 'H': 1, 'V': 1, 'C': 6, 'S': 4, 'Z': 0}


def parse_path(d):
  """Cubic Bezier segments (n, 4, 2) of one SVG path's `d` (M, L, H, V, C, S, Z, absolute or relative).

  Lines become cubics with their control points on the line, so a stroke is one kind of segment.
  """
  tokens = _TOKEN.findall(d)
  segments, i = [], 0
  pen = start = np.zeros(2)
  last_control, command = None, None
  while i < len(tokens):
    if tokens[i].isalpha():
      command, i = tokens[i], i + 1
    elif command is None:
      raise ValueError(f'path data starts with a number: {d[:40]!r}')
    upper, relative = command.upper(), command.islower()
    if upper == 'Z':
      if not np.allclose(pen, start):
        segments.append(np.stack([pen, pen + (start - pen) / 3, pen + 2 * (start - pen) / 3, start]))
      pen, last_control, command = start, None, None
      continue
    arity = _ARITY[upper]
    values = np.array(tokens[i:i + arity], float)
    if len(values) != arity or any(t.isalpha() for t in tokens[i:i + arity]):
      raise ValueError(f'{command} needs {arity} numbers in {d[:60]!r}')
    i += arity
    if upper == 'H':
      values = np.array([values[0] + (pen[0] if relative else 0), pen[1]])
    elif upper == 'V':
      values = np.array([pen[0], values[0] + (pen[1] if relative else 0)])
    elif relative:
      values = values + np.tile(pen, arity // 2)
    points = values.reshape(-1, 2)
    if upper == 'M':
      pen = start = points[0]
      last_control = None
      command = 'l' if relative else 'L'  # numbers after a moveto are linetos
      continue
    if upper in 'LHV':
      end = points[0]
      controls = [pen + (end - pen) / 3, pen + 2 * (end - pen) / 3]
    elif upper == 'C':
      controls, end = [points[0], points[1]], points[2]
    else:  # S: the first control point reflects the previous cubic's second one
      first = 2 * pen - last_control if last_control is not None else pen
      controls, end = [first, points[0]], points[1]
    segments.append(np.stack([pen, *controls, end]))
    last_control = controls[1] if upper in 'CS' else None
    pen = end
  return np.asarray(segments).reshape(-1, 4, 2)


def sample_bezier(segments, points_per_segment=8):
  """A polyline (m, 2) through cubic segments (n, 4, 2)."""
  t = np.linspace(0, 1, points_per_segment)[:, None]
  basis = np.stack([(1 - t) ** 3, 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t ** 2, t ** 3], axis=1)  # (p, 4, 1)
  curve = np.einsum('pkx,nkd->npd', basis, segments)  # (n, p, 2)
  return np.concatenate([curve[0, :1], curve[:, 1:].reshape(-1, 2)])


# Drawing ----------------------------------------------------------------------------------------
def random_affine(rng):
  """A 2x3 map of KanjiVG coordinates about the box centre: rotation +-10 deg, scale 0.8-1.05
  with +-10% anisotropy, shear +-0.15, shift +-6 units (of 109)."""
  angle = np.deg2rad(rng.uniform(-10, 10))
  scale = rng.uniform(0.8, 1.05) * np.exp(rng.uniform(-0.1, 0.1) * np.array([1, -1]))
  shear = rng.uniform(-0.15, 0.15)
  rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
  linear = rotation @ np.array([[1, shear], [0, 1]]) @ np.diag(scale)
  centre = np.full(2, BOX / 2)
  return linear, centre - linear @ centre + rng.uniform(-6, 6, 2)


def draw(strokes, rng):
  """One 28x28 uint8 drawing of a character given as a list of (n, 4, 2) Bezier strokes."""
  linear, shift = random_affine(rng)
  width = rng.uniform(4.0, 7.0)          # stroke width in KanjiVG units (its own drawing uses 3)
  scale = SIZE * SUPERSAMPLE / BOX
  canvas = Image.new('L', (SIZE * SUPERSAMPLE,) * 2, 0)
  pen = ImageDraw.Draw(canvas)
  radius = width * scale / 2
  for segments in strokes:
    moved = segments + rng.normal(0, 1.5, 2) + rng.normal(0, 1.0, segments.shape)  # stroke + control jitter
    line = (sample_bezier(moved) @ linear.T + shift) * scale
    pen.line([tuple(p) for p in line], fill=255, width=max(1, round(2 * radius)), joint='curve')
    for x, y in (line[0], line[-1]):  # round caps
      pen.ellipse([x - radius, y - radius, x + radius, y + radius], fill=255)
  small = canvas.reduce(SUPERSAMPLE)    # box filter: antialiased strokes
  return np.asarray(small, np.uint8)[..., None]


# Characters and alphabets -----------------------------------------------------------------------
def read_character(path):
  """(stroke path data, radical or None) of one KanjiVG file."""
  text = path.read_text(encoding='utf-8')
  paths = re.findall(r'<path [^>]*?\sd="([^"]*)"', text)
  radical = None
  tag = re.search(r'<g [^>]*kvg:radical="general"[^>]*>', text)
  if tag:
    name = re.search(r'kvg:original="([^"]*)"', tag.group(0)) or re.search(r'kvg:element="([^"]*)"', tag.group(0))
    radical = name.group(1) if name else None
  return paths, radical


def script(code):
  if 0x3040 <= code < 0x30A0:
    return 'hiragana'
  if 0x30A0 <= code < 0x3100:
    return 'katakana'
  if 0x4E00 <= code < 0xA000:
    return 'kanji'
  return None


def characters(config, folder=None):
  """[(name, alphabet, strokes)] in code-point order: every kana, and the kanji of radical groups
  with at least `min_group` members of at most `max_strokes` strokes (the first `max_group` of each)."""
  folder = folder or kanji_dir()
  chosen, groups = [], {}
  for path in sorted(folder.glob('*.svg')):
    if '-' in path.stem:  # variant drawings of a character
      continue
    code = int(path.stem, 16)
    kind = script(code)
    if kind is None or (kind != 'kanji' and not config.kana):
      continue
    paths, radical = read_character(path)
    name = f'U+{code:04X} {chr(code)}'
    if kind != 'kanji':
      chosen.append((name, kind, paths))
    elif radical and len(paths) <= config.max_strokes:
      groups.setdefault(f'radical {radical}', []).append((name, f'radical {radical}', paths))
  for members in groups.values():
    if len(members) >= config.min_group:
      chosen.extend(members[:config.max_group])
  return [(name, alphabet, [s for s in map(parse_path, paths) if len(s)])
          for name, alphabet, paths in sorted(chosen, key=lambda c: c[0])]


def split_alphabets(counts, fractions, seed):
  """{alphabet: split}: alphabets in a seeded order fill train, validation and test up to their
  share of the classes (each split gets at least one alphabet)."""
  names = sorted(counts)
  order = [names[i] for i in np.random.default_rng(seed).permutation(len(names))]
  total, bounds = sum(counts.values()), np.cumsum(fractions)
  assignment, seen = {}, 0
  for k, name in enumerate(order):
    left = len(order) - k
    split = int(np.searchsorted(bounds * total, seen + counts[name] / 2))
    split = min(split, len(SPLITS) - 1)
    empty = [s for s in range(len(SPLITS)) if s not in assignment.values()]
    if left <= len(empty) and split not in empty:  # the last alphabets go to splits that have none
      split = empty[0]
    assignment[name] = split
    seen += counts[name]
  return {name: SPLITS[s] for name, s in assignment.items()}


_CHARACTERS = {}  # config name -> characters(config), read once per process


class Builder(tfds.core.GeneratorBasedBuilder):
  """kanji_glyphs: KanjiVG characters drawn 20 times each at 28x28, split by alphabet.

  Configs: `omniglot_like` (the experiment's set, the default) and `small` (three kana and kanji
  groups of a few characters, for tests that build the set in seconds).
  """

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = [
      GlyphConfig(name='omniglot_like', description='hiragana, katakana and kanji (<= 10 strokes) radical '
                  'groups of >= 20 characters, at most 40 each; 20 drawings per character'),
      GlyphConfig(name='small', description='10 characters of each kanji radical group with >= 10 of at '
                  'most 6 strokes, for tests', max_strokes=6, min_group=10, max_group=10, kana=False),
  ]

  def _info(self):
    name = self.builder_config.name
    if name not in _CHARACTERS:  # every construction of the builder asks for its info
      _CHARACTERS[name] = characters(self.builder_config)
    self._characters = _CHARACTERS[name]
    alphabets = sorted({alphabet for _, alphabet, _ in self._characters})
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=(SIZE, SIZE, 1), dtype=np.uint8),
            'label': tfds.features.ClassLabel(names=[name for name, _, _ in self._characters]),
            'alphabet': tfds.features.ClassLabel(names=alphabets),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://kanjivg.tagaini.net',
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # The data ships with an installed package.
    config = self.builder_config
    counts = {}
    for _, alphabet, _ in self._characters:
      counts[alphabet] = counts.get(alphabet, 0) + 1
    split_of = split_alphabets(counts, config.split_fractions, config.seed)
    return {split: self._generate_examples(split_of, split) for split in SPLITS}

  def _generate_examples(self, split_of, split):
    config = self.builder_config
    for label, (name, alphabet, strokes) in enumerate(self._characters):
      if split_of.get(alphabet) != split:
        continue
      # One generator per character: its drawings do not depend on which other characters are built.
      rng = np.random.default_rng([config.seed, label])
      for k in range(config.drawings):
        yield f'{label}-{k}', {'image': draw(strokes, rng), 'label': name, 'alphabet': alphabet}
