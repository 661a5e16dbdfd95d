"""Fault injection: a stand-in for the ``os`` module that fails chosen calls."""

import ctypes
import errno
import os
import threading


class FaultyOS:
    """Delegates to ``os`` (or ``module``) except for ``fail``: name -> (errno,
    predicate(args) -> bool)."""

    def __init__(self, module=os, **fail):
        self._module = module
        self._fail = fail
        self.calls = {name: 0 for name in fail}

    def __getattr__(self, name):
        real = getattr(self._module, name)
        if name not in self._fail:
            return real
        err, when = self._fail[name]

        def wrapper(*args, **kwargs):
            if when(*args):
                self.calls[name] += 1
                # Like the real call: an error on a path names it.
                named = [args[0]] if args and isinstance(args[0], (str, bytes)) else []
                raise OSError(err, os.strerror(err), *named)
            return real(*args, **kwargs)

        return wrapper


def always(*_args):
    return True


def target(arg):
    """The path an os call acts on: its path argument, or the file behind an fd."""
    if isinstance(arg, int):
        return os.readlink(f"/proc/self/fd/{arg}")
    return os.path.abspath(os.fsdecode(arg))


class NthMatch:
    """Predicate for FaultyOS: true on the ``nth`` call (1-based) whose target path
    satisfies ``match``, which it remembers in ``hit``. Writer threads call it
    concurrently, hence the lock."""

    def __init__(self, match, nth=1):
        self.match = match
        self.nth = nth
        self.seen = 0
        self.hit = None
        self._lock = threading.Lock()

    def __call__(self, *args):
        path = target(args[0])
        if not self.match(path):
            return False
        with self._lock:
            self.seen += 1
            if self.seen != self.nth:
                return False
        self.hit = path
        return True


class FailingLibc:
    """Stands in for ``commit._libc``: ``renameat2`` fails with ``err`` when
    ``when(source)`` is true, setting ctypes' errno as the C call would."""

    def __init__(self, real, err, when):
        self._real = real
        self._err = err
        self._when = when

    def renameat2(self, fd1, src, fd2, dst, flags):
        if self._when(src):
            ctypes.set_errno(self._err)
            return -1
        return self._real.renameat2(fd1, src, fd2, dst, flags)


ENOSPC, EIO, EACCES = errno.ENOSPC, errno.EIO, errno.EACCES
