"""``zoned-kernel``: build, verify and store the hardened guest kernel.

    zoned-kernel build [--profile strict] [--store DIR] [--cache DIR] [--jobs N]
    zoned-kernel verify [--profile strict]     # config only, no compile
    zoned-kernel list [--store DIR]

Steps of ``build``: fetch the pinned Debian ``linux-source`` package into the
cache (``apt-get download`` of the exact version) and unpack it once; merge
the profile's fragments; ``make allnoconfig`` with the merged fragments as
``KCONFIG_ALLCONFIG``, then ``make olddefconfig``; verify that every requested
option ended with the requested value (a mismatch fails, naming the symbol,
both values and the unmet dependencies); compile ``bzImage`` with all cores
and a fixed timestamp, user and host; install the image, its ``.config`` and
a manifest into the store under a directory named by the build hash. A build
whose hash is already in the store is not rebuilt.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import msgspec

from zoned.kernel import kconfig
from zoned.kernel.cmdline import hardened_cmdline
from zoned.kernel.profiles import GUEST_KERNEL_DIR, Profiles, load_profiles
from zoned.kernel.store import DEFAULT_STORE, KernelManifest, find_kernel, list_kernels

# Bump when the build procedure changes in a way that changes the image.
BUILD_TOOL_VERSION = "1"
DEFAULT_CACHE = Path("/var/cache/zoned/kernel")
# Reproducible-build identity baked into the image.
BUILD_ENV = {
    "KBUILD_BUILD_TIMESTAMP": "2026-01-01 00:00:00 UTC",
    "KBUILD_BUILD_USER": "zoned",
    "KBUILD_BUILD_HOST": "zoned-build",
    "KBUILD_BUILD_VERSION": "1",
}


class BuildError(Exception):
    pass


def _log(message: str) -> None:
    print(f"zoned-kernel: {message}", file=sys.stderr, flush=True)


def _run(argv: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> None:
    result = subprocess.run(argv, cwd=cwd, env=env, check=False)
    if result.returncode != 0:
        raise BuildError(f"command failed ({result.returncode}): {' '.join(argv)}")


def compiler_version() -> str:
    out = subprocess.run(["gcc", "--version"], capture_output=True, text=True, check=True)
    return out.stdout.splitlines()[0]


def ensure_source(profiles: Profiles, cache: Path) -> Path:
    """Unpacked source tree of the pinned Debian package, fetched once into the cache."""
    src = profiles.source
    tree = cache / f"src-{src.version}"
    marker = tree / ".zoned-unpacked"
    if marker.exists():
        return next(p for p in tree.iterdir() if p.is_dir())
    cache.mkdir(parents=True, exist_ok=True)
    debs = cache / "debs"
    debs.mkdir(exist_ok=True)
    deb = next(debs.glob(f"{src.package}_{src.version.replace(':', '%3a')}_*.deb"), None)
    if deb is None:
        _log(f"fetching {src.package}={src.version} with apt-get download")
        result = subprocess.run(
            ["apt-get", "download", f"{src.package}={src.version}"],
            cwd=debs,
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise BuildError(
                f"cannot download {src.package}={src.version} (pinned in "
                f"guest-kernel/profiles.toml): {result.stderr.strip()}. If Debian no longer "
                "serves this version, move the pin to the current one (apt-cache policy "
                f"{src.package}) in a reviewed change."
            )
        deb = next(debs.glob(f"{src.package}_*.deb"))
    if tree.exists():
        shutil.rmtree(tree)
    extract = cache / "extract"
    if extract.exists():
        shutil.rmtree(extract)
    _log(f"unpacking {deb.name}")
    _run(["dpkg-deb", "-x", str(deb), str(extract)])
    tree.mkdir(parents=True)
    _run(["tar", "-xaf", str(extract / src.tarball), "-C", str(tree)])
    shutil.rmtree(extract)
    marker.touch()
    return next(p for p in tree.iterdir() if p.is_dir())


def load_fragments(
    profiles: Profiles, profile: str, guest_kernel_dir: Path
) -> list[kconfig.Fragment]:
    if profile not in profiles.profiles:
        raise BuildError(f"unknown profile {profile!r}; known: {', '.join(profiles.profiles)}")
    fragments = []
    for name in profiles.profiles[profile].fragments:
        path = guest_kernel_dir / "fragments" / f"{name}.config"
        fragments.append(kconfig.parse_fragment(path.name, path.read_text()))
    return fragments


def scan_kconfig(tree: Path) -> dict[str, kconfig.KconfigSymbol]:
    """Every symbol defined by the tree's Kconfig files (x86 and generic)."""
    known: dict[str, kconfig.KconfigSymbol] = {}
    for path in tree.rglob("Kconfig*"):
        rel = path.relative_to(tree).parts
        if rel[0] == "arch" and len(rel) > 1 and rel[1] not in ("x86", "Kconfig"):
            continue
        if path.is_file():
            kconfig.parse_kconfig(path.read_text(errors="replace"), known)
    return known


def configure(
    tree: Path, outdir: Path, merged: dict[str, kconfig.Option]
) -> tuple[dict[str, str], list[kconfig.Mismatch]]:
    """allnoconfig + fragments + olddefconfig in ``outdir``; returns the config and mismatches."""
    outdir.mkdir(parents=True, exist_ok=True)
    allconfig = outdir / "zoned-allconfig"
    allconfig.write_text(kconfig.render_allconfig(merged))
    base = ["make", "-s", "-C", str(tree), f"O={outdir}"]
    _run([*base, f"KCONFIG_ALLCONFIG={allconfig}", "allnoconfig"])
    _run([*base, "olddefconfig"])
    obtained = kconfig.parse_dotconfig((outdir / ".config").read_text())
    mismatches = kconfig.verify(merged, obtained, scan_kconfig(tree))
    return obtained, mismatches


