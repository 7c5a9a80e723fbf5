# The end of the agent's payload. bootstrap (bootstrap/src/lib.rs) puts
# `_SOURCES`, the arbor_agent package's modules by name, before this: the
# package is imported from memory and the agent runs. The first stage
# execs the payload with ARBOR_NODE and ARBOR_PAYLOAD set.
import importlib.abc
import importlib.util
import linecache
import sys


class _Bundle(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _SOURCES:  # noqa: F821 (put before this by bootstrap)
            return None
        return importlib.util.spec_from_loader(fullname, self, is_package=fullname == "arbor_agent")

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        name = module.__name__
        source = _SOURCES[name]  # noqa: F821
        path = "<arbor>/%s%s" % (name.replace(".", "/"), "/__init__.py" if name == "arbor_agent" else ".py")
        # Tracebacks show the agent's lines.
        linecache.cache[path] = (len(source), None, source.splitlines(True), path)
        exec(compile(source, path, "exec"), module.__dict__)


sys.meta_path.insert(0, _Bundle())
from arbor_agent.agent import main  # noqa: E402

sys.exit(main(ARBOR_NODE, ARBOR_PAYLOAD))  # noqa: F821 (set by the first stage)
