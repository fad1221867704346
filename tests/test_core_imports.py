"""The core package must stay importable without the service dependencies (grpc, celery, redis, minio)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

FORBIDDEN = ("grpc", "celery", "redis", "minio", "kombu")


def test_core_never_imports_service_dependencies() -> None:
    code = textwrap.dedent(
        f"""
        import importlib, pkgutil, sys
        import cfrseg
        names = [m.name for m in pkgutil.walk_packages(cfrseg.__path__, "cfrseg.")]
        for n in names:
            importlib.import_module(n)
        bad = sorted(m for m in sys.modules if m.split(".")[0] in {FORBIDDEN!r})
        print(len(names), "modules")
        assert not bad, f"core imported service dependencies: {{bad}}"
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert int(r.stdout.split()[0]) >= 5


def test_core_imports_without_the_dicom_extra() -> None:
    """cfrseg.dicom, the I/O module and the CLI import with pydicom, highdicom and pynetdicom unavailable: they
    are imported lazily by the functions that need them (the first test imports every core module)."""
    code = textwrap.dedent(
        """
        import importlib, pkgutil, sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("pydicom", "highdicom", "pynetdicom"):
                    raise ImportError(f"blocked {name}")
        sys.meta_path.insert(0, Block())
        import cfrseg.dicom
        names = [m.name for m in pkgutil.walk_packages(cfrseg.dicom.__path__, "cfrseg.dicom.")]
        for n in names + ["cfrseg.data.io", "cfrseg.cli"]:
            importlib.import_module(n)
        assert "cfrseg.dicom.seg" in sys.modules and "cfrseg.dicom.series" in sys.modules
        print("ok")
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       check=False)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr
