"""Errors that name the problem and the fix, raised before any compute."""


class ConfigError(ValueError):
  """A configuration value is wrong: names the key, the value and what is allowed."""

  def __init__(self, key, value=None, allowed=None, hint=''):
    if allowed is None:  # a whole message: config_flags re-raises get_config's errors as type(error)(message)
      self.key = self.value = self.allowed = None
      super().__init__(key)
      return
    self.key, self.value, self.allowed = key, value, allowed
    message = f'config.{key} = {value!r} is not allowed; allowed: {allowed}'
    super().__init__(message + (f'. {hint}' if hint else ''))


class DataError(RuntimeError):
  """A dataset is missing, unprepared, empty or damaged: says what to do."""
