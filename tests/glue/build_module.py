"""Builds modules' AnsiballZ with ansible-core's own builder, as a task
worker does, and prints what went into each zip.

usage: python build_module.py [--cache DIR] [--keep DIR] [--utils DIR]
                              [--library DIR] MODULE...
Prints JSON: {"installed": bool, "modules": {name: {"members": {path: sha256},
"parses": n}}}; each module gets a fresh local tmp (a fresh run's cache).
--cache installs scancache, --keep buildcache (payloads kept across runs).
"""

import argparse
import base64
import hashlib
import io
import json
import os
import re
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "ansible-glue"))

ap = argparse.ArgumentParser()
ap.add_argument("--cache")
ap.add_argument("--keep")
ap.add_argument("--utils")
ap.add_argument("--library")
ap.add_argument("modules", nargs="+")
opts = ap.parse_args()
if opts.utils:
    os.environ["ANSIBLE_MODULE_UTILS"] = opts.utils
if opts.library:
    os.environ["ANSIBLE_LIBRARY"] = opts.library

from ansible.plugins.loader import init_plugin_loader  # noqa: E402
init_plugin_loader()
import ansible.constants as C  # noqa: E402
from ansible.executor import module_common as mc  # noqa: E402
from ansible.parsing.dataloader import DataLoader  # noqa: E402
from ansible.plugins.loader import module_loader  # noqa: E402
from ansible.release import __version__  # noqa: E402
from ansible.template import Templar  # noqa: E402

parses = [0]
real_parse = mc._compile_module_ast


def counting(*a, **kw):
    parses[0] += 1
    return real_parse(*a, **kw)


# Counted under the cache, which calls the parser it finds at install.
mc._compile_module_ast = counting
installed = False
if opts.cache:
    from arbor_glue import scancache
    installed = scancache.install(mc, __version__, opts.cache)
if opts.keep:
    from arbor_glue import buildcache
    installed = buildcache.install(mc, __version__, opts.keep)

out = {"installed": installed, "version": __version__, "modules": {}}
for name in opts.modules:
    C.DEFAULT_LOCAL_TMP = tempfile.mkdtemp()
    parses[0] = 0
    path = module_loader.find_plugin(name)
    built = mc.modify_module(module_name=name, module_path=path, module_args={},
                             templar=Templar(loader=DataLoader()),
                             task_vars={"ansible_python_interpreter": sys.executable})
    data = built.b_module_data if hasattr(built, "b_module_data") else built[0]
    m = re.search(rb"(?:zip_data=|ZIPDATA = )'([A-Za-z0-9+/=]*)'", data)
    zf = zipfile.ZipFile(io.BytesIO(base64.b64decode(m.group(1))))
    members = {i.filename: hashlib.sha256(zf.read(i)).hexdigest() for i in zf.infolist()}
    out["modules"][name] = {"members": members, "parses": parses[0]}
print(json.dumps(out))
