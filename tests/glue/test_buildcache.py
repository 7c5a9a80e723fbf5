"""arbor's cross-run cache of built AnsiballZ payloads
(arbor_glue/buildcache.py), through ansible-core's real builder, each build
a fresh run's local tmp: a warm cache gives vanilla's zip without building,
and every change that makes vanilla build another zip (the module, a
module_util, a new util that shadows or an optional import that appears, a
collection's util) is a miss that builds vanilla's zip again."""

import os
import shutil
import sys
import time
from pathlib import Path

import pytest

from test_scancache import VENVS, build

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "ansible-glue"))
from arbor_glue import buildcache  # noqa: E402


def members(out, name):
    return out["modules"][name]["members"]


def parses(out, name):
    """0 when the payload came from the cache (not even the module parsed)."""
    return out["modules"][name]["parses"]


def settle(*paths):
    """Back-dates files and directories past the cache's settle time, as a
    file edited a while before the run would be."""
    old = time.time() - 5
    for p in paths:
        os.utime(p, (old, old))


@pytest.mark.parametrize("version", sorted(VENVS))
def test_a_warm_cache_gives_vanillas_zips_without_building(version, tmp_path):
    venv = VENVS[version]
    assert (venv / "bin" / "python").exists(), f"{venv} missing: run deploy/setup"
    keep = tmp_path / "keep"
    modules = ["command", "copy", "lineinfile"]
    vanilla = build(venv, *modules)
    cold = build(venv, "--keep", keep, *modules)
    warm = build(venv, "--keep", keep, *modules)
    assert cold["installed"] and warm["installed"]
    for name in modules:
        assert members(cold, name) == members(vanilla, name), name
        assert members(warm, name) == members(vanilla, name), name
        assert parses(cold, name) > 20 and parses(warm, name) == 0, name
    assert keep.stat().st_mode & 0o777 == 0o700
    assert len(list(keep.glob("*.payload"))) == len(modules)


@pytest.mark.parametrize("version", sorted(VENVS))
def test_edits_between_runs_build_vanillas_zip_again(version, tmp_path):
    venv = VENVS[version]
    lib, utils, high, keep = (tmp_path / d for d in ("library", "utils", "high", "keep"))
    for d in (lib, utils, high):
        d.mkdir()
    mod, util_a = lib / "arbor_keep_probe.py", utils / "arbor_keep_a.py"
    mod.write_text(
        "from ansible.module_utils.basic import AnsibleModule\n"
        "from ansible.module_utils.arbor_keep_a import A\n"
        "def main():\n    AnsibleModule(argument_spec={}).exit_json(a=A)\n"
        "if __name__ == '__main__':\n    main()\n")
    util_a.write_text("try:\n    from ansible.module_utils.arbor_keep_opt import A\n"
                      "except ImportError:\n    A = 1\n")
    settle(mod, util_a, lib, utils, high)
    args = ["--utils", f"{high}:{utils}", "--library", lib, "arbor_keep_probe"]

    def step():
        kept = build(venv, "--keep", keep, *args)
        vanilla = build(venv, *args)
        assert members(kept, "arbor_keep_probe") == members(vanilla, "arbor_keep_probe")
        return kept, members(vanilla, "arbor_keep_probe")

    kept, zip_ = step()
    kept, again = step()
    assert parses(kept, "arbor_keep_probe") == 0 and again == zip_

    # An edited module_util (same size, mtime put back: found by digest).
    text = util_a.read_text()
    st = util_a.stat()
    util_a.write_text(text.replace("A = 1", "A = 2"))
    os.utime(util_a, ns=(st.st_atime_ns, st.st_mtime_ns))
    kept, zip_b = step()
    assert parses(kept, "arbor_keep_probe") > 0 and zip_b != zip_
    kept, _ = step()
    assert parses(kept, "arbor_keep_probe") == 0

    # An optional import that now exists.
    (utils / "arbor_keep_opt.py").write_text("A = 3\n")
    settle(utils / "arbor_keep_opt.py", utils)
    kept, zip_c = step()
    assert "ansible/module_utils/arbor_keep_opt.py" in zip_c
    assert parses(kept, "arbor_keep_probe") > 0

    # A util in a path searched first shadows the one embedded.
    (high / "arbor_keep_a.py").write_text("A = 4\n")
    settle(high / "arbor_keep_a.py", high)
    kept, zip_d = step()
    assert parses(kept, "arbor_keep_probe") > 0 and zip_d != zip_c
    assert "ansible/module_utils/arbor_keep_opt.py" not in zip_d

    # The module itself.
    mod.write_text(mod.read_text().replace("exit_json(a=A)", "exit_json(a=A, b=1)"))
    settle(mod, lib)
    kept, zip_e = step()
    assert parses(kept, "arbor_keep_probe") > 0 and zip_e != zip_d
    kept, _ = step()
    assert parses(kept, "arbor_keep_probe") == 0


