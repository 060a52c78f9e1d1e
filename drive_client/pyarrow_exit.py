"""Lets a script that read `lit://` files with pyarrow (pandas, `pyarrow.dataset`) exit cleanly.

pyarrow reads an fsspec filesystem through C++ objects that hold its Python
objects (the filesystem, each open file). Its CPU and I/O thread pools can
drop the last reference to one of them just after the call that used it has
returned: a task hands its result over, then releases what it captured.
Dropping a Python object takes the GIL. Once the interpreter has begun to
finalize, a thread that asks for the GIL is ended where it stands
(`pthread_exit`); inside arrow's C++ destructor that aborts the process:
"terminate called without an active exception", exit 134
(apache/arrow#39162, #34314).

`wait_for_pyarrow_threads`, run at exit before finalization begins, waits with
the GIL released until both pools are idle: every such release has then
happened while the GIL could still be had. pyarrow has no Python call for
this, so it calls arrow's C++ `ThreadPool::WaitForIdle` through ctypes, in the
libarrow that pyarrow loaded; a build of pyarrow without these symbols is
left as it is.
"""

from __future__ import annotations

import ctypes
import os
import sys

# arrow's C++ functions by their symbol names (Itanium C++ ABI): the process's CPU and I/O thread pools,
# `ThreadPool::WaitForIdle` (returns once a pool has no task queued or running) and `ThreadPool::GetNumTasks`.
_POOLS = ("_ZN5arrow8internal16GetCpuThreadPoolEv", "_ZN5arrow2io8internal15GetIOThreadPoolEv")
_WAIT_FOR_IDLE = "_ZN5arrow8internal10ThreadPool11WaitForIdleEv"
_NUM_TASKS = "_ZN5arrow8internal10ThreadPool11GetNumTasksEv"


def wait_for_pyarrow_threads() -> bool:
    """Returns once pyarrow's CPU and I/O thread pools are both idle, releasing the GIL meanwhile: True; at once
    when pyarrow was never imported or its thread pools are not found: False."""
    lib = sys.modules.get("pyarrow.lib")
    if lib is None or not hasattr(os, "RTLD_NOLOAD"):
        return False
    try:
        # the loaded pyarrow.lib (never a second copy): its symbols and those of the libarrow it links
        arrow = ctypes.CDLL(lib.__file__, mode=os.RTLD_NOLOAD)
        pool_getters = [getattr(arrow, name) for name in _POOLS]
        wait_for_idle, num_tasks = getattr(arrow, _WAIT_FOR_IDLE), getattr(arrow, _NUM_TASKS)
    except (AttributeError, OSError):
        return False
    for get_pool in pool_getters:
        get_pool.restype = ctypes.c_void_p
    wait_for_idle.argtypes = num_tasks.argtypes = [ctypes.c_void_p]
    wait_for_idle.restype = None
    num_tasks.restype = ctypes.c_int
    pools = [get_pool() for get_pool in pool_getters]
    # a task of one pool may queue work on the other: done when both are idle at once
    while True:
        for pool in pools:
            wait_for_idle(pool)  # ctypes releases the GIL for the call
        if not any(num_tasks(pool) for pool in pools):
            return True
