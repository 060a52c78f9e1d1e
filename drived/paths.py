"""The one place a request's drive, component and path become a storage key.

Drive names, components and paths arrive validated by `drive_client.uri`
(no '..', no absolute paths, no control characters). A managed file lives
at the key `<drive>/<component>/<path>`: each component's namespace is a
folder of its own, so ownership needs no extra bookkeeping.
"""

from __future__ import annotations


def component_key(drive: str, component: str) -> str:
    """The folder holding one component's files in a drive."""
    return f"{drive}/{component}"


def object_key(drive: str, component: str, path: str) -> str:
    """The key of `path` ("" for the namespace's root) in one component's namespace."""
    return f"{drive}/{component}/{path}" if path else component_key(drive, component)


def relative_path(key: str, drive: str, component: str) -> str:
    """The drive path of a key from `object_key(drive, component, ...)`."""
    return key[len(component_key(drive, component)) + 1:]
