"""Podman on this kind of host, for the image tests: a containers.conf that works here, a `podman`
runner, and the local Debian bookworm base (debootstrap + import) that stands in for a registry.

No registry is reachable here (ENVIRONMENT.md), so both flavours build from `localbase:bookworm`;
the host's CA bundle goes in as the build's proxy CA secret (`make image CA_BUNDLE=...`).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

BASE = "localbase:bookworm"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
"""


def missing() -> str | None:
    """Why podman builds cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root for podman build/run here (CI runs as root)"
    absent = [t for t in ("podman", "buildah", "runc", "debootstrap") if shutil.which(t) is None]
    if absent:
        return f"missing {', '.join(absent)}: apt-get install -y podman buildah runc debootstrap"
    return None


def podman_env(folder: Path) -> dict[str, str]:
    """Environment for podman commands: a containers.conf in `folder` that works here (runc, cgroupfs)."""
    conf = folder / "containers.conf"
    conf.write_text(CONTAINERS_CONF)
    return {**os.environ, "CONTAINERS_CONF": str(conf)}


def podman(env: dict, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["podman", *args], env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert r.returncode == 0, f"podman {' '.join(args)}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def local_base(env: dict, scratch: Path) -> str:
    """A minimal local Debian bookworm image (debootstrap + import), made once per machine."""
    if podman(env, "image", "exists", BASE, check=False).returncode == 0:
        return BASE
    rootfs = scratch / "rootfs"
    subprocess.run(
        ["debootstrap", "--variant=minbase", "bookworm", str(rootfs), apt_mirror()],
        check=True, capture_output=True, timeout=900,
    )  # fmt: skip
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    subprocess.run(
        ["podman", "import", "-", BASE], stdin=tar.stdout, env=env, check=True, capture_output=True
    )
    tar.wait()
    shutil.rmtree(rootfs, ignore_errors=True)
    return BASE


def apt_mirror() -> str:
    """The Debian mirror apt already uses here (deb822 or one-line sources)."""
    for src in [*Path("/etc/apt/sources.list.d").glob("*.sources"), Path("/etc/apt/sources.list")]:
        if src.is_file():
            m = re.search(r"^(?:URIs:|deb)\s+(\S+/debian)/?\s", src.read_text(), re.M)
            if m:
                return m.group(1)
    return "http://deb.debian.org/debian"


def save_as_make_sif_does(env: dict, image: str, archive: Path, timeout: float = 1800) -> list[dict]:
    """Run the `podman save` line of `make sif` (dry-run), writing to `archive`; its manifest.json."""
    import json
    import tarfile

    from conftest import REPO, clean_make_env

    dry = subprocess.run(["make", "-s", "-n", "-C", str(REPO), "sif", "ENGINE=podman", f"IMAGE={image}"],
                         env=clean_make_env(env), capture_output=True, text=True, check=True).stdout  # fmt: skip
    save = next(line for line in dry.splitlines() if " save " in line).split()
    save[save.index("-o") + 1] = str(archive)  # the same command, written here instead of build/
    subprocess.run(save, env=env, check=True, capture_output=True, timeout=timeout)
    with tarfile.open(archive) as tar:
        return json.load(tar.extractfile("manifest.json"))
