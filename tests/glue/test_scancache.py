"""arbor's cache of what ansible-core's module builder finds in each
module_util (arbor_glue/scancache.py), through ansible-core's real builder:
the zips are the zips vanilla builds, a warm cache skips the parses, and a
changed util is parsed again."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUILD = Path(__file__).with_name("build_module.py")
sys.path.insert(0, str(REPO / "ansible-glue"))
from arbor_glue import scancache  # noqa: E402

VENVS = {"2.19": REPO / ".venv", "2.21": REPO / ".venv-2.21"}


def build(venv, *args, env=None):
    """build_module.py's JSON for `args`, run by `venv`'s Python."""
    p = subprocess.run([str(venv / "bin" / "python"), str(BUILD), *map(str, args)],
                       capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout)


@pytest.mark.parametrize("version", sorted(VENVS))
def test_warm_cache_builds_the_same_zips_without_parsing_utils(version, tmp_path):
    venv = VENVS[version]
    assert (venv / "bin" / "python").exists(), f"{venv} missing: run deploy/setup"
    cache = tmp_path / "cache"
    modules = ["copy", "lineinfile", "command"]
    vanilla = build(venv, *modules)
    cold = build(venv, "--cache", cache, *modules)
    warm = build(venv, "--cache", cache, *modules)
    assert vanilla["version"].startswith(version)
    assert not vanilla["installed"] and cold["installed"] and warm["installed"]
    for name in modules:
        assert cold["modules"][name]["members"] == vanilla["modules"][name]["members"], name
        assert warm["modules"][name]["members"] == vanilla["modules"][name]["members"], name
        assert "ansible/module_utils/basic.py" in vanilla["modules"][name]["members"]
        # Vanilla parses the module and each util; warm, the module only.
        assert vanilla["modules"][name]["parses"] > 20, vanilla["modules"][name]
        assert warm["modules"][name]["parses"] == 1, warm["modules"][name]
    assert cold["modules"]["copy"]["parses"] == vanilla["modules"]["copy"]["parses"]
    assert cache.stat().st_mode & 0o777 == 0o700
    # One entry per util parsed: those of copy, and any the others add.
    assert len(list(cache.glob("*.json"))) >= vanilla["modules"]["copy"]["parses"] - 1


@pytest.mark.parametrize("version", sorted(VENVS))
def test_a_changed_util_is_parsed_again(version, tmp_path):
    venv = VENVS[version]
    lib, utils, cache = tmp_path / "library", tmp_path / "module_utils", tmp_path / "cache"
    lib.mkdir()
    utils.mkdir()
    (lib / "arbor_scan_probe.py").write_text(
        "from ansible.module_utils.basic import AnsibleModule\n"
        "from ansible.module_utils.arbor_scan_a import A\n"
        "def main():\n    AnsibleModule(argument_spec={}).exit_json(a=A)\n"
        "if __name__ == '__main__':\n    main()\n")
    (utils / "arbor_scan_a.py").write_text("A = 1\n")
    (utils / "arbor_scan_b.py").write_text("B = 2\n")
    args = ["--utils", utils, "--library", lib, "arbor_scan_probe"]
    first = build(venv, "--cache", cache, *args)["modules"]["arbor_scan_probe"]["members"]
    assert "ansible/module_utils/arbor_scan_a.py" in first
    assert "ansible/module_utils/arbor_scan_b.py" not in first
    (utils / "arbor_scan_a.py").write_text("from ansible.module_utils.arbor_scan_b import B\nA = B\n")
    second = build(venv, "--cache", cache, *args)["modules"]["arbor_scan_probe"]
    vanilla = build(venv, *args)["modules"]["arbor_scan_probe"]["members"]
    assert "ansible/module_utils/arbor_scan_b.py" in second["members"]
    assert second["members"] == vanilla
    assert second["parses"] == 3  # the module, the changed util, the new one


def test_entries_are_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(scancache, "ENTRIES_MAX", 8)
    cache = scancache.ScanCache(str(tmp_path / "c"), "test")
    found = scancache.Found({("ansible", "module_utils", "x")}, set())
    for i in range(20):
        cache.put("ansible.module_utils.u%d" % i, b"source %d" % i, False, found)
        os.utime(tmp_path / "c" / (cache.key("ansible.module_utils.u%d" % i, b"source %d" % i) + ".json"),
                 (1000 + i, 1000 + i))
    left = sorted(tmp_path.joinpath("c").glob("*.json"))
    assert 4 <= len(left) <= 8
    newest = cache.get("ansible.module_utils.u19", b"source 19")
    assert newest is not None and newest[0].submodules == {("ansible", "module_utils", "x")}
    assert cache.get("ansible.module_utils.u0", b"source 0") is None


def test_a_corrupt_entry_is_a_miss(tmp_path):
    cache = scancache.ScanCache(str(tmp_path), "test")
    (tmp_path / (cache.key("ansible.module_utils.x", b"s") + ".json")).write_text("{not json")
    assert cache.get("ansible.module_utils.x", b"s") is None