@pytest.mark.parametrize("version", sorted(VENVS))
def test_a_collections_util_edited_or_shadowed(version, tmp_path):
    venv = VENVS[version]
    keep = tmp_path / "keep"
    first, second = tmp_path / "first", tmp_path / "second"
    coll = second / "ansible_collections" / "arbor" / "probe"
    (coll / "plugins" / "modules").mkdir(parents=True)
    (coll / "plugins" / "module_utils").mkdir(parents=True)
    (coll / "plugins" / "modules" / "kept.py").write_text(
        "from ansible.module_utils.basic import AnsibleModule\n"
        "from ..module_utils.u import U\n"
        "def main():\n    AnsibleModule(argument_spec={}).exit_json(u=U)\n"
        "if __name__ == '__main__':\n    main()\n")
    util = coll / "plugins" / "module_utils" / "u.py"
    util.write_text("U = 1\n")
    first.mkdir()
    for p in [util, *coll.parent.parent.rglob("*"), first, second, second / "ansible_collections"]:
        settle(p)
    env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=f"{first}:{second}")
    name = "arbor.probe.kept"

    def step():
        kept = build(venv, "--keep", keep, name, env=env)
        vanilla = build(venv, name, env=env)
        assert members(kept, name) == members(vanilla, name)
        return kept, members(vanilla, name)

    step()
    kept, zip_ = step()
    assert parses(kept, name) == 0
    assert "ansible_collections/arbor/probe/plugins/module_utils/u.py" in zip_

    util.write_text("U = 22\n")
    settle(util)
    kept, zip_b = step()
    assert parses(kept, name) > 0 and zip_b != zip_

    # The same collection, installed in a path searched first, with its
    # own util: vanilla embeds that one (and that module).
    shutil.copytree(second / "ansible_collections", first / "ansible_collections")
    (first / "ansible_collections" / "arbor" / "probe" / "plugins" / "module_utils" / "u.py").write_text("U = 333\n")
    for p in [first, *first.rglob("*")]:
        settle(p)
    kept, zip_c = step()
    assert parses(kept, name) > 0 and zip_c != zip_b


def test_entries_are_bounded_by_count_and_bytes(tmp_path, monkeypatch):
    cache = buildcache.BuildCache(str(tmp_path), "test", None)
    monkeypatch.setattr(buildcache, "ENTRIES_MAX", 8)
    monkeypatch.setattr(buildcache, "CACHE_BYTES_MAX", 1 << 20)
    for i in range(12):
        (tmp_path / f"{i:02d}.payload").write_bytes(b"x" * 1000)
        (tmp_path / f"{i:02d}.json").write_text("{}")
        os.utime(tmp_path / f"{i:02d}.json", (1000 + i, 1000 + i))
    cache.trim()
    left = sorted(p.stem for p in tmp_path.glob("*.json"))
    assert left == [f"{i:02d}" for i in range(8, 12)]
    assert sorted(p.stem for p in tmp_path.glob("*.payload")) == left
    (tmp_path / "big.payload").write_bytes(b"x" * (1 << 20))
    (tmp_path / "big.json").write_text("{}")
    cache.trim()
    assert len(list(tmp_path.glob("*.payload"))) <= 4
    assert sum(p.stat().st_size for p in tmp_path.iterdir()) <= 1 << 19


def test_a_shared_or_foreign_directory_is_not_used(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o777)
    assert buildcache._private_dir(str(shared)) is None
    shared.chmod(0o700)
    assert buildcache._private_dir(str(shared)) == str(shared)
