"""Before `make run`: clear a Snakemake lock left by a killed run, but only when it is certainly stale.

Snakemake locks the working directory (.snakemake/locks/) while it runs and leaves the lock behind when it is
killed; the next run then stops with "Directory cannot be locked". The lock is stale for sure only when no
Snakemake process works in this directory on this host and .snakemake sits on a local filesystem (on a shared
one, e.g. NFS on a cluster, a Snakemake on another host may hold it). Then this removes it and says so;
otherwise it prints the exact `snakemake --unlock` command and exits 1, touching nothing.

    python -m moebench.unlock [--root DIR] [--snakemake PATH]
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

# Filesystems that other hosts can mount: a lock there may belong to a Snakemake on another machine.
SHARED_FS = {"nfs", "nfs4", "cifs", "smb2", "smbfs", "lustre", "gpfs", "beegfs", "ceph", "fuse.ceph",
             "glusterfs", "fuse.glusterfs", "afs", "panfs", "wekafs", "fuse.sshfs", "9p", "fuse.juicefs"}


def lock_files(root: Path) -> list[Path]:
    d = root / ".snakemake" / "locks"
    return sorted(p for p in d.iterdir() if p.is_file()) if d.is_dir() else []


def fs_type(path: Path) -> str:
    """The filesystem type of `path` from /proc/self/mounts (longest matching mount point); '' if unknown."""
    best, kind = "", ""
    target = str(path.resolve())
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return ""
    for line in mounts:
        parts = line.split()
        if len(parts) < 3:
            continue
        mnt = parts[1].replace("\\040", " ")
        if (target == mnt or target.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
            best, kind = mnt, parts[2]
    return kind


def holders(root: Path) -> list[str]:
    """Snakemake processes on this host that may hold root's lock: those working in root, and those whose working
    directory cannot be read (another user's: assume they might)."""
    try:
        out = subprocess.run(["pgrep", "-f", "snakemake"], capture_output=True, text=True).stdout.split()
    except FileNotFoundError:
        return ["(pgrep is not installed: cannot tell)"]
    me, found = {os.getpid(), os.getppid()}, []
    want = root.resolve()
    for pid in out:
        if int(pid) in me:
            continue
        try:
            cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
        except FileNotFoundError:
            continue  # it ended meanwhile
        except OSError:
            found.append(f"pid {pid} (working directory unreadable)")
            continue
        if cwd == want:
            found.append(f"pid {pid}")
    return found


def unlock_command(root: Path, snakemake: str) -> str:
    return f"cd {shlex.quote(str(root))} && {snakemake} --unlock --cores 1"


def check(root: Path, snakemake: str = ".venv/bin/snakemake") -> tuple[int, str]:
    """(exit code, message): 0 and '' when there is no lock; 0 when a stale lock was removed; 1 when unsure."""
    locks = lock_files(root)
    if not locks:
        return 0, ""
    names = ", ".join(str(p.relative_to(root)) for p in locks)
    running, fs = holders(root), fs_type(root / ".snakemake")
    if running:
        why = f"a Snakemake may still run in this directory ({', '.join(running)})"
    elif not fs or fs in SHARED_FS:
        why = (f".snakemake is on a {fs or 'filesystem of unknown type'} filesystem, which other hosts may share: "
               "a Snakemake on another host may hold the lock")
    else:
        for p in locks:
            p.unlink(missing_ok=True)
        return 0, (f"make run: removed a stale Snakemake lock ({names}): no Snakemake runs in {root} on this host "
                   f"and .snakemake is on a local {fs} filesystem. The killed run's unfinished jobs are redone.")
    return 1, (f"make run: Snakemake's lock is present ({names}) and {why}. If no Snakemake works on this directory "
               f"anywhere, clear the lock and run again:\n  {unlock_command(root, snakemake)}\n  make run")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=".", help="the workflow's working directory (holds .snakemake/)")
    ap.add_argument("--snakemake", default=".venv/bin/snakemake", help="the snakemake named in the printed command")
    a = ap.parse_args(argv)
    code, msg = check(Path(a.root).resolve(), a.snakemake)
    if msg:
        print(msg, file=sys.stderr if code else sys.stdout)
    return code


if __name__ == "__main__":
    sys.exit(main())
