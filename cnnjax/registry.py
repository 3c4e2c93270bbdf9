"""Name -> object registries for models, datasets and methods."""

from cnnjax.errors import ConfigError


class Registry:
  """A named collection; `get` of an unknown name lists the known ones.

  >>> MODELS = Registry('model')
  >>> @MODELS.register('lenet')
  ... def lenet(...): ...
  """

  def __init__(self, kind):
    self.kind = kind
    self._items = {}

  def register(self, name):
    def add(obj):
      if name in self._items:
        raise ValueError(f'{self.kind} {name!r} is registered twice')
      self._items[name] = obj
      return obj
    return add

  def get(self, name, key=None):
    """The object called `name`; `key` is the config key to blame when it is unknown."""
    if name not in self._items:
      raise ConfigError(key or self.kind, name, self.names(), f'unknown {self.kind} name')
    return self._items[name]

  def names(self):
    return sorted(self._items)

  def __contains__(self, name):
    return name in self._items

  def __iter__(self):
    return iter(self.names())
