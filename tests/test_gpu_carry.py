"""benchmarks/gpu_carry.sh (a directory bundle, in parts) and its device-side install.sh, run here with CARRY_ROOT."""

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _bundle(tree: Path, out: Path) -> list[Path]:
    subprocess.run(["bash", str(REPO / "benchmarks/gpu_carry.sh"), str(tree), str(out)], check=True,
                   env={**os.environ, "PART_SIZE": "40K"}, capture_output=True)
    return sorted(out.glob("p*"), key=lambda p: int(p.name[1:]))


def _install(part: Path, root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(part / "install.sh")], env={**os.environ, "CARRY_ROOT": str(root)},
                          capture_output=True, text=True)


def test_parts_unpack_to_the_same_tree(tmp_path: Path) -> None:
    tree = tmp_path / "payload"
    (tree / "site" / "pkg").mkdir(parents=True)
    blob = os.urandom(150_000)  # incompressible: xz cannot shrink it below several 40K parts
    (tree / "blob.bin").write_bytes(blob)
    (tree / "site" / "pkg" / "__init__.py").write_text("VALUE = 17\n")
    parts = _bundle(tree, tmp_path / "carry")
    assert len(parts) == 4
    root = tmp_path / "device"
    for part in parts[:-1]:
        result = _install(part, root)
        assert result.returncode == 0 and "of 4" in result.stdout
        assert not (root / "carry-payload").exists()
    result = _install(parts[-1], root)
    assert result.returncode == 0 and "READY" in result.stdout, result.stderr
    dest = root / "carry-payload"
    assert (dest / "blob.bin").read_bytes() == blob
    assert not (root / "carry-payload-parts").exists()
    # the python wrapper puts the bundle's site first
    probe = subprocess.run([str(dest / "python"), "-c", "import pkg; print(pkg.VALUE)"], capture_output=True, text=True)
    assert probe.stdout.strip() == "17", probe.stderr
    assert "already" in _install(parts[0], root).stdout


def test_a_corrupt_part_is_refused(tmp_path: Path) -> None:
    tree = tmp_path / "payload"
    tree.mkdir()
    (tree / "blob.bin").write_bytes(os.urandom(100_000))
    parts = _bundle(tree, tmp_path / "carry")
    damaged = next(parts[1].glob("part-*"))
    data = bytearray(damaged.read_bytes())
    data[100] ^= 0xFF
    damaged.write_bytes(bytes(data))
    root = tmp_path / "device"
    results = [_install(part, root) for part in parts]
    assert results[-1].returncode != 0 and "FAILED" in results[-1].stdout + results[-1].stderr
    assert not (root / "carry-payload" / ".ready").exists()


def test_unknown_bundle_name(tmp_path: Path) -> None:
    with pytest.raises(subprocess.CalledProcessError) as failure:
        _bundle(tmp_path / "no-such-bundle", tmp_path / "carry")
    assert b"unknown bundle" in failure.value.stderr
