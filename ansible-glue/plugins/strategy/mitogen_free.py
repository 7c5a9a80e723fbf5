# arbor: Mitogen's strategy name `mitogen_free`, for an ansible.cfg that
# still names it (`strategy = mitogen_free`). arbor needs no strategy of its
# own: this is Ansible's own `free`, under Mitogen's name. Put this directory
# on `strategy_plugins` in place of Mitogen's.
from __future__ import annotations

from ansible.plugins.strategy.free import StrategyModule as _Builtin
from ansible.utils.display import Display

DOCUMENTATION = """{name: mitogen_free, author: arbor, short_description: "Ansible's own free strategy, under Mitogen's name (arbor)",
  description: ["arbor works through connection plugins under Ansible's own strategies; this name lets an ansible.cfg written for Mitogen run unchanged."]}"""


class StrategyModule(_Builtin):
    def __init__(self, *args, **kwargs):
        super(StrategyModule, self).__init__(*args, **kwargs)
        Display().vvv("arbor: strategy mitogen_free is Ansible's own free")
