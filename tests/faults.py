"""Fault injection: a stand-in for the ``os`` module that fails chosen calls."""

import errno
import os


class FaultyOS:
    """Delegates to ``os`` except for ``fail``: name -> (errno, predicate(args) -> bool)."""

    def __init__(self, **fail):
        self._fail = fail
        self.calls = {name: 0 for name in fail}

    def __getattr__(self, name):
        real = getattr(os, name)
        if name not in self._fail:
            return real
        err, when = self._fail[name]

        def wrapper(*args, **kwargs):
            if when(*args):
                self.calls[name] += 1
                raise OSError(err, os.strerror(err))
            return real(*args, **kwargs)

        return wrapper


def always(*_args):
    return True


ENOSPC, EIO, EACCES = errno.ENOSPC, errno.EIO, errno.EACCES