def build(
    profile: str,
    store: Path,
    cache: Path,
    jobs: int,
    guest_kernel_dir: Path = GUEST_KERNEL_DIR,
    force: bool = False,
) -> Path:
    profiles = load_profiles(guest_kernel_dir)
    fragments = load_fragments(profiles, profile, guest_kernel_dir)
    merged, overrides = kconfig.merge(fragments)
    kconfig.not_taken(fragments, merged)  # a contradiction fails before any work
    for override in overrides:
        _log(
            f"CONFIG_{override.symbol}: {override.old.source} asks {override.old.value}, "
            f"{override.new.source} overrides with {override.new.value}"
        )
    fragment_hash = kconfig.fragments_hash((f.name, f.text) for f in fragments)
    gcc = compiler_version()
    build_hash = kconfig.fragments_hash(
        [
            ("fragments", fragment_hash),
            ("source", f"{profiles.source.package}={profiles.source.version}"),
            ("compiler", gcc),
            ("tool", BUILD_TOOL_VERSION),
            ("env", repr(sorted(BUILD_ENV.items()))),
        ]
    )
    target = store / f"{profile}-{build_hash[:16]}"
    if not force and (target / "manifest.json").is_file():
        _point(store, profile, target)
        _log(f"{profile}: up to date ({target})")
        return target

    started = time.monotonic()
    tree = ensure_source(profiles, cache)
    outdir = cache / f"build-{profile}"
    _log(f"{profile}: configuring in {outdir}")
    _, mismatches = configure(tree, outdir, merged)
    if mismatches:
        for mismatch in mismatches:
            _log("MISMATCH " + mismatch.describe())
        raise BuildError(
            f"{len(mismatches)} requested option(s) did not stick for profile {profile!r}"
        )
    _log(f"{profile}: all {len(merged)} requested options verified; compiling with -j{jobs}")
    env = {**os.environ, **BUILD_ENV}
    _run(["make", "-s", "-C", str(tree), f"O={outdir}", f"-j{jobs}", "bzImage"], env=env)
    image = outdir / "arch/x86/boot/bzImage"
    release = (outdir / "include/config/kernel.release").read_text().strip()
    data = image.read_bytes()

    staging = store / f".{target.name}.tmp"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    shutil.copyfile(image, staging / "bzImage")
    shutil.copyfile(outdir / ".config", staging / "config")
    manifest = KernelManifest(
        profile=profile,
        kernel_version=release.split("-")[0],
        kernel_release=release,
        debian_package=profiles.source.package,
        debian_version=profiles.source.version,
        fragments=[f.name for f in fragments],
        fragment_hash=fragment_hash,
        build_hash=build_hash,
        compiler=gcc,
        build_time=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        build_seconds=round(time.monotonic() - started, 1),
        image="bzImage",
        image_sha256=hashlib.sha256(data).hexdigest(),
        image_size=len(data),
        cmdline=hardened_cmdline(profile, "q35", None),
        not_enabled=[entry.describe() for entry in kconfig.not_taken(fragments, merged)],
    )
    (staging / "manifest.json").write_bytes(msgspec.json.format(msgspec.json.encode(manifest)))
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
    _point(store, profile, target)
    _log(f"{profile}: installed {target} ({len(data)} bytes, {manifest.build_seconds}s)")
    return target


def _point(store: Path, profile: str, target: Path) -> None:
    """Atomically point ``<store>/<profile>`` at ``target``."""
    link = store / profile
    tmp = store / f".{profile}.link"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(target.name)
    os.replace(tmp, link)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="zoned-kernel", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("build", "verify"):
        p = sub.add_parser(name)
        p.add_argument("--profile", default="strict")
        p.add_argument("--store", type=Path, default=DEFAULT_STORE)
        p.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
        p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
        p.add_argument("--force", action="store_true", help="rebuild even if in the store")
        p.add_argument("--guest-kernel-dir", type=Path, default=GUEST_KERNEL_DIR)
    p = sub.add_parser("list")
    p.add_argument("--store", type=Path, default=DEFAULT_STORE)
    args = parser.parse_args(argv)
    try:
        if args.command == "list":
            for kernel in list_kernels(args.store):
                m = kernel.manifest
                print(f"{m.profile:12} {m.kernel_release:20} {m.image_size:>9} {kernel.directory}")
            return 0
        if args.command == "verify":
            profiles = load_profiles(args.guest_kernel_dir)
            fragments = load_fragments(profiles, args.profile, args.guest_kernel_dir)
            merged, _ = kconfig.merge(fragments)
            kconfig.not_taken(fragments, merged)
            tree = ensure_source(profiles, args.cache)
            _, mismatches = configure(tree, args.cache / f"verify-{args.profile}", merged)
            for mismatch in mismatches:
                print("MISMATCH " + mismatch.describe())
            print(f"{args.profile}: {len(merged)} options, {len(mismatches)} mismatches")
            return 1 if mismatches else 0
        build(args.profile, args.store, args.cache, args.jobs, args.guest_kernel_dir, args.force)
        find_kernel(args.store, args.profile)
        return 0
    except (BuildError, kconfig.FragmentError) as exc:
        _log(f"error: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
