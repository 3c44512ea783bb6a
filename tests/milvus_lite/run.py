"""Runs milvus-lite's own pymilvus-driven tests (tests/adapter, tests/compatibility of its PyPI
sdist, which no one here wrote) against a real `walden standalone`, through a shim that answers
their "start a server" with Walden's address (tests/milvus_lite/shim).

Their code is downloaded (`pip download`, cached per machine), never committed. Every test is
run; the report counts passed, failed and skipped tests, by file. The run fails when a test
listed in `expected_pass.txt` does not pass (a regression), or when a test passes that the
list does not name (so the list is kept exact: add it). Tests not listed fail for reasons
`expected_pass.txt`'s header groups (features Walden leaves out).

    python3 tests/milvus_lite/run.py [--update] [pytest args...]

`--update` rewrites `expected_pass.txt` to what passed in this run.
"""

import collections
import os
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
VERSION = "3.2.2"
CACHE = Path(os.environ.get("WALDEN_TEST_CACHE", Path.home() / ".cache" / "walden"))
EXPECTED = HERE / "expected_pass.txt"

# Whole files that test milvus-lite itself (its engine, translators, restarts of its own
# process, its databases), not the API a client sees.
NOT_THE_API = {
    "adapter/test_grpc_translators_records.py",
    "adapter/test_grpc_translators_result.py",
    "adapter/test_grpc_translators_schema.py",
    "adapter/test_grpc_server_startup.py",
    "adapter/test_server_restart.py",
    "adapter/test_against_milvus.py",
    "adapter/test_milvus_lite_compat.py",
}

sys.path.insert(0, str(ROOT / "tests" / "milvus"))
from conftest import Standalone  # noqa: E402


def sdist() -> Path:
    """The extracted sdist, downloaded once per machine."""
    where = CACHE / f"milvus_lite-{VERSION}"
    if (where / "tests" / "adapter").is_dir():
        return where
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as d:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
             "--no-binary", ":all:", f"milvus-lite=={VERSION}", "-d", d],
            check=True,
        )
        archive = next(Path(d).glob("milvus_lite-*.tar.gz"))
        with tarfile.open(archive) as t:
            t.extractall(CACHE, filter="data")
    return where


def files(tests: Path) -> list[str]:
    out = []
    for group in ["adapter", "compatibility"]:
        for f in sorted((tests / group).glob("test_*.py")):
            rel = f"{group}/{f.name}"
            if rel not in NOT_THE_API:
                out.append(rel)
    return out


def main() -> int:
    args = sys.argv[1:]
    update = "--update" in args
    args = [a for a in args if a != "--update"]
    src = sdist()
    tests = src / "tests"
    with tempfile.TemporaryDirectory(prefix="walden-milvus-lite-") as d:
        server = Standalone(Path(d))
        junit = Path(d) / "junit.xml"
        env = dict(os.environ)
        env["WALDEN_MILVUS_ADDR"] = server.addr
        env["PYTHONPATH"] = os.pathsep.join([str(HERE / "shim"), str(src)])
        try:
            subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                 "-o", "addopts=", "--rootdir", str(src), f"--junitxml={junit}",
                 "-m", "not slow and not soak", *files(tests), *args],
                cwd=tests, env=env, timeout=3000,
            )
        finally:
            server.stop()
        results = parse(junit)
    counts = collections.Counter(r for r in results.values())
    by_file = collections.defaultdict(collections.Counter)
    for name, r in results.items():
        by_file[name.split("::")[0]][r] += 1
    print("\nmilvus-lite's suite against Walden, by file (passed / failed / skipped):")
    for f in sorted(by_file):
        c = by_file[f]
        print(f"  {f}: {c['passed']} / {c['failed']} / {c['skipped']}")
    print(f"total: {counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped")
    passed = {n for n, r in results.items() if r == "passed"}
    if update:
        header = [l for l in EXPECTED.read_text().splitlines() if l.startswith("#")] if EXPECTED.exists() else []
        EXPECTED.write_text("\n".join(header + sorted(passed)) + "\n")
        print(f"wrote {len(passed)} tests to {EXPECTED}")
        return 0
    expected = {l.strip() for l in EXPECTED.read_text().splitlines() if l.strip() and not l.startswith("#")}
    regressed = sorted(expected - passed)
    unlisted = sorted(passed - expected)
    for n in regressed:
        print(f"REGRESSED (expected to pass): {n}")
    for n in unlisted:
        print(f"NEWLY PASSING (add to {EXPECTED.name}): {n}")
    return 1 if regressed or unlisted else 0


def parse(junit: Path) -> dict[str, str]:
    """Test id (file::class::name) -> passed | failed | skipped."""
    out = {}
    for case in ET.parse(junit).iter("testcase"):
        file = case.get("file") or case.get("classname", "").replace(".", "/") + ".py"
        parts = case.get("classname", "").split(".")
        cls = [p for p in parts if p[:1].isupper()]
        name = "::".join([file.removeprefix("tests/"), *cls, case.get("name", "")])
        if case.find("failure") is not None or case.find("error") is not None:
            out[name] = "failed"
        elif case.find("skipped") is not None:
            out[name] = "skipped"
        else:
            out[name] = "passed"
    return out


if __name__ == "__main__":
    sys.exit(main())
