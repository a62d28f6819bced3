"""Private merged header tree from Debian's split linux-headers packages."""

from pathlib import Path

import pytest

from ksmtrace.errors import NoHeaders
from ksmtrace.kernel import headers


def debian_tree(root: Path, version: str = "6.1.0-56") -> None:
    common = root / f"usr/src/linux-headers-{version}-common"
    arch = root / f"usr/src/linux-headers-{version}-amd64"
    (common / "include/linux").mkdir(parents=True)
    (common / "include/linux/ksm.h").write_text("/* common */")
    (common / "Makefile").write_text("common")
    (arch / "include/generated").mkdir(parents=True)
    (arch / "include/generated/autoconf.h").write_text("#define CONFIG_KSM 1")
    (arch / "Makefile").write_text("arch")  # arch overrides common, as in Debian


def test_merged_tree_when_running_kernel_has_none(tmp_path, monkeypatch):
    monkeypatch.delenv("BCC_KERNEL_SOURCE", raising=False)
    debian_tree(tmp_path)
    h = headers.find_headers(tmp_path, release="6.18.44", cache=tmp_path / "cache")
    assert h.origin == "merged-distro" and h.version == "6.1.0-56-amd64"
    assert not h.matches_running and "not trusted" in h.note
    tree = Path(h.path)
    assert (tree / "include/linux/ksm.h").read_text() == "/* common */"
    assert (tree / "include/generated/autoconf.h").exists()
    assert (tree / "Makefile").read_text() == "arch"
    assert not (tmp_path / "lib/modules").exists()  # never written
    # idempotent: same tree, not rebuilt
    mtime = (tree / ".ksmtrace-merged").stat().st_mtime_ns
    h2 = headers.find_headers(tmp_path, release="6.18.44", cache=tmp_path / "cache")
    assert h2 == h and (tree / ".ksmtrace-merged").stat().st_mtime_ns == mtime


def test_newest_debian_version_wins(tmp_path, monkeypatch):
    monkeypatch.delenv("BCC_KERNEL_SOURCE", raising=False)
    debian_tree(tmp_path, "6.1.0-9")
    debian_tree(tmp_path, "6.1.0-56")
    h = headers.find_headers(tmp_path, release="6.18.44", cache=tmp_path / "cache")
    assert h.version == "6.1.0-56-amd64"


def test_running_kernel_headers_preferred(tmp_path, monkeypatch):
    monkeypatch.delenv("BCC_KERNEL_SOURCE", raising=False)
    debian_tree(tmp_path)
    build = tmp_path / "lib/modules/6.18.44/build"
    (build / "include").mkdir(parents=True)
    h = headers.find_headers(tmp_path, release="6.18.44", cache=tmp_path / "cache")
    assert h.origin == "running-kernel" and h.matches_running and h.path == str(build)


def test_no_headers_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("BCC_KERNEL_SOURCE", raising=False)
    h = headers.find_headers(tmp_path, release="6.18.44", cache=tmp_path / "cache")
    assert h.origin == "none" and h.path is None
    with pytest.raises(NoHeaders) as e:
        headers.use_headers(h)
    assert "linux-headers" in e.value.hint


def test_user_setting_respected(tmp_path, monkeypatch):
    monkeypatch.setenv("BCC_KERNEL_SOURCE", "/opt/k")
    assert headers.find_headers(tmp_path).origin == "env"
