"""Shared plumbing of the interop suite: where qlora, the fixtures and the cache are, how a check
imports a library (a failed import fails the check, never skips it), how qlora is run, and the
report every check adds a line to (printed at the end of the run and written to
build/interop-results.json, the figures of docs/interop.md)."""
import importlib
import importlib.metadata
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "build"
CACHE = Path(os.environ.get("QLORA_INTEROP_CACHE", BUILD / "interop-cache"))
CACHE.mkdir(parents=True, exist_ok=True)
# qlora's own caches (built-in models, tokenized data) stay inside the interop cache
os.environ.setdefault("QLORA_CACHE", str(CACHE / "qlora-cache"))
# everything runs offline, on the CPU, with the machine's cores
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULTS = []


def qlora_bin() -> Path:
    p = Path(os.environ.get("QLORA_BIN", BUILD / "qlora"))
    if not p.is_absolute():
        p = ROOT / p
    return p


def fixtures_dir() -> Path | None:
    env = os.environ.get("QLORA_FIXTURES")
    p = Path(env) if env else ROOT.parent / "shared" / "fixtures"
    return p if p.is_dir() else None


def peer_fixtures_dir() -> Path:
    """Where scripts/peer-fixtures.sh unpacks the test data the peer libraries publish on PyPI."""
    env = os.environ.get("QLORA_PEER_FIXTURES")
    return Path(env) if env else BUILD / "peer-fixtures"


def need_fixture(rel: str) -> Path:
    """The fixture file or folder `rel`, or skip (fixtures live outside the repository): the shared
    fixtures first, then the peer fixtures (scripts/peer-fixtures.sh)."""
    base = fixtures_dir()
    peer = peer_fixtures_dir() / rel
    if base is None:
        if peer.exists():
            return peer
        pytest.skip("fixtures absent (../shared/fixtures or $QLORA_FIXTURES)")
    p = base / rel
    if not p.exists():
        if peer.exists():
            return peer
        pytest.skip(f"fixture {rel} absent under {base} and {peer_fixtures_dir()} (scripts/peer-fixtures.sh)")
    return p


def lib(name: str, dist: str | None = None):
    """Import a library the suite proves qlora against; a failure fails the check with the reason."""
    try:
        mod = importlib.import_module(name)
    except Exception as e:  # ImportError, or a broken install raising anything else
        pytest.fail(f"library {name} failed to import: {type(e).__name__}: {e} "
                    f"(run scripts/interop-venv.sh; pins in tests/interop/requirements.txt)", pytrace=False)
    return mod


def version(dist: str) -> str:
    try:
        return f"{dist} {importlib.metadata.version(dist)}"
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"library {dist} is not installed", pytrace=False)


def report(check: str, compares: str, library: str, agreement: str, **figures):
    """One line of the suite's report: what was compared, against which library version, and how
    well it agreed. Printed live and at the end; stored in build/interop-results.json."""
    rec = {"check": check, "compares": compares, "library": library, "agreement": agreement, **figures}
    RESULTS.append(rec)
    sys.__stdout__.write(f"\n  [{check}] {compares} | {library} | {agreement}\n")
    sys.__stdout__.flush()


def run_qlora(*args, check=True, timeout=900, env=None) -> subprocess.CompletedProcess:
    exe = qlora_bin()
    if not exe.exists():
        pytest.fail(f"qlora binary {exe} not found (build it, or set QLORA_BIN)", pytrace=False)
    cmd = [str(exe), *map(str, args)]
    r = subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", errors="replace",
                       timeout=timeout, env=env)
    if check and r.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}",
                    pytrace=False)
    return r


@pytest.fixture(scope="session", autouse=True)
def _torch_threads():
    try:
        import torch
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    except Exception:
        pass  # the checks that need torch fail on their own import
    yield


_t0 = {}


def pytest_runtest_setup(item):
    _t0[item.nodeid] = time.time()


def pytest_runtest_teardown(item):
    t = time.time() - _t0.get(item.nodeid, time.time())
    RESULTS.append({"test": item.nodeid, "seconds": round(t, 1)})


def pytest_terminal_summary(terminalreporter):
    checks = [r for r in RESULTS if "check" in r]
    if not checks:
        return
    tr = terminalreporter
    tr.section("interop report: what was compared, against which library, and the agreement")
    for r in checks:
        tr.write_line(f"[{r['check']}] {r['compares']}")
        tr.write_line(f"    {r['library']}: {r['agreement']}")
    out = BUILD / "interop-results.json"
    try:
        out.write_text(json.dumps(RESULTS, indent=1))
        tr.write_line(f"(written to {out})")
    except OSError:
        pass
