"""Where a bundle's files may be: the one containment rule, used by the reader and every writer.

Every file name a manifest lists (``files``, each graph's ``file`` and ``variants``, ``tokenizer``, ``weights``, the
files named in ``validation``) is a plain relative POSIX path inside the bundle: no absolute path or drive, no ``..``,
``.`` or empty part, no backslash, no NUL. :func:`check_name` applies the rule to the text alone, so a manifest is
refused when it is parsed, before any file is looked at: the error is the same whether or not a target outside
exists. :func:`bundle_path` then joins a checked name to the bundle folder and refuses a symlink anywhere on the
way (the file or a folder above it) or a path that resolves outside; :func:`walk_files` lists a folder's files and
refuses symlinks and special files. Nothing reads, writes, hashes or deletes a bundle file by a name that has not
passed through here.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path, PurePosixPath, PureWindowsPath

from fine_infer.errors import BundleError

RULE = "a bundle file name is a relative POSIX path inside the bundle: no absolute path, '..', '.' or empty part, " \
       "backslash or NUL"


def check_name(name: object, field: str) -> str:
    """``name`` if it is a plain relative POSIX path, else a :class:`BundleError` naming ``field`` and ``name``.

    Looks at the text only (never at the file system), so the answer cannot tell whether anything exists."""
    if (not isinstance(name, str) or not name or "\x00" in name or "\\" in name or name.startswith("/")
            or PureWindowsPath(name).drive or any(part in ("", ".", "..") for part in name.split("/"))):
        raise BundleError(f"manifest field {field} names {name!r}, which is not a file inside the bundle ({RULE}); "
                          "refusing the bundle")
    return name


def bundle_path(folder: str | Path, name: str, field: str = "files") -> Path:
    """The path of bundle file ``name`` inside ``folder``: :func:`check_name`, then no symlink on the way (the file or
    a folder above it) and nothing that resolves outside ``folder``. The file need not exist."""
    folder = Path(folder)
    check_name(name, field)
    parts = PurePosixPath(name).parts
    path = folder
    for i, part in enumerate(parts):
        path = path / part
        if path.is_symlink():
            what = ("is a symlink" if i == len(parts) - 1 else
                    f"is inside a symlinked folder ({'/'.join(parts[:i + 1])})")
            raise BundleError(f"bundle {folder}: {name} {what}; a bundle holds plain files only (refusing it)")
    if not path.resolve().is_relative_to(folder.resolve()):
        raise BundleError(f"bundle {folder}: {name} resolves outside the bundle; refusing it")
    return path


def walk_files(folder: str | Path) -> list[str]:
    """Every file below ``folder`` as a sorted bundle-relative POSIX name; a symlink or a special file (pipe, socket,
    device) anywhere below is a :class:`BundleError`."""
    folder = Path(folder)
    out = []
    for root, dirs, files in os.walk(folder):
        for entry in (*dirs, *files):
            p = Path(root, entry)
            mode = os.lstat(p).st_mode
            rel = p.relative_to(folder).as_posix()
            if stat.S_ISLNK(mode):
                raise BundleError(f"bundle {folder}: {rel} is a symlink; a bundle holds plain files only")
            if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                raise BundleError(f"bundle {folder}: {rel} is not a regular file; a bundle holds plain files only")
            if entry in files:
                out.append(rel)
    return sorted(out)
